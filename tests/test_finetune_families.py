"""`finetune` on tiny random models of other families than BERT, offline: target modules and pad
tokens."""
from __future__ import annotations

from pathlib import Path

import pytest

from finetune_helpers import VOCAB, cli, forbid_training, tiny_args, tiny_files


def write_tiny_deberta(directory: Path) -> Path:
    """A randomly initialised DeBERTa-v2 (attention linears named query_proj, key_proj,
    value_proj) with the word tokenizer of `finetune_helpers`."""
    from transformers import BertTokenizer, DebertaV2Config, DebertaV2Model

    directory.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(str(directory))
    DebertaV2Model(DebertaV2Config(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=24,
                                   max_position_embeddings=64)).save_pretrained(str(directory))
    return directory


def write_tiny_distilbert(directory: Path) -> Path:
    """A randomly initialised DistilBERT encoder: its classifier adds a ``pre_classifier``
    linear that the checkpoint, like distilbert-base-uncased, has no weights for."""
    from transformers import BertTokenizer, DistilBertConfig, DistilBertModel

    directory.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(str(directory))
    DistilBertModel(DistilBertConfig(vocab_size=len(VOCAB), dim=16, n_layers=1, n_heads=2,
                                     hidden_dim=24, max_position_embeddings=64)
                    ).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return dict(tiny_files(root, train_rows=32, dev_rows=8),
                deberta=str(write_tiny_deberta(root / "deberta")),
                distilbert=str(write_tiny_distilbert(root / "distilbert")))


@pytest.mark.parametrize("method", ["lora", "adalora", "increlora"])
def test_target_modules_the_model_lacks_are_refused_naming_the_option(tiny, tmp_path, capsys,
                                                                     method):
    """The default --target-modules name BERT's linears; DeBERTa-v2 has no 'query', 'key' or
    'value' (its are query_proj, ...): peft adapted the rest without a word, so a LoRA run
    trained fewer modules than asked; every method refuses it in one line naming the option,
    the entries and the model's linear layers."""
    out = tmp_path / method
    assert cli(tiny_args(dict(tiny, model=tiny["deberta"]), out, "--method", method,
                         steps=20)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "--target-modules" in err and "'query', 'key', 'value'" in err
    assert "query_proj" in err and "classifier" not in err.split("linear layers")[-1]
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("tokenizer_pad", [False, True])
def test_a_config_pad_token_id_outside_the_vocabulary_is_replaced_by_the_padding_one(
        tmp_path, tokenizer_pad):
    """Some decoder configs name pad_token_id -1 (early Llama) or an id past the vocabulary: no
    input holds it, so a decoder classifier read the last position of every input, on padded
    batches a padding one, in training and evaluation (a warning only said they differ). The
    config now gets the id the batches are padded with."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from finetune_helpers import write_tiny_gpt2
    from increlora_fast.training.finetune_run import set_pad_token
    tokenizer = AutoTokenizer.from_pretrained(str(write_tiny_gpt2(tmp_path / "gpt2")))
    if tokenizer_pad:
        tokenizer.pad_token = "[UNK]"
    pad = tokenizer.convert_tokens_to_ids("[UNK]" if tokenizer_pad else "<eos>")
    for named in (-1, len(tokenizer)):
        model = SimpleNamespace(config=SimpleNamespace(pad_token_id=named))
        with pytest.warns(UserWarning, match=f"pad_token_id {named} .*{pad}"):
            assert set_pad_token(tokenizer, model, "m") == pad
        assert model.config.pad_token_id == tokenizer.pad_token_id == pad


def test_a_decoder_tokenizer_that_pads_left_scores_as_its_inputs_alone(tmp_path):
    """GPT-2 numbers positions from the first column: a tokenizer saved to pad on the left
    (for generation) shifted every shorter input's positions, so the dev metrics (and the
    training batches) depended on what each input was batched with, and differed from the
    model's outputs on the input alone. A decoder classifier finds its last real token on
    either side, so finetune pads on the right."""
    import json

    from transformers import AutoTokenizer

    from finetune_helpers import padded_dev_losses, write_tiny_gpt2
    model_dir = write_tiny_gpt2(tmp_path / "gpt2")
    saved = model_dir / "tokenizer_config.json"
    saved.write_text(json.dumps(dict(json.loads(saved.read_text()), padding_side="left")))
    assert AutoTokenizer.from_pretrained(str(model_dir)).padding_side == "left"
    reported, alone = padded_dev_losses(tmp_path, model_dir, seed=7)
    assert alone == pytest.approx(reported, rel=1e-5)


def write_tiny_roberta(directory: Path) -> Path:
    """A randomly initialised RoBERTa encoder (positions numbered from the padding index on, its
    head reading the first token itself) with the word tokenizer of `finetune_helpers`."""
    from transformers import BertTokenizer, RobertaConfig, RobertaModel

    directory.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(str(directory))
    RobertaModel(RobertaConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=24, pad_token_id=0,
                               max_position_embeddings=64)).save_pretrained(str(directory))
    return directory


def pads_on(directory: Path, side: str) -> Path:
    """Save the tokenizer in ``directory`` to pad on ``side``."""
    import json

    saved = directory / "tokenizer_config.json"
    saved.write_text(json.dumps(dict(json.loads(saved.read_text()), padding_side=side)))
    return directory


@pytest.mark.parametrize("family, pooling", [("bert", "cls"), ("bert", "mean"),
                                             ("roberta", "cls")])
def test_an_encoder_tokenizer_that_pads_left_scores_as_its_inputs_alone(tmp_path, family,
                                                                       pooling):
    """An encoder's head reads the first token (BERT's pooler, RoBERTa's classifier), and BERT
    numbers positions from the first column: a tokenizer saved to pad on the left made every
    shorter input's head read a padding token, and shifted BERT's positions (under mean pooling
    too), so the training batches and the dev metrics depended on what each input was batched
    with. finetune pads an encoder's batches on the right."""
    from finetune_helpers import padded_dev_losses, write_tiny_bert

    write = write_tiny_bert if family == "bert" else write_tiny_roberta
    model_dir = pads_on(write(tmp_path / family), "left")
    reported, alone = padded_dev_losses(tmp_path, model_dir, seed=7, extra=(
        "--target-modules", "query,value", "--pooling", pooling))
    assert alone == pytest.approx(reported, rel=1e-5)


def write_tiny_xlnet(directory: Path, side: str) -> Path:
    """A randomly initialised XLNet (relative positions, no limit: its config's
    ``max_position_embeddings`` is -1) whose word tokenizer, as XLNet's, ends every input with
    ``<sep> <cls>`` (the token its head reads), saved to pad on ``side``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, XLNetConfig, XLNetModel

    directory.mkdir(parents=True, exist_ok=True)
    words = VOCAB + ["<sep>", "<cls>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A <sep> <cls>", special_tokens=[("<sep>", len(VOCAB)), ("<cls>", len(VOCAB) + 1)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                            sep_token="<sep>", cls_token="<cls>", padding_side=side
                            ).save_pretrained(str(directory))
    XLNetModel(XLNetConfig(vocab_size=len(words), d_model=16, n_layer=1, n_head=2, d_inner=24,
                           pad_token_id=0)).save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("side", ["left", "right"])
def test_xlnet_trains_with_its_last_token_read_whatever_side_its_tokenizer_pads(tmp_path, side):
    """XLNet's config gives -1 as its number of positions (it has no limit): any --max-seq-len
    was refused as more than -1 positions. And its head reads the last token (the CLS its
    tokenizer appends), so its batches are padded on the left, also where its tokenizer was
    saved to pad on the right (the head read padding on every shorter input)."""
    from finetune_helpers import padded_dev_losses

    model_dir = write_tiny_xlnet(tmp_path / "xlnet", side)
    reported, alone = padded_dev_losses(tmp_path, model_dir, seed=7, extra=(
        "--target-modules", "layer_1,layer_2", "--modules-to-save",
        "sequence_summary,logits_proj"))
    assert alone == pytest.approx(reported, rel=1e-5)


@pytest.mark.parametrize("family,targets,layer", [
    ("distilbert", "q_lin,v_lin", "pre_classifier"),
    ("deberta", "query_proj,value_proj", "pooler")])
@pytest.mark.parametrize("method", ["lora", "increlora"])
def test_new_layers_of_the_head_are_added_to_modules_to_save(tiny, tmp_path, method, family,
                                                            targets, layer):
    """DistilBERT's classifier reads a pre_classifier linear (DeBERTa-v2's a pooler) that the
    encoder checkpoint has no weights for: from_pretrained starts it random, and an adapter
    method froze it there (neither trained nor saved) as the default --modules-to-save names
    only the classifier. The run then was refused, naming the option to give; the layer is now
    added (trained and saved in the adapter) with one warning, as the head itself is, and the
    metrics say what was added. Given by hand, it is not added again and not warned about."""
    import json

    from safetensors.torch import load_file
    from increlora_fast.training.finetune_run import HeadAddedWarning

    model = dict(tiny, model=tiny[family])
    out = tmp_path / method
    with pytest.warns(HeadAddedWarning, match=f"no weights for '{layer}' of the classification "
                                              "head.*added to --modules-to-save") as caught:
        assert cli(tiny_args(model, out, "--method", method, "--target-modules", targets,
                             steps=2)) == 0
    assert sum(isinstance(w.message, HeadAddedWarning) for w in caught) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["modules_to_save_added"] == [layer]
    assert metrics["settings"]["modules_to_save"] == ["classifier", layer]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any(key.split(".")[0] == layer or f".{layer}." in key for key in weights), \
        sorted(weights)

    given = tmp_path / f"{method}-given"
    assert cli(tiny_args(model, given, "--method", method, "--target-modules", targets,
                         "--modules-to-save", f"classifier,{layer}", steps=2)) == 0
    assert json.loads((given / "metrics.json").read_text())["modules_to_save_added"] == []


def test_a_checkpoint_without_pooler_weights_trains_with_mean_pooling(tiny, tmp_path, capsys):
    """A BERT checkpoint saved without its pooler (sentence-transformers exports often are)
    leaves BERT's pooler random: refused under cls pooling, which reads it, and trained under
    mean pooling, which replaces it (the check for layers left random ran before the pooling
    was applied, and refused this run too)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from finetune_helpers import VOCAB as words
    folder = tmp_path / "no_pooler"
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(folder))
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=24, max_position_embeddings=64),
              add_pooling_layer=False).save_pretrained(str(folder))
    files = dict(tiny, model=str(folder))
    assert cli(tiny_args(files, tmp_path / "cls", "--pooling", "cls", steps=2)) == 2
    assert "'pooler'" in capsys.readouterr().err
    assert cli(tiny_args(files, tmp_path / "mean", "--pooling", "mean", steps=2)) == 0
    assert (tmp_path / "mean" / "metrics.json").is_file()


def test_an_encoder_decoder_classifier_trains_and_saves_its_head(tiny, tmp_path):
    """BART's and T5's sequence classifiers call their head ``classification_head``, a name
    finetune did not know: the head was not added to --modules-to-save (the run was then
    refused as leaving it random). It is now trained and saved as BERT's classifier is."""
    from safetensors import safe_open
    from transformers import BartConfig, BartModel, BertTokenizer

    folder = tmp_path / "bart"
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(str(folder))
    BartModel(BartConfig(vocab_size=len(VOCAB), d_model=16, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2,
                         encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         decoder_start_token_id=3, forced_eos_token_id=None)
              ).save_pretrained(str(folder))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="classification_head"):
        assert cli(tiny_args(dict(tiny, model=str(folder)), out, "--target-modules",
                             "q_proj,v_proj", steps=2)) == 0
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert any("classification_head.out_proj.weight" in key for key in f.keys())


def test_compare_reuses_the_finished_runs_of_a_model_whose_head_layer_was_added(
        tiny, tmp_path, capsys, monkeypatch):
    """Each DistilBERT run adds pre_classifier to modules_to_save (its checkpoint has no
    weights for it), so its metrics.json records ['classifier', 'pre_classifier'] where the
    comparison asked for ['classifier']: a second ``--compare`` into the folder must reuse the
    finished runs (as must one naming the layer by hand: the same run), and another list is
    still another setting."""
    import json

    model = dict(tiny, model=tiny["distilbert"])
    args = tiny_args(model, tmp_path / "cmp", "--compare", "--methods", "increlora", "--lrs",
                     "0.01", "--seeds", "1", "--target-modules", "q_lin,v_lin", steps=2)
    with pytest.warns(UserWarning, match="pre_classifier"):
        assert cli(args) == 0
    first = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    capsys.readouterr()

    forbid_training(monkeypatch)
    assert cli(args) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 1
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text()) == first
    assert cli(args + ["--modules-to-save", "classifier,pre_classifier"]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 1
    assert cli(args + ["--modules-to-save", "classifier,out_lin"]) == 2
    assert "modules_to_save" in capsys.readouterr().err


def write_tiny_llama(directory: Path) -> Path:
    """A randomly initialised Llama (rotary positions numbered from the first column; its
    classifier reads the last token that is not padding) with a word tokenizer over `VOCAB`
    that ends every input with ``<eos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = VOCAB + ["<eos>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", len(VOCAB))])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="<eos>").save_pretrained(str(directory))
    LlamaModel(LlamaConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                           max_position_embeddings=64, pad_token_id=0)
               ).save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_padding_to_max_length_changes_no_real_rows_logits_loss_or_gradients(tmp_path, family):
    """CUDA graphs pad every training batch to --max-seq-len (``--pad-to max_length``): the
    extra padding must leave what the real tokens compute as eager batches padded to their
    longest input do, for an encoder with absolute positions and token type ids (BERT) and a
    decoder with positions from the first column whose head reads the last real token (Llama),
    in float32: the same logits, task loss (the mean over the real rows) and gradients."""
    import random

    import torch

    from finetune_helpers import FILLER, sentiment_rows, write_csv, write_tiny_bert
    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.settings import RunSettings
    from increlora_fast.training.step_runner import forward_with_loss
    model = str(write_tiny_bert(tmp_path / "bert") if family == "bert"
                else write_tiny_llama(tmp_path / "llama"))
    rng = random.Random(0)
    rows = [dict(row, text=row["text"] + " " + " ".join(rng.sample(FILLER, rng.randrange(8))))
            for row in sentiment_rows(24, 0)]
    extra = {} if family == "bert" else dict(target_modules=["q_proj", "v_proj"],
                                             modules_to_save=["score"])
    results = {}
    for pad_to in ("longest", "max_length"):
        s = RunSettings(model=model, task=None, train_file=str(write_csv(tmp_path / "t.csv",
                                                                         rows[:16])),
                        eval_file=str(write_csv(tmp_path / "d.csv", rows[16:])), batch_size=8,
                        max_seq_len=32, max_steps=100, pad_to=pad_to, **extra)
        _, _, run, batches = build_run(s)
        for module in run.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # (its masks are drawn over the padded shape)
        batch = batches.train_batch(1)
        out, loss = forward_with_loss(run.model, batch)
        loss.backward()
        results[pad_to] = (batch["input_ids"].shape[1], out.logits.detach(), loss.detach(),
                           {n: p.grad for n, p in run.model.named_parameters()
                            if p.grad is not None})
    (short, logits, loss, grads), (fixed, fixed_logits, fixed_loss, fixed_grads) = \
        results["longest"], results["max_length"]
    assert short < fixed == 32  # the extra padding is there
    torch.testing.assert_close(fixed_logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fixed_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == fixed_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(fixed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
