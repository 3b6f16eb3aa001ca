"""Median-of-repeats timing with warmup, interleaved across cases, and peak memory.

CUDA: each run is timed with a pair of ``torch.cuda.Event`` and the peak is
``torch.cuda.max_memory_allocated`` above what was allocated before the first run.
CPU: ``time.perf_counter`` and the peak bytes of live tensor storages above those alive before
the first run (`memory_probe.LiveTensorBytes`: per tensor, not the page-granular RSS).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ...kernels.launches import total_launches
from ..memory_probe import MIB, TensorPeak, release_memory


@dataclass
class Measurement:
    """Timings (ms) of the repeated runs, their peak memory (MiB above the baseline) and the
    Triton kernels the timed runs launched (`kernels.launch_counts`)."""

    times_ms: List[float]
    peak_mem_mb: float
    mem_kind: str
    triton_launches: int = 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)


class PeakMemory:
    """Peak memory above the baseline taken at `start`, in MiB, on one device: per tensor
    (`memory_probe.TensorPeak`: the CUDA allocator's count, or live tensor storages on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ""
        self._probe: Optional[TensorPeak] = None

    def start(self) -> None:
        release_memory(self.device)
        self._probe = TensorPeak(self.device).start()
        self.kind = self._probe.kind

    def peak_mb(self) -> float:
        """The peak since `start`; ends the measurement (call once)."""
        return self._probe.stop() / MIB


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
    or, when ``warmup`` is 0, one more untimed run after the timed ones (no timed run is
    probed: the probe's dispatch mode on CPU, its cache release on CUDA would be in its time).
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"measure_interleaved needs warmup >= 0 and repeats >= 1, got "
                         f"warmup={warmup}, repeats={repeats}")
    names = list(cases)
    peaks: Dict[str, Tuple[float, str]] = {}
    times: Dict[str, List[float]] = {name: [] for name in names}
    launched: Dict[str, int] = {name: 0 for name in names}

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
            before = total_launches()
            with Timer(device) as timer:
                run()
            times[name].append(timer.ms)
            launched[name] += total_launches() - before
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
            call(name, timed=True, track_peak=False)
    if warmup == 0:
        for name in names:
            call(name, timed=False, track_peak=True)
    return {name: Measurement(times_ms=times[name], peak_mem_mb=peaks[name][0],
                              mem_kind=peaks[name][1], triton_launches=launched[name])
            for name in names}
