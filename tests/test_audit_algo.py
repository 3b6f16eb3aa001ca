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
