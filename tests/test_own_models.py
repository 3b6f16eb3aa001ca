"""inject_increlora on users' own PyTorch models built in unusual but real ways: lazy modules,
linears reached through plain Python containers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from increlora_fast import IncreLoRAConfig, inject_increlora


def config(targets) -> IncreLoRAConfig:
    return IncreLoRAConfig(target_modules=targets, r_max=4, init_r=1, target_rank=2,
                           init_warmup=2, incre_interval=2, top_h=1, total_step=10)


@pytest.mark.parametrize("targets", [["0", "2"], ["2"], "all-linear"])
def test_uninitialized_lazy_module_is_refused_naming_it(targets):
    """A LazyLinear before its first forward holds uninitialized parameters: injection failed
    with torch's "Attempted to use an uninitialized parameter in requires_grad_" (freezing the
    model), naming no module, also where the lazy module was not a target."""
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError) as error:
        inject_increlora(model, config(targets))
    message = str(error.value)
    assert "\n" not in message and "'0'" in message and "lazy" in message.lower()
    assert "forward" in message  # the fix: one dry-run forward initializes it
    assert type(model[0]) is nn.LazyLinear and type(model[2]) is nn.Linear
    assert not hasattr(model, "increlora_config")
    model(torch.randn(3, 5))  # the dry run: afterwards the model injects and computes
    inject_increlora(model, config(targets))
    assert model(torch.randn(3, 5)).shape == (3, 4)
