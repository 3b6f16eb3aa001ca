"""Randomness owned by the controller (issue 14 item 11): fresh reserve slots come from a
generator seeded by `IncreLoRAConfig.seed` and saved in the controller's state_dict."""
from __future__ import annotations

import copy

import pytest
import torch

from increlora_fast import IncreLoRAConfig, IncreLoRAController, create_optimizer, inject_increlora

from method_helpers import ParallelBranches, branch_config, train_steps

TOTAL, SPLIT = 24, 9  # SPLIT lies inside the allocation phase


def _fresh(**overrides):
    torch.manual_seed(0)
    model = ParallelBranches(3)
    config = branch_config(target_rank=4, top_h=1, init_warmup=3, incre_interval=2,
                           total_step=TOTAL, modules_to_save=None, **overrides)
    inject_increlora(model, config)
    return model, create_optimizer(model, config, lr=1e-2, weight_decay=0.1), \
        IncreLoRAController(model, config)


def test_resume_from_the_three_state_dicts_is_bit_exact_without_global_rng():
    model, opt, ctl = _fresh()
    train_steps(model, opt, ctl, range(TOTAL))
    reference = copy.deepcopy(model.state_dict())
    assert ctl.budget_reached

    model, opt, ctl = _fresh()
    train_steps(model, opt, ctl, range(SPLIT))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ctl.state_dict()))
    later_rounds = [e for e in ctl.allocation_log]

    resumed, opt2, ctl2 = _fresh()
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    ctl2.load_state_dict(saved[2])
    torch.manual_seed(987654)  # the global RNG is NOT restored
    train_steps(resumed, opt2, ctl2, range(SPLIT, TOTAL))
    assert len(ctl2.allocation_log) > len(later_rounds)  # fresh reserves were drawn after SPLIT
    state = resumed.state_dict()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def test_processes_with_different_global_rng_draw_identical_reserves():
    """What data-parallel ranks seeded differently see: equal reserves, no broadcast."""
    runs = []
    for rank_seed in (100, 101):
        model, opt, ctl = _fresh()
        torch.manual_seed(rank_seed)
        train_steps(model, opt, ctl, range(TOTAL))
        runs.append(model.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(runs[1][key], value), key


def test_the_seed_chooses_the_reserves_and_is_validated():
    states = []
    for seed in (0, 1):
        model, opt, ctl = _fresh(seed=seed)
        train_steps(model, opt, ctl, range(TOTAL))
        states.append(model.state_dict())
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0] if "lora_A" in k)
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match="IncreLoRAConfig.seed=.* an integer >= 0"):
            IncreLoRAConfig(seed=bad)


def test_state_dict_carries_the_generator():
    model, opt, ctl = _fresh()
    train_steps(model, opt, ctl, range(SPLIT))
    state = ctl.state_dict()
    assert torch.equal(state["generator"], ctl.generator.get_state())
    expected = torch.randn(5, generator=ctl.generator)
    other = _fresh()[2]
    other.load_state_dict(state)
    assert torch.equal(torch.randn(5, generator=other.generator), expected)


def test_state_from_before_the_generator_still_loads():
    model, opt, ctl = _fresh()
    state = ctl.state_dict()
    del state["generator"]
    ctl.load_state_dict(state)
    assert torch.equal(ctl.generator.get_state(),
                       torch.Generator().manual_seed(ctl.config.seed).get_state())
