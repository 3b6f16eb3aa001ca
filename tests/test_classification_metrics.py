"""Dev metrics: accuracy, macro-F1 and per-class F1/support (training/loop.py), and the
finetune summary line that names a class the model never gets right."""
import random

import pytest
import torch

from increlora_fast.cli.finetune import _print_summary
from increlora_fast.training.loop import classification_metrics


def _f1_by_hand(pred, gold, c):
    tp = sum(p == c and g == c for p, g in zip(pred, gold))
    fp = sum(p == c and g != c for p, g in zip(pred, gold))
    fn = sum(p != c and g == c for p, g in zip(pred, gold))
    return None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def test_matches_a_by_hand_count_on_random_labels():
    rng = random.Random()
    n, k = rng.randint(5, 40), rng.randint(2, 6)
    gold = [rng.randrange(k) for _ in range(n)]
    pred = [rng.randrange(k) for _ in range(n)]
    m = classification_metrics(torch.tensor(pred), torch.tensor(gold), k)
    expected = [_f1_by_hand(pred, gold, c) for c in range(k)]
    assert m["eval_f1_per_class"] == pytest.approx(expected)
    present = [f for f in expected if f is not None]
    assert m["eval_macro_f1"] == pytest.approx(sum(present) / len(present))
    assert m["eval_accuracy"] == pytest.approx(sum(p == g for p, g in zip(pred, gold)) / n)
    assert m["eval_support_per_class"] == [gold.count(c) for c in range(k)]
    assert m["eval_examples"] == n


def test_majority_collapse_shows_as_zero_f1_and_an_absent_class_as_none():
    gold = torch.tensor([0, 0, 0, 1, 1, 0])
    pred = torch.zeros(6, dtype=torch.long)           # always the majority class
    m = classification_metrics(pred, gold, n_classes=3)  # class 2: neither predicted nor present
    assert m["eval_f1_per_class"][1] == 0.0
    assert m["eval_f1_per_class"][2] is None
    assert m["eval_support_per_class"] == [4, 2, 0]
    assert m["eval_macro_f1"] == pytest.approx((2 * 4 / (2 * 4 + 2) + 0.0) / 2)


def test_bad_shapes_are_an_error():
    with pytest.raises(ValueError, match="classification_metrics"):
        classification_metrics(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        classification_metrics(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


def _summary(f1s, support):
    return {"eval_accuracy": 0.6, "eval_macro_f1": 0.4, "eval_loss": 1.0, "eval_examples": 10,
            "label_names": ["neg", "neu", "pos"], "eval_f1_per_class": f1s,
            "eval_support_per_class": support, "trainable_params_active": 1,
            "trainable_params_padded": 1, "total_seconds": 1.0, "train_seconds": 1.0,
            "steps": 1, "eval_seconds": 0.0, "rank_pattern": {}, "device": "cpu",
            "precision": "fp32"}


def test_summary_names_the_classes_never_right(capsys):
    _print_summary(_summary([0.75, 0.0, None], [6, 4, 0]), "out")
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("never right")]
    assert len(line) == 1 and "neu" in line[0] and "neg" not in line[0] and "pos" not in line[0]
    _print_summary(_summary([0.75, 0.5, None], [6, 4, 0]), "out")
    assert "never right" not in capsys.readouterr().out


def test_summary_says_how_the_steps_ran(capsys):
    """The speed line names CUDA graphs only when the steps were replayed; a run whose model
    could not be captured says it stepped eagerly, and why."""
    def speed_line(**extra) -> str:
        _print_summary(dict(_summary([0.75, 0.5, None], [6, 4, 0]), **extra), "out")
        return next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("speed"))
    assert "CUDA graphs" not in speed_line()
    assert "CUDA graphs)" in speed_line(cuda_graphs=True, cuda_graphs_fallback=None)
    line = speed_line(cuda_graphs=True, cuda_graphs_fallback="RuntimeError: no capture")
    assert "eager steps: the model could not be captured" in line and "no capture" in line


def test_summary_time_line_of_a_resumed_run_says_what_each_figure_covers(capsys):
    """A resumed run's train_seconds includes the checkpoint's training time while
    total_seconds is this process only: the line must not read as a total below its part."""
    def time_line(**extra) -> str:
        _print_summary(dict(_summary([0.75, 0.5, None], [6, 4, 0]), **extra), "out")
        return next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("time"))
    assert "resumed" not in time_line()
    line = time_line(total_seconds=9.0, train_seconds=13.0, steps=20,
                     resumed_from="own/checkpoint-10")
    assert "this run" in line and "own/checkpoint-10" in line
    assert "before the checkpoint included" in line
