"""One run per output folder: an flock on a lock file beside the folder, held for the whole run.

The lock file is ``.<name>.increlora-fast.lock`` in the folder's parent (beside it, not inside,
so that `--overwrite` can swap the whole folder while the lock is held). The kernel releases an
flock when its process dies, so a lock left by a killed run is taken over by the next run
without any guessing about pids; the pid, host and start time written into the file serve only
the message that refuses a second run while the first is alive.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .outputs import describe_os_error

LOCK_SUFFIX = ".increlora-fast.lock"


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder`` (resolved, so every spelling of a folder shares one lock)."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def _holder(fd: int) -> str:
    """Who holds the lock, as written into the file by its holder."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class OutputLock:
    """An flock on ``folder``'s lock file: exclusive for a run, shared for `--compare` (several
    comparisons may share a folder; a run into it is refused while any of them runs).

    Use as a context manager; acquiring never waits: a held lock is a ValueError naming the
    folder and the holder (pid, host, start time).
    """

    def __init__(self, folder: Path, option: str = "--output-dir", shared: bool = False):
        self.folder, self.option, self.shared = Path(folder), option, shared
        self.path = lock_path(self.folder)
        self._fd: Optional[int] = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock at once or raise ValueError (held by a live process, or not creatable)."""
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise ValueError(f"{self.option} {self.folder} is not writable: cannot create "
                                 f"its lock file {self.path}: {describe_os_error(err)}") from err
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except OSError as err:
                holder = _holder(fd)
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ValueError(f"{self.option} {self.folder} is in use by another run "
                                     f"({holder}); wait for it to end or choose another "
                                     "folder") from None
                raise ValueError(f"{self.option} {self.folder} cannot be locked ({self.path}): "
                                 f"{describe_os_error(err)}") from err
            if self._still_linked(fd):
                break
            os.close(fd)  # its last holder removed the file after we opened it: open it anew
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def _still_linked(self, fd: int) -> bool:
        try:
            on_disk, held = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        """Drop the lock; the last holder removes the lock file."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds only with no other holder
            os.unlink(self.path)
        except OSError:
            pass  # a shared holder remains (it removes the file), or it is already gone
        finally:
            os.close(fd)
