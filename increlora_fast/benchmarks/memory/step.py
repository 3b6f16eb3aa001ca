"""The memory one training step needs on top of what stays allocated, measured on a real model
(`measure_step`) or fitted from small ones and scaled up (`estimate_step`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from ..memory_probe import TensorPeak, release_memory
from .compared_methods import AdapterSetting, MemoryMethod
from .model_spec import ModelSpec


@dataclass
class StepMemory:
    """Bytes of one training step (the second: the optimizer state exists by then).

    ``static``: live when the step begins (weights, adapters, buffers, optimizer state, and
    what the previous step's loss still holds);
    ``forward_backward``: peak of forward and backward above ``static`` (the gradients
    included); ``optimizer``: peak of the update (IncreLoRA's controller, the optimizer step,
    AdaLoRA's allocator) above ``static`` (gradients included); ``kind``: the probe that counted
    them.
    """

    static: int
    forward_backward: int
    optimizer: int
    kind: str


def measure_step(spec: ModelSpec, method: MemoryMethod, setting: AdapterSetting,
                 batch_size: int, seq_len: int, device: torch.device,
                 n_layers: Optional[int] = None) -> StepMemory:
    """Build the model (random weights) and the method inside a `TensorPeak`, take one step to
    create the optimizer state, then measure the next one phase by phase."""
    device = torch.device(device)
    batch = spec.batch(batch_size, seq_len, device)
    torch.manual_seed(0)
    with TensorPeak(device) as probe:
        runner = method.build(spec.build(device, n_layers), setting)
        runner.forward_backward(batch, 0)
        runner.update(0)
        static = probe.live_bytes()
        probe.reset_peak()
        runner.forward_backward(batch, 1)
        forward_backward = probe.peak_so_far() - static
        probe.reset_peak()
        runner.update(1)
        optimizer = probe.peak_so_far() - static
        del runner
    if device.type == "cuda":
        release_memory(device)  # a model in a reference cycle would hold device memory
    return StepMemory(static, forward_backward, optimizer, probe.kind)


def _fit(xs: List[int], ys: List[float]) -> Tuple[float, float, float]:
    """(c, a, b) of c + a x + b x^2 through three points; with a negative curvature (no
    quadratic growth seen) the line through the last two points."""
    a_mat = torch.tensor([[1.0, x, x * x] for x in xs], dtype=torch.float64)
    c, a, b = torch.linalg.solve(a_mat, torch.tensor(ys, dtype=torch.float64)).tolist()
    if b < 0:
        slope = (ys[2] - ys[1]) / (xs[2] - xs[1])
        return ys[2] - slope * xs[2], slope, 0.0
    return c, a, b


@dataclass
class StepEstimate:
    """Activations and optimizer temporaries scaled from small runs; ``how`` says from which."""

    activations: int
    optimizer: int
    how: str


def estimate_step(spec: ModelSpec, method: MemoryMethod, setting: AdapterSetting,
                  exact: Callable[[Optional[int]], Tuple[int, int]], batch_size: int,
                  seq_len: int, device: torch.device, small_seq: int) -> StepEstimate:
    """Measure one step at batch 1, sequence lengths ``small_seq`` x (1, 2, 4) and 1 and 2
    layers; fit each depth's activations as c + a S + b S^2 (``c``: what does not grow with the
    tokens), take the per-layer growth from the difference of the depths, and scale to the
    requested depth, batch (the S terms grow with it) and sequence length. ``exact(n_layers)``
    gives the exact (gradient, static) bytes of a model of that depth: the gradients are taken
    out of each peak, and what is live beyond the exact static part (what the previous step's
    loss still holds) put in, as `measure_step`'s callers do. The update phase (optimizer
    temporaries) is fitted and scaled the same way."""
    seqs = [small_seq, 2 * small_seq, 4 * small_seq]
    depths = [1, 2] if spec.n_layers else [None]
    fits: List[Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = []
    for depth in depths:
        runs = [measure_step(spec, method, setting, 1, s, device, depth) for s in seqs]
        grads, static = exact(depth)
        carried = [max(0, r.static - static) for r in runs]
        fits.append((_fit(seqs, [r.forward_backward - grads + k for r, k in zip(runs, carried)]),
                     _fit(seqs, [r.optimizer - grads + k for r, k in zip(runs, carried)])))
    n = spec.n_layers

    def scale(phase: int) -> float:
        one = fits[0][phase]
        if n:
            per_layer = [y - x for x, y in zip(one, fits[1][phase])]
            one = [x + (n - 1) * p for x, p in zip(one, per_layer)]
        c, a, b = one
        return c + batch_size * (a * seq_len + b * seq_len ** 2)
    scaled = f"1 and 2 layers scaled to {n}" if n else "the full depth"
    how = (f"measured at batch 1, seq {'/'.join(map(str, seqs))}, {scaled}; fitted "
           "c + a*S + b*S^2 per depth, S terms times the batch")
    return StepEstimate(max(0, round(scale(0))), max(0, round(scale(1))), how)
