"""Fine-tuning a decoder checkpoint (a Llama, as the hub ships them: no pad token, a ``score``
head) through ``increlora-fast finetune`` with the default options."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_helpers import VOCAB, cli, sentiment_rows, write_csv


def write_tiny_llama(directory: Path) -> Path:
    """A random 2-layer Llama and a word-level tokenizer with BOS/EOS but no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    words = [w for w in VOCAB if not w.startswith("[")]
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(directory))
    LlamaModel(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
               ).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return {"model": str(write_tiny_llama(root / "llama")),
            "train": str(write_csv(root / "train.csv", sentiment_rows(64, seed=0))),
            "dev": str(write_csv(root / "dev.csv", sentiment_rows(16, seed=1)))}


def llama_args(files: dict, out: Path, *extra: str) -> list:
    return ["--model", files["model"], "--train-file", files["train"], "--eval-file",
            files["dev"], "--batch-size", "8", "--max-seq-len", "16", "--output-dir", str(out),
            "--no-progress", "--max-steps", "3", "--target-modules", "q_proj,v_proj", *extra]


def test_a_decoder_without_pad_token_trains(llama_files, tmp_path):
    """A decoder checkpoint without a pad token failed at its first batch ("Asking to pad but
    the tokenizer does not have a padding token"), after the model had loaded; its EOS token
    pads now, and the model's config knows it (its ``score`` head reads the last token before
    the padding)."""
    out = tmp_path / "out"
    assert cli(llama_args(llama_files, out, "--modules-to-save", "score")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3


def test_a_decoder_trains_with_the_default_modules_to_save(llama_files, tmp_path):
    """The default --modules-to-save is BERT's head (``classifier``); a decoder's head is
    ``score``, so a decoder failed with the default options ("modules_to_save entry
    'classifier' matches no module name"), right after a warning that ``score`` was added. The
    other family's head name, which names no module of the model, is replaced by the model's
    head, with the warning saying so."""
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="'score'"):
        assert cli(llama_args(llama_files, out)) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"]
