"""The plain training loop shared by every method, and dev-set evaluation.

Both run where a `device.Placement` says (its device and autocast precision; fp16 scales the
loss with a ``GradScaler``, unscales before clipping and passes the scale to the method's
``before_optimizer_step``); without one, on the CPU in fp32.

A training step reads nothing on the host by itself: its task loss and token count stay on the
device until the next log point (every `LOG_EVERY` steps and the last step), where
`LoopState.sync` reads them, checks the losses are finite and the progress bar shows the loss and
the total rank.

The first `LOG_EVERY` steps of a session also wait for the device each, so that their seconds
(``LoopState.first_step_seconds``) say where a run's one-time costs go: kernel compiles and
loads, CUDA-graph probes and captures (the run's average tokens per second pays them; the rate
after the first log point does not).

Training time counts each step until its device work is done wherever the loop or its step-end
callback waits for the device next: at log points, and at the steps a callback says it acts
(its ``due(step)``: an evaluation, a checkpoint), the loop waits for the device inside the timed
step. Otherwise the queued steps would finish inside the callback, untimed, and tokens per
second would come out too high on a GPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .batches import Batches
from .device import Placement, tokens_per_second, wait_for_device
from .methods import MethodRun
from .step_runner import StepRunner

# Steps between the loop's host reads (losses, token counts, the progress bar's rank).
LOG_EVERY = 10


@dataclass
class LoopState:
    """Where a run stands: the next step to take and the task loss of every step taken.

    ``session_tokens`` / ``session_seconds``: non-padding training tokens and training seconds of
    the steps taken by this process (not restored from a checkpoint), for tokens per second.
    ``pending_losses`` / ``pending_tokens``: the task losses and token counts of the latest steps
    as device tensors, not yet read on the host; `sync` moves them into ``losses`` and
    ``session_tokens`` (call it before reading those during a run).
    ``warm_mark``: ``(session_tokens, session_seconds)`` at this session's first log point, so
    that `warm_tokens_per_second` leaves out the first steps' one-time costs (kernel compiles,
    the first CUDA graph captures); None before it.
    """

    step: int = 0
    losses: List[float] = field(default_factory=list)
    train_seconds: float = 0.0
    session_tokens: int = 0
    session_seconds: float = 0.0
    pending_losses: List[torch.Tensor] = field(default_factory=list, repr=False)
    pending_tokens: List[torch.Tensor] = field(default_factory=list, repr=False)
    # --select-best: {"step", "accuracy", "loss", "tensors" (CPU copies of the trainable
    # parameters and the buffers)} of the best-scoring state so far (`BestState`); None before
    # the first scoring or without it
    best: Optional[Dict[str, Any]] = field(default=None, repr=False)
    # --cuda-graphs: device bytes the graphs' memory pools held when the loop ended
    # (`GraphedSteps.pool_bytes`), which the allocator's tensor peak leaves out between
    # replays; 0 without graphs (not checkpointed)
    graph_pool_bytes: int = field(default=0, repr=False)
    # --cuda-graphs: why the run stepped eagerly instead (the model's forward or backward
    # cannot be captured: `GraphedSteps.fallback`), or None (not checkpointed)
    graph_fallback: Optional[str] = field(default=None, repr=False)
    # --cuda-graphs: this session's steps captured or replayed from graphs (the first ones run
    # eagerly, so a short run may have none); 0 without graphs (not checkpointed)
    graphed_steps: int = field(default=0, repr=False)
    warm_mark: Optional[Tuple[int, float]] = field(default=None, repr=False)
    # seconds of each of this session's first LOG_EVERY steps, each waited for on the device
    first_step_seconds: List[float] = field(default_factory=list, repr=False)
    # seconds this session spent building kernels before its first step (`StepRunner.precompile`,
    # on CUDA; counted in train_seconds too), or None where nothing was built
    precompile_seconds: Optional[float] = field(default=None, repr=False)
    # the run's checkpoint interval in steps (0: none), saved in its checkpoints so that a
    # resume keeps it; None: not known (a checkpoint written before it was saved)
    save_steps: Optional[int] = field(default=None, repr=False)

    def warm_tokens_per_second(self) -> Optional[float]:
        """Training tokens per second of this session's steps after its first log point (both
        ends waited for the device); None when no step came after it."""
        if self.warm_mark is None:
            return None
        tokens, seconds = self.warm_mark
        return tokens_per_second(self.session_tokens - tokens, self.session_seconds - seconds)

    def sync(self, name: str) -> None:
        """Read the pending losses and token counts on the host (one read each) and append them.

        Raises:
            FloatingPointError: a pending loss is not finite; the message names ``name`` (the
                method) and the first such step, and the losses before it are kept.
        """
        if self.pending_tokens:
            self.session_tokens += int(torch.stack(self.pending_tokens).sum())
            self.pending_tokens.clear()
        if not self.pending_losses:
            return
        values = torch.stack(self.pending_losses).tolist()
        first = self.step - len(values)
        self.pending_losses.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise FloatingPointError(f"{name}: the training loss became {value} at step "
                                         f"{first + offset}; lower --lr")
            self.losses.append(value)


def train_loop(run: MethodRun, batches: Batches, max_steps: int, grad_clip: float,
               state: LoopState, progress: bool = True,
               on_step_end: Optional[Callable[[LoopState], None]] = None,
               placement: Optional[Placement] = None, static_inputs: bool = False,
               cuda_graphs: bool = False) -> LoopState:
    """Train from ``state.step`` to ``max_steps``; ``on_step_end`` runs after every step (the
    caller writes checkpoints there, after `LoopState.sync`); where it reads the device at some
    steps, its ``due(step)`` (the step count after the step) says which, so that the loop waits
    for the device within the timed step there (`BestState`, `StepEnds`). The progress bar
    shows the task loss (without penalties, so methods compare) and the current total rank,
    refreshed every `LOG_EVERY` steps and at the end, the only steps where the loop reads the
    device.
    ``placement``: where the model already is and the precision to train in (default: CPU, fp32).
    Each step is a `StepRunner.step` (``static_inputs`` and ``cuda_graphs`` are passed to it).

    Raises:
        FloatingPointError: a task loss became non-finite (found at the next log point or
            `LoopState.sync`, naming the first such step).
    """
    from tqdm.auto import tqdm

    runner = StepRunner(run, placement, grad_clip=grad_clip, static_inputs=static_inputs,
                        cuda_graphs=cuda_graphs)
    run.begin_training(state.step)  # (tracking off since a loop before this one ended)
    built = runner.precompile() if state.step < max_steps else None
    if built is not None:  # kernels built before the first step, timed as training
        state.precompile_seconds = built.seconds
        state.train_seconds += built.seconds
        state.session_seconds += built.seconds
    bar = tqdm(total=max_steps, initial=state.step, disable=not progress, desc=run.name,
               dynamic_ncols=True, mininterval=1.0)
    device = placement.device if placement is not None else torch.device("cpu")
    due = getattr(on_step_end, "due", None)
    run.model.train()
    try:
        while state.step < max_steps:
            t0 = time.perf_counter()
            result = runner.step(state.step, batches.train_batch(state.step))
            state.pending_losses.append(result.task_loss)
            if isinstance(result.tokens, int):
                state.session_tokens += result.tokens
            else:
                state.pending_tokens.append(result.tokens)
            state.step += 1
            log = state.step % LOG_EVERY == 0 or state.step >= max_steps
            first = len(state.first_step_seconds) < LOG_EVERY and state.warm_mark is None
            if log or first or (due is not None and due(state.step)):
                wait_for_device(device)  # the step's device work, timed with it
            if log:
                state.sync(run.name)
            elapsed = time.perf_counter() - t0
            if first:
                state.first_step_seconds.append(elapsed)
            state.train_seconds += elapsed
            state.session_seconds += elapsed
            if log and state.warm_mark is None:
                state.warm_mark = (state.session_tokens, state.session_seconds)
            if log:
                recent = state.losses[-20:]
                postfix = {"loss": f"{sum(recent) / len(recent):.4f}"}
                rank = run.total_rank()
                if rank is not None:
                    postfix["rank"] = rank
                bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if on_step_end is not None:
                on_step_end(state)
    finally:
        bar.close()
        run.end_training()  # no score tracking in passes after the loop (the evaluation's)
    if runner.graphed is not None:
        state.graph_pool_bytes = runner.graphed.pool_bytes()
        state.graph_fallback = runner.graphed.fallback
        state.graphed_steps = runner.graphed.captures + runner.graphed.replays
    return state


class StepEnds:
    """Step-end callbacks run in order as one (Nones left out), due where one of them is."""

    def __init__(self, *callbacks: Optional[Callable[[LoopState], None]]) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def due(self, step: int) -> bool:
        """Whether one of the callbacks reads the device after ``step`` steps (one without a
        ``due`` never does)."""
        return any(getattr(c, "due", None) is not None and c.due(step) for c in self.callbacks)

    def __call__(self, state: LoopState) -> None:
        for callback in self.callbacks:
            callback(state)


def balanced_class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``--class-weights balanced``: class c weighs rows / (classes x rows of c), so every class
    present adds the same total to the loss (a class without rows weighs 0)."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    present = int((counts > 0).sum())
    weights = torch.zeros(n_classes)
    weights[counts > 0] = len(labels) / (present * counts[counts > 0])
    return weights


class BestState:
    """``--select-best``: every ``every`` steps (and at the last), scores the model on the
    held-out training rows and keeps a CPU copy of its trainable parameters and buffers when it
    scores better than before (higher accuracy, then lower loss; the earlier step on a tie), in
    ``LoopState.best`` (so a checkpoint carries it); `restore` puts the best back."""

    def __init__(self, run: MethodRun, batches: Batches, every: int, max_steps: int,
                 placement: Optional[Placement] = None) -> None:
        self.run, self.batches, self.every = run, batches, every
        self.max_steps, self.placement = max_steps, placement

    def _tensors(self) -> Dict[str, torch.Tensor]:
        model = self.run.model
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return {**params, **dict(model.named_buffers())}

    def due(self, step: int) -> bool:
        """Whether the call after ``step`` steps evaluates (reads the device)."""
        return step % self.every == 0 or step >= self.max_steps

    def __call__(self, state: LoopState) -> None:
        if not self.due(state.step):
            return
        m = evaluate(self.run, self.batches, self.placement, split="holdout")
        best = state.best
        if best is None or (m["eval_accuracy"], -m["eval_loss"]) > (best["accuracy"],
                                                                     -best["loss"]):
            state.best = {"step": state.step, "accuracy": m["eval_accuracy"],
                          "loss": m["eval_loss"],
                          "tensors": {n: t.detach().to("cpu", copy=True)
                                      for n, t in self._tensors().items()}}

    def restore(self, state: LoopState) -> None:
        """Copy the best state's tensors into the model (nothing when none was scored); the
        forward then computes what it did at the best step (IncreLoRA: its slot states too)."""
        if state.best is None:
            return
        with torch.no_grad():
            for name, t in self._tensors().items():
                t.copy_(state.best["tensors"][name])
        for module in self.run.model.modules():  # IncreLoRA layers: slot states and stamps
            if hasattr(module, "note_loaded_stamps"):  # loaded, their host record with them
                module.note_loaded_stamps()


@torch.no_grad()
def evaluate(run: MethodRun, batches: Batches,
             placement: Optional[Placement] = None, split: str = "dev") -> Dict[str, Any]:
    """Dev accuracy, macro-F1 and cross-entropy of the model as it stands (on ``placement``'s
    device and precision; default CPU, fp32), and each class's F1 and dev count, listed by
    label id (see `classification_metrics`): a class the model never gets right has F1 0.
    ``split="holdout"`` scores the held-out training rows instead (`Batches` ``holdout``)."""
    place = placement or Placement(torch.device("cpu"), "fp32")
    model = run.model
    was_training = model.training
    model.eval()
    preds, labels, loss_sum, n_classes = [], [], 0.0, 0
    for batch in batches.eval_batches(split):
        batch = place.to_device(batch)
        y = batch.pop("labels")
        with place.autocast():
            logits = model(**batch).logits.float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.argmax(-1))
        labels.append(y)
        n_classes = logits.shape[-1]
    model.train(was_training)
    gold = torch.cat(labels)
    metrics = classification_metrics(torch.cat(preds), gold, n_classes)
    metrics["eval_loss"] = loss_sum / metrics["eval_examples"]
    metrics.update(majority_baseline(gold, n_classes))
    return metrics


def majority_baseline(gold: torch.Tensor, n_classes: int = 0) -> Dict[str, Any]:
    """What always predicting the dev set's most common class scores on it: its label id
    (``eval_majority_label``; the lowest id on a tie), accuracy (its share of the dev set) and
    macro-F1 (computed as `classification_metrics` does), for telling a run that learned nothing
    from one that did."""
    if gold.dim() != 1 or len(gold) == 0:
        raise ValueError(f"majority_baseline: gold {tuple(gold.shape)} must be 1-D and non-empty")
    majority = int(torch.bincount(gold).argmax())
    constant = classification_metrics(torch.full_like(gold, majority), gold, n_classes)
    return {"eval_majority_label": majority,
            "eval_majority_accuracy": constant["eval_accuracy"],
            "eval_majority_macro_f1": constant["eval_macro_f1"]}


def classification_metrics(pred: torch.Tensor, gold: torch.Tensor,
                           n_classes: int = 0) -> Dict[str, Any]:
    """Accuracy, macro-F1 and per-class F1 and support of predicted against gold label ids
    (1-D integer tensors of one length; ``n_classes`` at least, more if ``gold`` holds a higher
    id). A class neither predicted nor present has F1 None and is left out of macro-F1."""
    if pred.shape != gold.shape or gold.dim() != 1 or len(gold) == 0:
        raise ValueError(f"classification_metrics: pred {tuple(pred.shape)} and gold "
                         f"{tuple(gold.shape)} must be 1-D, non-empty and of one length")
    size = max(n_classes, int(gold.max()) + 1, int(pred.max()) + 1)
    right = torch.bincount(gold[pred == gold], minlength=size).tolist()    # true positives
    predicted = torch.bincount(pred, minlength=size).tolist()              # tp + fp
    support = torch.bincount(gold, minlength=size).tolist()                # tp + fn
    # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (predicted + support); None when both are 0
    f1s: List[Optional[float]] = [2 * tp / (p + g) if p + g else None
                                  for tp, p, g in zip(right, predicted, support)]
    present = [f for f in f1s if f is not None]
    return {"eval_accuracy": sum(right) / len(gold),
            "eval_macro_f1": sum(present) / len(present), "eval_examples": len(gold),
            "eval_f1_per_class": f1s, "eval_support_per_class": support}
