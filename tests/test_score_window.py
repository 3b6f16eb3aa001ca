"""Issue 13 (3): the exact score is tracked only in the `score_window` steps before each round.

Outside the window the layers' score flag is off and no score runs; inside it the scores equal
those of tracking every step; a window of `incre_interval` or more is today's behaviour bit for
bit; pending rounds, resume and gradient accumulation keep the window right.
"""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from increlora_fast import IncreLoRAConfig  # noqa: E402
from increlora_fast.controller import IncreLoRAController, default_score_window  # noqa: E402

from method_helpers import ParallelBranches, batch, branch_config, make_run  # noqa: E402

# Rounds at steps 6, 12, 18, ... (init_warmup 3), window of 2: steps 5-6, 11-12, 17-18 tracked.
WINDOWED = dict(init_warmup=3, incre_interval=6, target_rank=4, r_max=8, top_h=1,
                total_step=60)


def _build(**overrides):
    torch.manual_seed(0)
    return make_run(ParallelBranches(3, weights=[1.0, 0.4, 2.0]), branch_config(**overrides))


def _run(steps, on_before=None, on_after=None, accumulate=1, on_micro=None, run=None,
         **overrides):
    """Train on `batch(step)` for ``steps``; hooks see (step, model, controller)."""
    model, optimizer, controller = run or _build(**overrides)
    for step in steps:
        if on_before is not None:
            on_before(step, model, controller)
        x, y = batch(step)
        for i, (xm, ym) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
            loss = ((model(xm) - ym) ** 2).mean() + controller.regularization_loss()
            (loss / accumulate).backward()
            if on_micro is not None:
                on_micro(step, i, model, controller)
        if on_after is not None:
            on_after(step, model, controller)
        controller.step(step)
        optimizer.step()
        optimizer.zero_grad()
    return model, controller


def _state(model, controller):
    return ({k: v.clone() for k, v in model.state_dict().items()}, controller.ipt.clone(),
            controller.unc.clone(), list(controller.allocation_log))


def _assert_identical(a, b):
    (state_a, ipt_a, unc_a, log_a), (state_b, ipt_b, unc_b, log_b) = a, b
    assert log_a == log_b and log_a
    assert torch.equal(ipt_a, ipt_b) and torch.equal(unc_a, unc_b)
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key


def test_score_window_is_validated_and_defaults_to_one_percent_of_ema_weight():
    for bad in (0, -3, 2.5, True, "29"):
        with pytest.raises(ValueError, match="score_window"):
            IncreLoRAConfig(score_window=bad)
    assert IncreLoRAConfig(score_window=7).score_window == 7
    w = default_score_window(0.85, 0.85)
    assert w == 29 and 0.85 ** w < 0.01 <= 0.85 ** (w - 1)
    w = default_score_window(0.5, 0.95)  # the slower of the two EMAs decides
    assert 0.95 ** w < 0.01 <= 0.95 ** (w - 1)
    assert default_score_window(0.0, 0.0) == 1
    assert _build(**WINDOWED)[2].score_window == 29  # None -> derived from beta1, beta2 = 0.85


@pytest.mark.parametrize("init_warmup,expected", [
    (3, [5, 6, 11, 12, 17, 18, 23, 24]),
    (6, [11, 12, 17, 18, 23, 24]),  # no round at 6 (step > init_warmup): steps 5-6 untracked
    (0, [5, 6, 11, 12, 17, 18, 23, 24]),
])
def test_is_tracked_is_the_window_before_each_round(init_warmup, expected):
    controller = _build(**dict(WINDOWED, init_warmup=init_warmup, score_window=2))[2]
    assert [s for s in range(25) if controller.is_tracked(s)] == expected
    wide = _build(**dict(WINDOWED, init_warmup=init_warmup, score_window=6))[2]
    assert all(wide.is_tracked(s) for s in range(25))  # window >= interval: every step


def test_outside_the_window_no_score_runs_and_inside_it_scores_equal_full_tracking(monkeypatch):
    collected = {"window": [], "full": []}
    original = IncreLoRAController._collect_scores
    flags = []

    def spy(kind):
        def collect(self):
            out = original(self)
            collected[kind].append(out.clone())
            return out
        return collect

    def before(step, model, controller):
        enabled = {b.score_enabled for b in model.branches}
        assert enabled == {controller.is_tracked(step)}, (step, enabled)
        flags.append(enabled.pop())

    def after(step, model, controller):
        summed = [float(b.score_sum) for b in model.branches]
        if controller.is_tracked(step):
            assert all(s > 0 for s in summed), (step, summed)
        else:
            assert all(s == 0 for s in summed), (step, summed)  # no score was computed

    steps = range(13)
    monkeypatch.setattr(IncreLoRAController, "_collect_scores", spy("window"))
    _, windowed = _run(steps, before, after, **dict(WINDOWED, score_window=2))
    monkeypatch.setattr(IncreLoRAController, "_collect_scores", spy("full"))
    _run(steps, **dict(WINDOWED, score_window=6))
    assert flags == [s in (5, 6, 11, 12) for s in steps]
    assert len(collected["window"]) == 4 and len(collected["full"]) == len(steps)
    window = dict(zip((5, 6, 11, 12), collected["window"]))
    full = dict(zip(steps, collected["full"]))
    for step in (5, 6):  # the parameters agree up to the first round: so do the scores
        assert torch.equal(window[step], full[step])
    # the first round read the EMA of steps 5 and 6 only
    b1, b2 = windowed.config.beta1, windowed.config.beta2
    ipt = torch.zeros(3, dtype=torch.float64)
    unc = torch.zeros(3, dtype=torch.float64)
    for step in (5, 6):
        ipt = b1 * ipt + (1 - b1) * full[step]
        unc = b2 * unc + (1 - b2) * (full[step] - ipt).abs()
    first = windowed.allocation_log[0]
    assert first["step"] == 6
    assert first["score"] == pytest.approx(float((ipt * unc).max()), rel=1e-12)


def test_no_score_kernel_runs_outside_the_window(monkeypatch):
    pytest.importorskip("triton")
    from increlora_fast.kernels import launch_counts, reset_launch_counts
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    counts = {}

    def before(step, model, controller):
        reset_launch_counts()

    def after(step, model, controller):
        counts[step] = launch_counts().get("_score_tiles_kernel", 0)

    _run(range(8), before, after, **dict(WINDOWED, score_window=2))
    assert all(counts[s] == 0 for s in (0, 1, 2, 3, 4, 7)), counts
    assert all(counts[s] >= 3 for s in (5, 6)), counts  # three adapted branches


@pytest.mark.parametrize("window", [6, 7, 1000])
def test_window_of_an_interval_or_more_is_todays_behaviour_bit_for_bit(window, monkeypatch):
    steps = range(30)
    got = _state(*_run(steps, **dict(WINDOWED, score_window=window)))
    # today's rule: every step of the allocation phase is tracked
    monkeypatch.setattr(IncreLoRAController, "is_tracked", lambda self, step: not self.budget_reached)
    today = _state(*_run(steps, **dict(WINDOWED, score_window=2)))
    _assert_identical(got, today)


def test_default_window_with_slow_emas_is_todays_behaviour():
    # beta 0.999: the derived window (4603 steps) is longer than the interval
    slow = dict(WINDOWED, beta1=0.999, beta2=0.999)
    _assert_identical(_state(*_run(range(30), **slow)),
                      _state(*_run(range(30), **dict(slow, score_window=6))))


def test_a_round_delayed_by_a_nonfinite_step_keeps_tracking_on_until_it_runs():
    flags = {}

    def before(step, model, controller):
        flags[step] = {b.score_enabled for b in model.branches}
        if step == 6:  # the round step gets a NaN loss
            with torch.no_grad():
                model.weights[0] = float("nan")

    def after(step, model, controller):
        if step == 6:  # as GradScaler would, keep the NaN out of the parameters
            with torch.no_grad():
                model.weights[0] = 1.0
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()

    with pytest.warns(RuntimeWarning, match="non-finite"):
        _, controller = _run(range(10), before, after, **dict(WINDOWED, score_window=2))
    assert flags[6] == {True} and flags[7] == {True}  # step 7 is outside the window: pending
    assert flags[8] == {False} and flags[9] == {False}
    assert [e["step"] for e in controller.allocation_log] == [7]
    assert not controller.round_pending


@pytest.mark.parametrize("stop", [4, 5, 6, 11])  # before, inside, at the end of a window
def test_resume_sets_tracking_for_the_next_step_and_continues_bit_for_bit(stop):
    cfg = dict(WINDOWED, score_window=2)
    full = _state(*_run(range(20), **cfg))
    model, optimizer, controller = _build(**cfg)
    _run(range(stop), run=(model, optimizer, controller))
    saved = [model.state_dict(), optimizer.state_dict(), controller.state_dict(),
             torch.get_rng_state()]  # fresh reserve slots are drawn from it
    assert saved[2]["next_step"] == stop
    resumed = _build(**cfg)
    resumed[0].load_state_dict(saved[0])
    resumed[1].load_state_dict(saved[1])
    resumed[2].load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    assert {b.score_enabled for b in resumed[0].branches} == {resumed[2].is_tracked(stop)}
    _assert_identical(_state(*_run(range(stop, 20), run=resumed)), full)


def test_old_controller_state_without_next_step_tracks_then_drops_untracked_scores():
    cfg = dict(WINDOWED, score_window=2)
    model, controller = _run(range(3), **cfg)
    state = controller.state_dict()
    del state["next_step"]
    controller.load_state_dict(state)
    assert all(b.score_enabled for b in model.branches)  # the next step is not known
    ipt = controller.ipt.clone()
    x, y = batch(3)
    ((model(x) - y) ** 2).mean().backward()
    controller.step(3)  # untracked: its scores are dropped
    assert torch.equal(controller.ipt, ipt)
    assert not any(b.score_enabled for b in model.branches)
    assert all(float(b.score_sum) == 0 for b in model.branches)


def test_steps_out_of_order_warn_and_do_not_use_untracked_passes():
    cfg = dict(WINDOWED, score_window=2)
    model, controller = _run(range(2), **cfg)
    assert not any(b.score_enabled for b in model.branches)  # set for step 2
    x, y = batch(6)
    ((model(x) - y) ** 2).mean().backward()
    with pytest.warns(RuntimeWarning, match="untracked"):
        controller.step(6)  # a round step whose passes ran untracked
    assert controller.round_pending and not controller.allocation_log
    assert torch.equal(controller.ipt, torch.zeros(3, dtype=torch.float64))
    assert all(b.score_enabled for b in model.branches)  # the pending round tracks step 7


def test_gradient_accumulation_scores_all_micro_batches_of_a_tracked_step():
    sums = {}

    def micro(step, i, model, controller):
        assert {b.score_enabled for b in model.branches} == {controller.is_tracked(step)}
        sums.setdefault(step, []).append([float(b.score_sum) for b in model.branches])

    _run(range(7), accumulate=2, on_micro=micro, **dict(WINDOWED, score_window=2))
    for step, (first, both) in sums.items():
        if step in (5, 6):  # the second micro-batch adds to the first one's score
            assert all(0 < f < g for f, g in zip(first, both)), (step, first, both)
        else:
            assert first == both == [0.0] * 3, step


def test_exact_step_mode_frees_its_dense_buffers_outside_the_window():
    buffers = {}

    def after(step, model, controller):
        buffers[step] = [b.score_grad is not None for b in model.branches]

    _run(range(8), None, after, **dict(WINDOWED, score_window=2, exact_step_score=True))
    assert buffers[5] == buffers[6] == [True] * 3
    assert all(buffers[s] == [False] * 3 for s in (0, 1, 2, 3, 4, 7))


def test_load_update_kernels_runs_a_tracked_update_and_leaves_no_trace():
    """The kernel preload of a graphed run (`GraphedSteps`) calls `load_update_kernels` after a
    tracked forward and backward: the controller's device work of a tracked step runs (its
    kernels load) and every tensor it touched is as before; untracked, it runs nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    # steps 5 and 6 tracked: the EMAs hold step 5's scores after it
    model, controller = _run(range(6), **dict(WINDOWED, score_window=2))
    x, y = batch(6)
    ((model(x) - y) ** 2).mean().backward()
    assert all(float(b.score_sum) > 0 for b in model.branches)
    before = [t.clone() for t in (controller.ipt, controller.unc, controller._finite,
                                  controller._nonfinite_step)]
    sums = [b.score_sum.clone() for b in model.branches]
    with Ops() as ops:
        controller.load_update_kernels(6)
    assert {"aten::where", "aten::all", "aten::abs"} <= set(ops.names), set(ops.names)
    after = (controller.ipt, controller.unc, controller._finite, controller._nonfinite_step)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(b.score_sum, s) for b, s in zip(model.branches, sums))
    assert not controller.allocation_log and not controller.round_pending
    # the step itself then takes the very scores the preload left
    controller.step(6)
    assert controller.allocation_log and not torch.equal(controller.ipt, before[0])

    for b in model.branches:  # untracked: nothing to load
        b.score_enabled = False
    with Ops() as ops:
        controller.load_update_kernels(7)
    assert ops.names == []
