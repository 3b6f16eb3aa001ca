"""Host-side helpers shared by the kernel modules: dtypes of a launch, block sizes, checks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .launches import count_launch

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
SUPPORTED_DTYPES = tuple(TL_DTYPES)
# Smallest tile edge tl.dot accepts.
MIN_BLOCK = 16


@dataclass(frozen=True)
class DotConfig:
    """The constexpr dtypes of a launch.

    op: dtype the tl.dot operands are rounded to (the compute dtype of the op).
    dot: dtype actually fed to tl.dot; equals ``op`` except for bfloat16 under the interpreter,
        whose tl.dot multiplies bfloat16 bit patterns (triton-lang/triton#11584), so the operands,
        already rounded to bfloat16, are widened to float32 there.
    acc: accumulator dtype (float64 for float64 inputs, float32 otherwise).
    precision: tl.dot input precision; fp32 follows ``torch.backends.cuda.matmul.allow_tf32``.
    """

    op: tl.dtype
    dot: tl.dtype
    acc: tl.dtype
    acc_torch: torch.dtype
    precision: str


def is_interpreted(kernel) -> bool:
    """True when the jit function was built by the Triton interpreter (TRITON_INTERPRET=1)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel, op_name: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors share one device the kernel can run on; returns that device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) != 1:
        found = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"{op_name}: all tensors must be on one device, got {found}")
    device = devices.pop()
    if device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(f"{op_name}: Triton kernels run on CUDA tensors, got {device}; to run "
                           f"them on CPU set TRITON_INTERPRET=1 before importing "
                           f"increlora_fast.kernels modules, or use INCRELORA_BACKEND=torch")
    return device


def check_dtype(op_name: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in TL_DTYPES:
        raise TypeError(f"{op_name}: {name} has dtype {t.dtype}; supported: "
                        f"{[str(d) for d in SUPPORTED_DTYPES]}")


def compute_dtype(device: torch.device, *tensors: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for ``device``, else the promoted input dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def dot_config(dtype: torch.dtype, interpreted: bool) -> DotConfig:
    op = TL_DTYPES[dtype]
    dot = tl.float32 if (interpreted and dtype == torch.bfloat16) else op
    wide = dtype == torch.float64
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return DotConfig(op=op, dot=dot, acc=tl.float64 if wide else tl.float32,
                     acc_torch=torch.float64 if wide else torch.float32,
                     precision="tf32" if tf32 else "ieee")


def block(n: int, cap: int) -> int:
    """A power-of-two tile edge covering ``n`` when it can, between MIN_BLOCK and ``cap``."""
    return max(MIN_BLOCK, min(cap, triton.next_power_of_2(max(n, 1))))


def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device; a small number under the interpreter so split paths still run."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """Count and launch ``kernel`` on ``grid``; an empty grid launches nothing."""
    if all(g > 0 for g in grid):
        count_launch(kernel.fn.__name__)
        kernel[grid](*args, **kwargs)


def interpreter_active() -> bool:
    """True when this package's Triton kernels were built by the Triton interpreter
    (``TRITON_INTERPRET=1`` set before their modules were first imported), so they run on CPU
    tensors. Imports the kernel modules if nothing has yet."""
    from . import lowrank

    return any(is_interpreted(obj) for obj in vars(lowrank).values())
