"""The adapter computation on plain tensors, and the choice of backend.

`adapter_delta` is what `IncreLoRALinear` calls: it returns ``x @ A.T @ diag(lam) @ B.T`` for a
2-D ``x`` and, when a score accumulator is given, adds the exact module score
``sum(|dW * G|) / sqrt(out * in)`` of this backward pass into it (``dW = B diag(lam) A``,
``G = dL/d(dW) = dy.T @ x``). ``lam`` already carries the slot mask and the ``alpha / ranknum``
scale, so inactive slots (lam == 0) receive exactly zero gradient in A and B.

The PyTorch path below is the reference every kernel is tested against.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

BACKEND_ENV = "INCRELORA_BACKEND"
BACKENDS = ("torch", "triton")
# "1" makes IncreLoRALinear run the base layer and the adapter in one Triton GEMM where it can.
FUSED_LINEAR_ENV = "INCRELORA_FUSED_LINEAR"


def select_backend(x: torch.Tensor) -> str:
    """`INCRELORA_BACKEND` if set (read at every call), else triton on CUDA and torch elsewhere."""
    choice = os.environ.get(BACKEND_ENV, "").strip().lower()
    if choice:
        if choice not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={choice!r} is invalid: use one of {BACKENDS}")
        return choice
    return "triton" if x.is_cuda and triton_available() else "torch"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def delta_w_score_dense(dw: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum(|dW * (dy.T @ x)|) / sqrt(out * in) computed densely in float32 or wider."""
    acc = torch.promote_types(dw.dtype, torch.float32)
    grad = dy.to(acc).t() @ x.to(acc)
    return (dw.to(acc) * grad).abs().sum() / math.sqrt(dw.numel())


# Rows of G = dy.T @ x computed per chunk by the chunked exact score: a float32 chunk of about
# 4 MB (it stays in L2 on a GPU), between 256 and 1024 rows, and at most half of out.
SCORE_CHUNK_BYTES = 4 << 20
_MM_OUT_DTYPE: dict = {}


def score_chunk_rows(out_features: int, in_features: int) -> int:
    """Columns of dy (rows of G) per chunk of the chunked exact score; under half of
    ``out_features`` (when it is above 1), so no chunk is ever the whole (out, in) G."""
    rows = max(256, min(1024, SCORE_CHUNK_BYTES // (4 * max(in_features, 1))))
    return max(1, min(rows, (out_features + 1) // 2))


def _mm_out_dtype_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` on ``device``
    (cuBLAS on torch >= 2.8; no CPU kernel); probed once per (device type, dtype)."""
    key = (device.type, dtype)
    if key not in _MM_OUT_DTYPE:
        try:
            probe = torch.zeros(1, 1, dtype=dtype, device=device)
            torch.mm(probe, probe, out_dtype=torch.float32)
            _MM_OUT_DTYPE[key] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


def weight_grad_chunks(dy: torch.Tensor, x: torch.Tensor, acc: torch.dtype, rows: int):
    """Yield ``(n0, n1, G[n0:n1])`` for ``G = dy.T @ x``, every chunk written into one reused
    ``(rows, in)`` buffer of dtype ``acc`` (float32 or float64).

    Nothing of size M x out, M x in or out x in is allocated: each chunk is one GEMM on a view of
    dy's columns (``out_dtype=acc`` where torch has it for half inputs), or, for mixed dtypes
    and half inputs without that GEMM (CPU), a sum over blocks of ``rows`` rows converted to acc.
    """
    M, N = dy.shape
    buf = torch.empty(rows, x.shape[1], dtype=acc, device=dy.device)
    same = dy.dtype == x.dtype
    direct = same and (dy.dtype == acc or (dy.dtype != torch.float64
                                           and _mm_out_dtype_supported(dy.device, dy.dtype)))
    for n0 in range(0, N, rows):
        n1 = min(n0 + rows, N)
        g = buf[:n1 - n0]
        dy_c = dy[:, n0:n1]
        if direct and dy.dtype == acc:
            torch.mm(dy_c.t(), x, out=g)
        elif direct:
            torch.mm(dy_c.t(), x, out_dtype=acc, out=g)
        else:
            g.zero_()
            for m0 in range(0, M, rows):
                g.addmm_(dy_c[m0:m0 + rows].t().to(acc), x[m0:m0 + rows].to(acc))
        yield n0, n1, g


def delta_w_score_chunked(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                          lora_B: torch.Tensor, lam: torch.Tensor, score_out: torch.Tensor, *,
                          chunk_rows: Optional[int] = None) -> None:
    """Add ``sum(|B diag(lam) A * (dy.T @ x)|) / sqrt(out * in)`` into the 0-d ``score_out``,
    in chunks of dy's columns (`weight_grad_chunks`), in torch ops.

    dy (M, out) and x (M, in) of any float dtype; A, B, lam (the effective lambda) of any float
    dtype; slots with lam == 0 are ignored. Accumulates in float32 (float64 when any input is
    float64); chunks are summed in a fixed order, so the result is deterministic. The largest
    temporaries are two (rows, in) chunks (G and dW), ``rows = score_chunk_rows(out, in)``
    unless ``chunk_rows`` is given.
    """
    N, K = dy.shape[1], x.shape[1]
    wide = torch.float64 in (dy.dtype, x.dtype, lora_A.dtype, lora_B.dtype, lam.dtype)
    acc = torch.float64 if wide else torch.float32
    rows = min(chunk_rows or score_chunk_rows(N, K), N)
    with torch.no_grad():
        lam = lam if lam.dtype == acc else lam.to(acc)
        live = lam != 0  # dead slots are never read: NaN there cannot reach the score
        a = torch.where(live[:, None], lora_A, 0.0).to(acc)
        b_lam = torch.where(live, lora_B * lam, 0.0).to(acc)
        dw_buf = torch.empty(rows, K, dtype=acc, device=dy.device)
        total = None
        for n0, n1, g in weight_grad_chunks(dy, x, acc, rows):
            dw = dw_buf[:n1 - n0]
            torch.mm(b_lam[n0:n1], a, out=dw)
            part = dw.mul_(g).abs_().sum()
            total = part if total is None else total.add_(part)
        score_out.add_(total, alpha=1.0 / math.sqrt(N * K))


def adapter_delta_torch(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        lam: torch.Tensor, score_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference path: two skinny GEMMs, and the dense score in a gradient hook when asked."""
    out = ((x @ lora_A.t()) * lam) @ lora_B.t()
    if score_out is not None and out.requires_grad:
        x_saved = x.detach()
        a, b, l = lora_A.detach(), lora_B.detach(), lam.detach()

        def accumulate_score(dy: torch.Tensor) -> None:
            with torch.no_grad():
                score_out.add_(delta_w_score_dense((b * l) @ a, dy, x_saved).to(score_out.dtype))

        out.register_hook(accumulate_score)
    return out


def accumulate_weight_grad(out: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """Add G = dL/d(dW) = dy.T @ x of the coming backward pass into ``grad_out`` (out, in)."""
    if not out.requires_grad:
        return
    x_saved = x.detach()

    def hook(dy: torch.Tensor) -> None:
        with torch.no_grad():
            grad_out.addmm_(dy.t().to(grad_out.dtype), x_saved.to(grad_out.dtype))

    out.register_hook(hook)


def adapter_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, lam: torch.Tensor,
                  score_out: Optional[torch.Tensor] = None,
                  grad_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Low-rank adapter output for a 2-D input on the selected backend.

    ``score_out`` (0-d) receives the fused per-pass score; ``grad_out`` (out, in) receives the
    dense G of every pass instead, for scores of a whole accumulated, synchronised step.
    """
    if select_backend(x) == "triton":
        from .kernels.lowrank import lowrank_adapter
        out = lowrank_adapter(x, lora_A, lora_B, lam, score_out)
    else:
        out = adapter_delta_torch(x, lora_A, lora_B, lam, score_out)
    if grad_out is not None:
        accumulate_weight_grad(out, x, grad_out)
    return out


def fused_linear_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         lora_A: torch.Tensor, dropout_active: bool) -> bool:
    """Whether a layer may compute base and adapter in one GEMM (`fused_linear_adapter`).

    Needs ``INCRELORA_FUSED_LINEAR=1`` (read at every call), the triton backend for ``x``, no
    active adapter dropout, a frozen base, and one dtype for x, the base weight and the adapter
    (or autocast). Off by default: the unfused path (cuBLAS base, Triton adapter) stays the CUDA
    default until a GPU benchmark shows the fused GEMM is faster (docs/kernels.md).
    """
    if os.environ.get(FUSED_LINEAR_ENV, "").strip() != "1" or dropout_active:
        return False
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return False
    if not (torch.is_autocast_enabled(x.device.type) or x.dtype == weight.dtype == lora_A.dtype):
        return False
    return select_backend(x) == "triton"


def linear_adapter_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         weight_in_out: bool, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         lam: torch.Tensor,
                         score_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T + bias + x @ A.T @ diag(lam) @ B.T`` for a 2-D ``x`` in one Triton GEMM."""
    from .kernels.fused_linear import fused_linear_adapter
    return fused_linear_adapter(x, weight, bias, lora_A, lora_B, lam, score_out,
                                weight_in_out=weight_in_out)
