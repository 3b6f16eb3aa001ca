"""Output folders never lose work; diverged runs and bad input are one clear `error:` line.

Every case here comes from the fault-probe review (issue 14 items 1, 4, 6, 7).
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, List

import pytest

from finetune_helpers import cli, tiny_files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=96, dev_rows=24)


def args(tiny: dict, out: Path, *extra: str, steps: int = 4) -> List[str]:
    return ["--model", tiny["model"], "--train-file", tiny["train"], "--eval-file", tiny["dev"],
            "--batch-size", "8", "--max-seq-len", "16", "--output-dir", str(out),
            "--no-progress", "--max-steps", str(steps), *extra]


def digests(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_refuses_a_folder_that_holds_another_run(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(args(tiny, out, "--save-steps", "2")) == 0
    before = digests(out)
    capsys.readouterr()
    assert cli(args(tiny, out, "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "holds another run's files" in err and "metrics.json" in err
    assert "checkpoint-2" in err and "--overwrite" in err
    assert digests(out) == before


def test_overwrite_replaces_the_earlier_run_entirely(tiny, tmp_path):
    out = tmp_path / "run"
    assert cli(args(tiny, out, "--save-steps", "2")) == 0
    assert (out / "allocation_log.jsonl").exists() and (out / "checkpoint-2").is_dir()
    assert cli(args(tiny, out, "--method", "lora", "--overwrite")) == 0
    # nothing of the IncreLoRA run stays beside the LoRA adapter
    assert not (out / "allocation_log.jsonl").exists()
    assert not (out / "rank_heatmap.png").exists() and not (out / "checkpoint-2").exists()
    assert not (out / "rank_over_time.png").exists()
    assert json.loads((out / "metrics.json").read_text())["method"] == "lora"


def test_an_interrupted_runs_only_checkpoint_survives_a_new_run(tiny, tmp_path, capsys):
    done = tmp_path / "done"
    assert cli(args(tiny, done, "--save-steps", "2")) == 0
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(done / "checkpoint-2", interrupted / "checkpoint-2")
    before = digests(interrupted)
    assert cli(args(tiny, interrupted, "--save-steps", "1")) == 2
    assert "checkpoint-2" in capsys.readouterr().err
    assert digests(interrupted) == before


def test_rotation_keeps_the_checkpoint_a_resume_started_from(tiny, tmp_path):
    out = tmp_path / "run"
    assert cli(args(tiny, out, "--save-steps", "2", steps=6)) == 0
    (out / "metrics.json").unlink()  # as if interrupted after checkpoint-4
    kept = digests(out / "checkpoint-4")
    assert cli(["--resume", str(out / "checkpoint-4"), "--output-dir", str(out),
                "--no-progress", "--save-steps", "1"]) == 0
    assert digests(out / "checkpoint-4") == kept  # this run wrote checkpoint-5 and kept both
    assert (out / "checkpoint-5").is_dir()


def test_a_second_resume_leaves_the_first_ones_checkpoint_alone(tiny, tmp_path):
    """Resuming checkpoint-4 again after a first resume wrote checkpoint-5 beside it: the
    second run's step 5 must not replace (nor its rotation delete) the first run's folder."""
    out = tmp_path / "run"
    assert cli(args(tiny, out, "--save-steps", "2", steps=6)) == 0
    resume = ["--resume", str(out / "checkpoint-4"), "--output-dir", str(out), "--no-progress",
              "--save-steps", "1"]
    assert cli(resume) == 0
    (out / "checkpoint-5" / "notes.txt").write_text("the first resume's checkpoint")
    kept = digests(out / "checkpoint-5")
    with pytest.warns(UserWarning, match="checkpoint-5 was written by another run"):
        assert cli(resume) == 0
    assert digests(out / "checkpoint-5") == kept


def test_a_resume_never_writes_into_its_own_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(args(tiny, out, "--save-steps", "2")) == 0
    ckpt = out / "checkpoint-2"
    before = digests(ckpt)
    capsys.readouterr()
    assert cli(["--resume", str(ckpt), "--output-dir", str(ckpt), "--no-progress"]) == 2
    assert "is the checkpoint being resumed" in capsys.readouterr().err
    assert digests(ckpt) == before


def test_a_resume_without_output_dir_goes_on_in_its_runs_folder(tiny, tmp_path, monkeypatch):
    """``--resume RUN/checkpoint-N`` alone continues in RUN, never in the default
    outputs/finetune of the working folder (which may hold another run)."""
    out = tmp_path / "run"
    assert cli(args(tiny, out, "--save-steps", "2")) == 0
    (out / "metrics.json").unlink()  # as if interrupted after checkpoint-2
    monkeypatch.chdir(tmp_path)
    assert cli(["--resume", str(out / "checkpoint-2"), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == \
        str(out / "checkpoint-2")
    assert not (tmp_path / "outputs").exists()


def test_a_resume_of_an_overwrite_runs_partial_work_needs_its_output_dir(tiny, tmp_path,
                                                                       capsys):
    """A checkpoint kept in ``RUN.new-<pid>`` (an interrupted --overwrite run) is not resumed
    into that staging folder by default: the run is refused, naming the --output-dir to give."""
    out = tmp_path / "run"
    stage = tmp_path / "run.new-12345"
    assert cli(args(tiny, stage, "--save-steps", "2")) == 0
    before = digests(stage)
    capsys.readouterr()
    assert cli(["--resume", str(stage / "checkpoint-2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--output-dir " + str(out) in err and len(err.strip().splitlines()) == 1
    assert digests(stage) == before


def test_a_resume_does_not_replace_another_run_in_a_folder_above_its_own(tiny, tmp_path,
                                                                        capsys):
    """--output-dir an ancestor of the checkpoint's run folder, holding another run's outputs,
    is refused as any folder holding another run's files (only the checkpoint's own run folder
    is continued in place)."""
    outer = tmp_path / "outer"
    assert cli(args(tiny, outer)) == 0
    inner = outer / "inner"
    assert cli(args(tiny, inner, "--save-steps", "2")) == 0
    before = digests(outer)
    capsys.readouterr()
    assert cli(["--resume", str(inner / "checkpoint-2"), "--output-dir", str(outer),
                "--no-progress"]) == 2
    assert "holds another run's files" in capsys.readouterr().err
    assert digests(outer) == before


def test_a_resume_of_the_run_folder_names_its_newest_checkpoint(tiny, tmp_path, capsys):
    """``--resume RUN`` (the run folder, not a checkpoint in it) said only "not a checkpoint";
    the error now names the newest ``checkpoint-<step>`` inside it to pass instead (by step:
    checkpoint-10 is newer than checkpoint-4)."""
    out = tmp_path / "run"
    assert cli(args(tiny, out, "--save-steps", "2", steps=6)) == 0
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-10")
    capsys.readouterr()
    assert cli(["--resume", str(out), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert f"--resume {out / 'checkpoint-10'}" in line, line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["--resume", str(empty), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "is not a checkpoint" in line and "pass the newest" not in line


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_bad_output_dir_is_refused_before_data_or_model_load(tiny, tmp_path, capsys, kind):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    out = afile if kind == "file" else afile / "sub"
    # the data file does not exist either: the output folder must be checked first
    argv = args(tiny, out)
    argv[argv.index("--train-file") + 1] = str(tmp_path / "missing.csv")
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output-dir" in err[0]
    assert ("is a file" if kind == "file" else "not writable") in err[0]
    assert afile.read_text() == "not a folder"


def test_a_diverged_run_exits_nonzero_and_keeps_the_good_adapter(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(args(tiny, out)) == 0
    good = digests(out)
    capsys.readouterr()
    assert cli(args(tiny, out, "--lr", "1e6", "--overwrite", steps=1)) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "step 1" in err and "lower --lr" in err
    assert digests(out) == good


def test_target_rank_rule_of_adalora_does_not_apply_to_increlora(tiny, tmp_path, capsys):
    assert cli(args(tiny, tmp_path / "ok", "--target-rank", "4")) == 0
    assert json.loads((tmp_path / "ok" / "metrics.json").read_text())["total_rank"] == 4 * 12
    capsys.readouterr()
    assert cli(args(tiny, tmp_path / "ada", "--method", "adalora", "--target-rank", "4",
                    steps=12)) == 2
    assert "--adalora-init-r 3 is invalid" in capsys.readouterr().err


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("increlora-fast finetune: error: "), err
    return err[0]


@pytest.mark.parametrize("extra, message", [
    (["--threads", "-1"], "--threads -1 is invalid"),
    (["--threads", "0"], "--threads 0 is invalid"),
    (["--target-modules", "embeddings"], "BertEmbeddings"),
    (["--max-seq-len", "4096"], "--max-seq-len 4096 is invalid: the model"),
])
def test_bad_options_are_one_error_line(tiny, tmp_path, capsys, extra, message):
    assert cli(args(tiny, tmp_path / "out", *extra)) == 2
    assert message in _one_error_line(capsys)


def test_bad_model_paths_are_one_error_line(tiny, tmp_path, capsys):
    for model, message in ((str(tmp_path / "nonexistent" / "model"), "no such folder"),
                           (str(Path(tiny["train"]).parent), "holds no transformers model")):
        argv = args(tiny, tmp_path / "out")
        argv[argv.index("--model") + 1] = model
        assert cli(argv) == 2
        line = _one_error_line(capsys)
        assert message in line and model in line


def test_non_utf8_data_names_the_file_and_line(tiny, tmp_path, capsys):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("text,label\ngood film,pos\ncaf\xe9 bad,neg\n".encode("latin-1"))
    argv = args(tiny, tmp_path / "out")
    argv[argv.index("--train-file") + 1] = str(bad)
    assert cli(argv) == 2
    line = _one_error_line(capsys)
    assert str(bad) in line and "not UTF-8" in line and "line 3" in line


def test_a_full_disk_during_a_checkpoint_says_so_and_leaves_no_tmp(tiny, tmp_path, capsys,
                                                                   monkeypatch):
    import increlora_fast.persistence as persistence

    out = tmp_path / "run"
    real_fsync, calls = persistence.os.fsync, {"n": 0}

    def fsync_then_full(fd):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint's files are written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(persistence.os, "fsync", fsync_then_full)
    assert cli(args(tiny, out, "--save-steps", "1", steps=4)) == 1
    line = _one_error_line(capsys)
    assert "no space left on the device" in line and "checkpoint-" in line
    assert not list(out.glob("*.tmp")) and not list(out.rglob(".*.tmp"))


def test_written_files_get_the_usual_mode(tmp_path):
    import os

    from increlora_fast.files import atomic_write_bytes

    mask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f.json", b"{}")
    finally:
        os.umask(mask)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


def test_a_readme_of_ones_own_in_the_output_folder_is_left_alone(tiny, tmp_path, capsys):
    # peft's save_pretrained rewrote it as the adapter's model card (a YAML header added, its
    # framework versions appended), and a later --overwrite took it for that card and deleted it
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    assert cli(args(tiny, out, "--method", "lora")) == 0
    assert (out / "README.md").read_text() == "my notes\n"
    capsys.readouterr()
    assert cli(args(tiny, out, "--method", "lora", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "not a run's outputs (README.md)" in err
    assert (out / "README.md").read_text() == "my notes\n"
    # the card peft writes into a folder of the run's own is still replaced with the run
    fresh = tmp_path / "fresh"
    assert cli(args(tiny, fresh, "--method", "lora")) == 0
    assert "library_name: peft" in (fresh / "README.md").read_text()
    assert cli(args(tiny, fresh, "--method", "adalora", "--overwrite", steps=10)) == 0
    assert json.loads((fresh / "metrics.json").read_text())["method"] == "adalora"


def test_paths_spelled_from_the_home_folder(tiny, tmp_path, monkeypatch, capsys):
    # `--model=~/bert` passed the folder check but was then loaded as a hub id ("could not be
    # loaded: Repo id must be in the form ..."), and `--output-dir=~/runs/a` (the shell expands
    # no ~ after "=") wrote into a folder named "~" in the working folder
    monkeypatch.setenv("HOME", str(tiny["root"]))
    monkeypatch.chdir(tmp_path)
    argv = ["--model=~/bert", "--train-file=~/train.csv", "--eval-file=~/dev.csv",
            "--batch-size", "8", "--max-seq-len", "16", "--no-progress", "--max-steps", "3",
            "--save-steps", "2", "--output-dir=~/home-runs/a"]
    assert cli(argv) == 0, capsys.readouterr().err
    out = Path(tiny["root"]) / "home-runs" / "a"
    assert (out / "metrics.json").is_file() and (out / "checkpoint-2").is_dir()
    assert not (tmp_path / "~").exists()
    assert cli(["--resume=~/home-runs/a/checkpoint-2", "--output-dir=~/home-runs/b",
                "--no-progress"]) == 0, capsys.readouterr().err
    resumed = json.loads((Path(tiny["root"]) / "home-runs" / "b" / "metrics.json").read_text())
    assert resumed["steps"] == 3 and resumed["resumed_from"] == str(out / "checkpoint-2")
    assert not (tmp_path / "~").exists()


def test_checkpoint_folders_are_listed_by_decimal_steps_only(tmp_path):
    """``checkpoint-²`` passed ``str.isdigit`` and then made ``int()`` raise, so listing a run
    folder that held one (the Ctrl-C line, a --resume of the run folder) failed; it is no
    checkpoint of a step."""
    from increlora_fast.training.checkpoint import (SETTINGS_FILE, STATE_FILE,
                                                    checkpoints_by_step)
    for name in ("checkpoint-2", "checkpoint-\u00b2", "checkpoint-x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / SETTINGS_FILE).write_text("{}")
        (tmp_path / name / STATE_FILE).write_bytes(b"")
    assert checkpoints_by_step(tmp_path) == {2: tmp_path / "checkpoint-2"}


def test_checkpoint_folders_count_only_under_the_name_a_run_writes(tmp_path):
    """``checkpoint-07`` and ``checkpoint-7`` both mapped to step 7, one silently replacing the
    other in the listing (which one: the file system's order), so `newest_checkpoint` and the
    Ctrl-C line could name a folder the run never wrote. Only ``checkpoint-<step>`` as a run
    names it (`str(step)`) counts."""
    from increlora_fast.training.checkpoint import (SETTINGS_FILE, STATE_FILE,
                                                    checkpoints_by_step, newest_checkpoint)
    for name in ("checkpoint-7", "checkpoint-07", "checkpoint-007", "checkpoint-09",
                 "checkpoint-\u0663"):  # ARABIC-INDIC DIGIT THREE: decimal, and int() reads 3
        (tmp_path / name).mkdir()
        (tmp_path / name / SETTINGS_FILE).write_text("{}")
        (tmp_path / name / STATE_FILE).write_bytes(b"")
    assert checkpoints_by_step(tmp_path) == {7: tmp_path / "checkpoint-7"}
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-7"
