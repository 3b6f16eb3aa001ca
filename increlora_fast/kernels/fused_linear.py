"""The base linear and the adapter in one GEMM: ``y = x W.T + bias + ((x A.T) * lam) B.T``.

Each program owns one (BLOCK_M, BLOCK_N) tile of y: it runs the base GEMM over K, then for each
slot block with a nonzero lam it builds ``H = x A.T`` for its rows (a second loop over the same
x rows, which are hot in L2) and adds ``(H * lam) B.T`` to the accumulator before y is written.
Passes: y is written once and never read back; x is read once per column tile by the base GEMM
(as in any GEMM) and once more per live slot block. The programs of the first column tile also
store H (float32, M x r_max) for the backward, visiting every slot block when lam requires a
gradient (active slots start at lambda = 0).

Backward: dx of the base is one cuBLAS GEMM ``dy @ W``; the adapter part is added onto it inside
the low-rank backward's expand kernel (no extra pass over dx). The base weight and bias must be
frozen. Dropout on the adapter input is not supported here: the layer uses this op only when
dropout is inactive.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .lowrank import _any_nonzero, acc_dtype, check_adapter_args, lowrank_backward_op
from .utils import block, check_dtype, compute_dtype, dot_config, is_interpreted, launch

_OP = "fused_linear_adapter"


@triton.jit
def _fused_linear_adapter_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, lam_ptr, y_ptr, h_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_hm, stride_hr,
    HAS_BIAS: tl.constexpr, ALL_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    OP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y = x W.T + bias + ((x A.T) * lam) B.T; column tile 0
    also stores H = x A.T."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x.to(OP).to(DOT), w.to(OP).to(DOT), acc,
                     input_precision=PRECISION, out_dtype=ACC)
    first_col = (pid_n == 0).to(tl.int32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        lam = tl.load(lam_ptr + rr, mask=r_ok, other=0.0).to(ACC)
        live = _any_nonzero(lam)
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        if live + first_col * ALL_SLOTS > 0:
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                a = tl.load(a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar,
                            mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                h = tl.dot(x.to(OP).to(DOT), a.to(OP).to(DOT), h,
                           input_precision=PRECISION, out_dtype=ACC)
        if pid_n == 0:
            tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr,
                     h.to(h_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])
        if live > 0:
            b = tl.load(b_ptr + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            s = h * lam[None, :]
            acc = tl.dot(s.to(OP).to(DOT), b.to(OP).to(DOT), acc,
                         input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fused_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         weight_in_out: bool, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         lam: torch.Tensor, out_dtype: torch.dtype,
                         all_slots: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, H) with H = x @ A.T in float32 for the backward.

    ``weight`` is (out, in) like nn.Linear, or (in, out) like transformers Conv1D when
    ``weight_in_out``.
    """
    M, K = x.shape
    R, N = lora_A.shape[0], lora_B.shape[0]
    small = is_interpreted(_fused_linear_adapter_kernel)
    cfg = dot_config(out_dtype, small)
    if small:
        bm, bn, bk, br = 16, 16, 16, 16
    else:
        # 128 x 128 tiles on tensor cores; IEEE float32 / float64 dots spill registers there.
        wide = out_dtype in (torch.float32, torch.float64)
        bm, bn, bk, br = (64, 64, 16, 16) if wide else (128, 128, 32, block(R, 32))
    stride_wn, stride_wk = (weight.stride(1), weight.stride(0)) if weight_in_out \
        else (weight.stride(0), weight.stride(1))
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    h = torch.empty((M, R), dtype=cfg.acc_torch, device=x.device)
    launch(_fused_linear_adapter_kernel, (triton.cdiv(M, bm), triton.cdiv(N, bn)),
           x, weight, bias if bias is not None else lam, lora_A, lora_B, lam, y, h,
           M, N, K, R,
           x.stride(0), x.stride(1), stride_wn, stride_wk,
           lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
           y.stride(0), y.stride(1), h.stride(0), h.stride(1),
           HAS_BIAS=bias is not None, ALL_SLOTS=int(all_slots),
           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
           OP=cfg.op, DOT=cfg.dot, ACC=cfg.acc, PRECISION=cfg.precision,
           num_warps=8 if bm * bn >= 128 * 128 else 4)
    return y, h


@torch.library.custom_op("increlora::fused_linear_fwd", mutates_args=())
def _fused_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         weight_in_out: bool, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         lam: torch.Tensor, out_dtype: torch.dtype,
                         all_slots: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return fused_linear_forward(x, weight, bias, weight_in_out, lora_A, lora_B, lam, out_dtype,
                                all_slots)


@_fused_linear_fwd_op.register_fake
def _(x, weight, bias, weight_in_out, lora_A, lora_B, lam, out_dtype, all_slots):
    M = x.shape[0]
    return (x.new_empty((M, lora_B.shape[0]), dtype=out_dtype),
            x.new_empty((M, lora_A.shape[0]), dtype=acc_dtype(out_dtype)))


class FusedLinearAdapterFunction(torch.autograd.Function):
    """Autograd of `fused_linear_adapter`; the base weight and bias get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_in_out, lora_A, lora_B, lam, score_out, triplet_out,
                out_dtype):
        y, h = _fused_linear_fwd_op(x, weight, bias, weight_in_out, lora_A, lora_B, lam,
                                    out_dtype, ctx.needs_input_grad[6])
        ctx.save_for_backward(x, weight, lora_A, lora_B, lam, h)
        ctx.weight_in_out = weight_in_out
        ctx.score_out = score_out
        ctx.triplet_out = triplet_out
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, lam, h = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0],) + tuple(ctx.needs_input_grad[4:7])
        dx_base = None
        if needs[0]:
            w = weight.to(dy.dtype)
            dx_base = dy @ (w.t() if ctx.weight_in_out else w)
        dx, da, db, dlam = lowrank_backward_op(dy, x, lora_A, lora_B, lam, h, ctx.score_out,
                                               ctx.triplet_out, dx_base, needs)
        return dx, None, None, None, da, db, dlam, None, None, None


def fused_linear_adapter(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         lora_A: torch.Tensor, lora_B: torch.Tensor, lam: torch.Tensor,
                         score_out: Optional[torch.Tensor] = None,
                         triplet_out: Optional[torch.Tensor] = None,
                         weight_in_out: bool = False) -> torch.Tensor:
    """``x @ W.T + bias + ((x @ lora_A.T) * lam) @ lora_B.T`` in one Triton GEMM.

    Args:
        x: (M, in), any strides.
        weight: frozen base weight, (out, in), or (in, out) with ``weight_in_out=True``
            (transformers Conv1D).
        bias: frozen (out,) or None.
        lora_A, lora_B, lam, score_out, triplet_out: as in `lowrank.lowrank_adapter`.

    Returns:
        (M, out) in the compute dtype (autocast dtype, else the promoted operand dtype).
    """
    device = check_adapter_args(_OP, x, lora_A, lora_B, lam, score_out, triplet_out)
    check_dtype(_OP, "weight", weight)
    n, k = lora_B.shape[0], x.shape[1]
    expected = (k, n) if weight_in_out else (n, k)
    if tuple(weight.shape) != expected:
        raise ValueError(f"{_OP}: weight must have shape {expected} (weight_in_out="
                         f"{weight_in_out}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{_OP}: bias must have shape ({n},), got {tuple(bias.shape)}")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError(f"{_OP}: the base weight and bias must be frozen (requires_grad=False)")
    if weight.device != device or (bias is not None and bias.device != device):
        raise ValueError(f"{_OP}: weight and bias must be on {device} like x")
    out_dtype = compute_dtype(device, x, weight, lora_A, lora_B)
    # The kernels index lam and bias with unit stride.
    return FusedLinearAdapterFunction.apply(x, weight, None if bias is None else bias.contiguous(),
                                            weight_in_out, lora_A, lora_B, lam.contiguous(),
                                            score_out, triplet_out, out_dtype)
