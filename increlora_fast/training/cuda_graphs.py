"""Whole IncreLoRA training steps captured in CUDA graphs and replayed.

Fixed-shape slot buffers are what make this possible: growing a rank flips slot states in place,
so no tensor the step touches changes shape or address. A step (forward, penalty, backward,
clipping, `IncreLoRAController.step`, `IncreLoRAAdamW.step`) is captured once per tracking state
(score tracking on or off: the two differ in the kernels they launch) and replayed on the steps
of that state, allocation rounds included; the host part of a replayed step (the step
counters, the layers' tracking flags for the next step) is done by `note_replayed_step` of the
optimizer and the controller, and the device copies of the step index that the captured step
reads are set before each replay (`sync_device_step`), so no step number is baked into a graph.

A step is captured as two graphs: its first half (forward, penalty, backward, clipping, the
controller's scores) and its second (the optimizer step). An allocation round is replayed as the
first graph, the round on the host between them (`IncreLoRAController.finish_replayed_round`
reads the scores and changes slot states in place; `IncreLoRAAdamW.prepare_replay` restarts the
fresh slots), then the second graph. The masks that the optimizer and the penalty cache per slot
layout are refreshed in place (`device_scalar.refresh_in_place`), so the replays after a round
read the new layout from the tensors they captured: each tracking state is captured once, at a
round or not (at a round the controller's ``defer_round`` keeps the round out of the first
capture, and the round runs on the host between the halves, as in a replay). A graph pair is
captured anew only when a cache had to be made as new tensors (`cache_epoch`), and a step runs
eagerly when slots changed outside a step of this runner (a layer's ``slot_version`` moved: the
eager step refreshes the caches). The optimizer's learning rates are device tensors set before
each replay (`IncreLoRAAdamW.sync_device_step`: a scheduler's or the user's change reaches the
replays); a change of its other settings (weight decay, betas, eps: numbers in the captured
launches, `IncreLoRAAdamW.captured_hyperparameters`), of the controller's config (the penalty's
weight) or of the step runner's (its clipping norm, loss weights and GradScaler factors) runs
the step eagerly and drops the graphs, captured anew with the new values. With ``exact_step_score`` rounds run eagerly and drop the
graphs: its dense G buffers are released and allocated anew around score windows. The first
``warmup`` steps run eagerly too (kernel compilation, lazy state), on a side stream as torch's
CUDA-graph notes ask, and so does the first step of each tracking state: the
two states launch different kernels, and CUDA refuses to load a kernel module while a stream
captures ("operation not permitted when stream is capturing"), so every kernel a graph launches
must have run once before its capture. Where the runner passes a ``preload`` (the step
runner does), the other state's kernels are loaded by one forward and backward without effect
after the first eager step (in a tracked state followed by the controller's score update,
undone: `IncreLoRAController.load_update_kernels`), and that state's first step is captured
directly. On CUDA every step runs with the parameters' device current.

The model is the user's code, and some models do on every forward what a capture refuses
(copy host data to the device, as DeBERTa-v2/v3's relative positions do unless the step runner
caches them, `static_positions`; read a tensor on the host). Before the run's first capture,
the runner's ``preload`` is captured once into a graph that is never replayed
(`GraphedSteps._probe`, without effect on the run): when that fails, the run warns and steps
eagerly from then on
(``GraphedSteps.fallback`` says why; `finetune` records it in ``metrics.json`` as
``cuda_graphs_fallback``), so ``--cuda-graphs`` never stops a run that trains eagerly.

A run's graphs share one memory pool and one capture stream (`CUDAGraphPool`; the caching
allocator reuses a freed block only on the stream it was allocated on): a graph's gradients,
activations and outputs are static tensors that every replay rewrites, and with one pool the
tracked and the untracked step reuse the same memory for their activations instead of each
holding its own (the pool holds the largest step's, not their sum). Sharing is safe because
nothing a graph allocated is read across another graph's replay: the two graphs of a step
always replay back to back, the loss and token count are copied out after them, the gradients
and GradScaler overflow flags the first graph leaves are read by the second (and at a round by
the host) before any other graph replays, the graphs' outputs (the overflow flags among them)
and gradients stay referenced as long as the graphs are, so no later capture is given their
memory, and state that outlives a step (optimizer moments, scores, cached masks, workspaces) is
made by the eager steps before the captures, outside the pool. `tests/graph_emulator.py` checks
this: its pool overwrites what later graphs allocated at every replay of an earlier one.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import (Callable, ContextManager, Dict, Iterator, List, Optional, Protocol, Sequence,
                    Set, Tuple)

import torch

# Eager steps before the first capture.
WARMUP_STEPS = 2
# What a graphed run's reported peak memory adds to the allocator's tensor peak: its graph
# pools' memory after the run (`CUDAGraphPool.reserved_bytes`). The sum bounds from above
# what the run held at once: the tensor peak may come before the pools grew, and it may count
# the pools' live tensors again.
GRAPH_POOL_KIND = " + the CUDA graphs' memory pool (an upper bound: the two need not coincide)"

StepOutputs = Tuple[torch.Tensor, ...]


class StepGraph(Protocol):
    """What `GraphedSteps` needs of a graph: a capture context and a replay."""

    def capture(self) -> ContextManager[None]: ...

    def replay(self) -> None: ...


class CUDAStepGraph:
    """One `torch.cuda.CUDAGraph`. Alone, it is captured on a fresh side stream into a private
    memory pool; made by a `CUDAGraphPool`, on that pool's stream into its memory."""

    def __init__(self, pool: Optional["CUDAGraphPool"] = None) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Capture, and give the caller its stream back even when the capture fails:
        `torch.cuda.graph` captures on a side stream, and when ending a capture raises (an op
        the capture refused) it leaves the caller on that stream; the process then goes on
        (gpu-check runs its next parts in the same process). A failed capture's memory pool is
        never released by torch, so a `CUDAGraphPool` takes a new one after it
        (`CUDAGraphPool.capture_failed`)."""
        previous = torch.cuda.current_stream()
        if self.pool is None:
            handle, stream = None, torch.cuda.Stream()
        else:
            handle, stream = self.pool.target(self)
        try:
            with torch.cuda.graph(self.graph, pool=handle, stream=stream):
                yield
        except BaseException:
            if self.pool is not None:
                self.pool.capture_failed()
            raise
        finally:
            torch.cuda.set_stream(previous)

    def replay(self) -> None:
        self.graph.replay()


class CUDAGraphPool:
    """Makes `CUDAStepGraph`s (call it) that share one memory pool and one capture stream: the
    caching allocator reuses a freed block only on the stream it was allocated on, so graphs
    captured on streams of their own would share nothing. Graphs of one pool must not be
    replayed concurrently, and none may read memory another graph of the pool allocated after
    that graph's replay (the module docstring says why `GraphedSteps` does not).

    The pool keeps every graph captured into it alive for as long as it lives (a run), also
    those `GraphedSteps` dropped: torch refuses to capture into a pool whose graphs are all
    gone while its tensors live on (its use count fell to 0), and newer torch releases frees the
    capture stream's cuBLAS workspace when a graph captured on it is destroyed, which graphs
    still alive on that stream use (pytorch issue 193402). A dropped graph is never replayed
    again, so its memory, free in the pool, serves later captures. After a failed capture a
    new pool is taken."""

    def __init__(self) -> None:
        self.handles: List[tuple] = []  # every memory pool taken, the current last
        self._stream: Optional["torch.cuda.Stream"] = None
        self._graphs: List[CUDAStepGraph] = []  # every graph captured, kept alive
        self._renew = True

    def __call__(self) -> CUDAStepGraph:
        return CUDAStepGraph(self)

    def target(self, graph: CUDAStepGraph) -> Tuple[tuple, "torch.cuda.Stream"]:
        """The memory pool and stream ``graph`` is captured into."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        if self._renew:
            self.handles.append(torch.cuda.graph_pool_handle())
            self._renew = False
        self._graphs.append(graph)
        return self.handles[-1], self._stream

    def capture_failed(self) -> None:
        """Take a new pool at the next capture (see `CUDAStepGraph.capture`)."""
        self._renew = True

    def reserved_bytes(self) -> int:
        """Device bytes the pools this run's graphs were captured into hold, from the
        allocator's segments of those pools (`memory_snapshot`): the graphs' activations and
        temporaries, reused at every replay, which the allocator's tensor count
        (``torch.cuda.max_memory_allocated``) leaves out between replays, and their live
        tensors (gradients, outputs)."""
        ids = {tuple(h) for h in self.handles}
        if not ids:
            return 0
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) in ids)


class GraphedSteps:
    """Runs IncreLoRA training steps eagerly or from CUDA graphs (see the module docstring).

    Args:
        optimizer: the run's `IncreLoRAAdamW`.
        controller: the run's `IncreLoRAController`.
        graph_factory: makes an empty graph (default: a `CUDAGraphPool` of this run's own;
            tests pass a CPU emulation).
        warmup: eager steps before the first capture (at least 1: the step state the
            captured step reads must exist before it).
        settings: the caller's own settings that its captured step holds as numbers (the step
            runner's clipping norm, its loss weights, its GradScaler's factors); a change
            between steps makes the graphs be captured anew, as one of the optimizer's does.
    """

    def __init__(self, optimizer, controller,
                 graph_factory: Optional[Callable[[], StepGraph]] = None,
                 warmup: int = WARMUP_STEPS,
                 settings: Optional[Callable[[], tuple]] = None) -> None:
        self.optimizer = optimizer
        self.controller = controller
        self._settings = settings or tuple
        self.graph_factory = graph_factory or CUDAGraphPool()
        self._cuda = isinstance(self.graph_factory, CUDAGraphPool) \
            or self.graph_factory is CUDAStepGraph
        self.warmup = max(1, warmup)
        # tracking state -> (the graphs of its two halves, the outputs the first writes, the
        # cache epochs at their capture)
        self._graphs: Dict[bool, Tuple[StepGraph, StepGraph, StepOutputs, tuple]] = {}
        # The layers' slot versions when the last eager step ended (its optimizer step and the
        # round's `refresh_cached_masks` brought every cached mask up to date in place).
        self._versions: tuple = ()
        # The optimizer's `captured_hyperparameters` at the last eager step (None: none yet).
        self._hyper: Optional[tuple] = None
        # tracking state -> (parameter, the gradient its first graph writes) of each parameter
        self._grads: Dict[bool, List[Tuple[torch.Tensor, Optional[torch.Tensor]]]] = {}
        self._eager_steps = 0
        # Tracking states that have run an eager step (their kernels are loaded).
        self._states_run: Set[bool] = set()
        # The parameters' CUDA device index (-1: none), found at the first step on CUDA.
        self._device_index: Optional[int] = None
        # Steps captured (each capture also runs its step) and steps replayed from a graph.
        self.captures = 0
        self.replays = 0
        # Why the run gave up its graphs and steps eagerly (`_probe`: the model's forward or
        # backward cannot be captured), or None.
        self.fallback: Optional[str] = None

    def step(self, step: int, first: Callable[[], StepOutputs],
             second: Callable[..., None],
             preload: Optional[Callable[..., None]] = None) -> StepOutputs:
        """Take optimizer step ``step`` on the run's static inputs, in two halves: ``first()``
        runs forward, backward, clipping and the controller's step and returns the step's
        outputs (device tensors are copied out of the graph after a replay; other values must
        not change between steps); ``second(zero_grad)`` runs the optimizer step and zeroes the
        gradients (set to None) only when ``zero_grad`` is true; when it runs eagerly after a
        replayed first half (a round whose caches were made anew) it is called as
        ``second(False, outputs)`` with the outputs the first half's capture returned, to
        restore host state that a replay does not set. Neither may read the host
        outside allocation rounds. Each tracking state captures both halves once, in two graphs;
        an allocation round is replayed as the first graph, the round on the host
        (`IncreLoRAController.finish_replayed_round`, `IncreLoRAAdamW.prepare_replay`) and the
        second graph. ``preload(capture=None)`` (optional): forward and backward of the static
        inputs with no other effect (`_preload` keeps it so), inside the context ``capture``
        when one is given; given, the other tracking state's kernels are loaded by it after the
        first eager step, and that state's first step is captured instead of run eagerly, and
        before the run's first capture `_probe` captures it once: a model whose forward or
        backward cannot be captured makes the run step eagerly from then on, with one warning
        (``fallback``). Returns copies of the outputs.

        On CUDA the step runs with the parameters' device current (`_on_params_device`)."""
        with self._on_params_device():
            return self._step(step, first, second, preload)

    def _on_params_device(self) -> ContextManager[None]:
        """With CUDA graphs, the parameters' device made current: the capture and side streams
        are made on the current device, and a capture records only the work queued on its
        stream, so a run on ``cuda:1`` while ``cuda:0`` is current (``--device cuda:1`` without
        `torch.cuda.set_device`) would otherwise capture graphs that replay nothing."""
        if self._device_index is None and self._cuda:
            self._device_index = next((p.device.index for p in self._params()
                                       if p.device.type == "cuda"), -1)
        if self._device_index is None or self._device_index < 0:
            return contextlib.nullcontext()
        return torch.cuda.device(self._device_index)

    def _step(self, step: int, first: Callable[[], StepOutputs], second: Callable[..., None],
              preload: Optional[Callable[..., None]]) -> StepOutputs:
        if self.fallback is not None:
            return self._eager(step, first, second)
        tracked = self.controller.is_tracked(step)
        round_ = self.controller.allocation_due(step)
        epochs = self._cache_epochs()
        hyper = self._hyperparameters()
        if hyper != self._hyper:  # numbers in the graphs' launches: captured anew after
            self._graphs.clear()  # an eager step with the new ones (its kernels loaded)
        entry = self._graphs.get(tracked)
        if entry is not None and entry[3] != epochs:  # it reads caches that were made anew
            entry = None
        if self._eager_steps < self.warmup or tracked not in self._states_run \
                or self._slot_versions() != self._versions or hyper != self._hyper \
                or (round_ and self._exact_step_score()):
            # (slots changed since the last eager step outside a round: running a step eagerly
            # refreshes the cached masks a replay reads)
            self._states_run.add(tracked)
            outputs = self._eager(step, first, second)
            if preload is not None and (not tracked) not in self._states_run \
                    and not self._exact_step_score() and self._tracking_possible():
                self._preload(not tracked, preload)
            return outputs
        if entry is None and self.captures == 0 and preload is not None \
                and not self._probe(tracked, preload):
            return self._eager(step, first, second)
        self.optimizer.sync_device_step()
        self.controller.sync_device_step(step)
        if entry is None:
            return self._capture(step, tracked, round_, first, second)
        before, after, outputs, _ = entry
        before.replay()
        if round_ and not self._round_on_host(step, tracked, epochs):
            # the optimizer graph reads caches made anew: this step's update runs eagerly,
            # told the outputs of the replayed first half (host state such as GradScaler's
            # unscaled stage is not set by a replay)
            second(False, outputs)
            self._graphs.clear()
            self.replays += 1
            return self._copies(outputs)
        after.replay()
        self.optimizer.note_replayed_step()
        if not round_:
            self.controller.note_replayed_step(step)
        self.replays += 1
        return self._copies(outputs)

    def _capture(self, step: int, tracked: bool, round_: bool,
                 first: Callable[[], StepOutputs], second: Callable[..., None]
                 ) -> StepOutputs:
        """Capture both halves of step ``step`` and run them; at a round, the first half's
        capture leaves the round to the host (`defer_round`), which runs it between the
        replays of the two graphs, before the second half is captured."""
        self.optimizer.zero_grad(set_to_none=True)  # the graph's gradients are its own
        before, after = self.graph_factory(), self.graph_factory()
        self.controller.defer_round = round_
        try:
            with before.capture():
                outputs = first()
        finally:
            self.controller.defer_round = False
        self._grads[tracked] = [(p, p.grad) for p in self._params()]
        epochs = self._cache_epochs()
        before.replay()  # capture records the half; the replay runs it
        kept = not round_ or self._round_on_host(step, tracked, epochs)
        with after.capture():
            second(False)
        after.replay()
        self.captures += 1
        if kept:  # (caches made anew by the round: both graphs are captured again next time)
            self._graphs[tracked] = (before, after, outputs, epochs)
        # (the captures ran the step's Python: the step counters have moved on)
        return self._copies(outputs)

    def pool_bytes(self) -> int:
        """`CUDAGraphPool.reserved_bytes` of the run's graphs (0 with another graph factory)."""
        return self.graph_factory.reserved_bytes() \
            if isinstance(self.graph_factory, CUDAGraphPool) else 0

    def _round_on_host(self, step: int, tracked: bool, epochs: tuple) -> bool:
        """The allocation round between the two halves of a graphed step: the first graph's
        gradients put back on the parameters (an eager step since its capture may have replaced
        them), the round (`IncreLoRAController.finish_replayed_round`), then
        `IncreLoRAAdamW.prepare_replay`. Whether the caches were refreshed in place (the
        graphs captured at ``epochs`` stay valid)."""
        for p, grad in self._grads[tracked]:
            p.grad = grad
        self.controller.finish_replayed_round(step)
        self.optimizer.prepare_replay()
        self._versions = self._slot_versions()
        return self._cache_epochs() == epochs

    def _preload(self, tracked: bool, preload: Callable[..., None]) -> None:
        """Run ``preload`` (forward and backward) once in tracking state ``tracked``, without
        lasting effect (`_without_effect`). It loads the kernels of that
        tracking state (CUDA cannot load one while capturing), so the state's first step can
        be captured at once instead of run eagerly: an eager step after a capture holds its
        activations beside the graph pool's, one step's activations more than a replay."""
        with self._without_effect(tracked), self._side_stream():
            preload()  # (before the first capture: on a side stream, as the warm-up)
        self._states_run.add(tracked)

    def _probe(self, tracked: bool, preload: Callable[..., None]) -> bool:
        """Before the run's first capture: ``preload(capture)`` captures the model's forward
        (the penalty included) and backward into a graph that is never replayed, without
        lasting effect (`_without_effect`; a capture launches nothing on CUDA). Whether it
        could be captured. The model is the user's code: where it does what a capture refuses
        (a copy of host data to the device, a host read; or the capture runs out of memory),
        the run gives up its graphs before any step was captured, warns, and steps eagerly from
        then on (``fallback`` says why, `capture_failure`). Only an error raised inside the
        capture counts; the preload's own checks, and the rest of the step (clipping,
        controller, optimizer), raise as they would without the probe."""
        graph = self.graph_factory()
        raised: List[BaseException] = []

        @contextlib.contextmanager
        def capture() -> Iterator[None]:
            try:
                with graph.capture():
                    yield
            except Exception as error:
                raised.append(error)
                raise
        try:
            with self._without_effect(tracked):
                preload(capture())
        except Exception as error:
            if not raised or raised[0] is not error:
                raise
            if self._cuda:
                reset_cuda_rng_capture_state(self._cuda_devices())
            self.fallback = capture_failure(error)
            warnings.warn(f"CUDA graphs: the model's forward and backward cannot be captured "
                          f"({self.fallback}); the run goes on with eager steps",
                          RuntimeWarning, stacklevel=4)
            return False
        return True

    def _cuda_devices(self) -> List[int]:
        return sorted({p.device.index for p in self._params() if p.device.type == "cuda"})

    @contextlib.contextmanager
    def _without_effect(self, tracked: bool) -> Iterator[None]:
        """Run the block (a forward and backward) with the layers' score tracking set as the
        steps of tracking state ``tracked`` have it (`IncreLoRAController.passes_track`: off
        whatever the state with a score taken outside the passes, whose runs never load the
        tracking kernels) and undo its effects on the run: the random number generators
        (dropout) are forked, the tracking flags and the layers' score sums put back, and with
        ``exact_step_score`` their dense score gradients (``score_grad``: a tracked backward
        adds into it, and a tracked forward allocates it where tracking has just turned on;
        one allocated inside a capture would hold whatever the graph's pool held), the
        gradients dropped."""
        layers = self.controller.layers
        flags = [layer.score_enabled for layer in layers]
        sums = [layer.score_sum.clone() for layer in layers]
        score_grads = [layer.score_grad for layer in layers]
        kept_grads = [None if g is None else g.clone() for g in score_grads]
        on = self.controller.passes_track(tracked)
        try:
            with torch.random.fork_rng(devices=self._cuda_devices()):
                for layer in layers:
                    layer.score_enabled = on
                yield
        finally:
            with torch.no_grad():
                for layer, flag, total, grad, kept in zip(layers, flags, sums, score_grads,
                                                          kept_grads):
                    layer.score_enabled = flag
                    layer.score_sum.copy_(total)
                    if grad is not None:
                        grad.copy_(kept)
                    layer.score_grad = grad
            self.optimizer.zero_grad(set_to_none=True)

    @staticmethod
    def _copies(outputs: StepOutputs) -> StepOutputs:
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in outputs)

    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _exact_step_score(self) -> bool:
        return bool(getattr(self.controller, "exact_step_score", False))

    def _eager(self, step: int, first: Callable[[], StepOutputs],
               second: Callable[..., None]) -> StepOutputs:
        round_ = self.controller.allocation_due(step)
        # Gradients of a captured step are static tensors: an eager step starts from none.
        self.optimizer.zero_grad(set_to_none=True)
        with self._side_stream():
            outputs = first()
            second(True)
        self._eager_steps += 1
        self._versions = self._slot_versions()
        self._hyper = self._hyperparameters()
        if round_ and self._exact_step_score():
            # Its dense G buffers are released and allocated anew around score windows.
            self._graphs.clear()
        return outputs

    def _tracking_possible(self) -> bool:
        """Whether the run can still have tracked steps (the exact score, budget not reached):
        otherwise there is no other state to preload."""
        config = getattr(self.controller, "config", None)
        return getattr(config, "score", None) == "delta_w" \
            and not getattr(self.controller, "budget_reached", False)

    def _hyperparameters(self) -> tuple:
        """The settings that a captured step holds as numbers: the optimizer's
        (`IncreLoRAAdamW.captured_hyperparameters`; its ``lr`` is a device tensor), the
        controller's config (the penalty's weight, the score's smoothing) and the caller's
        (``settings``)."""
        config = getattr(self.controller, "config", None)
        return (getattr(self.optimizer, "captured_hyperparameters", tuple)(),
                None if config is None else tuple(vars(config).items()), self._settings())

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
        if self._graphs or self.captures or self.fallback is not None or not self._cuda \
                or not torch.cuda.is_available():
            return contextlib.nullcontext()
        return on_side_stream()


# Lines of torch's CUDA error messages that say nothing about the cause.
_BOILERPLATE = ("CUDA kernel errors might", "For debugging consider", "Compile with",
                "Traceback", "File ", "Search for `cuda")


def capture_failure(error: BaseException) -> str:
    """What made a capture fail, in one line: the first error of ``error``'s chain (when the
    capture's end raised too, torch's "operation failed due to a previous error during
    capture" hides the model's own error in ``__context__``), named by its type and its line
    that mentions the capture, else its last informative line (TorchScript puts the cause
    last; CUDA errors end with advice on compiling torch)."""
    chain = [error]
    while chain[-1].__context__ is not None and chain[-1].__context__ not in chain \
            and len(chain) < 8:
        chain.append(chain[-1].__context__)
    first = chain[-1]
    lines = [line.strip() for line in str(first).splitlines() if line.strip()
             and not line.strip().startswith(_BOILERPLATE)]
    line = next((ln for ln in lines if "captur" in ln.lower()), lines[-1] if lines else "")
    return f"{type(first).__name__}: {line}" if line else type(first).__name__


def reset_cuda_rng_capture_state(devices: Sequence[int]) -> None:
    """After a failed capture: give the default CUDA generators of ``devices`` a copy of their
    state (the same seed and offset). Torch releases a generator from a capture only when the
    capture ends cleanly; after one that failed, some torch releases refuse the generator's
    next eager use ("Offset increment outside graph capture encountered unexpectedly"), which
    would break the eager steps of a run with dropout that fell back. A copy is not tied to
    the capture."""
    for index in devices:
        generator = torch.cuda.default_generators[index]
        generator.graphsafe_set_state(generator.clone_state())


@contextlib.contextmanager
def on_side_stream() -> Iterator[None]:
    """Run the block on a fresh CUDA side stream, ordered after and before the current stream's
    work: where warm-up before a capture runs (torch's CUDA-graph notes)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)
