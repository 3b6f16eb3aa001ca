"""Spec section 3: module scores against a dense float64 re-derivation, and their smoothing."""
import math

import pytest
import torch
from torch import nn

from increlora_fast import IncreLoRAConfig, inject_increlora
from increlora_fast.controller import IncreLoRAController, triplet_score
from increlora_fast.layer import SlotState

from method_helpers import ParallelBranches


def _randomise(model: nn.Module, gen: torch.Generator) -> None:
    """Random lambdas and a random number of extra active slots per layer."""
    for module in model.modules():
        if hasattr(module, "slot_state"):
            extra = int(torch.randint(0, 3, (1,), generator=gen))
            module.activate_reserve(min(extra, module.reserve_rank), step=0)
            module.add_reserve(1, step=0)
            with torch.no_grad():
                module.lora_lambda.copy_(torch.randn(module.r_max, generator=gen, dtype=torch.float64)
                                         * (module.slot_state != SlotState.INACTIVE))
                module.lora_lambda[module.reserve_mask] = 1e-5


def _dense_scores(model: ParallelBranches, x: torch.Tensor, target: torch.Tensor):
    """Re-derive spec section 3 with autograd on materialised dW (float64)."""
    scores = []
    deltas, outs = [], 0
    for w, layer in zip(model.weights, model.branches):
        active, reserve = layer.slot_state == SlotState.ACTIVE, layer.slot_state == SlotState.RESERVE
        lam = torch.where(active | reserve, layer.lora_lambda.detach(), torch.zeros(()))
        scale = layer.lora_alpha / int(active.sum())
        dw = (scale * layer.lora_B.detach() @ torch.diag(lam) @ layer.lora_A.detach()).requires_grad_()
        deltas.append(dw)
        base = layer.base_layer
        outs = outs + w * (x @ (base.weight + dw).t() + base.bias)
    loss = ((outs - target) ** 2).sum()
    grads = torch.autograd.grad(loss, deltas)
    for dw, g in zip(deltas, grads):
        scores.append(float((dw.detach() * g).abs().sum() / math.sqrt(dw.numel())))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delta_w_score_equals_dense_float64_rederivation(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ParallelBranches(3, d_in=7, d_out=5, weights=[1.0, 0.5, 2.0]).double()
    config = IncreLoRAConfig(target_modules=r"branches\.\d", r_max=6, target_rank=3,
                             init_warmup=100, incre_interval=100)
    inject_increlora(model, config)
    controller = IncreLoRAController(model, config)
    _randomise(model, gen)
    b1, b2 = config.beta1, config.beta2
    ipt = torch.zeros(3, dtype=torch.float64)
    unc = torch.zeros(3, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(4, 3, 7, generator=gen, dtype=torch.float64)
        target = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
        expected = _dense_scores(model, x, target)
        ((model(x) - target) ** 2).sum().backward()
        controller.step(step)
        model.zero_grad()
        ipt = b1 * ipt + (1 - b1) * expected
        unc = b2 * unc + (1 - b2) * (expected - ipt).abs()
        assert expected.min() > 0
        torch.testing.assert_close(controller.ipt, ipt, rtol=1e-5, atol=0)
        torch.testing.assert_close(controller.unc, unc, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(controller.importance(), ipt * unc, rtol=2e-4, atol=0)


def test_triplet_score_equals_float64_formula():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = ParallelBranches(2, d_in=9, d_out=4).double()
    config = IncreLoRAConfig(target_modules=r"branches\.\d", r_max=5, target_rank=2,
                             score="triplet", init_warmup=100, incre_interval=100)
    inject_increlora(model, config)
    controller = IncreLoRAController(model, config)
    _randomise(model, gen)
    x = torch.randn(8, 9, generator=gen, dtype=torch.float64)
    (model(x) ** 2).sum().backward()
    expected = []
    for layer in model.branches:
        a, b, lam = layer.lora_A, layer.lora_B, layer.lora_lambda
        per_slot = ((lam * lam.grad).abs() + (a * a.grad).abs().sum(1) / a.shape[1]
                    + (b * b.grad).abs().sum(0) / b.shape[0])
        active = layer.slot_state == SlotState.ACTIVE
        expected.append(float(per_slot[active].sum() / active.sum()))
        assert float(per_slot[active].sum()) > 0
        torch.testing.assert_close(triplet_score(layer).double(), torch.tensor(expected[-1],
                                   dtype=torch.float64), rtol=1e-6, atol=0)
    controller.step(0)
    torch.testing.assert_close(controller.ipt, (1 - config.beta1) * torch.tensor(expected,
                               dtype=torch.float64), rtol=1e-6, atol=0)


def test_tracking_stops_once_budget_is_reached():
    torch.manual_seed(0)
    model = ParallelBranches(2)
    config = IncreLoRAConfig(target_modules=r"branches\.\d", r_max=4, target_rank=2,
                             init_warmup=0, incre_interval=1, top_h=2)
    inject_increlora(model, config)
    controller = IncreLoRAController(model, config)
    assert all(b.score_enabled for b in model.branches)
    model(torch.randn(3, 6)).sum().backward()
    controller.step(1)
    assert controller.budget_reached and controller.current_total_rank() == 4
    assert not any(b.score_enabled for b in model.branches)
    model(torch.randn(3, 6)).sum().backward()
    assert all(float(b.score_sum) == 0.0 for b in model.branches)
    ipt = controller.ipt.clone()
    controller.step(2)
    assert torch.equal(controller.ipt, ipt)


def test_nonfinite_gradient_step_leaves_smoothed_scores_and_warns_once():
    torch.manual_seed(0)
    model = ParallelBranches(2)
    config = IncreLoRAConfig(target_modules=r"branches\.\d", r_max=4, target_rank=2,
                             init_warmup=100, incre_interval=100)
    inject_increlora(model, config)
    controller = IncreLoRAController(model, config)
    model(torch.randn(3, 6)).sum().backward()
    controller.step(0)
    model.zero_grad()
    ipt, unc = controller.ipt.clone(), controller.unc.clone()
    assert ipt.abs().sum() > 0
    with pytest.warns(RuntimeWarning, match="non-finite"):
        (model(torch.full((3, 6), float("nan")))).sum().backward()
        controller.step(1)
    assert torch.equal(controller.ipt, ipt) and torch.equal(controller.unc, unc)
    model.zero_grad()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (model(torch.full((3, 6), float("inf")))).sum().backward()
        controller.step(2)
    assert torch.equal(controller.ipt, ipt)
