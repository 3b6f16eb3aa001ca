"""Host time of one `IncreLoRAAdamW.step`: its launch over many tensors against one launch per
tensor, on the IncreLoRA model of a preset after the budget.

On a GPU this measures what no CPU run can: Triton's own launcher per launch. The two ways step
the same tensors with the same kernel code; the per-tensor way is what a captured step and a
failed first-use check use. Each timed call starts with the device idle (synchronised before,
not after), so the time is the host's issue time: launches are asynchronous. The gradients
stay in place between steps, so the table of addresses is not rebuilt (the usual case on a GPU,
whose caching allocator hands a step's gradients the same memory again). On CPU the fused
kernels run under the Triton interpreter (`step_host.fused_optimizer_on_cpu`): that drives the
code only, and its times mean nothing.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, Iterator, List

import torch

from ...training.device import wait_for_device
from .plans import ModelPlan
from .replaced import replaced

LEVEL = "optimizer_host"
# (method name, the launch over many tensors allowed)
MODES = (("many tensors", True), ("per tensor", False))
NOTE = ("host time to issue one optimizer step, the device idle before it (launches are "
        "asynchronous); the gradients in place, so no table is rebuilt")
CPU_NOTE = "on CPU the kernels run under the Triton interpreter: the times say nothing"


@contextlib.contextmanager
def per_tensor_launches() -> Iterator[None]:
    """Within the block `IncreLoRAAdamW` launches its kernel once per tensor, as in a captured
    step or where the launch over many tensors failed its first-use check."""
    from ...kernels.adamw import MultiTensorAdamW

    with replaced(MultiTensorAdamW, "step", lambda self, *args, **kwargs: False):
        yield


def measure_optimizer_host(preset_name: str, plan: ModelPlan, device: torch.device,
                           env: Dict[str, object], repeats: int = 50) -> List[dict]:
    """One record per way of `MODES`: median and minimum µs of host time per
    ``optimizer.step()`` and its Triton launches, on ``preset_name``'s IncreLoRA model (built
    and trained per ``plan`` until the budget is reached); the per-tensor record adds the host
    time per launch saved."""
    from ...kernels.launches import reset_launch_counts, total_launches
    from .model_level import prepare_run, step_past_allocation
    from .step_host import fused_optimizer_on_cpu

    if repeats < 1:
        raise ValueError(f"optimizer host time: repeats={repeats} must be >= 1")

    with contextlib.ExitStack() as stack:
        if device.type != "cuda":  # on CUDA the fused kernels are the default
            stack.enter_context(fused_optimizer_on_cpu())
        run, batches = prepare_run("increlora-triton", preset_name, plan, device)
        step_past_allocation(run, batches, 2)
        model, optimizer = run.method.model, run.method.optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:  # small, so that the steps move the weights little
                p.grad = torch.randn_like(p) * 1e-3
        launches: Dict[str, int] = {}
        times: Dict[str, List[float]] = {name: [] for name, _ in MODES}

        def way(many: bool):
            return contextlib.nullcontext() if many else per_tensor_launches()
        for name, many in MODES:
            with way(many):
                for _ in range(3):  # the plan, the table, the kernels built
                    optimizer.step()
                wait_for_device(device)
                reset_launch_counts()
                optimizer.step()
                launches[name] = total_launches()
        for _ in range(repeats):  # interleaved: drift hits both alike
            for name, many in MODES:
                with way(many):
                    wait_for_device(device)
                    start = time.perf_counter()
                    optimizer.step()
                    times[name].append((time.perf_counter() - start) * 1e6)
        wait_for_device(device)
    medians = {name: statistics.median(t) for name, t in times.items()}
    records = [dict(env, level=LEVEL, status="ok", method=name, model=preset_name,
                    tensors=len(params), launches_per_step=launches[name],
                    median_us=medians[name], min_us=min(times[name]), repeats=repeats,
                    note=NOTE if device.type == "cuda" else f"{NOTE}; {CPU_NOTE}")
               for name, _ in MODES]
    saved = launches["per tensor"] - launches["many tensors"]
    records[1]["us_per_launch_saved"] = (
        (medians["per tensor"] - medians["many tensors"]) / saved if saved > 0 else None)
    return records
