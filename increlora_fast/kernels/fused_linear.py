"""Opt-in forward of `linear.adapted_linear_triton` with ``fused_gemm=True``: the base linear and
the adapter in one Triton GEMM, ``y = x W^T + bias + (H * lam_eff) B^T``.

H = x A^T is computed once beforehand by `_project_kernel` (M x r_max float32, small); each
program of this GEMM owns one (BLOCK_M, BLOCK_N) tile of y, runs the base GEMM over K, adds
``(H * lam_eff) B^T`` for its rows from the stored H (no recomputation per column tile), then the
bias, and writes y once. Programs are rastered in groups of GROUP_M row tiles so that the x rows
of a group stay in L2 while the group sweeps the columns. Block sizes are autotuned on CUDA.
The backward is the unfused one (cuBLAS dx plus the adapter kernels).

It stays opt-in (``INCRELORA_FUSED_LINEAR=1``) until a GPU benchmark shows it beats cuBLAS plus
the in-place adapter kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .lowrank import Slots, _accumulate_scaled_slots, _accumulate_x_wt
from . import utils
from .utils import TOKEN_ARGS, DotConfig, is_interpreted


def _configs() -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                                     (64, 128, 64, 4, 4), (128, 64, 32, 4, 4))]


# M and M_BUCKET (the autotune key, read on the host) are the token count: unspecialised, as in
# the adapter kernels (`utils.TOKEN_ARGS`), so one build serves every batch
@triton.jit(do_not_specialize=TOKEN_ARGS + ("M_BUCKET",))
def _fused_linear_adapter_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, lam_ptr, state_ptr, y_ptr,
    M, N, K, R, alpha, reserve,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr, stride_bn, stride_br,
    stride_ym, stride_yn, M_BUCKET,
    HAS_BIAS: tl.constexpr, SLOTS: tl.constexpr, R_ALL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y = x W^T + bias + (H * lam_eff) B^T; ``M_BUCKET`` (the
    power of two above M) is only the autotune key."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = _accumulate_x_wt(tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), x_ptr, w_ptr, rm, rn, m_ok,
                           n_ok, K, stride_xm, stride_xk, stride_wn, stride_wk,
                           BLOCK_K, OP, DOT, ACC, PRECISION)
    acc, _ = _accumulate_scaled_slots(acc, h_ptr, b_ptr, lam_ptr, state_ptr, rm, rn, m_ok, n_ok,
                                      R, alpha, reserve, stride_hm, stride_hr, stride_br,
                                      stride_bn, SLOTS, R_ALL, BLOCK_R, OP, DOT, ACC, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# The same kernel with autotuned blocks (CUDA, 16-bit dtypes), tuned per power-of-two row bucket
# rather than per exact M, so a new batch size reuses the tuning.
_fused_linear_adapter_tuned = triton.autotune(configs=_configs(),
                                              key=["M_BUCKET", "N", "K", "R"])(
    _fused_linear_adapter_kernel)


def fused_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         weight_in_out: bool, h: torch.Tensor, lora_B: torch.Tensor,
                         slots: Slots, cfg: DotConfig) -> torch.Tensor:
    """y (M, out) from x, the base weight ((out, in), or (in, out) when ``weight_in_out``), bias
    and the precomputed H; all operands already in the compute dtype but the adapter's."""
    M, K = x.shape
    R, N = lora_B.shape[1], lora_B.shape[0]
    stride_wn, stride_wk = (weight.stride(1), weight.stride(0)) if weight_in_out \
        else (weight.stride(0), weight.stride(1))
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    lam, state = slots.args()
    args = (x, weight, bias if bias is not None else lam, h, lora_B, lam, state, y,
            M, N, K, R, slots.alpha, slots.reserve,
            x.stride(0), x.stride(1), stride_wn, stride_wk, h.stride(0), h.stride(1),
            lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
            triton.next_power_of_2(max(M, 1)))
    consts = dict(HAS_BIAS=bias is not None, **slots.consts(), BLOCK_R=16,
                  OP=cfg.op, DOT=cfg.dot, ACC=cfg.acc, PRECISION=cfg.precision)
    wide = x.dtype in (torch.float32, torch.float64)
    if is_interpreted(_fused_linear_adapter_kernel) or wide:
        # IEEE float32 / float64 dots spill registers on big tiles; the interpreter wants small.
        bm, bn, bk = (16, 16, 16) if is_interpreted(_fused_linear_adapter_kernel) else (64, 64, 16)
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        utils.launch(_fused_linear_adapter_kernel, grid, *args, BLOCK_M=bm, BLOCK_N=bn,
                     BLOCK_K=bk, GROUP_M=8, **consts, num_warps=4)
    else:
        if M == 0:
            return y

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        utils.launch(_fused_linear_adapter_tuned, grid, *args, **consts)
    return y
