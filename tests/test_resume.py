"""Issue 3 (f): saving model, optimizer and controller mid-allocation and resuming is bit-identical."""
import pytest
import torch

from increlora_fast import IncreLoRAController, create_optimizer, inject_increlora, load_adapter, save_adapter

from method_helpers import ParallelBranches, branch_config, train_steps

TOTAL = 24
SPLIT = 9  # inside the allocation phase (rounds at 4, 6, 8, 10, ...; the budget at 20)


def _fresh():
    torch.manual_seed(0)
    model = ParallelBranches(3)
    config = branch_config(target_rank=4, top_h=1, init_warmup=3, incre_interval=2, total_step=TOTAL,
                           modules_to_save=None)
    inject_increlora(model, config)
    return model, config


# also after the budget, where the retired reserves (inactive) still train through the penalty
@pytest.mark.parametrize("split", [SPLIT, 22])
def test_resume_mid_allocation_is_bit_identical(tmp_path, split):
    model, config = _fresh()
    opt = create_optimizer(model, config, lr=1e-2, weight_decay=0.1)
    ctl = IncreLoRAController(model, config)
    train_steps(model, opt, ctl, range(TOTAL))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    assert ctl.budget_reached

    model, config = _fresh()
    opt = create_optimizer(model, config, lr=1e-2, weight_decay=0.1)
    ctl = IncreLoRAController(model, config)
    train_steps(model, opt, ctl, range(split))
    assert ctl.budget_reached == (split > 20) and ctl.allocation_log
    save_adapter(model, tmp_path, training_state=True)
    torch.save({"optimizer": opt.state_dict(), "controller": ctl.state_dict(),
                "rng": torch.get_rng_state()}, tmp_path / "state.pt")
    del model, opt, ctl

    model, config = _fresh()
    with torch.no_grad():  # scramble the adapter: everything must come from the checkpoint
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    load_adapter(model, tmp_path)
    opt = create_optimizer(model, config, lr=1e-2, weight_decay=0.1)
    ctl = IncreLoRAController(model, config)
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    ctl.load_state_dict(state["controller"])
    torch.set_rng_state(state["rng"])
    train_steps(model, opt, ctl, range(split, TOTAL))
    resumed = model.state_dict()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


def test_a_nonfinite_step_before_a_checkpoint_is_still_warned_about_after_the_resume():
    """A non-finite step (an fp16 overflow, a NaN loss) waits for the next allocation round to
    be warned about; a checkpoint taken in between lost it: the resumed run warned about none
    (or named a later bad step), while the uninterrupted run named the first one at its
    round."""
    torch.manual_seed(0)
    config = branch_config(target_rank=3, top_h=1, score_window=100)
    model = inject_increlora(ParallelBranches(2), config)
    ctl = IncreLoRAController(model, config)
    for step in range(4):
        bad = float("nan") if step == 3 else 1.0
        (model(torch.randn(3, 6) * bad)).sum().backward()
        ctl.step(step)
        model.zero_grad()
    state = ctl.state_dict()
    resumed = IncreLoRAController(model, config)
    resumed.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="non-finite importance scores at step 3"):
        model(torch.randn(3, 6)).sum().backward()
        resumed.step(4)   # the round
    assert [e["step"] for e in resumed.allocation_log] == [4]
