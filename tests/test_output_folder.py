"""One run per output folder, and `--overwrite` that never loses the earlier run (issue 28 items
1 and 2): real processes and signals for the lock and the interruptions, a patched write for the
full disk, and hand-made leftovers for what a killed process leaves between two renames."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable, List

import pytest

from finetune_helpers import cli, tiny_files
from test_output_safety import _one_error_line, args, digests

from increlora_fast.training.output_folder import staging_dir, trash_dir
from increlora_fast.training.output_lock import OutputLock, lock_path

REPO = Path(__file__).resolve().parents[1]
HOLD_LOCK = ("import sys, time\nfrom pathlib import Path\n"
             "from increlora_fast.training.output_lock import OutputLock\n"
             "OutputLock(Path(sys.argv[1]), shared=sys.argv[2] == 'shared').acquire()\n"
             "print('held', flush=True)\ntime.sleep(300)\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=96, dev_rows=24)


def start(cmd: List[str], log: Path) -> subprocess.Popen:
    """``cmd`` (after the python executable) as a child process; stdout and stderr go to
    ``log`` and ``log``.err."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, *cmd], env=env, cwd=REPO,
                            stdout=log.open("w"), stderr=log.with_suffix(".err").open("w"),
                            # a child of a background job inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(ready: Callable[[], bool], proc: subprocess.Popen, log: Path,
             timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) first: "
                        f"{log.with_suffix('.err').read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the child did not get there in time")
        time.sleep(0.1)


def stop(proc: subprocess.Popen, sig: int) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=60)


@pytest.fixture(scope="module")
def two_runs(tiny, tmp_path_factory) -> dict:
    """Two finished runs to copy into test folders: ``a`` (with a checkpoint-2), and ``b``, the
    same outputs with other metrics."""
    root = tmp_path_factory.mktemp("runs")
    assert cli(args(tiny, root / "a", "--save-steps", "2")) == 0
    shutil.copytree(root / "a", root / "b", ignore=shutil.ignore_patterns("checkpoint-*"))
    (root / "b" / "metrics.json").write_text('{"method": "b"}')
    return {"a": root / "a", "b": root / "b"}


def test_a_second_run_is_refused_at_once_and_a_killed_runs_lock_is_taken_over(
        tiny, tmp_path, capsys, monkeypatch):
    # compare imports load_data from finetune_run: imported under the patch below, it would
    # keep the refusing stand-in for every later test of the process
    from increlora_fast.training import compare, finetune_run  # noqa: F401

    out = tmp_path / "run"
    log = tmp_path / "first.log"
    first = start(["-m", "increlora_fast", "finetune",
                   *args(tiny, out, "--save-steps", "2", steps=1_000_000)], log)
    try:
        wait_for(lambda: any(out.glob("checkpoint-*")), first, log)

        def refuse(*a, **k):
            raise AssertionError("the data was loaded before the lock refused the run")
        with monkeypatch.context() as patch:
            patch.setattr(finetune_run, "load_data", refuse)
            assert cli(args(tiny, out, "--overwrite")) == 2  # not even --overwrite gets in
        line = _one_error_line(capsys)
        assert f"--output-dir {out} is in use by another run" in line
        assert f"pid {first.pid} on host {socket.gethostname()}" in line
    finally:
        stop(first, signal.SIGKILL)
    assert lock_path(out).exists()  # the killed run could not remove it
    assert cli(args(tiny, out, "--overwrite")) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert not lock_path(out).exists()
    assert not list(tmp_path.glob("run.*"))


def test_sigint_during_overwrite_leaves_the_earlier_run_whole_and_the_new_one_apart(
        tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(args(tiny, out, "--save-steps", "2")) == 0
    before = digests(out)
    log = tmp_path / "second.log"
    second = start(["-m", "increlora_fast", "finetune",
                    *args(tiny, out, "--method", "lora", "--overwrite", "--save-steps", "2",
                          steps=1_000_000)], log)
    stage = staging_dir(out, second.pid)
    try:
        # checkpoints rotate every 2 steps, so a given one may live for milliseconds; from
        # step 2 to the end one checkpoint-<step> always exists (the new one is written first)
        wait_for(lambda: any(p.is_dir() and p.name[len("checkpoint-"):].isdigit()
                             for p in stage.glob("checkpoint-*")), second, log)
    finally:
        assert stop(second, signal.SIGINT) != 0
    assert digests(out) == before
    kept = [p.name for p in stage.glob("checkpoint-*") if p.is_dir()]
    assert kept and f"partial work is kept apart in {stage}" in log.read_text()
    capsys.readouterr()
    assert cli(args(tiny, out)) == 2  # the earlier run is still there to refuse a new one
    assert f"note: {stage} holds the partial work of an interrupted --overwrite run" in \
        capsys.readouterr().out
    assert digests(out) == before and stage.is_dir()


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "overwrite"])
def test_a_full_disk_at_the_final_write_names_the_folder_and_keeps_the_earlier_run(
        tiny, tmp_path, capsys, monkeypatch, fresh):
    from increlora_fast.training import finetune_run as finetune

    out = tmp_path / "run"
    if not fresh:
        assert cli(args(tiny, out, "--save-steps", "2")) == 0
    before = digests(out) if not fresh else None
    real = finetune.atomic_write_bytes

    def full_at_metrics(path: Path, data: bytes) -> None:
        if path.name == "metrics.json":  # the adapter and labels are written by then
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(finetune, "atomic_write_bytes", full_at_metrics)
    capsys.readouterr()
    assert cli(args(tiny, out, *(() if fresh else ("--overwrite",)))) == 1
    line = _one_error_line(capsys)
    assert "no space left on the device" in line and f"into {out}" in line
    if not fresh:
        assert digests(out) == before
        assert not list(tmp_path.glob("run.*"))  # no checkpoint: nothing kept apart


def test_overwrite_can_resume_a_checkpoint_of_the_run_it_replaces(tiny, tmp_path):
    out = tmp_path / "run"
    assert cli(args(tiny, out, "--save-steps", "2")) == 0
    assert cli(["--resume", str(out / "checkpoint-2"), "--output-dir", str(out), "--overwrite",
                "--no-progress", "--save-steps", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["resumed_from"] == str(out / "checkpoint-2")
    assert not (out / "checkpoint-2").exists()  # the whole earlier run was replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("killed", ["between_renames", "after_first_rename_of_a_lost_stage",
                                    "before_deleting_the_old_run"])
def test_the_next_run_finishes_an_interrupted_swap(tiny, two_runs, tmp_path, capsys,
                                                   killed):
    out = tmp_path / "run"
    old, new = trash_dir(out, 77), staging_dir(out, 77)
    shutil.copytree(two_runs["a"], old)
    if killed == "between_renames":
        shutil.copytree(two_runs["b"], new)
    elif killed == "before_deleting_the_old_run":
        shutil.copytree(two_runs["b"], out)
    expected = digests(two_runs["a" if killed.startswith("after_first") else "b"])
    assert cli(args(tiny, out)) == 2  # refused: the folder holds a run, once recovered
    assert digests(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_next_run_removes_leftovers_of_interrupted_cleanups(tiny, two_runs, tmp_path,
                                                                capsys):
    out = tmp_path / "run"
    shutil.copytree(two_runs["a"], out)
    expected = digests(out)
    shutil.copytree(out / "checkpoint-2", out / ".checkpoint-6.deleting")
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-8.tmp")
    (out / ".metrics.json.k2j4x9ab.tmp").write_text("{")
    assert cli(args(tiny, out)) == 2
    assert digests(out) == expected and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_next_run_restores_a_checkpoint_whose_replacement_was_interrupted(
        tiny, two_runs, tmp_path, capsys):
    """A run killed while it replaced a checkpoint of its own (the same step saved again) left
    the old one set aside and the new one unfinished: the next run into the folder puts the old
    one back (nothing of a finished checkpoint is lost) and removes the unfinished one."""
    out = tmp_path / "run"
    shutil.copytree(two_runs["a"], out)
    expected = digests(out)
    os.rename(out / "checkpoint-2", out / ".checkpoint-2.replaced")
    shutil.copytree(out / ".checkpoint-2.replaced", out / "checkpoint-2.tmp")
    (out / "checkpoint-2.tmp" / "trainer_state.pt").write_bytes(b"partial")
    assert cli(args(tiny, out)) == 2  # refused: the folder holds a run, once recovered
    assert digests(out) == expected
    assert "restored checkpoint-2" in capsys.readouterr().out
    # once the new one is in place, the old one set aside is only deleted
    os.rename(out / "checkpoint-2", out / ".checkpoint-2.replaced")
    shutil.copytree(out / ".checkpoint-2.replaced", out / "checkpoint-2")
    assert cli(args(tiny, out)) == 2
    assert digests(out) == expected


def test_saving_a_step_again_keeps_the_old_checkpoint_until_the_new_one_is_in_place(
        tmp_path, monkeypatch):
    """`save_checkpoint` over a checkpoint of the same name, killed at each of its renames in
    turn: the folder then holds the old checkpoint or the new one, whole, or the old one set
    aside for the next run to restore, never only the unfinished new one."""
    from increlora_fast.training import checkpoint
    target = tmp_path / "checkpoint-4"
    real_replace = os.replace
    monkeypatch.setattr(checkpoint, "atomic_write_bytes",
                        lambda path, data: path.write_bytes(data))
    monkeypatch.setattr(checkpoint, "_torch_bytes", lambda obj: b"state")
    monkeypatch.setattr(checkpoint, "_rng_state", lambda: None)
    monkeypatch.setattr(checkpoint, "model_pooling", lambda model: None)

    def save_state(directory: Path) -> dict:  # a run whose state is one file, "new"
        (directory / "f").write_text("new")
        return {}

    def save() -> None:
        run = types.SimpleNamespace(name="increlora", model=None, save_state=save_state,
                                    optimizer=types.SimpleNamespace(state_dict=dict))
        state = types.SimpleNamespace(step=4, losses=[], train_seconds=0.0, best=None,
                                      save_steps=2, sync=lambda name: None)
        checkpoint.save_checkpoint(target, run, types.SimpleNamespace(to_dict=dict), state)

    for stop in range(1, 10):
        for path in tmp_path.iterdir():
            shutil.rmtree(path)
        target.mkdir()
        (target / "f").write_text("old")
        calls: List[str] = []

        def replace(src, dst):
            calls.append(Path(src).name)
            if len(calls) == stop:
                raise KeyboardInterrupt  # killed here
            real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
        try:
            save()
            finished = True
        except KeyboardInterrupt:
            finished = False
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        kept = {p.name: (p / "f").read_text() for p in tmp_path.iterdir() if (p / "f").exists()}
        if finished:
            assert kept == {"checkpoint-4": "new"}, kept
            break
        assert kept.get("checkpoint-4") in ("old", "new") or \
            kept.get(".checkpoint-4.replaced") == "old", (calls, kept)
    assert finished and stop >= 3  # at least the rename aside and the rename in were killed


def test_overwrite_replaces_a_run_whose_adapter_write_was_killed(tiny, two_runs, tmp_path,
                                                                  capsys):
    """A run killed inside `save_adapter` left its hidden ``.adapter-staging-*`` folder (the
    new files and links to the old ones): it is that run's, so ``--overwrite``, which replaces
    the whole earlier run, replaces it too, where it used to refuse it as a file of one's own."""
    out = tmp_path / "run"
    shutil.copytree(two_runs["a"], out)
    stage = out / ".adapter-staging-k2j4x9ab"
    (stage / "new").mkdir(parents=True)
    (stage / "old").mkdir()
    shutil.copy2(out / "adapter_config.json", stage / "old" / "adapter_config.json")
    assert cli(args(tiny, out, "--overwrite")) == 0, capsys.readouterr().err
    assert not stage.exists() and json.loads((out / "metrics.json").read_text())["steps"] == 4
    # a folder of that name holding anything else is one's own
    shutil.copytree(two_runs["a"], tmp_path / "run2")
    mine = tmp_path / "run2" / ".adapter-staging-mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert cli(args(tiny, tmp_path / "run2", "--overwrite")) == 2
    assert ".adapter-staging-mine" in _one_error_line(capsys)


def test_overwrite_refuses_to_delete_files_no_run_wrote(tiny, two_runs, tmp_path,
                                                        capsys):
    out = tmp_path / "run"
    shutil.copytree(two_runs["a"], out)
    (out / "notes.txt").write_text("mine")
    before = digests(out)
    assert cli(args(tiny, out, "--overwrite")) == 2
    line = _one_error_line(capsys)
    assert "notes.txt" in line and "--overwrite replaces the whole folder" in line
    assert digests(out) == before


@pytest.mark.parametrize("extra", [(), ("--compare",)], ids=["finetune", "compare"])
def test_an_empty_output_dir_is_one_error_line(tiny, tmp_path, capsys, monkeypatch,
                                               extra):
    monkeypatch.chdir(tmp_path)
    argv = args(tiny, Path("x"), *(("--methods", "lora", *extra) if extra else ()))
    argv[argv.index("--output-dir") + 1] = ""
    assert cli(argv) == 2
    assert "--output-dir is empty" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["exclusive", "shared"])
def test_the_lock_between_processes(tiny, tmp_path, capsys, mode):
    from increlora_fast.training.compare import compare_methods
    from increlora_fast.training.settings import RunSettings

    folder = tmp_path / "out"
    log = tmp_path / "holder.log"
    holder = start(["-c", HOLD_LOCK, str(folder), mode], log)
    try:
        wait_for(lambda: "held" in log.read_text(), holder, log)
        with pytest.raises(ValueError, match=f"pid {holder.pid} on host"):
            OutputLock(folder).acquire()
        # a run is refused while a comparison holds the folder, and the other way round
        assert cli(args(tiny, folder)) == 2
        assert f"{folder} is in use by another run (pid {holder.pid}" in _one_error_line(capsys)
        settings = RunSettings(model=tiny["model"], task=None, train_file=tiny["train"],
                               eval_file=tiny["dev"])
        if mode == "exclusive":
            with pytest.raises(ValueError, match=f"in use by another run \\(pid {holder.pid}"):
                compare_methods(settings, ["lora"], [1e-3], 1, str(folder), progress=False)
        else:  # comparisons share a folder
            with OutputLock(folder, shared=True):
                pass
            assert lock_path(folder).exists()  # the holder still has it
    finally:
        stop(holder, signal.SIGKILL)
    with OutputLock(folder):  # the dead holder's lock is taken over
        assert json.loads(lock_path(folder).read_text())["pid"] == os.getpid()
    assert not lock_path(folder).exists()


def test_overwrite_through_a_symbolic_link_replaces_the_folder_it_points_to(tiny, two_runs,
                                                                             tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    shutil.copytree(two_runs["a"], real)
    link.symlink_to(real)
    assert cli(args(tiny, link, "--method", "lora", "--overwrite")) == 0
    assert link.is_symlink() and not (real / "checkpoint-2").exists()
    assert json.loads((real / "metrics.json").read_text())["method"] == "lora"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_failed_run_removes_the_empty_folders_it_made_and_nothing_else(tmp_path):
    """A run refused after it claimed its folder (a value only the run's own check sees) left
    the folder it had made, and its missing parents, behind empty (found by an audit); a folder
    that was there before, or that holds anything, stays."""
    from increlora_fast.training.output_folder import claim_output_dir

    made = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(RuntimeError):
        with claim_output_dir(str(made), echo=lambda line: None) as out:
            assert Path(out).is_dir()
            raise RuntimeError("the run failed")
    assert not (tmp_path / "new").exists() and sorted(os.listdir(tmp_path)) == []
    there = tmp_path / "there"
    there.mkdir()
    with pytest.raises(RuntimeError):
        with claim_output_dir(str(there), echo=lambda line: None):
            raise RuntimeError("the run failed")
    assert there.is_dir()
    kept = tmp_path / "kept" / "run"
    with pytest.raises(RuntimeError):
        with claim_output_dir(str(kept), echo=lambda line: None) as out:
            (Path(out) / "notes.txt").write_text("written before the failure")
            raise RuntimeError("the run failed")
    assert (kept / "notes.txt").read_text() == "written before the failure"
    with claim_output_dir(str(tmp_path / "ok"), echo=lambda line: None):
        pass
    assert (tmp_path / "ok").is_dir()


def test_a_lock_held_by_a_process_that_wrote_nothing_names_another_process(tmp_path):
    import fcntl as fcntl_module

    folder = tmp_path / "out"
    path = lock_path(folder)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl_module.flock(fd, fcntl_module.LOCK_EX)
        with pytest.raises(ValueError, match=r"--output-dir .*out is in use by another run "
                                             r"\(another process\); wait for it"):
            OutputLock(folder).acquire()
    finally:
        os.close(fd)
    with OutputLock(folder):
        pass


def test_a_folder_whose_lock_file_cannot_be_created_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    folder = tmp_path / "file" / "out"
    with pytest.raises(ValueError, match=r"--output-dir .*out is not writable: cannot create "
                                         r"its lock file"):
        OutputLock(folder).acquire()


def test_a_lock_that_fails_otherwise_is_named(tmp_path, monkeypatch):
    from increlora_fast.training import output_lock

    def broken(fd, operation):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(output_lock.fcntl, "flock", broken)
    with pytest.raises(ValueError, match=r"out cannot be locked \(.*\.out\.increlora-fast\.lock\)"):
        OutputLock(tmp_path / "out").acquire()


def test_a_lock_file_removed_between_open_and_lock_is_opened_anew(tmp_path, monkeypatch):
    """Its last holder removed the lock file after this run opened it: the lock taken on the
    removed file guards nothing, so the run opens the file again and locks that one."""
    from increlora_fast.training import output_lock

    folder = tmp_path / "out"
    real_flock, calls = output_lock.fcntl.flock, []

    def flock_after_removal(fd, operation):
        calls.append(operation)
        if len(calls) == 1:
            os.unlink(lock_path(folder))
        return real_flock(fd, operation)

    monkeypatch.setattr(output_lock.fcntl, "flock", flock_after_removal)
    lock = OutputLock(folder)
    lock.acquire()
    assert len(calls) == 2
    assert json.loads(lock_path(folder).read_text())["pid"] == os.getpid()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="in use by another run"):
        OutputLock(folder).acquire()
    lock.release()
    lock.release()  # a second release does nothing
    assert not lock_path(folder).exists()


def test_a_folder_in_the_way_of_a_final_output_leaves_the_run_folder_as_it_was(tmp_path):
    """The final outputs were moved in one by one after the old metrics.json was deleted: a
    folder named like one of them (here labels.json, in a resumed run's folder) failed its
    rename half-way and left some new files, some old ones and no metrics.json. Every target
    is checked before anything is moved, and the error names the one in the way."""
    from increlora_fast.training.output_folder import final_outputs
    from increlora_fast.training.outputs import OutputWriteError

    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.json", "adapter_config.json", "adapter_model.safetensors"):
        (out / name).write_text(f"old {name}")
    (out / "labels.json").mkdir()
    (out / "labels.json" / "mine.txt").write_text("one's own")
    before = digests(out)
    with pytest.raises(OutputWriteError) as caught:
        with final_outputs(out) as stage:
            for name in ("metrics.json", "adapter_config.json", "adapter_model.safetensors",
                         "labels.json"):
                (stage / name).write_text(f"new {name}")
    message = str(caught.value)
    assert str(out / "labels.json") in message and "\n" not in message
    assert digests(out) == before
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "labels.json", "metrics.json"]


def test_ones_own_readme_kept_also_as_a_link_to_nothing(tmp_path):
    """A README.md of one's own in the run folder is kept and peft's new model card dropped;
    one that is a symbolic link whose target is gone (a card kept elsewhere, not mounted now)
    was taken for none (``exists`` follows the link) and replaced by peft's card."""
    from increlora_fast.training.output_folder import final_outputs

    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").symlink_to(tmp_path / "cards" / "mine.md")
    with final_outputs(out) as stage:
        for name in ("metrics.json", "adapter_config.json", "README.md"):
            (stage / name).write_text(f"new {name}")
    assert (out / "README.md").is_symlink()
    assert os.readlink(out / "README.md") == str(tmp_path / "cards" / "mine.md")
    assert (out / "metrics.json").read_text() == "new metrics.json"
