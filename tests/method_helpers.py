"""Small models and loops shared by the method tests (scores, allocation, optimizer, resume)."""
from __future__ import annotations

from typing import Callable, List

import torch
from torch import nn

from increlora_fast import IncreLoRAConfig, inject_increlora
from increlora_fast.controller import IncreLoRAController
from increlora_fast.optimizer import create_optimizer


class ParallelBranches(nn.Module):
    """``n`` linears of the same shape on the same input; ``weights`` scales each branch output
    (a zero weight makes a branch unable to matter)."""

    def __init__(self, n: int, d_in: int = 6, d_out: int = 5, weights: List[float] = None) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(d_in, d_out) for _ in range(n))
        self.register_buffer("weights", torch.tensor(weights or [1.0] * n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(w * b(x) for w, b in zip(self.weights, self.branches))


def branch_config(**overrides) -> IncreLoRAConfig:
    base = dict(target_modules=r"branches\.\d+", r_max=6, init_r=1, target_rank=3,
                incre_rank_num=1, init_warmup=2, incre_interval=2, top_h=2, warmup_steps=2,
                total_step=40, orth_reg_weight=0.1)
    base.update(overrides)
    return IncreLoRAConfig(**base)


def make_run(model: nn.Module, config: IncreLoRAConfig, lr: float = 1e-2, weight_decay: float = 0.1):
    inject_increlora(model, config)
    return model, create_optimizer(model, config, lr=lr, weight_decay=weight_decay), \
        IncreLoRAController(model, config)


def batch(step: int, d_in: int = 6, d_out: int = 5):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, d_in, generator=g), torch.randn(16, d_out, generator=g)


def train_steps(model, optimizer, controller, steps, on_step: Callable = None) -> None:
    for step in steps:
        x, y = batch(step)
        loss = ((model(x) - y) ** 2).mean() + controller.regularization_loss()
        loss.backward()
        controller.step(step)
        optimizer.step()
        optimizer.zero_grad()
        if on_step is not None:
            on_step(step)
