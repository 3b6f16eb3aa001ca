"""Audit of the method's algorithm (controller, optimizer, layer, integrations): each test
pins a bug a user could hit, found in the audit of 2026-12-06."""
import warnings

import pytest
import torch

from increlora_fast.controller import IncreLoRAController

from method_helpers import ParallelBranches, branch_config, make_run, train_steps


def test_a_controller_made_mid_training_runs_no_round_off_schedule():
    """A controller made at step 5 (after a restart without its state, or one replaced
    mid-training) counted the old controller's round of step 4 as skipped by itself and ran it
    at step 5, off the schedule and on the scores of a single step."""
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(2), branch_config(target_rank=4, top_h=1))
    train_steps(model, opt, ctl, range(5))                 # the round of step 4 ran
    assert [e["step"] for e in ctl.allocation_log] == [4]
    fresh = IncreLoRAController(model, ctl.config)
    with pytest.warns(RuntimeWarning, match=r"controller.step\(5\) skips steps 0 to 4: .*made "
                                            r"mid-training"):
        train_steps(model, opt, fresh, range(5, 7))
    assert [e["step"] for e in fresh.allocation_log] == [6]  # on schedule, not at 5


def test_a_plain_trainer_with_increlora_optimizers_decays_as_the_trainer_would(tmp_path):
    """Under a plain Trainer with ``optimizers=increlora_optimizers(...)`` and no
    ``total_step`` in the config, every learning rate stayed constant after warmup to the last
    step: the Trainer's linear decay (its default, and IncreLoRATrainer's) never happened."""
    from transformers import Trainer, TrainingArguments

    from increlora_fast.integrations.trainer import IncreLoRACallback, increlora_optimizers
    from increlora_fast.optimizer import schedule_multiplier
    from trainer_helpers import TinyTask, tiny_increlora_bert

    model, config = tiny_increlora_bert(warmup_steps=2)
    assert config.total_step is None
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True)
    optimizer, scheduler = increlora_optimizers(model, lr=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=TinyTask(),
                      optimizers=(optimizer, scheduler))
    IncreLoRACallback(IncreLoRAController(model, config)).install(trainer)
    trainer.train()
    assert all(group["total_step"] == 8 for group in optimizer.param_groups)
    assert float(schedule_multiplier(7, 0, 2, optimizer.param_groups[0]["total_step"])) < 0.2


def test_an_idle_module_is_named_also_when_gradients_are_zeroed_not_freed():
    """``optimizer.zero_grad(set_to_none=False)`` leaves the gradient of a module that ran
    before (an expert no token reached since) a tensor of zeros, not None: the warning naming
    the modules outside the round's forward pass never came."""
    from method_helpers import batch

    class LastRunsOnlyAtFirst(ParallelBranches):
        step = 0

        def forward(self, x):
            used = self.branches if self.step < 2 else self.branches[:-1]
            return sum(w * b(x) for w, b in zip(self.weights, used))

    torch.manual_seed(0)
    model, opt, ctl = make_run(LastRunsOnlyAtFirst(3), branch_config())
    with pytest.warns(RuntimeWarning, match=r"1 adapted module\(s\) got no gradient at "
                      r"allocation round 4: branches\.2\b"):
        for step in range(6):
            model.step = step
            x, y = batch(step)
            (((model(x) - y) ** 2).mean() + ctl.regularization_loss()).backward()
            ctl.step(step)
            opt.step()
            opt.zero_grad(set_to_none=False)


@pytest.mark.parametrize("mistake", ["fresh_optimizer", "extra_optimizer_step"])
def test_controller_and_optimizer_steps_out_of_step_are_named(mistake):
    """The controller stamps new slots with the index given to ``controller.step``; the
    optimizer runs their warmup, decay and first Adam step on its own count. The two were never
    compared: a resume that restored the controller but made a new optimizer (its count back at
    0: new slots sat at learning rate 0 for the steps in between) or an optimizer stepped once
    more than the controller trained with silently wrong schedules."""
    from increlora_fast.optimizer import create_optimizer

    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(2), branch_config(target_rank=4, top_h=1))
    if mistake == "extra_optimizer_step":
        opt.step()                                 # e.g. a warmup step of its own
        with pytest.warns(RuntimeWarning, match=r"stamped at step 4 .*optimizer's step 5"):
            train_steps(model, opt, ctl, range(6))
        return
    train_steps(model, opt, ctl, range(5))
    opt = create_optimizer(model, ctl.config, lr=1e-2)   # its state not loaded: named at once
    with pytest.warns(RuntimeWarning, match=r"stamped at step 4 .*optimizer's step 0"):
        train_steps(model, opt, ctl, range(5, 7))


def test_controller_and_optimizer_in_step_say_nothing():
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(3), branch_config(target_rank=4, top_h=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_steps(model, opt, ctl, range(20))
    assert ctl.budget_reached
