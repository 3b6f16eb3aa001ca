"""The memory breakdown checked against reality: its IncreLoRA total next to the peak of a real
README-style training loop of the same model and size, on CPU or on a GPU."""
from __future__ import annotations

from typing import Dict

import torch

from ..memory_probe import TensorPeak, release_memory
from .breakdown import TOTAL, TOTAL_DENSE, method_rows
from .compared_methods import AdapterSetting, methods_for
from .model_spec import ModelSpec

DEFAULT_TOLERANCE = 0.03


def loop_peak(spec: ModelSpec, setting: AdapterSetting, batch_size: int, seq_len: int,
              device: torch.device, steps: int = 3) -> int:
    """Peak tensor bytes of ``steps`` steps of the README's IncreLoRA loop (the one
    `StepRunner`, as `compared_methods.increlora_runner` sets it up, with gradient checkpointing
    when ``setting`` asks for it, as the breakdown measures its step), everything (model, batch,
    optimizer, controller) created inside the measurement."""
    device = torch.device(device)
    release_memory(device)
    torch.manual_seed(0)
    with TensorPeak(device) as peak:
        runner = methods_for(setting)[0].build(spec.build(device), setting)
        batch = spec.batch(batch_size, seq_len, device, seed=1)
        for step in range(steps):
            runner.forward_backward(batch, step)
            runner.update(step)
        del runner, batch
    release_memory(device)
    return peak.peak_bytes


def check_total(spec: ModelSpec, setting: AdapterSetting, batch_size: int, seq_len: int,
                device: torch.device, tolerance: float = DEFAULT_TOLERANCE,
                estimate: bool = False) -> Dict[str, object]:
    """{"predicted", "measured", "rel_err", "tol", "ok", "kind"}: the breakdown's IncreLoRA
    ``total peak`` (with ``setting.exact_step_score``, its exact-step total) against `loop_peak`
    at the same size on ``device``."""
    device = torch.device(device)
    rows = method_rows(methods_for(setting)[0], spec, setting, batch_size, seq_len, device,
                       estimate=estimate)
    total = TOTAL_DENSE if setting.exact_step_score else TOTAL
    predicted = next(r["bytes"] for r in rows if r["component"] == total)
    measured = loop_peak(spec, setting, batch_size, seq_len, device)
    rel = abs(predicted - measured) / max(1, measured)
    return {"predicted": predicted, "measured": measured, "rel_err": rel, "tol": tolerance,
            "ok": rel <= tolerance, "kind": TensorPeak(device).kind}
