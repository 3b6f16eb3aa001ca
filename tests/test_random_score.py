"""Control (d) of issue 15: ``score="random"`` ranks modules at random, seeded and deterministic,
on the same schedule and without computing any score."""
import pytest
import torch

from increlora_fast import IncreLoRAConfig

from method_helpers import ParallelBranches, branch_config, make_run, train_steps


def _allocation(seed: int, weights=None, torch_seed: int = 0):
    """(allocation log as (step, module, new_rank), final rank pattern) of a short run."""
    torch.manual_seed(torch_seed)
    model = ParallelBranches(8, weights=weights)
    config = branch_config(score="random", seed=seed, target_rank=2, top_h=2, r_max=4)
    model, opt, ctl = make_run(model, config)
    tracked = []
    train_steps(model, opt, ctl, range(20),
                on_step=lambda step: tracked.append(any(m.score_enabled for m in model.branches)))
    assert ctl.budget_reached
    assert not any(tracked), "random ranking must not track scores"
    assert all(float(m.score_sum) == 0.0 for m in model.branches)
    log = [(e["step"], e["module"], e["new_rank"]) for e in ctl.allocation_log]
    return log, ctl.rank_pattern()


def test_same_seed_same_allocation_even_with_other_weights_and_data():
    log_a, pattern_a = _allocation(seed=3)
    # Another initialisation and other module weights: the ranking depends on the seed alone.
    log_b, pattern_b = _allocation(seed=3, weights=[1, 0, 2, 0, 1, 0, 3, 0], torch_seed=7)
    assert log_a == log_b and pattern_a == pattern_b
    assert len(log_a) == 8  # 8 modules from rank 1 to an average of 2, one rank per growth


def test_different_seeds_give_different_allocations():
    logs = {tuple(_allocation(seed=s)[0]) for s in range(4)}
    assert len(logs) == 4


def test_same_schedule_as_the_score_driven_method():
    """Rounds fall on the same steps with the same number of modules as with delta_w."""
    log_random, _ = _allocation(seed=1)
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(8), branch_config(target_rank=2, top_h=2, r_max=4))
    train_steps(model, opt, ctl, range(20))
    steps_random = [step for step, _, _ in log_random]
    steps_delta_w = [e["step"] for e in ctl.allocation_log]
    assert steps_random == steps_delta_w


def test_random_ranking_grows_modules_that_cannot_matter():
    """delta_w never grows a zero-weight branch (test_allocation); random ranking does."""
    grown = set()
    for seed in range(3):
        _, pattern = _allocation(seed=seed, weights=[1, 0, 1, 0, 1, 0, 1, 0])
        grown |= {name for name, rank in pattern.items() if rank > 1}
    assert grown & {"branches.1", "branches.3", "branches.5", "branches.7"}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "0"])
def test_seed_must_be_a_non_negative_integer(bad):
    with pytest.raises(ValueError, match="IncreLoRAConfig.seed"):
        IncreLoRAConfig(seed=bad)


def test_unknown_score_names_the_choices():
    with pytest.raises(ValueError, match="random"):
        IncreLoRAConfig(score="shuffled")
