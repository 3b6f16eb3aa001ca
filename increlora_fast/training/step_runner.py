"""`StepRunner`: the one place that runs a training step of a `MethodRun`.

`finetune`'s loop, the model-level benchmark, the memory breakdown's step and the memory check
(and `gpu-check`, through `finetune` and the model-level benchmark) all step through it, so
a step means the same everywhere: forward under the placement's
autocast, the method's ``penalty()`` (in fp32, outside autocast), backward (fp16: of the
GradScaler-scaled loss, unscaled before clipping), gradient clipping, ``before_optimizer_step``
(IncreLoRA's controller), the optimizer step (fp16: the scaler's; `IncreLoRAAdamW` skips an
overflowed step on the device, other optimizers are skipped by the scaler on the host),
``after_optimizer_step`` and ``zero_grad(set_to_none=True)``.

A step reads nothing on the host by itself: `StepRunner.step` returns the task loss and the
non-padding token count as device tensors, for the caller to read when it logs.

CUDA graphs (``cuda_graphs=True``) need fixed shapes and fixed input addresses: the runner then
copies every batch into static device buffers (``static_inputs``), which need batches of one
shape (``Batches(pad_to="max_length")``), and `cuda_graphs.GraphedSteps` replays the steps from
captured graphs: a step the run does not allocate in (``not run.allocation_due(step)``) is
replayed, allocation rounds change the slot layout and run eagerly.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Optional, Union

import torch
import torch.nn.functional as F

from . import cuda_graphs as cuda_graphs_module
from ..device_scalar import unscale_once
from .cuda_graphs import CUDAGraphPool, GraphedSteps, StepGraph
from ..precompile import PrecompileResult, precompile_kernels
from .device import HALF_DTYPES, Placement
from .methods import MethodRun
from .settings import CUDA_GRAPHS
from .static_positions import cache_relative_positions


def takes_model_loss(batch: Dict[str, torch.Tensor]) -> bool:
    """Whether `forward_with_loss` keeps the model's own loss for ``batch`` (token labels: the
    model is given them) rather than computing ``cross_entropy`` of the logits itself (one label
    per row). A term a model adds to its own loss, as peft's AdaLoRA adds its orthogonal penalty,
    is then already in the step's loss: the step tells the method (`MethodRun.penalty`)."""
    return batch["labels"].dim() != 1


def forward_with_loss(model: torch.nn.Module, batch: Dict[str, torch.Tensor],
                      class_weights: Optional[torch.Tensor] = None) -> tuple:
    """(the model's output, the loss). With one label per row (sequence classification, all
    that `finetune` trains) the model runs without ``labels`` and the loss is ``cross_entropy``
    of its float32 logits here, the same value a sequence classifier's own loss gives. Models'
    own losses may read the host: DeBERTa-v2's (transformers 5.17) keeps the rows with
    ``labels >= 0`` through ``nonzero()``, which no CUDA graph can capture, and every step of
    every method would wait on it. Token labels (a language model, as the memory benchmark
    runs) keep the model's own loss (`takes_model_loss`). Call it under the autocast the forward
    needs."""
    if takes_model_loss(batch):
        out = model(**batch)
        return out, out.loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    return out, F.cross_entropy(out.logits.float(), batch["labels"], weight=class_weights)


def resolve_cuda_graphs(text: str, device: torch.device, method: str = "increlora",
                        pad_to: Optional[str] = None) -> bool:
    """Whether a run with ``--cuda-graphs text`` on ``device`` uses CUDA graphs.

    ``auto`` graphs IncreLoRA runs on CUDA (the GPU check on an H200, 2026-12-05: the main job
    3.8x faster, the same rank pattern and accuracy as eager steps with its padding; graphed
    steps equal eager ones in fp32, bf16 and fp16) unless ``pad_to`` is ``longest`` (batches
    of one shape are what graphs replay); other methods, other devices and ``longest`` step
    eagerly. A run's default padding follows the choice (`settings.resolve`). A model whose
    forward cannot be captured steps eagerly after one warning (`cuda_graphs.GraphedSteps`).
    The device-independent combinations of ``on`` are refused by `settings.validate`.

    Raises:
        ValueError: an unknown value, or ``on`` on a device that is not CUDA.
    """
    if text not in CUDA_GRAPHS:
        raise ValueError(f"--cuda-graphs {text!r} is invalid: use one of {list(CUDA_GRAPHS)}")
    if text == "on" and device.type != "cuda":
        raise ValueError(f"--cuda-graphs on needs a CUDA device, and this run is on {device}; "
                         "use --cuda-graphs off or auto, or --device cuda")
    if text == "auto":
        return device.type == "cuda" and method == "increlora" and pad_to != "longest"
    return text == "on"


@dataclass
class StepResult:
    """What one step leaves for the caller to read later, without a host read now.

    ``task_loss``: the cross-entropy of the step's logits (detached, fp32, penalties left out so
    that methods compare) as a 0-d device tensor; with token labels (a language model) the
    model's own loss, detached (peft's AdaLoRA has its penalty in it). ``tokens``: the
    non-padding tokens of the batch, a 0-d device tensor (the attention mask's sum), or an int
    when the batch has no mask (every token counts).
    """

    task_loss: torch.Tensor
    tokens: Union[torch.Tensor, int]


class StepRunner:
    """Runs the training steps of ``run`` where ``placement`` says.

    Args:
        run: the method (model, optimizer and per-step hooks); the model is already on the
            placement's device.
        placement: device and precision (default: CPU, fp32); its GradScaler, if any, scales
            the loss.
        grad_clip: max global gradient norm of the trainable parameters; None: no clipping
            (the benchmarks' plain loop).
        static_inputs: copy each batch into device buffers allocated at the first step and
            reused after (fixed addresses, as graph replay needs); every batch must then have the
            first one's keys, shapes and dtypes. Results are identical to the plain path.
        cuda_graphs: capture the steps in CUDA graphs and replay them
            (`cuda_graphs.GraphedSteps`: allocation rounds and the first steps eager); implies
            ``static_inputs``; IncreLoRA runs only. DeBERTa-style encoders of the model then
            compute their relative positions once per training shape
            (`static_positions.cache_relative_positions`).
        graph_factory: makes the graphs (default: a `cuda_graphs.CUDAGraphPool`, the run's
            graphs in one memory pool; tests pass a CPU emulation).
    """

    def __init__(self, run: MethodRun, placement: Optional[Placement] = None,
                 grad_clip: Optional[float] = None, static_inputs: bool = False,
                 cuda_graphs: bool = False,
                 graph_factory: Optional[Callable[[], StepGraph]] = None) -> None:
        self.run = run
        self.placement = placement or Placement(torch.device("cpu"), "fp32")
        self.grad_clip = grad_clip
        self.static_inputs = static_inputs or cuda_graphs
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        # the latest step's total loss: it lives until the next step's replaces it, as a loop
        # variable would (the memory breakdown counts what it still holds)
        self.loss: Optional[torch.Tensor] = None
        self._static: Optional[Dict[str, torch.Tensor]] = None
        self.graphed: Optional[GraphedSteps] = None
        if cuda_graphs:
            controller = getattr(run, "controller", None)
            if controller is None:
                raise ValueError(f"cuda_graphs: only IncreLoRA runs can be captured, got "
                                 f"{run.name}")
            factory = graph_factory or CUDAGraphPool()
            if isinstance(factory, cuda_graphs_module.CUDAGraphPool) and \
                    self.placement.device.type != "cuda":
                raise ValueError(f"cuda_graphs: CUDA graphs need a CUDA device, the run is on "
                                 f"{self.placement.device}")
            self.graphed = GraphedSteps(run.optimizer, controller, factory,
                                        settings=self._captured_settings)
            # DeBERTa's encoders rebuild their relative positions with a host-to-device copy
            # on every forward, which a capture refuses: computed once per training shape
            cache_relative_positions(run.model)

    def precompile(self) -> Optional[PrecompileResult]:
        """On CUDA, build the Triton kernels of the model's adapted layers, of the optimizer's
        step and of the orthogonal penalty before the first step, in parallel
        (`precompile.precompile_kernels`, for the placement's autocast dtype); None elsewhere,
        where there is nothing to build."""
        if self.placement.device.type != "cuda":
            return None
        half = HALF_DTYPES.get(self.placement.precision)
        controller = getattr(self.run, "controller", None)
        return precompile_kernels(self.run.model, half, optimizer=self.run.optimizer,
                                  penalty=getattr(controller, "penalty", None))

    def inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The batch on the device: moved by the placement, or with ``static_inputs`` copied
        into the static buffers (the same dict and tensors at every step).

        Raises:
            ValueError: with ``static_inputs``, a batch whose keys, shapes or dtypes differ from
                the first batch's (pad every batch to one length).
        """
        if not self.static_inputs:
            return self.placement.to_device(batch)
        if self._static is None:
            self._static = {k: torch.empty_like(v, device=self.placement.device)
                            for k, v in batch.items()}
        layout = {k: (tuple(v.shape), v.dtype) for k, v in batch.items()}
        fixed = {k: (tuple(v.shape), v.dtype) for k, v in self._static.items()}
        if layout != fixed:
            raise ValueError(f"static inputs need batches of one shape: got {layout}, the "
                             f"buffers hold {fixed}; pad every batch to one length "
                             "(--pad-to max_length)")
        cuda = self.placement.device.type == "cuda"
        for k, v in batch.items():
            if cuda and v.device.type == "cpu" and not v.is_pinned():
                v = v.pin_memory()
            self._static[k].copy_(v, non_blocking=cuda)
        return self._static

    def forward_backward(self, step: int, batch: Dict[str, torch.Tensor]) -> Any:
        """Forward ``batch`` (already on the device) under autocast, weigh the classes as the
        run says (``class_weights``), add the method's penalty, and backward (the scaled loss
        under fp16); returns the model's output. The method learns whether the loss is the
        model's own (`takes_model_loss`), which may hold its penalty already (AdaLoRA's)."""
        place = self.placement
        with place.autocast():
            out, loss = forward_with_loss(self.run.model, batch, self.run.class_weights)
        model_loss = takes_model_loss(batch)
        # the step's task loss (`StepResult`): the loss itself, unweighted when classes are
        weighted = not model_loss and self.run.class_weights is not None
        self._task_loss = (F.cross_entropy(out.logits.detach().float(), batch["labels"])
                           if weighted else loss.detach().float())
        # in fp32, outside autocast
        penalty = self.run.penalty(model_loss=model_loss)
        if penalty is not None:
            loss = loss + penalty
        self.loss = loss
        if place.scaler is not None:
            place.scaler.scale(loss).backward()
        else:
            loss.backward()
        return out

    def update(self, step: int, zero_grad: bool = True) -> None:
        """Everything after backward: unscale (fp16), clip, ``before_optimizer_step``, the
        optimizer step (fp16: without effect when the scaled gradients overflowed),
        ``after_optimizer_step`` and, with ``zero_grad``, ``zero_grad(set_to_none=True)`` (a
        captured step keeps its gradients: they are the graph's static tensors)."""
        self._before_optimizer(step)
        self._optimizer_step(step, zero_grad)

    def _before_optimizer(self, step: int) -> None:
        """Unscale (fp16), clip and ``before_optimizer_step``: the first half of `update`."""
        run, scaler = self.run, self.placement.scaler
        overflow = unscale_once(scaler, run.optimizer) if scaler is not None else None
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        run.before_optimizer_step(step, loss_scale=self.placement.loss_scale, overflow=overflow)

    def _optimizer_step(self, step: int, zero_grad: bool) -> None:
        """The optimizer step (the scaler's with fp16), ``after_optimizer_step`` and, with
        ``zero_grad``, ``zero_grad(set_to_none=True)``: the second half of `update`."""
        run, scaler = self.run, self.placement.scaler
        if scaler is not None:
            scaler.step(run.optimizer)
            scaler.update()
        else:
            run.optimizer.step()
        run.after_optimizer_step(step)
        if zero_grad:
            run.optimizer.zero_grad(set_to_none=True)

    def step(self, step: int, batch: Dict[str, torch.Tensor]) -> StepResult:
        """One training step on ``batch`` (on the host or the device); nothing is read on the
        host here. With ``cuda_graphs`` the step is replayed from a CUDA graph unless it is an
        allocation round or one of the first steps (`cuda_graphs.GraphedSteps`)."""
        batch = self.inputs(batch)
        if self.graphed is None:
            result = self._up_to_optimizer(step, batch)
            self._optimizer_step(step, zero_grad=True)
            return result

        def first() -> tuple:
            result = self._up_to_optimizer(step, batch)
            return result.task_loss, result.tokens, self._scaler_stage()

        def second(zero_grad: bool, first_outputs: Optional[tuple] = None) -> None:
            if first_outputs is not None:  # after a replayed first half
                self._restore_scaler_stage(first_outputs[2])
            self._optimizer_step(step, zero_grad)
        outputs = self.graphed.step(
            step, first, second,
            preload=lambda capture=None: self._forward_backward_without_effect(step, batch,
                                                                                capture))
        return StepResult(*outputs[:2])

    def _captured_settings(self) -> tuple:
        """This runner's settings that a captured step holds as numbers or tensor addresses
        (`GraphedSteps`' ``settings``): the clipping norm, the loss weights (a tensor replaced,
        not one changed in place) and the GradScaler's growth factors."""
        scaler = self.placement.scaler
        factors = None if scaler is None else (scaler.get_growth_factor(),
                                               scaler.get_backoff_factor(),
                                               scaler.get_growth_interval())
        weights = getattr(self.run, "class_weights", None)
        return self.grad_clip, None if weights is None else id(weights), factors

    def _scaler_stage(self) -> Optional[dict]:
        """The fp16 GradScaler's record of this optimizer after the first half (stage: gradients
        unscaled; the overflow flags its unscale wrote), None without a scaler. Captured, its
        flags are the graph's tensors, rewritten at each replay; a replay does not set the
        record, so an optimizer step run eagerly after one restores it
        (`_restore_scaler_stage`) instead of unscaling the gradients a second time. (GradScaler
        keeps the record in ``_per_optimizer_states``, a private attribute of torch 2.x.)"""
        scaler = self.placement.scaler
        if scaler is None or not scaler.is_enabled():
            return None
        state = scaler._per_optimizer_states[id(self.run.optimizer)]
        return {"stage": state["stage"],
                "found_inf_per_device": dict(state["found_inf_per_device"])}

    def _restore_scaler_stage(self, stage: Optional[dict]) -> None:
        scaler = self.placement.scaler
        if scaler is not None and stage is not None:
            state = scaler._per_optimizer_states[id(self.run.optimizer)]
            state["stage"] = stage["stage"]
            state["found_inf_per_device"] = dict(stage["found_inf_per_device"])

    def _forward_backward_without_effect(self, step: int, batch: Dict[str, torch.Tensor],
                                         capture: Optional[ContextManager[None]] = None
                                         ) -> None:
        """`forward_backward` whose effects on the model's buffers and ``self.loss`` are undone
        (`GraphedSteps` undoes the rest: random state, gradients, tracking flags, score sums).
        Without ``capture`` it loads the kernels of a tracking state before that state's first
        capture, and in a tracked state runs the controller's score update too
        (`IncreLoRAController.load_update_kernels`, undone). With ``capture`` (the probe before
        the run's first capture, `GraphedSteps._probe`) only the forward and backward run inside
        it. Buffers outside the adapted layers (a batch norm's running statistics) are put
        back; the adapted layers' other buffers (slot states and steps) must not change, and a
        change raises. The buffers and ``self.loss`` are put back also when the block raises (a
        probe whose capture failed: the run steps eagerly after it, as if it never tried)."""
        layers = set(self.run.controller.layers)
        adapter_buffers = [b for layer in layers for name, b in layer.named_buffers()
                           if name != "score_sum"]
        others = [b for module in self.run.model.modules() if module not in layers
                  for b in module.buffers(recurse=False)]
        kept = [b.clone() for b in others]
        versions = [b._version for b in adapter_buffers]
        loss = self.loss
        try:
            with capture or contextlib.nullcontext(), self._capture_safe_autocast():
                self.forward_backward(step, batch)
            if capture is None:
                # with the overflow flag a captured fp16 step folds in, so its ops are loaded too
                overflow = None if self.placement.scaler is None else \
                    torch.zeros((), device=self.run.controller.layers[0].lora_A.device)
                self.run.controller.load_update_kernels(
                    step, loss_scale=self.placement.loss_scale, overflow=overflow)
        finally:  # also when the probe's capture failed: the run goes on eagerly
            self.loss = loss
            with torch.no_grad():
                for b, value in zip(others, kept):
                    b.copy_(value)
        if [b._version for b in adapter_buffers] != versions:
            raise RuntimeError("cuda_graphs: the kernel preload's forward and backward changed "
                               "an adapted layer's slot buffers; it would change the run")

    def _up_to_optimizer(self, step: int, batch: Dict[str, torch.Tensor]) -> StepResult:
        """Forward, backward and `_before_optimizer`; the step's task loss and token count."""
        with self._capture_safe_autocast():
            self.forward_backward(step, batch)
        self._before_optimizer(step)
        mask = batch.get("attention_mask")
        tokens = mask.sum() if mask is not None else batch["input_ids"].numel()
        return StepResult(self._task_loss, tokens)

    def _capture_safe_autocast(self) -> ContextManager[None]:
        """With CUDA graphs, autocast must not cache casts across a captured region (torch's
        CUDA-graph notes): this context keeps autocast as it is (on or off, its dtype) with the
        cache off, and the placement's autocast entered inside it inherits the cache off."""
        if self.graphed is None:
            return contextlib.nullcontext()
        device = self.placement.device.type
        return torch.autocast(device, dtype=torch.get_autocast_dtype(device),
                              enabled=torch.is_autocast_enabled(device), cache_enabled=False)
