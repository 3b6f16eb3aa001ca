"""The exact IncreLoRA module score ``sum(|dW * G|) / sqrt(out * in)``, in cuBLAS chunks.

``dW = B diag(lam) A`` and ``G = dy.T @ x`` are (out, in); neither is ever stored whole.
`reference.weight_grad_chunks` computes G in chunks of ``rows`` columns of dy with cuBLAS
(``torch.mm``, bf16/fp16 operands with a float32 output where torch supports it) into one reused
float32 (rows, in) buffer, about 4 MB, which stays in L2. After each chunk `_delta_w_score_kernel`
reads it once: every program builds its (BLOCK_N, BLOCK_K) tile of dW from the slot buffers by
rank-1 updates (skipping slots whose lam is 0, so a dead slot's values are never read) and stores
``sum |dW * G|`` of the tile into its own partial. The partials are summed once at the end, in a
fixed order: no atomics, the result is deterministic.

Per call: ceil(out / rows) GEMMs (dy read once in all, x once per chunk), as many epilogue
launches, one reduction; nothing of size M x out, M x in or out x in is allocated.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import score_chunk_rows, weight_grad_chunks
from .utils import is_interpreted, launch


@triton.jit
def _delta_w_score_kernel(
    g_ptr, a_ptr, b_ptr, lam_ptr, part_ptr,
    N, K, R, part_offset,
    stride_gn, stride_ar, stride_ak, stride_bn, stride_br,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """part[part_offset + tile] = sum over one (BLOCK_N, BLOCK_K) tile of |(B diag(lam) A) * G|,
    for one chunk: G (N, K) and B (N, R) are that chunk's rows."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    n_ok = rn < N
    k_ok = rk < K
    dw = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    for r in range(0, R):
        lam = tl.load(lam_ptr + r).to(ACC)
        if lam != 0:
            b = tl.load(b_ptr + rn * stride_bn + r * stride_br, mask=n_ok, other=0.0).to(ACC)
            a = tl.load(a_ptr + r * stride_ar + rk * stride_ak, mask=k_ok, other=0.0).to(ACC)
            dw += (b * lam)[:, None] * a[None, :]
    g = tl.load(g_ptr + rn[:, None] * stride_gn + rk[None, :],
                mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    part = tl.sum(tl.sum(tl.abs(dw * g.to(ACC)), axis=1), axis=0)
    tile = pid_n * tl.num_programs(1) + pid_k
    tl.store(part_ptr + part_offset + tile, part)


def delta_w_score_(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, lam: torch.Tensor, score_out: torch.Tensor, *,
                   chunk_rows: Optional[int] = None) -> None:
    """Add ``sum(|B diag(lam) A * (dy.T @ x)|) / sqrt(out * in)`` into the 0-d ``score_out``.

    Args:
        dy: (M, out), any float dtype and strides.
        x: (M, in), any float dtype and strides (may differ from dy's and from the adapter's).
        lora_A, lora_B: (r_max, in) and (out, r_max) slot buffers, any float dtype.
        lam: (r_max,) effective lambda (mask and scale applied); slots with lam == 0 are skipped.
        score_out: 0-d float32 (or float64) accumulator.
        chunk_rows: columns of dy per chunk; default `reference.score_chunk_rows`.

    G and dW are accumulated in float32 (float64 when any input is float64).
    """
    N, K = dy.shape[1], x.shape[1]
    R = lora_A.shape[0]
    wide = torch.float64 in (dy.dtype, x.dtype, lora_A.dtype, lora_B.dtype, lam.dtype)
    acc, acc_tl = (torch.float64, tl.float64) if wide else (torch.float32, tl.float32)
    rows = min(chunk_rows or score_chunk_rows(N, K), N)
    lam = lam.contiguous()
    if is_interpreted(_delta_w_score_kernel):
        bn, bk, warps = 16, 16, 1
    else:
        bn, bk, warps = 32, 64, 4
    tiles = triton.cdiv(rows, bn) * triton.cdiv(K, bk)
    n_chunks = triton.cdiv(N, rows)
    parts = torch.zeros(n_chunks * tiles, dtype=acc, device=dy.device)
    guard = torch.cuda.device(dy.device) if dy.is_cuda else contextlib.nullcontext()
    with guard:
        for i, (n0, n1, g) in enumerate(weight_grad_chunks(dy, x, acc, rows)):
            b = lora_B[n0:n1]
            launch(_delta_w_score_kernel, (triton.cdiv(n1 - n0, bn), triton.cdiv(K, bk)),
                   g, lora_A, b, lam, parts,
                   n1 - n0, K, R, i * tiles,
                   g.stride(0), lora_A.stride(0), lora_A.stride(1), b.stride(0), b.stride(1),
                   BLOCK_N=bn, BLOCK_K=bk, ACC=acc_tl, num_warps=warps)
        score_out.add_((parts.sum() / math.sqrt(N * K)).to(score_out.dtype))
