"""The low-rank adapter op: ``out = ((x @ A.T) * lam) @ B.T`` over padded slot buffers.

Shapes: x (M, in), A (r_max, in), B (out, r_max), lam (r_max,). ``lam`` already holds the slot
mask and the scale, so it is 0 on inactive slots.

Kernels and passes, on CUDA (the projection's slot block covers r_max <= 128, the reduction's
64 slots, so r_max <= 64 means one block everywhere):

- forward: `_project_kernel` reads x once and writes ``H = x @ A.T`` (M, r_max, float32);
  `_expand_kernel` writes ``out = (H * lam) @ B.T`` once. One pass over x, one write of out.
- backward: `_project_kernel` reads dy once (``T = dy @ B`` plus ``dlam = sum_m H * T`` in its
  epilogue); `_expand_kernel` writes ``dx = (T * lam) @ A`` (adding the base layer's dx in the same
  pass when given); `_reduce_rows_kernel` reads x for ``dA = (T * lam).T @ x`` and dy for
  ``dB = dy.T @ (H * lam)``, once per live slot block; `_finalize_grad_kernel` casts the float32
  weight gradients and adds the triplet score ``sum |A * dA|`` / ``sum |B * dB|`` per slot. Two
  passes over dy, one over x, one write of dx. The exact module score (`score.delta_w_score_`)
  is one more GEMM-sized pass, on the steps that ask for it.

Slot blocks whose lam is all zero contribute nothing to out, dx, dA and dB and are skipped there.
The projections still visit them when lam requires a gradient: an active slot starts with
lambda = 0 (spec section 1), and its lambda gradient ``sum_m H * T`` needs H and T.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .score import delta_w_score_
from .utils import (DotConfig, block, check_device, check_dtype, compute_dtype, dot_config,
                    is_interpreted, launch, multiprocessor_count)

_OP = "lowrank_adapter"


@triton.jit
def _any_nonzero(lam):
    return tl.sum((lam != 0).to(tl.int32), axis=0)


@triton.jit
def _project_kernel(
    x_ptr, w_ptr, lam_ptr, p_ptr, h_ptr, dlam_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_wr, stride_wk, stride_pm, stride_pr, stride_hm, stride_hr,
    ALL_SLOTS: tl.constexpr, WITH_DLAM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """P = X @ W.T on one (BLOCK_M, BLOCK_R) tile; with WITH_DLAM also dlam += sum_m H * P.

    A slot block whose lam is all zero is written as zeros unless ALL_SLOTS is set.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    tile_ok = m_ok[:, None] & r_ok[None, :]
    p_ptrs = p_ptr + rm[:, None] * stride_pm + rr[None, :] * stride_pr
    lam = tl.load(lam_ptr + rr, mask=r_ok, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    if _any_nonzero(lam) + ALL_SLOTS > 0:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rk[:, None] * stride_wk + rr[None, :] * stride_wr,
                        mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(x.to(OP).to(DOT), w.to(OP).to(DOT), acc,
                         input_precision=PRECISION, out_dtype=ACC)
        if WITH_DLAM:
            h = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr,
                        mask=tile_ok, other=0.0).to(ACC)
            tl.atomic_add(dlam_ptr + rr, tl.sum(h * acc, axis=0), mask=r_ok)
    tl.store(p_ptrs, acc.to(p_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _expand_kernel(
    s_ptr, lam_ptr, w_ptr, init_ptr, out_ptr,
    M, N, R,
    stride_sm, stride_sr, stride_wr, stride_wn, stride_im, stride_in, stride_om, stride_on,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = [init +] (S * lam) @ W on one (BLOCK_M, BLOCK_N) tile, skipping all-zero lam blocks."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        lam = tl.load(lam_ptr + rr, mask=r_ok, other=0.0).to(ACC)
        if _any_nonzero(lam) > 0:
            s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(ACC) * lam[None, :]
            w = tl.load(w_ptr + rr[:, None] * stride_wr + rn[None, :] * stride_wn,
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(s.to(OP).to(DOT), w.to(OP).to(DOT), acc,
                         input_precision=PRECISION, out_dtype=ACC)
    tile_ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(init_ptr + rm[:, None] * stride_im + rn[None, :] * stride_in,
                       mask=tile_ok, other=0.0).to(ACC)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _reduce_rows_kernel(
    s_ptr, lam_ptr, x_ptr, ws_ptr,
    M, K, R, rows_per_split,
    stride_sm, stride_sr, stride_xm, stride_xk, stride_wr, stride_wk,
    SPLIT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """ws[r, k] (+)= sum over this split's rows m of S[m, r] * lam[r] * X[m, k].

    ws starts at zero; all-zero lam blocks are skipped. With SPLIT > 1 the row range is shared
    by SPLIT programs that add atomically.
    """
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok = rr < R
    k_ok = rk < K
    lam = tl.load(lam_ptr + rr, mask=r_ok, other=0.0).to(ACC)
    if _any_nonzero(lam) > 0:
        m_start = pid_s * rows_per_split
        m_end = tl.minimum(M, m_start + rows_per_split)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC)
        for m0 in range(m_start, m_end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < m_end
            s = tl.load(s_ptr + rr[:, None] * stride_sr + rm[None, :] * stride_sm,
                        mask=r_ok[:, None] & m_ok[None, :], other=0.0).to(ACC) * lam[:, None]
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(s.to(OP).to(DOT), x.to(OP).to(DOT), acc,
                         input_precision=PRECISION, out_dtype=ACC)
        ws_ptrs = ws_ptr + rr[:, None] * stride_wr + rk[None, :] * stride_wk
        tile_ok = r_ok[:, None] & k_ok[None, :]
        if SPLIT == 1:
            tl.store(ws_ptrs, acc, mask=tile_ok)
        else:
            tl.atomic_add(ws_ptrs, acc, mask=tile_ok)


@triton.jit
def _finalize_grad_kernel(
    ws_ptr, grad_ptr, param_ptr, triplet_ptr,
    R, K,
    stride_wr, stride_wk, stride_gr, stride_gk, stride_pr, stride_pk,
    TRIPLET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad = ws in the gradient's dtype; with TRIPLET also triplet[r] += sum_k |param * grad|."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok = rr < R
    tile_ok = r_ok[:, None] & (rk < K)[None, :]
    g = tl.load(ws_ptr + rr[:, None] * stride_wr + rk[None, :] * stride_wk, mask=tile_ok, other=0.0)
    tl.store(grad_ptr + rr[:, None] * stride_gr + rk[None, :] * stride_gk,
             g.to(grad_ptr.dtype.element_ty), mask=tile_ok)
    if TRIPLET:
        p = tl.load(param_ptr + rr[:, None] * stride_pr + rk[None, :] * stride_pk,
                    mask=tile_ok, other=0.0).to(g.dtype)
        part = tl.sum(tl.abs(p * g), axis=1)
        tl.atomic_add(triplet_ptr + rr, part.to(triplet_ptr.dtype.element_ty), mask=r_ok)


def _dot_kwargs(cfg: DotConfig) -> dict:
    return dict(OP=cfg.op, DOT=cfg.dot, ACC=cfg.acc, PRECISION=cfg.precision)


def project_(x: torch.Tensor, w_t: torch.Tensor, lam: torch.Tensor, out: torch.Tensor,
             cfg: DotConfig, all_slots: bool, h: Optional[torch.Tensor] = None,
             dlam: Optional[torch.Tensor] = None) -> None:
    """out (M, R) = x @ w_t where w_t is (K, R); with ``h`` and ``dlam``: dlam += sum_m h * out."""
    M, K = x.shape
    R = w_t.shape[1]
    small = is_interpreted(_project_kernel)
    bm, br = (16, 16) if small else (64, block(R, 128))
    bk = 16 if small else (64 if br <= 64 else 32)
    with_dlam = dlam is not None
    hh = h if with_dlam else out
    launch(_project_kernel, (triton.cdiv(M, bm), triton.cdiv(R, br)),
            x, w_t, lam, out, hh, dlam if with_dlam else lam,
            M, K, R,
            x.stride(0), x.stride(1), w_t.stride(1), w_t.stride(0),
            out.stride(0), out.stride(1), hh.stride(0), hh.stride(1),
            ALL_SLOTS=int(all_slots), WITH_DLAM=with_dlam,
            BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, **_dot_kwargs(cfg),
            num_warps=8 if br >= 128 else 4)


def expand_(s: torch.Tensor, lam: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
            cfg: DotConfig, init: Optional[torch.Tensor] = None) -> None:
    """out (M, N) = [init +] (s * lam) @ w where s is (M, R) and w is (R, N)."""
    M, R = s.shape
    N = w.shape[1]
    small = is_interpreted(_expand_kernel)
    bm, bn, br = (16, 16, 16) if small else (64, 128, block(R, 32))
    ii = init if init is not None else out
    launch(_expand_kernel, (triton.cdiv(M, bm), triton.cdiv(N, bn)),
            s, lam, w, ii, out,
            M, N, R,
            s.stride(0), s.stride(1), w.stride(0), w.stride(1),
            ii.stride(0), ii.stride(1), out.stride(0), out.stride(1),
            ACCUMULATE=init is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, **_dot_kwargs(cfg),
            num_warps=8 if br >= 32 else 4)


def reduce_rows(s: torch.Tensor, lam: torch.Tensor, x: torch.Tensor, ws: torch.Tensor,
                cfg: DotConfig) -> None:
    """ws (R, K) given as a strided view, zero on entry: ws = (s * lam).T @ x over all M rows."""
    M, R = s.shape
    K = x.shape[1]
    small = is_interpreted(_reduce_rows_kernel)
    br, bk, bm = (16, 16, 16) if small else (block(R, 64), 128, 32)
    tiles = triton.cdiv(R, br) * triton.cdiv(K, bk)
    m_blocks = triton.cdiv(M, bm)
    split = max(1, min(m_blocks, 2 * multiprocessor_count(x.device) // tiles))
    rows_per_split = triton.cdiv(m_blocks, split) * bm
    split = triton.cdiv(M, rows_per_split) if M else 1
    launch(_reduce_rows_kernel, (triton.cdiv(R, br), triton.cdiv(K, bk), split),
            s, lam, x, ws,
            M, K, R, rows_per_split,
            s.stride(0), s.stride(1), x.stride(0), x.stride(1), ws.stride(0), ws.stride(1),
            SPLIT=split, BLOCK_R=br, BLOCK_K=bk, BLOCK_M=bm, **_dot_kwargs(cfg),
            num_warps=8 if br >= 64 else 4)


def finalize_grad(ws: torch.Tensor, param: torch.Tensor, slot_dim: int,
                  triplet_row: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient of ``param`` from its accumulator ``ws`` (same shape), adding the triplet
    score ``sum |param * grad|`` per slot into ``triplet_row`` when given."""
    if triplet_row is None and ws.dtype == param.dtype:
        return ws
    grad = torch.empty_like(param, memory_format=torch.contiguous_format)
    other = 1 - slot_dim
    R, K = param.shape[slot_dim], param.shape[other]
    small = is_interpreted(_finalize_grad_kernel)
    br, bk = (16, 16) if small else (16, 256)
    tt = triplet_row if triplet_row is not None else ws
    launch(_finalize_grad_kernel, (triton.cdiv(R, br), triton.cdiv(K, bk)),
            ws, grad, param, tt, R, K,
            ws.stride(slot_dim), ws.stride(other), grad.stride(slot_dim), grad.stride(other),
            param.stride(slot_dim), param.stride(other),
            TRIPLET=triplet_row is not None, BLOCK_R=br, BLOCK_K=bk)
    return grad


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lowrank_forward(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    lam: torch.Tensor, out_dtype: torch.dtype,
                    all_slots: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, H) with H = x @ A.T (float32) kept for the backward; ``all_slots`` computes H on
    slot blocks whose lam is all zero too (needed when lam requires a gradient)."""
    M = x.shape[0]
    R, N = lora_A.shape[0], lora_B.shape[0]
    cfg = dot_config(out_dtype, is_interpreted(_project_kernel))
    h = torch.empty((M, R), dtype=cfg.acc_torch, device=x.device)
    project_(x, lora_A.t(), lam, h, cfg, all_slots)
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    expand_(h, lam, lora_B.t(), out, cfg)
    return out, h


def lowrank_backward(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, lam: torch.Tensor, h: torch.Tensor,
                     score_out: Optional[torch.Tensor], triplet_out: Optional[torch.Tensor],
                     dx_init: Optional[torch.Tensor], need_x: bool, need_a: bool, need_b: bool,
                     need_lam: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dA, dB, dlam), None where not needed; dx adds onto ``dx_init`` when given.

    Also adds the exact module score into ``score_out`` and the triplet score into
    ``triplet_out`` (3, r_max) when they are given.
    """
    M = x.shape[0]
    R = lora_A.shape[0]
    cfg = dot_config(dy.dtype, is_interpreted(_project_kernel))
    dx = da = db = dlam = None
    t = None
    dlam_acc = None
    if need_x or need_a or need_lam:
        t = torch.empty((M, R), dtype=cfg.acc_torch, device=x.device)
        dlam_acc = torch.zeros(R, dtype=cfg.acc_torch, device=x.device) if need_lam else None
        project_(dy, lora_B, lam, t, cfg, need_lam, h=h, dlam=dlam_acc)
    if need_x:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        expand_(t, lam, lora_A, dx, cfg, init=dx_init)
    if need_a:
        ws = torch.zeros(lora_A.shape, dtype=cfg.acc_torch, device=x.device)
        reduce_rows(t, lam, x, ws, cfg)
        da = finalize_grad(ws, lora_A, 0, None if triplet_out is None else triplet_out[0])
    if need_b:
        ws = torch.zeros(lora_B.shape, dtype=cfg.acc_torch, device=x.device)
        reduce_rows(h, lam, dy, ws.t(), cfg)
        db = finalize_grad(ws, lora_B, 1, None if triplet_out is None else triplet_out[1])
    if need_lam:
        dlam = dlam_acc.to(lam.dtype)
        if triplet_out is not None:
            triplet_out[2].add_((lam.to(dlam_acc.dtype) * dlam_acc).abs().to(triplet_out.dtype))
    if score_out is not None:
        delta_w_score_(dy, x, lora_A, lora_B, lam, score_out)
    return dx, da, db, dlam


# ---------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("increlora::lowrank_fwd", mutates_args=())
def _lowrank_fwd_op(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    lam: torch.Tensor, out_dtype: torch.dtype,
                    all_slots: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return lowrank_forward(x, lora_A, lora_B, lam, out_dtype, all_slots)


@_lowrank_fwd_op.register_fake
def _(x, lora_A, lora_B, lam, out_dtype, all_slots):
    M = x.shape[0]
    return (x.new_empty((M, lora_B.shape[0]), dtype=out_dtype),
            x.new_empty((M, lora_A.shape[0]), dtype=acc_dtype(out_dtype)))


@torch.library.custom_op("increlora::lowrank_bwd", mutates_args=("score_out", "triplet_out"))
def _lowrank_bwd_op(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, lam: torch.Tensor, h: torch.Tensor,
                    score_out: Optional[torch.Tensor], triplet_out: Optional[torch.Tensor],
                    dx_init: Optional[torch.Tensor], need_x: bool, need_a: bool, need_b: bool,
                    need_lam: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
    grads = lowrank_backward(dy, x, lora_A, lora_B, lam, h, score_out, triplet_out, dx_init,
                             need_x, need_a, need_b, need_lam)
    # A custom op returns tensors only: an empty one stands for "not needed".
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_lowrank_bwd_op.register_fake
def _(dy, x, lora_A, lora_B, lam, h, score_out, triplet_out, dx_init, need_x, need_a, need_b,
      need_lam):
    def like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed \
            else x.new_empty(0)
    return like(x, need_x), like(lora_A, need_a), like(lora_B, need_b), like(lam, need_lam)


def lowrank_backward_op(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                        lora_B: torch.Tensor, lam: torch.Tensor, h: torch.Tensor,
                        score_out: Optional[torch.Tensor], triplet_out: Optional[torch.Tensor],
                        dx_init: Optional[torch.Tensor],
                        needs: Tuple[bool, bool, bool, bool]) -> Tuple[Optional[torch.Tensor], ...]:
    """`lowrank_backward` through its custom op, with None for the gradients not needed."""
    grads = _lowrank_bwd_op(dy, x, lora_A, lora_B, lam, h, score_out, triplet_out, dx_init,
                            *needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


class LowRankAdapterFunction(torch.autograd.Function):
    """Autograd of `lowrank_adapter`; the score accumulators are filled during backward."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, lam, score_out, triplet_out, out_dtype):
        out, h = _lowrank_fwd_op(x, lora_A, lora_B, lam, out_dtype, ctx.needs_input_grad[3])
        ctx.save_for_backward(x, lora_A, lora_B, lam, h)
        ctx.score_out = score_out
        ctx.triplet_out = triplet_out
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, lora_A, lora_B, lam, h = ctx.saved_tensors
        dx, da, db, dlam = lowrank_backward_op(dy, x, lora_A, lora_B, lam, h, ctx.score_out,
                                               ctx.triplet_out, None,
                                               tuple(ctx.needs_input_grad[:4]))
        return dx, da, db, dlam, None, None, None


def check_adapter_args(op_name: str, x: torch.Tensor, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, lam: torch.Tensor, score_out: Optional[torch.Tensor],
                       triplet_out: Optional[torch.Tensor]) -> torch.device:
    """Validate the adapter operands of an op; returns their device."""
    for name, t, nd in (("x", x, 2), ("lora_A", lora_A, 2), ("lora_B", lora_B, 2), ("lam", lam, 1)):
        if t.dim() != nd:
            raise ValueError(f"{op_name}: {name} must be {nd}-D, got shape {tuple(t.shape)}")
        check_dtype(op_name, name, t)
    r, k = lora_A.shape
    if x.shape[1] != k or lora_B.shape[1] != r or lam.shape[0] != r:
        raise ValueError(f"{op_name}: shapes do not chain: x {tuple(x.shape)}, lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}, lam "
                         f"{tuple(lam.shape)}; need x (M, in), A (r, in), B (out, r), lam (r,)")
    if score_out is not None and (score_out.dim() != 0
                                  or score_out.dtype not in (torch.float32, torch.float64)):
        raise ValueError(f"{op_name}: score_out must be a 0-d float32 tensor, got shape "
                         f"{tuple(score_out.shape)} dtype {score_out.dtype}")
    if triplet_out is not None and (tuple(triplet_out.shape) != (3, r)
                                    or triplet_out.dtype != torch.float32
                                    or not triplet_out.is_contiguous()):
        raise ValueError(f"{op_name}: triplet_out must be a contiguous (3, {r}) float32 tensor, "
                         f"got shape {tuple(triplet_out.shape)} dtype {triplet_out.dtype} "
                         f"strides {triplet_out.stride()}")
    return check_device(_project_kernel, op_name, x=x, lora_A=lora_A, lora_B=lora_B, lam=lam,
                        score_out=score_out, triplet_out=triplet_out)


def lowrank_adapter(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    lam: torch.Tensor, score_out: Optional[torch.Tensor] = None,
                    triplet_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``((x @ lora_A.T) * lam) @ lora_B.T`` on Triton kernels, differentiable in all four inputs.

    Args:
        x: (M, in), any strides; float32, bfloat16, float16 or float64.
        lora_A: (r_max, in); lora_B: (out, r_max); lam: (r_max,), mask and scale included.
        score_out: 0-d float32; each backward adds ``sum(|dW * G|) / sqrt(out * in)`` to it
            (``dW = B diag(lam) A``, ``G = dy.T @ x``) without materialising dW or G.
        triplet_out: (3, r_max) float32; each backward adds per slot ``sum_in |A * dA|``,
            ``sum_out |B * dB|`` and ``|lam * dlam|`` (lam as passed here) to its rows.

    Returns:
        (M, out) in the compute dtype: the autocast dtype under autocast, else the promoted
        dtype of x, lora_A and lora_B. Accumulation is float32 (float64 for float64 inputs).
    """
    device = check_adapter_args(_OP, x, lora_A, lora_B, lam, score_out, triplet_out)
    out_dtype = compute_dtype(device, x, lora_A, lora_B)
    # The kernels index lam with unit stride.
    return LowRankAdapterFunction.apply(x, lora_A, lora_B, lam.contiguous(), score_out,
                                        triplet_out, out_dtype)
