"""The authors' IncreLoRA layer, re-implemented as a benchmark baseline (spec sections 1 and 3).

What it keeps from ``loralib/increlora.py`` of the paper's code: every forward materialises the
dense update ``dW = B diag(lambda) A * alpha / (ranknum + 1e-5)`` (out x in) through autograd and
adds ``dropout(x) @ dW.T`` to the frozen base output, so backward computes the dense
``G = dL/d(dW) = dy.T @ x`` and ``dx`` through ``dW``; while importance is tracked, a gradient
hook recomputes ``dW`` and stores the module score ``sum(|dW * G|) / sqrt(out * in)``.
What it leaves out: the authors hold each component as its own parameter and concatenate them in
every forward; here the components are one (r, in), one (out, r) and one (r,) tensor, which can
only make this baseline faster.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

INIT_STD = 0.02


class DenseIncreLoRALinear(nn.Module):
    """Frozen ``base`` plus a dense-materialised SVD-shaped adapter with ``rank`` components.

    Args:
        base: the frozen linear.
        rank: number of components, all active (``ranknum``).
        lora_alpha: scale numerator.
        track_score: compute the module score in backward, as the authors do until the budget
            is reached.
    """

    def __init__(self, base: nn.Linear, rank: int, lora_alpha: float = 16.0,
                 track_score: bool = True) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"DenseIncreLoRALinear wraps nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"DenseIncreLoRALinear rank={rank} is invalid: need >= 1")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        out_f, in_f = base.weight.shape
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.randn(rank, in_f, **factory) * INIT_STD)
        self.lora_B = nn.Parameter(torch.randn(out_f, rank, **factory) * INIT_STD)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, **factory))
        self.ranknum = float(rank)
        self.lora_alpha = float(lora_alpha)
        self.track_score = track_score
        self.score = torch.zeros((), dtype=torch.float32, device=base.weight.device)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.lora_alpha / (self.ranknum + 1e-5)

    def _store_score(self, grad: torch.Tensor) -> None:
        with torch.no_grad():
            dw = self.delta_weight()
            self.score = (dw * grad).abs().sum().float() / math.sqrt(dw.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.base.weight, self.base.bias)
        dw = self.delta_weight()
        if self.track_score and self.training and dw.requires_grad:
            dw.register_hook(self._store_score)
        return result + x @ dw.t()
