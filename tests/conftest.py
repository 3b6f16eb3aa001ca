"""Shared fixtures: a seeded RNG per test, a tiny hand-written model, and the device the Triton
kernel tests run on.

Kernel tests run the compiled kernels on a CUDA machine and, without one, the same kernels under
the Triton interpreter on CPU tensors. Triton decides at decoration time, so ``TRITON_INTERPRET``
is set here, before any test module imports ``increlora_fast.kernels``.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if KERNEL_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test draws fresh random numbers, reproducibly."""
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _increlora_settings_follow_monkeypatch(monkeypatch):
    """The library reads its INCRELORA_* environment once and caches it
    (`functional.refresh_settings`); here every test starts from the current environment, and
    ``monkeypatch.setenv`` / ``delenv`` make it read the environment again."""
    from increlora_fast import functional
    real_set, real_del = monkeypatch.setenv, monkeypatch.delenv

    def setenv(name, value, prepend=None):
        real_set(name, value, prepend)
        functional.refresh_settings()

    def delenv(name, raising=True):
        real_del(name, raising)
        functional.refresh_settings()
    monkeypatch.setenv, monkeypatch.delenv = setenv, delenv
    functional.refresh_settings()


@pytest.fixture
def kernel_device() -> str:
    """"cuda", or "cpu" with the kernels under the Triton interpreter (skips without triton;
    fails if the kernels were built before the interpreter was switched on); launch counts are
    reset."""
    pytest.importorskip("triton")
    from increlora_fast.kernels import reset_launch_counts
    from increlora_fast.kernels.utils import interpreter_active
    if KERNEL_DEVICE == "cpu" and not interpreter_active():
        raise RuntimeError("increlora_fast.kernels was imported before TRITON_INTERPRET=1 was set")
    reset_launch_counts()
    return KERNEL_DEVICE


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
