"""pytest-benchmark suites (not CI tests): ``python -m pytest bench/ --benchmark-only``.

On a CUDA machine they time the GPU target point (bf16, 768x3072, 16k tokens, r_max 16) and a
DeBERTa-v3-base training step; on CPU, small fp32 shapes and a MiniLM-L6 step. Triton methods are
skipped without CUDA (the interpreter's times say nothing about speed). For the full grid and
bench/RESULTS.md use ``increlora-fast bench``.
"""
from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
