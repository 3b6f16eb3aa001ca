"""The output folder of a run: checked before anything is loaded, never losing another run's work.

A run writes only into a folder that holds no other run's files, unless ``--overwrite`` says so
or ``--resume`` continues a checkpoint inside it. Its checkpoint rotation removes only the
checkpoints it wrote itself, and it never writes into the checkpoint it resumed from.
"""
from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from ..files import write_output

CHECKPOINT_PREFIX = "checkpoint-"
METRICS_FILE = "metrics.json"
ALLOCATION_LOG_FILE = "allocation_log.jsonl"
# Files a finished run leaves in its output folder (any method), and `--compare`'s.
RUN_FILES = (METRICS_FILE, "adapter_model.safetensors", "adapter_config.json",
             "model.safetensors", "config.json", "rank_heatmap.png", "rank_over_time.png",
             ALLOCATION_LOG_FILE,
             "labels.json", "compare.json", "compare.md", "settings.json", "trainer_state.pt",
             "trainable.safetensors")


def run_files(directory: Path) -> List[str]:
    """Names of the run outputs and checkpoint folders ``directory`` holds, sorted."""
    if not directory.is_dir():
        return []
    found = [name for name in RUN_FILES if (directory / name).exists()]
    found += [p.name for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
    return sorted(found)


def check_distinct_outputs(outputs: Iterable[Tuple[str, Optional[str]]]) -> None:
    """No two of the (option, path) ``outputs`` name one file (the later write would replace or
    append to the earlier; paths compared after ``~`` and links are resolved; an empty or None
    path is no output): ValueError naming both options."""
    seen = {}
    for option, path in outputs:
        if not path:
            continue
        key = os.path.realpath(os.path.expanduser(path))
        if key in seen:
            raise ValueError(f"{option} {path} is the file {seen[key]} also writes; give each "
                             "output its own path")
        seen[key] = f"{option} {path}"


def write_figure(fig, path: Path, dpi: int) -> None:
    """Save ``fig`` to ``path`` by `write_output`, in the format its suffix names (as
    ``savefig(path)`` would: PNG without one)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix[1:] or None, dpi=dpi)
    write_output(Path(path), buffer.getvalue())


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output_path(directory: str, option: str = "--output-dir") -> Path:
    """``directory`` as a Path (``~`` expanded), refused (ValueError) when it is empty, the root,
    a file, or under a file: before any lock, data or model."""
    if not str(directory).strip():
        raise ValueError(f"{option} is empty: give a folder (e.g. {option} outputs/run)")
    out = Path(directory).expanduser()  # "--output-dir=~/x": no shell expands that ~
    if not out.resolve().name:
        raise ValueError(f"{option} {directory} is the root folder: give a folder below it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} is a file, not a folder: choose a folder")
    for above in out.resolve().parents:
        if above.exists():
            if not above.is_dir():
                raise ValueError(f"{option} {out} is not writable: {above} is a file")
            break
    return out


def check_writable(directory: Path, option: str = "--output-dir") -> None:
    """Create ``directory`` if missing and prove a file can be written there (ValueError if not)."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{option} {directory} is a file, not a folder: choose a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{option} {directory} is not writable: {describe_os_error(err)}") \
            from err


def prepare_output_dir(output_dir: str, overwrite: bool = False,
                       resume: Optional[str] = None) -> Path:
    """Check the output folder before any data or model is loaded; returns it (created).

    Raises:
        ValueError: it is a file or not writable; it holds another run's files and neither
            ``overwrite`` is set nor is it the run folder of the checkpoint ``resume`` (a folder
            above that one may hold another run); or it is (inside) the checkpoint being
            resumed, which the run would overwrite.
    """
    out = check_output_path(output_dir)
    if resume is not None and _inside(out, Path(resume)):
        raise ValueError(f"--output-dir {out} is the checkpoint being resumed (--resume {resume}):"
                         " its files would be replaced by the final outputs; write into its run "
                         f"folder ({Path(resume).resolve().parent}) or another folder")
    present = run_files(out)
    resuming_here = resume is not None and Path(resume).resolve().parent == out.resolve()
    if present and not overwrite and not resuming_here:
        shown = ", ".join(present[:6]) + (f" and {len(present) - 6} more" if len(present) > 6
                                          else "")
        raise ValueError(f"--output-dir {out} holds another run's files ({shown}); pass "
                         "--overwrite to replace them, --resume one of its checkpoints to "
                         "continue it, or choose another folder")
    check_writable(out)
    return out


class OutputWriteError(OSError):
    """The outputs could not be written (e.g. the disk is full); the message names the folder."""

    def __str__(self) -> str:
        return str(self.strerror)


def describe_os_error(err: OSError) -> str:
    """An OSError as one line, saying 'no space left on the device' for a full disk."""
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    return err.strerror or str(err)
