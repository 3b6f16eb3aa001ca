"""Finetune options combined with ``--cuda-graphs`` on an IncreLoRA run: the graphed run (CPU
emulation of CUDA graphs, `graph_emulator`) trains as the eager run with the same settings, and
replays its steps instead of giving its graphs up, offline on a tiny BERT."""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import pytest
import torch

from finetune_helpers import tiny_files
from graph_emulator import EmulatedPool, kernels_loaded_before_capture
from increlora_fast.layer import IncreLoRALinear
from increlora_fast.training.finetune_run import build_run
from increlora_fast.training.loop import LoopState, train_loop
from increlora_fast.training.settings import RunSettings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=64, dev_rows=16)


def _settings(tiny, **overrides) -> RunSettings:
    values = dict(model=tiny["model"], task=None, train_file=tiny["train"],
                  eval_file=tiny["dev"], batch_size=8, max_seq_len=16, max_steps=12,
                  init_warmup=2, incre_interval=3, pad_to="max_length")
    values.update(overrides)
    return RunSettings(**values)


def _emulated_graphs(monkeypatch) -> list:
    """The step runner's graphs made emulated ones in one shared pool; the list collects them."""
    from increlora_fast.training import step_runner
    made: list = []
    pool = EmulatedPool()

    def factory():
        made.append(pool())
        return made[-1]
    monkeypatch.setattr(step_runner, "CUDAGraphPool", lambda: factory)
    return made


def _trainable(run) -> dict:
    return {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}


def _record_pass_tracking(run) -> List[bool]:
    """Whether each training-mode forward of an adapted layer tracked scores, in order."""
    seen: List[bool] = []
    for module in run.model.modules():
        if isinstance(module, IncreLoRALinear):
            module.register_forward_pre_hook(
                lambda layer, args: seen.append(layer.score_enabled) if layer.training
                else None)
    return seen


@contextlib.contextmanager
def _kernels_loaded_before_capture() -> Iterator[None]:
    """`graph_emulator.kernels_loaded_before_capture`, with libtorch's float32 copy kernel run
    once first. Autograd hands a leaf its first gradient as it is when nothing else holds that
    tensor, and copies it otherwise; the emulator's capture holds every tensor it records, so
    under it the first gradient of a leaf (the head's bias) is copied, which CUDA's capture
    does not do. A run whose eager steps copy no float32 tensor otherwise fails its probe for
    a kernel CUDA would not launch."""
    with kernels_loaded_before_capture():
        torch.zeros(1).copy_(torch.ones(1))
        yield


def _plain_and_graphed(tiny, monkeypatch, **overrides):
    made = _emulated_graphs(monkeypatch)
    s, _, run, batches = build_run(_settings(tiny, **overrides))
    plain = train_loop(run, batches, s.max_steps, s.grad_clip, LoopState(), progress=False)
    plain_weights, plain_ranks = _trainable(run), run.rank_pattern()
    s, _, run, batches = build_run(_settings(tiny, **overrides))
    tracking = _record_pass_tracking(run)
    with _kernels_loaded_before_capture():
        graphed = train_loop(run, batches, s.max_steps, s.grad_clip, LoopState(),
                             progress=False, cuda_graphs=True)
    weights = _trainable(run)
    assert graphed.losses == plain.losses and graphed.session_tokens == plain.session_tokens
    assert run.rank_pattern() == plain_ranks and run.controller.allocation_log
    assert all(torch.equal(weights[n], plain_weights[n]) for n in plain_weights)
    return graphed, made, tracking


@pytest.mark.parametrize("score", ["triplet", "random"])
def test_scores_taken_outside_the_passes_probe_the_passes_their_steps_run(tiny, monkeypatch,
                                                                          score):
    """``--score triplet`` reads ``.grad`` after backward and ``random`` takes no score, so
    their layers never track scores in the passes. The probe of the model's forward and
    backward before the first capture ran them with the layers' tracking on: the exact score's
    kernels, which such a run never loads, so on CUDA its probe failed and the run gave up its
    graphs, blaming the model. Every pass now tracks as the controller has the layers track,
    and the run is replayed, as the eager run."""
    graphed, made, tracking = _plain_and_graphed(tiny, monkeypatch, score=score)
    assert graphed.graph_fallback is None and sum(g.replays for g in made) > 0
    assert tracking and not any(tracking)


@pytest.mark.usefixtures("whole_loop_tiles")
def test_triplet_score_on_the_triton_path_loads_every_kernel_before_its_capture(tiny,
                                                                                monkeypatch):
    """The Triton path of ``--score triplet`` (the one a GPU takes, here under the
    interpreter): the probe launched the exact score's `_score_tiles_kernel`, which no step of
    the run launches before; now no kernel is first launched inside a capture, so the run keeps
    its graphs and trains as the eager run."""
    pytest.importorskip("triton")
    from increlora_fast.kernels.utils import interpreter_active
    if not interpreter_active():
        pytest.skip("the Triton path on CPU needs the interpreter")
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    graphed, made, tracking = _plain_and_graphed(tiny, monkeypatch, score="triplet",
                                                 max_steps=6, init_warmup=1, incre_interval=2)
    assert graphed.graph_fallback is None and sum(g.replays for g in made) > 0
    assert tracking and not any(tracking)
