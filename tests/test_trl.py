"""LLM trainers: TRL's SFTTrainer with IncreLoRA (subclass, and stock SFTTrainer with the
callback and increlora_optimizers), gradient checkpointing on; causal LMs through
IncreLoRATrainer; the README's SFT example as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from increlora_fast import IncreLoRAConfig, inject_increlora, increlora_layers
from increlora_fast.controller import IncreLoRAController
from increlora_fast.integrations.trainer import IncreLoRATrainer

README = Path(__file__).resolve().parent.parent / "README.md"
WORDS = "the cat sat on a mat dog ran far away and then came back home".split()
TARGETS = ["q_proj", "v_proj"]  # 2 layers x 2 = 4 modules; budget 4 x target_rank 2 = 8


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=3 + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=2))


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def texts(n: int = 48):
    gen = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (10,), generator=gen))
            for _ in range(n)]


def increlora_model(targets=tuple(TARGETS)):
    config = IncreLoRAConfig(target_modules=list(targets), r_max=4, target_rank=2,
                             init_warmup=2, incre_interval=2, top_h=1)
    return inject_increlora(tiny_llama(), config), config


def stock_sft_trainer(tmp_path, model, config):
    """A stock SFTTrainer with `increlora_optimizers` and the installed callback; (trainer,
    controller)."""
    from datasets import Dataset
    from trl import SFTTrainer
    from increlora_fast.integrations.trainer import IncreLoRACallback, increlora_optimizers

    controller = IncreLoRAController(model, config)
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path),
                         train_dataset=Dataset.from_dict({"text": texts()}),
                         processing_class=tokenizer(),
                         optimizers=increlora_optimizers(model, lr=5e-3))
    IncreLoRACallback(controller).install(trainer)
    return trainer, controller


def sft_config(out, **kw):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(out), max_steps=12, per_device_train_batch_size=8,
                     learning_rate=5e-3, gradient_checkpointing=True, max_length=16,
                     save_strategy="no", report_to=[], use_cpu=True, seed=0,
                     disable_tqdm=True, logging_steps=4, **kw)


def assert_grown_and_trained(model, controller: IncreLoRAController, before: dict) -> None:
    assert controller.budget_reached and controller.current_total_rank() == 8
    assert any(r > 1 for r in controller.rank_pattern().values())
    assert torch.isfinite(controller.importance()).all() and controller.importance().sum() > 0
    for name, layer in increlora_layers(model):
        assert not torch.equal(layer.lora_B.detach(), before[name]), name


def test_increlora_sft_trainer_with_gradient_checkpointing(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from increlora_fast.integrations.sft import IncreLoRASFTTrainer

    model, _ = increlora_model()
    before = {n: layer.lora_B.detach().clone() for n, layer in increlora_layers(model)}
    trainer = IncreLoRASFTTrainer(model=model, args=sft_config(tmp_path),
                                  train_dataset=Dataset.from_dict({"text": texts()}),
                                  processing_class=tokenizer())
    trainer.train()
    assert model.is_gradient_checkpointing
    assert_grown_and_trained(model, trainer.increlora_controller, before)
    logged = [e for e in trainer.state.log_history if "increlora/total_rank" in e]
    assert logged and logged[-1]["increlora/total_rank"] == 8


def test_stock_sft_trainer_with_callback_and_increlora_optimizers(tmp_path):
    pytest.importorskip("trl")
    model, config = increlora_model()
    before = {n: layer.lora_B.detach().clone() for n, layer in increlora_layers(model)}
    trainer, controller = stock_sft_trainer(tmp_path, model, config)
    trainer.train()
    assert_grown_and_trained(model, controller, before)


def test_sft_trainer_refuses_a_peft_config(tmp_path):
    pytest.importorskip("trl")
    from peft import LoraConfig
    from increlora_fast.integrations.sft import IncreLoRASFTTrainer

    model, _ = increlora_model()
    with pytest.raises(ValueError, match="peft_config"):
        IncreLoRASFTTrainer(model=model, args=sft_config(tmp_path), peft_config=LoraConfig())


@pytest.mark.parametrize("model_id", ["org/some-llm", Path("some/local-llm")])
def test_sft_trainer_refuses_a_model_id_in_one_line(tmp_path, model_id):
    """SFTTrainer loads a model given by id or path, which then has no IncreLoRA adapter: the
    trainer failed with "'str' object has no attribute '__dict__'" (after SFTTrainer had loaded
    the model, or tried to download it). It is refused before anything is loaded (found by an
    audit of the TRL integration on more model families)."""
    pytest.importorskip("trl")
    from increlora_fast.integrations.sft import IncreLoRASFTTrainer

    for make in (lambda: IncreLoRASFTTrainer(model=model_id, args=sft_config(tmp_path)),
                 lambda: IncreLoRASFTTrainer(model_id, sft_config(tmp_path))):
        with pytest.raises(ValueError) as err:
            make()
        message = str(err.value)
        assert "\n" not in message and message.startswith("IncreLoRASFTTrainer: model=")
        assert str(model_id) in message and "inject_increlora" in message


@pytest.mark.parametrize("trainer_cls", ["IncreLoRASFTTrainer", "IncreLoRATrainer"])
def test_trainers_refuse_a_peft_model_over_increlora_adapters(tmp_path, trainer_cls):
    """get_peft_model over an injected model (peft's LoRA beside IncreLoRA's, whose adapters
    peft froze) was accepted: it trained peft's LoRA and IncreLoRA never grew, said only by the
    controller at the first allocation round (found by an audit of the TRL integration)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from increlora_fast.integrations import sft

    model = get_peft_model(increlora_model()[0], LoraConfig(target_modules=["k_proj"]))
    if trainer_cls == "IncreLoRASFTTrainer":
        make = lambda: sft.IncreLoRASFTTrainer(  # noqa: E731
            model=model, args=sft_config(tmp_path), processing_class=tokenizer(),
            train_dataset=Dataset.from_dict({"text": texts()}))
    else:
        make = lambda: IncreLoRATrainer(  # noqa: E731
            model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))
    with pytest.raises(ValueError) as err:
        make()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{trainer_cls}: ")
    assert "peft" in message and "inject_increlora" in message


def test_stock_sft_trainer_with_a_peft_config_is_refused_in_one_line(tmp_path):
    """A stock SFTTrainer given peft_config= wraps the injected model in peft's LoRA, which
    freezes IncreLoRA's adapters: the callback failed at the first optimizer step with torch's
    'element 0 of tensors does not require grad' (found by an audit of the TRL integration)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTTrainer
    from increlora_fast.integrations.trainer import IncreLoRACallback, increlora_optimizers

    model, config = increlora_model()
    controller = IncreLoRAController(model, config)
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path),
                         train_dataset=Dataset.from_dict({"text": texts()}),
                         processing_class=tokenizer(), peft_config=LoraConfig(target_modules=["k_proj"]),
                         optimizers=increlora_optimizers(model, lr=5e-3))
    IncreLoRACallback(controller).install(trainer)
    with pytest.raises(ValueError) as err:
        trainer.train()
    message = str(err.value)
    assert "\n" not in message and message.startswith("IncreLoRACallback: ")
    assert "peft_config" in message and "inject_increlora" in message
    assert trainer.state.global_step == 0


def test_sft_trainer_refuses_an_adapter_its_fused_lm_head_would_skip(tmp_path):
    """TRL's fused LM head reads lm_head.weight directly: an adapter there would never run
    (no forward call, no gradient, score 0), so the trainer refuses the model at once."""
    pytest.importorskip("trl")
    from increlora_fast.integrations.sft import IncreLoRASFTTrainer, trl_fuses_lm_head

    model, _ = increlora_model(TARGETS + ["lm_head"])
    if not trl_fuses_lm_head():
        pytest.skip("this TRL has no fused LM head")
    with pytest.raises(ValueError, match="output layer.*lm_head.*target_modules"):
        IncreLoRASFTTrainer(model=model, args=sft_config(tmp_path))
    # where the model's own logits make the loss (label smoothing, a compute_loss_func), the
    # adapter runs: accepted
    from datasets import Dataset
    data = dict(train_dataset=Dataset.from_dict({"text": texts()}), processing_class=tokenizer())
    IncreLoRASFTTrainer(model=model, args=sft_config(tmp_path, label_smoothing_factor=0.1),
                        **data)
    IncreLoRASFTTrainer(model=model, args=sft_config(tmp_path), **data,
                        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0)


def test_sft_trainer_reads_its_arguments_given_by_position(tmp_path):
    """SFTTrainer's arguments may all be given by position: a compute_loss_func so given (the
    7th) made the trainer refuse an output-layer adapter that it runs, and a peft_config (the
    14th) was not named at once (found by an audit of the TRL integration)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from increlora_fast.integrations.sft import IncreLoRASFTTrainer, trl_fuses_lm_head

    if not trl_fuses_lm_head():
        pytest.skip("this TRL has no fused LM head")
    model, _ = increlora_model(TARGETS + ["lm_head"])
    data = Dataset.from_dict({"text": texts()})
    loss = lambda outputs, labels, num_items_in_batch=None: 0  # noqa: E731
    IncreLoRASFTTrainer(model, sft_config(tmp_path), None, data, None, tokenizer(), loss)
    with pytest.raises(ValueError, match="output layer"):
        IncreLoRASFTTrainer(model, sft_config(tmp_path), None, data, None, tokenizer(), None)
    positional = [increlora_model()[0], sft_config(tmp_path), None, data, None, tokenizer()]
    positional += [None] * 7 + [LoraConfig(target_modules=["k_proj"])]
    with pytest.raises(ValueError, match="^IncreLoRASFTTrainer: .*no peft_config"):
        IncreLoRASFTTrainer(*positional)


def test_stock_sft_trainer_names_an_adapter_its_fused_lm_head_skips(tmp_path):
    """A stock SFTTrainer cannot be refused in advance: the first allocation round names the
    output layer's adapter, which got no gradient."""
    pytest.importorskip("trl")
    from increlora_fast.integrations.sft import trl_fuses_lm_head

    if not trl_fuses_lm_head():
        pytest.skip("this TRL has no fused LM head")
    trainer, _ = stock_sft_trainer(tmp_path, *increlora_model(TARGETS + ["lm_head"]))
    with pytest.warns(RuntimeWarning, match=r"got no gradient at allocation round 4: lm_head"):
        trainer.train()


def test_checkpointing_leaves_the_scores_unchanged():
    """A checkpointed block runs its forward twice; the score must still count once."""
    scores = []
    for checkpointing in (False, True):
        model, config = increlora_model()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        IncreLoRAController(model, config)  # turns score tracking on
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 3 + len(WORDS), (4, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        scores.append(torch.stack([layer.score_sum.clone()
                                   for _, layer in increlora_layers(model)]))
    assert (scores[0] > 0).all()
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-4, atol=0)


def test_causal_lm_through_increlora_trainer(tmp_path):
    model, _ = increlora_model()
    before = {n: layer.lora_B.detach().clone() for n, layer in increlora_layers(model)}
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(48):
        ids = torch.randint(3, 3 + len(WORDS), (12,), generator=gen)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    args = TrainingArguments(str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                             learning_rate=5e-3, gradient_checkpointing=True,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True)
    trainer = IncreLoRATrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert_grown_and_trained(model, trainer.increlora_controller, before)


def test_readme_sft_example_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
              if "SFTTrainer" in b]
    assert len(blocks) == 1, "README has no (or several) SFTTrainer examples"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    controller = namespace["trainer"].increlora_controller
    assert controller.budget_reached
    assert controller.current_total_rank() == controller.total_budget
