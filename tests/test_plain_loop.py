"""The plain Python training loop of README's "Use" section (inject_increlora, create_optimizer,
IncreLoRAController, controller.step, optimizer.step) under the mistakes and options a user of
that loop meets."""
import pytest
import torch

from method_helpers import ParallelBranches, batch, branch_config, make_run, train_steps


def test_a_step_index_given_again_is_refused_and_runs_no_second_round():
    """controller.step(4) twice (or a loop whose index restarts at 0 every epoch) ran the
    allocation round of step 4 twice: two modules grew where top_h=1 allows one, and a repeated
    step fed a zero score into the EMAs."""
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(2), branch_config(target_rank=4, top_h=1))
    train_steps(model, opt, ctl, range(5))        # the round at step 4 ran
    assert [e["step"] for e in ctl.allocation_log] == [4]
    rank, log, ipt = ctl.current_total_rank(), list(ctl.allocation_log), ctl.ipt.clone()
    x, y = batch(4)
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(ValueError, match=r"controller.step\(4\).*step 5"):
        ctl.step(4)
    with pytest.raises(ValueError, match=r"controller.step\(0\)"):
        ctl.step(0)                               # a new epoch restarting the index
    assert ctl.current_total_rank() == rank and ctl.allocation_log == log
    assert torch.equal(ctl.ipt, ipt)
    opt.zero_grad()
    train_steps(model, opt, ctl, range(5, 7))     # the loop goes on as before
    assert [e["step"] for e in ctl.allocation_log] == [4, 6]


@pytest.mark.parametrize("window", [None, 2])
def test_a_skipped_round_step_waits_for_the_next_step_and_the_skip_is_named(window):
    """Indices that skip (the micro-batch index of a loop accumulating 2 micro-batches: 1, 3, 5,
    ...) never hit a round step (4, 6, ...): with a score window of incre_interval or more no
    round ran and nothing was said, so training ended at init_r everywhere."""
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(2), branch_config(
        target_rank=3, top_h=1, score_window=window))
    with pytest.warns(RuntimeWarning, match=r"controller.step\(1\) skips step 0") as caught:
        train_steps(model, opt, ctl, range(1, 12, 2))
    assert len([w for w in caught if "skips" in str(w.message)]) == 1  # warned once
    # the rounds of steps 4, 6, 8 and 10, each run at the next step given
    assert len(ctl.allocation_log) >= 3 and ctl.current_total_rank() > 2
    assert all(e["step"] % 2 == 1 for e in ctl.allocation_log)


@pytest.mark.parametrize("exact", [False, True])
def test_a_model_trained_in_eval_mode_scores_as_in_train_mode(exact):
    """Training with model.eval() (no dropout: the same computation) took no score in the
    backward passes: every module scored 0 and the rounds grew modules in module order."""
    def run(train_mode):
        torch.manual_seed(0)
        model, opt, ctl = make_run(ParallelBranches(3, weights=[0.0, 1.0, 2.0]), branch_config(
            target_rank=2, top_h=1, exact_step_score=exact))
        model.train(train_mode)
        train_steps(model, opt, ctl, range(7))
        return ctl.ipt.clone(), list(ctl.allocation_log), model.state_dict()

    (ipt_train, log_train, state_train), (ipt_eval, log_eval, state_eval) = run(True), run(False)
    assert (ipt_train > 0).any()
    assert torch.equal(ipt_eval, ipt_train) and log_eval == log_train
    assert all(torch.equal(state_eval[k], state_train[k]) for k in state_train)


def test_a_plain_torch_optimizer_over_the_adapters_is_said_once():
    """torch.optim.AdamW over the injected model's parameters (not create_optimizer) trained
    without a word, while new slots got no restart warmup, no fresh Adam step count and unused
    slots took weight decay (a plain Trainer's IncreLoRACallback says it; the manual loop did
    not). The first allocation round names it once; create_optimizer's loop stays quiet."""
    import warnings

    from increlora_fast import IncreLoRAController, inject_increlora

    torch.manual_seed(0)
    config = branch_config(target_rank=3, top_h=1)
    model = inject_increlora(ParallelBranches(2), config)
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl = IncreLoRAController(model, config)
    with pytest.warns(RuntimeWarning, match="create_optimizer") as caught:
        train_steps(model, plain, ctl, range(8))
    assert len([w for w in caught if "IncreLoRAAdamW" in str(w.message)]) == 1
    grown = ctl.current_total_rank()
    assert grown > 2                      # it still trains and grows

    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(2), branch_config(target_rank=3, top_h=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, opt, ctl, range(8))
    assert ctl.current_total_rank() == grown

    torch.manual_seed(0)                 # a controller driven with no optimizer at all
    config = branch_config(target_rank=3, top_h=1)
    model = inject_increlora(ParallelBranches(2), config)
    ctl = IncreLoRAController(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(8):
            x, y = batch(step)
            ((model(x) - y) ** 2).mean().backward()
            ctl.step(step)
            model.zero_grad()


def test_a_run_short_of_its_budget_with_top_h_over_every_module_is_said_without_top_h():
    """top_h 4 on 2 modules: one round (step 4 of 6) grows them to 4 of the budget's 6 whatever
    top_h, so the warning says so and does not advise raising top_h."""
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(2), branch_config(
        target_rank=3, top_h=4, init_warmup=2, incre_interval=4, total_step=6))
    with pytest.warns(RuntimeWarning) as caught:
        train_steps(model, opt, ctl, range(6))
    said = [str(w.message) for w in caught if "reach a total rank" in str(w.message)]
    assert len(said) == 1 and "total rank of at most 4 of the budget's 6" in said[0]
    assert "top_h 4" in said[0] and "raise top_h" not in said[0]
    assert ctl.current_total_rank() == 4  # as said


def test_a_total_step_too_short_for_the_budget_is_said_at_the_first_step():
    """A manual loop whose schedule (IncreLoRAConfig.total_step, init_warmup, incre_interval,
    top_h) cannot grow the modules to target_rank ended below it whatever the scores, saying
    nothing (the Trainer and finetune warned; the plain loop did not). Now the first
    controller.step says so, once; a schedule that can reach it says nothing."""
    import warnings
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(4), branch_config(
        target_rank=4, top_h=1, init_warmup=2, incre_interval=4, total_step=10))
    with pytest.warns(RuntimeWarning) as caught:
        train_steps(model, opt, ctl, range(10))
    said = [str(w.message) for w in caught if "reach a total rank" in str(w.message)]
    assert said == ["IncreLoRA: 2 allocation round(s) in steps 0-9 (IncreLoRAConfig.init_warmup "
                    "2, incre_interval 4), each growing at most top_h 1 module(s) by 1 (or what "
                    "is left of r_max 6), reach a total rank of at most 6 of the budget's 16: "
                    "the run ends below it; train "
                    "longer (IncreLoRAConfig.total_step), lower init_warmup or incre_interval, "
                    "or raise top_h"]
    assert ctl.current_total_rank() == 6  # as said
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(4), branch_config(
        target_rank=4, top_h=4, init_warmup=2, incre_interval=2, total_step=10))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_steps(model, opt, ctl, range(10))
    assert ctl.budget_reached
