"""Whole IncreLoRA training steps captured in CUDA graphs and replayed.

Fixed-shape slot buffers are what make this possible: growing a rank flips slot states in place,
so no tensor the step touches changes shape or address. A step (forward, penalty, backward,
clipping, `IncreLoRAController.step`, `IncreLoRAAdamW.step`) is captured once per tracking state
(score tracking on or off: the two differ in the kernels they launch) and replayed on the steps
of that state; the host part of a replayed step (the step counters, the layers' tracking flags
for the next step) is done by `note_replayed_step` of the optimizer and the controller, and the
device copies of the step index that the captured step reads are set before each replay
(`sync_device_step`), so no step number is baked into a graph.

Allocation rounds run eagerly (they read the host and change slot states), and the graphs
survive them: the round updates the slot buffers in place, and the masks that the optimizer and
the penalty cache per slot layout are refreshed in place in the round's own step (the optimizer
step, `IncreLoRAController.refresh_cached_masks`), so a replay after the round reads the new
layout from the tensors it captured. A graph is captured anew only when one of those caches had
to be made as new tensors (`cache_epoch`), and a step runs eagerly when slots changed outside an
eager step (a layer's ``slot_version`` moved: its caches are refreshed there). With
``exact_step_score`` every round still drops the graphs: its dense G buffers are released and
allocated anew around score windows. The first ``warmup`` steps run eagerly too (kernel compilation, lazy state), on a side
stream as torch's CUDA-graph notes ask, and so does the first step of each tracking state: the
two states launch different kernels, and CUDA refuses to load a kernel module while a stream
captures ("operation not permitted when stream is capturing"), so every kernel a graph launches
must have run once before its capture. Each graph owns its private memory pool: its gradients,
activations and outputs are static tensors that every replay rewrites, so the loss it returns
is copied out after each replay.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Iterator, Protocol, Set, Tuple

import torch

# Eager steps before the first capture.
WARMUP_STEPS = 2

StepOutputs = Tuple[torch.Tensor, ...]


class StepGraph(Protocol):
    """What `GraphedSteps` needs of a graph: a capture context and a replay."""

    def capture(self) -> ContextManager[None]: ...

    def replay(self) -> None: ...


class CUDAStepGraph:
    """One `torch.cuda.CUDAGraph` with its own memory pool, captured on a stream of its own."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Capture on a fresh side stream, and give the caller its stream back even when the
        capture fails. `torch.cuda.graph` captures on one side stream shared by every capture,
        and when ending a capture raises (an op the capture refused) it leaves the caller on
        that stream and the allocator still sending the stream's allocations to the failed
        graph's pool; the process then goes on there (gpu-check runs its next parts in the same
        process). With a stream used for this capture only, the stale pool routing concerns a
        stream nothing uses again."""
        previous = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(self.graph, stream=torch.cuda.Stream()):
                yield
        finally:
            torch.cuda.set_stream(previous)

    def replay(self) -> None:
        self.graph.replay()


class GraphedSteps:
    """Runs IncreLoRA training steps eagerly or from CUDA graphs (see the module docstring).

    Args:
        optimizer: the run's `IncreLoRAAdamW`.
        controller: the run's `IncreLoRAController`.
        graph_factory: makes an empty graph (`CUDAStepGraph`; tests pass a CPU emulation).
        warmup: eager steps before the first capture (at least 1: the step state the
            captured step reads must exist before it).
    """

    def __init__(self, optimizer, controller, graph_factory: Callable[[], StepGraph] = CUDAStepGraph,
                 warmup: int = WARMUP_STEPS) -> None:
        self.optimizer = optimizer
        self.controller = controller
        self.graph_factory = graph_factory
        self.warmup = max(1, warmup)
        # tracking state -> (its graph, the outputs it writes, the cache epochs at its capture)
        self._graphs: Dict[bool, Tuple[StepGraph, StepOutputs, tuple]] = {}
        # The layers' slot versions when the last eager step ended (its optimizer step and the
        # round's `refresh_cached_masks` brought every cached mask up to date in place).
        self._versions: tuple = ()
        self._eager_steps = 0
        # Tracking states that have run an eager step (their kernels are loaded).
        self._states_run: Set[bool] = set()
        # Steps captured (each capture also runs its step) and steps replayed from a graph.
        self.captures = 0
        self.replays = 0

    def step(self, step: int, run_step: Callable[[bool], StepOutputs]) -> StepOutputs:
        """Take optimizer step ``step``. ``run_step(zero_grad)`` runs one whole training step on
        the run's static inputs and returns its outputs (device tensors are copied out of the
        graph after a replay; other values must not change between steps); it must read nothing
        on the host outside allocation rounds, and zero the gradients (set to None) at its end
        only when ``zero_grad`` is true. Returns copies of those tensors."""
        tracked = self.controller.is_tracked(step)
        if self._eager_steps < self.warmup or tracked not in self._states_run \
                or self.controller.allocation_due(step) or self._slot_versions() != self._versions:
            # (slots changed since the last eager step, outside a round: the cached masks a
            # replay reads are refreshed by running a step eagerly)
            self._states_run.add(tracked)
            return self._eager(step, run_step)
        epochs = self._cache_epochs()
        entry = self._graphs.get(tracked)
        if entry is not None and entry[2] != epochs:  # it reads caches that were made anew
            entry = None
        self.optimizer.sync_device_step()
        self.controller.sync_device_step(step)
        if entry is None:
            self.optimizer.zero_grad(set_to_none=True)  # the graph's gradients are its own
            graph = self.graph_factory()
            with graph.capture():
                outputs = run_step(False)
            self._graphs[tracked] = (graph, outputs, epochs)
            self.captures += 1
            graph.replay()  # capture records the step; the replay runs it
        else:
            graph, outputs, _ = entry
            graph.replay()
            self.optimizer.note_replayed_step()
            self.controller.note_replayed_step(step)
            self.replays += 1
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in outputs)

    def _eager(self, step: int, run_step: Callable[[bool], StepOutputs]) -> StepOutputs:
        round_ = self.controller.allocation_due(step)
        # Gradients of a captured step are static tensors: an eager step starts from none.
        self.optimizer.zero_grad(set_to_none=True)
        with self._side_stream():
            outputs = run_step(True)
        self._eager_steps += 1
        self._versions = self._slot_versions()
        if round_ and getattr(self.controller, "exact_step_score", False):
            # Its dense G buffers are released and allocated anew around score windows.
            self._graphs.clear()
        return outputs

    def _slot_versions(self) -> tuple:
        return tuple(layer.slot_version for layer in self.controller.layers)

    def _cache_epochs(self) -> tuple:
        """How many cached masks optimizer and controller made as new tensors so far: a graph
        captured at other counts reads tensors the step no longer uses."""
        return (getattr(self.optimizer, "cache_epoch", 0),
                getattr(self.controller, "cache_epoch", 0))

    def _side_stream(self) -> ContextManager[None]:
        """Warm-up steps run on a side stream before the first capture (torch's CUDA-graph
        notes); later eager steps on the current stream."""
        if self._graphs or self.captures or not torch.cuda.is_available() \
                or self.graph_factory is not CUDAStepGraph:
            return contextlib.nullcontext()
        return on_side_stream()


@contextlib.contextmanager
def on_side_stream() -> Iterator[None]:
    """Run the block on a fresh CUDA side stream, ordered after and before the current stream's
    work: where warm-up before a capture runs (torch's CUDA-graph notes)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)
