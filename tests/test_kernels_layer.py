"""IncreLoRALinear on the Triton kernels (INCRELORA_BACKEND=triton, and the fused GEMM with
INCRELORA_FUSED_LINEAR=1) against the same layer on the PyTorch path.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported); on a CUDA machine the same tests run the compiled kernels on the GPU.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from increlora_fast.kernels import launch_counts, reset_launch_counts  # noqa: E402
from increlora_fast.kernels.lowrank import _project_kernel  # noqa: E402
from increlora_fast.kernels.utils import is_interpreted  # noqa: E402
from increlora_fast.layer import Conv1D, IncreLoRALinear  # noqa: E402

if DEVICE == "cpu" and not is_interpreted(_project_kernel):
    raise RuntimeError("increlora_fast.kernels was imported before TRITON_INTERPRET=1 was set")

# Relative to the largest magnitude of the torch-path result: float64 layers [1e-15].
TOL64 = 1e-12
FUSED = "_fused_linear_adapter_kernel"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (got.double() - ref.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def make_layer(conv1d: bool, dropout: float = 0.0) -> IncreLoRALinear:
    base = Conv1D(40, 19) if conv1d else nn.Linear(19, 40)
    layer = IncreLoRALinear(base, r_max=16, init_r=3, reserve_rank=2, lora_dropout=dropout)
    layer = layer.double().to(DEVICE).train()
    with torch.no_grad():
        layer.lora_lambda.normal_()
        layer.lora_lambda[1] = 0.0  # an active slot at its initial lambda = 0
    layer.score_enabled = True
    return layer


def run(layer: IncreLoRALinear, x: torch.Tensor, dy: torch.Tensor, monkeypatch, backend: str,
        fused: bool):
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    monkeypatch.setenv("INCRELORA_FUSED_LINEAR", "1" if fused else "0")
    reset_launch_counts()
    xx = x.clone().requires_grad_()
    y = layer(xx)
    y.backward(dy)
    grads = [xx.grad] + [p.grad for p in (layer.lora_A, layer.lora_B, layer.lora_lambda)]
    return y.detach(), grads, layer.take_score(), launch_counts()


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_layer_on_kernels_matches_torch_path(conv1d, fused, monkeypatch):
    layer = make_layer(conv1d)
    x = torch.randn(2, 5, 19, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(2, 5, 40, dtype=torch.float64, device=DEVICE)
    ref = run(copy.deepcopy(layer), x, dy, monkeypatch, "torch", fused)
    got = run(layer, x, dy, monkeypatch, "triton", fused)
    assert ref[3] == {}
    counts = got[3]
    assert counts.get("_project_kernel", 0) > 0 and counts.get("_delta_w_score_kernel") == 1
    assert (counts.get(FUSED) == 1) == fused, counts
    assert got[0].shape == (2, 5, 40)
    assert rel_err(got[0], ref[0]) <= TOL64
    for name, g, r in zip(("x", "A", "B", "lambda"), got[1], ref[1]):
        assert rel_err(g, r) <= TOL64, name
    assert got[1][3][1] != 0  # the active slot at lambda = 0 still learns
    assert rel_err(got[2], ref[2]) <= TOL64 and got[2].item() > 0


def test_fused_gemm_falls_back_with_dropout_or_dense_step_score(monkeypatch):
    x = torch.randn(7, 19, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(7, 40, dtype=torch.float64, device=DEVICE)
    counts = run(make_layer(False, dropout=0.1), x, dy, monkeypatch, "triton", True)[3]
    assert FUSED not in counts and counts.get("_project_kernel", 0) > 0

    layer = make_layer(False)
    layer.exact_step_score = True
    counts = run(layer, x, dy, monkeypatch, "triton", True)[3]
    assert FUSED not in counts and "_delta_w_score_kernel" not in counts
    assert torch.count_nonzero(layer.take_score_grad()) > 0

    layer = make_layer(False).eval()
    counts = run(layer, x, dy, monkeypatch, "triton", True)[3]
    assert counts.get(FUSED) == 1  # dropout is inactive in eval mode
