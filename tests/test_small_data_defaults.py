"""Issue 29: a run that learned nothing says so, and the options meant for small data of one's
own (on a tiny random BERT and tiny files, offline)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest
import torch

from finetune_helpers import cli, sentiment_rows, tiny_files, write_csv
from increlora_fast.training.finetune import no_learning_note
from increlora_fast.training.loop import majority_baseline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=96, dev_rows=40)


def tiny_args(tiny: dict, out: Path, *extra: str) -> List[str]:
    return ["--model", tiny["model"], "--train-file", tiny["train"], "--eval-file", tiny["dev"],
            "--batch-size", "8", "--max-seq-len", "16", "--output-dir", str(out),
            "--no-progress", "--save-steps", "0", "--max-steps", "6", *extra]


def read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def summary_metrics(**changes) -> dict:
    """Metrics of a 3-class run at the majority's level (65 % 'neutral'), as run_finetune
    writes them."""
    m = {"eval_accuracy": 0.644, "eval_macro_f1": 0.30, "eval_majority_accuracy": 0.654,
         "eval_majority_macro_f1": 0.2636, "eval_majority_label": 1,
         "label_names": ["negative", "neutral", "positive"], "steps": 200,
         "max_seq_len": 64, "train_truncated_share": 0.95, "settings": {"lr": 8e-3}}
    m.update(changes)
    return m


def test_majority_baseline_is_the_constant_prediction():
    gold = torch.tensor([1, 1, 1, 0, 2, 1])
    base = majority_baseline(gold, n_classes=3)
    assert base["eval_majority_label"] == 1
    assert base["eval_majority_accuracy"] == pytest.approx(4 / 6)
    # F1 of class 1 = 2*4 / (6 + 4); classes 0 and 2 are present, never predicted: F1 0
    assert base["eval_majority_macro_f1"] == pytest.approx((8 / 10) / 3)


def test_a_run_at_the_majority_level_says_so_with_what_to_try():
    note = no_learning_note(summary_metrics())
    assert note.startswith("no better than always predicting 'neutral': dev accuracy 0.6440 vs "
                           "0.6540")
    assert "more steps" in note and "another --lr (it was 0.008)" in note
    assert "--max-seq-len auto (95% of the training texts were cut at 64 tokens)" in note
    # accuracy above the majority, macro-F1 not: still said
    assert no_learning_note(summary_metrics(eval_accuracy=0.70, eval_macro_f1=0.26))


def test_the_sequence_length_hint_needs_many_truncated_texts():
    note = no_learning_note(summary_metrics(train_truncated_share=0.05))
    assert note and "--max-seq-len" not in note


def test_a_run_that_learned_has_no_note():
    assert no_learning_note(summary_metrics(eval_accuracy=0.80, eval_macro_f1=0.6)) is None
    old = summary_metrics()
    del old["eval_majority_accuracy"]
    assert no_learning_note(old) is None  # metrics of a run older than the baseline


def test_metrics_record_the_majority_baseline_and_the_summary_flags_it(tiny, tmp_path, capsys):
    # every dev row is 'pos': always predicting it is perfect, so no run beats it
    dev = write_csv(tmp_path / "dev.csv", [dict(r, label="pos") for r in
                                           sentiment_rows(20, seed=3)])
    args = tiny_args(tiny, tmp_path / "run", "--max-steps", "1")
    args[args.index("--eval-file") + 1] = str(dev)
    assert cli(args) == 0
    m = read_metrics(tmp_path / "run")
    assert m["eval_majority_accuracy"] == 1.0 and m["eval_majority_macro_f1"] == 1.0
    assert m["label_names"][m["eval_majority_label"]] == "pos"
    assert m["max_seq_len"] == 16 and 0.0 <= m["train_truncated_share"] <= 1.0
    assert "learned nothing?  no better than always predicting 'pos'" in capsys.readouterr().out


def test_compare_table_shows_the_majority_baseline():
    from increlora_fast.training.compare import format_table
    from increlora_fast.training.settings import RunSettings

    run = {"lr": 1e-3, "lr_sweep": {"0.001": 0.65}, "seeds": [0], "eval_accuracy": [0.65],
           "mean": 0.65, "std": 0.0, "trainable_params_active": 10,
           "trainable_params_padded": 10, "total_rank": 24, "steps": 6, "train_examples": 96,
           "eval_examples": 40, "method_settings": {"r": 2, "lora_alpha": 16.0},
           "train_seconds": [1.0], "eval_majority_accuracy": 0.654}
    report = {"task": "file:train.csv", "seeds": 1, "lrs": [1e-3],
              "common": RunSettings().to_dict(), "methods": {"lora": run}}
    assert "always predicting the dev set's majority class scores 0.6540" in \
        format_table(report)
