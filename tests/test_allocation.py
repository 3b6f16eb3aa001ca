"""Spec sections 2 and 4: allocation, budget, ties, reserve slots and advance learning."""
import warnings

import pytest
import torch

from increlora_fast.layer import SlotState

from method_helpers import ParallelBranches, batch, branch_config, make_run, train_steps


def test_modules_that_cannot_matter_never_grow():
    torch.manual_seed(0)
    model = ParallelBranches(4, weights=[1.0, 0.0, 1.0, 0.0])
    model, opt, ctl = make_run(model, branch_config(target_rank=3, top_h=2))
    train_steps(model, opt, ctl, range(30))
    pattern = ctl.rank_pattern()
    assert ctl.budget_reached
    assert pattern["branches.1"] == 1 and pattern["branches.3"] == 1
    assert pattern["branches.0"] + pattern["branches.2"] == 12 - 2
    assert all(e["module"] in ("branches.0", "branches.2") for e in ctl.allocation_log)


def _freeze_adapter(layer) -> None:
    for name in ("lora_A", "lora_B", "lora_lambda"):
        getattr(layer, name).requires_grad_(False)


def test_a_module_whose_adapter_the_user_froze_gets_no_rank():
    """A frozen lambda cannot use new rank: the module keeps its rank (it would score highest
    here, its branch weighing most), the others take the whole budget, and the user is told
    once."""
    torch.manual_seed(0)
    model = ParallelBranches(4, weights=[3.0, 1.0, 1.0, 1.0])
    model, opt, ctl = make_run(model, branch_config(target_rank=3, top_h=2))
    _freeze_adapter(model.branches[0])
    with pytest.warns(RuntimeWarning, match=r"1 adapted module\(s\) have a frozen lora_lambda "
                                            r".*branches\.0") as caught:
        train_steps(model, opt, ctl, range(40))
    assert sum("frozen lora_lambda" in str(w.message) for w in caught) == 1
    assert not any("got no gradient" in str(w.message) for w in caught)  # frozen, not idle
    pattern = ctl.rank_pattern()
    assert ctl.budget_reached and pattern["branches.0"] == 1
    assert sum(pattern.values()) == 12
    assert all(e["module"] != "branches.0" for e in ctl.allocation_log)


def test_allocation_stops_where_no_trainable_module_can_grow():
    """Two of three modules frozen: the third fills up to its capacity, then the controller
    ends the allocation below the budget, says so, and stops tracking the score."""
    torch.manual_seed(0)
    model = ParallelBranches(3)
    model, opt, ctl = make_run(model, branch_config(target_rank=3, top_h=2, incre_interval=1,
                                                    init_warmup=1))
    for layer in model.branches[1:]:
        _freeze_adapter(layer)
    with pytest.warns(RuntimeWarning, match=r"no module can take more rank .* total rank of 8 "
                                            r"of the budget's 9"):
        train_steps(model, opt, ctl, range(40))
    pattern = ctl.rank_pattern()
    assert pattern == {"branches.0": 6, "branches.1": 1, "branches.2": 1}
    assert ctl.budget_reached and not ctl.is_tracked(40)


def _tie_all_adapters(model):
    """Identical bases and adapters: every module gets exactly the same score."""
    first = model.branches[0]
    with torch.no_grad():
        for layer in model.branches[1:]:
            for name in ("lora_A", "lora_B", "lora_lambda"):
                getattr(layer, name).copy_(getattr(first, name))
            layer.base_layer.load_state_dict(first.base_layer.state_dict())


@pytest.mark.parametrize("n_modules,top_h,incre,total", [(5, 3, 2, 12), (4, 3, 1, 11), (3, 1, 2, 8)])
def test_budget_met_exactly_with_ties_and_odd_top_h(n_modules, top_h, incre, total):
    torch.manual_seed(0)
    model = ParallelBranches(n_modules)
    config = branch_config(r_max=7, target_total_rank=total, incre_rank_num=incre, top_h=top_h,
                           init_warmup=1, incre_interval=1, orth_reg_weight=0.0)
    model, opt, ctl = make_run(model, config)
    _tie_all_adapters(model)
    seen = []

    def check(step):
        seen.append(ctl.current_total_rank())
        assert ctl.current_total_rank() <= total
        assert all(layer.active_rank <= layer.r_max for layer in model.branches)

    train_steps(model, opt, ctl, range(1, 40), on_step=check)
    assert ctl.current_total_rank() == total and ctl.budget_reached
    # Ties are broken in module order: the first round grows the first top_h modules.
    first_step = ctl.allocation_log[0]["step"]
    first_round = [e["module"] for e in ctl.allocation_log if e["step"] == first_step]
    assert first_round == [f"branches.{i}" for i in range(len(first_round))]
    assert len(first_round) == min(top_h, -(-(total - n_modules) // incre))


def test_nan_scores_are_never_chosen_over_positive_ones():
    torch.manual_seed(0)
    model = ParallelBranches(3)
    model, opt, ctl = make_run(model, branch_config(target_total_rank=4, top_h=1,
                                                   init_warmup=0, incre_interval=1))
    ctl.ipt = torch.tensor([float("nan"), 0.0, 2.0], dtype=torch.float64)
    ctl.unc = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    ctl._allocate(step=1)
    assert ctl.rank_pattern() == {"branches.0": 1, "branches.1": 1, "branches.2": 2}


def test_reserve_slots_advance_learning_and_retirement():
    torch.manual_seed(0)
    model = ParallelBranches(2)
    model, opt, ctl = make_run(model, branch_config(target_rank=2, top_h=1, init_warmup=4,
                                                   incre_interval=4))
    layer = model.branches[0]
    reserve_a = layer.lora_A[1].detach().clone()
    train_steps(model, opt, ctl, range(4))
    # Reserve slot 1: trained A (advance learning), lambda fixed at reserve_lambda.
    assert layer.slot_state[1] == SlotState.RESERVE
    assert not torch.equal(layer.lora_A[1], reserve_a)
    assert float(layer.lora_lambda[1].detach()) == pytest.approx(1e-5)
    train_steps(model, opt, ctl, range(4, 13))  # rounds at steps 8 and 12
    assert ctl.budget_reached and ctl.current_total_rank() == 4
    for l in model.branches:
        assert not bool(l.reserve_mask.any())
        assert torch.all(l.lora_lambda[l.slot_state == SlotState.INACTIVE] == 0)


def _retired_run(**overrides):
    """Two branches trained past the budget (rounds at steps 8 and 12); the layers holding
    retired slots with their masks, and those slots' A rows and B columns just after."""
    torch.manual_seed(0)
    config = branch_config(target_rank=2, top_h=1, init_warmup=4, incre_interval=4, **overrides)
    model, opt, ctl = make_run(ParallelBranches(2), config)
    train_steps(model, opt, ctl, range(13))
    assert ctl.budget_reached
    retired = [(l, l.retired_mask.clone()) for l in model.branches if bool(l.retired_mask.any())]
    assert retired
    frozen = [(l.lora_A[m].detach().clone(), l.lora_B[:, m].detach().clone()) for l, m in retired]
    return model, opt, ctl, retired, frozen


def _penalty_by_hand(model, reserve_counts: bool) -> torch.Tensor:
    """Spec section 6 over the active slots, and the reserves (retired ones included) when
    ``reserve_counts``."""
    total = 0.0
    for l in model.branches:
        used = l.active_mask | (l.retired_mask if reserve_counts else False)
        a, b = l.lora_A[used], l.lora_B[:, used]
        eye = torch.eye(int(used.sum()))
        total = total + torch.linalg.matrix_norm(a @ a.T - eye) \
            + torch.linalg.matrix_norm(b.T @ b - eye)
    return 0.1 * total / (2 * len(model.branches))


def test_retired_reserves_stay_in_the_penalty_and_train_as_in_the_authors_code():
    """Spec sections 2 and 6: at the budget a reserve's lambda becomes 0 and it stops affecting
    the output, but it stays one of 'all components' of the penalty, and its A and B stay
    trainable parameters (the authors' code only zeroes lambda)."""
    model, opt, ctl, retired, frozen = _retired_run()
    for layer, mask in retired:
        assert torch.all(layer.slot_state[mask] == SlotState.INACTIVE)
        assert torch.all(layer.lora_lambda[mask] == 0) and not bool(layer.reserve_mask.any())
    torch.testing.assert_close(ctl.regularization_loss(), _penalty_by_hand(model, True))
    x = torch.randn(3, 6)
    out = model(x)
    with torch.no_grad():
        for layer, mask in retired:  # what a retired slot holds does not reach the output
            layer.lora_A[mask] = 5.0
    torch.testing.assert_close(model(x), out)
    for (layer, mask), (a, _) in zip(retired, frozen):
        layer.lora_A.data[mask] = a
    train_steps(model, opt, ctl, range(13, 16))
    for (layer, mask), (a, b) in zip(retired, frozen):
        assert not torch.equal(layer.lora_A[mask], a) and not torch.equal(layer.lora_B[:, mask], b)


def test_the_reserve_appended_in_the_last_round_takes_no_step_then_trains():
    """The last round (step 12) appends a fresh reserve to the module it grows and retires it at
    once: like any slot changed at a step, it takes no optimizer step at that step (its gradient
    was taken before it existed), weight decay included; from the next step on it trains
    through the penalty, on a schedule that begins at step 12."""
    torch.manual_seed(0)
    config = branch_config(target_rank=2, top_h=1, init_warmup=4, incre_interval=4)
    model, opt, ctl = make_run(ParallelBranches(2), config)
    train_steps(model, opt, ctl, range(12))
    x, y = batch(12)
    (((model(x) - y) ** 2).mean() + ctl.regularization_loss()).backward()
    ctl.step(12)
    assert ctl.budget_reached
    fresh = [(l, (l.slot_alloc_step == 12) & l.retired_mask) for l in model.branches]
    fresh = [(l, m) for l, m in fresh if bool(m.any())]
    assert len(fresh) == 1
    layer, mask = fresh[0]
    drawn = layer.lora_A[mask].detach().clone(), layer.lora_B[:, mask].detach().clone()
    opt.step()
    opt.zero_grad()
    assert torch.equal(layer.lora_A[mask], drawn[0]) and torch.equal(layer.lora_B[:, mask], drawn[1])
    assert torch.all(opt.state[layer.lora_A]["slot_count"][mask] == 0)
    train_steps(model, opt, ctl, range(13, 14))
    assert not torch.equal(layer.lora_A[mask], drawn[0])
    assert torch.all(opt.state[layer.lora_A]["slot_count"][mask] == 1)


def test_retired_reserves_out_of_the_penalty_or_frozen_where_configured():
    model, _, ctl, retired, frozen = _retired_run(reserve_in_penalty=False)
    torch.testing.assert_close(ctl.regularization_loss(), _penalty_by_hand(model, False))
    model, opt, ctl, retired, frozen = _retired_run(advance_learning=False)
    torch.testing.assert_close(ctl.regularization_loss(), _penalty_by_hand(model, True))
    train_steps(model, opt, ctl, range(13, 16))  # frozen reserves stay frozen once retired
    for (layer, mask), (a, b) in zip(retired, frozen):
        assert torch.equal(layer.lora_A[mask], a) and torch.equal(layer.lora_B[:, mask], b)


def test_activation_keeps_trained_reserve_and_appends_fresh_one():
    torch.manual_seed(0)
    model = ParallelBranches(1)
    model, opt, ctl = make_run(model, branch_config(target_rank=3, top_h=1, init_warmup=2,
                                                   incre_interval=2))
    layer = model.branches[0]
    train_steps(model, opt, ctl, range(4))  # step 2 == init_warmup: no growth yet
    assert layer.active_rank == 1
    trained = layer.lora_A[1].detach().clone()
    x = torch.randn(4, 6)
    model(x).sum().backward()
    ctl.step(4)
    assert layer.active_rank == 2 and torch.equal(layer.lora_A[1], trained)
    assert layer.slot_state[2] == SlotState.RESERVE and int(layer.slot_alloc_step[2]) == 4
    assert int(layer.slot_active_step[1]) == 4


def test_without_advance_learning_reserve_is_frozen_and_silent():
    torch.manual_seed(0)
    model = ParallelBranches(2)
    model, opt, ctl = make_run(model, branch_config(advance_learning=False, init_warmup=50,
                                                   incre_interval=50))
    layer = model.branches[0]
    before = layer.lora_A[1].detach().clone(), layer.lora_B[:, 1].detach().clone()
    train_steps(model, opt, ctl, range(5))
    assert float(layer.lora_lambda[1]) == 0.0
    assert torch.equal(layer.lora_A[1], before[0]) and torch.equal(layer.lora_B[:, 1], before[1])


@pytest.mark.parametrize("score", ["delta_w", "triplet", "exact_step"])
def test_step_without_gradients_warns_and_keeps_the_round(score):
    """(exact_step: ``score_grad`` allocated when tracking turns on is no sign of a backward)"""
    torch.manual_seed(0)
    exact = {"score": "delta_w", "exact_step_score": True} if score == "exact_step" else {}
    model, opt, ctl = make_run(ParallelBranches(2), branch_config(
        target_rank=2, top_h=1, init_warmup=2, incre_interval=2, **{"score": score, **exact}))
    train_steps(model, opt, ctl, range(4))
    assert ctl.current_total_rank() == 2          # the round at step 4 has not come yet
    with pytest.warns(RuntimeWarning, match="no gradients"):
        ctl.step(4)                               # misuse: no backward since the last step
    assert ctl.round_pending and ctl.current_total_rank() == 2
    train_steps(model, opt, ctl, range(5, 6))     # next real step runs the waiting round
    assert ctl.current_total_rank() == 3 and ctl.allocation_log[0]["step"] == 5


def test_a_module_outside_the_forward_pass_is_named_once_at_a_round():
    """An adapted module the forward never calls (TRL's fused LM head reads the output
    layer's weight directly) gets no gradient and scores nothing: the first allocation round
    says which, once; the others still grow."""

    class SkipsTheLast(ParallelBranches):
        def forward(self, x):
            return sum(w * b(x) for w, b in zip(self.weights[:-1], self.branches[:-1]))

    model, opt, ctrl = make_run(SkipsTheLast(3), branch_config())
    with pytest.warns(RuntimeWarning, match=r"1 adapted module\(s\) got no gradient at "
                      r"allocation round 4: branches\.2\b") as caught:
        train_steps(model, opt, ctrl, range(12))
    assert sum("got no gradient" in str(w.message) for w in caught) == 1
    assert ctrl.allocation_log and ctrl.rank_pattern()["branches.2"] == 1
    model, opt, ctrl = make_run(ParallelBranches(3), branch_config())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_steps(model, opt, ctrl, range(12))


def test_penalty_sends_no_gradient_to_frozen_reserve_slots():
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(2), branch_config(advance_learning=False))
    ctl.regularization_loss().backward()
    for layer in model.branches:
        reserve = layer.reserve_mask
        assert torch.all(layer.lora_A.grad[reserve] == 0)
        assert torch.all(layer.lora_B.grad[:, reserve] == 0)
        assert layer.lora_A.grad[layer.active_mask].abs().sum() > 0


def test_a_replayed_round_after_the_budget_is_reached_changes_nothing():
    """`finish_replayed_round` (the host side of a round replayed from a CUDA graph) once the
    budget is reached: no round, no change to scores, ranks, log or the step count."""
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(2), branch_config(target_rank=2, top_h=1))
    train_steps(model, opt, ctl, range(12))
    assert ctl.budget_reached
    before = (ctl.ipt.clone(), ctl.unc.clone(), list(ctl.allocation_log), ctl.rank_pattern(),
              ctl._next_step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctl.finish_replayed_round(12)
    after = (ctl.ipt, ctl.unc, ctl.allocation_log, ctl.rank_pattern(), ctl._next_step)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert after[2:] == before[2:]


def test_a_module_at_capacity_gains_what_fits_and_then_yields_its_place():
    """Spec section 4 on fixed shapes: each round grows the top_h highest-scoring modules that
    can still grow. Module 0 scores highest at every round (scores set by hand, as backward
    would leave them); with r_max 4 and incre_rank_num 2 it grows 1 -> 3, then by the one slot
    left (3 -> 4), and from then on the rounds go to the next-ranked modules, 2 before 1, up
    to the budget of 10."""
    torch.manual_seed(0)
    model = ParallelBranches(3)
    config = branch_config(r_max=4, target_total_rank=10, incre_rank_num=2, top_h=1,
                           init_warmup=0, incre_interval=1, score_window=1)
    model, _, ctl = make_run(model, config)
    patterns, reserves = [], []
    for step in range(6):  # step 0 is no round (init_warmup 0)
        for layer, score in zip(model.branches, (5.0, 1.0, 2.0)):
            layer.score_sum.fill_(score)
        ctl.step(step)
        patterns.append([layer.active_rank for layer in model.branches])
        reserves.append([layer.reserve_rank for layer in model.branches])
    assert patterns == [[1, 1, 1], [3, 1, 1], [4, 1, 1], [4, 1, 3], [4, 1, 4], [4, 2, 4]]
    assert reserves[:5] == [[2, 2, 2], [1, 2, 2], [0, 2, 2], [0, 2, 1], [0, 2, 0]]
    assert [e["module"] for e in ctl.allocation_log] == ["branches.0", "branches.0",
                                                         "branches.2", "branches.2", "branches.1"]
    assert ctl.budget_reached and reserves[5] == [0, 0, 0]
