"""A decoder without a pad token (GPT-2, Llama): `finetune` pads it with its EOS token, and what
it writes gives the trained model's predictions when loaded as the README says."""
from __future__ import annotations

import json
import random

import pytest
import torch

from finetune_helpers import (FILLER, cli, padded_dev_losses, sentiment_rows, tiny_args,
                              write_csv, write_tiny_gpt2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny GPT-2 without a pad token, and train/dev files whose texts differ in length, so
    that every batch is padded."""
    root = tmp_path_factory.mktemp("gpt2")
    rng = random.Random(5)

    def rows(n: int, seed: int):
        return [dict(row, text=row["text"] + " " + " ".join(rng.sample(FILLER, rng.randrange(6))))
                for row in sentiment_rows(n, seed)]
    return {"model": str(write_tiny_gpt2(root / "gpt2")),
            "train": str(write_csv(root / "train.csv", rows(48, 0))),
            "dev": str(write_csv(root / "dev.csv", rows(24, 1))), "root": root}


def dev_loss(tiny: dict, model: torch.nn.Module, tokenizer) -> float:
    """Mean cross-entropy of ``model`` on the dev file, batched and padded as `tiny_args` runs
    evaluate it (16 tokens, 8 per batch)."""
    from increlora_fast.data import load_files
    from increlora_fast.training.batches import Batches

    data = load_files(tiny["train"], tiny["dev"])
    batches = Batches(tokenizer, data.train, data.eval, 16, 8, 8, 0)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches.eval_batches():
            labels = batch.pop("labels")
            assert bool((batch["attention_mask"] == 0).any())  # padded
            logits = model(**batch).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
    return total / count


def test_the_saved_adapter_scores_padded_batches_as_trained(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from increlora_fast import inject_increlora, load_adapter, load_config
    out = tmp_path / "run"
    assert cli(tiny_args(tiny, out, "--target-modules", "c_attn", "--modules-to-save", "score",
                         "--eval-batch-size", "8", "--seed", "2")) == 0
    reported = json.loads((out / "metrics.json").read_text())["eval_loss"]
    eos = AutoTokenizer.from_pretrained(tiny["model"]).eos_token_id
    assert json.loads((out / "adapter_config.json").read_text())["pad_token_id"] == eos

    model = AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=2)
    assert model.config.pad_token_id is None
    model = load_adapter(inject_increlora(model, load_config(out)), out).eval()
    assert model.config.pad_token_id == eos
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    tokenizer.pad_token = tokenizer.eos_token  # as the README says for such a decoder
    assert dev_loss(tiny, model, tokenizer) == pytest.approx(reported, rel=1e-5)


def test_a_config_pad_token_the_tokenizer_lacks_is_the_one_batches_are_padded_with(tmp_path):
    """A decoder classifier reads each input's last token before the config's pad token: when
    the tokenizer has no pad token but the config names one, batches must be padded with it
    (EOS instead would make the classifier read a padding position in training and
    evaluation, and the last real token on an input scored alone)."""
    model_dir = write_tiny_gpt2(tmp_path / "gpt2", config_pad=True)
    reported, alone = padded_dev_losses(tmp_path, model_dir, seed=6)
    assert alone == pytest.approx(reported, rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "increlora", "full"])
def test_outputs_that_cannot_record_the_pad_token_say_which_to_set(tiny, tmp_path, method):
    """peft's adapter files do not hold the model config, so the pad token the run gave a base
    without one is lost: the run names it. The IncreLoRA adapter records it, the full model's
    config.json holds it."""
    import warnings

    out = tmp_path / method
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli(tiny_args(tiny, out, "--method", method, "--target-modules", "c_attn",
                             "--modules-to-save", "score", "--eval-batch-size", "8",
                             steps=2)) == 0
    named = [str(w.message) for w in caught if "pad_token_id" in str(w.message)]
    if method == "lora":
        assert len(named) == 1 and str(out) in named[0]
        assert "model.config.pad_token_id = 0" in named[0]
    else:
        assert named == []


def test_a_tokenizer_and_config_that_name_different_pad_tokens_are_warned_about():
    """Batches are padded with the tokenizer's pad token, and a decoder classifier looks for
    the config's: when both are set and differ it reads padding positions, silently before."""
    from types import SimpleNamespace
    import warnings

    from increlora_fast.training.finetune_run import set_pad_token
    pad = random.randrange(1, 50)

    class Tokenizer(SimpleNamespace):
        def __len__(self) -> int:  # both ids are tokens of it
            return 100
    tokenizer = Tokenizer(pad_token="<pad>", pad_token_id=pad)
    for config_pad, warned in ((pad + 1, True), (pad, False)):
        model = SimpleNamespace(config=SimpleNamespace(pad_token_id=config_pad))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert set_pad_token(tokenizer, model, "m") is None
        said = [str(w.message) for w in caught]
        assert bool(said) == warned, said
        assert not warned or (f"pad_token_id {config_pad}" in said[0] and
                              f"token id {pad}" in said[0])
        assert model.config.pad_token_id == config_pad  # neither is changed
