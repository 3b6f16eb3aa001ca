"""What users do with a PyTorch model over its life, on an injected model and its training
objects: deep copies, pickles, state dicts, a new run over a grown model, several models in one
process, evaluation passes between steps."""
import copy
import io
import warnings

import pytest
import torch

from increlora_fast import IncreLoRAController, create_optimizer, inject_increlora
from increlora_fast.model import increlora_layers
from method_helpers import ParallelBranches, batch, branch_config, make_run, train_steps


def grown_run(steps: int = 9, **overrides):
    """A run of ParallelBranches(3) whose rounds grew slots at steps 4, 6 and 8."""
    torch.manual_seed(0)
    config = branch_config(target_rank=4, r_max=5, top_h=1, warmup_steps=2, **overrides)
    model, opt, ctl = make_run(ParallelBranches(3), config)
    train_steps(model, opt, ctl, range(steps))
    return model, opt, ctl, config


def new_run(model, config):
    """A new optimizer and controller over ``model``, as a new run builds them."""
    return create_optimizer(model, config, lr=1e-2, weight_decay=0.1), \
        IncreLoRAController(model, config)


def latest_stamps(model):
    return [int(max(layer.slot_alloc_step.max(), layer.slot_active_step.max()))
            for _, layer in increlora_layers(model)]


@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy"])
def test_a_new_optimizer_over_slots_stamped_by_an_earlier_run_is_named(how):
    """A grown model's state dict loaded into a freshly injected model (or a deep copy of it)
    and trained by a new optimizer: its slots keep the stamps of the earlier run (up to step
    8), where their per-slot schedules begin, so with warmup_steps > 0 they trained at a
    learning rate of 0 for the new run's first steps, silently after load_state_dict (which
    cleared the layer's host record of its stamps), and with a warning that named only a
    wrong step index after a copy. Both now name the stamps and restart_schedules."""
    model, _, _, config = grown_run()
    assert max(latest_stamps(model)) == 8
    if how == "deepcopy":
        target = copy.deepcopy(model)
    else:
        torch.manual_seed(1)
        target = inject_increlora(ParallelBranches(3), config)
        target.load_state_dict(model.state_dict(), strict=True)
    opt, ctl = new_run(target, config)
    with pytest.warns(RuntimeWarning, match=r"stamped at step [468] .*optimizer's step 0.*"
                                            r"restart_schedules\(\)"):
        train_steps(target, opt, ctl, range(2))


def test_restarted_schedules_train_every_loaded_slot_from_the_first_step():
    """After `restart_schedules` on every layer the loaded slots train at once, and the new
    run says nothing."""
    model, _, _, config = grown_run()
    torch.manual_seed(1)
    target = inject_increlora(ParallelBranches(3), config)
    target.load_state_dict(model.state_dict())
    for _, layer in increlora_layers(target):
        layer.restart_schedules()
    opt, ctl = new_run(target, config)
    before = {n: layer.lora_lambda.detach().clone() for n, layer in increlora_layers(target)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_steps(target, opt, ctl, range(2))
    for name, layer in increlora_layers(target):
        active = layer.active_mask
        assert (layer.lora_lambda.detach() != before[name])[active].all(), name


def test_a_resume_with_the_optimizer_state_says_nothing():
    """The same state dict loaded with the optimizer's state (a resume): the stamps lie
    before the optimizer's step, and nothing is said."""
    model, opt, ctl, config = grown_run()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ctl.state_dict()))
    torch.manual_seed(1)
    target = inject_increlora(ParallelBranches(3), config)
    target.load_state_dict(saved[0])
    opt2, ctl2 = new_run(target, config)
    opt2.load_state_dict(saved[1])
    ctl2.load_state_dict(saved[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_steps(target, opt2, ctl2, range(9, 12))

