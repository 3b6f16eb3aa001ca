"""Claiming an output folder for one run: its lock, leftovers of interrupted runs, and
`--overwrite` as a swap that happens only once the new run has succeeded.

With ``--overwrite`` and an earlier run in ``OUT``, the new run writes everything (checkpoints,
adapter, metrics) into ``OUT.new-<pid>`` beside it. When the run has succeeded, ``OUT`` is
renamed to ``.OUT.increlora-fast-old-<pid>`` (a name no one else uses, as it is deleted unasked),
``OUT.new-<pid>`` to ``OUT``, and the old one is deleted. The next run into ``OUT`` (holding its
lock, so no live run owns these names) finishes an interrupted swap: ``OUT`` missing with both
folders present means the new run had succeeded, so the swap is completed; ``OUT`` missing
without ``OUT.new-<pid>`` means the earlier run is restored. A new run's partial work left by an
interruption or failure stays in ``OUT.new-<pid>`` when it holds checkpoints (it is named in a
note on every later run, never deleted) and is removed otherwise. ``OUT`` is resolved first: a
symbolic link to the folder is not what gets swapped.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

from ..persistence import is_adapter_staging
from .checkpoint import DELETING_SUFFIX, REPLACED_SUFFIX
from .output_lock import OutputLock
from .peft_methods import MODEL_CARD, is_peft_model_card
from .outputs import (CHECKPOINT_PREFIX, METRICS_FILE, RUN_FILES, OutputWriteError,
                      check_output_path, check_writable, describe_os_error, prepare_output_dir,
                      run_files)

STAGING_TAG = ".new-"
TRASH_TAG = ".increlora-fast-old-"
# Where a run writes its final outputs before `final_outputs` moves them into its folder.
FINAL_STAGING = ".final-outputs.tmp"
# Left in a folder by an interrupted write of this package: a checkpoint being deleted
# (`checkpoint.remove_checkpoint`) or written (``checkpoint-<step>.tmp``; one it replaces is
# restored or deleted before, see `recover_leftovers`), an atomic write of
# a run file (``.<name>.<random>.tmp``), the writability probe of `outputs.check_writable`,
# the final outputs being written (`final_outputs`).
LEFTOVER = re.compile(
    rf"^(?:\.{CHECKPOINT_PREFIX}\d+{re.escape(DELETING_SUFFIX)}|{CHECKPOINT_PREFIX}\d+\.tmp"
    rf"|{re.escape(FINAL_STAGING)}"
    rf"|\.(?:{'|'.join(re.escape(n) for n in RUN_FILES)})\.\w+\.tmp|\.write-test\.\w+)$")
# A checkpoint set aside while the same step was saved again (`checkpoint.save_checkpoint`):
# put back when the new one never took its name, else deleted (`recover_leftovers`).
REPLACED = re.compile(rf"^\.({CHECKPOINT_PREFIX}\d+){re.escape(REPLACED_SUFFIX)}$")

# `save_pretrained` of a large full fine-tune: model.safetensors split in shards and an index
SHARDS = re.compile(r"^model(?:-\d+-of-\d+\.safetensors|\.safetensors\.index\.json)$")


def staging_dir(out: Path, pid: int) -> Path:
    """Where an ``--overwrite`` run of process ``pid`` writes until it has succeeded."""
    return out.with_name(f"{out.name}{STAGING_TAG}{pid}")


def staged_for(folder: Path) -> Optional[Path]:
    """The run folder whose ``--overwrite`` run ``folder`` is the staging folder of
    (`staging_dir`), None when ``folder`` is none."""
    name, tag, pid = folder.name.rpartition(STAGING_TAG)
    return folder.with_name(name) if name and tag and pid.isdigit() else None


def trash_dir(out: Path, pid: int) -> Path:
    """Where the earlier run goes during the swap, deleted right after."""
    return out.with_name(f".{out.name}{TRASH_TAG}{pid}")


def _tagged(out: Path, tag: str, hidden: bool = False) -> List[Tuple[Path, int]]:
    """The folders beside ``out`` named ``[.]<out><tag><pid>``, with their pids."""
    pattern = re.compile(re.escape(("." if hidden else "") + out.name + tag) + r"(\d+)$")
    if not out.parent.is_dir():
        return []
    found = [(p, pattern.match(p.name)) for p in out.parent.iterdir()]
    return sorted((p, int(m.group(1))) for p, m in found if m and p.is_dir())


def _foreign(out: Path, earlier: List[str]) -> List[str]:
    """Entries of ``out`` that no run writes: neither `outputs.RUN_FILES`, checkpoints, the
    shards of a saved full model, the model card peft writes beside an adapter (a README.md
    that is not such a card is one's own: a run leaves it as it is), nor what a run killed while
    it wrote its adapter left (`persistence.is_adapter_staging`)."""
    card = {MODEL_CARD} if "adapter_config.json" in earlier and \
        is_peft_model_card(out / MODEL_CARD) else set()
    return sorted(p.name for p in out.iterdir()
                  if p.name not in earlier and p.name not in card and not SHARDS.match(p.name)
                  and not is_adapter_staging(p))


def recover_leftovers(out: Path, echo: Callable[[str], None]) -> None:
    """With ``out``'s lock held: finish an interrupted swap, name kept partial runs, and delete
    what interrupted checkpoint rotations and atomic writes left in ``out``."""
    for trash, pid in _tagged(out, TRASH_TAG, hidden=True):
        if not out.exists():
            stage = staging_dir(out, pid)
            if not stage.is_dir():
                os.rename(trash, out)
                echo(f"note: {out}: restored the earlier run from {trash.name} (an --overwrite "
                     "swap was interrupted)")
                continue
            os.rename(stage, out)
            echo(f"note: {out}: completed the interrupted swap of an --overwrite run that had "
                 f"succeeded (pid {pid})")
        shutil.rmtree(trash)
    for stage, pid in _tagged(out, STAGING_TAG):
        echo(f"note: {stage} holds the partial work of an interrupted --overwrite run into "
             f"{out} (pid {pid}); it is kept: --resume one of its checkpoints, or delete it")
    if out.is_dir():
        for path in sorted(out.iterdir()):
            match = REPLACED.match(path.name)
            if match is None or not path.is_dir():
                continue
            name = match.group(1)
            if (out / name).exists():  # the new one was in place: this one is only deleted
                shutil.rmtree(path)
            else:
                os.rename(path, out / name)
                echo(f"note: {out}: restored {name}, which a run killed while it saved that "
                     "step again had set aside")
        for path in out.iterdir():
            if LEFTOVER.match(path.name):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _set_aside(stage: Path, out: Path, echo: Callable[[str], None]) -> None:
    """After a failed or interrupted ``--overwrite`` run: keep its checkpoints apart, or remove
    the staging folder when it holds none."""
    kept = sorted(p.name for p in stage.glob(f"{CHECKPOINT_PREFIX}*")
                  if p.is_dir() and not LEFTOVER.match(p.name))
    if kept:
        echo(f"note: {out} still holds the earlier run; the new run's partial work is kept "
             f"apart in {stage} ({', '.join(kept)}; --resume to continue it)")
    else:
        shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def final_outputs(out: Path) -> Iterator[Path]:
    """Yield an empty folder inside ``out`` to write a run's final outputs into; when the body
    returns they are moved into ``out`` by renames, metrics.json last, so that ``out`` never
    holds a part of them that looks like a finished run. A Ctrl-C or an error while they are
    written leaves ``out`` as it was (its checkpoints to resume from) and the folder is removed;
    one a killed run left is removed by the next run (`recover_leftovers`). A metrics.json in
    ``out`` (the resumed run's) is removed before the first rename; a README.md there (one's
    own, or the resumed run's model card) is kept, and the new model card peft wrote dropped.

    Raises:
        OutputWriteError: an entry of ``out`` is in the way of one of them (a folder where a
            file goes, say), checked before anything is moved: ``out`` is left as it was.
    """
    stage = out / FINAL_STAGING
    stage.mkdir()
    try:
        yield stage
        names = [p.name for p in sorted(stage.iterdir()) if p.name != METRICS_FILE
                 and not (p.name == MODEL_CARD and os.path.lexists(out / MODEL_CARD))]
        for name in names + [METRICS_FILE]:
            target = out / name
            if os.path.lexists(target) and (
                    (target.is_dir() and not target.is_symlink()) or (stage / name).is_dir()):
                raise OutputWriteError(errno.EEXIST, f"{target} is in the way of the run's "
                                                     f"{name}: move it away")
        if (out / METRICS_FILE).exists():
            (out / METRICS_FILE).unlink()
        for name in names + [METRICS_FILE]:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def swap_in(stage: Path, out: Path) -> None:
    """Replace ``out`` by ``stage`` (see the module docstring for the recovery)."""
    trash = trash_dir(out, os.getpid())
    try:
        os.rename(out, trash)
        os.rename(stage, out)
        shutil.rmtree(trash)
    except OSError as err:
        raise OutputWriteError(err.errno, f"cannot swap the new run {stage} into {out}: "
                                          f"{describe_os_error(err)}; the next run into {out} "
                                          "completes the swap") from err


@contextmanager
def claim_output_dir(output_dir: str, overwrite: bool = False, resume: Optional[str] = None,
                     echo: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold ``output_dir`` for one run and yield the folder the run writes into.

    The folder is locked for the whole run (`output_lock.OutputLock`: a second run is refused
    at once), leftovers of interrupted runs are finished (`recover_leftovers`), then it is
    checked (`outputs.prepare_output_dir`). With ``overwrite`` and an earlier run in it, the
    yielded folder is ``<output_dir>.new-<pid>``, swapped in only when the body returns.
    When the body raises, the folders the claim made (``output_dir`` and missing parents) are
    removed if they are still empty.

    Raises:
        ValueError: the folder is refused (see `outputs.prepare_output_dir`, `OutputLock`), or
            ``overwrite`` would delete entries no run of this package writes.
    """
    given = check_output_path(output_dir)
    out = given.resolve()  # a swap renames the folder itself, not a link to it
    made = _missing_folders(out)
    try:
        with OutputLock(out):
            yield from _claimed(out, given, output_dir, overwrite, resume, echo)
    except BaseException:
        _remove_empty(made)
        raise


def _missing_folders(folder: Path) -> List[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: List[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: the folders a failed run made
    and left with nothing in them (it never removes a file, nor a folder that holds one)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _claimed(out: Path, given: Path, output_dir: str, overwrite: bool, resume: Optional[str],
             echo: Callable[[str], None]) -> Iterator[Path]:
    """`claim_output_dir` while it holds the lock."""
    recover_leftovers(out, echo)
    prepare_output_dir(output_dir, overwrite=overwrite, resume=resume)
    earlier = run_files(out)
    if not (overwrite and earlier):
        yield given
        return
    foreign = _foreign(out, earlier)
    if foreign:
        raise ValueError(f"--output-dir {given} holds files that are not a run's outputs ("
                         f"{', '.join(foreign[:6])}); --overwrite replaces the whole folder: "
                         "move them out or choose another folder")
    stage = staging_dir(out, os.getpid())
    if stage.exists():
        raise ValueError(f"--overwrite: {stage} exists (an earlier run's partial work); "
                         "delete it or choose another folder")
    check_writable(stage, option="--overwrite staging folder")
    try:
        yield stage
    except BaseException:
        _set_aside(stage, out, echo)
        raise
    swap_in(stage, out)
