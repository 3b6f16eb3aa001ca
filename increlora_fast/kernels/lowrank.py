"""Triton kernels of the low-rank adapter ``((x @ A.T) * lam_eff) @ B.T`` over padded slot
buffers (the host side that launches them is `linear.py`).

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
- `_backward_rows_kernel`: the adapter's whole backward in one pass over dy per row block
  (M-parallel grid, dy's columns swept inside a program, H loaded once per row block): T = dy @ B
  in registers, the adapter's dx = (T * lam_eff) @ A added in place into the base's dx, and
  per-program partials of ``G_B = dy.T @ H``, ``dA = (T * lam_eff).T @ x`` and the raw dlambda
  ``sum_m H * T`` (``sum_out B * G_B`` regrouped).
- `_finish_kernel`: sums those partials in a fixed order into ``dB = G_B * lam_eff``, dA,
  ``dlambda = coef * sum H * T`` and the score (`score._score_tiles_kernel` partials).

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

from .utils import MAX_R_MAX, TOKEN_ARGS, block


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
def _accumulate_x_wt(acc, x_ptr, w_ptr, rm, rn, m_ok, n_ok, K,
                     stride_xm, stride_xk, stride_wn, stride_wk,
                     BLOCK_K: tl.constexpr, OP: tl.constexpr, DOT: tl.constexpr,
                     ACC: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + x[rm] @ W[rn].T`` for x (M, K) and W (N, K), swept over K in BLOCK_K steps: the
    projection H = x A^T here and the base GEMM x W^T of `fused_linear`."""
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x.to(OP).to(DOT), w.to(OP).to(DOT), acc,
                     input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _accumulate_scaled_slots(acc, s_ptr, w_ptr, lam_ptr, state_ptr, rm, rn, m_ok, n_ok,
                             R, alpha, reserve, stride_sm, stride_sr, stride_wr, stride_wn,
                             SLOTS: tl.constexpr, R_ALL: tl.constexpr, BLOCK_R: tl.constexpr,
                             OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
                             PRECISION: tl.constexpr):
    """(``acc + (S[rm] * lam_eff) @ W[:, rn]``, the number of live slots) for S (M, R) and
    W (R, N), over slot blocks of BLOCK_R: a block with no live slot (lam_eff 0) is skipped, and
    a dead slot contributes exactly nothing (masked by value). `_expand_kernel`'s product and
    `fused_linear`'s adapter term."""
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
    return acc, live_total


@triton.jit(do_not_specialize=TOKEN_ARGS)
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
        acc = _accumulate_x_wt(acc, x_ptr, a_ptr, rm, rr, m_ok, r_ok, K,
                               stride_xm, stride_xk, stride_ar, stride_ak,
                               BLOCK_K, OP, DOT, ACC, PRECISION)
        acc = tl.where(need[None, :], acc, 0.0)
    tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr,
             acc.to(h_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=TOKEN_ARGS)
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
    acc, live_total = _accumulate_scaled_slots(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), s_ptr, w_ptr, lam_ptr, state_ptr, rm, rn, m_ok,
        n_ok, R, alpha, reserve, stride_sm, stride_sr, stride_wr, stride_wn,
        SLOTS, R_ALL, BLOCK_R, OP, DOT, ACC, PRECISION)
    tile_ok = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    if ACCUMULATE:
        if live_total > 0:
            acc += tl.load(out_ptrs, mask=tile_ok, other=0.0).to(ACC)
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=TOKEN_ARGS + ("blocks_per_prog",))
def _backward_rows_kernel(
    dy_ptr, b_ptr, h_ptr, a_ptr, x_ptr, lam_ptr, state_ptr, dx_ptr, gb_ptr, da_ptr, dl_ptr,
    M, N, K, R, alpha, reserve, blocks_per_prog,
    stride_dym, stride_hm, stride_xm, stride_dxm,
    stride_bn, stride_br, stride_ar, stride_ak,
    SLOTS: tl.constexpr, NEED_ALL: tl.constexpr, NEED_DX: tl.constexpr,
    DX_ACCUMULATE: tl.constexpr, NEED_GB: tl.constexpr, NEED_DA: tl.constexpr,
    NEED_DLAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """The adapter's whole backward over one program's contiguous run of row blocks.

    Per row block (BLOCK_M rows, every slot in one BLOCK_R block): H is loaded once; one sweep
    over dy's columns accumulates T = dy @ B in registers and this program's partial of
    G_B = dy.T @ H; then S = T * lam_eff gives the adapter's dx (added in place into the base's
    dx with DX_ACCUMULATE, else stored), this program's partial of dA = S.T @ x, and of the raw
    dlambda sum_m H * T. Partials live at offset ``pid`` of their workspaces, are written by
    this program only (first block stores, later blocks add) and are summed in a fixed order by
    `_finish_kernel`: no atomics, no memset, deterministic."""
    pid = tl.program_id(0)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    lam_eff, coef = _slot_lambda(lam_ptr, state_ptr, rr, r_ok, R, alpha, reserve,
                                 SLOTS, BLOCK_R, ACC)
    need = (lam_eff != 0) | ((coef != 0) & NEED_ALL)
    live = lam_eff != 0
    pid64 = pid.to(tl.int64)
    gb_base = gb_ptr + pid64 * N * R
    da_base = da_ptr + pid64 * R * K
    dl = tl.zeros((BLOCK_R,), dtype=ACC)
    for i in range(0, blocks_per_prog):
        rm = (pid64 * blocks_per_prog + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        h = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        h = tl.where(need[None, :], h, 0.0).to(ACC)
        h_op = h.to(OP).to(DOT)
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :],
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(OP).to(DOT)
            b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            b = tl.where(need[None, :], b, tl.zeros_like(b))
            t = tl.dot(dy, b.to(OP).to(DOT), t, input_precision=PRECISION, out_dtype=ACC)
            if NEED_GB:
                g = tl.dot(tl.trans(dy), h_op, input_precision=PRECISION, out_dtype=ACC)
                g_ptrs = gb_base + rn[:, None] * R + rr[None, :]
                g_ok = n_ok[:, None] & r_ok[None, :]
                if i > 0:
                    g += tl.load(g_ptrs, mask=g_ok, other=0.0)
                tl.store(g_ptrs, g, mask=g_ok)
        if NEED_DLAM:
            dl += tl.sum(h * t, axis=0)
        s = tl.where(live[None, :], t * lam_eff[None, :], 0.0).to(OP).to(DOT)
        if NEED_DX:
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                            mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                a = tl.where(live[:, None], a, tl.zeros_like(a))
                upd = tl.dot(s, a.to(OP).to(DOT), input_precision=PRECISION, out_dtype=ACC)
                dx_ptrs = dx_ptr + rm[:, None] * stride_dxm + rk[None, :]
                dx_ok = m_ok[:, None] & k_ok[None, :]
                if DX_ACCUMULATE:
                    upd += tl.load(dx_ptrs, mask=dx_ok, other=0.0).to(ACC)
                tl.store(dx_ptrs, upd.to(dx_ptr.dtype.element_ty), mask=dx_ok)
        if NEED_DA:
            s_t = tl.trans(s)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                d = tl.dot(s_t, x.to(OP).to(DOT), input_precision=PRECISION, out_dtype=ACC)
                d_ptrs = da_base + rr[:, None] * K + rk[None, :]
                d_ok = r_ok[:, None] & k_ok[None, :]
                if i > 0:
                    d += tl.load(d_ptrs, mask=d_ok, other=0.0)
                tl.store(d_ptrs, d, mask=d_ok)
    if NEED_DLAM:
        tl.store(dl_ptr + pid64 * R + rr, dl, mask=r_ok)


@triton.jit(do_not_specialize=("P",))
def _finish_kernel(
    gb_ptr, da_ptr, dl_ptr, sp_ptr, b_ptr, lam_ptr, state_ptr, db_ptr, dA_ptr, dlam_ptr,
    score_ptr,
    N, K, R, P, alpha, reserve, n_tiles_db, n_tiles_da, n_score_parts, score_scale,
    stride_bn, stride_br, stride_dbn, stride_dbr, stride_dar, stride_dak,
    SLOTS: tl.constexpr, NEED_DB: tl.constexpr, NEED_DA: tl.constexpr,
    NEED_DLAM: tl.constexpr, NEED_SCORE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """Sum the ``P`` per-program partials of `_backward_rows_kernel` in a fixed order: programs
    [0, n_tiles_db) write dB = G_B * lam_eff by tiles of BLOCK_N rows, the next n_tiles_da
    programs dA by tiles of BLOCK_K columns, and the last one dlambda = coef * sum H * T and,
    with NEED_SCORE, adds sum(score parts) * score_scale into the 0-d score. Dead slots
    (lam_eff 0) get exactly zero dA and dB."""
    pid = tl.program_id(0)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    lam_eff, coef = _slot_lambda(lam_ptr, state_ptr, rr, r_ok, R, alpha, reserve,
                                 SLOTS, BLOCK_R, ACC)
    live = lam_eff != 0
    if NEED_DB:
        if pid < n_tiles_db:
            rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = (rn < N)[:, None] & r_ok[None, :]
            acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC)
            # the pointers advance by one partial per program: a 64-bit address, where
            # p * (N * R) in int32 would wrap past 2**31 elements (the rows kernel writes at
            # int64 offsets; a 128k-vocab head at r_max 128 over 132 programs gets there)
            g_ptrs = gb_ptr + rn[:, None] * R + rr[None, :]
            for p in range(0, P):
                acc += tl.load(g_ptrs, mask=ok, other=0.0)
                g_ptrs += N * R
            db = tl.where(live[None, :], acc * lam_eff[None, :], 0.0)
            tl.store(db_ptr + rn[:, None] * stride_dbn + rr[None, :] * stride_dbr,
                     db.to(db_ptr.dtype.element_ty), mask=ok)
    if NEED_DA:
        if (pid >= n_tiles_db) & (pid < n_tiles_db + n_tiles_da):
            rk = (pid - n_tiles_db) * BLOCK_K + tl.arange(0, BLOCK_K)
            ok = r_ok[:, None] & (rk < K)[None, :]
            acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC)
            d_ptrs = da_ptr + rr[:, None] * K + rk[None, :]
            for p in range(0, P):
                acc += tl.load(d_ptrs, mask=ok, other=0.0)
                d_ptrs += R * K
            da = tl.where(live[:, None], acc, 0.0)
            tl.store(dA_ptr + rr[:, None] * stride_dar + rk[None, :] * stride_dak,
                     da.to(dA_ptr.dtype.element_ty), mask=ok)
    if pid == n_tiles_db + n_tiles_da:
        if NEED_DLAM:
            dl = tl.zeros((BLOCK_R,), dtype=ACC)
            for p in range(0, P):
                dl += tl.load(dl_ptr + p * R + rr, mask=r_ok, other=0.0)
            tl.store(dlam_ptr + rr, (dl * coef).to(dlam_ptr.dtype.element_ty), mask=r_ok)
        if NEED_SCORE:
            total = tl.zeros((BLOCK_S,), dtype=ACC)
            for s0 in range(0, n_score_parts, BLOCK_S):
                rs = s0 + tl.arange(0, BLOCK_S)
                total += tl.load(sp_ptr + rs, mask=rs < n_score_parts, other=0.0)
            score = tl.load(score_ptr).to(ACC) + tl.sum(total, axis=0) * score_scale
            tl.store(score_ptr, score.to(score_ptr.dtype.element_ty))


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
