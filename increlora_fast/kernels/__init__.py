"""Fused Triton kernels of increlora_fast (Liger style: jit kernels, host launch functions,
one ``torch.autograd.Function`` per op).

Ops, one module each (each imports triton; this package itself does not):

- `lowrank`: ``((x @ A.T) * lam) @ B.T`` with its backward, the exact module score and the
  per-slot triplet score (`lowrank.lowrank_adapter`).
- `score`: the exact module score ``sum(|B diag(lam) A * dy.T x|) / sqrt(out * in)`` reduced tile
  by tile, used by the backward of the two adapter ops.
- `fused_linear`: one GEMM computing ``x W.T + bias + ((x A.T) * lam) B.T``
  (`fused_linear.fused_linear_adapter`).
- `adamw`: the masked per-slot AdamW step (`adamw.masked_adamw_triton_`).

Kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before the
op module was imported. See docs/kernels.md for the design.
"""
from .launches import count_launch, launch_counts, reset_launch_counts

__all__ = ["count_launch", "launch_counts", "reset_launch_counts"]
