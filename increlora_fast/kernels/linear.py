"""The whole adapted linear as one autograd op: ``y = x W^T + bias + ((x A^T) * lam_eff) B^T``.

Forward: cuBLAS writes y (the frozen layer's own GEMM), `_project_kernel` writes the small
H = x A^T (M x r_max, float32) and `_expand_kernel` adds the adapter into y **in place**. With
``fused_gemm`` one Triton GEMM writes y with the adapter already in its accumulator instead
(opt-in, `fused_linear.py`).

Backward: cuBLAS writes dx = dy W; one pass over dy (`_dy_pass_kernel`) gives T = dy B and
G_B = dy^T H; `_expand_kernel` adds the adapter's dx = (T * lam_eff) A into dx in place;
`_finish_b_kernel` derives dB and dlambda from G_B; one pass over x (`_reduce_rows_kernel`) gives
dA. No activation-sized tensor is allocated beyond the frozen layer's y and dx, and nothing of
size out x in.

The slot mask, the reserve value and the ``alpha / active_rank`` scale are applied inside the
kernels (`lowrank.Slots`), so a forward+backward issues a handful of torch ops however many slots
are in use. Eager calls run the Python implementation directly; under ``torch.compile`` the same
code runs inside the custom ops ``increlora::adapted_linear_fwd`` / ``_bwd`` so dynamo sees
opaque ops with fake implementations.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .lowrank import Slots, dy_pass, expand_, finish_b, project_, reduce_rows
from .utils import (MAX_R_MAX, acc_dtype, check_device, check_dtype, compute_dtype,
                    dot_config, is_interpreted, row_major)

_OP = "adapted_linear_triton"


def _base_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  weight_in_out: bool) -> torch.Tensor:
    """cuBLAS ``x W^T + bias``, or ``x W + bias`` for a transformers Conv1D weight (in, out)."""
    if weight_in_out:
        return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
    return torch.nn.functional.linear(x, weight, bias)


def _in_dtype(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def adapted_linear_forward(x: torch.Tensor, x_adapter: Optional[torch.Tensor],
                           weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           weight_in_out: bool, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           lora_lambda: torch.Tensor, slot_state: Optional[torch.Tensor],
                           alpha: float, reserve: float, out_dtype: torch.dtype,
                           need_all: bool, fused_gemm: bool
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, H). ``x`` and ``x_adapter`` are in ``out_dtype`` with unit inner stride; without a
    weight y is the adapter output alone."""
    xa = x if x_adapter is None else x_adapter
    M = x.shape[0]
    R, N = lora_A.shape[0], lora_B.shape[0]
    cfg = dot_config(out_dtype, is_interpreted_backend())
    slots = Slots(lora_lambda, slot_state, alpha, reserve)
    h = torch.empty((M, R), dtype=cfg.acc_torch, device=x.device)
    project_(xa, lora_A, slots, h, cfg, need_all)
    if weight is None:
        y = torch.empty((M, N), dtype=out_dtype, device=x.device)
        expand_(h, slots, lora_B.t(), y, cfg, accumulate=False)
        return y, h
    w = _in_dtype(weight, out_dtype)
    b = _in_dtype(bias, out_dtype)
    if fused_gemm and x_adapter is None:
        from .fused_linear import fused_linear_forward
        return fused_linear_forward(x, w, b, weight_in_out, h, lora_B, slots, cfg), h
    y = _base_forward(x, w, b, weight_in_out)
    expand_(h, slots, lora_B.t(), y, cfg, accumulate=True)
    return y, h


def adapted_linear_backward(dy: torch.Tensor, x: torch.Tensor, x_adapter: Optional[torch.Tensor],
                            weight: Optional[torch.Tensor], weight_in_out: bool,
                            lora_A: torch.Tensor, lora_B: torch.Tensor,
                            lora_lambda: torch.Tensor, slot_state: Optional[torch.Tensor],
                            alpha: float, reserve: float, h: torch.Tensor,
                            score_out: Optional[torch.Tensor], grad_out: Optional[torch.Tensor],
                            need_x: bool, need_xa: bool, need_a: bool, need_b: bool,
                            need_lam: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dx_adapter, dA, dB, dlambda), None where not needed.

    dx carries the base's ``dy W`` and, when the adapter reads x itself, the adapter's dx added
    in place; with a separate adapter input (dropout) its gradient is dx_adapter. Adds the exact
    module score into ``score_out`` and ``dy^T x`` into ``grad_out`` when given.
    """
    dy = row_major(dy)
    xa = x if x_adapter is None else x_adapter
    cfg = dot_config(dy.dtype, is_interpreted_backend())
    slots = Slots(lora_lambda, slot_state, alpha, reserve)
    reads_x = x_adapter is None  # the adapter's input is x itself
    need_adapter_dx = need_x if reads_x else need_xa
    dx = dxa = None
    if need_x and weight is not None:
        w = _in_dtype(weight, dy.dtype)
        dx = torch.mm(dy, w.t() if weight_in_out else w)
    t, gb = dy_pass(dy, lora_B, h, slots, cfg, need_all=need_lam,
                    need_t=need_adapter_dx or need_a, need_gb=need_b or need_lam)
    if need_adapter_dx:
        if reads_x and dx is not None:
            expand_(t, slots, lora_A, dx, cfg, accumulate=True)
        else:
            fresh = torch.empty(xa.shape, dtype=xa.dtype, device=xa.device)
            expand_(t, slots, lora_A, fresh, cfg, accumulate=False)
            if reads_x:
                dx = fresh
            else:
                dxa = fresh
    da = reduce_rows(t, slots, xa, lora_A, cfg) if need_a else None
    db = dlam = None
    if need_b or need_lam:
        db, dlam = finish_b(gb, lora_B, slots, need_b, need_lam, lora_lambda.dtype)
    if score_out is not None:
        from ..reference import effective_lambda
        from .score import delta_w_score_
        # The score kernel never reads slots whose lam_eff is 0 (NaN there cannot count).
        lam = effective_lambda(lora_lambda, slot_state, alpha, reserve).detach()
        delta_w_score_(dy, xa, lora_A, lora_B, lam, score_out)
    if grad_out is not None:
        from ..reference import accumulate_dense_grad_
        accumulate_dense_grad_(grad_out, dy, xa)
    return dx, dxa, da, db, dlam


def is_interpreted_backend() -> bool:
    from .lowrank import _project_kernel
    return is_interpreted(_project_kernel)


# ---------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("increlora::adapted_linear_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, x_adapter: Optional[torch.Tensor], weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], weight_in_out: bool, lora_A: torch.Tensor,
            lora_B: torch.Tensor, lora_lambda: torch.Tensor, slot_state: Optional[torch.Tensor],
            alpha: float, reserve: float, out_dtype: torch.dtype, need_all: bool,
            fused_gemm: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return adapted_linear_forward(x, x_adapter, weight, bias, weight_in_out, lora_A, lora_B,
                                  lora_lambda, slot_state, alpha, reserve, out_dtype, need_all,
                                  fused_gemm)


@_fwd_op.register_fake
def _(x, x_adapter, weight, bias, weight_in_out, lora_A, lora_B, lora_lambda, slot_state, alpha,
      reserve, out_dtype, need_all, fused_gemm):
    M = x.shape[0]
    return (x.new_empty((M, lora_B.shape[0]), dtype=out_dtype),
            x.new_empty((M, lora_A.shape[0]), dtype=acc_dtype(out_dtype)))


@torch.library.custom_op("increlora::adapted_linear_bwd", mutates_args=("score_out", "grad_out"))
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, x_adapter: Optional[torch.Tensor],
            weight: Optional[torch.Tensor], weight_in_out: bool, lora_A: torch.Tensor,
            lora_B: torch.Tensor, lora_lambda: torch.Tensor, slot_state: Optional[torch.Tensor],
            alpha: float, reserve: float, h: torch.Tensor, score_out: Optional[torch.Tensor],
            grad_out: Optional[torch.Tensor], need_x: bool, need_xa: bool, need_a: bool,
            need_b: bool, need_lam: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, torch.Tensor]:
    grads = adapted_linear_backward(dy, x, x_adapter, weight, weight_in_out, lora_A, lora_B,
                                    lora_lambda, slot_state, alpha, reserve, h, score_out,
                                    grad_out, need_x, need_xa, need_a, need_b, need_lam)
    # A custom op returns tensors only: an empty one stands for "not needed".
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_bwd_op.register_fake
def _(dy, x, x_adapter, weight, weight_in_out, lora_A, lora_B, lora_lambda, slot_state, alpha,
      reserve, h, score_out, grad_out, need_x, need_xa, need_a, need_b, need_lam):
    def like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed \
            else x.new_empty(0)
    return (like(x, need_x), like(x_adapter, need_xa and x_adapter is not None),
            like(lora_A, need_a),
            like(lora_B, need_b), like(lora_lambda, need_lam))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class AdaptedLinearFunction(torch.autograd.Function):
    """Autograd of `adapted_linear_triton`; the frozen base weight and bias get no gradient."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, weight_in_out, lora_A, lora_B, lora_lambda,
                slot_state, alpha, reserve, score_out, grad_out, out_dtype, fused_gemm):
        need_all = ctx.needs_input_grad[7]
        args = (x, x_adapter, weight, bias, weight_in_out, lora_A, lora_B, lora_lambda,
                slot_state, alpha, reserve, out_dtype, need_all, fused_gemm)
        y, h = _fwd_op(*args) if _compiling() else adapted_linear_forward(*args)
        ctx.save_for_backward(x, x_adapter, weight, lora_A, lora_B, lora_lambda, slot_state, h)
        ctx.meta = (weight_in_out, alpha, reserve, score_out, grad_out)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, x_adapter, weight, lora_A, lora_B, lora_lambda, slot_state, h = ctx.saved_tensors
        weight_in_out, alpha, reserve, score_out, grad_out = ctx.meta
        n = ctx.needs_input_grad
        need = (n[0], n[1], n[5], n[6], n[7])
        args = (dy, x, x_adapter, weight, weight_in_out, lora_A, lora_B, lora_lambda,
                slot_state, alpha, reserve, h, score_out, grad_out, *need)
        if _compiling():
            grads = tuple(g if wanted else None for g, wanted in zip(_bwd_op(*args), need))
        else:
            grads = adapted_linear_backward(*args)
        dx, dxa, da, db, dlam = grads
        return (dx, dxa, None, None, None, da, db, dlam, None, None, None, None, None, None,
                None)


def check_adapter_args(op_name: str, x: torch.Tensor, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, lora_lambda: torch.Tensor,
                       slot_state: Optional[torch.Tensor],
                       score_out: Optional[torch.Tensor],
                       weight: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None,
                       weight_in_out: bool = False) -> torch.device:
    """Validate the operands of an adapted linear; returns their device."""
    for name, t, nd in (("x", x, 2), ("lora_A", lora_A, 2), ("lora_B", lora_B, 2),
                        ("lora_lambda", lora_lambda, 1)):
        if t.dim() != nd:
            raise ValueError(f"{op_name}: {name} must be {nd}-D, got shape {tuple(t.shape)}")
        check_dtype(op_name, name, t)
    r, k = lora_A.shape
    n = lora_B.shape[0]
    if x.shape[1] != k or lora_B.shape[1] != r or lora_lambda.shape[0] != r:
        raise ValueError(f"{op_name}: shapes do not chain: x {tuple(x.shape)}, lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}, lambda "
                         f"{tuple(lora_lambda.shape)}; need x (M, in), A (r, in), B (out, r), "
                         f"lambda (r,)")
    if r > MAX_R_MAX:
        raise ValueError(f"{op_name}: r_max={r} is above the kernels' limit {MAX_R_MAX}; use the "
                         f"torch path (INCRELORA_BACKEND=torch)")
    if slot_state is not None and (tuple(slot_state.shape) != (r,)
                                   or slot_state.dtype != torch.int8):
        raise ValueError(f"{op_name}: slot_state must be an int8 ({r},) tensor, got "
                         f"{slot_state.dtype} {tuple(slot_state.shape)}")
    if score_out is not None and (score_out.dim() != 0
                                  or score_out.dtype not in (torch.float32, torch.float64)):
        raise ValueError(f"{op_name}: score_out must be a 0-d float32 tensor, got shape "
                         f"{tuple(score_out.shape)} dtype {score_out.dtype}")
    if weight is not None:
        check_dtype(op_name, "weight", weight)
        expected = (k, n) if weight_in_out else (n, k)
        if tuple(weight.shape) != expected:
            raise ValueError(f"{op_name}: weight must have shape {expected} (weight_in_out="
                             f"{weight_in_out}), got {tuple(weight.shape)}")
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError(f"{op_name}: the base weight and bias must be frozen "
                             f"(requires_grad=False)")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"{op_name}: bias must have shape ({n},), got {tuple(bias.shape)}")
    from .lowrank import _project_kernel
    return check_device(_project_kernel, op_name, x=x, lora_A=lora_A, lora_B=lora_B,
                        lora_lambda=lora_lambda, slot_state=slot_state, score_out=score_out,
                        weight=weight, bias=bias)


def adapted_linear_triton(x: torch.Tensor, weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                          lora_B: torch.Tensor, lora_lambda: torch.Tensor,
                          slot_state: Optional[torch.Tensor], lora_alpha: float = 1.0,
                          reserve_value: float = 0.0, *, weight_in_out: bool = False,
                          x_adapter: Optional[torch.Tensor] = None,
                          score_out: Optional[torch.Tensor] = None,
                          grad_out: Optional[torch.Tensor] = None,
                          fused_gemm: bool = False) -> torch.Tensor:
    """``x W^T + bias + ((x_a A^T) * lam_eff) B^T`` for a 2-D ``x`` as one autograd op.

    Args:
        x: (M, in), any strides (a non-unit inner stride is made contiguous first).
        weight: the frozen base weight, (out, in) like nn.Linear or (in, out) like transformers
            Conv1D (``weight_in_out=True``); None returns the adapter output alone.
        bias: frozen (out,) or None.
        lora_A (r_max, in), lora_B (out, r_max), lora_lambda (r_max,): the slot buffers, any
            float dtype (float32 adapters on a bfloat16 base are read as they are).
        slot_state: int8 (r_max,) slot states (2 active, 1 reserve, 0 inactive) for slot mode,
            or None for direct mode (``lora_lambda`` used as the effective lambda itself).
        lora_alpha, reserve_value: the scale numerator and the reserve slots' fixed lambda.
        x_adapter: a different adapter input (dropout(x)); its gradient is returned separately.
        score_out: 0-d float32; each backward adds the exact module score
            ``sum(|dW * G|) / sqrt(out * in)`` to it.
        grad_out: (out, in) float32; each backward adds ``G = dy^T x_a`` to it (exact-step mode).
        fused_gemm: base and adapter in one Triton GEMM (`fused_linear.py`) instead of cuBLAS
            plus an in-place adapter kernel.

    Returns:
        (M, out) in the compute dtype (autocast dtype under autocast, else x's dtype).
    """
    device = check_adapter_args(_OP, x, lora_A, lora_B, lora_lambda, slot_state, score_out,
                                weight, bias, weight_in_out)
    out_dtype = compute_dtype(device, x)
    x = row_major(_in_dtype(x, out_dtype))
    if x_adapter is not None:
        x_adapter = row_major(_in_dtype(x_adapter, out_dtype))
    return AdaptedLinearFunction.apply(x, x_adapter, weight, bias, weight_in_out, lora_A, lora_B,
                                       lora_lambda, slot_state, float(lora_alpha),
                                       float(reserve_value), score_out, grad_out, out_dtype,
                                       fused_gemm)


def lowrank_adapter(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    lam: torch.Tensor, score_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``((x @ A.T) * lam) @ B.T`` on the Triton kernels (direct mode: ``lam`` already holds the
    mask and the scale), differentiable in all four inputs."""
    return adapted_linear_triton(x, None, None, lora_A, lora_B, lam, None, score_out=score_out)
