"""`StepRunner`: the one place that runs a training step of a `MethodRun`.

`finetune`'s loop, the model-level benchmark, the memory breakdown's step and the memory check
(and `gpu-check`, through `finetune` and the model-level benchmark) all step through it, so a step means the same everywhere: forward under the placement's
autocast, the method's ``penalty()`` (in fp32, outside autocast), backward (fp16: of the
GradScaler-scaled loss, unscaled before clipping), gradient clipping, ``before_optimizer_step``
(IncreLoRA's controller), the optimizer step (fp16: the scaler's, skipped on overflow),
``after_optimizer_step`` and ``zero_grad(set_to_none=True)``.

A step reads nothing on the host by itself: `StepRunner.step` returns the task loss and the
non-padding token count as device tensors, for the caller to read when it logs.

CUDA graphs (``cuda_graphs=True``) need fixed shapes and fixed input addresses: the runner then
copies every batch into static device buffers (``static_inputs``), which need batches of one
shape (``Batches(pad_to="max_length")``). A step the run does not allocate in
(``not run.allocation_due(step)``) is the one a captured graph can replay; allocation rounds
change the slot layout and run eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F

from .device import Placement
from .methods import MethodRun
from .settings import CUDA_GRAPHS


def resolve_cuda_graphs(text: str, device: torch.device) -> bool:
    """Whether a run with ``--cuda-graphs text`` on ``device`` uses CUDA graphs.

    ``auto`` is off for now: it turns on for CUDA once the GPU check shows graphs faster with
    the same accuracy. The device-independent combinations are refused by
    `settings.validate`.

    Raises:
        ValueError: an unknown value, or ``on`` on a device that is not CUDA.
    """
    if text not in CUDA_GRAPHS:
        raise ValueError(f"--cuda-graphs {text!r} is invalid: use one of {list(CUDA_GRAPHS)}")
    if text == "on" and device.type != "cuda":
        raise ValueError(f"--cuda-graphs on needs a CUDA device, and this run is on {device}; "
                         "use --cuda-graphs off or auto, or --device cuda")
    return text == "on"


@dataclass
class StepResult:
    """What one step leaves for the caller to read later, without a host read now.

    ``task_loss``: the cross-entropy of the step's logits (detached, fp32, penalties left out so
    that methods compare) as a 0-d device tensor. ``tokens``: the non-padding tokens of the
    batch, a 0-d device tensor (the attention mask's sum), or an int when the batch has no
    mask (every token counts).
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
        cuda_graphs: the run will capture its steps in CUDA graphs; implies ``static_inputs``.
            Capture itself is not here yet: every step still runs eagerly (see `step`).
    """

    def __init__(self, run: MethodRun, placement: Optional[Placement] = None,
                 grad_clip: Optional[float] = None, static_inputs: bool = False,
                 cuda_graphs: bool = False) -> None:
        self.run = run
        self.placement = placement or Placement(torch.device("cpu"), "fp32")
        self.grad_clip = grad_clip
        self.cuda_graphs = cuda_graphs
        self.static_inputs = static_inputs or cuda_graphs
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        # the latest step's total loss: it lives until the next step's replaces it, as a loop
        # variable would (the memory breakdown counts what it still holds)
        self.loss: Optional[torch.Tensor] = None
        self._static: Optional[Dict[str, torch.Tensor]] = None

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
        """Forward ``batch`` (already on the device) under autocast, add the method's penalty,
        and backward (the scaled loss under fp16); returns the model's output."""
        place = self.placement
        with place.autocast():
            out = self.run.model(**batch)
        loss = out.loss
        penalty = self.run.penalty()  # in fp32, outside autocast
        if penalty is not None:
            loss = loss + penalty
        self.loss = loss
        if place.scaler is not None:
            place.scaler.scale(loss).backward()
        else:
            loss.backward()
        return out

    def update(self, step: int) -> None:
        """Everything after backward: unscale (fp16), clip, ``before_optimizer_step``, the
        optimizer step (fp16: skipped when the scaled gradients overflowed),
        ``after_optimizer_step`` and ``zero_grad(set_to_none=True)``."""
        run, scaler = self.run, self.placement.scaler
        if scaler is not None:
            scaler.unscale_(run.optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        run.before_optimizer_step(step, loss_scale=self.placement.loss_scale)
        if scaler is not None:
            scaler.step(run.optimizer)
            scaler.update()
        else:
            run.optimizer.step()
        run.after_optimizer_step(step)
        run.optimizer.zero_grad(set_to_none=True)

    def step(self, step: int, batch: Dict[str, torch.Tensor]) -> StepResult:
        """One training step on ``batch`` (on the host or the device); nothing is read on the
        host here.

        Every step runs eagerly. This is where CUDA graphs will come in: with ``cuda_graphs``,
        a step for which ``run.allocation_due(step)`` is False (fixed slot layout, static
        inputs) is the one to replay from a captured graph (one for tracked steps, one for
        untracked), while allocation rounds stay eager.
        """
        batch = self.inputs(batch)
        out = self.forward_backward(step, batch)
        self.update(step)
        task_loss = F.cross_entropy(out.logits.detach().float(), batch["labels"])
        mask = batch.get("attention_mask")
        tokens = mask.sum() if mask is not None else batch["input_ids"].numel()
        return StepResult(task_loss, tokens)
