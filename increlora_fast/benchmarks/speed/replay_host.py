"""Host work of a training step replayed from CUDA graphs, measured without a GPU.

`StepRunner` with ``cuda_graphs`` on runs every step but the first few as the replay of its two
graphs plus a little host work: the batch copied into the static inputs, the step indices the
graphs read filled in (`sync_device_step`), the host side of the step (`note_replayed_step` of
optimizer and controller: counters, the layers' tracking flags) and the loss and token count
copied out; an allocation round adds its own host work between the two replays, which this
module leaves out (no round falls in the timed steps). This module times that host work on CPU with a graph
stand-in whose replay does nothing (`NoReplayGraph`; its capture runs the step's ops once, as
they make the step's outputs), and counts the device ops it issues besides the replay and its
host reads of tensors. ``cudaGraphLaunch`` itself (a few µs per graph on a GPU) is not included.

At the main job's shape (MiniLM-L6, batch 32 x 64, the issue-27 target of 60,000 tokens/s means
34 ms per step) this says how much of a graphed step the host needs at the least; the GPU time
of the replay is for ``gpu-check``'s ``increlora-graphs`` rows.

``python -m increlora_fast.benchmarks.speed.replay_host --json PATH`` writes one record.
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .point_cli import parse_point_args, write_records

LEVEL = "replay_host"


class NoReplayGraph:
    """The capture/replay interface of `training.cuda_graphs.CUDAStepGraph` with a replay that
    does nothing but count: the host work around a replay, without the replay."""

    def __init__(self) -> None:
        self.replays = 0

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        yield

    def replay(self) -> None:
        self.replays += 1


class _DeviceOps(TorchDispatchMode):
    """Collects the aten ops run inside it (each one a kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def replayed_step_device_ops(runner, step: int, batch: Dict[str, torch.Tensor]) -> List[str]:
    """The aten ops one ``runner.step(step, batch)`` runs; on a replayed step with a
    `NoReplayGraph`, the device ops a GPU step issues besides its graph launch."""
    with _DeviceOps() as ops:
        runner.step(step, batch)
    return ops.ops


def measure(preset_name: str = "minilm-l6", batch_size: int = 32, seq_len: int = 64,
            warmup: int = 6, repeats: int = 200) -> dict:
    """One record: median and minimum µs of host time per replayed step of ``preset_name`` at
    ``batch_size`` x ``seq_len`` (random weights, IncreLoRA as `finetune` builds it, no round
    due in the timed steps), the device ops per replayed step and their names. ``warmup``
    steps (at least 4: the eager steps and both captures) run first, untimed."""
    from ...config import IncreLoRAConfig
    from ...training.device import Placement
    from ...training.increlora_method import IncreLoRARun
    from ...training.step_runner import StepRunner
    from .model_level import random_batches
    from .model_presets import checked_point

    preset = checked_point("replay host time", preset_name, {
        "batch_size": (batch_size, 1), "seq_len": (seq_len, 1), "warmup": (warmup, 4),
        "repeats": (repeats, 1)})
    torch.manual_seed(0)
    model = preset.build(torch.device("cpu")).train()
    total = warmup + repeats + 1
    # Rounds only after the timed steps: every timed step is a replay.
    config = IncreLoRAConfig(target_modules=list(preset.targets), r_max=8, init_r=1,
                             target_rank=2, init_warmup=total, incre_interval=total,
                             modules_to_save=list(preset.modules_to_save),
                             total_step=2 * total)
    method = IncreLoRARun.from_config(model, config, lr=1e-3, weight_decay=0.01)
    runner = StepRunner(method, Placement(torch.device("cpu"), "fp32"), grad_clip=1.0,
                        cuda_graphs=True, graph_factory=NoReplayGraph)
    batches = random_batches(preset, batch_size, seq_len, torch.device("cpu"))
    for i in range(warmup):
        runner.step(i, batches[i % 4])
    before = runner.graphed.replays
    times = []
    for i in range(warmup, warmup + repeats):
        start = time.perf_counter()
        runner.step(i, batches[i % 4])
        times.append((time.perf_counter() - start) * 1e6)
    replays = runner.graphed.replays - before
    if replays != repeats:
        raise RuntimeError(f"replay host time: {repeats - replays} of {repeats} timed steps "
                           "were not replays")
    ops = replayed_step_device_ops(runner, warmup + repeats, batches[0])
    return {"level": LEVEL, "status": "ok", "model": preset_name,
            "batch": f"{batch_size}x{seq_len}", "n_targets": preset.n_targets,
            "median_us": statistics.median(times), "min_us": min(times), "repeats": repeats,
            "device_ops_per_step": len(ops), "device_ops": sorted(set(ops)),
            "device": "cpu", "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
            "note": "graph replay stubbed (NoReplayGraph): host work per replayed step only"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m increlora_fast.benchmarks.speed.replay_host --json PATH``."""
    args = parse_point_args(argv, "python -m increlora_fast.benchmarks.speed.replay_host",
                            __doc__.split("\n\n")[0], "minilm-l6", 32, 64, 200)
    if args is None:
        return 2
    records = write_records(args.json, lambda: [measure(args.model, args.batch, args.seq_len,
                                                        repeats=args.repeats)])
    if records is None:
        return 2
    record = records[0]
    print(f"{record['model']} {record['batch']}: {record['median_us']:.1f} us per replayed step "
          f"(min {record['min_us']:.1f}), {record['device_ops_per_step']} device ops besides "
          "the replay")
    return 0


if __name__ == "__main__":
    sys.exit(main())
