"""A tiny random BERT with its tokenizer, and small labelled files, for the finetune tests."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

POSITIVE = ["good", "great", "fun", "moving", "sharp", "warm", "clever", "bright"]
NEGATIVE = ["bad", "dull", "boring", "awful", "flat", "weak", "messy", "cold"]
FILLER = ["the", "a", "movie", "film", "plot", "acting", "was", "is", "very", "and", "story",
          "what", "who", "where", "cast", "scene"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER


def write_tiny_bert(directory: Path, hidden: int = 32, layers: int = 2) -> Path:
    """Save a randomly initialised BERT encoder (no head, like all-MiniLM-L6-v2) and a word
    tokenizer over `VOCAB` into ``directory``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    tokenizer.save_pretrained(str(directory))
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=64)
    BertModel(config).save_pretrained(str(directory))
    return directory


def write_tiny_gpt2(directory: Path, hidden: int = 16, config_pad: bool = False) -> Path:
    """Save a randomly initialised 1-layer GPT-2 and a word tokenizer over `VOCAB` that, like
    GPT-2's, has an EOS token and no pad token, into ``directory``. ``config_pad``: the model's
    config names ``[PAD]`` as its ``pad_token_id`` (as some decoders' configs name a pad token
    their tokenizer does not set); otherwise ``[PAD]`` is renamed EOS and the config names none."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = VOCAB + ["<eos>"] if config_pad else ["<eos>" if w == "[PAD]" else w for w in VOCAB]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                        unk_token="[UNK]")
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(str(directory))
    eos = words.index("<eos>")
    GPT2Model(GPT2Config(n_embd=hidden, n_layer=1, n_head=2, vocab_size=len(words),
                         n_positions=64, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=words.index("[PAD]") if config_pad else None)
              ).save_pretrained(str(directory))
    return directory


def sentiment_rows(n: int, seed: int, labels: Sequence[str] = ("neg", "pos"),
                   pairs: bool = False) -> List[dict]:
    """Random short texts whose label is given by the sentiment word they contain."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randrange(2)
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if y else NEGATIVE)]
        rng.shuffle(words)
        row = {"text": " ".join(words), "label": labels[y]}
        if pairs:
            row["text_b"] = " ".join(rng.sample(FILLER, 3))
        rows.append(row)
    return rows


def write_csv(path: Path, rows: List[dict], columns: Optional[List[str]] = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: List[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_files(root: Path, train_rows: int = 96, dev_rows: int = 24) -> dict:
    """A tiny BERT and sentiment train/dev CSVs under ``root``: {"model", "train", "dev" (paths
    as str), "root"}."""
    return {"model": str(write_tiny_bert(root / "bert")),
            "train": str(write_csv(root / "train.csv", sentiment_rows(train_rows, seed=0))),
            "dev": str(write_csv(root / "dev.csv", sentiment_rows(dev_rows, seed=1))),
            "root": root}


def tiny_args(tiny: dict, out: Path, *extra: str, steps: int = 6,
              save_steps: Optional[int] = None) -> List[str]:
    """``finetune`` arguments for a `tiny_files` run into ``out``: batch 8, 16 tokens, ``steps``
    steps, ``--save-steps`` when given, then ``extra`` (which may override any of them)."""
    argv = ["--model", tiny["model"], "--train-file", tiny["train"], "--eval-file", tiny["dev"],
            "--batch-size", "8", "--max-seq-len", "16", "--output-dir", str(out),
            "--no-progress", "--max-steps", str(steps)]
    if save_steps is not None:
        argv += ["--save-steps", str(save_steps)]
    return argv + list(extra)


def load_saved_adapter(tiny: dict, out: Path) -> torch.nn.Module:
    """The IncreLoRA adapter a `tiny_files` run wrote into ``out``, loaded (`load_adapter`) into
    a fresh 2-label classifier of its BERT, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    from increlora_fast import inject_increlora, load_adapter, load_config
    model = AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=2)
    return load_adapter(inject_increlora(model, load_config(out)), out).eval()


def dev_logits(tiny: dict, model: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of ``model`` on the dev file of `tiny_files`, batched as a `tiny_args`
    run evaluates it (16 tokens)."""
    from transformers import AutoTokenizer

    from increlora_fast.data import load_files
    from increlora_fast.training.batches import Batches
    data = load_files(tiny["train"], tiny["dev"])
    batches = Batches(AutoTokenizer.from_pretrained(tiny["model"]), data.train, data.eval,
                      16, 8, 64, 0)
    logits, labels = [], []
    with torch.no_grad():
        for batch in batches.eval_batches():
            labels.append(batch.pop("labels"))
            logits.append(model(**batch).logits.float())
    return torch.cat(logits), torch.cat(labels)


def cli(argv: List[str]) -> int:
    """``increlora-fast finetune ARGV`` in this process; returns its exit code."""
    import argparse

    from increlora_fast.cli import finetune as finetune_cli
    parser = argparse.ArgumentParser(prog="increlora-fast finetune")
    finetune_cli.add_arguments(parser)
    return finetune_cli.run(parser.parse_args(argv))


def forbid_training(monkeypatch) -> None:
    """Make ``--compare`` fail should it train a run again instead of reusing a finished one."""
    def no_training(*_args, **_kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("increlora_fast.training.compare.run_finetune", no_training)


GPT2_ARGS = ("--target-modules", "c_attn", "--modules-to-save", "score")


def padded_dev_losses(tmp_path: Path, model_dir: Path, seed: int,
                    extra: Sequence[str] = GPT2_ARGS) -> Tuple[float, float]:
    """(dev loss a 4-step IncreLoRA run of the tiny model in ``model_dir`` (GPT-2 unless
    ``extra``, the run's further arguments, say otherwise) reports, the mean loss of its saved
    adapter on each dev input scored alone, without padding). Inputs of uneven length (``seed``
    draws the filler), so the run's batches are padded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from increlora_fast import inject_increlora, load_adapter, load_config
    from increlora_fast.data import load_files
    rng = random.Random(seed)
    rows = [dict(row, text=row["text"] + " " + " ".join(rng.sample(FILLER, rng.randrange(6))))
            for row in sentiment_rows(40, 0)]
    tiny = {"model": str(model_dir), "train": str(write_csv(tmp_path / "train.csv", rows[:32])),
            "dev": str(write_csv(tmp_path / "dev.csv", rows[32:]))}
    out = tmp_path / "run"
    assert cli(tiny_args(tiny, out, *extra, "--eval-batch-size", "8", "--seed", "2",
                         steps=4)) == 0
    reported = json.loads((out / "metrics.json").read_text())["eval_loss"]
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    model = load_adapter(inject_increlora(model, load_config(out)), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    losses = []
    with torch.no_grad():  # one input at a time: no padding at all
        for example in load_files(tiny["train"], tiny["dev"]).eval:
            ids = tokenizer(example.text, truncation=True, max_length=16, return_tensors="pt")
            losses.append(float(torch.nn.functional.cross_entropy(
                model(**ids).logits, torch.tensor([example.label]))))
    return reported, sum(losses) / len(losses)
