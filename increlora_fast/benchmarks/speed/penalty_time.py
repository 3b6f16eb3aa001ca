"""Time of the orthogonal penalty's forward and backward: its Triton kernels (one launch each
over every module) against its torch path (A and B stacked per shape group), on the IncreLoRA
model of a preset after the budget.

Decides whether the kernels, the CUDA default since 2026-12-05, earn it there: they have never
run on a GPU before. Per way, per call (``regularization_loss()`` and its backward, the
gradients set to None first): the host's issue time (the device idle before it) and the time
until the device is done, and the Triton launches and aten ops it issues. On CPU the kernels run
under the Triton interpreter: that drives the code only, and its times mean nothing.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, Iterator, List

import torch

from ...training.device import wait_for_device
from .optimizer_host import CPU_NOTE
from .plans import ModelPlan
from .replaced import replaced

LEVEL = "penalty_time"
# (method name, the kernels allowed)
MODES = (("kernels", True), ("stacked", False))
NOTE = ("regularization_loss() and its backward: host = issue time with the device idle "
        "before it; total = until the device is done")


@contextlib.contextmanager
def penalty_path(kernels: bool) -> Iterator[None]:
    """Within the block the penalty takes its kernels wherever they may run (on CPU too, under
    the interpreter) when ``kernels``, else its torch path."""
    from ... import functional

    with replaced(functional, "penalty_on_triton", lambda lora_A: kernels):
        yield


def measure_penalty_time(preset_name: str, plan: ModelPlan, device: torch.device,
                         env: Dict[str, object], repeats: int = 50) -> List[dict]:
    """One record per way of `MODES`: median and minimum µs of host time and of total time
    per penalty forward and backward, its Triton launches and aten ops, on
    ``preset_name``'s IncreLoRA model (built and trained per ``plan`` until the budget is
    reached). A way that does not run as named (the kernels' first-use check failed, so the
    torch path ran) is recorded as failed, untimed, and the other is still timed."""
    from ...kernels.launches import reset_launch_counts, total_launches
    from .model_level import prepare_run, step_past_allocation
    from .step_host import _AtenOps

    if repeats < 1:
        raise ValueError(f"penalty time: repeats={repeats} must be >= 1")

    run, batches = prepare_run("increlora-triton", preset_name, plan, device)
    step_past_allocation(run, batches, 2)
    controller = run.method.controller
    params = [p for layer in controller.layers for p in (layer.lora_A, layer.lora_B)]

    def call() -> None:
        for p in params:
            p.grad = None
        controller.regularization_loss().backward()

    counts: Dict[str, Dict[str, int]] = {}
    failed: Dict[str, str] = {}  # a way that did not run as named: not timed, the other still is
    for name, kernels in MODES:
        with penalty_path(kernels):
            for _ in range(3):  # the tables, masks and kernels built
                call()
            wait_for_device(device)
            reset_launch_counts()
            with _AtenOps() as ops:
                call()
            counts[name] = dict(launches_per_call=total_launches(),
                                aten_ops_per_call=ops.count)
            if (counts[name]["launches_per_call"] > 0) != kernels:
                failed[name] = (f"the {name} way launched {counts[name]['launches_per_call']} "
                                "Triton kernels" + (" (their first-use check failed and the "
                                                    "torch path ran: see its warning)"
                                                    if kernels else ""))
    timed = [(name, kernels) for name, kernels in MODES if name not in failed]
    host: Dict[str, List[float]] = {name: [] for name, _ in timed}
    total: Dict[str, List[float]] = {name: [] for name, _ in timed}
    for _ in range(repeats):  # interleaved: drift hits both alike
        for name, kernels in timed:
            with penalty_path(kernels):
                wait_for_device(device)
                start = time.perf_counter()
                call()
                issued = time.perf_counter()
                wait_for_device(device)
                done = time.perf_counter()
            host[name].append((issued - start) * 1e6)
            total[name].append((done - start) * 1e6)
    for p in params:
        p.grad = None
    note = NOTE if device.type == "cuda" else f"{NOTE}; {CPU_NOTE}"
    return [dict(env, level=LEVEL, status="failed", method=name, model=preset_name,
                 modules=len(controller.layers), **counts[name], note=f"{failed[name]}; {note}")
            if name in failed else
            dict(env, level=LEVEL, status="ok", method=name, model=preset_name,
                 modules=len(controller.layers), **counts[name],
                 host_median_us=statistics.median(host[name]), host_min_us=min(host[name]),
                 median_us=statistics.median(total[name]), min_us=min(total[name]),
                 repeats=repeats, note=note)
            for name, _ in MODES]
