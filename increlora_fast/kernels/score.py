"""The exact IncreLoRA module score ``sum(|dW * G|) / sqrt(out * in)``, reduced tile by tile.

``dW = B diag(lam) A`` and ``G = dy.T @ x`` are (out, in); neither is ever stored. Each program
owns one (BLOCK_N, BLOCK_K) tile: it builds the dW tile from the slot buffers (skipping slot
blocks whose lam is all zero), and only when that tile has any live slot it builds the G tile by
a loop over all M rows of dy and x, then adds ``sum |dW * G|`` atomically into the scalar.
Passes: in/BLOCK_K over dy and out/BLOCK_N over x (it is the GEMM dy.T @ x), nothing written but
one atomic add per tile. Called only on steps where a score accumulator is passed.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import block, dot_config, is_interpreted, launch


@triton.jit
def _delta_w_score_kernel(
    dy_ptr, x_ptr, a_ptr, b_ptr, lam_ptr, score_ptr,
    M, N, K, R, inv_norm,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """score += inv_norm * sum over one (BLOCK_N, BLOCK_K) tile of |(B diag(lam) A) * (dy.T x)|."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    dw = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    live = 0
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        lam = tl.load(lam_ptr + rr, mask=r_ok, other=0.0).to(ACC)
        nonzero = tl.sum((lam != 0).to(tl.int32), axis=0)
        if nonzero > 0:
            b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(ACC) * lam[None, :]
            a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            dw = tl.dot(b.to(OP).to(DOT), a.to(OP).to(DOT), dw,
                        input_precision=PRECISION, out_dtype=ACC)
        live += nonzero
    if live > 0:
        g = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
        for m0 in range(0, M, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < M
            dy_t = tl.load(dy_ptr + rn[:, None] * stride_dyn + rm[None, :] * stride_dym,
                           mask=n_ok[:, None] & m_ok[None, :], other=0.0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.dot(dy_t.to(OP).to(DOT), x.to(OP).to(DOT), g,
                       input_precision=PRECISION, out_dtype=ACC)
        part = tl.sum(tl.sum(tl.abs(dw * g), axis=1), axis=0) * inv_norm
        tl.atomic_add(score_ptr, part.to(score_ptr.dtype.element_ty))


def delta_w_score_(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, lam: torch.Tensor, score_out: torch.Tensor) -> None:
    """Add ``sum(|B diag(lam) A * (dy.T @ x)|) / sqrt(out * in)`` into the 0-d ``score_out``.

    dy (M, out) and x (M, in) may have any strides; the operands are rounded to dy's dtype
    before each tl.dot and accumulated in float32 (float64 for float64).
    """
    M, N = dy.shape
    K = x.shape[1]
    R = lora_A.shape[0]
    small = is_interpreted(_delta_w_score_kernel)
    cfg = dot_config(dy.dtype, small)
    bn, bk, bm, br = (16, 16, 16, 16) if small else (64, 64, 32, block(R, 32))
    launch(_delta_w_score_kernel, (triton.cdiv(N, bn), triton.cdiv(K, bk)),
           dy, x, lora_A, lora_B, lam, score_out,
           M, N, K, R, 1.0 / math.sqrt(N * K),
           dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
           lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
           BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm, BLOCK_R=br,
           OP=cfg.op, DOT=cfg.dot, ACC=cfg.acc, PRECISION=cfg.precision)
