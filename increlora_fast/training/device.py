"""Where a fine-tuning run computes and in which precision, and what it measures there.

``--device auto|cpu|cuda|cuda:N``: ``auto`` is the current CUDA device when one is available,
else the CPU. ``--precision auto|fp32|bf16|fp16``: ``auto`` is bf16 autocast on a CUDA device that
supports bfloat16 and fp32 everywhere else (a GPU without bfloat16, such as a V100 or a T4, stays
in fp32 unless fp16 is asked for). ``bf16`` is autocast to bfloat16 (allowed on CPU, where torch
supports it, though slower than fp32 there); ``fp16`` is autocast to float16 with a
``torch.amp.GradScaler`` and needs CUDA. Weights and adapters stay float32 (the optimizer's
master copy); autocast runs the matmuls in the half dtype.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import ContextManager, Dict, Optional, Union

import torch

from ..device_scalar import grad_scaler_scale
from .cuda_graphs import GRAPH_POOL_KIND

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 1024 * 1024
CPU_MEMORY_NOTE = "not measured on cpu (no device allocator; process RSS is not device memory)"


def validate_device_text(text: str) -> None:
    """Reject a ``--device`` value no machine can have (the form only, not the hardware)."""
    value = str(text).strip().lower()
    if value in ("auto", "cpu", "cuda"):
        return
    if value.startswith("cuda:") and value[5:].isdigit():
        return
    raise ValueError(f"--device {text!r} is invalid: use auto, cpu, cuda or cuda:N "
                     "(N a GPU index, e.g. cuda:0)")


def resolve_device(text: str, cuda_available: Optional[bool] = None,
                   device_count: Optional[int] = None) -> torch.device:
    """The ``torch.device`` of ``--device text`` on this machine.

    ``cuda_available`` and ``device_count`` default to what torch reports (tests pass fakes;
    with fakes, ``auto`` and ``cuda`` mean device 0, otherwise the current CUDA device).
    Raises ValueError, naming the option, for a malformed value or a CUDA device that does not
    exist here.
    """
    validate_device_text(text)
    value = str(text).strip().lower()
    real = cuda_available is None and device_count is None
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if value == "cpu" or (value == "auto" and not cuda_available):
        return torch.device("cpu")
    if not cuda_available:
        built = "built with" if torch.version.cuda else "built without"
        raise ValueError(f"--device {text}: CUDA is not available here (torch "
                         f"{torch.__version__}, {built} CUDA); use --device cpu or auto")
    if device_count is None:
        device_count = torch.cuda.device_count()
    if ":" in value:
        index = int(value.split(":", 1)[1])
    else:
        index = torch.cuda.current_device() if real else 0
    if index >= device_count:
        raise ValueError(f"--device {text}: there is no CUDA device {index} (this machine has "
                         f"{device_count}: cuda:0..cuda:{device_count - 1})")
    return torch.device("cuda", index)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively (CUDA compute capability 8.0+)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(text: str, device: torch.device,
                      bf16_ok: Optional[bool] = None) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``--precision text`` on ``device``.

    ``bf16_ok`` defaults to `bf16_supported` (tests pass a fake capability). Raises ValueError
    for an unknown value, for fp16 off CUDA, and for bf16 on a GPU without bfloat16.
    """
    value = str(text).strip().lower()
    if value not in PRECISIONS:
        raise ValueError(f"--precision {text!r} is invalid: use one of {list(PRECISIONS)}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: only cpu and cuda devices are supported")
    if bf16_ok is None:
        bf16_ok = bf16_supported(device)
    if value == "auto":
        return "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if value == "fp16" and device.type != "cuda":
        raise ValueError(f"--precision fp16 needs a CUDA device (fp16 training needs loss "
                         f"scaling, which this runs on GPUs only); on {device.type} use fp32 or "
                         "bf16")
    if value == "bf16" and device.type == "cuda" and not bf16_ok:
        raise ValueError(f"--precision bf16: {device} has no native bfloat16 (compute "
                         "capability below 8.0); use fp16 or fp32")
    return value


@dataclass
class Placement:
    """The device and precision of a run: moves batches, opens autocast, scales fp16 losses."""

    device: torch.device
    precision: str

    def __post_init__(self) -> None:
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if self.precision == "fp16" else None)

    @classmethod
    def from_text(cls, device: str = "auto", precision: str = "auto") -> "Placement":
        """Resolve ``--device`` and ``--precision`` on this machine."""
        dev = resolve_device(device)
        return cls(dev, resolve_precision(precision, dev))

    def autocast(self) -> ContextManager:
        """Autocast to the half dtype, or nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=HALF_DTYPES[self.precision])

    def to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The batch on the device; to CUDA from pinned host memory without waiting
        (``non_blocking``). Tensors already on the device are returned as they are."""
        if self.device.type != "cuda":
            return {k: v if v.device == self.device else v.to(self.device)
                    for k, v in batch.items()}
        return {k: (v.pin_memory() if v.device.type == "cpu" and not v.is_pinned() else v)
                .to(self.device, non_blocking=True) for k, v in batch.items()}

    @property
    def loss_scale(self) -> Union[float, torch.Tensor]:
        """The factor the loss is multiplied by before backward: 1.0 without a scaler, else the
        scaler's scale as a 0-d device tensor, not read on the host (`grad_scaler_scale`)."""
        return grad_scaler_scale(self.scaler) if self.scaler is not None else 1.0

    def describe(self) -> str:
        """E.g. ``cuda:0 (NVIDIA H100 80GB HBM3), bf16 autocast`` or ``cpu, fp32``."""
        where = str(self.device)
        if self.device.type == "cuda":
            where += f" ({torch.cuda.get_device_name(self.device)})"
        return f"{where}, {self.precision}" + (" autocast" if self.precision != "fp32" else "")


def wait_for_device(device: torch.device) -> None:
    """Wait until the work queued on ``device`` is done (CPU work is done when issued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak device memory of a run (CUDA only), after collecting the
    garbage an earlier run in this process left (a model held only by reference cycles would
    otherwise count in this run's peak)."""
    if device.type == "cuda":
        gc.collect()
        wait_for_device(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device, graph_pool_bytes: int = 0) -> Dict[str, object]:
    """``peak_device_memory_mb`` (``torch.cuda.max_memory_allocated`` since
    `reset_peak_memory`, plus ``graph_pool_bytes``: a CUDA-graphed run's graph pools,
    `GraphedSteps.pool_bytes`, an upper bound then; MiB; None on CPU) and
    ``peak_device_memory_kind`` saying which."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) + graph_pool_bytes
        kind = "torch.cuda.max_memory_allocated" + (GRAPH_POOL_KIND if graph_pool_bytes else "")
        return {"peak_device_memory_mb": round(peak / MIB, 1), "peak_device_memory_kind": kind}
    return {"peak_device_memory_mb": None, "peak_device_memory_kind": CPU_MEMORY_NOTE}


def tokens_per_second(tokens: int, seconds: float) -> Optional[float]:
    """Training tokens (non-padding) per second of training; None before any time passed."""
    return round(tokens / seconds, 1) if seconds > 0 else None
