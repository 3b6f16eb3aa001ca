"""Fused masked AdamW step for slot buffers: one kernel per tensor, per-slot lr and step count.

Same math and arguments as `increlora_fast.optim_functional.masked_adamw_torch_`. Elements of a
masked-out slot are neither loaded nor stored, so they stay bitwise unchanged, moments included.
One pass over param, grad and both moments. The bias corrections follow the reference's float32
``1 - beta**n``: the power is taken in float64 from the float32 beta (step counts are integers),
rounded to float32 and subtracted from 1 in float32 (1 - beta2**n cancels, so a power one ulp
off would show).
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from . import utils
from .utils import check_device, check_dtype, is_interpreted

_OP = "masked_adamw_triton_"


@triton.jit
def _pow(beta, n):
    """float32 ``beta**n`` for integral n in [1, 2**31): binary powering in float64 from the
    float32 beta, then rounded to float32 (float64 multiplies only, no transcendental)."""
    base = (tl.zeros_like(n) + beta).to(tl.float64)
    e = n.to(tl.int32)
    result = tl.full(n.shape, 1.0, tl.float64)
    for _ in tl.static_range(31):
        result = tl.where((e & 1) != 0, result * base, result)
        base = base * base
        e = e >> 1
    return result.to(tl.float32)


@triton.jit
def _masked_adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, lr_ptr, count_ptr,
    n_elements, inner, n_slots,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
    BLOCK: tl.constexpr,
):
    """One AdamW step on BLOCK elements; element i belongs to slot (i // inner) % n_slots."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_elements
    slot = (offs // inner) % n_slots
    on = tl.load(mask_ptr + slot, mask=in_range, other=0) != 0
    upd = in_range & on
    lr = tl.load(lr_ptr + slot, mask=upd, other=0.0).to(tl.float32)
    n = tl.maximum(tl.load(count_ptr + slot, mask=upd, other=1.0).to(tl.float32), 1.0)
    g = tl.load(g_ptr + offs, mask=upd, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=upd, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=upd, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=upd, other=0.0).to(tl.float32)
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    bc1 = 1.0 - _pow(beta1, n)
    bc2 = 1.0 - _pow(beta2, n)
    # _rn: IEEE-rounded division and square root like torch (plain / and sqrt are approximate
    # on NVIDIA GPUs).
    denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
    p = p * (1.0 - lr * weight_decay) - tl.div_rn(lr * tl.div_rn(m, bc1), denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=upd)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=upd)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=upd)


class AdamWLaunch(NamedTuple):
    """What a launch of the kernel on one tensor needs besides its tensors, fixed by its shape
    and slot dimension: computed once (`adamw_launch`), reused at every step."""

    grid: Tuple[int]
    n_elements: int
    inner: int
    n_slots: int
    block: int


def adamw_launch(param: torch.Tensor, slot_dim: int) -> AdamWLaunch:
    """The launch constants of the kernel on ``param`` (``slot_dim`` in range)."""
    slot_dim %= param.dim()
    inner = 1
    for size in param.shape[slot_dim + 1:]:
        inner *= size
    n = param.numel()
    block = 256 if is_interpreted(_masked_adamw_kernel) else 1024
    return AdamWLaunch((-(-n // block),), n, inner, param.shape[slot_dim], block)


def check_masked_adamw_args(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                            exp_avg_sq: torch.Tensor, slot_mask: torch.Tensor,
                            slot_lr: torch.Tensor, slot_count: torch.Tensor, slot_dim: int,
                            beta1: float, beta2: float) -> None:
    """The arguments of `masked_adamw_triton_` are valid for the kernel; raises ValueError or
    TypeError naming the first that is not."""
    tensors = dict(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    for name, t in tensors.items():
        check_dtype(_OP, name, t)
        if t.shape != param.shape:
            raise ValueError(f"{_OP}: {name} has shape {tuple(t.shape)}, param has "
                             f"{tuple(param.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{_OP}: {name} must be contiguous (strides {t.stride()})")
    if not -param.dim() <= slot_dim < param.dim():
        raise ValueError(f"{_OP}: slot_dim={slot_dim} is out of range for a {param.dim()}-D param")
    r = param.shape[slot_dim]
    for name, t in (("slot_mask", slot_mask), ("slot_lr", slot_lr), ("slot_count", slot_count)):
        if tuple(t.shape) != (r,):
            raise ValueError(f"{_OP}: {name} must have shape ({r},), got {tuple(t.shape)}")
    if slot_mask.dtype != torch.bool:
        raise TypeError(f"{_OP}: slot_mask must be bool, got {slot_mask.dtype}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{_OP}: {name}={b} must lie in [0, 1)")
    check_device(_masked_adamw_kernel, _OP, slot_mask=slot_mask, slot_lr=slot_lr,
                 slot_count=slot_count, **tensors)


def launch_masked_adamw_(launch: AdamWLaunch, param: torch.Tensor, grad: torch.Tensor,
                         exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         slot_mask_u8: torch.Tensor, slot_lr: torch.Tensor,
                         slot_count: torch.Tensor, beta1: float, beta2: float, eps: float,
                         weight_decay: float) -> None:
    """The kernel on arguments `check_masked_adamw_args` accepted (``slot_mask_u8``: the bool
    mask viewed as uint8; ``slot_lr`` and ``slot_count`` contiguous) with the constants
    `adamw_launch` computed for ``param``: no checks, for a caller that validated once and
    steps the same tensors again (`IncreLoRAAdamW`)."""
    utils.launch(_masked_adamw_kernel, launch.grid,
                 param, grad, exp_avg, exp_avg_sq, slot_mask_u8, slot_lr, slot_count,
                 launch.n_elements, launch.inner, launch.n_slots,
                 beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
                 BLOCK=launch.block)


@torch.no_grad()
def masked_adamw_triton_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                         exp_avg_sq: torch.Tensor, slot_mask: torch.Tensor, slot_lr: torch.Tensor,
                         slot_count: torch.Tensor, slot_dim: int, beta1: float, beta2: float,
                         eps: float, weight_decay: float) -> None:
    """One AdamW step on the slots where ``slot_mask`` is true, in place, in one Triton kernel.

    Arguments and math as `masked_adamw_torch_`: ``slot_mask`` (r,) bool, ``slot_lr`` (r,)
    learning rate per slot, ``slot_count`` (r,) Adam step count per slot including this step,
    ``slot_dim`` the dimension of ``param`` indexing slots. param, grad and moments must be
    contiguous and of one shape; float32 math, results written in each tensor's dtype.
    """
    check_masked_adamw_args(param, grad, exp_avg, exp_avg_sq, slot_mask, slot_lr, slot_count,
                            slot_dim, beta1, beta2)
    launch_masked_adamw_(adamw_launch(param, slot_dim), param, grad, exp_avg, exp_avg_sq,
                         slot_mask.contiguous().view(torch.uint8), slot_lr.contiguous(),
                         slot_count.contiguous(), beta1, beta2, eps, weight_decay)
