"""Spec section 5 on fixed shapes: per-slot restart warmup, fresh moments, masked updates."""
import pytest
import torch

from increlora_fast import IncreLoRAConfig, inject_increlora
from increlora_fast.layer import SlotState
from increlora_fast.optim_functional import masked_adamw_torch_
from increlora_fast.optimizer import create_optimizer, schedule_multiplier

from method_helpers import ParallelBranches, batch, branch_config, make_run, train_steps


@pytest.mark.parametrize("step,start,expected", [
    (20, 20, 0.0), (25, 20, 0.5), (29, 20, 0.9), (30, 20, 1.0), (65, 20, 0.5), (100, 20, 0.0),
    (130, 20, 0.0), (5, 0, 0.5), (55, 0, 0.5), (10, 20, 0.0),
    (97, 95, 0.2), (100, 95, 0.0)])  # started within warmup of the end: still 0 at step 100
def test_schedule_multiplier_follows_linear_warmup_then_decay(step, start, expected):
    # warmup 10 steps from `start`, then linear decay reaching 0 at step 100
    got = float(schedule_multiplier(step, start, warmup_steps=10, total_step=100))
    assert got == pytest.approx(expected, abs=1e-12)


def test_schedule_without_total_step_stays_constant_after_warmup():
    assert float(schedule_multiplier(500, 3, warmup_steps=4, total_step=None)) == 1.0
    assert float(schedule_multiplier(4, 3, warmup_steps=4, total_step=None)) == 0.25


def test_newly_activated_slot_learning_rate_restarts_at_its_activation_step():
    """A fresh slot's first Adam update is lr x multiplier x sign(grad): check that multiplier."""
    torch.manual_seed(0)
    model = ParallelBranches(1)
    config = branch_config(target_rank=3, top_h=1, init_warmup=2, incre_interval=2,
                           warmup_steps=4, total_step=40, orth_reg_weight=0.0)
    lr = 1e-2
    model, opt, ctl = make_run(model, config, lr=lr, weight_decay=0.0)
    layer = model.branches[0]
    train_steps(model, opt, ctl, range(4))
    x, y = torch.randn(8, 6), torch.randn(8, 5)
    ((model(x) - y) ** 2).mean().backward()
    ctl.step(4)                                  # slot 1 activated at step 4
    assert int(layer.slot_active_step[1]) == 4
    for t in (4, 5, 6):
        before = layer.lora_lambda[1].item()
        opt.step()
        mult = float(schedule_multiplier(t, 4, 4, 40))
        state = opt.state[layer.lora_lambda]
        if t == 4:
            assert state["slot_count"][1] == 0  # fresh moments; its zero gradient not counted
            assert layer.lora_lambda[1].item() == before  # multiplier 0 at its first step
        else:
            assert mult > 0
            assert abs(layer.lora_lambda[1].item() - before) <= lr * mult * 3.2 + 1e-12
            assert layer.lora_lambda[1].item() != before
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()


def test_fresh_moments_after_activation_and_reserve_reinitialisation():
    torch.manual_seed(0)
    model = ParallelBranches(1)
    model, opt, ctl = make_run(model, branch_config(target_rank=3, top_h=1, init_warmup=2,
                                                   incre_interval=2))
    layer = model.branches[0]
    train_steps(model, opt, ctl, range(4))
    a_state = opt.state[layer.lora_A]
    assert a_state["slot_count"][1] == 4 and a_state["exp_avg"][2].abs().sum() == 0
    train_steps(model, opt, ctl, range(4, 5))  # step 4: slot 1 active, slot 2 new reserve
    lam_state = opt.state[layer.lora_lambda]
    assert lam_state["slot_count"][1] == 0      # lambda 1 starts its own moments (at step 5)
    assert a_state["slot_count"][1] == 5        # A row 1 keeps its advance-learning moments
    assert a_state["slot_count"][2] == 0        # new reserve row starts fresh (at step 5)


def test_inactive_slots_and_reserve_lambdas_bitwise_unchanged_with_weight_decay():
    torch.manual_seed(0)
    model = ParallelBranches(3)
    model, opt, ctl = make_run(model, branch_config(r_max=8, target_rank=3, init_warmup=5,
                                                   incre_interval=5), weight_decay=0.5)
    snapshots = {}
    for i, layer in enumerate(model.branches):
        inactive = layer.slot_state == SlotState.INACTIVE
        snapshots[i] = (inactive.clone(), layer.lora_A.detach().clone(),
                        layer.lora_B.detach().clone(), layer.lora_lambda.detach().clone())

    def check(step):
        for i, layer in enumerate(model.branches):
            never_used, a0, b0, l0 = snapshots[i]
            still = never_used & (layer.slot_state == SlotState.INACTIVE) & (layer.slot_alloc_step == -1)
            assert torch.equal(layer.lora_A[still], a0[still])
            assert torch.equal(layer.lora_B[:, still], b0[:, still])
            assert torch.equal(layer.lora_lambda[still], l0[still])
            reserve = layer.reserve_mask
            assert torch.all(layer.lora_lambda[reserve] == torch.tensor(1e-5))

    train_steps(model, opt, ctl, range(40), on_step=check)
    assert ctl.budget_reached
    assert any(bool((s[0] & (l.slot_state == SlotState.INACTIVE)).any())
               for s, l in zip(snapshots.values(), model.branches))


def test_masked_adamw_reference_matches_torch_adamw_on_unmasked_slots():
    torch.manual_seed(0)
    p = torch.randn(5, 7)
    ref = p.clone().requires_grad_()
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, eps=1e-8)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    mask = torch.tensor([True, False, True, True, False])
    for n in range(1, 4):
        g = torch.randn(5, 7)
        ref.grad = g.clone()
        torch_opt.step()
        masked_adamw_torch_(p, g, m, v, mask, torch.full((5,), 1e-2), torch.full((5,), float(n)),
                            0, 0.9, 0.999, 1e-8, 0.1)
    # fp32: same math, different operation order than torch.optim.AdamW
    torch.testing.assert_close(p[mask], ref.detach()[mask], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p[~mask], ref.detach()[~mask])


# (seed 0 alone passed when every step drew a new batch: the second Adam step is 1 in size only
# where the two steps' gradients agree, as they do for one batch, the head unmoved at step 0)
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_classifier_follows_ordinary_warmup_and_decay(seed):
    torch.manual_seed(seed)
    from torch import nn
    from increlora_fast import IncreLoRAConfig, create_optimizer, inject_increlora
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    config = IncreLoRAConfig(target_modules=["0"], r_max=3, warmup_steps=2, total_step=10,
                             modules_to_save=["1"])
    inject_increlora(model, config)
    opt = create_optimizer(model, config, lr=0.1)
    head = model[1].weight
    changes = []
    x = torch.randn(3, 4)
    for _ in range(3):
        before = head.detach().clone()
        model(x).sum().backward()
        opt.step(); opt.zero_grad()
        changes.append((head - before).abs().max().item())
    assert changes[0] == 0.0                        # multiplier 0 at step 0
    assert changes[1] == pytest.approx(0.05, rel=1e-3)   # 0.1 x 1/2, |adam step| == 1
    assert changes[2] == pytest.approx(0.1, rel=1e-2)


def test_without_advance_learning_activated_slot_warms_up_from_activation():
    torch.manual_seed(0)
    model = ParallelBranches(1)
    config = branch_config(advance_learning=False, target_rank=2, top_h=1, init_warmup=2,
                           incre_interval=2, warmup_steps=4, total_step=40, orth_reg_weight=0.0)
    # weight decay moves A whenever its multiplier is > 0, even with a zero gradient
    model, opt, ctl = make_run(model, config, lr=1e-2, weight_decay=0.5)
    layer = model.branches[0]
    train_steps(model, opt, ctl, range(4))
    x, y = torch.randn(8, 6), torch.randn(8, 5)
    ((model(x) - y) ** 2).mean().backward()
    ctl.step(4)                                  # slot 1 activated at step 4 (allocated at 0)
    before = layer.lora_A[1].detach().clone()
    opt.step()                                   # its first step: multiplier 0 from step 4
    assert torch.equal(layer.lora_A[1], before)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()                                   # multiplier 1/4 now: A moves
    assert not torch.equal(layer.lora_A[1], before)


def test_a_tensor_that_missed_the_round_step_counts_its_next_gradient_as_step_one():
    """A layer without gradient at the round step (unused that step) meets its changed slots at
    its next step, whose gradient was taken in the new state: a real first Adam step (count
    1), not one lost as if it were the round step's zero gradient (count 0, and every later
    bias correction one step short)."""
    torch.manual_seed(0)
    model = ParallelBranches(1)
    config = branch_config(target_rank=3, top_h=1, init_warmup=2, incre_interval=2,
                           warmup_steps=0, total_step=None, orth_reg_weight=0.0)
    model, _, ctl = make_run(model, config)
    opt = create_optimizer(model, config, lr=1e-3, weight_decay=0.0)
    layer = model.branches[0]
    train_steps(model, opt, ctl, range(4))
    x, y = batch(4)
    ((model(x) - y) ** 2).mean().backward()
    ctl.step(4)                                 # slot 1 activated at step 4
    assert int(layer.slot_active_step[1]) == 4
    for p in (layer.lora_A, layer.lora_B, layer.lora_lambda):
        p.grad = None                           # the layer sat this step out
    opt.step()
    opt.zero_grad()
    train_steps(model, opt, ctl, range(5, 6))
    assert opt.state[layer.lora_lambda]["slot_count"][1] == 1


@pytest.mark.parametrize("advance_learning", [True, False])
def test_first_real_update_of_a_fresh_slot_is_a_first_adam_step(advance_learning):
    """Slots the controller changes at step 4 got step 4's gradient in their old state (zero).
    As for parameters added to AdamW then (the authors' new parameter groups, no gradient at
    step 4), their first update, at step 5, is Adam's first step: lr x sign(grad), not the
    0.74x of a second step after a zero gradient."""
    torch.manual_seed(0)
    model = ParallelBranches(1)
    config = branch_config(advance_learning=advance_learning, target_rank=3, top_h=1,
                           init_warmup=2, incre_interval=2, warmup_steps=0, total_step=None,
                           orth_reg_weight=0.0)
    lr = 1e-3
    model, _, ctl = make_run(model, config)
    # eps far below the reserve rows' gradients (they carry the reserve lambda, 1e-5)
    opt = create_optimizer(model, config, lr=lr, weight_decay=0.0, eps=1e-15)
    layer = model.branches[0]
    train_steps(model, opt, ctl, range(5))      # step 4: slot 1 activated, slot 2 new reserve
    assert int(layer.slot_active_step[1]) == 4 and int(layer.slot_alloc_step[2]) == 4
    before = [layer.lora_lambda[1].item(), layer.lora_A[1].detach().clone(),
              layer.lora_A[2].detach().clone()]
    train_steps(model, opt, ctl, range(5, 6))
    assert abs(layer.lora_lambda[1].item() - before[0]) == pytest.approx(lr, rel=1e-4)
    if advance_learning:  # the new reserve row 2
        moved = (layer.lora_A[2] - before[2]).abs()
        torch.testing.assert_close(moved, torch.full_like(moved, lr), rtol=1e-4, atol=0)
    else:  # row 1, frozen until step 4, had a zero gradient at step 4; one at step 5 (lambda 0)
        assert opt.state[layer.lora_A]["slot_count"][1] == 1


@pytest.mark.parametrize("warmup_steps,expected", [(4, 1 / 4), (0, 17 / 18)])
def test_first_step_of_slots_grown_at_a_round_takes_their_own_schedule_by_hand(warmup_steps,
                                                                             expected):
    """Spec 5 by hand: the round at step 2 activates slot 1 and appends reserve slot 2; at step
    3 each takes its first Adam step (lr x multiplier x sign(grad)) on a schedule begun at step
    2: warmup 4 gives (3 - 2) / 4; no warmup gives the decay to total_step 20 begun at 2,
    (20 - 3) / (20 - 2), not the base schedule's (20 - 3) / 20."""
    torch.manual_seed(0)
    model = ParallelBranches(1)
    config = branch_config(target_rank=3, top_h=1, init_warmup=1, incre_interval=2,
                           warmup_steps=warmup_steps, total_step=20, orth_reg_weight=0.0)
    lr = 1e-3
    model, _, ctl = make_run(model, config)
    opt = create_optimizer(model, config, lr=lr, weight_decay=0.0, eps=1e-15)
    layer = model.branches[0]
    train_steps(model, opt, ctl, range(3))      # step 2: slot 1 activated, slot 2 new reserve
    assert layer.slot_state.tolist()[:3] == [SlotState.ACTIVE, SlotState.ACTIVE,
                                            SlotState.RESERVE]
    lam, row = layer.lora_lambda[1].item(), layer.lora_A[2].detach().clone()
    train_steps(model, opt, ctl, range(3, 4))
    assert abs(layer.lora_lambda[1].item() - lam) == pytest.approx(lr * expected, rel=1e-4)
    moved = (layer.lora_A[2] - row).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, lr * expected), rtol=1e-4, atol=0)


@pytest.mark.parametrize("advance_learning", [True, False])
def test_a_slot_changed_at_this_step_takes_no_weight_decay_either(advance_learning):
    """Without warmup the slots the controller changes at step 4 have a learning rate at once,
    but like parameters just added to AdamW (no gradient yet: no step) they take none: no
    weight decay either, so they stay bitwise unchanged, moments too, while the slot active
    before moves. Changed at step 4: lambda 1 (activated) and, with advance learning, the new
    reserve row/column 2; without it, A row and B column 1 (they start training at
    activation)."""
    torch.manual_seed(0)
    model = ParallelBranches(1)
    config = branch_config(advance_learning=advance_learning, target_rank=3, top_h=1,
                           init_warmup=2, incre_interval=2, warmup_steps=0, total_step=None,
                           orth_reg_weight=0.0)
    model, opt, ctl = make_run(model, config, lr=0.1, weight_decay=0.1)
    layer = model.branches[0]
    train_steps(model, opt, ctl, range(4))
    x, y = batch(4)
    ((model(x) - y) ** 2).mean().backward()
    ctl.step(4)
    assert int(layer.slot_active_step[1]) == 4
    ab_slot = 2 if advance_learning else 1
    assert int((layer.slot_alloc_step if advance_learning else layer.slot_active_step)[ab_slot]) == 4
    tensors = {"A": (layer.lora_A, lambda t: t[ab_slot]), "B": (layer.lora_B, lambda t: t[:, ab_slot]),
               "lambda": (layer.lora_lambda, lambda t: t[1])}
    state = lambda p: [p] + [opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")] if opt.state[p] else [p]
    before = {k: [pick(t.detach()).clone() for t in state(p)] for k, (p, pick) in tensors.items()}
    assert before["A"][0].abs().sum() > 0  # decay would show (B starts at 0; so does lambda
    assert before["lambda"][0] != 0 or not advance_learning  # without advance learning)
    active_before = layer.lora_A[0].detach().clone()
    opt.step()
    for k, (p, pick) in tensors.items():
        for name, t, old in zip(("param", "exp_avg", "exp_avg_sq"), state(p), before[k]):
            assert torch.equal(pick(t.detach()), old), f"{k} {name} of the changed slot moved"
    assert opt.state[layer.lora_lambda]["slot_count"][1] == 0
    assert not torch.equal(layer.lora_A[0], active_before)  # the slot active before did step


def test_a_slot_changed_at_an_overflowed_step_counts_its_next_gradient_as_step_one():
    """An fp16 step whose scaled gradients overflowed (GradScaler's ``found_inf``) changes no
    parameter and no count; a slot the controller changed at that step still takes its first
    real gradient, at the next step, as Adam's first step (lr x sign(grad)), not as an
    uncounted one."""
    torch.manual_seed(0)
    model = ParallelBranches(1)
    config = branch_config(target_rank=3, top_h=1, init_warmup=2, incre_interval=2,
                           warmup_steps=0, total_step=None, orth_reg_weight=0.0)
    lr = 1e-3
    model, _, ctl = make_run(model, config)
    opt = create_optimizer(model, config, lr=lr, weight_decay=0.0, eps=1e-15)
    layer = model.branches[0]
    train_steps(model, opt, ctl, range(4))
    x, y = batch(4)
    ((model(x) - y) ** 2).mean().backward()
    ctl.step(4)                                 # slot 1 activated at step 4
    before = layer.lora_lambda[1].item()
    opt.found_inf, opt.grad_scale = torch.ones(()), None  # as GradScaler.step sets them
    opt.step()
    del opt.found_inf, opt.grad_scale
    opt.zero_grad()
    assert layer.lora_lambda[1].item() == before
    train_steps(model, opt, ctl, range(5, 6))
    assert opt.state[layer.lora_lambda]["slot_count"][1] == 1
    assert abs(layer.lora_lambda[1].item() - before) == pytest.approx(lr, rel=1e-4)


def test_a_torch_scheduler_over_the_optimizer_is_said_once():
    """A torch LR scheduler (e.g. transformers' linear warmup, or a plain Trainer given only
    the optimizer) over IncreLoRAAdamW multiplied into its own per-slot warmup and decay
    without a word (found by an audit); now one warning, none for the Trainer integration's
    constant factor and none when the optimizer's own schedules are off."""
    import warnings

    from increlora_fast.integrations.trainer import ConstantSchedule

    def said(schedule, **config):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        cfg = IncreLoRAConfig(target_modules=["0"], r_max=4, init_r=1, target_rank=2,
                              **config)
        model = inject_increlora(model, cfg)
        opt = create_optimizer(model, cfg, lr=1e-3)
        sched = schedule(opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                model(torch.randn(4, 8)).square().mean().backward()
                opt.step()
                opt.zero_grad()
                if sched is not None:
                    sched.step()
        return [str(w.message) for w in caught if "scheduler runs over it" in str(w.message)]

    def linear(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))

    assert len(said(linear, warmup_steps=2, total_step=10)) == 1
    assert said(ConstantSchedule, warmup_steps=2, total_step=10) == []
    assert said(lambda opt: None, warmup_steps=2, total_step=10) == []
    assert said(linear, warmup_steps=0, total_step=None) == []


def test_a_parameter_frozen_mid_run_stays_put_under_zero_grad_set_to_none_false():
    """With optimizer.zero_grad(set_to_none=False) a parameter frozen mid-run
    (requires_grad_(False): an adapter's lora_lambda, which the controller then treats as frozen,
    or a trained head) keeps the zero gradient tensor of its last step: the optimizer went on
    stepping it on its Adam moments and weight decay, so the frozen lambda kept changing. A
    parameter that does not require grad is now left alone, as with set_to_none=True."""
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(2), branch_config(target_rank=3, top_h=1))

    def step_once(step):
        x, y = batch(step)
        (((model(x) - y) ** 2).mean() + ctl.regularization_loss()).backward()
        ctl.step(step)
        opt.step()
        opt.zero_grad(set_to_none=False)

    for step in range(3):
        step_once(step)
    frozen, trained = model.branches[0], model.branches[1]
    frozen.lora_lambda.requires_grad_(False)
    lam = frozen.lora_lambda.detach().clone()
    other = trained.lora_lambda.detach().clone()
    with pytest.warns(RuntimeWarning, match="frozen lora_lambda"):
        for step in range(3, 7):
            step_once(step)
    assert torch.equal(frozen.lora_lambda, lam)
    assert not torch.equal(trained.lora_lambda, other)   # the others still train


def test_schedule_multiplier_takes_a_step_tensor_of_another_dtype():
    """A step on the device as an int64 tensor (the optimizer's device step count) gives the
    multiplier a Python step gives, in float64."""
    got = schedule_multiplier(torch.tensor(65), 20, warmup_steps=10, total_step=100)
    assert got.dtype == torch.float64 and float(got) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(lr=1e-3, eps=0.0),
                                    dict(lr=1e-3, weight_decay=-0.1),
                                    dict(lr=1e-3, betas=(0.9, 1.0))])
def test_increlora_adamw_refuses_bad_hyperparameters(kwargs):
    from increlora_fast.optimizer import IncreLoRAAdamW
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"IncreLoRAAdamW got lr=.*need lr > 0, eps > 0, "
                                         r"weight_decay >= 0 and betas in \[0, 1\)"):
        IncreLoRAAdamW([{"params": [param]}], {}, **kwargs)


def test_step_runs_a_closure_with_gradients_and_returns_its_loss():
    """``optimizer.step(closure)``, as torch optimizers take it: the closure runs with grad
    enabled inside the no-grad step, its loss is returned, and the step uses its gradients;
    current_lr_multiplier is the schedule the next step applies."""
    torch.manual_seed(0)
    model, opt, _ = make_run(ParallelBranches(2), branch_config(warmup_steps=4, total_step=40))
    assert opt.current_lr_multiplier() == 0.0
    x, y = batch(0)
    before = model.branches[0].lora_A.detach().clone()

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert model.branches[0].lora_A.grad is not None
    assert opt.current_lr_multiplier() == pytest.approx(0.25)
    assert opt.current_lr_multiplier(start=1) == 0.0
    opt.step(closure)  # the first step's multiplier was 0: the second one moves A
    assert not torch.equal(model.branches[0].lora_A, before)


def test_prepare_replay_refuses_parameters_other_than_the_captured_steps():
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(2), branch_config())
    train_steps(model, opt, ctl, range(1))
    x, y = batch(1)
    ((model(x) - y) ** 2).mean().backward()
    opt.prepare_replay()  # the same parameters have gradients: fine
    model.branches[0].lora_A.grad = None
    with pytest.raises(RuntimeError, match="prepare_replay: the parameters with a gradient are "
                                           "not those the captured step updated"):
        opt.prepare_replay()


def test_build_kernels_without_a_kernel_stepped_parameter_does_nothing():
    """On the CPU no parameter takes the fused kernel: within building_only nothing is built,
    stepped or changed."""
    from increlora_fast.kernels.utils import building_only
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(2), branch_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with building_only(1):
        opt.build_kernels(scaled=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert opt.global_step == 0 and not opt.state


def test_whole_learning_rate_curves_of_an_old_and_a_new_slot_follow_spec_section_5():
    """With Adam's betas at 0 (and eps tiny) every update is lr x multiplier x sign(grad), so
    the size of each step of a slot is its learning rate at that step. Slot 0 (active from
    step 0) must follow the base schedule, slot 1 (activated at the round at step 4) and the
    reserve slot 2 appended there a schedule begun at step 4: linear warmup over 3 steps,
    then linear decay to 0 at total_step 14 (spec 5), re-derived here. A slot changed at step
    4 takes no step there (the optimizer's module docstring; departure 2 of
    tests/authors_reference.py)."""
    warmup, total, lr, round_step = 3, 14, 1e-3, 4

    def spec(t: int, start: int) -> float:
        if t < start:
            return 0.0
        since = t - start
        return since / warmup if since < warmup else (total - t) / (total - start - warmup)

    torch.manual_seed(0)
    model = ParallelBranches(1)
    config = branch_config(target_rank=3, top_h=1, init_warmup=3, incre_interval=round_step,
                           warmup_steps=warmup, total_step=total, orth_reg_weight=0.0)
    model, _, ctl = make_run(model, config)
    opt = create_optimizer(model, config, lr=lr, weight_decay=0.0, betas=(0.0, 0.0), eps=1e-30)
    layer = model.branches[0]
    sizes = []
    for t in range(total + 1):
        before = (layer.lora_lambda.detach().clone(), layer.lora_A.detach().clone())
        train_steps(model, opt, ctl, [t])
        after = (layer.lora_lambda.detach(), layer.lora_A.detach())
        sizes.append([abs(float(after[0][0] - before[0][0])),
                      abs(float(after[0][1] - before[0][1])),
                      float((after[1][2] - before[1][2]).abs().max())])
    assert int(layer.slot_active_step[1]) == round_step == int(layer.slot_alloc_step[2])
    for t, (old, new, fresh) in enumerate(sizes):
        assert old == pytest.approx(lr * spec(t, 0), rel=1e-5, abs=1e-12), t
        expected = 0.0 if t == round_step else lr * spec(t, round_step)
        assert new == pytest.approx(expected, rel=1e-5, abs=1e-12), t
        if t != round_step:  # (at the round its A row is drawn anew)
            assert fresh == pytest.approx(expected, rel=1e-5, abs=1e-12), t
    assert max(s[1] for s in sizes) == pytest.approx(lr, rel=1e-5)  # the new slot's peak


def test_a_compiled_step_runs_eagerly_and_trains_as_eager():
    """``torch.compile(optimizer.step)`` (or a compiled function that calls it) is not traced:
    dynamo ran the step's host-side caches and counters through graphs and graph breaks (16
    graphs over 6 steps of a tiny BERT), and the run silently diverged from eager's (its step
    count fell behind the controller's stamps). The step runs eagerly there instead: the same
    parameters and step count as eager across allocation rounds, and no graph."""
    from torch._dynamo.utils import counters

    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model, opt, ctl = make_run(ParallelBranches(2), branch_config())
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        try:
            for i in range(8):
                x, y = batch(i)
                (((model(x) - y) ** 2).mean() + ctl.regularization_loss()).backward()
                ctl.step(i)
                step()
                opt.zero_grad()
            graphs = counters["stats"]["unique_graphs"]
        finally:
            torch._dynamo.reset()
        runs.append((opt.global_step, {k: v.clone() for k, v in model.state_dict().items()},
                     len(ctl.allocation_log), graphs))
    (steps, state, rounds, _), (c_steps, c_state, c_rounds, c_graphs) = runs
    assert rounds > 0 and (c_steps, c_rounds, c_graphs) == (steps, rounds, 0)
    for key, value in state.items():
        assert torch.equal(c_state[key], value), key
