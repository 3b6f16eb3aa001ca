"""Peak memory of a region, per tensor: the bytes of live tensor storages, not the process RSS.

CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's own count of live blocks).
CPU: `LiveTensorBytes`, a ``TorchDispatchMode`` that sees every tensor an operator returns while
it is active, counts each new storage once (views and in-place results share their input's
storage and add nothing) and subtracts it again when the storage is freed (a weak reference with a
callback). The peak is the high-water mark of that count. What it does not see: scratch buffers an
operator allocates and frees inside itself (not returned), and tensors created before ``start``
(the baseline, which is what a peak above the baseline should leave out). `release_memory`
collects garbage and hands freed memory back before a baseline is taken.
"""
from __future__ import annotations

import ctypes
import gc
import sys
import weakref
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 1024 * 1024
CUDA_KIND = "cuda_max_allocated"
CPU_KIND = "cpu_live_tensor_bytes"


def _storages(tree) -> Dict[int, torch.UntypedStorage]:
    """{data pointer: storage} of the dense tensors in a pytree (nested lists, tuples, dicts)."""
    found = {}
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided \
                and leaf.device.type != "meta":
            storage = leaf.untyped_storage()
            if storage.nbytes():
                found[storage.data_ptr()] = storage
    return found


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created while active that are still alive.

    ``live`` is the current count and ``peak`` its high-water mark since entering (or the last
    `reset_peak`). Use as a context manager around the region to measure.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: Dict[int, weakref.ref] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _storages((args, kwargs))
        for ptr, storage in _storages(out).items():
            if ptr in inputs or ptr in self._tracked:
                continue  # a view, an in-place result or an already counted storage
            self._track(ptr, storage)
        return out

    def _track(self, ptr: int, storage: torch.UntypedStorage) -> None:
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def freed(_ref, ptr=ptr, nbytes=nbytes, tracker=weakref.ref(self)) -> None:
            owner = tracker()
            if owner is not None:
                owner.live -= nbytes
                owner._tracked.pop(ptr, None)
        self._tracked[ptr] = weakref.ref(storage, freed)


class TensorPeak:
    """Peak tensor memory of a region above what was allocated when it began, on one device.

    Use ``with TensorPeak(device) as peak: ...`` and read ``peak.peak_bytes`` afterwards, or call
    `start` and `stop` (which returns the peak in bytes). ``kind`` names the mechanism
    (`CUDA_KIND` or `CPU_KIND`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.kind = CUDA_KIND if self.device.type == "cuda" else CPU_KIND
        self.peak_bytes = 0
        self._base = 0
        self._mode: Optional[LiveTensorBytes] = None

    def start(self) -> "TensorPeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = LiveTensorBytes()
            self._mode.__enter__()
        return self

    def live_bytes(self) -> int:
        """Bytes allocated since `start` that are still alive."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) - self._base
        return self._mode.live if self._mode is not None else 0

    def peak_so_far(self) -> int:
        """The peak since `start` (or the last `reset_peak`), above the baseline."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        return self._mode.peak if self._mode is not None else self.peak_bytes

    def reset_peak(self) -> None:
        """Start a new peak from what is allocated now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._mode is not None:
            self._mode.reset_peak()

    def stop(self) -> int:
        self.peak_bytes = self.peak_so_far()
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        return self.peak_bytes

    def __enter__(self) -> "TensorPeak":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand freed memory back (CUDA cache, glibc arenas) before a baseline."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
