"""An adapter trained on a mean-pooled model records its pooling: `load_adapter` applies it
again (or refuses a model that cannot take it), `export_peft` and the peft/full finetune outputs
warn, and a resume whose ``--pooling auto`` now reads otherwise is refused."""
from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from finetune_helpers import cli, dev_logits, load_saved_adapter, tiny_args, tiny_files
from increlora_fast import (IncreLoRAConfig, increlora_layers, inject_increlora, load_adapter,
                            save_adapter)
from increlora_fast.pooling import apply_pooling, model_pooling

VOCAB = 40
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def bert_base() -> nn.Module:
    """The same tiny random BERT classifier on every call (a base to train and load into)."""
    torch.manual_seed(11)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def adapter_config() -> IncreLoRAConfig:
    return IncreLoRAConfig(target_modules=["query", "value"], r_max=4, init_r=2, target_rank=2,
                           modules_to_save=["classifier"])


def trained(pooling: str) -> nn.Module:
    """A pooled, injected base whose adapters and head hold random (\"trained\") values."""
    model = inject_increlora(apply_pooling(bert_base(), pooling), adapter_config())
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            layer.lora_A.normal_(std=0.3)
            layer.lora_B.normal_(std=0.3)
            layer.lora_lambda.normal_()
        model.classifier.weight.normal_()
    return model


def fresh() -> nn.Module:
    """The base as a user loads it: CLS pooling, injected with the adapter's config."""
    return inject_increlora(bert_base(), adapter_config())


def batch() -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # padding, which the mean leaves out
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


def strip_pooling(directory: Path) -> None:
    """Make ``directory``'s adapter one saved before the pooling was recorded."""
    path = directory / WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "pooling"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=meta)
    config = json.loads((directory / CONFIG).read_text())
    config.pop("pooling", None)
    (directory / CONFIG).write_text(json.dumps(config))


def test_a_mean_pooled_adapter_loads_with_the_trained_predictions(tmp_path):
    model = trained("mean")
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["pooling"] == "mean"
    loaded = load_adapter(fresh(), tmp_path)
    assert model_pooling(loaded) == "mean"
    torch.testing.assert_close(logits(loaded), logits(model))
    # the same adapter without the record: the CLS pooling the loss of the record used to give
    strip_pooling(tmp_path)
    with pytest.warns(UserWarning, match="records no pooling .* with cls pooling: if it was "
                                         "trained with another --pooling"):
        old = load_adapter(fresh(), tmp_path)  # it cannot know: loaded as it is, and said so
    assert model_pooling(old) == "cls"
    assert not torch.allclose(logits(old), logits(model), atol=1e-3)


def test_a_cls_adapter_records_cls_and_loads_unchanged(tmp_path):
    model = trained("cls")
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["pooling"] == "cls"
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        assert f.metadata()["pooling"] == "cls"
    loaded = load_adapter(fresh(), tmp_path)
    assert model_pooling(loaded) == "cls"
    torch.testing.assert_close(logits(loaded), logits(model))


def refused_unchanged(model: nn.Module, directory: Path) -> str:
    """`load_adapter` refuses ``directory`` for ``model`` in one line and leaves it as it was;
    returns the message."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        load_adapter(model, directory)
    message = str(err.value)
    assert "\n" not in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    return message


def test_a_cls_adapter_refuses_a_mean_pooled_model(tmp_path):
    """The other silent difference: a CLS adapter into a model the user gave mean pooling.
    Refused in one line with the model unchanged; an adapter saved before the pooling was
    recorded (so either pooling) still loads into it as it is, with a warning that says so."""
    save_adapter(trained("cls"), tmp_path)
    model = inject_increlora(apply_pooling(bert_base(), "mean"), adapter_config())
    message = refused_unchanged(model, tmp_path)
    assert message.startswith(f"adapter {tmp_path} was trained with the model's own CLS "
                              "pooling, and this model was given mean pooling")
    strip_pooling(tmp_path)
    with pytest.warns(UserWarning, match=f"adapter {tmp_path} records no pooling .* loaded into "
                                         "this model as it is, with mean pooling"):
        old = load_adapter(model, tmp_path)
    assert model_pooling(old) == "mean"


def test_a_model_pooled_already_is_not_pooled_twice(tmp_path):
    model = trained("mean")
    save_adapter(model, tmp_path, training_state=True)
    target = inject_increlora(apply_pooling(bert_base(), "mean"), adapter_config())
    pooler = target.bert.pooler
    load_adapter(target, tmp_path)
    assert target.bert.pooler is pooler and len(target.bert._forward_pre_hooks) == 1
    torch.testing.assert_close(logits(target), logits(model))


class Unpooled(nn.Module):
    """BERT's modules under their usual names, without a ``base_model`` whose pooler mean
    pooling could replace."""

    def __init__(self) -> None:
        super().__init__()
        base = bert_base()
        self.bert, self.classifier = base.bert, base.classifier


def test_a_model_that_cannot_take_the_pooling_is_refused_unchanged(tmp_path):
    save_adapter(trained("mean"), tmp_path)
    model = inject_increlora(Unpooled(), adapter_config())
    message = refused_unchanged(model, tmp_path)
    assert message.startswith(f"adapter {tmp_path} was trained with pooling 'mean', which "
                              "Unpooled cannot take")
    assert "load it into the sequence classifier it was trained on" in message
    assert model_pooling(model) == "cls"


def test_an_unknown_recorded_pooling_is_refused(tmp_path):
    save_adapter(trained("mean"), tmp_path)
    path = tmp_path / WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=dict(meta, pooling="max"))
    model = fresh()
    with pytest.raises(ValueError, match=f"adapter {tmp_path} records pooling 'max', which this "
                                         "increlora_fast does not know"):
        load_adapter(model, tmp_path)
    assert model_pooling(model) == "cls"


def test_export_peft_warns_that_peft_needs_the_pooling_applied(tmp_path):
    peft = pytest.importorskip("peft")
    from increlora_fast.integrations.peft_export import export_peft

    model = trained("mean")
    with pytest.warns(UserWarning, match=r"trained with mean pooling, which peft does not "
                                         r"record: apply .*apply_pooling\(model, 'mean'\) to the "
                                         "base model before peft loads"):
        export_peft(model, tmp_path / "mean")
    assert "pooling" not in json.dumps(json.loads((tmp_path / "mean" / CONFIG).read_text()))
    with safe_open(str(tmp_path / "mean" / WEIGHTS), framework="pt") as f:
        assert f.metadata()["increlora_pooling"] == "mean"
    # what the warning says to do gives the trained predictions
    served = peft.PeftModel.from_pretrained(apply_pooling(bert_base(), "mean"),
                                            str(tmp_path / "mean")).eval()
    torch.testing.assert_close(logits(served), logits(model), rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_peft(trained("cls"), tmp_path / "cls")


def test_the_pooling_applied_after_peft_loads_gives_the_trained_predictions(tmp_path):
    """apply_pooling looked for the pooler on the model's ``base_model`` only: on a peft model
    (whose ``base_model`` is peft's LoraModel) it found none and refused mean pooling ("use
    --pooling cls"), although the model it wraps takes it. It finds the encoder under the
    wrapper, so the pooling applied after peft loads gives the trained predictions too."""
    peft = pytest.importorskip("peft")
    from increlora_fast.integrations.peft_export import export_peft

    model = trained("mean")
    with pytest.warns(UserWarning, match="mean pooling"):
        export_peft(model, tmp_path / "mean")
    served = apply_pooling(peft.PeftModel.from_pretrained(bert_base(), str(tmp_path / "mean")),
                           "mean").eval()
    assert model_pooling(served) == "mean"
    torch.testing.assert_close(logits(served), logits(model), rtol=1e-4, atol=1e-5)


def test_the_mask_is_read_by_name_from_an_encoder_called_positionally():
    """The hook took an encoder's second positional argument as its attention mask: FNet's is
    ``token_type_ids`` (LayoutLM's ``bbox``), so ``model.fnet(ids, token_type_ids)`` averaged
    only the second segment's tokens, silently. The mask is found by its parameter name."""
    import transformers

    torch.manual_seed(0)
    model = apply_pooling(transformers.FNetForSequenceClassification(transformers.FNetConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, intermediate_size=24)), "mean")
    ids = batch()["input_ids"]
    segments = torch.zeros_like(ids)
    segments[:, 4:] = 1
    with torch.no_grad():
        out = model.eval().fnet(ids, segments)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=96, dev_rows=40)


def eval_loss(tiny: dict, model: nn.Module) -> float:
    """The dev loss of ``model`` as `finetune` computes it (same batches)."""
    return float(torch.nn.functional.cross_entropy(*dev_logits(tiny, model)))


def test_finetune_pooling_mean_adapter_reproduces_its_dev_loss(tiny, tmp_path):
    out = tmp_path / "run"
    assert cli(tiny_args(tiny, out, "--pooling", "mean", "--lr", "0.05")) == 0
    reported = json.loads((out / "metrics.json").read_text())["eval_loss"]
    assert json.loads((out / CONFIG).read_text())["pooling"] == "mean"
    assert eval_loss(tiny, load_saved_adapter(tiny, out)) == pytest.approx(reported, rel=1e-5)
    strip_pooling(out)  # as loading did before the pooling was recorded
    with pytest.warns(UserWarning, match="records no pooling"):
        stripped = load_saved_adapter(tiny, out)
    assert eval_loss(tiny, stripped) != pytest.approx(reported, rel=1e-3)


@pytest.mark.parametrize("method, what", [("lora", "peft adapter"), ("full", "model")])
def test_finetune_outputs_that_cannot_record_the_pooling_warn(tiny, tmp_path, method, what):
    out = tmp_path / method
    with pytest.warns(UserWarning, match=f"the {method} {what} in {out} was trained with "
                                         r"--pooling mean, which its files cannot record: apply "
                                         r".*apply_pooling\(model, 'mean'\)"):
        assert cli(tiny_args(tiny, out, "--method", method, "--pooling", "mean",
                             "--max-steps", "2")) == 0


def sentence_transformers_folder(model: str, root: Path, mean: bool) -> Path:
    """A copy of the tiny BERT folder that a sentence-transformers Pooling module describes."""
    folder = root / "st-bert"
    if not folder.exists():
        shutil.copytree(model, folder)
        (folder / "modules.json").write_text(json.dumps(
            [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": not mean, "pooling_mode_mean_tokens": mean}))
    return folder


@pytest.mark.parametrize("method", ["increlora", "lora"])
def test_resume_refuses_a_model_folder_whose_pooling_changed(tiny, tmp_path, capsys, method):
    folder = sentence_transformers_folder(tiny["model"], tmp_path, mean=True)
    out = tmp_path / "run"
    args = tiny_args(dict(tiny, model=str(folder)), out, "--pooling", "auto", "--method",
                     method, save_steps=2, steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora's note that its adapter cannot record the pooling
        assert cli(args) == 0
    checkpoint = out / "checkpoint-2"
    sentence_transformers_folder(tiny["model"], tmp_path, mean=False)
    capsys.readouterr()
    assert cli(["--resume", str(checkpoint), "--output-dir", str(tmp_path / "again"),
                "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint} was trained with pooling mean, but --pooling auto now " \
           "gives cls" in err
    assert "resume with the model files it was trained on" in err


@pytest.mark.parametrize("family", ["roberta", "mpnet", "albert"])
def test_mean_pooling_is_refused_where_the_head_would_not_read_it(family):
    """RoBERTa's and MPNet's classifiers are built without a pooler (``pooler`` None; their head
    reads the first token itself), so the MeanPooler put there was never read: --pooling mean
    (and auto on an all-mpnet-base-v2 folder) trained CLS pooling silently and recorded
    ``mean``. ALBERT's pooler is a Linear on the first token's state: the MeanPooler failed at
    the first forward. Each is refused up front, the model unchanged."""
    import transformers

    configs = {"roberta": transformers.RobertaConfig, "mpnet": transformers.MPNetConfig,
               "albert": transformers.AlbertConfig}
    extra = {"embedding_size": 16} if family == "albert" else {}
    model = transformers.AutoModelForSequenceClassification.from_config(configs[family](
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2, **extra))
    pooler = model.base_model.pooler
    with pytest.raises(ValueError, match=r"--pooling mean is not available for "):
        apply_pooling(model, "mean")
    assert model.base_model.pooler is pooler and model_pooling(model) == "cls"


def test_pooling_auto_on_a_head_that_reads_the_first_token_trains_cls_with_a_warning(
        tiny, tmp_path):
    """``--pooling auto`` on a sentence-transformers RoBERTa folder that pools by mean: its
    classifier reads the first token itself, so mean pooling cannot be applied. auto trains
    the model's own (cls) pooling with a warning and records cls, instead of failing with an
    error about ``--pooling mean``, which the user never gave."""
    import transformers

    folder = sentence_transformers_folder(tiny["model"], tmp_path, mean=True)
    vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
    for name in ("config.json", "model.safetensors"):
        (folder / name).unlink()
    transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=40, pad_token_id=0)).save_pretrained(folder)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"--pooling auto: .* pools by mean .* "
                                         r"RobertaForSequenceClassification reads the first "
                                         r"token itself; trained with cls pooling"):
        assert cli(tiny_args(dict(tiny, model=str(folder)), out, "--pooling", "auto",
                             steps=2)) == 0
    assert json.loads((out / "metrics.json").read_text())["pooling"] == "cls"


def test_apply_pooling_twice_leaves_one_pooler_and_one_hook():
    """A second ``apply_pooling(model, "mean")`` put a new MeanPooler in place and registered a
    second hook, leaving the first one behind to feed the mask to a pooler no longer read. The
    second call leaves the model as the first made it."""
    model = apply_pooling(bert_base(), "mean")
    pooler, hooks = model.bert.pooler, dict(model.bert._forward_pre_hooks)
    expected = logits(model)
    assert apply_pooling(model, "mean") is model
    assert model.bert.pooler is pooler and dict(model.bert._forward_pre_hooks) == hooks
    assert len(hooks) == 1
    torch.testing.assert_close(logits(model), expected)


def test_pooling_auto_fallback_names_what_a_decoder_head_reads(tmp_path):
    """The fallback warning said every such head "reads the first token itself": a decoder's
    ``score`` head reads each input's last token (T5's and BART's their last EOS token). It
    names what the head reads."""
    from finetune_helpers import GPT2_ARGS, write_tiny_gpt2

    tiny = tiny_files(tmp_path / "tiny", train_rows=32, dev_rows=8)
    folder = sentence_transformers_folder(str(write_tiny_gpt2(tmp_path / "gpt2")), tmp_path,
                                          mean=True)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"--pooling auto: .* pools by mean .* the head of "
                                         r"GPT2ForSequenceClassification reads each input's "
                                         r"last token itself; trained with cls pooling"):
        assert cli(tiny_args(dict(tiny, model=str(folder)), out, "--pooling", "auto",
                             *GPT2_ARGS, steps=2)) == 0
    assert json.loads((out / "metrics.json").read_text())["pooling"] == "cls"


@pytest.mark.parametrize("family, reads", [
    ("roberta", "the first token"), ("gpt2", "each input's last token"),
    ("bart", "the last end-of-sequence token"), ("t5", "the last end-of-sequence token"),
    ("xlnet", "the last token")])
def test_head_reads_names_each_family_s_token(family, reads):
    import transformers

    from increlora_fast.training.finetune_run import head_reads

    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, num_labels=2)
    with torch.device("meta"):
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    assert head_reads(model) == reads


def test_pooling_mean_on_a_head_without_a_pooler_is_refused_before_the_model_loads(
        tiny, tmp_path, monkeypatch, capsys):
    """``--pooling mean`` on RoBERTa was refused after the weights had loaded (minutes for a
    big model): the config says enough, so it is refused before, in one line."""
    import transformers

    from increlora_fast.training import finetune_run

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --pooling mean was refused")

    monkeypatch.setattr(finetune_run, "load_model", refuse)
    folder = tmp_path / "roberta"
    transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32
                               ).save_pretrained(folder)
    assert cli(tiny_args(dict(tiny, model=str(folder)), tmp_path / "run", "--pooling",
                         "mean")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["increlora-fast finetune: error: --pooling mean is not available for "
                   "RobertaForSequenceClassification (only mean, for encoders with a BERT-style "
                   "pooler); use --pooling cls"]


def hub_cache(monkeypatch, root: Path, repo_id: str, model: str, mean: Optional[bool]) -> Path:
    """A local hub cache under ``root`` (the layout huggingface_hub writes) holding ``repo_id``:
    a copy of the tiny BERT in ``model``, with a sentence-transformers Pooling module that pools
    by mean (or CLS) unless ``mean`` is None; the hub clients read only it, offline."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model, snapshot)
    if mean is not None:
        sentence_transformers_folder(model, root, mean)
        shutil.copy(root / "st-bert" / "modules.json", snapshot)
        shutil.copytree(root / "st-bert" / "1_Pooling", snapshot / "1_Pooling")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("INCRELORA_OFFLINE", "1")
    return snapshot


def test_pooling_auto_reads_a_hub_id_s_pooling_from_the_local_hub_cache(tiny, tmp_path,
                                                                       monkeypatch):
    """``--pooling auto`` with a hub id resolved to cls, silently, even when the model's
    sentence-transformers pooling config was in the local hub cache: it is read from there."""
    hub_cache(monkeypatch, tmp_path / "hub", "org/st-bert", tiny["model"], mean=True)
    out = tmp_path / "run"
    assert cli(tiny_args(dict(tiny, model="org/st-bert"), out, "--pooling", "auto",
                         steps=2)) == 0
    assert json.loads((out / "metrics.json").read_text())["pooling"] == "mean"
    assert json.loads((out / CONFIG).read_text())["pooling"] == "mean"


def test_pooling_auto_says_when_the_hub_cache_cannot_tell(tiny, tmp_path, monkeypatch):
    hub_cache(monkeypatch, tmp_path / "hub", "org/bert", tiny["model"], mean=None)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"--pooling auto: the local hub cache holds no "
                                         r"sentence-transformers modules\.json of org/bert, so "
                                         r"its pooling is unknown; cls is used"):
        assert cli(tiny_args(dict(tiny, model="org/bert"), out, "--pooling", "auto",
                             steps=2)) == 0
    assert json.loads((out / "metrics.json").read_text())["pooling"] == "cls"


def test_metrics_record_the_side_the_batches_were_padded_on(tiny, tmp_path):
    """finetune pads on the side the head reads whatever side the tokenizer was saved with,
    and recorded it nowhere: a user padding with the saved tokenizer's side could not
    reproduce the predictions. metrics.json records the side the run padded on."""
    from transformers import AutoTokenizer

    folder = tmp_path / "left"
    shutil.copytree(tiny["model"], folder)
    saved = folder / "tokenizer_config.json"
    saved.write_text(json.dumps(dict(json.loads(saved.read_text()), padding_side="left")))
    assert AutoTokenizer.from_pretrained(folder).padding_side == "left"
    out = tmp_path / "run"
    assert cli(tiny_args(dict(tiny, model=str(folder)), out, steps=2)) == 0
    assert json.loads((out / "metrics.json").read_text())["padding_side"] == "right"
