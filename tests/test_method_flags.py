"""Issue 15's fine-tune flags: they reach the IncreLoRA config, and ``--schedule authors``
derives the authors' schedule shape (restart warmup = growth interval, budget by 35 %)."""
import argparse
import json
import math

import pytest

from increlora_fast.cli.finetune import add_arguments, settings_from_args
from increlora_fast.training.increlora_method import increlora_config
from increlora_fast.training.settings import RunSettings, default_top_h, resolve

MINILM_MODULES = 36  # the 6 targeted linears of each of all-MiniLM-L6-v2's 6 layers


def _settings(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def _budget_step(s: RunSettings, top_h: int, modules: int = MINILM_MODULES) -> int:
    """Step of the round that meets the budget under the controller's timing (a round at every
    step > init_warmup divisible by incre_interval, top_h modules x one rank each)."""
    rounds = math.ceil((s.target_rank - s.init_r) * modules / top_h)
    first = (s.init_warmup // s.incre_interval + 1) * s.incre_interval
    return first + (rounds - 1) * s.incre_interval


@pytest.mark.parametrize("steps,interval,top_h,budget_step", [(300, 15, 6, 105),
                                                             (1200, 60, 6, 420)])
def test_authors_schedule_derived_numbers(steps, interval, top_h, budget_step):
    s = resolve(_settings(["--schedule", "authors", "--max-steps", str(steps)]), train_size=8000)
    assert (s.incre_interval, s.init_warmup, s.warmup_steps) == (interval, interval, interval)
    assert default_top_h(s, MINILM_MODULES, incre_rank_num=1) == top_h
    assert _budget_step(s, top_h) == budget_step
    assert 0.30 <= budget_step / steps <= 0.40


@pytest.mark.parametrize("steps,interval,warmup,top_h,budget_step", [(300, 15, 30, 4, 150),
                                                                    (1200, 60, 120, 4, 600)])
def test_default_schedule_is_unchanged(steps, interval, warmup, top_h, budget_step):
    s = resolve(_settings(["--max-steps", str(steps)]), train_size=8000)
    assert (s.incre_interval, s.init_warmup, s.warmup_steps) == (interval, interval, warmup)
    assert default_top_h(s, MINILM_MODULES, incre_rank_num=1) == top_h
    assert _budget_step(s, top_h) == budget_step


def test_authors_schedule_follows_an_explicit_interval():
    s = resolve(_settings(["--schedule", "authors", "--incre-interval", "30"]), train_size=8000)
    assert (s.incre_interval, s.init_warmup, s.warmup_steps) == (30, 30, 30)
    # resolving again (as --resume does) changes nothing
    assert resolve(s, train_size=8000) == s


def test_authors_schedule_rejects_an_explicit_warmup_ratio():
    with pytest.raises(ValueError, match="--schedule authors"):
        _settings(["--schedule", "authors", "--warmup-ratio", "0.2"])


def test_flags_reach_the_increlora_config():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32))
    argv = ["--score", "random", "--seed", "4", "--scale-preserving-growth",
            "--no-reserve-penalty", "--reserve-lambda", "1e-3", "--normalize-on-activation",
            "--no-advance-learning", "--modules-to-save", "pooler"]
    config = increlora_config(model, resolve(_settings(argv), train_size=100))
    assert (config.score, config.seed, config.scale_preserving_growth, config.reserve_in_penalty,
            config.reserve_lambda, config.normalize_on_activation, config.advance_learning) == \
        ("random", 4, True, False, 1e-3, True, False)
    default = increlora_config(model, resolve(_settings(["--modules-to-save", "pooler"]), 100))
    assert (default.score, default.scale_preserving_growth, default.reserve_in_penalty,
            default.reserve_lambda, default.normalize_on_activation) == \
        ("delta_w", False, True, 1e-5, False)


@pytest.mark.parametrize("argv,option", [(["--reserve-lambda", "-1"], "--reserve-lambda")])
def test_bad_values_name_the_option(argv, option):
    with pytest.raises(ValueError, match=option):
        resolve(_settings(argv), train_size=100)


@pytest.mark.parametrize("argv", [["--score", "shuffled"], ["--schedule", "paper"]])
def test_unknown_choices_are_rejected_by_the_parser(argv):
    with pytest.raises(SystemExit):
        _settings(argv)


def test_end_to_end_random_control_logs_losses_and_repeats(tmp_path):
    """A tiny fine-tune with the options on: per-step losses in metrics.json, the loss around
    growth readable from them, and the same seed giving the same random allocation."""
    from finetune_helpers import cli, sentiment_rows, write_csv, write_tiny_bert
    from increlora_fast.training.compare_stats import loss_around_growth

    model = str(write_tiny_bert(tmp_path / "bert"))
    train = str(write_csv(tmp_path / "train.csv", sentiment_rows(96, seed=0)))
    dev = str(write_csv(tmp_path / "dev.csv", sentiment_rows(40, seed=1)))
    logs = []
    for name in ("a", "b"):
        out = tmp_path / name
        argv = ["--model", model, "--train-file", train, "--eval-file", dev, "--batch-size", "8",
                "--max-seq-len", "16", "--output-dir", str(out), "--no-progress",
                "--max-steps", "8", "--score", "random", "--seed", "3",
                "--scale-preserving-growth", "--schedule", "authors"]
        assert cli(argv) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert len(metrics["train_losses"]) == 8
        assert all(math.isfinite(v) and v > 0 for v in metrics["train_losses"])
        assert metrics["settings"]["score"] == "random"
        assert metrics["settings"]["scale_preserving_growth"] is True
        assert metrics["total_rank"] == 24
        logs.append((out / "allocation_log.jsonl").read_text())
        profile = loss_around_growth(out, before=1, after=1)
        assert profile and all(math.isfinite(v) for v in profile.values())
    assert logs[0] == logs[1] and logs[0]
