"""Model level under pytest-benchmark: one whole training step per method.

Each round is the next step of one training run (forward, backward, controller or AdaLoRA
update, optimizer), so the rounds go through the allocation phase into the final one.
"""
from __future__ import annotations

import itertools

import pytest

from increlora_fast.benchmarks.speed.layer_methods import MethodEnv
from increlora_fast.benchmarks.speed.model_level import (COMPILE_CPU_NOTE, MODEL_METHODS,
                                                         graphs_status, method_env, prepare_run)
from increlora_fast.benchmarks.speed.plans import ModelPlan
from increlora_fast.benchmarks.speed.timing import PeakMemory

from conftest import DEVICE, synchronize

if DEVICE.type == "cuda":
    MODEL, PLAN = "deberta-v3-base", ModelPlan(models=["deberta-v3-base"], batch_size=32,
                                               seq_len=128, steps=30, warmup_steps=3,
                                               dtypes=["fp32"])
else:
    MODEL, PLAN = "minilm-l6", ModelPlan(models=["minilm-l6"], batch_size=4, seq_len=64,
                                         steps=12, warmup_steps=2, dtypes=["fp32"])


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_training_step(benchmark, method: str) -> None:
    if method == "increlora-triton" and DEVICE.type != "cuda":
        pytest.skip("Triton methods need CUDA")
    if method == "peft-lora-compiled" and DEVICE.type != "cuda":
        pytest.skip(COMPILE_CPU_NOTE)
    graphs_ok, graphs_note = graphs_status(DEVICE)
    if method == "increlora-graphs" and not graphs_ok:
        pytest.skip(graphs_note)
    with MethodEnv(method_env(method)):
        peak = PeakMemory(DEVICE)
        peak.start()
        run, batches = prepare_run(method, MODEL, PLAN, DEVICE)
        steps = itertools.count()

        def step() -> None:
            i = next(steps)
            run.step(i, batches[i % len(batches)])
            synchronize()
        benchmark.pedantic(step, rounds=PLAN.steps - PLAN.warmup_steps,
                           warmup_rounds=PLAN.warmup_steps)
        benchmark.extra_info.update(peak_mem_mb=peak.peak_mb(), mem_kind=peak.kind,
                                    model=MODEL, batch=PLAN.batch_size, seq=PLAN.seq_len,
                                    settings=run.settings, device=str(DEVICE))
    assert next(steps) == PLAN.steps
