"""Adapters on 16-bit bases: float32 adapter tensors and optimizer moments by default (peft's
choice), the base dtype on request, and the reason for the default: small lambda updates."""
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype,expected", [("auto", torch.float32),
                                                    ("float32", torch.float32),
                                                    ("base", None)])
def test_adapter_and_moment_dtypes(dtype, adapter_dtype, expected):
    expected = expected or dtype
    model = _model(dtype, adapter_dtype)
    opt = create_optimizer(model, lr=1e-3)
    x = torch.randn(8, 16, dtype=dtype)
    model(x).float().square().mean().backward()
    opt.step()
    for _, layer in increlora_layers(model):
        assert layer.base_layer.weight.dtype == dtype
        for p in (layer.lora_A, layer.lora_B, layer.lora_lambda):
            assert p.dtype == expected and p.grad.dtype == expected
            assert opt.state[p]["exp_avg"].dtype == expected
            assert opt.state[p]["exp_avg_sq"].dtype == expected
        assert model(x).dtype == dtype  # the layer still computes in the base dtype


def test_float32_default_keeps_small_lambda_updates():
    """A lambda near 1 moved by 1e-4 per step: a bfloat16 lambda (8-bit mantissa, spacing 2**-7
    near 1) does not move at all; the float32 default does."""
    moved = {}
    for adapter_dtype in ("auto", "base"):
        model = _model(torch.bfloat16, adapter_dtype)
        layer = dict(increlora_layers(model))["0"]
        with torch.no_grad():
            layer.lora_lambda.fill_(1.0)
        before = layer.lora_lambda.detach().clone()
        opt = create_optimizer(model, lr=1e-4)
        model(torch.randn(8, 16, dtype=torch.bfloat16)).float().sum().backward()
        opt.step()
        moved[adapter_dtype] = bool((layer.lora_lambda != before)[layer.active_mask].any())
    assert moved == {"auto": True, "base": False}


def test_adapter_dtype_is_validated():
    with pytest.raises(ValueError, match="IncreLoRAConfig.adapter_dtype='fp8' is invalid"):
        IncreLoRAConfig(adapter_dtype="fp8")
