"""Audit of the adapted linear, its kernels and their cached state against float64 references
written here (not the library's own reference): odd shapes, every dtype path, in-place changes.

On CPU the kernels run under the Triton interpreter (conftest), on CUDA compiled.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from increlora_fast.kernels import launch_counts, reset_launch_counts
from increlora_fast.layer import IncreLoRALinear


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the largest magnitude of ``ref``."""
    scale = ref.abs().max().item()
    return (got.double() - ref.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def float64_layer(layer: IncreLoRALinear, x: torch.Tensor, dy: torch.Tensor):
    """(y, dx, dA, dB, dlambda, score) of ``layer`` on ``x`` with output gradient ``dy``, from
    the spec's formulas in float64 autograd on the layer's own (rounded) values."""
    state = layer.slot_state
    weight = layer.base_layer.weight.detach().double()
    weight = weight.t() if layer.is_conv1d else weight
    bias = layer.base_layer.bias
    a, b, lam, xx = (t.detach().double().requires_grad_()
                     for t in (layer.lora_A, layer.lora_B, layer.lora_lambda, x))
    active, reserve = state == 2, state == 1
    fixed = layer.reserve_lambda if layer.advance_learning else 0.0
    lam_eff = torch.where(active, lam, reserve.double() * fixed) \
        * layer.lora_alpha / max(int(active.sum()), 1)
    y = xx @ weight.t() + ((xx @ a.t()) * lam_eff) @ b.t()
    if bias is not None:
        y = y + bias.detach().double()
    y.backward(dy.double())
    dw = (b * lam_eff).detach() @ a.detach()
    g = dy.double().reshape(-1, dy.shape[-1]).t() @ x.double().reshape(-1, x.shape[-1])
    score = (dw * g).abs().sum() / math.sqrt(dw.numel())
    return y.detach(), xx.grad, a.grad, b.grad, lam.grad, score


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_score_after_casting_the_layer_to_16_bit(kernel_device, monkeypatch, backend, dtype):
    """``layer.to(bfloat16)`` (or ``.half()``) keeps the exact-score accumulator in float32, as
    lambda is kept: the Triton path refused a 16-bit ``score_sum`` with a ValueError on the first
    tracked backward, and the torch path summed the score in 16 bits. Tolerance: relative 2e-2
    (16-bit operands), and the score must come back float32."""
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    layer = IncreLoRALinear(nn.Linear(21, 13), r_max=4, init_r=2, reserve_rank=1)
    layer = layer.to(kernel_device, dtype).train()
    with torch.no_grad():
        layer.lora_lambda.normal_()
    layer.score_enabled = True
    assert layer.score_sum.dtype == torch.float32
    x = torch.randn(6, 21, dtype=dtype, device=kernel_device)
    dy = torch.randn(6, 13, dtype=dtype, device=kernel_device)
    reset_launch_counts()
    layer(x).backward(dy)
    assert (launch_counts().get("_score_tiles_kernel", 0) > 0) == (backend == "triton")
    score = layer.take_score()
    assert score.dtype == torch.float32
    assert rel_err(score, float64_layer(layer, x, dy)[5]) <= 2e-2


@pytest.mark.parametrize("replace", ["data", "vector_to_parameters"])
def test_base_weight_replaced_through_data_under_autocast(kernel_device, monkeypatch, replace):
    """A float32 base under bfloat16 autocast computes with a cached bfloat16 cast of its weight.
    A new weight given through ``weight.data = ...`` (as ``vector_to_parameters`` and module
    conversions do) keeps the parameter and its version counter: the forward and dx must use
    the new weight, not the cast of the old one. Tolerance: relative 2e-2 (bfloat16)."""
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    layer = IncreLoRALinear(nn.Linear(24, 18), r_max=4, init_r=2, reserve_rank=1)
    layer = layer.to(kernel_device).train()
    with torch.no_grad():
        layer.lora_lambda.normal_()
    x = torch.randn(5, 24, device=kernel_device)
    dy = torch.randn(5, 18, device=kernel_device)
    with torch.autocast(torch.device(kernel_device).type, dtype=torch.bfloat16):
        layer(x)  # caches the bfloat16 cast of the first weight
    weight = layer.base_layer.weight
    fresh = torch.randn_like(weight)
    if replace == "data":
        weight.data = fresh
    else:
        torch.nn.utils.vector_to_parameters(
            torch.cat([fresh.flatten(), layer.base_layer.bias.detach()]),
            layer.base_layer.parameters())
    assert torch.equal(layer.base_layer.weight, fresh)
    reset_launch_counts()
    xx = x.clone().requires_grad_()
    with torch.autocast(torch.device(kernel_device).type, dtype=torch.bfloat16):
        y = layer(xx)
    y.backward(dy.to(y.dtype))
    assert launch_counts().get("_project_kernel", 0) > 0
    ref = float64_layer(layer, x, dy.bfloat16())
    assert rel_err(y, ref[0]) <= 2e-2
    assert rel_err(xx.grad, ref[1]) <= 2e-2


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_orthogonal_penalty_torch_path_on_16_bit_buffers_near_orthonormal(monkeypatch, dtype,
                                                                          tol):
    """The penalty's torch path (CPU, torch.compile, a failed kernel check) on 16-bit slot
    buffers close to orthonormal, where training drives them: A A^T - I holds small
    differences of numbers near 1, which a 16-bit Gram matrix rounds away (the gradients were
    9 % off in bfloat16). Loss and gradients against float64; tolerances relative to the
    largest float64 value: half an ulp of the gradients' dtype and some (bfloat16 1.6e-2,
    float16 2e-3), as for the kernels."""
    from increlora_fast import IncreLoRAConfig, IncreLoRAController, inject_increlora
    monkeypatch.setenv("INCRELORA_BACKEND", "torch")
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                          nn.Linear(20, 7))
    config = IncreLoRAConfig(target_modules=["0", "2", "4"], r_max=6, init_r=2, target_rank=4,
                             orth_reg_weight=0.3)
    inject_increlora(model, config)
    model.to(dtype)
    controller = IncreLoRAController(model, config)
    layers = controller.layers
    with torch.no_grad():
        for layer in layers:
            a = torch.linalg.qr(torch.randn(layer.in_features, layer.r_max))[0].t()
            b = torch.linalg.qr(torch.randn(layer.out_features, layer.r_max))[0]
            layer.lora_A.copy_(a + 0.01 * torch.randn_like(a))
            layer.lora_B.copy_(b + 0.01 * torch.randn_like(b))
    loss = controller.regularization_loss()
    loss.backward()

    total = torch.zeros((), dtype=torch.float64)
    leaves = []
    for layer in layers:
        a, b = (t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B))
        leaves += [a, b]
        w = (layer.slot_state != 0).double()
        aw, bw = a * w[:, None], b * w[None, :]
        total = total + torch.linalg.matrix_norm(aw @ aw.t() - torch.diag(w)) \
            + torch.linalg.matrix_norm(bw.t() @ bw - torch.diag(w))
    ref = 0.3 * total / (2 * len(layers))
    ref.backward()
    assert rel_err(loss, ref) <= 1e-6
    got = [g for layer in layers for g in (layer.lora_A.grad, layer.lora_B.grad)]
    for k, (g, leaf) in enumerate(zip(got, leaves)):
        assert rel_err(g, leaf.grad) <= tol, k


@pytest.mark.parametrize("multi", [True, False])
def test_adamw_first_use_check_passes_float64_parameters(kernel_device, multi):
    """The masked AdamW kernel computes in float32 for every parameter dtype (documented, as
    its torch path does). Its first-use check held float64 parameters to float64's 1e-10, so
    it always failed for them: a float64 model on CUDA got a "please report" RuntimeWarning
    and lost the one-launch step. A float64 step must pass, at float32's tolerance (1e-4)."""
    from increlora_fast.kernels.checks import check_adamw
    record = check_adamw(torch.device(kernel_device), torch.float64, multi=multi)
    assert record["ok"], record
    assert record["max_rel_err"] <= 1e-4


def test_float64_layer_with_float32_adapters_keeps_the_kernels(kernel_device, monkeypatch):
    """``adapter_dtype="float32"`` on a float64 base: the kernels compute in float64 and store
    dA, dB and dlambda in float32. The first-use check held those float32 gradients to
    float64's 1e-10, so it always failed: a "please report" RuntimeWarning and the torch path
    for good. The layer must keep the kernels, without a warning, and match float64 autograd
    (tolerance 1e-6: float32 gradients; the score is a float32 accumulator)."""
    import warnings

    from increlora_fast import functional
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "1")
    functional.reset_kernel_checks()
    layer = IncreLoRALinear(nn.Linear(23, 17).double(), r_max=5, init_r=2, reserve_rank=1,
                            adapter_dtype="float32").to(kernel_device).train()
    assert layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_lambda.normal_()
    layer.score_enabled = True
    x = torch.randn(2, 7, 23, dtype=torch.float64, device=kernel_device, requires_grad=True)
    dy = torch.randn(2, 7, 17, dtype=torch.float64, device=kernel_device)
    reset_launch_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y = layer(x)
    y.backward(dy)
    functional.reset_kernel_checks()
    assert launch_counts().get("_backward_rows_kernel", 0) > 0
    ref = float64_layer(layer, x, dy)
    got = (y, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_lambda.grad,
           layer.take_score())
    for name, g, r in zip(("y", "dx", "dA", "dB", "dlambda", "score"), got, ref):
        assert rel_err(g, r) <= 1e-6, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_layer_under_autocast_computes_in_float64(kernel_device, monkeypatch, backend):
    """Autocast leaves float64 tensors alone (they are not eligible), so a float64 nn.Linear
    under bfloat16 autocast computes in float64. The adapted layer computed its adapter
    (torch path) or everything, base GEMM included (Triton path: bfloat16 output, and NaN
    under the interpreter from the float64 adapters' conversion), in bfloat16. Output dtype
    float64 and every result within 1e-10 of float64 autograd."""
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    layer = IncreLoRALinear(nn.Linear(19, 21), r_max=4, init_r=2, reserve_rank=1)
    layer = layer.double().to(kernel_device).train()
    with torch.no_grad():
        layer.lora_lambda.normal_()
    layer.score_enabled = True
    x = torch.randn(5, 19, dtype=torch.float64, device=kernel_device, requires_grad=True)
    dy = torch.randn(5, 21, dtype=torch.float64, device=kernel_device)
    reset_launch_counts()
    with torch.autocast(torch.device(kernel_device).type, dtype=torch.bfloat16):
        y = layer(x)
        assert layer.base_layer(x).dtype == torch.float64
    y.backward(dy)
    assert (launch_counts().get("_project_kernel", 0) > 0) == (backend == "triton")
    assert y.dtype == torch.float64
    ref = float64_layer(layer, x, dy)
    got = (y, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_lambda.grad,
           layer.take_score())
    for name, g, r in zip(("y", "dx", "dA", "dB", "dlambda", "score"), got, ref):
        assert rel_err(g, r) <= 1e-10, name


def test_the_exact_step_score_gradient_moves_with_the_layer():
    """``exact_step_score`` keeps the step's dense score gradient in ``score_grad``, a plain
    attribute: ``layer.to(device)`` after a tracked backward left it on the old device, so the
    next tracked backward added into a tensor on another device. It now moves with the layer
    (to ``meta`` here, the one other device a CPU machine has) and stays float32."""
    layer = IncreLoRALinear(nn.Linear(9, 7), r_max=4, init_r=2, reserve_rank=1).train()
    layer.exact_step_score = layer.score_enabled = True
    layer(torch.randn(3, 9)).sum().backward()
    assert layer.score_grad is not None and layer.score_grad.device.type == "cpu"
    layer.to("meta", torch.bfloat16)
    assert layer.score_grad.device.type == "meta" and layer.score_grad.dtype == torch.float32
