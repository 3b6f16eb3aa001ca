"""The adapter's part of an adapted linear's backward as cuBLAS GEMMs and aten ops: the other
design of what `lowrank._backward_rows_kernel` and `lowrank._finish_kernel` compute.

Issue 27 lets speed decide between designs. On the H200 (2026-12-05, 16,384 tokens, bf16,
r_max 16, GPU time of CUDA graph replays) this design took 0.17 ms at 768 -> 3072 and 0.44 ms at
4096 -> 11008 where the two kernels took 0.36 and 1.08 ms: each skinny GEMM is tuned by cuBLAS,
while the row kernel runs one program of 4 warps per SM. It issues about thirty ops where the
kernels launch two, so on small layers, and on the host of an eager step, it may well lose;
`linear._Plan.gemm_rows` says from how many rows a layer takes it (None: never, the default
until a GPU run has timed both at small shapes: gpu-check's dy-pass records).

The same quantities as the kernels, with the same masking by value (NaN or inf in a slot that
is not read never reaches a result): T = dy B_read and G_B = dy^T H_read with float32 results
(``out_dtype`` on CUDA, operands widened elsewhere), S = T lam_eff on live slots rounded to the
compute dtype, dx += S A_live (cuBLAS ``addmm_`` in place), dA = S^T x, dB = G_B lam_eff on live
slots, dlambda = coef * sum_m H T. Deterministic (no split-K atomics in these cuBLAS calls).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .reference import _mm_out_dtype_supported, slot_factors


def _mm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` with an ``acc`` (float32 or float64) result: products of 16-bit operands are
    exact in float32, so widening them gives what a tensor-core GEMM with a float32 accumulator
    gives (up to the order of the sum)."""
    if a.dtype == b.dtype == acc:
        return a @ b
    if a.dtype == b.dtype and _mm_out_dtype_supported(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


def gemm_adapter_backward(dy: torch.Tensor, xa: torch.Tensor, lora_A: torch.Tensor,
                          lora_B: torch.Tensor, lora_lambda: torch.Tensor,
                          slot_state: Optional[torch.Tensor], alpha: float, reserve: float,
                          h: torch.Tensor, dx: Optional[torch.Tensor], accumulate: bool,
                          need_a: bool, need_b: bool, need_lam: bool, acc: torch.dtype
                          ) -> Tuple[Optional[torch.Tensor], ...]:
    """(dA, dB, dlambda), None where not needed, in the dtypes of A, B and lambda; the
    adapter's dx written into ``dx`` when given (added to what it holds with ``accumulate``,
    as into the base's ``dy W``).

    Args:
        dy: (M, out) in the compute dtype; xa: (M, in), the adapter's input.
        h: (M, r_max), the forward's ``x A^T`` (float32, or float64).
        acc: float32, or float64 for float64 computations.
    """
    cdt = dy.dtype
    lam_eff, coef = slot_factors(lora_lambda, slot_state, alpha, reserve, acc)
    live = lam_eff != 0
    read = live | (coef != 0) if need_lam else live  # an active slot at lambda 0: its dlambda
    t = _mm(dy, torch.where(read, lora_B, 0.0).to(cdt), acc)
    d_a = d_b = dlam = None
    if dx is not None or need_a:
        s = torch.where(live, t * lam_eff, 0.0).to(cdt)
        if dx is not None:
            a_live = torch.where(live[:, None], lora_A, 0.0).to(cdt)
            if accumulate:
                dx.addmm_(s, a_live)
            else:  # a separate adapter input (dropout): dx is its own, maybe of another dtype
                dx.copy_(s @ a_live)
        if need_a:
            d_a = _mm(s.t(), xa, acc).to(lora_A.dtype)
    h_read = torch.where(read, h, 0.0)
    if need_b:
        g_b = _mm(dy.t(), h_read.to(cdt), acc)
        d_b = torch.where(live, g_b * lam_eff, 0.0).to(lora_B.dtype)
    if need_lam:
        dlam = ((h_read.to(acc) * t).sum(0) * coef).to(lora_lambda.dtype)
    return d_a, d_b, dlam
