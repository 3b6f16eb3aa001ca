"""Shared small fixtures: a seeded RNG per test and a tiny hand-written model."""
from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test draws fresh random numbers, reproducibly."""
    torch.manual_seed(1234)


class TinyBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width, bias=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.proj(torch.relu(self.fc(x))))


class TinyNet(nn.Module):
    """A hand-written model: nested linears with and without bias, a norm and a head."""

    def __init__(self, width: int = 12, hidden: int = 20, classes: int = 3, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(width, hidden) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.fixture
def tiny_net() -> TinyNet:
    return TinyNet()


@pytest.fixture
def make_tiny_net():
    """Build TinyNet variants (other widths or depths) inside a test."""
    return TinyNet
