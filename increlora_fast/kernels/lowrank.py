"""Triton kernels of the low-rank adapter ``((x @ A.T) * lam_eff) @ B.T`` over padded slot
buffers, and the host functions that launch them.

Shapes: x (M, in), A (r_max, in), B (out, r_max), lambda (r_max,). Two ways to give lambda:

- **slot mode** (what `IncreLoRALinear` uses): the kernels read ``lora_lambda``, the int8
  ``slot_state`` and two scalars and build the effective lambda themselves:
  ``lam_eff = where(active, lambda, where(reserve, reserve_value, 0)) * alpha / max(1, #active)``
  and ``dlambda = where(active, dlam_eff * alpha / #active, 0)``. No torch op per forward builds
  it, and a changed slot state is seen by the very next launch.
- **direct mode** (``slot_state=None``): ``lam`` is used as given and its gradient is exact for
  every slot.

Kernels (each reads its operands once; int64 element offsets on the token dimension, so
M x features may exceed 2**31):

- `_project_kernel`: ``H = x @ A.T`` (M, r_max, float32) for the slots that need it.
- `_expand_kernel`: ``out (+)= (S * lam_eff) @ W``, in place when accumulating (the forward adds
  the adapter onto the base GEMM's y; the backward adds the adapter's dx onto the base's dx).
- `_dy_pass_kernel`: one pass over dy giving both ``T = dy @ B`` (M, r_max) and
  ``G_B = dy.T @ H`` (out, r_max); dB and dlambda are derived from G_B.
- `_finish_b_kernel`: ``dB = G_B * lam_eff`` and ``dlam_eff = sum_out B * G_B``.
- `_reduce_rows_kernel`: ``dA = (T * lam_eff).T @ x`` in one pass over x, rows split across
  programs (atomics, or per-split partials summed in a fixed order in deterministic mode).

Masking is by value, with ``tl.where``: a slot whose lam_eff is 0 contributes exactly nothing and
gets exactly zero dA and dB, even when its A row or B column holds NaN or inf and it shares a slot
block with live slots. Slot blocks with no slot in use are skipped altogether. Active slots with
lambda 0 (every slot starts so, spec section 1) still get H and T, since their dlambda needs them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import (MAX_R_MAX, DotConfig, block, deterministic, is_interpreted, launch,
                    multiprocessor_count)

ACTIVE = 2
RESERVE = 1
# Deterministic mode sums per-program partials of G_B in a fixed order; their total size is
# capped here (fewer, longer programs beyond it).
DET_PARTIAL_BYTES = 64 << 20


@triton.jit
def _slot_lambda(lam_ptr, state_ptr, rr, r_ok, R, alpha, reserve,
                 SLOTS: tl.constexpr, R_ALL: tl.constexpr, ACC: tl.constexpr):
    """(lam_eff, coef) of slots ``rr``: the effective lambda and d(lam_eff)/d(lambda)."""
    lam = tl.load(lam_ptr + rr, mask=r_ok, other=0.0).to(ACC)
    if SLOTS:
        ra = tl.arange(0, R_ALL)
        st_all = tl.load(state_ptr + ra, mask=ra < R, other=0)
        n_active = tl.sum((st_all == 2).to(tl.int32), axis=0)
        zero = tl.zeros_like(lam)
        scale = (zero + alpha) / tl.maximum(n_active, 1).to(ACC)
        st = tl.load(state_ptr + rr, mask=r_ok, other=0)
        active = st == 2
        lam_eff = tl.where(active, lam, tl.where(st == 1, zero + reserve, zero)) * scale
        coef = tl.where(active, scale, zero)
    else:
        lam_eff = lam
        coef = tl.where(r_ok, 1.0, 0.0).to(ACC)
    return lam_eff, coef


@triton.jit
def _project_kernel(
    x_ptr, a_ptr, lam_ptr, state_ptr, h_ptr,
    M, K, R, alpha, reserve,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr,
    SLOTS: tl.constexpr, NEED_ALL: tl.constexpr, R_ALL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """H = x @ A.T on one (BLOCK_M, BLOCK_R) tile; slots that need no H (lam_eff 0 and, with
    NEED_ALL, no lambda gradient either) are stored as 0."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    lam_eff, coef = _slot_lambda(lam_ptr, state_ptr, rr, r_ok, R, alpha, reserve,
                                 SLOTS, R_ALL, ACC)
    need = (lam_eff != 0) | ((coef != 0) & NEED_ALL)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    if tl.sum(need.to(tl.int32), axis=0) > 0:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar,
                        mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(x.to(OP).to(DOT), a.to(OP).to(DOT), acc,
                         input_precision=PRECISION, out_dtype=ACC)
        acc = tl.where(need[None, :], acc, 0.0)
    tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr,
             acc.to(h_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(
    s_ptr, lam_ptr, state_ptr, w_ptr, out_ptr,
    M, N, R, alpha, reserve,
    stride_sm, stride_sr, stride_wr, stride_wn, stride_om, stride_on,
    SLOTS: tl.constexpr, ACCUMULATE: tl.constexpr, R_ALL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = [out +] (S * lam_eff) @ W on one (BLOCK_M, BLOCK_N) tile. Each tile is read and
    written by one program only, so accumulating in place is race-free; with ACCUMULATE and no
    live slot the tile is left untouched (not even read)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    live_total = 0
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        lam_eff, coef = _slot_lambda(lam_ptr, state_ptr, rr, r_ok, R, alpha, reserve,
                                     SLOTS, R_ALL, ACC)
        live = lam_eff != 0
        n_live = tl.sum(live.to(tl.int32), axis=0)
        if n_live > 0:
            s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(ACC)
            s = tl.where(live[None, :], s * lam_eff[None, :], 0.0)
            w = tl.load(w_ptr + rr[:, None] * stride_wr + rn[None, :] * stride_wn,
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.where(live[:, None], w, tl.zeros_like(w))
            acc = tl.dot(s.to(OP).to(DOT), w.to(OP).to(DOT), acc,
                         input_precision=PRECISION, out_dtype=ACC)
        live_total += n_live
    tile_ok = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    if ACCUMULATE:
        if live_total > 0:
            acc += tl.load(out_ptrs, mask=tile_ok, other=0.0).to(ACC)
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dy_pass_kernel(
    dy_ptr, b_ptr, h_ptr, lam_ptr, state_ptr, t_ptr, gb_ptr,
    M, N, R, alpha, reserve, rows_per_prog,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_hm, stride_hr, stride_tm, stride_tr,
    stride_gs, stride_gn, stride_gr,
    SLOTS: tl.constexpr, NEED_ALL: tl.constexpr, NEED_T: tl.constexpr, NEED_GB: tl.constexpr,
    USE_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program owns rows [pid * rows_per_prog, +rows_per_prog) and sweeps all columns of dy
    once: T[rows] = dy[rows] @ B (complete, stored by this program alone) and its share of
    G_B = dy.T @ H, added atomically (USE_ATOMIC) or stored as partial ``pid`` of gb."""
    pid = tl.program_id(0)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    lam_eff, coef = _slot_lambda(lam_ptr, state_ptr, rr, r_ok, R, alpha, reserve,
                                 SLOTS, BLOCK_R, ACC)
    need = (lam_eff != 0) | ((coef != 0) & NEED_ALL)
    m_start = pid.to(tl.int64) * rows_per_prog
    m_end = tl.minimum(M, m_start + rows_per_prog)
    gb_base = gb_ptr if USE_ATOMIC else gb_ptr + pid.to(tl.int64) * stride_gs
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.where(need[None, :], b, tl.zeros_like(b))
        g = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC)
        for m0 in range(m_start, m_end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < m_end
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            if NEED_T:
                t_ptrs = t_ptr + rm[:, None] * stride_tm + rr[None, :] * stride_tr
                t_ok = m_ok[:, None] & r_ok[None, :]
                t = tl.load(t_ptrs, mask=t_ok & (n0 > 0), other=0.0)
                t = tl.dot(dy.to(OP).to(DOT), b.to(OP).to(DOT), t,
                           input_precision=PRECISION, out_dtype=ACC)
                tl.store(t_ptrs, t, mask=t_ok)
                # The next column block reloads this tile: make the stores visible to every
                # thread of the program, whatever layouts the compiler picks for load and store.
                tl.debug_barrier()
            if NEED_GB:
                h = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr,
                            mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                h = tl.where(need[None, :], h, 0.0)
                g = tl.dot(tl.trans(dy.to(OP).to(DOT)), h.to(OP).to(DOT), g,
                           input_precision=PRECISION, out_dtype=ACC)
        if NEED_GB:
            g_ptrs = gb_base + rn[:, None] * stride_gn + rr[None, :] * stride_gr
            g_ok = n_ok[:, None] & r_ok[None, :]
            if USE_ATOMIC:
                tl.atomic_add(g_ptrs, g, mask=g_ok)
            else:
                tl.store(g_ptrs, g, mask=g_ok)


@triton.jit
def _finish_b_kernel(
    gb_ptr, b_ptr, lam_ptr, state_ptr, db_ptr, dlam_ptr,
    N, R, alpha, reserve,
    stride_gn, stride_gr, stride_bn, stride_br, stride_dbn, stride_dbr,
    SLOTS: tl.constexpr, NEED_DB: tl.constexpr, NEED_DLAM: tl.constexpr, R_ALL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """dB = G_B * lam_eff (0 where lam_eff is 0) and dlambda = coef * sum_out B * G_B for one
    slot block, summing over out in a fixed order."""
    pid_r = tl.program_id(0)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    lam_eff, coef = _slot_lambda(lam_ptr, state_ptr, rr, r_ok, R, alpha, reserve,
                                 SLOTS, R_ALL, ACC)
    live = lam_eff != 0
    counted = coef != 0
    dl = tl.zeros((BLOCK_R,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        tile_ok = (rn < N)[:, None] & r_ok[None, :]
        g = tl.load(gb_ptr + rn[:, None] * stride_gn + rr[None, :] * stride_gr,
                    mask=tile_ok, other=0.0).to(ACC)
        if NEED_DB:
            db = tl.where(live[None, :], g * lam_eff[None, :], 0.0)
            tl.store(db_ptr + rn[:, None] * stride_dbn + rr[None, :] * stride_dbr,
                     db.to(db_ptr.dtype.element_ty), mask=tile_ok)
        if NEED_DLAM:
            b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                        mask=tile_ok, other=0.0).to(ACC)
            dl += tl.sum(tl.where(counted[None, :], b * g, 0.0), axis=0)
    if NEED_DLAM:
        tl.store(dlam_ptr + rr, (dl * coef).to(dlam_ptr.dtype.element_ty), mask=r_ok)


@triton.jit
def _reduce_rows_kernel(
    s_ptr, lam_ptr, state_ptr, x_ptr, out_ptr,
    M, K, R, alpha, reserve, rows_per_split,
    stride_sm, stride_sr, stride_xm, stride_xk, stride_os, stride_or, stride_ok,
    SLOTS: tl.constexpr, USE_ATOMIC: tl.constexpr, R_ALL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[r, k] (+)= sum over this split's rows m of S[m, r] * lam_eff[r] * X[m, k].

    Without USE_ATOMIC every tile of split ``pid_s`` is stored (zeros included) at offset
    ``pid_s * stride_os``, so the output needs no memset; with it, live tiles add atomically
    into a zeroed output."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok = rr < R
    k_ok = rk < K
    lam_eff, coef = _slot_lambda(lam_ptr, state_ptr, rr, r_ok, R, alpha, reserve,
                                 SLOTS, R_ALL, ACC)
    live = lam_eff != 0
    n_live = tl.sum(live.to(tl.int32), axis=0)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC)
    if n_live > 0:
        m_start = pid_s.to(tl.int64) * rows_per_split
        m_end = tl.minimum(M, m_start + rows_per_split)
        for m0 in range(m_start, m_end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < m_end
            s = tl.load(s_ptr + rr[:, None] * stride_sr + rm[None, :] * stride_sm,
                        mask=r_ok[:, None] & m_ok[None, :], other=0.0).to(ACC)
            s = tl.where(live[:, None], s * lam_eff[:, None], 0.0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(s.to(OP).to(DOT), x.to(OP).to(DOT), acc,
                         input_precision=PRECISION, out_dtype=ACC)
    tile_ok = r_ok[:, None] & k_ok[None, :]
    if USE_ATOMIC:
        if n_live > 0:
            tl.atomic_add(out_ptr + rr[:, None] * stride_or + rk[None, :] * stride_ok, acc,
                          mask=tile_ok)
    else:
        base = out_ptr + pid_s.to(tl.int64) * stride_os
        tl.store(base + rr[:, None] * stride_or + rk[None, :] * stride_ok,
                 acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


# ------------------------------------------------------------------------------- host side
class Slots:
    """How the kernels get lambda: ``state`` None is direct mode (``lam`` as given)."""

    __slots__ = ("lam", "state", "alpha", "reserve")

    def __init__(self, lam: torch.Tensor, state: Optional[torch.Tensor], alpha: float = 1.0,
                 reserve: float = 0.0) -> None:
        self.lam, self.state, self.alpha, self.reserve = lam, state, float(alpha), float(reserve)

    def args(self) -> tuple:
        state = self.state if self.state is not None else self.lam
        return self.lam, state

    def consts(self) -> dict:
        return dict(SLOTS=self.state is not None, R_ALL=block(self.lam.shape[0], MAX_R_MAX))


def _dot(cfg: DotConfig) -> dict:
    return dict(OP=cfg.op, DOT=cfg.dot, ACC=cfg.acc, PRECISION=cfg.precision)


def project_(x: torch.Tensor, lora_A: torch.Tensor, slots: Slots, h: torch.Tensor,
             cfg: DotConfig, need_all: bool) -> None:
    """h (M, R) = x @ A.T for the slots that need it (``need_all``: also every slot whose
    lambda gets a gradient)."""
    M, K = x.shape
    R = lora_A.shape[0]
    small = is_interpreted(_project_kernel)
    bm, br = (16, 16) if small else (64, block(R, MAX_R_MAX))
    bk = 16 if small else (64 if br <= 64 else 32)
    lam, state = slots.args()
    launch(_project_kernel, (triton.cdiv(M, bm), triton.cdiv(R, br)),
           x, lora_A, lam, state, h, M, K, R, slots.alpha, slots.reserve,
           x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
           h.stride(0), h.stride(1),
           NEED_ALL=need_all, **slots.consts(), BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk,
           **_dot(cfg), num_warps=8 if br >= 128 else 4)


def expand_(s: torch.Tensor, slots: Slots, w: torch.Tensor, out: torch.Tensor, cfg: DotConfig,
            accumulate: bool) -> None:
    """out (M, N) = [out +] (s * lam_eff) @ w where s is (M, R) and w is (R, N) (any strides)."""
    M, R = s.shape
    N = w.shape[1]
    small = is_interpreted(_expand_kernel)
    bm, bn, br = (16, 16, 16) if small else (64, 128, block(R, 32))
    lam, state = slots.args()
    launch(_expand_kernel, (triton.cdiv(M, bm), triton.cdiv(N, bn)),
           s, lam, state, w, out, M, N, R, slots.alpha, slots.reserve,
           s.stride(0), s.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
           ACCUMULATE=accumulate, **slots.consts(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br,
           **_dot(cfg), num_warps=8 if br >= 32 else 4)


def dy_pass(dy: torch.Tensor, lora_B: torch.Tensor, h: torch.Tensor, slots: Slots,
            cfg: DotConfig, need_all: bool, need_t: bool,
            need_gb: bool) -> tuple:
    """(T (M, R) float32 or None, G_B (out, R) float32 or None) in one pass over dy."""
    M, N = dy.shape
    R = lora_B.shape[1]
    small = is_interpreted(_dy_pass_kernel)
    br = block(R, MAX_R_MAX)
    if R > MAX_R_MAX:
        raise ValueError(f"the Triton adapter kernels support r_max <= {MAX_R_MAX}, got {R}")
    bm, bn = (16, 16) if small else (64 if M >= 8192 else 32, 64 if br <= 32 else 32)
    m_blocks = triton.cdiv(M, bm)
    progs = max(1, min(m_blocks, 4 * multiprocessor_count(dy.device)))
    det = deterministic()
    if det and need_gb:  # per-program partials of G_B: keep them under DET_PARTIAL_BYTES
        progs = max(1, min(progs, DET_PARTIAL_BYTES // (N * R * 4)))
    rows_per_prog = triton.cdiv(m_blocks, progs) * bm
    progs = triton.cdiv(M, rows_per_prog) if M else 0
    acc = cfg.acc_torch
    t = torch.empty((M, R), dtype=acc, device=dy.device) if need_t else None
    use_atomic = not det and progs > 1
    gb = None
    if need_gb:
        gb = (torch.zeros((N, R), dtype=acc, device=dy.device) if use_atomic or progs == 0
              else torch.empty((progs, N, R), dtype=acc, device=dy.device))
    gb_arg = gb if gb is not None else h
    lam, state = slots.args()
    g_strides = ((0,) + gb_arg.stride()[-2:]) if gb_arg.dim() == 2 else gb_arg.stride()
    t_arg = t if t is not None else h
    launch(_dy_pass_kernel, (progs,),
           dy, lora_B, h, lam, state, t_arg, gb_arg, M, N, R, slots.alpha, slots.reserve,
           rows_per_prog,
           dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
           h.stride(0), h.stride(1), t_arg.stride(0), t_arg.stride(1), *g_strides,
           SLOTS=slots.state is not None, NEED_ALL=need_all, NEED_T=need_t, NEED_GB=need_gb,
           USE_ATOMIC=use_atomic, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, **_dot(cfg),
           num_warps=8 if br >= 64 else 4)
    if gb is not None and gb.dim() == 3:
        gb = gb[0] if progs == 1 else gb.sum(0)
    return t, gb


def finish_b(gb: torch.Tensor, lora_B: torch.Tensor, slots: Slots, need_db: bool,
             need_dlam: bool, lam_dtype: torch.dtype) -> tuple:
    """(dB like lora_B or None, dlambda (R,) or None) from G_B."""
    N, R = gb.shape
    db = torch.empty(lora_B.shape, dtype=lora_B.dtype, device=gb.device) if need_db else None
    dlam = torch.empty((R,), dtype=lam_dtype, device=gb.device) if need_dlam else None
    small = is_interpreted(_finish_b_kernel)
    br, bn = (16, 16) if small else (16, 256)
    lam, state = slots.args()
    db_arg = db if db is not None else gb
    launch(_finish_b_kernel, (triton.cdiv(R, br),),
           gb, lora_B, lam, state, db_arg, dlam if dlam is not None else lam,
           N, R, slots.alpha, slots.reserve,
           gb.stride(0), gb.stride(1), lora_B.stride(0), lora_B.stride(1),
           db_arg.stride(0), db_arg.stride(1),
           NEED_DB=need_db, NEED_DLAM=need_dlam, **slots.consts(),
           BLOCK_N=bn, BLOCK_R=br, ACC=tl.float64 if gb.dtype == torch.float64 else tl.float32)
    return db, dlam


def reduce_rows(s: torch.Tensor, slots: Slots, x: torch.Tensor, out_like: torch.Tensor,
                cfg: DotConfig) -> torch.Tensor:
    """(s * lam_eff).T @ x over all M rows, (R, K), in ``out_like``'s dtype."""
    M, R = s.shape
    K = x.shape[1]
    small = is_interpreted(_reduce_rows_kernel)
    br, bk, bm = (16, 16, 16) if small else (block(R, 64), 128, 32)
    tiles = triton.cdiv(R, br) * triton.cdiv(K, bk)
    m_blocks = triton.cdiv(M, bm)
    split = max(1, min(m_blocks, 2 * multiprocessor_count(x.device) // tiles))
    rows_per_split = triton.cdiv(m_blocks, split) * bm
    split = max(1, triton.cdiv(M, rows_per_split))
    acc = cfg.acc_torch
    use_atomic = split > 1 and not deterministic()
    if use_atomic:
        out = torch.zeros((R, K), dtype=acc, device=x.device)
    elif split == 1 and out_like.dtype == acc:
        out = torch.empty((R, K), dtype=acc, device=x.device)
    else:
        out = torch.empty((split, R, K), dtype=acc, device=x.device)
    strides = ((0,) + out.stride()) if out.dim() == 2 else out.stride()
    lam, state = slots.args()
    launch(_reduce_rows_kernel, (triton.cdiv(R, br), triton.cdiv(K, bk), split),
           s, lam, state, x, out, M, K, R, slots.alpha, slots.reserve, rows_per_split,
           s.stride(0), s.stride(1), x.stride(0), x.stride(1), *strides,
           USE_ATOMIC=use_atomic, **slots.consts(), BLOCK_R=br, BLOCK_K=bk, BLOCK_M=bm,
           **_dot(cfg), num_warps=8 if br >= 64 else 4)
    if out.dim() == 3:
        out = out.sum(0) if split > 1 else out[0]
    return out if out.dtype == out_like.dtype else out.to(out_like.dtype)
