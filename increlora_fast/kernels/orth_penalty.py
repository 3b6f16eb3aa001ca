"""The orthogonal penalty over many slot buffers in one launch forward and one backward
(`OrthPenalty`), with no stacked copy of the A and B matrices.

For each adapted module k with slot buffers A_k (r_k, in) and B_k (out, r_k), slot weights w
(1 where a slot counts in the penalty, else 0) and trainable slots t:

    penalty = scale * sum_k ( ||(w A_k)(w A_k)^T - diag(w)||_F + ||(B_k w)^T (B_k w) - diag(w)||_F )

the same as the stacked torch path of `penalty.OrthogonalPenalty`. Both
sides are one form: X (r, L) read through a slot stride and a long-dimension stride (A: X = A;
B: X = B^T, no copy), M = diag(w) X X^T diag(w) - diag(w) and the term ||M||_F. Its gradient
with respect to row i of X is ``t_i w_i (2 / ||M||_F) sum_j M_ij w_j X_j`` (0 where the norm is
0, as torch's norm backward gives), so the forward keeps ``P = 2 M diag(w) / ||M||_F`` (r x r,
float32) per term and the backward is one small GEMM per tile: ``dX = (g scale) t w (P X)``. The
scale stays out of P: P is rounded to the buffers' dtype for the GEMM, and a small scale (the
controller's weight over twice the modules) would push float16 entries below its normal range.

Forward: one program per (module, side) reads X once in tiles of ``BLOCK_L`` columns and
accumulates the Gram matrix in float32; it writes ``scale * ||M||_F`` and P. A torch ``sum`` of
those terms is the loss. Backward: programs (term, column block) write the gradient of each
buffer into one flat buffer per dtype, returned as views shaped like the buffers. One launch
per adapter dtype, one table of the buffers' addresses on the device (int64, `TABLE_COLUMNS`),
rebuilt only when a buffer moved. The backward reads the tables of its forward and refuses
buffers that moved in between (their old memory may be gone).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import utils
from .utils import check_device, dot_config, is_interpreted

_OP = "orth_penalty_triton"
# Buffer dtypes the kernels take (float32 accumulation; float64 buffers take the torch path).
PENALTY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The columns of a table row, one row per (module, side): the buffer's address, its long
# dimension L, the strides of a slot and of the long dimension (elements), its slot count, the
# row of its slot masks, where its gradient starts in the flat gradient buffer.
TABLE_COLUMNS = ("x", "n_long", "stride_slot", "stride_long", "n_slots", "mask_row",
                 "grad_offset")


@triton.jit
def _row(table_ptr, pid, ROW: tl.constexpr):
    """(address, long size, slot stride, long stride, slot count, mask row, grad offset) of
    row pid."""
    row = table_ptr + pid.to(tl.int64) * ROW
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4), tl.load(row + 5), tl.load(row + 6))


@triton.jit
def _orth_penalty_fwd_kernel(
    table_ptr, mask_ptr, x_ref, term_ptr, p_ptr, scale,
    ROW: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (module, side) term: the float32 Gram matrix of its X over all L, then
    ``scale * ||M||_F`` into ``term[pid]`` and P (without the scale) into ``p[pid]`` (R x R).
    ``mask_ptr``: float32 (rows, 2, R), weights w then trainable flags t. ``x_ref``: a buffer
    of the launch's dtype, for its pointer type only. Rows of slots that do not count are not
    read (whatever they hold, NaN included, adds nothing)."""
    pid = tl.program_id(0)
    address, n_long, stride_s, stride_l, n_slots, mask_row, _ = _row(table_ptr, pid, ROW)
    x_ptr = address.to(x_ref.dtype)
    s = tl.arange(0, R)
    w = tl.load(mask_ptr + mask_row * 2 * R + s)
    s_in = (s < n_slots) & (w != 0.0)
    gram = tl.zeros((R, R), dtype=tl.float32)
    for l0 in range(0, n_long, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        x = tl.load(x_ptr + s[:, None] * stride_s + cols[None, :].to(tl.int64) * stride_l,
                    mask=s_in[:, None] & (cols[None, :] < n_long), other=0.0).to(DOT)
        gram += tl.dot(x, tl.trans(x), input_precision=PRECISION)
    eye = s[:, None] == s[None, :]
    m = gram * w[:, None] * w[None, :] - tl.where(eye, w[:, None], 0.0)
    norm = tl.sqrt(tl.sum(tl.sum(m * m, axis=1), axis=0))
    tl.store(term_ptr + pid, scale * norm)
    coef = tl.where(norm > 0.0, 2.0 / tl.where(norm > 0.0, norm, 1.0), 0.0)
    tl.store(p_ptr + pid.to(tl.int64) * R * R + s[:, None] * R + s[None, :],
             m * (coef * w[None, :]))


@triton.jit
def _orth_penalty_bwd_kernel(
    table_ptr, mask_ptr, x_ref, p_ptr, g_ptr, scale, grad_ptr,
    ROW: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, KC: tl.constexpr,
):
    """Columns [BLOCK_L * program_id(1), ...) of one term's gradient, ``g scale t w (P X)``,
    stored with X's strides at the term's offset of ``grad_ptr`` (the flat gradient buffer of
    the launch's dtype). ``g_ptr``: the 0-d float32 gradient of the loss. Rows of slots that do
    not count are not read; their gradient is 0."""
    pid = tl.program_id(0)
    address, n_long, stride_s, stride_l, n_slots, mask_row, grad_offset = _row(table_ptr, pid,
                                                                             ROW)
    l0 = tl.program_id(1) * BLOCK_L
    if l0 < n_long:
        x_ptr = address.to(x_ref.dtype)
        s = tl.arange(0, R)
        s_in = s < n_slots
        cols = l0 + tl.arange(0, BLOCK_L)
        inside = s_in[:, None] & (cols[None, :] < n_long)
        offs = s[:, None] * stride_s + cols[None, :].to(tl.int64) * stride_l
        # P X over slot chunks of KC: a (R, R) float32 P at once spills at R = 128
        dx = tl.zeros((R, BLOCK_L), dtype=tl.float32)
        for j0 in tl.static_range(0, R, KC):
            j = j0 + tl.arange(0, KC)
            counts = tl.load(mask_ptr + mask_row * 2 * R + j) != 0.0
            x = tl.load(x_ptr + j[:, None] * stride_s + cols[None, :].to(tl.int64) * stride_l,
                        mask=((j < n_slots) & counts)[:, None] & (cols[None, :] < n_long),
                        other=0.0).to(DOT)
            p = tl.load(p_ptr + pid.to(tl.int64) * R * R + s[:, None] * R + j[None, :]).to(DOT)
            dx += tl.dot(p, x, input_precision=PRECISION)
        w = tl.load(mask_ptr + mask_row * 2 * R + s)
        t = tl.load(mask_ptr + mask_row * 2 * R + R + s)
        g = tl.load(g_ptr) * scale
        dx = dx * (g * w * t)[:, None]
        tl.store(grad_ptr + grad_offset + offs, dx.to(grad_ptr.dtype.element_ty), mask=inside)


def penalty_masks(used: Sequence[torch.Tensor], trains: Sequence[torch.Tensor], r: int
                  ) -> torch.Tensor:
    """The (modules, 2, r) float32 mask tensor `OrthPenalty` reads: per module, its slots
    that count in the penalty (``used``, bool (r_k,)) and those whose A row and B column
    train (``trains``), zero-padded to ``r`` (`OrthPenalty.r`)."""
    out = torch.zeros(len(used), 2, r, dtype=torch.float32, device=used[0].device)
    for k, (u, t) in enumerate(zip(used, trains)):
        if u.numel() > r or t.numel() != u.numel():
            raise ValueError(f"penalty_masks: module {k} has {u.numel()} counted and "
                             f"{t.numel()} trained slot flags; both must be one length <= {r}")
        out[k, 0, :u.numel()] = u
        out[k, 1, :t.numel()] = t
    return out


class _Launch(NamedTuple):
    """The terms of one adapter dtype: their rows of the caller's order, the table on the
    device, the grid of the backward, the size of its flat gradient, the dtype fed to tl.dot,
    and the gradient's views: (offset, count, shape, rows) per shape of buffer."""

    rows: List[int]
    table: torch.Tensor
    bwd_grid: Tuple[int, int]
    grad_numel: int
    dot: object
    views: List[Tuple[int, int, torch.Size, List[int]]]


class OrthPenalty:
    """The penalty over a fixed list of (A, B) slot buffers of one device (A (r_k, in_k),
    B (out_k, r_k), contiguous, float32, bfloat16 or float16, r_k <= 128), as a differentiable
    0-d float32 tensor: ``penalty(lora_As, lora_Bs, masks, scale)``. Its backward keeps P, 2 x
    modules x r x r float32 (73 KB on MiniLM-L6 at r 16; 73 MB for 560 modules at r 128).

    The tables are built on first use and rebuilt when a buffer moved or changed dtype (each
    call compares the addresses), copied to the device from pinned memory without blocking.
    `ready` says whether a call would rebuild them; a caller capturing a CUDA graph must not
    rebuild (the copy would be captured), and takes another path then."""

    def __init__(self, r_max: int) -> None:
        self.r = utils.block(r_max, utils.MAX_R_MAX)
        interpreted = is_interpreted(_orth_penalty_fwd_kernel)
        # the forward's columns per step of its sweep
        self.block_l = 64 if self.r <= 32 and not interpreted else 32
        # the backward's columns per program: a (r, BLOCK_L) float32 tile; at r = 128, 32
        # columns spilled in the sm_80-sm_90 builds
        self.bwd_block_l = 32 if interpreted else (64 if self.r <= 32 else 16)
        # the forward's (r, r) float32 Gram accumulator: 64 registers per thread at r = 128
        # with 8 warps
        self.fwd_warps = self.bwd_warps = 8 if self.r >= 64 else 4
        self._at: List[int] = []
        self._dtypes: List[torch.dtype] = []
        self._launches: Dict[torch.dtype, _Launch] = {}

    def ready(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether the tables hold these buffers' current addresses and dtypes."""
        return [t.data_ptr() for t in tensors] == self._at and \
            [t.dtype for t in tensors] == self._dtypes

    def __call__(self, lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor],
                 masks: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale * sum`` of the modules' two terms; ``masks`` from `penalty_masks` with
        ``r = self.r``, on the buffers' device."""
        tensors = list(lora_As) + list(lora_Bs)
        if not self.ready(tensors):
            self._build(tensors)
        if masks.shape != (len(lora_As), 2, self.r) or masks.dtype != torch.float32:
            raise ValueError(f"{_OP}: masks must be float32 of shape ({len(lora_As)}, 2, "
                             f"{self.r}) (`penalty_masks`), got {masks.dtype} "
                             f"{tuple(masks.shape)}")
        return _OrthPenaltyFn.apply(self, masks, float(scale), *tensors)

    def _build(self, tensors: List[torch.Tensor]) -> None:
        n = len(tensors) // 2
        for k, x in enumerate(tensors):
            if x.dtype not in PENALTY_DTYPES:
                raise TypeError(f"{_OP}: slot buffers must be one of "
                                f"{[str(d) for d in PENALTY_DTYPES]}, got {x.dtype}")
            if not x.is_contiguous() or x.dim() != 2:
                raise ValueError(f"{_OP}: slot buffer {k % n} ({'A' if k < n else 'B'}) must be "
                                 f"a contiguous matrix, got shape {tuple(x.shape)} strides "
                                 f"{x.stride()}")
            r = x.shape[0] if k < n else x.shape[1]
            if r > self.r:
                raise ValueError(f"{_OP}: {r} slots exceed the {self.r} this penalty was built "
                                 f"for")
        check_device(_orth_penalty_fwd_kernel, _OP,
                     **{f"buffer{k}": x for k, x in enumerate(tensors)})
        rows_by_dtype: Dict[torch.dtype, List[int]] = {}
        for k, x in enumerate(tensors):
            rows_by_dtype.setdefault(x.dtype, []).append(k)
        interpreted = is_interpreted(_orth_penalty_fwd_kernel)
        self._launches = {dtype: self._launch(tensors, rows, n, interpreted)
                          for dtype, rows in rows_by_dtype.items()}
        self._at = [t.data_ptr() for t in tensors]
        self._dtypes = [t.dtype for t in tensors]

    def _launch(self, tensors: List[torch.Tensor], rows: List[int], n: int,
                interpreted: bool) -> _Launch:
        """The launch over ``rows`` (buffers of one dtype; the first ``n`` of ``tensors`` are
        A, the rest B). Their gradients lie in one flat buffer, those of one shape side by
        side, so that the backward returns them with one ``unbind`` per shape."""
        by_shape: Dict[torch.Size, List[int]] = {}
        for k in rows:
            by_shape.setdefault(tensors[k].shape, []).append(k)
        offsets, views, offset = {}, [], 0
        for shape, ks in by_shape.items():
            views.append((offset, len(ks), shape, ks))
            for k in ks:
                offsets[k] = offset
                offset += shape.numel()
        table, longest = [], 1
        for k in rows:
            x = tensors[k]
            if k < n:   # A (r, in): slot stride in, long stride 1
                r, n_long, stride_s, stride_l = x.shape[0], x.shape[1], x.shape[1], 1
            else:       # B (out, r) read as B^T: slot stride 1, long stride r
                r, n_long, stride_s, stride_l = x.shape[1], x.shape[0], 1, x.shape[1]
            table.append([x.data_ptr(), n_long, stride_s, stride_l, r, k % n, offsets[k]])
            longest = max(longest, n_long)
        host = torch.tensor(table, dtype=torch.int64, device="cpu")
        device = tensors[0].device
        if device.type == "cuda":
            host = host.pin_memory().to(device, non_blocking=True)
        return _Launch(rows, host, (len(rows), -(-longest // self.bwd_block_l)), offset,
                       dot_config(tensors[rows[0]].dtype, interpreted).dot, views)

    def forward_terms(self, masks: torch.Tensor, scale: float, tensors: Sequence[torch.Tensor]
                      ) -> Tuple[torch.Tensor, "_Saved"]:
        """(the loss, what the backward needs): one forward launch per dtype."""
        terms = torch.empty(len(tensors), dtype=torch.float32, device=masks.device)
        p_of = {}
        start = 0
        for dtype, launch in self._launches.items():
            p = torch.empty(len(launch.rows), self.r, self.r, dtype=torch.float32,
                            device=masks.device)
            utils.launch(_orth_penalty_fwd_kernel, (len(launch.rows),), launch.table, masks,
                         tensors[launch.rows[0]], terms[start:], p, scale,
                         ROW=len(TABLE_COLUMNS), R=self.r, BLOCK_L=self.block_l, DOT=launch.dot,
                         PRECISION="ieee", num_warps=self.fwd_warps)
            p_of[dtype] = p
            start += len(launch.rows)
        return terms.sum(), _Saved(self._launches, self._at, p_of, scale)

    def backward_grads(self, masks: torch.Tensor, saved: "_Saved", grad: torch.Tensor,
                       tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The gradient of every buffer, as views of one flat buffer per dtype, from the
        tables of the forward (`_Saved`); RuntimeError if a buffer moved since."""
        if [t.data_ptr() for t in tensors] != saved.at:
            raise RuntimeError(f"{_OP}: a slot buffer was given new memory (.data replaced, "
                               f"Module.to) between the penalty's forward and its backward; "
                               f"compute the penalty again after moving the model")
        grads: List[torch.Tensor] = [None] * len(tensors)
        g = grad.to(torch.float32).contiguous()
        for dtype, launch in saved.launches.items():
            out = torch.empty(launch.grad_numel, dtype=dtype, device=masks.device)
            utils.launch(_orth_penalty_bwd_kernel, launch.bwd_grid, launch.table, masks,
                         tensors[launch.rows[0]], saved.p[dtype], g, saved.scale, out,
                         ROW=len(TABLE_COLUMNS), R=self.r, BLOCK_L=self.bwd_block_l,
                         DOT=launch.dot, PRECISION="ieee", KC=min(self.r, 32),
                         num_warps=self.bwd_warps)
            for offset, count, shape, ks in launch.views:
                part = out[offset:offset + count * shape.numel()].view(count, *shape)
                for k, view in zip(ks, part.unbind(0)):
                    grads[k] = view
        return grads


class _Saved(NamedTuple):
    """What a forward leaves its backward: the launches (tables) it used, the buffers'
    addresses then, P per dtype, the scale."""

    launches: Dict[torch.dtype, _Launch]
    at: List[int]
    p: Dict[torch.dtype, torch.Tensor]
    scale: float


class _OrthPenaltyFn(torch.autograd.Function):
    """`OrthPenalty`'s launches as one autograd op over every buffer (no double backward)."""

    @staticmethod
    def forward(ctx, penalty: OrthPenalty, masks: torch.Tensor, scale: float,
                *tensors: torch.Tensor) -> torch.Tensor:
        loss, saved = penalty.forward_terms(masks, scale, tensors)
        ctx.penalty, ctx.saved = penalty, saved
        ctx.save_for_backward(masks, *tensors)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        masks, *tensors = ctx.saved_tensors
        grads = ctx.penalty.backward_grads(masks, ctx.saved, grad, tensors)
        needed = ctx.needs_input_grad[3:]
        return (None, None, None, *(g if need else None for g, need in zip(grads, needed)))


def orth_penalty_triton(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor],
                        used: Sequence[torch.Tensor], trains: Sequence[torch.Tensor],
                        scale: float) -> torch.Tensor:
    """The penalty of the module docstring in one call (a new `OrthPenalty` each time: tests
    and checks; a training step keeps its `OrthPenalty` and masks)."""
    penalty = OrthPenalty(max(max(a.shape[0] for a in lora_As), 1))
    masks = penalty_masks(list(used), list(trains), penalty.r).to(lora_As[0].device)
    return penalty(lora_As, lora_Bs, masks, scale)


__all__ = ["OrthPenalty", "PENALTY_DTYPES", "TABLE_COLUMNS", "orth_penalty_triton",
           "penalty_masks"]
