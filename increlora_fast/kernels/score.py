"""The exact IncreLoRA module score ``sum(|dW * G|) / sqrt(out * in)`` as one Triton kernel.

``dW = B diag(lam_eff) A`` and ``G = dy.T @ x`` are (out, in); neither is ever stored. Each
program of `_score_tiles_kernel` owns one (BLOCK_N, BLOCK_K) tile: it computes that tile of G by
a sweep over all M rows (a GEMM, pipelined by Triton like any other), builds the same tile of dW
from the slot buffers (lam_eff from the slot states inside the kernel; slots whose lam_eff is 0
are masked by value, so NaN or inf in a dead slot never counts) and stores ``sum |dW * G|`` of
the tile into its own partial. `lowrank._finish_kernel` sums the partials in a fixed order and
adds the scaled total into the 0-d score: no atomics, deterministic, no memset, and nothing of
size out x in, M x out or M x in is allocated.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from .lowrank import _slot_lambda
from . import utils
from .utils import (MAX_R_MAX, TOKEN_ARGS, DotConfig, block, dot_config, is_interpreted,
                    multiprocessor_count, row_major)


@triton.jit
def _split3(v, DW_DOT: tl.constexpr, ACC: tl.constexpr):
    """v (float32) as three bfloat16 parts, largest first, each cast to DW_DOT; their sum is v
    to about float32's precision."""
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(ACC)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(ACC)).to(tl.bfloat16)
    return hi.to(DW_DOT), mid.to(DW_DOT), lo.to(DW_DOT)


@triton.jit(do_not_specialize=TOKEN_ARGS)
def _score_tiles_kernel(
    dy_ptr, x_ptr, a_ptr, b_ptr, lam_ptr, state_ptr, part_ptr,
    M, N, K, R, alpha, reserve,
    stride_dym, stride_xm, stride_ar, stride_ak, stride_bn, stride_br,
    SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, DW_SPLIT: tl.constexpr, DW_DOT: tl.constexpr,
):
    """part[tile] = sum over one (BLOCK_N, BLOCK_K) tile of |(B diag(lam_eff) A) * (dy.T x)|."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    g = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = rm < M
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.dot(tl.trans(dy.to(OP).to(DOT)), x.to(OP).to(DOT), g,
                   input_precision=PRECISION, out_dtype=ACC)
    # The dW tile after the sweep over M (not live during it), by chunks of 16 slots. With
    # 16-bit operands (DW_SPLIT) each float32 factor is split into three bfloat16 parts
    # (8 + 8 + 8 bits of mantissa: float32's 24) and dW is the six products of parts above
    # 2^-24 of the whole: tensor-core dots (float32 in the interpreter, DW_DOT) whose
    # accumulator has G's register layout. A float32 FMA dot's does not, and converting one
    # 128 x 128 tile into the other spilled registers; bfloat16 factors alone (one dot) were
    # 0.5 % off the score.
    dw = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    for r0 in range(0, R, 16):
        rr = r0 + tl.arange(0, 16)
        r_ok = rr < R
        lam_eff, coef = _slot_lambda(lam_ptr, state_ptr, rr, r_ok, R, alpha, reserve,
                                     SLOTS, BLOCK_R, ACC)
        live = lam_eff != 0
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(ACC)
        b = tl.where(live[None, :], b * lam_eff[None, :], 0.0)
        a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
        a = tl.where(live[:, None], a, 0.0)
        if DW_SPLIT:
            b0, b1, b2 = _split3(b, DW_DOT, ACC)
            a0, a1, a2 = _split3(a, DW_DOT, ACC)
            dw = tl.dot(b2, a0, dw, out_dtype=ACC)  # smallest terms first
            dw = tl.dot(b1, a1, dw, out_dtype=ACC)
            dw = tl.dot(b0, a2, dw, out_dtype=ACC)
            dw = tl.dot(b1, a0, dw, out_dtype=ACC)
            dw = tl.dot(b0, a1, dw, out_dtype=ACC)
            dw = tl.dot(b0, a0, dw, out_dtype=ACC)
        else:
            dw = tl.dot(b, a, dw, input_precision="ieee", out_dtype=ACC)
    part = tl.sum(tl.sum(tl.abs(dw * g), axis=1), axis=0)
    tl.store(part_ptr + pid_n * tl.num_programs(1) + pid_k, part)


def score_tiles(n: int, k: int, br: int, wide: bool, sms: int) -> Tuple[tuple, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_M) and warps of the exact score's tiles. Each program sweeps
    every row of dy and x for one (n, k) tile of G (the score's abs keeps M from being split),
    so the grid is what parallelism there is: 128 x 128 tiles, the size fast GEMMs use, where
    they still give every multiprocessor one; 64 x 64 on smaller layers; 32 x 32 for float32
    and float64 and above r_max 32."""
    if wide or br > 32:
        return (32, 32, 32), 8 if br >= 64 else 4
    if -(-n // 128) * -(-k // 128) >= sms:
        return (128, 128, 32), 8
    return (64, 64, 32), 4


def dw_dot(cfg: DotConfig, interpreted: bool) -> dict:
    """The dW dot's constexprs for G's dot configuration: split into bfloat16 parts when G's
    dot takes 16-bit operands; the interpreter, which has no bfloat16 dot, multiplies the same
    parts in float32."""
    return dict(DW_SPLIT=cfg.op in (tl.bfloat16, tl.float16),
                DW_DOT=tl.float32 if interpreted else tl.bfloat16)


def delta_w_score_(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, lam: torch.Tensor, score_out: torch.Tensor) -> None:
    """Add ``sum(|B diag(lam) A * (dy.T @ x)|) / sqrt(out * in)`` into the 0-d ``score_out``
    (the score on its own; the adapted linear's backward fuses the same kernel instead).

    Args:
        dy: (M, out), x: (M, in), any float dtypes and strides; G = dy.T x is computed in the
            wider of their dtypes with a float32 accumulator (float64 when either is float64).
        lora_A, lora_B: (r_max, in) and (out, r_max) slot buffers, any float dtype.
        lam: (r_max,) effective lambda (mask and scale applied); slots with lam == 0 are skipped.
        score_out: 0-d float32 (or float64) accumulator.
    """
    op = torch.promote_types(dy.dtype, x.dtype)
    if torch.float64 in (op, lora_A.dtype, lora_B.dtype, lam.dtype):
        op = torch.float64
    interpreted = is_interpreted(_score_tiles_kernel)
    cfg = dot_config(op, interpreted)
    dy, x = row_major(dy), row_major(x)
    lam = lam.contiguous()  # read with unit stride (`lowrank._slot_lambda`)
    (M, N), K, R = dy.shape, x.shape[1], lora_A.shape[0]
    if interpreted:
        (bn, bk, bm), warps = (16, 16, 16), 1
    else:  # the backward's tiles (`linear._Plan`)
        (bn, bk, bm), warps = score_tiles(N, K, block(R, MAX_R_MAX),
                                          op in (torch.float32, torch.float64),
                                          multiprocessor_count(dy.device))
    grid = (-(-N // bn), -(-K // bk))
    parts = torch.empty(grid[0] * grid[1], dtype=cfg.acc_torch, device=dy.device)
    utils.launch(_score_tiles_kernel, grid, dy, x, lora_A, lora_B, lam, lam, parts,
                 M, N, K, R, 1.0, 0.0, dy.stride(0), x.stride(0), *lora_A.stride(),
                 *lora_B.stride(), SLOTS=False, BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm,
                 BLOCK_R=block(R, MAX_R_MAX), OP=cfg.op, DOT=cfg.dot, ACC=cfg.acc,
                 PRECISION=cfg.precision, **dw_dot(cfg, interpreted), num_warps=warps)
    score_out.add_((parts.sum() / math.sqrt(N * K)).to(score_out.dtype))
