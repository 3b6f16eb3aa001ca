"""Median-of-repeats timing with warmup, interleaved across cases, and peak memory.

CUDA: each run is timed with a pair of ``torch.cuda.Event`` and the peak is
``torch.cuda.max_memory_allocated`` above what was allocated before the first run.
CPU: ``time.perf_counter`` and the peak resident set size above the RSS before the first run
(Linux: the kernel's high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs``;
elsewhere ``resource.getrusage``, whose high-water mark cannot be reset, so it reads 0 unless the
runs set a new process-wide peak).
"""
from __future__ import annotations

import ctypes
import gc
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

MIB = 1024 * 1024
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass
class Measurement:
    """Timings (ms) of the repeated runs and their peak memory (MiB above the baseline)."""

    times_ms: List[float]
    peak_mem_mb: float
    mem_kind: str

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)


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


def _status_kib(key: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            match = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _maxrss_kib() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # macOS reports bytes


class PeakMemory:
    """Peak memory above the baseline taken at `start`, in MiB, on one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ""
        self._base = 0

    def start(self) -> None:
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_max_allocated"
        elif _status_kib("VmRSS") is not None and _reset_rss_peak():
            self._base = _status_kib("VmRSS") * 1024
            self.kind = "cpu_peak_rss"
        else:
            self._base = _maxrss_kib() * 1024
            self.kind = "cpu_maxrss_unresettable"

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "cpu_peak_rss":
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = _maxrss_kib() * 1024
        return max(0.0, (peak - self._base) / MIB)


class Timer:
    """Wall time of one region: CUDA events on a CUDA device, perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "Timer":
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = (time.perf_counter() - self._t0) * 1000.0


def measure_interleaved(cases: Dict[str, Tuple[Callable[[], None], Optional[Callable[[], None]]]],
                        device: torch.device, warmup: int, repeats: int) -> Dict[str, Measurement]:
    """Time several ``(run, setup)`` cases round-robin, so that load that comes and goes on a
    shared machine falls on every case alike; returns a `Measurement` per case.

    Each case first runs ``warmup`` times alone, untimed. Then ``repeats`` rounds each time every
    case once, starting each round at a different case. ``setup`` runs, untimed, before every
    call of ``run``. The peak memory is that of one run (setup included) above what was allocated
    just before it: the last warmup run (after one-time allocations such as the BLAS workspace),
    or the first timed run when ``warmup`` is 0.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"measure_interleaved needs warmup >= 0 and repeats >= 1, got "
                         f"warmup={warmup}, repeats={repeats}")
    names = list(cases)
    peaks: Dict[str, Tuple[float, str]] = {}
    times: Dict[str, List[float]] = {name: [] for name in names}

    def call(name: str, timed: bool, track_peak: bool) -> None:
        run, setup = cases[name]
        peak = PeakMemory(device) if track_peak else None
        if peak is not None:
            peak.start()
        if setup is not None:
            setup()
        if timed:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            with Timer(device) as timer:
                run()
            times[name].append(timer.ms)
        else:
            run()
        if peak is not None:
            peaks[name] = (peak.peak_mb(), peak.kind)

    for name in names:
        for i in range(warmup):
            call(name, timed=False, track_peak=i == warmup - 1)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            call(name, timed=True, track_peak=warmup == 0 and round_index == 0)
    return {name: Measurement(times_ms=times[name], peak_mem_mb=peaks[name][0],
                              mem_kind=peaks[name][1]) for name in names}
