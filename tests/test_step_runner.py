"""The one training step (`StepRunner`), fixed-length batches (``--pad-to``) and the
``--cuda-graphs`` option, offline on a tiny BERT on the CPU."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List

import pytest
import torch

from finetune_helpers import cli, tiny_files
from graph_emulator import (EmulatedGraph, EmulatedPool, kernels_loaded_before_capture,
                            record_eager_steps)
from increlora_fast.kernels.launches import launch_counts, reset_launch_counts
from increlora_fast.training.finetune_run import build_run
from increlora_fast.training.loop import LoopState, train_loop
from increlora_fast.training.settings import RunSettings
from increlora_fast.training.cuda_graphs import WARMUP_STEPS, GraphedSteps
from increlora_fast.training.step_runner import StepRunner, resolve_cuda_graphs

STEPS = 12
MAX_SEQ_LEN = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=64, dev_rows=16)


def _settings(tiny, **overrides) -> RunSettings:
    values = dict(model=tiny["model"], task=None, train_file=tiny["train"],
                  eval_file=tiny["dev"], batch_size=8, max_seq_len=MAX_SEQ_LEN, max_steps=STEPS,
                  init_warmup=2, incre_interval=3)
    values.update(overrides)
    return RunSettings(**values)


def _trainable(run) -> dict:
    return {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}


def _without_dropout(run) -> None:
    """Dropout draws its masks over the padded shape, so runs padded differently drop different
    units; without it padding is masked out exactly."""
    for module in run.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _train(tiny, **loop_kwargs):
    s, _, run, batches = build_run(_settings(tiny))
    _without_dropout(run)
    state = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False,
                       **loop_kwargs)
    return state, run


def test_kernels_built_before_the_first_step_count_as_training_time(tiny, monkeypatch):
    """Where `StepRunner.precompile` builds kernels (on CUDA), the loop counts its time once (the
    build's own `seconds`), before the first step, as training: in train_seconds and on its
    own in precompile_seconds; the warm rate and the first steps' seconds leave it out. On CPU
    nothing is built (None)."""
    from increlora_fast.precompile import PrecompileResult
    from increlora_fast.training import loop as loop_module
    s, _, run, batches = build_run(_settings(tiny))
    assert StepRunner(run).precompile() is None  # CPU: nothing to build
    clock = iter(range(10_000))
    monkeypatch.setattr(loop_module.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(loop_module, "wait_for_device", lambda device: None)
    calls = []

    def built(self):
        calls.append(1)
        return PrecompileResult(configs=3, calls=15, seconds=2.0)
    monkeypatch.setattr(StepRunner, "precompile", built)
    state = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False)
    assert len(calls) == 1 and state.precompile_seconds == 2.0
    assert state.train_seconds == 2.0 + STEPS  # one tick per step
    assert state.first_step_seconds == [1.0] * loop_module.LOG_EVERY
    again = train_loop(run, batches, STEPS, s.grad_clip, state, progress=False)
    assert len(calls) == 1 and again.precompile_seconds == 2.0  # nothing left to train


def test_precompile_on_cuda_builds_the_runs_optimizer_and_penalty_too(tiny, monkeypatch):
    """On CUDA the runner hands `precompile_kernels` the model, the placement's autocast
    dtype, its optimizer and its controller's penalty (no GPU needed: the call is recorded)."""
    from increlora_fast.training import step_runner as runner_module
    from increlora_fast.training.device import Placement
    _, _, run, _ = build_run(_settings(tiny))
    calls = []
    monkeypatch.setattr(runner_module, "precompile_kernels",
                        lambda model, dtype, **kwargs: calls.append((model, dtype, kwargs)))
    runner = StepRunner(run)
    runner.placement = Placement(torch.device("cuda"), "bf16")
    runner.precompile()
    assert calls == [(run.model, torch.bfloat16,
                      {"optimizer": run.optimizer, "penalty": run.controller.penalty})]


def test_warm_tokens_per_second_leaves_out_the_steps_before_the_first_log_point(tiny,
                                                                              monkeypatch):
    """The rate after the first log point counts exactly the later steps' tokens and seconds;
    a run that ends at its first log point has none. Each of the first steps before it is
    waited for and timed alone; later steps only at log points."""
    from increlora_fast.training import loop as loop_module
    s, _, run, batches = build_run(_settings(tiny))
    clock = iter(range(10_000))
    monkeypatch.setattr(loop_module.time, "perf_counter", lambda: float(next(clock)))
    waits: List[int] = []
    monkeypatch.setattr(loop_module, "wait_for_device", lambda device: waits.append(1))
    state = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False)
    tokens = [int(batches.train_batch(i)["attention_mask"].sum()) for i in range(STEPS)]
    first = loop_module.LOG_EVERY
    assert STEPS - first == 2  # the last step is the only later log point
    assert state.first_step_seconds == [1.0] * first and len(waits) == first + 1
    assert state.warm_mark == (sum(tokens[:first]), float(first))  # one tick per step
    assert state.warm_tokens_per_second() == round(sum(tokens[first:]) / (STEPS - first), 1)
    assert state.session_tokens == sum(tokens)
    short = train_loop(run, batches, first, s.grad_clip, LoopState(), progress=False)
    assert short.warm_mark is not None and short.warm_tokens_per_second() is None


@pytest.mark.parametrize("exact", [False, True])
def test_the_loop_stops_score_tracking_when_it_ends_and_goes_on_where_it_stopped(tiny, exact):
    """A loop that ends inside a score window leaves no layer scoring (nor, in exact-step
    mode, holding its dense score gradient), as `IncreLoRACallback` does at train end; a loop
    that goes on from its state tracks again and trains as one loop to the end."""
    def build():
        s, _, run, batches = build_run(_settings(tiny, top_h=1))  # one module a round
        _without_dropout(run)
        run.controller.exact_step_score = exact
        run.controller.track_step(0)
        return s, run, batches

    s, run, batches = build()
    stop = 4
    state = train_loop(run, batches, stop, s.grad_clip, LoopState(), progress=False)
    # the loop ended inside a window: its next step would be scored
    assert run.controller.is_tracked(stop) and not run.controller.budget_reached
    layers = run.controller.layers
    assert [layer.score_enabled for layer in layers] == [False] * len(layers)
    assert [layer.score_grad is None for layer in layers] == [True] * len(layers)
    train_loop(run, batches, STEPS, s.grad_clip, state, progress=False)

    s, whole, batches = build()
    train_loop(whole, batches, STEPS, s.grad_clip, LoopState(), progress=False)
    assert run.rank_pattern() == whole.rank_pattern()
    assert run.allocation_log() == whole.allocation_log()
    for name, value in _trainable(whole).items():
        assert torch.equal(_trainable(run)[name], value), name


# ---------------------------------------------------------------- static inputs

def test_static_inputs_train_bit_for_bit_like_the_plain_path(tiny):
    """Fixed-length batches through the static buffers give the plain path's losses, token
    counts, ranks and weights exactly; the runner hands the model the same tensors each step."""
    s, _, run, batches = build_run(_settings(tiny, pad_to="max_length"))
    plain = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False)
    plain_weights, plain_pattern = _trainable(run), run.rank_pattern()

    s, _, run, batches = build_run(_settings(tiny, pad_to="max_length"))
    runner = StepRunner(run, grad_clip=s.grad_clip, static_inputs=True)
    seen: List[int] = []
    real_forward = runner.forward_backward
    runner.forward_backward = lambda step, b: seen.append(id(b["input_ids"])) or \
        real_forward(step, b)
    state = LoopState()
    run.model.train()
    for step in range(STEPS):
        result = runner.step(step, batches.train_batch(step))
        state.pending_losses.append(result.task_loss)
        state.pending_tokens.append(result.tokens)
        state.step += 1
    state.sync(run.name)
    assert state.losses == plain.losses and state.session_tokens == plain.session_tokens
    assert run.rank_pattern() == plain_pattern and sum(plain_pattern.values()) > len(plain_pattern)
    weights = _trainable(run)
    assert all(torch.equal(weights[n], plain_weights[n]) for n in plain_weights)
    assert len(set(seen)) == 1 and len(seen) == STEPS


def test_static_inputs_refuse_a_batch_of_another_shape(tiny):
    _, _, run, batches = build_run(_settings(tiny))
    runner = StepRunner(run, cuda_graphs=True, graph_factory=EmulatedGraph)  # static inputs
    assert runner.static_inputs
    runner.step(0, batches.train_batch(0))
    shorter = {k: v[:, :5] if v.dim() == 2 else v for k, v in batches.train_batch(1).items()}
    with pytest.raises(ValueError, match="one shape.*--pad-to max_length"):
        runner.step(1, shorter)


def _emulated_graphs(monkeypatch) -> List[EmulatedGraph]:
    """Make the step runner's graphs emulated ones in one shared pool, as `CUDAGraphPool` on
    CUDA; the list collects every graph made."""
    from increlora_fast.training import step_runner
    made: List[EmulatedGraph] = []
    pool = EmulatedPool()

    def factory() -> EmulatedGraph:
        made.append(pool())
        return made[-1]
    monkeypatch.setattr(step_runner, "CUDAGraphPool", lambda: factory)
    return made


# (settings, steps) of the loop's graphed runs: every step of the allocation phase tracked,
# the untracked state first after the budget; a score window (29 steps before each round, the
# default), so the run starts untracked and the tracked state comes later
SCHEDULES = {"tracked-first": (dict(), STEPS),
             "score-window": (dict(init_warmup=31, incre_interval=32, max_steps=36), 36)}


# (the Triton path of a run that starts untracked: tests/test_gpu_check_graphs.py, fp16)
@pytest.mark.usefixtures("whole_loop_tiles")
@pytest.mark.parametrize("backend, schedule", [("torch", "tracked-first"),
                                               ("triton", "tracked-first"),
                                               ("torch", "score-window")])
def test_the_loop_with_cuda_graphs_gives_the_same_numbers(tiny, monkeypatch, backend, schedule):
    """The loop's ``cuda_graphs`` path (static inputs, steps replayed from graphs, here the CPU
    emulation of CUDA graphs) matches the plain fixed-length run exactly; on the Triton path
    (the one a GPU takes, here under the interpreter) no kernel is first launched inside a
    capture, which CUDA refuses."""
    if backend == "triton":
        pytest.importorskip("triton")
        from increlora_fast.kernels.utils import interpreter_active
        if not interpreter_active():
            pytest.skip("the Triton path on CPU needs the interpreter")
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    made = _emulated_graphs(monkeypatch)
    eager_steps = record_eager_steps(monkeypatch)
    overrides, steps = SCHEDULES[schedule]
    s, _, plain_run, batches = build_run(_settings(tiny, pad_to="max_length", **overrides))
    plain = train_loop(plain_run, batches, steps, s.grad_clip, LoopState(), progress=False)
    s, _, run, batches = build_run(_settings(tiny, pad_to="max_length", **overrides))
    tracked = [run.controller.is_tracked(0)]
    reset_launch_counts()
    with kernels_loaded_before_capture():
        graphs = train_loop(run, batches, steps, s.grad_clip, LoopState(), progress=False,
                            cuda_graphs=True)
    score_launches = launch_counts().get("_score_tiles_kernel", 0)
    assert (score_launches > 0) == (backend == "triton")  # the path really was taken
    assert graphs.losses == plain.losses and graphs.session_tokens == plain.session_tokens
    # the state after the last step too, which no loss shows
    assert run.controller.allocation_log == plain_run.controller.allocation_log
    assert run.controller.allocation_log
    assert run.optimizer.global_step == plain_run.optimizer.global_step == steps
    assert torch.equal(run.controller.ipt, plain_run.controller.ipt)
    assert torch.equal(run.controller.unc, plain_run.controller.unc)
    expected = _trainable(plain_run)
    assert all(torch.equal(value, expected[n]) for n, value in _trainable(run).items())
    assert tracked == [schedule == "tracked-first"]
    assert made and sum(g.replays for g in made) > 0  # steps really were replayed
    # only the warm-up steps ran eagerly: the other state's kernels were loaded by a forward
    # and backward without effect after the first step (dropout is on: its random state was
    # put back; the score sums too), and that state's first step was captured at once (5
    # graphs: the probe of the model's forward and backward, never replayed, then 2 per state)
    assert eager_steps == list(range(WARMUP_STEPS)) and len(made) == 5, (eager_steps, len(made))
    assert made[0].replays == 0 and all(g.replays for g in made[1:])


def test_fp16_steps_with_cuda_graphs_scale_skip_and_back_off_like_eager_steps(tiny, monkeypatch):
    """fp16 under CUDA graphs: GradScaler's scale, overflow flag and back-off stay on the device
    (`IncreLoRAAdamW` skips an overflowed step itself), so replayed steps give the eager run's
    losses and scales, also when a replayed step overflows. The scaler starts high enough that
    the tiny BERT's fp16 gradients overflow now and then (a CPU GradScaler and fp16 autocast
    stand in for CUDA's)."""
    from increlora_fast.training.device import Placement
    made = _emulated_graphs(monkeypatch)
    runs = []
    for graphs in (False, True):
        place = Placement(torch.device("cpu"), "fp16")
        place.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 22, growth_interval=3)
        s, _, run, batches = build_run(_settings(tiny, pad_to="max_length"), place)
        trace = []  # (scale after the step, replays so far), read between steps

        def note(_state) -> None:
            trace.append((float(place.scaler.get_scale()), sum(g.replays for g in made)))
        with pytest.warns(RuntimeWarning, match="non-finite importance scores"):
            state = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False,
                               placement=place, cuda_graphs=graphs, on_step_end=note)
        runs.append((state.losses, trace, run.controller.rank_pattern(), run.model.state_dict()))
    (losses, trace, ranks, weights), (g_losses, g_trace, g_ranks, g_weights) = runs
    assert g_losses == losses and g_ranks == ranks
    assert [t[0] for t in g_trace] == [t[0] for t in trace]
    assert all(torch.equal(weights[k], g_weights[k]) for k in weights)
    replayed_backoff = [i for i in range(1, STEPS)
                        if g_trace[i][1] > g_trace[i - 1][1] and g_trace[i][0] < g_trace[i - 1][0]]
    assert replayed_backoff, f"no overflow in a replayed step: {g_trace}"


def test_default_padding_follows_the_resolved_graphs_choice(tiny):
    """``--pad-to`` left to its default pads to one shape exactly when the steps are graphed,
    whatever the option's text (``auto``, once it turns graphs on, needs fixed shapes too); a
    padding given is kept; without a resolved choice only ``on`` graphs. A finetune run on CPU
    resolves ``auto`` to no graphs, and ``on`` there is an error naming the option."""
    from increlora_fast.training.finetune_run import uses_cuda_graphs
    from increlora_fast.training.settings import resolve
    for text in ("auto", "on", "off"):
        s = _settings(tiny, cuda_graphs=text)
        assert s.pad_to is None
        assert resolve(s, 100, graphed=True).pad_to == "max_length"
        assert resolve(s, 100, graphed=False).pad_to == "longest"
        assert resolve(s, 100).pad_to == ("max_length" if text == "on" else "longest")
    given = _settings(tiny, pad_to="max_length")
    assert resolve(given, 100, graphed=False).pad_to == "max_length"
    assert uses_cuda_graphs(_settings(tiny, cuda_graphs="auto", device="cpu")) is False
    with pytest.raises(ValueError, match="--cuda-graphs on needs a CUDA device"):
        uses_cuda_graphs(_settings(tiny, cuda_graphs="on", pad_to="max_length", device="cpu"))


def test_fp16_step_skipped_for_an_overflow_outside_the_adapters_changes_no_score(tiny,
                                                                                 monkeypatch):
    """An fp16 step whose only overflow is in a trained parameter outside the adapters (the
    classifier), at an allocation round: the scaler skips the optimizer step, and the
    controller (told by the scaler's overflow flag) leaves its EMAs as they were and moves the
    round to the next step, as for an overflow everywhere. Before 2026-12-05 it took the
    adapters' finite scores and ran the round on the skipped step."""
    from increlora_fast.training.device import Placement
    place = Placement(torch.device("cpu"), "fp16")
    place.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
    s, _, run, batches = build_run(_settings(tiny), place)
    head = [p for n, p in run.model.named_parameters() if p.requires_grad and "lora_" not in n]
    real = StepRunner._before_optimizer

    def before_optimizer(self, step):
        if step == 3:  # the first allocation round (init_warmup 2, incre_interval 3)
            head[0].grad.view(-1)[0] = float("inf")
        real(self, step)
    monkeypatch.setattr(StepRunner, "_before_optimizer", before_optimizer)
    emas, scales = [], []

    def note(_state) -> None:
        emas.append(run.controller.ipt.clone())
        scales.append(float(place.scaler.get_scale()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-finite importance scores")
        train_loop(run, batches, 6, s.grad_clip, LoopState(), progress=False, placement=place,
                   on_step_end=note)
    assert scales[3] == scales[2] / 2  # the scaler saw the overflow and skipped the step
    assert torch.equal(emas[3], emas[2]) and not torch.equal(emas[4], emas[3])
    assert [e["step"] for e in run.controller.allocation_log][:1] == [4]


@pytest.mark.parametrize("init_scale, growth_interval", [(2.0 ** 8, 1000), (2.0 ** 22, 3)])
def test_fp16_update_run_eagerly_after_a_replayed_first_half_unscales_once(
        tiny, monkeypatch, init_scale, growth_interval):
    """When a replayed round makes the optimizer's caches as new tensors, the optimizer half of
    that step runs eagerly after the replayed first half. The replay did not set GradScaler's
    record (gradients unscaled, the overflow flags), so the step runner puts back the one the
    capture left; without it the optimizer divides the gradients by the scale a second time.
    Here every round makes new caches; the graphed fp16 run equals the eager one, loss scales
    included, with a scale that never overflows (the case a second unscale shows in) and
    with one high enough for steps to overflow and back off."""
    from increlora_fast import optimizer as optimizer_module
    from increlora_fast.training.device import Placement
    monkeypatch.setattr(optimizer_module, "refresh_in_place", lambda old, new: (new, True))
    _emulated_graphs(monkeypatch)
    eager_updates = []
    real_round = GraphedSteps._round_on_host

    def round_on_host(self, *args):
        kept = real_round(self, *args)
        eager_updates.append(not kept)
        return kept
    monkeypatch.setattr(GraphedSteps, "_round_on_host", round_on_host)
    runs = []
    for graphs in (False, True):
        place = Placement(torch.device("cpu"), "fp16")
        place.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale,
                                            growth_interval=growth_interval)
        s, _, run, batches = build_run(_settings(tiny, pad_to="max_length"), place)
        scales = []

        def note(_state) -> None:
            scales.append(float(place.scaler.get_scale()))
        with warnings.catch_warnings():  # overflowed steps leave non-finite scores, on purpose
            warnings.filterwarnings("ignore", message=".*non-finite importance scores")
            state = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False,
                               placement=place, cuda_graphs=graphs, on_step_end=note)
        runs.append((state.losses, scales, run.model.state_dict()))
    (losses, scales, weights), (g_losses, g_scales, g_weights) = runs
    assert any(eager_updates), eager_updates  # a replayed round's update ran eagerly
    assert g_losses == losses and g_scales == scales
    assert (min(scales) < init_scale) == (growth_interval == 3)  # overflows: backed off
    assert all(torch.equal(weights[k], g_weights[k]) for k in weights)


def test_a_replayed_step_issues_only_its_input_copies_step_fills_and_result_copies(tiny):
    """Besides its graph launch, a replayed step copies the batch into the static inputs (one
    op per input), fills the two device step indices (optimizer and controller) and copies out
    its loss and token count: 7 device ops here, and no host read. The replay is stubbed
    (`replay_host.NoReplayGraph`), as in the replay host-time benchmark."""
    from host_reads import HostReads
    from increlora_fast.benchmarks.speed.replay_host import (NoReplayGraph,
                                                             replayed_step_device_ops)
    _, _, run, batches = build_run(_settings(tiny, pad_to="max_length", init_warmup=20,
                                             incre_interval=20, max_steps=40))
    graphs: List[NoReplayGraph] = []

    def factory() -> NoReplayGraph:
        graphs.append(NoReplayGraph())
        return graphs[-1]
    runner = StepRunner(run, cuda_graphs=True, graph_factory=factory)
    batch = batches.train_batch(0)
    for step in range(6):  # eager warm-up, then each tracking state's first step and capture
        runner.step(step, batch)
    replays = runner.graphed.replays
    ops = replayed_step_device_ops(runner, 6, batch)
    assert runner.graphed.replays == replays + 1  # the step was a replay (of its two graphs)
    # the probe of the model's forward and backward, then two halves per captured state
    assert graphs and len(graphs) % 2 == 1
    assert sorted(ops) == sorted(["aten.copy_.default"] * len(batch)
                                 + ["aten.fill_.Scalar"] * 2 + ["aten.clone.default"] * 2)
    assert HostReads.count(lambda: runner.step(7, batch)) == []


def _token_batches(n: int) -> List[dict]:
    """``n`` seeded batches of 4 unpadded 12-token rows over a 64-token vocabulary, 2 labels."""
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 64, (4, 12), generator=generator),
             "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,), generator=generator)} for _ in range(n)]


def _tiny_deberta_run(seed: int):
    """A tiny DeBERTa-v2 with log-bucketed relative positions, IncreLoRA on its attention. Its
    forward makes host tensors (``torch.tensor``: the attention scale in transformers 5.25, not
    under 5.17, where it is TorchScript; the relative positions' ``mid - 1``, copied to the
    device, which failed the H200's capture on 2026-12-05, before the step runner cached the
    positions), which the graph emulator's capture refuses."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    from increlora_fast import IncreLoRAConfig
    from increlora_fast.training.increlora_method import IncreLoRARun

    torch.manual_seed(seed)
    config = DebertaV2Config(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=32, relative_attention=True,
                             position_buckets=8, pos_att_type=["p2c", "c2p"],
                             norm_rel_ebd="layer_norm", share_att_key=True, num_labels=2)
    adapters = IncreLoRAConfig(target_modules=["query_proj", "value_proj"], r_max=4, init_r=1,
                               target_rank=2, init_warmup=1, incre_interval=2, top_h=2,
                               modules_to_save=["classifier", "pooler"])
    return IncreLoRARun.from_config(DebertaV2ForSequenceClassification(config), adapters,
                                    lr=1e-2)


def test_a_model_that_cannot_be_captured_steps_eagerly_after_one_warning():
    """A tiny DeBERTa-v2 that cannot be captured under the emulator (a host tensor added to its
    head's output, whatever its own forward does in this transformers version): before the first
    capture the runner's probe finds that, warns once, and every step runs eagerly, exactly as
    a run without graphs (dropout on: the probe's random draws were put back; the cached
    relative positions change nothing)."""
    batches = _token_batches(8)
    results = {}
    for graphed in (False, True):
        run = _tiny_deberta_run(seed=0)
        run.model.classifier.register_forward_hook(
            lambda module, args, out: out + torch.tensor(0.0))
        runner = StepRunner(run, grad_clip=1.0, cuda_graphs=graphed,
                            graph_factory=EmulatedPool() if graphed else None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [float(runner.step(i, b).task_loss) for i, b in enumerate(batches)]
        results[graphed] = (losses, _trainable(run), run.rank_pattern(), caught, runner)
    (plain, plain_weights, plain_ranks, _, _), (losses, weights, ranks, caught, runner) = \
        results[False], results[True]
    assert losses == plain and ranks == plain_ranks and sum(ranks.values()) > len(ranks)
    assert all(torch.equal(weights[n], plain_weights[n]) for n in plain_weights)
    fallback = runner.graphed.fallback
    assert fallback is not None and "torch.tensor" in fallback
    assert runner.graphed.captures == runner.graphed.replays == 0
    ours = [w for w in caught if "CUDA graphs" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "cannot be captured" in str(ours[0].message) and fallback in str(ours[0].message)


def test_the_loop_records_why_its_graphs_fell_back(tiny, monkeypatch):
    """A model that copies host data to the device in its forward (here a hook on the head)
    trains under ``cuda_graphs`` like the plain run, and the loop's state says why it stepped
    eagerly; a capturable model leaves no reason."""
    made = _emulated_graphs(monkeypatch)
    s, _, run, batches = build_run(_settings(tiny, pad_to="max_length"))
    plain = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False)
    assert plain.graph_fallback is None
    s, _, run, batches = build_run(_settings(tiny, pad_to="max_length"))
    head = run.model.classifier
    head.register_forward_hook(lambda module, args, out: out + torch.tensor(0.0))
    with pytest.warns(RuntimeWarning, match="cannot be captured"):
        graphs = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False,
                            cuda_graphs=True)
    assert graphs.losses == plain.losses
    assert graphs.graph_fallback is not None and "torch.tensor" in graphs.graph_fallback
    assert len(made) == 1 and made[0].replays == 0  # the probe's, never replayed


def test_the_probe_leaves_the_exact_step_scores_gradient_as_it_was():
    """With ``exact_step_score`` a tracked forward and backward add the step's dense gradient
    into each layer's ``score_grad`` (allocating it when tracking has just turned on): the
    probe before the first capture, in a tracked state here, must put it back, or the round's
    scores count the probe's gradient too (the emulator runs the probe's ops; on CUDA a
    ``score_grad`` allocated inside the probe's capture would hold whatever its pool held)."""
    from transformers import BertConfig, BertForSequenceClassification
    from increlora_fast import IncreLoRAConfig
    from increlora_fast.training.increlora_method import IncreLoRARun

    batches = _token_batches(12)
    results = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=32,
                            max_position_embeddings=32, num_labels=2)
        adapters = IncreLoRAConfig(target_modules=["query", "value"], r_max=6, init_r=1,
                                   target_rank=4, init_warmup=1, incre_interval=3, top_h=2,
                                   modules_to_save=["classifier", "pooler"],
                                   exact_step_score=True)
        run = IncreLoRARun.from_config(BertForSequenceClassification(config), adapters, lr=1e-2)
        assert run.controller.is_tracked(WARMUP_STEPS)  # the probe's step tracks scores
        runner = StepRunner(run, grad_clip=1.0, cuda_graphs=graphed,
                            graph_factory=EmulatedPool() if graphed else None)
        losses = [float(runner.step(i, b).task_loss) for i, b in enumerate(batches)]
        results[graphed] = (losses, [(e["step"], e["module"], e["score"])
                                     for e in run.controller.allocation_log],
                            _trainable(run), runner)
    (plain, plain_log, plain_weights, _), (losses, log, weights, runner) = \
        results[False], results[True]
    assert runner.graphed.replays > 0 and runner.graphed.fallback is None
    assert losses == plain and log == plain_log and len(log) >= 2
    assert all(torch.equal(weights[n], plain_weights[n]) for n in plain_weights)


def test_cuda_graphs_without_cuda_is_refused(tiny):
    _, _, run, _ = build_run(_settings(tiny))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, the run is on cpu"):
        StepRunner(run, cuda_graphs=True)


def test_cuda_graphs_of_a_run_without_a_controller_are_refused(tiny):
    _, _, run, _ = build_run(_settings(tiny, method="lora"))
    with pytest.raises(ValueError, match="cuda_graphs: only IncreLoRA runs can be captured, "
                                         "got lora"):
        StepRunner(run, cuda_graphs=True, graph_factory=EmulatedGraph)


# ---------------------------------------------------------------- allocation rounds

def test_allocation_due_names_exactly_the_rounds_of_an_increlora_run(tiny):
    _, _, run, batches = build_run(_settings(tiny))
    runner = StepRunner(run, grad_clip=1.0)
    due = []
    for step in range(STEPS):
        if run.allocation_due(step):
            due.append(step)
        runner.step(step, batches.train_batch(step))
    rounds = sorted({e["step"] for e in run.controller.allocation_log})
    assert rounds and due == rounds and run.controller.budget_reached
    assert not run.allocation_due(STEPS + 3 * run.config.incre_interval)  # budget reached


def test_allocation_due_is_false_for_methods_without_rounds(tiny):
    _, _, run, _ = build_run(_settings(tiny, method="lora"))
    assert not any(run.allocation_due(step) for step in range(STEPS))


# ---------------------------------------------------------------- --pad-to

def test_max_length_pads_every_training_batch_and_trains_like_longest(tiny):
    """Padding positions are masked, so (without dropout, whose masks follow the padded shape)
    padding to max_seq_len changes the losses at most by float rounding: within 1e-4 (relative)
    at every step of a 12-step run (on this CPU they are equal; the margin is for kernels that
    sum over the padded length in another order)."""
    s, _, run, batches = build_run(_settings(tiny, pad_to="max_length"))
    _without_dropout(run)
    for step in range(2 * batches.steps_per_epoch):
        batch = batches.train_batch(step)
        assert batch["input_ids"].shape == (s.batch_size, MAX_SEQ_LEN)
        assert batch["attention_mask"].shape == (s.batch_size, MAX_SEQ_LEN)
    eval_lengths = {b["input_ids"].shape[1] for b in batches.eval_batches()}
    assert max(eval_lengths) < MAX_SEQ_LEN  # dev batches stay padded to their longest input
    fixed = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False)
    longest, _ = _train(tiny)
    assert fixed.session_tokens == longest.session_tokens
    assert fixed.losses == pytest.approx(longest.losses, rel=1e-4)


def _args(tiny, out: Path, *extra: str) -> List[str]:
    return ["--model", tiny["model"], "--train-file", tiny["train"], "--eval-file", tiny["dev"],
            "--batch-size", "8", "--max-seq-len", str(MAX_SEQ_LEN), "--output-dir", str(out),
            "--no-progress", "--max-steps", "6", *extra]


def test_pad_to_is_recorded_and_a_resume_keeps_it(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(_args(tiny, out, "--pad-to", "max_length", "--save-steps", "3")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["pad_to"] == "max_length"
    assert metrics["settings"]["cuda_graphs"] == "auto" and metrics["cuda_graphs"] is False
    code = cli(["--resume", str(out / "checkpoint-3"), "--pad-to", "longest", "--output-dir",
                str(tmp_path / "other"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--pad-to 'longest' (checkpoint: 'max_length')" in err
    assert "another length" not in err
    code = cli(["--resume", str(out / "checkpoint-3"), "--max-steps", "12", "--output-dir",
                str(tmp_path / "other"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-steps 12 (checkpoint: 6); a run of another length is another " \
        "run (its learning-rate warmup and decay and its rank allocation follow the length): " \
        "start it anew" in err and len(err.strip().splitlines()) == 1
    resumed = tmp_path / "resumed"
    assert cli(["--resume", str(out / "checkpoint-3"), "--output-dir", str(resumed),
                "--no-progress"]) == 0
    again = json.loads((resumed / "metrics.json").read_text())
    assert again["settings"]["pad_to"] == "max_length"
    assert again["train_losses"] == metrics["train_losses"]


def test_a_graphed_runs_checkpoint_resumes_eagerly_with_cuda_graphs_off(tiny, tmp_path, capsys,
                                                                        monkeypatch):
    """A checkpoint of a ``--cuda-graphs on`` run (written on a GPU; here graphs emulated) resumed
    where there is no CUDA: the error said to use ``--cuda-graphs off``, which the resume then
    refused as a conflict with the checkpoint, so it could not be resumed there at all. The
    option says how the steps run, not what they compute (the padding is the checkpoint's), so
    a resume takes it: the eager steps continue the graphed run exactly, and the outputs say
    how this run stepped."""
    from increlora_fast.training import finetune_run
    made = _emulated_graphs(monkeypatch)
    monkeypatch.setattr(finetune_run, "uses_cuda_graphs", lambda s, device=None: True)
    out = tmp_path / "run"
    graphed = finetune_run.run_finetune(_settings(tiny, cuda_graphs="on", max_steps=6), str(out),
                                        save_steps=3, progress=False)
    assert sum(g.replays for g in made) > 0 and graphed["settings"]["pad_to"] == "max_length"
    monkeypatch.undo()
    capsys.readouterr()
    resume = ["--resume", str(out / "checkpoint-3"), "--no-progress", "--output-dir"]
    assert cli(resume + [str(tmp_path / "refused")]) == 2
    assert "use --cuda-graphs off" in capsys.readouterr().err
    resumed = tmp_path / "resumed"
    assert cli(resume + [str(resumed), "--cuda-graphs", "off"]) == 0, capsys.readouterr().err
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["train_losses"] == graphed["train_losses"]
    assert metrics["eval_loss"] == graphed["eval_loss"]
    assert metrics["cuda_graphs"] is False and metrics["settings"]["cuda_graphs"] == "off"
    assert metrics["settings"]["pad_to"] == "max_length"


def test_cuda_graphs_on_is_refused_for_a_checkpoint_padded_to_the_longest_input(tiny, tmp_path,
                                                                                capsys):
    """The resume keeps the checkpoint's padding, so ``--cuda-graphs on`` cannot continue one
    padded to each batch's longest input, and the error does not ask for a ``--pad-to`` the
    resume would refuse."""
    out = tmp_path / "run"
    assert cli(_args(tiny, out, "--save-steps", "3")) == 0
    capsys.readouterr()
    assert cli(["--resume", str(out / "checkpoint-3"), "--cuda-graphs", "on", "--output-dir",
                str(tmp_path / "again"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "its run pads each batch to its longest input" in err and "--pad-to max" not in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "again").exists()


def test_a_checkpoint_from_before_pad_to_resumes_as_it_started(tiny, tmp_path):
    """A checkpoint written before ``--pad-to`` and ``--cuda-graphs`` existed (its settings
    have neither) trained eagerly on batches padded to their longest input; a resume on CUDA
    must not turn ``--cuda-graphs auto`` on and pad to ``--max-seq-len`` from then on."""
    from increlora_fast.data.files import file_sha256
    from increlora_fast.training.checkpoint import (SETTINGS_FILE, STATE_FILE,
                                                    read_checkpoint_settings, save_checkpoint)
    s, _, run, _ = build_run(_settings(tiny))
    folder = save_checkpoint(tmp_path / "checkpoint-0", run, s, LoopState())
    old = json.loads((folder / SETTINGS_FILE).read_text())
    del old["pad_to"], old["cuda_graphs"]
    (folder / SETTINGS_FILE).write_text(json.dumps(old))
    envelope = torch.load(folder / STATE_FILE, weights_only=True)
    envelope["files"][SETTINGS_FILE] = file_sha256(folder / SETTINGS_FILE)
    torch.save(envelope, folder / STATE_FILE)
    resumed = read_checkpoint_settings(folder)
    assert resumed.pad_to == "longest"
    assert resolve_cuda_graphs(resumed.cuda_graphs, torch.device("cuda", 0), resumed.method,
                               resumed.pad_to) is False


def test_the_default_is_longest(tiny, tmp_path):
    out = tmp_path / "run"
    assert cli(_args(tiny, out, "--save-steps", "0")) == 0
    assert json.loads((out / "metrics.json").read_text())["settings"]["pad_to"] == "longest"


# ---------------------------------------------------------------- --cuda-graphs

def test_resolve_cuda_graphs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_cuda_graphs("auto", cpu) is False and resolve_cuda_graphs("auto", cuda) is True
    assert resolve_cuda_graphs("auto", cuda, "increlora", "max_length") is True
    # other methods, and a padding to each batch's longest input, step eagerly
    for method, pad_to in (("lora", None), ("adalora", None), ("full", None),
                           ("increlora", "longest")):
        assert resolve_cuda_graphs("auto", cuda, method, pad_to) is False, (method, pad_to)
    assert resolve_cuda_graphs("off", cuda) is False and resolve_cuda_graphs("on", cuda) is True
    with pytest.raises(ValueError, match="--cuda-graphs on needs a CUDA device.*cpu"):
        resolve_cuda_graphs("on", cpu)
    with pytest.raises(ValueError, match="--cuda-graphs 'sometimes' is invalid"):
        resolve_cuda_graphs("sometimes", cpu)


@pytest.mark.parametrize("extra,expected", [
    (["--device", "cpu"], "--cuda-graphs on needs a CUDA device, and this run is on cpu"),
    (["--method", "lora"], "--cuda-graphs 'on' is invalid: it is for --method increlora only, "
                           "not lora"),
    (["--pad-to", "longest"], "--cuda-graphs 'on' is invalid: graphs need batches of one shape"),
])
def test_cuda_graphs_on_is_refused_in_one_line_before_any_data_is_read(
        tiny, tmp_path, capsys, monkeypatch, extra, expected):
    import increlora_fast.training.finetune_run as finetune

    def no_data(settings):
        raise AssertionError("the data was read before the options were checked")
    monkeypatch.setattr(finetune, "load_data", no_data)
    assert cli(_args(tiny, tmp_path / "run", "--cuda-graphs", "on", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("steps", [WARMUP_STEPS, WARMUP_STEPS + 2])
def test_metrics_say_how_many_steps_ran_from_graphs(tiny, tmp_path, capsys, monkeypatch, steps):
    """A graphed run's first `WARMUP_STEPS` steps run eagerly, so a run that short took no step
    from graphs, and metrics.json (``cuda_graphs`` true, no fallback) and the summary's "CUDA
    graphs" said it had. ``cuda_graphs_steps`` counts the steps captured or replayed, and the
    summary names graphs only when there were some."""
    from increlora_fast.cli.finetune import _print_summary
    from increlora_fast.training import finetune_run
    made = _emulated_graphs(monkeypatch)
    monkeypatch.setattr(finetune_run, "uses_cuda_graphs", lambda s, device=None: True)
    metrics = finetune_run.run_finetune(_settings(tiny, max_steps=steps, pad_to="max_length"),
                                        str(tmp_path / "run"), progress=False)
    assert metrics["cuda_graphs"] is True and metrics["cuda_graphs_fallback"] is None
    assert metrics["cuda_graphs_steps"] == steps - WARMUP_STEPS
    assert bool(made) == (steps > WARMUP_STEPS)
    capsys.readouterr()
    _print_summary(metrics, "out")
    speed = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("speed"))
    assert ("CUDA graphs)" in speed) == (steps > WARMUP_STEPS), speed
    if steps == WARMUP_STEPS:
        assert "no step ran from CUDA graphs" in speed


def test_cuda_graphs_on_without_cuda_is_refused_before_the_data_files_are_hashed(
        tiny, tmp_path, capsys, monkeypatch):
    """The device checks (``--cuda-graphs on``, ``--precision fp16`` without CUDA) came after
    the sha256 of every data file, which takes seconds a gigabyte: now before, on a fresh run
    and on a resume (whose checkpoint's own files are still verified first)."""
    import increlora_fast.training.finetune_run as finetune
    out = tmp_path / "run"
    assert cli(_args(tiny, out, "--save-steps", "3", "--pad-to", "max_length")) == 0
    capsys.readouterr()

    def no_hashing(path):
        raise AssertionError("a data file was hashed before the device was checked")
    monkeypatch.setattr(finetune, "file_sha256", no_hashing)
    for argv in (_args(tiny, tmp_path / "fresh", "--cuda-graphs", "on"),
                 _args(tiny, tmp_path / "half", "--precision", "fp16"),
                 ["--resume", str(out / "checkpoint-3"), "--cuda-graphs", "on", "--output-dir",
                  str(tmp_path / "again"), "--no-progress"]):
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "needs a CUDA device" in err and len(err.splitlines()) == 1, err


def test_compare_refuses_cuda_graphs_on_with_a_peer_before_any_run(tiny, tmp_path, capsys):
    code = cli(_args(tiny, tmp_path / "cmp", "--cuda-graphs", "on", "--compare", "--methods",
                     "increlora,lora", "--seeds", "1", "--lrs", "0.001"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--method increlora only, not lora" in err
    assert not (tmp_path / "cmp" / "increlora").exists()


def test_cuda_graphs_on_pads_to_max_length_when_pad_to_is_left_out(tiny):
    from increlora_fast.training.settings import resolve
    assert resolve(_settings(tiny, cuda_graphs="on"), 64).pad_to == "max_length"
    assert resolve(_settings(tiny, cuda_graphs="auto"), 64).pad_to == "longest"


# ---------------------------------------------------------------- the benchmarks' step

def test_the_benchmarks_increlora_step_is_the_plain_loop_of_the_readme():
    """`compared_methods.increlora_runner` (the memory breakdown, its check and, with autocast
    around it, the model-level benchmark) trains exactly as the README's hand-written loop."""
    from increlora_fast import IncreLoRAConfig, create_optimizer, inject_increlora
    from increlora_fast.benchmarks.memory.compared_methods import increlora_runner
    from increlora_fast.benchmarks.speed.model_presets import BERT_TARGETS, MODEL_PRESETS
    from increlora_fast.controller import IncreLoRAController

    preset = MODEL_PRESETS["tiny-bert"]
    config = IncreLoRAConfig(target_modules=list(BERT_TARGETS), r_max=4, init_r=1,
                             target_rank=2, init_warmup=1, incre_interval=1, top_h=4,
                             modules_to_save=["classifier"])
    torch.manual_seed(0)
    runner = increlora_runner(preset.build(), config, lr=1e-2)
    torch.manual_seed(0)
    model = inject_increlora(preset.build(), config)
    optimizer = create_optimizer(model, config, lr=1e-2)
    controller = IncreLoRAController(model, config)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, preset.vocab_size, (4, 8), generator=gen),
                "attention_mask": torch.ones(4, 8, dtype=torch.long),
                "labels": torch.randint(0, 2, (4,), generator=gen)} for _ in range(6)]
    torch.manual_seed(1)  # the same dropout masks for both
    for step, batch in enumerate(batches):
        runner.forward_backward(step, batch)
        runner.update(step)
    torch.manual_seed(1)
    model.train()
    for step, batch in enumerate(batches):
        loss = model(**batch).loss + controller.regularization_loss()
        loss.backward()
        controller.step(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    ours = dict(runner.run.model.named_parameters())
    assert runner.run.allocation_log() == controller.allocation_log
    assert len(controller.allocation_log) > 0
    assert all(torch.equal(ours[n], p) for n, p in model.named_parameters())


def test_the_step_computes_the_loss_without_passing_labels_to_the_model():
    """Every method's step runs the model without ``labels`` and takes cross_entropy of its
    float32 logits (`forward_with_loss`): the value a sequence classifier's own loss gives, bit
    for bit, without the model's own loss code (DeBERTa-v2's keeps rows through ``nonzero()``,
    a host read that no CUDA graph captures)."""
    from transformers import BertConfig, BertForSequenceClassification
    from increlora_fast.training.step_runner import forward_with_loss
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3)).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(set(kwargs)),
                                    with_kwargs=True)
    batch = {"input_ids": torch.randint(0, 64, (5, 7)),
             "attention_mask": torch.ones(5, 7, dtype=torch.long),
             "labels": torch.tensor([0, 2, 1, 1, 0])}
    out, loss = forward_with_loss(model, batch)
    assert "labels" not in seen[-1] and "labels" in batch
    assert torch.equal(loss, model(**batch).loss)
    weights = torch.tensor([1.0, 2.0, 0.5])
    _, weighted = forward_with_loss(model, batch, weights)
    assert torch.equal(weighted, torch.nn.functional.cross_entropy(
        out.logits, batch["labels"], weight=weights))


def _tiny_bert() -> torch.nn.Module:
    """A one-layer BERT sequence classifier of width 16 over a 64-token vocabulary, 2 labels
    (random weights from the current seed)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def _tiny_bert_run(model: torch.nn.Module):
    """``model`` (a `_tiny_bert`) with IncreLoRA on query and value, a round every 2 steps."""
    from increlora_fast import IncreLoRAConfig
    from increlora_fast.training.increlora_method import IncreLoRARun

    adapters = IncreLoRAConfig(target_modules=["query", "value"], r_max=4, init_r=1,
                               target_rank=2, init_warmup=1, incre_interval=2, top_h=1,
                               modules_to_save=["classifier", "pooler"])
    return IncreLoRARun.from_config(model, adapters, lr=1e-2)


def test_a_probe_that_fails_puts_the_models_buffers_back():
    """The probe before the first capture runs the forward and backward once without effect,
    the model's buffers (a batch norm's running statistics) put back after. When the capture
    refuses the model partway (a host tensor after a batch norm ran, here), they must be put
    back as well: the run then steps eagerly, and its statistics (what evaluation normalizes
    with) must equal a run's that never tried graphs. (The emulator runs a capture's ops; a
    CUDA capture runs none.)"""
    batches = _token_batches(6)
    seed = int(torch.randint(0, 2**31, ()))
    results = {}
    for graphed in (False, True):
        torch.manual_seed(seed)
        model = _tiny_bert()
        model.add_module("head_norm", torch.nn.BatchNorm1d(2))
        model.classifier.register_forward_hook(
            lambda module, args, out: model.head_norm(out) + torch.tensor(0.0))
        run = _tiny_bert_run(model)
        runner = StepRunner(run, grad_clip=1.0, cuda_graphs=graphed,
                            graph_factory=EmulatedPool() if graphed else None)
        losses = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="CUDA graphs: .* cannot be captured")
            for i, batch in enumerate(batches):
                losses.append(float(runner.step(i, batch).task_loss))
                if graphed and i == WARMUP_STEPS:  # the probe has run, and failed
                    assert runner.graphed.fallback is not None
        norm = model.head_norm
        results[graphed] = (losses, _trainable(run), norm.running_mean.clone(),
                            norm.running_var.clone(), int(norm.num_batches_tracked))
    (plain, plain_weights, *plain_stats), (losses, weights, *stats) = \
        results[False], results[True]
    assert losses == plain
    assert all(torch.equal(weights[n], plain_weights[n]) for n in plain_weights)
    assert stats[2] == plain_stats[2] == len(batches)
    assert torch.equal(stats[0], plain_stats[0]) and torch.equal(stats[1], plain_stats[1])


def test_a_clipping_norm_changed_between_replays_reaches_them():
    """The step runner's clipping norm is a number in the captured launches: set between
    steps (after the graphs were captured), the replays must clip with the new one, as eager
    steps do (the graphs are captured anew), not with the one the capture saw."""
    batches = _token_batches(12)
    seed = int(torch.randint(0, 2**31, ()))
    results = {}
    for graphed in (False, True):
        torch.manual_seed(seed)
        run = _tiny_bert_run(_tiny_bert())
        runner = StepRunner(run, grad_clip=1.0, cuda_graphs=graphed,
                            graph_factory=EmulatedPool() if graphed else None)
        losses = []
        for i, batch in enumerate(batches):
            if i == WARMUP_STEPS + 4:
                runner.grad_clip = 1e-3  # far below the gradients' norm: every step clips
            losses.append(float(runner.step(i, batch).task_loss))
        results[graphed] = (losses, _trainable(run), runner)
    (plain, plain_weights, _), (losses, weights, runner) = results[False], results[True]
    assert runner.graphed.replays > 0 and runner.graphed.fallback is None
    assert losses == plain
    assert all(torch.equal(weights[n], plain_weights[n]) for n in plain_weights)


def test_cuda_graphs_given_to_a_new_run_is_refused_not_ignored(tiny, tmp_path):
    """`run_finetune(cuda_graphs=...)` replaces a checkpoint's setting on a resume; a new run
    ignored it silently (and ran with RunSettings.cuda_graphs). Now it is refused before the
    output folder is made."""
    from increlora_fast.training import finetune_run
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"run_finetune\(cuda_graphs='off'\) replaces a "
                                         r"checkpoint's setting on a resume.*RunSettings"):
        finetune_run.run_finetune(_settings(tiny), str(out), cuda_graphs="off")
    assert not out.exists()
