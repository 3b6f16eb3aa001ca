"""What `finetune` writes describes the model it reports on (audit of the output folder)."""
from __future__ import annotations

import json

import pytest

from finetune_helpers import cli, forbid_training, tiny_args, tiny_files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=96, dev_rows=40)


def _final_ranks(log, init_r: int, names) -> dict:
    ranks = {name: init_r for name in names}
    for entry in log:
        ranks[entry["module"]] = entry["new_rank"]
    return ranks


def test_select_best_allocation_log_and_rank_plot_end_at_the_selected_step(tiny, tmp_path,
                                                                           monkeypatch):
    """With --select-best the saved adapter is the selected step's, yet allocation_log.jsonl and
    rank_over_time.png went on to the last step: their final ranks were ranks the adapter (and
    the printed rank pattern) does not have."""
    import increlora_fast.training.loop as loop
    import increlora_fast.visualize as visualize

    real_evaluate, scored = loop.evaluate, []

    def evaluate(run, batches, placement=None, split="dev"):
        m = real_evaluate(run, batches, placement, split)
        if split == "holdout":  # the second scoring (step 4 of 10) is the best
            scored.append(1)
            m["eval_accuracy"] = 1.0 if len(scored) == 2 else 0.0
        return m

    plotted = {}
    real_plot = visualize.save_rank_over_time

    def plot(initial, allocation_log, path, last_step=None, **kwargs):
        plotted.update(log=list(allocation_log), last_step=last_step)
        return real_plot(initial, allocation_log, path, last_step=last_step, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    monkeypatch.setattr(visualize, "save_rank_over_time", plot)
    out = tmp_path / "run"
    assert cli(tiny_args(tiny, out, "--select-best", "--select-every", "2", steps=10)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["selected_step"] == 4 and m["steps"] == 10
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == m["rank_pattern"]
    log = [json.loads(line) for line in (out / "allocation_log.jsonl").read_text().splitlines()]
    # an allocation at optimizer step k is in the state after k + 1 steps
    assert log and all(entry["step"] < 4 for entry in log)
    assert _final_ranks(log, config["init_r"], m["rank_pattern"]) == m["rank_pattern"]
    assert plotted["log"] == log and plotted["last_step"] == 4


def test_compare_reuses_the_finished_runs_of_a_decoder(tiny, tmp_path, capsys, monkeypatch):
    """A decoder's head is ``score``: each run saved it in place of the default ``classifier``
    (`with_head_saved`), so its metrics.json records modules_to_save ['score'] and a second
    ``--compare`` into the folder refused the finished runs as having other settings instead of
    reusing them."""
    import json as _json

    from finetune_helpers import write_tiny_gpt2

    gpt2 = dict(tiny, model=str(write_tiny_gpt2(tmp_path / "gpt2")))
    args = tiny_args(gpt2, tmp_path / "cmp", "--compare", "--methods", "increlora", "--lrs",
                     "0.01", "--seeds", "1", "--target-modules", "c_attn,c_proj", steps=4)
    assert cli(args) == 0
    stored = _json.loads((tmp_path / "cmp" / "increlora" / "lr0.01" / "seed0" /
                          "metrics.json").read_text())
    assert stored["settings"]["modules_to_save"] == ["score"]
    first = _json.loads((tmp_path / "cmp" / "compare.json").read_text())
    capsys.readouterr()

    forbid_training(monkeypatch)
    assert cli(args) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 1
    assert _json.loads((tmp_path / "cmp" / "compare.json").read_text()) == first
    # another --modules-to-save is still another setting
    assert cli(args + ["--modules-to-save", "score,ln_f"]) == 2
    assert "modules_to_save" in capsys.readouterr().err


def _interrupt_at_save(monkeypatch, n: int):
    """Make finetune's ``n``-th checkpoint save raise KeyboardInterrupt once it is written (a
    Ctrl-C right after it); returns the real saver, to put back."""
    from increlora_fast.training import finetune_run

    saved = finetune_run.save_checkpoint
    calls = []

    def save_then_interrupt(*args, **kwargs):
        saved(*args, **kwargs)
        calls.append(args[0])
        if len(calls) == n:
            raise KeyboardInterrupt
    monkeypatch.setattr(finetune_run, "save_checkpoint", save_then_interrupt)
    return saved


def test_ctrl_c_names_the_checkpoint_to_resume_from(tmp_path, capsys, monkeypatch):
    """Ctrl-C ended in a KeyboardInterrupt traceback: the run kept its checkpoint, but nothing
    said which to --resume (found by the new-user audit). Now one line names the command, and
    that command finishes the run."""
    from increlora_fast.training import finetune_run

    tiny = tiny_files(tmp_path / "data", train_rows=32, dev_rows=8)
    saved = _interrupt_at_save(monkeypatch, 2)
    out = tmp_path / "out"
    assert cli(tiny_args(tiny, out, steps=6, save_steps=2)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"increlora-fast finetune: interrupted; continue with --resume "
                       f"{out / 'checkpoint-4'} --output-dir {out}"), err
    assert not any("Traceback" in line for line in err)
    monkeypatch.setattr(finetune_run, "save_checkpoint", saved)
    assert cli(["--resume", str(out / "checkpoint-4"), "--output-dir", str(out),
                "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(finetune_run, "build_run", interrupt)  # before any checkpoint
    early = tmp_path / "early"
    assert cli(tiny_args(tiny, early, steps=6)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"increlora-fast finetune: interrupted; no checkpoint in {early} to resume from "
        "(--save-steps sets how often)")


def test_ctrl_c_of_an_overwrite_run_names_its_own_checkpoint_not_the_earlier_runs(
        tmp_path, capsys, monkeypatch):
    """An --overwrite run over an earlier run writes into <output-dir>.new-<pid>: interrupted,
    its checkpoints are kept there (the note says so), while --output-dir still holds the
    earlier run's. The interrupt line named the earlier run's newest checkpoint, so following it
    resumed the run being replaced, not the one interrupted."""
    from increlora_fast.training import finetune_run

    tiny = tiny_files(tmp_path / "data", train_rows=32, dev_rows=8)
    out = tmp_path / "out"
    assert cli(tiny_args(tiny, out, steps=6, save_steps=2)) == 0  # the earlier run
    saved = _interrupt_at_save(monkeypatch, 1)
    capsys.readouterr()
    assert cli(tiny_args(tiny, out, "--overwrite", "--seed", "1", steps=6, save_steps=2)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert f"--resume {out / 'checkpoint-'}" not in last, err  # the earlier run's
    assert ".new-" in last and "checkpoint-2" in last and "--overwrite" in last, err
    resume = last.split("--resume ")[1].split(" --output-dir")[0]
    monkeypatch.setattr(finetune_run, "save_checkpoint", saved)
    import os
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)  # the command runs in a new process
    assert cli(["--resume", resume, "--output-dir", str(out), "--overwrite",
                "--no-progress"]) == 0  # the named command finishes the interrupted run
    monkeypatch.undo()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["seed"] == 1


def test_ctrl_c_during_the_final_save_leaves_no_half_output_set(tmp_path, capsys, monkeypatch):
    """A Ctrl-C (or a crash) while the final outputs were written left the adapter files and
    labels.json without metrics.json: a user or script seeing the adapter took the run as
    finished. The final outputs now appear all together or not at all; the checkpoint stays,
    and the resume the interrupt line names writes the whole set."""
    import increlora_fast.visualize as visualize
    from increlora_fast.training.outputs import run_files

    tiny = tiny_files(tmp_path / "data", train_rows=32, dev_rows=8)
    real_heatmap = visualize.save_rank_heatmap

    def interrupt(*args, **kwargs):  # after the adapter and labels.json were written
        raise KeyboardInterrupt
    monkeypatch.setattr(visualize, "save_rank_heatmap", interrupt)
    out = tmp_path / "out"
    assert cli(tiny_args(tiny, out, steps=6, save_steps=2)) == 130
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]
    assert run_files(out) == ["checkpoint-4"]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"--resume {out / 'checkpoint-4'} --output-dir {out}"), last

    monkeypatch.setattr(visualize, "save_rank_heatmap", real_heatmap)
    from increlora_fast.training.output_folder import FINAL_STAGING
    # what a run killed while it wrote the final outputs leaves is removed by the next run
    (out / FINAL_STAGING).mkdir()
    (out / FINAL_STAGING / "adapter_config.json").write_text("{}")
    assert cli(["--resume", str(out / "checkpoint-4"), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    assert {"adapter_model.safetensors", "adapter_config.json", "labels.json",
            "rank_heatmap.png", "allocation_log.jsonl"} <= set(run_files(out))
    assert not (out / FINAL_STAGING).exists()


def test_the_interrupt_line_names_only_a_folder_that_holds_a_checkpoint(tmp_path):
    """The CLI listed checkpoint-<step> folders by name alone, while `newest_checkpoint` (what
    a --resume of the run folder names) asks for a checkpoint's files: after Ctrl-C it named a
    checkpoint-9 folder holding none, which --resume then refuses. Both use one helper now."""
    import argparse

    from increlora_fast.cli.finetune import _how_to_go_on
    from increlora_fast.training.checkpoint import SETTINGS_FILE, STATE_FILE

    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    for name in (SETTINGS_FILE, STATE_FILE):
        (out / "checkpoint-2" / name).write_text("{}")
    (out / "checkpoint-9").mkdir()
    args = argparse.Namespace(compare=False, output_dir=str(out), overwrite=False)
    assert _how_to_go_on(args) == (f"continue with --resume {out / 'checkpoint-2'} "
                                   f"--output-dir {out}")
