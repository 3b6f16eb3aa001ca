"""Adapters on 16-bit bases: float32 adapter tensors and optimizer moments by default (peft's
choice), the base dtype for A and B on request, and lambda in float32 always (small lambda
updates, and a gradient that sums over every token)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from increlora_fast import IncreLoRAConfig, create_optimizer, inject_increlora
from increlora_fast.model import increlora_layers


def _model(dtype: torch.dtype, adapter_dtype: str = "auto") -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)
    config = IncreLoRAConfig(target_modules=["0", "2"], r_max=4, init_r=1, target_rank=2,
                             adapter_dtype=adapter_dtype)
    return inject_increlora(model, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype,expected", [("auto", torch.float32),
                                                    ("float32", torch.float32),
                                                    ("base", None)])
def test_adapter_and_moment_dtypes(dtype, adapter_dtype, expected):
    """A and B (and their moments) take the adapter dtype; lambda, its gradient and its moments
    are float32 for every choice: a 16-bit lambda gradient overflows (it sums over every token)."""
    expected = expected or dtype
    model = _model(dtype, adapter_dtype)
    opt = create_optimizer(model, lr=1e-3)
    x = torch.randn(8, 16, dtype=dtype)
    model(x).float().square().mean().backward()
    opt.step()
    for _, layer in increlora_layers(model):
        assert layer.base_layer.weight.dtype == dtype
        for p, want in ((layer.lora_A, expected), (layer.lora_B, expected),
                        (layer.lora_lambda, torch.float32)):
            assert p.dtype == want and p.grad.dtype == want
            assert opt.state[p]["exp_avg"].dtype == want
            assert opt.state[p]["exp_avg_sq"].dtype == want
        assert model(x).dtype == dtype  # the layer still computes in the base dtype


def test_optimizer_state_with_float16_lambda_moments_loads_as_float32():
    """A state saved when lambda was float16 (adapter_dtype="base" on a float16 base): its
    moments load in the float32 lambda's dtype, A's and B's stay float16."""
    model = _model(torch.float16, "base")
    opt = create_optimizer(model, lr=1e-3)
    model(torch.randn(8, 16, dtype=torch.float16)).float().sum().backward()
    opt.step()
    lambdas = {id(layer.lora_lambda) for _, layer in increlora_layers(model)}
    params = [p for group in opt.param_groups for p in group["params"]]
    saved = opt.state_dict()
    for index, state in saved["state"].items():
        if id(params[index]) in lambdas:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].half()
    fresh = create_optimizer(model, lr=1e-3)
    fresh.load_state_dict(saved)
    for _, layer in increlora_layers(model):
        assert fresh.state[layer.lora_lambda]["exp_avg"].dtype == torch.float32
        assert fresh.state[layer.lora_lambda]["exp_avg_sq"].dtype == torch.float32
        assert fresh.state[layer.lora_A]["exp_avg"].dtype == torch.float16


def test_float64_adapters_keep_a_float64_lambda():
    model = _model(torch.float64)
    for _, layer in increlora_layers(model):
        assert layer.lora_A.dtype == layer.lora_lambda.dtype == torch.float64


@pytest.mark.parametrize("adapter_dtype", ["auto", "base"])
def test_small_lambda_updates_survive_on_16_bit_adapters(adapter_dtype):
    """A lambda near 1 moved by 1e-4 per step: in bfloat16 (8-bit mantissa, spacing 2**-7 near
    1) it would not move at all; the float32 lambda moves with bfloat16 A and B too."""
    assert torch.tensor(1.0, dtype=torch.bfloat16) + 1e-4 == 1.0
    model = _model(torch.bfloat16, adapter_dtype)
    layer = dict(increlora_layers(model))["0"]
    with torch.no_grad():
        layer.lora_lambda.fill_(1.0)
    before = layer.lora_lambda.detach().clone()
    opt = create_optimizer(model, lr=1e-4)
    model(torch.randn(8, 16, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    assert bool((layer.lora_lambda != before)[layer.active_mask].any())


def test_adapter_dtype_is_validated():
    with pytest.raises(ValueError, match="IncreLoRAConfig.adapter_dtype='fp8' is invalid"):
        IncreLoRAConfig(adapter_dtype="fp8")


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_converting_the_model_keeps_lambda_out_of_16_bits(cast):
    """``model.half()`` (or ``.bfloat16()``) after injection converts A and B but keeps lambda
    float32, the same Parameter object (an optimizer built before still holds it); float64
    models get a float64 lambda."""
    from increlora_fast.layer import IncreLoRALinear
    layer = IncreLoRALinear(torch.nn.Linear(8, 6), r_max=4, init_r=2)
    lam = layer.lora_lambda
    getattr(layer, cast)()
    want = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}[cast]
    assert layer.lora_A.dtype == layer.lora_B.dtype == want
    assert layer.lora_lambda is lam
    assert lam.dtype == (torch.float64 if cast == "double" else torch.float32)


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_converting_the_model_keeps_lambdas_values_and_gradient(cast):
    """``.half()`` / ``.bfloat16()`` went through the 16-bit dtype before putting lambda back to
    float32: its values were rounded to 16-bit resolution, and a gradient past float16's range
    (one lambda's gradient sums over every token) became inf. Lambda, its gradient and the score
    accumulator keep their float32 values exactly."""
    from increlora_fast.layer import IncreLoRALinear
    layer = IncreLoRALinear(torch.nn.Linear(8, 6), r_max=4, init_r=2)
    with torch.no_grad():
        layer.lora_lambda[:2] = torch.tensor([0.123456789, 1.0 + 2.0 ** -20])
        layer.score_sum.fill_(1.0 + 2.0 ** -20)
    layer.lora_lambda.grad = torch.tensor([2.4e5, 0.1234567, 0.0, 0.0])
    values, grad = layer.lora_lambda.detach().clone(), layer.lora_lambda.grad.clone()
    score = layer.score_sum.clone()
    getattr(layer, cast)()
    assert layer.lora_lambda.dtype == layer.lora_lambda.grad.dtype == torch.float32
    assert torch.equal(layer.lora_lambda.detach(), values)
    assert torch.equal(layer.lora_lambda.grad, grad)
    assert torch.equal(layer.score_sum, score)
