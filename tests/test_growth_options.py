"""Issue 15's options beyond the authors' method: scale-preserving growth, reserves out of the
orthogonal penalty, and unit-norm activation (the norm-only control of advance learning)."""
import pytest
import torch

from increlora_fast import IncreLoRAConfig
from increlora_fast.layer import IncreLoRALinear, SlotState

from method_helpers import ParallelBranches, batch, branch_config, make_run, train_steps

GROWTH_STEP = 8  # first round of `_grow_once`'s schedule (init_warmup 4, interval 4)


def _adapter_outputs(model, x):
    with torch.no_grad():
        return [layer(x) - layer.base_layer(x) for layer in model.branches]


def _grow_once(**options):
    """Train two modules to step GROWTH_STEP, then take that step's allocation round (one module
    grows from rank 1 to 2). Returns (adapter outputs before, after, index of the grown module,
    the optimizer, the model)."""
    torch.manual_seed(0)
    config = branch_config(target_rank=2, top_h=1, init_warmup=4, incre_interval=4,
                           warmup_steps=2, **options)
    model, opt, ctl = make_run(ParallelBranches(2), config, lr=3e-2)
    train_steps(model, opt, ctl, range(GROWTH_STEP))
    x, y = batch(GROWTH_STEP)
    loss = ((model(x) - y) ** 2).mean() + ctl.regularization_loss()
    loss.backward()
    probe = torch.randn(32, 6, generator=torch.Generator().manual_seed(5))
    before = _adapter_outputs(model, probe)
    ranks = [layer.active_rank for layer in model.branches]
    ctl.step(GROWTH_STEP)
    after = _adapter_outputs(model, probe)
    grown = [i for i, layer in enumerate(model.branches) if layer.active_rank > ranks[i]]
    assert len(grown) == 1 and ranks[grown[0]] == 1
    return before, after, grown[0], opt, model


def _relative_change(before, after):
    return float((after - before).detach().norm() / before.detach().norm())


def test_scale_preserving_growth_leaves_the_output_unchanged():
    before, after, i, _, model = _grow_once(scale_preserving_growth=True)
    assert float(model.branches[i].lora_lambda[0].detach().abs()) > 1e-2  # a trained component
    assert _relative_change(before[i], after[i]) < 1e-3
    assert torch.equal(before[1 - i], after[1 - i])  # the module that did not grow


def test_without_the_option_growth_halves_the_module_output():
    before, after, i, _, _ = _grow_once()
    # From rank 1 to 2 the alpha / rank scale halves the existing component.
    assert _relative_change(before[i], after[i]) == pytest.approx(0.5, abs=1e-2)


def test_scale_preserving_growth_keeps_the_lambda_optimizer_state():
    """The rescaled lambdas are not restarted: moments and step counts go on (config docstring)."""
    _, _, i, opt, model = _grow_once(scale_preserving_growth=True)
    state = opt.state[model.branches[i].lora_lambda]
    count_before = state["slot_count"].clone()
    m_before = state["exp_avg"].clone()
    opt.step()
    assert state["slot_count"][0] == count_before[0] + 1
    assert state["slot_count"][1] == 0  # the newly activated slot starts fresh (next step)
    assert state["exp_avg"][0] != 0 and torch.sign(state["exp_avg"][0]) == torch.sign(m_before[0])


def test_scale_preserving_growth_from_rank_two_to_three():
    torch.manual_seed(0)
    layer = IncreLoRALinear(torch.nn.Linear(6, 5), r_max=4, init_r=2, reserve_rank=1)
    with torch.no_grad():
        layer.lora_lambda[:2] = torch.tensor([0.3, -0.2])
    x = torch.randn(8, 6)
    before = layer(x) - layer.base_layer(x)
    layer.activate_reserve(1, step=3)
    layer.condition_growth(2, preserve_scale=True)
    assert torch.allclose(layer.lora_lambda[:2].detach(), torch.tensor([0.45, -0.3]))
    assert _relative_change(before, layer(x) - layer.base_layer(x)) < 1e-3


def _penalty_grads(reserve_in_penalty: bool):
    torch.manual_seed(0)
    config = branch_config(target_rank=2, reserve_in_penalty=reserve_in_penalty)
    model, _, ctl = make_run(ParallelBranches(2), config)
    ctl.regularization_loss().backward()
    layer = model.branches[0]
    reserve = layer.slot_state == SlotState.RESERVE
    active = layer.slot_state == SlotState.ACTIVE
    return layer, reserve, active


def test_reserve_out_of_the_penalty_gets_no_penalty_gradient():
    layer, reserve, active = _penalty_grads(reserve_in_penalty=False)
    assert reserve.any()
    assert torch.all(layer.lora_A.grad[reserve] == 0)
    assert torch.all(layer.lora_B.grad[:, reserve] == 0)
    assert layer.lora_A.grad[active].abs().sum() > 0  # active slots stay in the penalty


def test_reserve_in_the_penalty_by_default():
    layer, reserve, _ = _penalty_grads(reserve_in_penalty=True)
    assert layer.lora_A.grad[reserve].abs().sum() > 0
    assert layer.lora_B.grad[:, reserve].abs().sum() > 0


@pytest.mark.parametrize("advance_learning", [False, True])
def test_normalize_on_activation_gives_unit_norm_rows_and_columns(advance_learning):
    _, _, i, _, model = _grow_once(normalize_on_activation=True, advance_learning=advance_learning)
    layer = model.branches[i]
    assert layer.slot_state[1] == SlotState.ACTIVE
    assert float(layer.lora_A.detach()[1].norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(layer.lora_B.detach()[:, 1].norm()) == pytest.approx(1.0, abs=1e-5)
    # The old component and the fresh reserve are left alone.
    assert float(layer.lora_A.detach()[2].norm()) < 0.2


def test_without_normalization_activated_rows_keep_their_norm():
    _, _, i, _, model = _grow_once(advance_learning=False)
    assert float(model.branches[i].lora_A.detach()[1].norm()) < 0.2  # N(0, 0.02) over 6 inputs


@pytest.mark.parametrize("field", ["scale_preserving_growth", "reserve_in_penalty",
                                   "normalize_on_activation"])
def test_option_fields_must_be_bools(field):
    with pytest.raises(ValueError, match=f"IncreLoRAConfig.{field}"):
        IncreLoRAConfig(**{field: 1})
