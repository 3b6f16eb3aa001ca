"""Host work of a whole eager training step, measured without a GPU: the Triton launches are
stubbed.

What one eager training step (forward, backward, the controller, the optimizer, gradients set to
None) costs the host when no Triton kernel runs: the frozen floor (LayerNorms and head trained,
torch AdamW), peft LoRA (torch AdamW) and ours on the Triton path after the budget (untracked
steps: every adapted linear and the optimizer on their Triton kernels, the optimizer's forced
onto CPU tensors by `fused_optimizer_on_cpu`, each
`increlora_fast.kernels.utils.launch` replaced by the counting stub of `host_overhead`). The
model is a structure preset at toy width (default ``minilm-l6-narrow``: MiniLM-L6's 6 layers and
36 adapted linears, 32 wide), so the CPU compute of the aten ops is small beside the host work
they all pay; ``aten_ops_per_step`` counts those ops (views and bare allocations left out: each
of the others is a kernel launch on a GPU) and ``launches_per_step`` the stubbed Triton launches
a GPU step adds, each with Triton's own launcher, which is not in these times. The runs warm up
with real kernels under the Triton interpreter until IncreLoRA's budget is reached; the timed
steps of the methods are interleaved (median of ``repeats`` each). The stubbed steps compute
garbage from uninitialised buffers: only the host time means anything.

``python -m increlora_fast.benchmarks.speed.step_host --json PATH`` writes the records; without
`host_overhead.SUBPROCESS_ENV` (``TRITON_INTERPRET=1``, ``INCRELORA_BACKEND=triton``, ...) in its
environment it runs itself again in a fresh process with it (the interpreter must be on before
the kernels are imported).
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .host_overhead import STUBBED_NOTE, SUBPROCESS_ENV, python_calls, require_launches
from .point_cli import parse_point_args, write_records
from .replaced import replaced

LEVEL = "step_host"
METHODS = ("floor", "peft-lora", "increlora-triton")
# aten ops that launch nothing on a GPU: bare allocations (views are told by their schema)
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
              "lift_fresh", "detach", "alias", "_to_copy_noop"}


class _AtenOps(TorchDispatchMode):
    """Counts the aten ops that would launch a kernel on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in _NO_LAUNCH:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fused_optimizer_on_cpu() -> Iterator[None]:
    """Within the block `IncreLoRAAdamW` steps CPU tensors with its fused kernel too, as it
    steps CUDA tensors (on CPU it otherwise takes the stacked torch path): the optimizer a GPU
    step runs."""
    from ... import optimizer

    with replaced(optimizer, "_fused_kernel_applies", lambda p: True):
        yield


def measure(preset_name: str = "minilm-l6-narrow", batch_size: int = 2, seq_len: int = 8,
            warmup: int = 3, repeats: int = 50) -> List[dict]:
    """One record per method of `METHODS`: median and minimum µs of host time per eager step of
    ``preset_name`` at ``batch_size`` x ``seq_len`` with the Triton launches stubbed, and per
    step the Triton launches, the aten ops and the Python calls. Needs the Triton interpreter
    on (`host_overhead.SUBPROCESS_ENV`); ``warmup`` real steps after IncreLoRA's budget."""
    from ...kernels.utils import interpreter_active
    from ..records import environment
    from .model_presets import checked_point
    from .plans import ModelPlan

    checked_point("step host time", preset_name, {
        "batch_size": (batch_size, 1), "seq_len": (seq_len, 1), "warmup": (warmup, 1),
        "repeats": (repeats, 1)})
    if not interpreter_active() or os.environ.get("INCRELORA_BACKEND") != "triton":
        raise RuntimeError("step host time: run with TRITON_INTERPRET=1 and "
                           "INCRELORA_BACKEND=triton set before increlora_fast.kernels is "
                           "imported (`main` starts such a process)")
    torch.set_num_threads(1)
    env = environment(torch.device("cpu"), LEVEL)
    env.update(python=platform.python_version(), load_start=os.getloadavg()[0])
    # 6 planned steps: the IncreLoRA schedule grants the whole budget in its first few rounds
    plan = ModelPlan(models=[preset_name], batch_size=batch_size, seq_len=seq_len, steps=6,
                     warmup_steps=0, dtypes=["fp32"], r_max=8, init_r=1, target_rank=2)
    cpu = torch.device("cpu")
    with fused_optimizer_on_cpu():
        return _measure(preset_name, plan, cpu, env, warmup, repeats)


def _measure(preset_name: str, plan, cpu: torch.device, env: dict, warmup: int,
             repeats: int) -> List[dict]:
    from ...kernels.launches import launch_counts, reset_launch_counts, total_launches
    from .host_overhead import stubbed_launches
    from .model_level import prepare_run, step_past_allocation

    runs, steps = {}, {}
    for method in METHODS:
        run, batches = prepare_run(method, preset_name, plan, cpu)
        # real kernels (interpreter)
        runs[method], steps[method] = (run, batches), step_past_allocation(run, batches, warmup)
    times: Dict[str, List[float]] = {m: [] for m in METHODS}
    per_step: Dict[str, Dict[str, int]] = {}
    with stubbed_launches():
        for _ in range(repeats):
            for method, (run, batches) in runs.items():
                i = steps[method]
                start = time.perf_counter()
                run.step(i, batches[i % len(batches)])
                times[method].append((time.perf_counter() - start) * 1e6)
                steps[method] = i + 1
        for method, (run, batches) in runs.items():
            i = steps[method]
            reset_launch_counts()
            with _AtenOps() as ops:
                run.step(i, batches[i % len(batches)])
            if method == "increlora-triton":
                require_launches(method, launch_counts())
            launches = total_launches()
            calls = python_calls(lambda: run.step(i + 1, batches[(i + 1) % len(batches)]))
            per_step[method] = dict(launches_per_step=launches, aten_ops_per_step=ops.count,
                                    python_calls_per_step=calls)
    if runs["increlora-triton"][0].phase(steps["increlora-triton"]) != "final":
        raise RuntimeError("step host time: IncreLoRA's timed steps were not all after the "
                           "budget")
    env["load_end"] = os.getloadavg()[0]
    medians = {m: statistics.median(t) for m, t in times.items()}
    return [dict(env, level=LEVEL, status="ok", method=method, model=preset_name,
                 batch=f"{plan.batch_size}x{plan.seq_len}", median_us=medians[method],
                 min_us=min(times[method]), repeats=repeats,
                 x_peft_lora=medians[method] / medians["peft-lora"], **per_step[method],
                 threads=torch.get_num_threads(), note=STUBBED_NOTE)
            for method in METHODS]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m increlora_fast.benchmarks.speed.step_host --json PATH``."""
    args = parse_point_args(argv, "python -m increlora_fast.benchmarks.speed.step_host",
                            __doc__.split("\n\n")[0], "minilm-l6-narrow", 2, 8, 50)
    if args is None:
        return 2
    if any(os.environ.get(k) != v for k, v in SUBPROCESS_ENV.items()):
        # the interpreter must be on before the kernels are imported: a fresh process
        root = str(Path(__file__).resolve().parents[3])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        module = __spec__.name if __spec__ is not None else __name__
        cmd = [sys.executable, "-m", module, *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=path,
                                            **SUBPROCESS_ENV)).returncode
    records = write_records(args.json, lambda: measure(args.model, args.batch, args.seq_len,
                                                       repeats=args.repeats))
    if records is None:
        return 2
    for r in records:
        print(f"{r['method']:17s} {r['median_us']:8.1f} us per step (x{r['x_peft_lora']:.2f} "
              f"peft-lora), {r['launches_per_step']} Triton launches, {r['aten_ops_per_step']} "
              f"aten ops, {r['python_calls_per_step']} Python calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
