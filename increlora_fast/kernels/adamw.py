"""Fused masked AdamW step for slot buffers, per-slot lr and step count: one kernel per tensor
(`masked_adamw_triton_`), or one launch over many tensors (`MultiTensorAdamW`).

Same math and arguments as `increlora_fast.optim_functional.masked_adamw_torch_`. Elements of a
masked-out slot, or of a slot whose step count (this step included) is below 1, are neither
loaded nor stored, so they stay bitwise unchanged, moments included.
One pass over param, grad and both moments. The bias corrections follow the reference's float32
``1 - beta**n``: the power is taken in float64 from the float32 beta (step counts are integers),
rounded to float32 and subtracted from 1 in float32 (1 - beta2**n cancels, so a power one ulp
off would show).
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

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
def _step_elements(p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, lr_ptr, count_ptr, offs, n_elements,
                   inner, n_slots, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                   weight_decay):
    """One AdamW step on the elements ``offs`` of one tensor; element i belongs to slot
    (i // inner) % n_slots, whose mask, lr and step count are at ``slot`` of their pointers.
    A slot masked out or of step count below 1 (changed at this step: no step, no weight decay)
    is neither loaded nor stored."""
    in_range = offs < n_elements
    slot = (offs // inner) % n_slots
    on = tl.load(mask_ptr + slot, mask=in_range, other=0) != 0
    upd = in_range & on
    lr = tl.load(lr_ptr + slot, mask=upd, other=0.0).to(tl.float32)
    n = tl.load(count_ptr + slot, mask=upd, other=1.0).to(tl.float32)
    upd = upd & (n >= 1.0)
    n = tl.maximum(n, 1.0)
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


@triton.jit
def _masked_adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, lr_ptr, count_ptr,
    n_elements, inner, n_slots,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
    BLOCK: tl.constexpr,
):
    """One AdamW step on BLOCK elements of one tensor."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _step_elements(p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, lr_ptr, count_ptr, offs, n_elements,
                   inner, n_slots, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                   weight_decay)


@triton.jit
def _masked_adamw_multi_kernel(
    table_ptr, owner_ptr, mask_ptr, lr_ptr, p_ref, g_ref, m_ref, v_ref,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
    ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    """One AdamW step on BLOCK elements of one of many tensors of one dtype combination.

    Program i steps block i - first_block of tensor ``owner[i]``, whose row of the int64 table
    holds (see `TABLE_COLUMNS`) the addresses of its param, grad, moments and step counts, its
    element count, slot stride and slot count, and the offset of its slots in the flat mask and
    lr vectors. ``*_ref``: tensors of each dtype, for their pointer types only."""
    pid = tl.program_id(0)
    row = table_ptr + tl.load(owner_ptr + pid).to(tl.int64) * ROW
    p_ptr = tl.load(row + 0).to(p_ref.dtype)
    g_ptr = tl.load(row + 1).to(g_ref.dtype)
    m_ptr = tl.load(row + 2).to(m_ref.dtype)
    v_ptr = tl.load(row + 3).to(v_ref.dtype)
    count_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    slot_offset = tl.load(row + 8)
    offs = (pid - tl.load(row + 9)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _step_elements(p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr + slot_offset, lr_ptr + slot_offset,
                   count_ptr, offs, tl.load(row + 5), tl.load(row + 6), tl.load(row + 7),
                   beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay)


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


def check_flat_grad(who: str, grad: torch.Tensor) -> None:
    """The one check a kept launch makes of a gradient, which autograd allocates anew each
    step: contiguous, since the kernel reads it as a flat array; ValueError naming ``who``."""
    if not grad.is_contiguous():
        raise ValueError(f"{who}: a gradient of shape {tuple(grad.shape)} is not contiguous "
                         f"(strides {grad.stride()}); the fused kernel reads it as a flat array")


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
    learning rate per slot, ``slot_count`` (r,) Adam step count per slot including this step
    (a slot of count below 1 is left unchanged, as a masked-out one), ``slot_dim`` the
    dimension of ``param`` indexing slots. param, grad and moments must be contiguous and of
    one shape; float32 math, results written in each tensor's dtype.
    """
    check_masked_adamw_args(param, grad, exp_avg, exp_avg_sq, slot_mask, slot_lr, slot_count,
                            slot_dim, beta1, beta2)
    launch_masked_adamw_(adamw_launch(param, slot_dim), param, grad, exp_avg, exp_avg_sq,
                         slot_mask.contiguous().view(torch.uint8), slot_lr.contiguous(),
                         slot_count.contiguous(), beta1, beta2, eps, weight_decay)


# The columns of a `MultiTensorAdamW` table row, one row per tensor (int64).
TABLE_COLUMNS = ("param", "grad", "exp_avg", "exp_avg_sq", "slot_count", "n_elements", "inner",
                 "n_slots", "slot_offset", "first_block")


class _Group(NamedTuple):
    """The tensors of one dtype combination: their rows, and which of them each program steps."""

    rows: List[int]      # indices into the tensors of the `MultiTensorAdamW`
    owner: torch.Tensor  # (programs,) int32 on the device: the group-local row of each
    host: torch.Tensor   # (rows, 10) int64: the table without the param and grad addresses
    grid: Tuple[int]


class MultiTensorAdamW:
    """The masked AdamW kernel over many tensors of one device in one launch per dtype
    combination of (param, grad, exp_avg, exp_avg_sq), instead of one launch per tensor.

    Built once for a fixed set of tensors: each parameter with its moments, float32 slot step
    counts and the launch constants `adamw_launch` computed for it (over its slot view). Slot i of
    tensor k is entry ``offset_k + i`` of the flat mask and lr vectors a step passes, in the order
    of the tensors. The kernel reads every address from a table on the device. Gradients are
    read from the parameters at each step (autograd makes new ones; this object holds none).
    Each step compares the addresses and dtypes of every tensor with the last step's: the
    table is rebuilt and copied to the device, from pinned memory without blocking, only when
    one changed (between steps of one shape a CUDA caching allocator usually hands the
    gradients the same memory again), and the tensors are grouped again when a parameter,
    moment or count has new data (``.data`` replaced, maybe with another dtype). Not for a CUDA
    graph capture: the copy would be captured with the addresses of that moment
    (`IncreLoRAAdamW` launches per tensor while capturing). The caller checks the arguments
    (`check_masked_adamw_args`) once; a step checks only that each gradient is contiguous.

    ``accepts(dtypes)``: whether a dtype combination may be launched this way (the caller's
    first-use check); where one may not, `step` launches nothing and returns False, as it does
    for CUDA tensors under the Triton interpreter, which copies tensor arguments to the host
    but not the memory the table points to."""

    def __init__(self, params: Sequence[torch.Tensor],
                 moments: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                 counts: Sequence[torch.Tensor], launches: Sequence[AdamWLaunch],
                 accepts: Callable[[tuple], bool] = lambda dtypes: True) -> None:
        self.params = list(params)
        self.moments = list(moments)
        self.counts = list(counts)
        self.launches = list(launches)
        self.accepts = accepts
        self.offsets, offset = [], 0
        for launch in self.launches:
            self.offsets.append(offset)
            offset += launch.n_slots
        self.block = 256 if is_interpreted(_masked_adamw_multi_kernel) else 1024
        # the tensors whose data the table points to besides the gradients, 4 per tensor
        self._kept = [t for p, (m, v), c in zip(self.params, self.moments, self.counts)
                      for t in (p, m, v, c)]
        self._kept_at: List[int] = []
        self._kept_dtypes: List[torch.dtype] = []
        self._grads_at: List[int] = []
        self._groups: Dict[tuple, _Group] = {}
        self._tables: Dict[tuple, torch.Tensor] = {}
        self._usable = False

    def step(self, mask_u8: torch.Tensor, lr: torch.Tensor, beta1: float, beta2: float,
             eps: float, weight_decay: float) -> bool:
        """One step of every tensor: ``mask_u8`` (slots,) the flat slot mask viewed as uint8,
        ``lr`` (slots,) float32 per-slot learning rates, both contiguous on the tensors'
        device. False, with nothing launched, where the tensors' dtypes are not accepted."""
        grads = [p.grad for p in self.params]
        for g in grads:
            check_flat_grad(_OP, g)
        kept_at = [t.data_ptr() for t in self._kept]
        kept_dtypes = [t.dtype for t in self._kept]
        grads_at = [g.data_ptr() for g in grads]
        if kept_at != self._kept_at or kept_dtypes != self._kept_dtypes:
            self._regroup(grads)
            self._grads_at = []  # the tables are rebuilt below
            self._kept_at, self._kept_dtypes = kept_at, kept_dtypes
        if not self._usable:
            return False
        if grads_at != self._grads_at:
            self._refresh(kept_at[::4], grads_at)
            self._grads_at = grads_at
        for key, group in self._groups.items():
            first = group.rows[0]
            m, v = self.moments[first]
            utils.launch(_masked_adamw_multi_kernel, group.grid, self._tables[key], group.owner,
                         mask_u8, lr, self.params[first], grads[first], m, v,
                         beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
                         ROW=len(TABLE_COLUMNS), BLOCK=self.block)
        return True

    def _regroup(self, grads: List[torch.Tensor]) -> None:
        """The tensors grouped by their dtypes (a gradient has its parameter's dtype), each
        group's constant columns read again, and whether every group may be launched."""
        by_dtypes: Dict[tuple, List[int]] = {}
        for k, (p, g, (m, v)) in enumerate(zip(self.params, grads, self.moments)):
            by_dtypes.setdefault((p.dtype, g.dtype, m.dtype, v.dtype), []).append(k)
        device = self.params[0].device
        self._usable = not (device.type == "cuda" and is_interpreted(_masked_adamw_multi_kernel)) \
            and all(self.accepts(key) for key in by_dtypes)
        self._groups = {key: self._group(rows, device) for key, rows in by_dtypes.items()} \
            if self._usable else {}

    def _refresh(self, params_at: List[int], grads_at: List[int]) -> None:
        """The tables of this step's addresses, on the device."""
        self._tables = {}
        for key, group in self._groups.items():
            table = group.host.clone()  # not in place: an earlier copy may still be pending
            table[:, 0] = torch.tensor([params_at[k] for k in group.rows], device="cpu")
            table[:, 1] = torch.tensor([grads_at[k] for k in group.rows], device="cpu")
            if table.device != group.owner.device:  # pinned: copied in order, host not blocked
                table = table.pin_memory().to(group.owner.device, non_blocking=True)
            self._tables[key] = table

    def _group(self, rows: List[int], device: torch.device) -> _Group:
        """Which row each program of a launch over ``rows`` steps (on ``device``), and the
        table's columns that do not change between steps (on the host)."""
        blocks = [-(-self.launches[k].n_elements // self.block) for k in rows]
        first_blocks, total = [], 0
        for n in blocks:
            first_blocks.append(total)
            total += n
        owner = torch.repeat_interleave(
            torch.arange(len(rows), dtype=torch.int32, device="cpu"),
            torch.tensor(blocks, device="cpu"))
        if device.type == "cuda":
            owner = owner.pin_memory().to(device, non_blocking=True)
        host = torch.tensor(
            [[0, 0, self.moments[k][0].data_ptr(), self.moments[k][1].data_ptr(),
              self.counts[k].data_ptr(), self.launches[k].n_elements, self.launches[k].inner,
              self.launches[k].n_slots, self.offsets[k], first]
             for k, first in zip(rows, first_blocks)], dtype=torch.int64, device="cpu")
        return _Group(rows, owner, host, (total,))
