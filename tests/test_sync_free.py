"""Issue 27 (part 2): a training step outside allocation rounds reads no tensor on the host.

`host_reads.HostReads` counts host reads (it is checked first to see every kind of read). On
the steps that are no allocation round, tracked (inside the score window) and untracked alike,
forward, ``regularization_loss()``, backward, clipping, ``controller.step``, ``optimizer.step``
and ``zero_grad`` read nothing; rounds still grow ranks. The finetune loop reads its losses and
token counts only at log points, keeps every step's loss, and still names the first step whose
loss is not finite.
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune_helpers import tiny_files
from host_reads import HostReads
from increlora_fast import IncreLoRAConfig, IncreLoRAController, create_optimizer, inject_increlora
from increlora_fast.device_scalar import grad_scaler_scale

ROUNDS = dict(init_warmup=4, incre_interval=6, score_window=2)  # rounds at 6, 12, 18


def test_the_counter_sees_every_kind_of_read():
    HostReads.self_check()


def _setup(score: str, exact: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    config = IncreLoRAConfig(target_modules=["0", "2", "4"], r_max=8, init_r=1, target_rank=4,
                             top_h=2, total_step=40, score=score, exact_step_score=exact,
                             orth_reg_weight=0.1, **ROUNDS)
    model = inject_increlora(model, config)  # the head "6" stays trainable: a dense group
    optimizer = create_optimizer(model, config, lr=1e-2, weight_decay=0.01)
    return model, optimizer, IncreLoRAController(model, config)


def _is_round(step: int) -> bool:
    return step > ROUNDS["init_warmup"] and step % ROUNDS["incre_interval"] == 0


def _train_step(model, optimizer, controller, step, x, y, optimize=True) -> None:
    loss = F.cross_entropy(model(x), y) + controller.regularization_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    controller.step(step)
    if optimize:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("score, exact, backend", [
    ("delta_w", False, "torch"), ("delta_w", True, "torch"), ("triplet", False, "torch"),
    ("delta_w", False, "triton")])
def test_steps_outside_rounds_read_nothing_and_rounds_still_grow_ranks(score, exact, backend,
                                                                       monkeypatch):
    """Also with the layers and the penalty on their Triton kernels (the interpreter on CPU)."""
    if backend == "triton":
        pytest.importorskip("triton")
        from increlora_fast.kernels.utils import interpreter_active
        if not (torch.cuda.is_available() or interpreter_active()):
            pytest.skip("the Triton path needs CUDA or the interpreter")
        from increlora_fast.kernels import launch_counts, reset_launch_counts
        reset_launch_counts()
        # the kernels' first-use checks read the host once, on step 0 (tested elsewhere)
        monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    model, optimizer, controller = _setup(score, exact)
    gen = torch.Generator().manual_seed(1)
    seen = {"tracked": 0, "untracked": 0}
    ranks = [controller.current_total_rank()]
    for step in range(19):
        x, y = torch.randn(32, 16, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        if step == 9:  # a resumed optimizer compares the loaded stamps on the device too
            optimizer.load_state_dict(optimizer.state_dict())
        tracked = score != "delta_w" or all(layer.score_enabled for layer in controller.layers)
        reads = HostReads.count(lambda: _train_step(model, optimizer, controller, step, x, y))
        if _is_round(step):
            assert controller.current_total_rank() > ranks[-1], f"no growth at round {step}"
            ranks.append(controller.current_total_rank())
        else:
            assert reads == [], f"step {step} ({'un' * (not tracked)}tracked) read {reads}"
            seen["tracked" if tracked else "untracked"] += 1
    assert seen["tracked"] >= 2 and (score != "delta_w" or seen["untracked"] >= 8)
    assert ranks == [3, 7, 11, 12]  # top_h=2 modules x 2 slots per round, to 4 x 3 modules
    assert sorted({e["step"] for e in controller.allocation_log}) == [6, 12, 18]
    assert torch.isfinite(controller.ipt).all() and controller.ipt.abs().sum() > 0
    if backend == "triton":
        assert launch_counts()["_orth_penalty_fwd_kernel"] == 19


def test_a_nonfinite_tracked_step_reads_nothing_and_its_round_waits_and_warns():
    model, optimizer, controller = _setup("delta_w")
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x, y = torch.randn(32, 16, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        _train_step(model, optimizer, controller, step, x, y)
    assert all(layer.score_enabled for layer in controller.layers)  # step 5 is in the window
    ipt, unc = controller.ipt.clone(), controller.unc.clone()
    x = torch.full((32, 16), float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # The optimizer step is skipped, as GradScaler skips an overflowed one.
        reads = HostReads.count(lambda: _train_step(model, optimizer, controller, 5, x, y,
                                                    optimize=False))
    assert reads == []
    assert torch.equal(controller.ipt, ipt) and torch.equal(controller.unc, unc)
    x, y = torch.randn(32, 16, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    with pytest.warns(RuntimeWarning, match="non-finite importance scores at step 5"):
        _train_step(model, optimizer, controller, 6, x, y)
    assert {e["step"] for e in controller.allocation_log} == {6}


def test_cached_masks_follow_a_change_of_advance_learning():
    """The optimizer's and the penalty's masks are cached by slot_version and advance_learning:
    reserve slots frozen mid-run stop training at once (momentum and weight decay included)."""
    model, optimizer, controller = _setup("delta_w")
    x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
    _train_step(model, optimizer, controller, 0, x, y)
    layer = controller.layers[0]
    reserve = layer.reserve_mask.clone()
    assert reserve.any()
    layer.advance_learning = False
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    _train_step(model, optimizer, controller, 1, x, y)
    assert torch.equal(layer.lora_A[reserve], a[reserve])
    assert torch.equal(layer.lora_B[:, reserve], b[:, reserve])
    assert not torch.equal(layer.lora_A[~reserve], a[~reserve])


# ---------------------------------------------------------------- the finetune loop
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=64, dev_rows=8)


def _build(tiny, max_steps):
    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.settings import RunSettings
    settings = RunSettings(model=tiny["model"], task=None, train_file=tiny["train"],
                           eval_file=tiny["dev"], batch_size=8, max_seq_len=16,
                           max_steps=max_steps, init_warmup=2, incre_interval=3)
    return build_run(settings)


def _reference_losses(tiny, max_steps):
    """Every step's task loss and the non-padding tokens, each read on the host right away (the
    loop as it was before it deferred its reads)."""
    s, _, run, batches = _build(tiny, max_steps)
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.model.train()
    losses, tokens = [], 0
    for step in range(max_steps):
        batch = batches.train_batch(step)
        out = run.model(**batch)
        (out.loss + run.penalty()).backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        run.before_optimizer_step(step)
        run.optimizer.step()
        run.after_optimizer_step(step)
        run.optimizer.zero_grad(set_to_none=True)
        losses.append(float(F.cross_entropy(out.logits.detach().float(), batch["labels"])))
        tokens += int(batch["attention_mask"].sum())
    return losses, tokens, run.rank_pattern()


def test_the_loop_keeps_every_loss_and_reads_the_rank_only_at_log_points(tiny):
    from increlora_fast.training.loop import LOG_EVERY, LoopState, train_loop
    steps = 2 * LOG_EVERY + 3
    expected, tokens, pattern = _reference_losses(tiny, steps)
    _, _, run, batches = _build(tiny, steps)
    rank_reads, seen = [], []
    real_total_rank = run.total_rank
    run.total_rank = lambda: rank_reads.append(1) or real_total_rank()
    state = train_loop(run, batches, steps, run.settings.grad_clip, LoopState(), progress=False,
                       on_step_end=lambda st: seen.append(len(st.pending_losses)))
    assert state.losses == expected and state.step == steps  # bit for bit, in order
    assert state.session_tokens == tokens and not state.pending_losses
    assert run.rank_pattern() == pattern and sum(pattern.values()) > len(pattern)
    assert len(rank_reads) == 3  # steps 10, 20 and the last
    assert seen == [0 if (i + 1) % LOG_EVERY == 0 or i + 1 == steps else (i + 1) % LOG_EVERY
                    for i in range(steps)]


def test_loop_steps_read_the_host_only_at_log_points_and_rounds(tiny):
    """A tiny BERT through `train_loop`: steps that are neither a log point nor an allocation
    round read nothing, apart from transformers' own attention-mask check (``mask.all()``)."""
    from increlora_fast.training.loop import LOG_EVERY, LoopState, train_loop
    steps = 2 * LOG_EVERY + 3
    _, _, run, batches = _build(tiny, steps)
    collated = [batches.train_batch(step) for step in range(steps)]  # collation reads the host
    batches.train_batch = collated.__getitem__
    per_step = []
    with HostReads(allow=("transformers.masking_utils",)) as counter:
        def on_step_end(state):
            per_step.append(list(counter.reads))
            counter.reads.clear()
        train_loop(run, batches, steps, run.settings.grad_clip, LoopState(), progress=False,
                   on_step_end=on_step_end)
    rounds = {e["step"] for e in run.controller.allocation_log}
    logs = {LOG_EVERY - 1, 2 * LOG_EVERY - 1, steps - 1}
    assert rounds and run.controller.budget_reached and len(counter.allowed) >= steps
    for step, reads in enumerate(per_step):
        if step in rounds or step in logs:
            assert reads, f"step {step} should read (a round or a log point)"
        else:
            assert reads == [], f"step {step} read {reads}"


def test_the_loop_times_a_steps_device_work_before_a_callback_reads_the_device(tiny,
                                                                            monkeypatch):
    """At log points and at the steps a step-end callback says it acts (``due``), the loop
    waits for the device inside the timed step, before the callback: the queued work is not
    left to finish, untimed, in an evaluation or a checkpoint (tokens per second would come
    out too high on a GPU). The steps before the first log point each wait (their seconds say
    where the one-time costs go); later steps do not wait otherwise; the callbacks' own time is
    not training time."""
    import time

    from increlora_fast.training import loop
    from increlora_fast.training.loop import LOG_EVERY, LoopState, StepEnds, train_loop
    steps = 2 * LOG_EVERY + 2
    first, second = LOG_EVERY + 3, LOG_EVERY + 7
    _, _, run, batches = _build(tiny, steps)
    events = []

    def wait(device):
        events.append(("wait", state.step))
        time.sleep(0.05)

    class Evaluates:
        def due(self, step):
            return step in (3, first, second)

        def __call__(self, st):
            if self.due(st.step):
                events.append(("evaluate", st.step))
                time.sleep(0.2)

    monkeypatch.setattr(loop, "wait_for_device", wait)
    state = LoopState()
    start = time.perf_counter()
    train_loop(run, batches, steps, run.settings.grad_clip, state, progress=False,
               on_step_end=StepEnds(None, Evaluates(), lambda st: None))
    wall = time.perf_counter() - start
    before = [("wait", i) for i in range(1, LOG_EVERY + 1)]
    before.insert(3, ("evaluate", 3))
    assert events == before + [("wait", first), ("evaluate", first), ("wait", second),
                               ("evaluate", second), ("wait", 2 * LOG_EVERY), ("wait", steps)]
    assert len(state.first_step_seconds) == LOG_EVERY
    assert state.train_seconds >= 4 * 0.05  # the waits are timed
    assert state.train_seconds <= wall - 3 * 0.2  # the evaluations are not


def test_the_finetune_callbacks_are_due_exactly_where_they_read_the_device(tiny, tmp_path,
                                                                          monkeypatch):
    """``--select-best``'s scoring and the checkpoints read the device at the steps their
    ``due`` names, and only there (the loop waits for the device at those steps)."""
    from increlora_fast.training import finetune_run, loop
    from increlora_fast.training.device import Placement
    from increlora_fast.training.loop import BestState, LoopState
    s, _, run, batches = _build(tiny, 8)
    acted = []
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: acted.append("evaluate") or
                        {"eval_accuracy": 0.5, "eval_loss": 1.0})
    monkeypatch.setattr(finetune_run, "save_checkpoint", lambda *a, **k: acted.append("save"))
    monkeypatch.setattr(LoopState, "sync", lambda self, name: acted.append("sync"))
    place = Placement(torch.device("cpu"), "fp32")
    callbacks = (BestState(run, batches, 3, 8, place),
                 finetune_run._Checkpointer(tmp_path, run, dataclasses.replace(s, max_steps=8),
                                            2, [], place))
    for callback in callbacks:
        for step in range(1, 9):
            acted.clear()
            callback(LoopState(step=step))
            assert bool(acted) == callback.due(step), (type(callback).__name__, step, acted)
    assert [callbacks[0].due(n) for n in range(1, 9)] == [n in (3, 6, 8) for n in range(1, 9)]
    assert [callbacks[1].due(n) for n in range(1, 9)] == [n in (2, 4, 6) for n in range(1, 9)]


def test_a_nonfinite_loss_is_named_by_its_step_at_the_next_log_point(tiny):
    from increlora_fast.training.loop import LoopState, train_loop
    _, _, run, batches = _build(tiny, 7)
    head = run.model.classifier.modules_to_save["default"] \
        if hasattr(run.model.classifier, "modules_to_save") else run.model.classifier

    def poison(state):
        if state.step == 3:  # step 3's forward gives NaN logits
            with torch.no_grad():
                head.weight.fill_(float("nan"))

    state = LoopState()
    with pytest.raises(FloatingPointError, match="the training loss became nan at step 3"):
        train_loop(run, batches, 7, run.settings.grad_clip, state, progress=False,
                   on_step_end=poison)
    assert len(state.losses) == 3 and all(v == v for v in state.losses)


def _fp16_step(model, optimizer, controller, scaler, step, x, y, unscale=True) -> None:
    """`_train_step` with the loss scaled as under fp16 (a CPU GradScaler stands in for CUDA's:
    the same Python code, the same aten ops)."""
    loss = F.cross_entropy(model(x), y) + controller.regularization_loss()
    scaler.scale(loss).backward()
    if unscale:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    controller.step(step, loss_scale=grad_scaler_scale(scaler))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def test_fp16_steps_outside_rounds_read_nothing():
    """With a GradScaler the optimizer takes the scaler's found_inf on the device
    (``_step_supports_amp_scaling``) and the controller its scale as a tensor, so an fp16 step
    reads nothing on the host either (torch's AdamW reads found_inf to skip a step)."""
    model, optimizer, controller = _setup("delta_w")
    scaler = torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(1)
    for step in range(14):
        x, y = torch.randn(32, 16, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        reads = HostReads.count(
            lambda: _fp16_step(model, optimizer, controller, scaler, step, x, y))
        if not _is_round(step):
            assert reads == [], f"fp16 step {step} read {reads}"
    assert controller.current_total_rank() == 11 and optimizer.global_step == 14


@pytest.mark.parametrize("unscale", [True, False])
def test_fp16_steps_train_bit_for_bit_like_unscaled_steps(unscale):
    """A power-of-two loss scale is exact: unscaled by the scaler (``unscale_``) or by the
    optimizer (``grad_scale``), fp16-scaled steps give the unscaled run's parameters, moments
    and ranks bit for bit."""
    runs = []
    for scaled in (False, True):
        model, optimizer, controller = _setup("delta_w")
        scaler = torch.amp.GradScaler("cpu")
        gen = torch.Generator().manual_seed(1)
        for step in range(14):
            x, y = torch.randn(32, 16, generator=gen), torch.randint(0, 3, (32,), generator=gen)
            if scaled:
                _fp16_step(model, optimizer, controller, scaler, step, x, y, unscale)
            elif unscale:
                _train_step(model, optimizer, controller, step, x, y)
            else:  # no clipping: the scaled variant cannot clip before the optimizer unscales
                F.cross_entropy(model(x), y).add(controller.regularization_loss()).backward()
                controller.step(step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        runs.append((model.state_dict(), [dict(s) for s in optimizer.state.values()],
                     controller.rank_pattern()))
    (ref, ref_state, ref_ranks), (got, got_state, got_ranks) = runs
    assert got_ranks == ref_ranks and sum(got_ranks.values()) == 11
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    for a, b in zip(ref_state, got_state):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fused", [False, True])
def test_an_overflowed_fp16_step_changes_no_parameter_moment_or_count(fused, monkeypatch):
    """Inf in a scaled gradient: the scaler halves its scale, and the optimizer, told on the
    device, leaves every parameter, moment and Adam step count as it was (the stacked torch
    path and the fused kernel's, the GPU's, alike); its schedule clock moves on with the
    training step, as the controller's does."""
    if fused:
        pytest.importorskip("triton")
        from increlora_fast import optimizer as optimizer_module
        from increlora_fast.kernels.utils import interpreter_active
        if not interpreter_active():
            pytest.skip("the fused kernel runs on CPU tensors under the Triton interpreter")
        monkeypatch.setattr(optimizer_module, "_fused_kernel_applies", lambda p: True)
    model, optimizer, controller = _setup("delta_w")
    scaler = torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 16, generator=gen), torch.randint(0, 3, (32,), generator=gen))
               for _ in range(4)]
    for step, (x, y) in enumerate(batches[:3]):
        _fp16_step(model, optimizer, controller, scaler, step, x, y)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
    x, y = batches[3]
    x[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the controller's non-finite score
        reads = HostReads.count(lambda: _fp16_step(model, optimizer, controller, scaler, 3, x, y))
    assert reads == []
    assert scaler.get_scale() == 65536.0 / 2 and optimizer.global_step == 4
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    for before, after in zip(state, optimizer.state.values()):
        assert all(torch.equal(before[k], after[k]) for k in before)
