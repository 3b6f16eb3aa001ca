"""The one training step (`StepRunner`), offline on a tiny BERT on the CPU."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest
import torch

from finetune_helpers import cli, tiny_files
from increlora_fast.training.device import Placement
from increlora_fast.training.finetune import build_run
from increlora_fast.training.loop import LoopState, train_loop
from increlora_fast.training.settings import RunSettings
from increlora_fast.training.step_runner import StepRunner

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


# ---------------------------------------------------------------- static inputs

def test_static_inputs_train_bit_for_bit_like_the_plain_path(tiny):
    """Batches (the tiny rows are of one length) through the static buffers give the plain path's losses, token
    counts, ranks and weights exactly; the runner hands the model the same tensors each step."""
    s, _, run, batches = build_run(_settings(tiny))
    plain = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False)
    plain_weights, plain_pattern = _trainable(run), run.rank_pattern()

    s, _, run, batches = build_run(_settings(tiny))
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
    runner = StepRunner(run, cuda_graphs=True)  # implies static inputs
    assert runner.static_inputs
    runner.step(0, batches.train_batch(0))
    shorter = {k: v[:, :5] if v.dim() == 2 else v for k, v in batches.train_batch(1).items()}
    with pytest.raises(ValueError, match="one shape.*--pad-to max_length"):
        runner.step(1, shorter)


def test_the_loop_with_cuda_graphs_asked_runs_eagerly_with_the_same_numbers(tiny):
    """On the CPU the loop's ``cuda_graphs`` path is the eager step over static inputs, so a
    fixed-length run matches the plain one exactly."""
    s, _, run, batches = build_run(_settings(tiny))
    plain = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False)
    s, _, run, batches = build_run(_settings(tiny))
    graphs = train_loop(run, batches, STEPS, s.grad_clip, LoopState(), progress=False,
                        cuda_graphs=True)
    assert graphs.losses == plain.losses and graphs.session_tokens == plain.session_tokens


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
