"""IncreLoRALinear on the Triton kernels (INCRELORA_BACKEND=triton, and the fused GEMM with
INCRELORA_FUSED_LINEAR=1) against the same layer on the PyTorch path.

On CPU the kernels run under the Triton interpreter (conftest), on CUDA compiled.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from increlora_fast.kernels import launch_counts, reset_launch_counts
from increlora_fast.layer import Conv1D, IncreLoRALinear

# Relative to the largest magnitude of the torch-path result: float64 layers [1e-15].
TOL64 = 1e-12
# Relative to the largest float64 gradient: float16 operands (eps 2**-11 ~ 4.9e-4) rounded a few
# times on the way (x, A, B, the (M, r) products); measured 2.1e-4 to 4.6e-4.
TOL16 = 2e-3
FP16_MAX = torch.finfo(torch.float16).max
FUSED = "_fused_linear_adapter_kernel"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (got.double() - ref.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def make_layer(conv1d: bool, dropout: float = 0.0, device: str = "cpu") -> IncreLoRALinear:
    base = Conv1D(40, 19) if conv1d else nn.Linear(19, 40)
    layer = IncreLoRALinear(base, r_max=16, init_r=3, reserve_rank=2, lora_dropout=dropout)
    layer = layer.double().to(device).train()
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
def test_layer_on_kernels_matches_torch_path(conv1d, fused, monkeypatch, kernel_device):
    layer = make_layer(conv1d, device=kernel_device)
    x = torch.randn(2, 5, 19, dtype=torch.float64, device=kernel_device)
    dy = torch.randn(2, 5, 40, dtype=torch.float64, device=kernel_device)
    ref = run(copy.deepcopy(layer), x, dy, monkeypatch, "torch", fused)
    got = run(layer, x, dy, monkeypatch, "triton", fused)
    assert ref[3] == {}
    counts = got[3]
    assert counts.get("_project_kernel") == 1 and counts.get("_backward_rows_kernel") == 1, counts
    assert (counts.get(FUSED) == 1) == fused, counts
    assert got[0].shape == (2, 5, 40)
    assert rel_err(got[0], ref[0]) <= TOL64
    for name, g, r in zip(("x", "A", "B", "lambda"), got[1], ref[1]):
        assert rel_err(g, r) <= TOL64, name
    assert got[1][3][1] != 0  # the active slot at lambda = 0 still learns
    assert rel_err(got[2], ref[2]) <= TOL64 and got[2].item() > 0


def test_fused_gemm_falls_back_with_dropout_or_dense_step_score(monkeypatch, kernel_device):
    x = torch.randn(7, 19, dtype=torch.float64, device=kernel_device)
    dy = torch.randn(7, 40, dtype=torch.float64, device=kernel_device)
    counts = run(make_layer(False, dropout=0.1, device=kernel_device), x, dy, monkeypatch,
                 "triton", True)[3]
    assert FUSED not in counts and counts.get("_project_kernel", 0) > 0

    layer = make_layer(False, device=kernel_device)
    layer.exact_step_score = True
    ref = copy.deepcopy(layer)
    counts = run(layer, x, dy, monkeypatch, "triton", True)[3]
    assert FUSED not in counts and counts.get("_backward_rows_kernel") == 1
    run(ref, x, dy, monkeypatch, "torch", False)
    grad = layer.take_score_grad()
    assert torch.count_nonzero(grad) > 0
    torch.testing.assert_close(grad, ref.take_score_grad())

    layer = make_layer(False, device=kernel_device).eval()
    counts = run(layer, x, dy, monkeypatch, "triton", True)[3]
    assert counts.get(FUSED) == 1  # dropout is inactive in eval mode


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_adapters_keep_a_float32_lambda_gradient_beyond_fp16_range(backend, monkeypatch,
                                                                        kernel_device):
    """adapter_dtype="base" on a float16 base: A and B float16, lambda float32. Lambda's gradient
    sums over every token and output; with small lambdas (as early in training) it is far above
    float16's 65,504 while dA, dB and y are not. It must come back finite, float32 and equal to
    float64 autograd on the same rounded operands."""
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(16, 256).half().to(kernel_device)
    layer = IncreLoRALinear(base, r_max=8, init_r=4, reserve_rank=1, lora_alpha=4.0,
                            adapter_dtype="base").train()
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(8, 16, generator=gen) * 0.4)
        layer.lora_B.copy_(torch.randn(256, 8, generator=gen) * 0.4)
        layer.lora_lambda.copy_(torch.randn(8, generator=gen) * 0.01)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float16
    assert layer.lora_lambda.dtype == torch.float32
    x = torch.randn(64, 16, generator=gen).half().to(kernel_device)
    dy = (torch.randn(64, 256, generator=gen) * 2000).half().to(kernel_device)
    reset_launch_counts()
    layer(x).backward(dy)
    assert (launch_counts().get("_backward_rows_kernel", 0) > 0) == (backend == "triton")

    leaves = [t.detach().double().requires_grad_() for t in
              (layer.lora_A, layer.lora_B, layer.lora_lambda)]
    a, b, lam = leaves
    active = layer.slot_state == 2
    lam_eff = torch.where(active, lam, (layer.slot_state == 1).double() * layer.reserve_lambda)
    w, bias = base.weight.double(), base.bias.double()
    scale = layer.lora_alpha / layer.active_rank
    y_ref = x.double() @ w.t() + bias + ((x.double() @ a.t()) * lam_eff * scale) @ b.t()
    y_ref.backward(dy.double())
    assert lam.grad.abs().max() > FP16_MAX  # the case a float16 lambda gradient overflowed
    assert layer.lora_lambda.grad.dtype == torch.float32
    for name, got, want in zip(("A", "B", "lambda"),
                               (layer.lora_A.grad, layer.lora_B.grad, layer.lora_lambda.grad),
                               (a.grad, b.grad, lam.grad)):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) <= TOL16, name


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_input_and_base_dtypes_follow_nn_linear_on_both_paths(backend, monkeypatch,
                                                              kernel_device):
    """Every input x base weight dtype pair, with autocast (bfloat16) off and on: where
    nn.Linear raises, the layer raises on both paths with one message naming both dtypes
    (the Triton path used to cast the base weight to the input's dtype and compute, e.g. a
    float32 input to a bfloat16 base); where nn.Linear computes, the layer's output has its
    dtype."""
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")  # the variants' checks: other tests
    for x_dtype in DTYPES:
        for w_dtype in DTYPES:
            base = nn.Linear(8, 6).to(kernel_device, w_dtype)
            layer = IncreLoRALinear(base, r_max=4, init_r=2, reserve_rank=1)
            x = torch.randn(3, 8, device=kernel_device).to(x_dtype)
            for autocast in (False, True):
                with torch.autocast(kernel_device, dtype=torch.bfloat16, enabled=autocast):
                    try:
                        want = base(x).dtype
                    except RuntimeError:
                        want = None
                    case = (x_dtype, w_dtype, autocast)
                    if want is None:
                        with pytest.raises(RuntimeError, match="nn.Linear refuses") as error:
                            layer(x)
                        assert str(x_dtype) in str(error.value), case
                        assert str(w_dtype) in str(error.value), case
                    else:
                        assert layer(x).dtype == want, case


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_backward_through_a_retained_graph_is_scored(backend, monkeypatch, kernel_device):
    """Two losses of one forward, the first backward retaining the graph: each backward adds
    its own exact score and dense G, as separate forwards of the two losses would (the step's
    G is the sum, spec section 3). The torch path scored the first backward only (its hook
    dropped what it read), the Triton path both."""
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    layer = make_layer(False, device=kernel_device)
    x = torch.randn(2, 5, 19, dtype=torch.float64, device=kernel_device)
    losses = (lambda y: y.sum(), lambda y: (y * y).sum())
    for exact_step in (False, True):
        layer.exact_step_score = exact_step
        take = layer.take_score_grad if exact_step else layer.take_score
        alone = []
        for loss in losses:
            loss(layer(x)).backward()
            alone.append(take())
        y = layer(x)
        losses[0](y).backward(retain_graph=True)
        first = take()
        losses[1](y).backward()
        second = take()
        assert torch.count_nonzero(first) > 0 and not torch.equal(first, second)
        torch.testing.assert_close(first, alone[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(second, alone[1], rtol=1e-12, atol=0)
