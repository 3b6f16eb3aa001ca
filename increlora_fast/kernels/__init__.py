"""Fused Triton kernels of increlora_fast (Liger style: jit kernels, host launch functions,
one ``torch.autograd.Function`` per op).

Modules (each but `reference` imports triton; this package itself does not):

- `reference`: the same ops in plain PyTorch, the CPU path and the float64 reference of every
  kernel test (imports only torch, so the layer uses it without triton).
- `linear`: the whole adapted linear ``x W^T + bias + ((x A^T) * lam_eff) B^T`` as one autograd
  op (`linear.adapted_linear_triton`; `linear.lowrank_adapter` without a base).
- `lowrank`: the adapter kernels (project, expand, the whole backward in one pass over the rows
  of dy, the finish that sums its partials); `linear` launches them.
- `fused_linear`: the opt-in forward with base GEMM and adapter in one Triton GEMM.
- `score`: the exact module score ``sum(|B diag(lam) A * dy.T x|) / sqrt(out * in)``.
- `adamw`: the masked per-slot AdamW step (`adamw.masked_adamw_triton_`).
- `checks`: correctness checks on a live device (first-use check, the GPU check's suite).

Kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before the
op module was imported. See docs/kernels.md for the design.
"""
from .launches import count_launch, launch_counts, reset_launch_counts

__all__ = ["count_launch", "launch_counts", "reset_launch_counts"]
