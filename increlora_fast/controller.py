"""`IncreLoRAController`: importance scores, incremental rank allocation, orthogonal penalty.

The controller decides; the layers compute. Call ``step(step)`` once per optimizer step, after
backward (and gradient clipping) and before ``optimizer.step()``; ``step`` is the 0-based index of
that optimizer step.

With ``score="delta_w"`` the exact score is tracked only inside the window of
``IncreLoRAConfig.score_window`` steps before each allocation round (`IncreLoRAController.is_tracked`):
at the end of ``step(s)`` the controller switches the layers' ``score_enabled`` on or off for the
forward and backward passes of step ``s + 1``, so untracked steps pay nothing for the score.

Outside allocation rounds ``step(s)`` and `IncreLoRAController.regularization_loss` read no tensor
on the host (no device sync; the step can later be captured in a CUDA graph): the scores and their
EMAs stay on the layers' device, a step with non-finite scores is dropped with ``torch.where``, and
its warning waits for the next allocation round, where the host is read anyway. The penalty
(`penalty.OrthogonalPenalty`) caches its masks and rebuilds them only when a layer's
``slot_version`` changes.
"""
from __future__ import annotations

import logging
import math
import random
import warnings
from typing import Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .config import IncreLoRAConfig
from .device_scalar import DeviceScalar
from .functional import kernel_readable
from .layer import IncreLoRALinear
from .model import (frozen_adapters_message, fsdp1_sharded_adapter_message, get_config,
                    increlora_layers, keep_adapters_in_fast_paths, older_saved_name)
from .optimizer import in_increlora_optimizer
from .penalty import OrthogonalPenalty

logger = logging.getLogger("increlora_fast")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _first_names(names: List[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names`` and how many more, for a warning."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def default_score_window(beta1: float, beta2: float) -> int:
    """Smallest window W with max(beta1, beta2) ** W < 1 %: the weight the EMAs give to steps
    before the window (29 at 0.85)."""
    beta = max(beta1, beta2)
    if beta == 0:
        return 1
    return max(1, math.ceil(math.log(0.01) / math.log(beta)))


def triplet_score(layer: IncreLoRALinear) -> torch.Tensor:
    """AdaLoRA-style sensitivity of a module from the current gradients: the mean over active
    slots of |lambda*dlambda| + mean_in |A*dA| + mean_out |B*dB|."""
    zero = torch.zeros((), device=layer.lora_A.device)
    g_a, g_b, g_l = (getattr(layer, k).grad for k in ("lora_A", "lora_B", "lora_lambda"))
    per_slot = torch.zeros(layer.r_max, dtype=torch.float32, device=layer.lora_A.device)
    if g_l is not None:
        per_slot += (layer.lora_lambda * g_l).abs().float()
    if g_a is not None:
        per_slot += (layer.lora_A * g_a).abs().float().mean(dim=1)
    if g_b is not None:
        per_slot += (layer.lora_B * g_b).abs().float().mean(dim=0)
    active = layer.active_mask
    return torch.where(active, per_slot, zero).sum() / active.sum().clamp(min=1)


class IncreLoRAController:
    """Tracks module importance and grows ranks until the total budget is met.

    Args:
        model: a model returned by `inject_increlora` (or holding layers built by hand, with
            ``config`` given: an nn.TransformerEncoderLayer holding one gets its inference fast
            path kept off, `keep_adapters_in_fast_paths`).
        config: defaults to the config attached to the model.

    Warns (RuntimeWarning) when every adapter tensor of the model is frozen
    (`frozen_adapters_message`), e.g. by peft's ``prepare_model_for_kbit_training`` called
    after `inject_increlora`: training would change nothing.

    Raises:
        ValueError: the model holds no IncreLoRA layer, or FSDP1 shards its adapter tensors
            (`fsdp1_sharded_adapter_message`).
    """

    def __init__(self, model: nn.Module, config: Optional[IncreLoRAConfig] = None) -> None:
        self.config = config or get_config(model)
        self.config.validate()  # a field may have changed since injection
        named = list(increlora_layers(model))
        if not named:
            raise ValueError("model has no IncreLoRA layers: call inject_increlora first")
        sharded = fsdp1_sharded_adapter_message(model)
        if sharded is not None:
            raise ValueError(f"IncreLoRAController: {sharded}")
        keep_adapters_in_fast_paths(model)  # layers built by hand, not injected
        self.names: List[str] = [n for n, _ in named]
        self.layers: List[IncreLoRALinear] = [m for _, m in named]
        self.total_budget = self.config.total_budget(len(self.layers))
        # Smoothed importance and uncertainty (float64, on the layers' device), and the first
        # step whose scores were non-finite and not yet warned about (-1: none).
        device = self.layers[0].lora_A.device
        self.ipt = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        self.unc = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        self._nonfinite_step = torch.full((), -1, dtype=torch.long, device=device)
        # Whether the last tracked step's scores were all finite, read by its round.
        self._finite = torch.ones((), dtype=torch.bool, device=device)
        # The step index on the EMAs' device, read by the non-finite bookkeeping.
        self._device_steps = DeviceScalar(torch.long)
        self.penalty = OrthogonalPenalty(self.layers, self.config)
        self.allocation_log: List[dict] = []
        self.budget_reached = False
        self.round_pending = False
        self._warned_nonfinite = False
        self._warned_no_data = False
        self._warned_idle = False
        self._warned_frozen = False
        self._warned_optimizer = False
        # Whether this run's length was checked against the budget: the Trainer and finetune
        # check it with their own option names (`budget_out_of_reach`); otherwise (a manual
        # loop) the first `step`, at step 0, says what config.total_step gives, worked out here
        # so that the step reads nothing on the host.
        self.budget_reach_checked = False
        self._note_adapter_versions()
        # Fresh reserve slots are drawn from the controller's own generator: every
        # data-parallel rank draws the same values, and state_dict() carries its state.
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._warned_untracked = False
        self._warned_skip = False
        self.exact_step_score = bool(self.config.exact_step_score)
        # While true, `step` at an allocation round does only its device work (the scores into
        # the EMAs) and leaves the round to `finish_replayed_round`: a CUDA graph captures that
        # device work at a round step, and the round runs on the host after its replay.
        self.defer_round = False
        window = self.config.score_window
        self.score_window = window if window is not None else default_score_window(
            self.config.beta1, self.config.beta2)
        # The optimizer step the layers' tracking flags are set for (None: not known).
        self._next_step: Optional[int] = 0
        self._tracking = False
        if self.current_total_rank() >= self.total_budget:
            self._finish()
        self._reach_warning = (self._reach_message(0, self.config.total_step,
                                                   "IncreLoRAConfig.total_step")
                               if self.config.total_step is not None else None)
        self._set_tracking(self.is_tracked(0))
        frozen = frozen_adapters_message(model)
        if frozen is not None:  # the round's warning about frozen lambdas would come too late
            self._warned_frozen = True
            warnings.warn(f"{frozen} (warned once)", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ queries
    def budget_out_of_reach(self, start_step: int, end_step: int, length: str) -> Optional[str]:
        """The warning that the allocation rounds among optimizer steps ``start_step ..
        end_step - 1`` cannot reach the rank budget whatever the scores
        (`IncreLoRAConfig.reachable_total_rank`), or None when they can or it is reached.
        ``length`` names the setting ``end_step`` comes from (``"max_steps"``). Marks the run's
        length as checked (`budget_reach_checked`)."""
        self.budget_reach_checked = True
        return self._reach_message(start_step, end_step, length)

    def _reach_message(self, start_step: int, end_step: int, length: str) -> Optional[str]:
        """`budget_out_of_reach`'s text, without marking anything (reads the ranks)."""
        if self.budget_reached:
            return None
        config, modules = self.config, len(self.layers)
        reach = config.reachable_total_rank([layer.active_rank for layer in self.layers],
                                            start_step, end_step)
        if reach >= self.total_budget:
            return None
        return (f"IncreLoRA: {config.allocation_rounds(start_step, end_step)} allocation "
                f"round(s) in steps {start_step}-{end_step - 1} (IncreLoRAConfig.init_warmup "
                f"{config.init_warmup}, incre_interval {config.incre_interval}), each growing "
                f"at most top_h {config.top_h} module(s) by {config.incre_rank_num} (or what "
                f"is left of r_max {config.r_max}), reach a "
                f"total rank of at most {reach} of the budget's {self.total_budget}: the run "
                f"ends below it; train longer ({length}), "
                + ("lower init_warmup or incre_interval, or raise top_h"
                   if config.top_h < modules else "or lower init_warmup or incre_interval"))

    def current_total_rank(self) -> int:
        return sum(layer.active_rank for layer in self.layers)

    @property
    def next_step(self) -> Optional[int]:
        """The optimizer step index `step` expects next: 0 for a new controller, one past the
        last step it took, kept from the step of the round that reached the budget on; None
        when not known (a state saved before it was recorded)."""
        return self._next_step

    def rank_pattern(self) -> Dict[str, int]:
        """{module name: active rank}."""
        return {n: layer.active_rank for n, layer in zip(self.names, self.layers)}

    def importance(self) -> torch.Tensor:
        """Final module scores (smoothed importance x uncertainty), in module order, as a CPU
        float64 tensor (a host read)."""
        return (self.ipt * self.unc).cpu()

    def is_tracked(self, step: int) -> bool:
        """Whether optimizer step ``step`` updates the scores, given the current state.

        False once the budget is reached. With ``score="delta_w"``: True while a round is pending
        (it waits for the next finite step) and on the ``score_window`` steps up to and including
        each allocation round; every step when the window is at least ``incre_interval``. The
        triplet score, read from ``.grad``, is tracked on every step of the allocation phase.
        """
        if self.budget_reached:
            return False
        cfg = self.config
        if cfg.score != "delta_w" or self.round_pending or self.score_window >= cfg.incre_interval:
            return True
        interval = cfg.incre_interval
        first_round = (cfg.init_warmup // interval + 1) * interval
        next_round = max(first_round, -(-step // interval) * interval)
        return next_round - step < self.score_window

    # ------------------------------------------------------------------ the step
    def step(self, step: int, loss_scale: Union[float, torch.Tensor] = 1.0,
             overflow: Optional[torch.Tensor] = None) -> None:
        """Update scores from this step's gradients and grow ranks when the schedule says so.

        Args:
            step: 0-based index of the optimizer step about to be taken (counted across
                epochs: an index the controller already took raises ValueError; one that
                skips steps is warned about once, and a round due at a skipped step runs at
                this one).
            loss_scale: the factor the loss was multiplied by before backward (fp16: the
                GradScaler's scale, a float or, read without a host sync, its 0-d device tensor:
                `device_scalar.grad_scaler_scale`); the ``delta_w`` score, taken from the scaled
                output gradient, is divided by it (triplet scores read the unscaled ``.grad``: call
                ``scaler.unscale_(optimizer)`` first, as for clipping).
            overflow: fp16: the GradScaler's overflow flag of this step, nonzero when a
                gradient is inf or NaN and the optimizer step will be skipped (a 0-d device
                tensor, `device_scalar.unscale_once`). The step is then skipped here too, also
                when the overflow is outside the adapters (a trained head) and their scores
                are finite.

        A step with non-finite scores (overflow, NaN loss) changes nothing, and an allocation
        round due at it waits for the next finite step; the warning about it (once) comes at the
        next allocation round. Steps outside the score window (`is_tracked`) change nothing
        either; at the end the layers' tracking is set for ``step + 1``.

        Only allocation rounds (a due or pending round) read tensors on the host; other steps
        only queue device work.
        """
        if self.budget_reached:
            return
        if self._next_step is not None and step < self._next_step:
            # A repeated index (or one restarting at 0 every epoch) would run its allocation
            # round again and feed a zero score into the EMAs.
            raise ValueError(f"IncreLoRA: controller.step({step}) after the controller took "
                             f"step {self._next_step - 1}: the index is that of the optimizer "
                             f"step, counted from 0 across epochs and increasing (next: step "
                             f"{self._next_step}); call step() once per optimizer step")
        if self._next_step is not None and step > self._next_step:
            self._note_skipped(step)
        if not self.budget_reach_checked:
            self.budget_reach_checked = True
            if self._reach_warning and step == 0:  # (a resumed run was told at its step 0)
                warnings.warn(self._reach_warning, RuntimeWarning, stacklevel=2)
        due = self.allocation_due(step)
        self._update(step, loss_scale, due, overflow)
        if due and self.defer_round:  # `finish_replayed_round` does the rest
            return
        self._end_step(step)

    def _note_skipped(self, step: int) -> None:
        """``step`` skips the steps from ``_next_step`` on: a round due at one of them waits
        for this step, and the skip is named (once): an index that is not the optimizer's step
        (a micro-batch index, a count from 1) also leaves the slots' stamps off the optimizer's
        schedules. A controller that took no step yet (one made mid-training) skipped no round:
        the rounds before its first step were another controller's, so none waits."""
        first = self._next_step == 0
        if not first and self.config.allocation_rounds(self._next_step, step) > 0:
            self.round_pending = True
        if self._warned_skip:
            return
        self._warned_skip = True
        skipped = (f"step {self._next_step}" if step == self._next_step + 1
                   else f"steps {self._next_step} to {step - 1}")
        made_late = (" (or this controller was made mid-training: it starts without the scores "
                     "and rounds of the one before it, so its first round is the next one due; "
                     "load that one's state_dict to resume them)") if first else \
            " (a round due at a skipped step runs at the next step given)"
        warnings.warn(f"IncreLoRA: controller.step({step}) skips {skipped}: the index is "
                      "that of the optimizer step (0, 1, 2, ...; not of a micro-batch), "
                      "which IncreLoRAAdamW's per-slot schedules count too; call step() "
                      f"once per optimizer step{made_late}; warned once", RuntimeWarning)

    def _end_step(self, step: int) -> None:
        """The host side of the end of ``step``: the layers' tracking set for ``step + 1``."""
        if not self.budget_reached:
            self._next_step = step + 1
            self._set_tracking(self.is_tracked(step + 1))

    def allocation_due(self, step: int) -> bool:
        """Whether ``step`` is an allocation round (after ``init_warmup``, every
        ``incre_interval`` steps) or a round is pending from an earlier step, while the budget
        is not reached: the steps that read the host and may change slot states."""
        if self.budget_reached:
            return False
        cfg = self.config
        return self.round_pending or (step > cfg.init_warmup and step % cfg.incre_interval == 0)

    def _update(self, step: int, loss_scale: Union[float, torch.Tensor], due: bool,
                overflow: Optional[torch.Tensor] = None) -> None:
        cfg = self.config
        if not self.is_tracked(step):
            if self._tracking:  # passes tracked by a controller that did not know the step
                for layer in self.layers:
                    layer.release_score_buffers()
            return
        if cfg.score == "delta_w" and not self._tracking:
            self.round_pending = due
            if not self._warned_untracked:
                self._warned_untracked = True
                warnings.warn(f"IncreLoRA: controller.step({step}) is inside the score window but "
                              f"its passes ran untracked (tracking was set for step "
                              f"{self._next_step}); call step() once per optimizer step with "
                              "consecutive indices (a due allocation round waits for the next "
                              "step; warned once)", RuntimeWarning)
            return
        if not self._has_backward_data():
            self.round_pending = due
            if not self._warned_no_data:
                self._warned_no_data = True
                warnings.warn(f"IncreLoRA: controller.step({step}) found no gradients or scores; "
                              "call it after backward and before optimizer.zero_grad() (a due "
                              "allocation round waits for the next step; warned once)",
                              RuntimeWarning)
            return
        self._scores_into_emas(step, loss_scale, overflow)
        if due and not self.defer_round:
            self._round(step)

    def _scores_into_emas(self, step: int, loss_scale: Union[float, torch.Tensor],
                          overflow: Optional[torch.Tensor] = None) -> None:
        """The device work of a tracked step: the step's scores into the EMAs (in place), a
        non-finite or overflowed step noted and skipped on the device."""
        cfg = self.config
        scores = self._collect_scores()
        if cfg.score == "delta_w":
            scores = scores / loss_scale  # fused/exact scores come from the scaled dy
        self._move_scores_to(scores.device)
        # A non-finite step leaves the EMAs as they were, decided on the device.
        finite = torch.isfinite(scores).all()
        if overflow is not None:
            finite = finite & (overflow.to(finite.device, non_blocking=True) == 0)
        self._finite.copy_(finite)
        b1, b2 = cfg.beta1, cfg.beta2
        ipt = b1 * self.ipt + (1 - b1) * scores
        unc = b2 * self.unc + (1 - b2) * (scores - ipt).abs()
        # In place: a step captured in a CUDA graph updates the very tensors the next replay
        # reads (a rebinding would leave the replay reading the captured step's inputs).
        self.ipt.copy_(torch.where(finite, ipt, self.ipt))
        self.unc.copy_(torch.where(finite, unc, self.unc))
        if not self._warned_nonfinite:
            self._nonfinite_step.copy_(torch.where(finite | (self._nonfinite_step >= 0),
                                                   self._nonfinite_step,
                                                   self._device_steps.get(step,
                                                                          self.ipt.device)))

    @torch.no_grad()
    def load_update_kernels(self, step: int,
                            loss_scale: Union[float, torch.Tensor] = 1.0,
                            overflow: Optional[torch.Tensor] = None) -> None:
        """Run the device work of a tracked step (`step` without its round) on the scores the
        layers hold and put the controller's tensors and the layers' score sums back: what a
        step does, undone. It loads the kernels a tracked step launches (CUDA cannot load one
        while a stream captures), before the first capture of a tracked step that follows only
        untracked ones (`training.cuda_graphs.GraphedSteps`'s kernel preload calls it after a
        tracked forward and backward). Does nothing where no layer tracks scores, with another
        score than the exact one, with `exact_step_score` or once the budget is reached. Under
        torch.distributed it all-reduces the scores as a step does: every rank must call it."""
        if self.budget_reached or self.config.score != "delta_w" or self.exact_step_score \
                or not any(layer.score_enabled for layer in self.layers):
            return
        self._move_scores_to(self.layers[0].lora_A.device)
        state = (self.ipt, self.unc, self._finite, self._nonfinite_step)
        kept = [t.clone() for t in state]
        sums = [layer.score_sum.clone() for layer in self.layers]
        try:
            self._scores_into_emas(step, loss_scale, overflow)
        finally:
            for t, value in zip(state, kept):
                t.copy_(value)
            for layer, value in zip(self.layers, sums):
                layer.score_sum.copy_(value)

    def _round(self, step: int) -> None:
        """An allocation round, once the step's scores are in the EMAs (reading the host is
        allowed here): grow the top modules, unless the scores were not finite (then the round
        waits for the next step)."""
        self._warn_nonfinite()
        self._warn_idle(step)
        self._warn_other_optimizer(step)
        self.round_pending = not bool(self._finite)
        if not self.round_pending:
            self._allocate(step)
            self.refresh_cached_masks()
        self._note_adapter_versions()

    def _note_adapter_versions(self) -> None:
        """Remember each layer's ``lora_A`` version counter (host only), which an optimizer's
        in-place update moves: `_warn_other_optimizer` compares it at the next round."""
        self._adapter_versions = [layer.lora_A._version for layer in self.layers]

    def _warn_other_optimizer(self, step: int) -> None:
        """Warn (once) when adapters that no `IncreLoRAAdamW` holds (an optimizer not made by
        `create_optimizer`, e.g. a plain ``torch.optim.AdamW``) were updated since the last
        round: it trains them, but new slots get no restart warmup and no fresh moments or
        Adam step count, and slots not in use take its weight decay. Host values only (the
        version counters of ``lora_A`` and the record of the live `IncreLoRAAdamW`s holding each
        layer, `optimizer.in_increlora_optimizer`)."""
        if self._warned_optimizer:
            return
        moved = [name for name, layer, version in zip(self.names, self.layers,
                                                      self._adapter_versions)
                 if layer.lora_A._version != version
                 and not in_increlora_optimizer(layer)]
        if moved:
            self._warned_optimizer = True
            warnings.warn(f"IncreLoRA: the adapters of {len(moved)} module(s) ({_first_names(moved)}) "
                          f"were updated before allocation round {step} by an optimizer that is "
                          "not IncreLoRAAdamW: it trains them, but new slots get no restart "
                          "warmup (config warmup_steps, total_step), no fresh moments or Adam "
                          "step count, and slots not in use take its weight decay; build it with "
                          "create_optimizer(model, config) (warned once)", RuntimeWarning)

    def finish_replayed_round(self, step: int) -> None:
        """The host side of allocation round ``step`` whose device work (the step's scores into
        the EMAs) ran from a CUDA graph, captured at another tracked step or at this one with
        `defer_round` set: the round itself (it reads the host and changes slot states and
        cached masks in place), then what `step` does at its end. The optimizer's step comes
        after it (`IncreLoRAAdamW.prepare_replay`, then its replay)."""
        if self.budget_reached:
            return
        self._round(step)
        self._end_step(step)

    def sync_device_step(self, step: int) -> None:
        """Before replaying a CUDA graph captured from another step: set the device copy of the
        step index that the captured step reads (one fill, outside the graph)."""
        self._device_steps.get(step, self.ipt.device)

    def note_replayed_step(self, step: int) -> None:
        """The host side of a step whose device work was replayed from a CUDA graph captured
        at another step that was not an allocation round, in the same tracking state: what
        `step` does on the host after its device work (the layers' tracking for ``step + 1``).
        A replayed allocation round takes `finish_replayed_round` instead."""
        self._end_step(step)

    def _move_scores_to(self, device: torch.device) -> None:
        """Keep the EMAs on the scores' device (the model may have moved since construction)."""
        if self.ipt.device != device:
            self.ipt, self.unc = self.ipt.to(device), self.unc.to(device)
            self._nonfinite_step = self._nonfinite_step.to(device)
            self._finite = self._finite.to(device)

    def _warn_nonfinite(self) -> None:
        """Warn (once) about the first step whose scores were non-finite, if any (a host read)."""
        if self._warned_nonfinite:
            return
        first = int(self._nonfinite_step)
        if first >= 0:
            self._warned_nonfinite = True
            warnings.warn(f"IncreLoRA: non-finite importance scores at step {first} (or an "
                          "fp16 overflow); scores and allocation skip such steps (warned once)",
                          RuntimeWarning)

    def _warn_idle(self, step: int) -> None:
        """Warn (once) about adapted modules without a gradient at an allocation round while
        others have one: they were not in the step's forward pass, so they score nothing and
        their rank only waits (a fused LM head that reads the output layer's weight directly,
        as TRL's SFTTrainer has, never runs an adapter there; an expert no token was routed
        to is idle for a step; a module whose output does not reach the loss gets zeros). A
        ``lora_lambda.grad`` that is None, or all zeros (what ``zero_grad(set_to_none=False)``
        leaves of a module that ran before), counts as none: one host read of a flag per
        module, at rounds until the warning is given (a sharded gradient, a tensor subclass,
        is not read: it counts as one)."""
        if self._warned_idle:
            return
        trained = [(name, layer.lora_lambda.grad) for name, layer in zip(self.names, self.layers)
                   if layer.lora_lambda.requires_grad]
        readable = [g for _, g in trained if g is not None and kernel_readable(g)]
        zero = iter(torch.stack([(g == 0).all().to(self.ipt.device) for g in readable]).tolist()
                    if readable else [])
        idle = [name for name, g in trained
                if g is None or (kernel_readable(g) and next(zero))]
        if idle and len(idle) < len(self.layers):
            self._warned_idle = True
            shown = _first_names(idle)
            warnings.warn(f"IncreLoRA: {len(idle)} adapted module(s) got no gradient at "
                          f"allocation round {step}: {shown}. They were not in this step's "
                          "forward pass (e.g. a fused LM head that reads the output layer's "
                          "weight directly, or an expert no token reached) or their output did "
                          "not reach the loss, so they scored nothing at it; a module that "
                          "never runs belongs out of target_modules (warned once)",
                          RuntimeWarning)

    def _has_backward_data(self) -> bool:
        """Whether backward ran since the last step; the score accumulators are read on the host
        only when no adapter has a gradient (a misplaced call)."""
        if any(layer.lora_lambda.grad is not None for layer in self.layers):
            return True
        if self.config.score == "delta_w":
            return any(bool(layer.score_sum != 0) or (layer.score_grad is not None
                                                       and bool(layer.score_grad.any()))
                       for layer in self.layers)
        return False

    @torch.no_grad()  # the triplet score multiplies parameters: keep the EMAs out of autograd
    def _collect_scores(self) -> torch.Tensor:
        device = self.layers[0].lora_A.device
        if self.config.score == "random":  # the ranking ignores scores: compute none
            return torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        if self.config.score == "triplet":
            raw = [triplet_score(layer) for layer in self.layers]
        elif self.exact_step_score:
            raw = [self._exact_score(layer) for layer in self.layers]
        else:
            raw = [layer.take_score() for layer in self.layers]
        scores = torch.stack([r if r.device == device else r.to(device) for r in raw]).double()
        world = _world_size()
        if world > 1:
            if self.config.score == "delta_w" and not self.exact_step_score:
                # Per-pass scores of every rank's micro-batches: one all-reduce of a
                # (num_modules,) vector, divided by the world size as DDP averages gradients.
                dist.all_reduce(scores)
                scores /= world
            dist.broadcast(scores, src=0)  # every rank takes the very same decisions
        return scores

    def _exact_score(self, layer: IncreLoRALinear) -> torch.Tensor:
        grad = layer.take_score_grad()
        world = _world_size()
        if world > 1:
            dist.all_reduce(grad)
            grad /= world
        return (layer.delta_weight().float() * grad).abs().sum() / math.sqrt(grad.numel())

    def _allocate(self, step: int) -> None:
        cfg = self.config
        remaining = self.total_budget - self.current_total_rank()
        if remaining <= 0:  # reached outside the rounds: a grown state dict loaded since
            self._budget_reached(step)
            return
        if cfg.score == "random":
            score = self._random_scores(step)
        else:
            score = torch.nan_to_num(self.importance(), nan=-math.inf)
        # a module whose lambda the user froze cannot use new rank: its share goes elsewhere
        frozen = [name for name, layer in zip(self.names, self.layers)
                  if not layer.lora_lambda.requires_grad]
        if frozen and not self._warned_frozen:
            self._warned_frozen = True
            shown = _first_names(frozen)
            warnings.warn(f"IncreLoRA: {len(frozen)} adapted module(s) have a frozen lora_lambda "
                          f"(requires_grad False): {shown}. They keep their rank and the others "
                          "get their share of the budget (warned once)", RuntimeWarning)
        eligible = [i for i, layer in enumerate(self.layers)
                    if layer.reserve_rank > 0 and layer.lora_lambda.requires_grad]
        if not eligible:  # every module that could take rank is full or frozen
            warnings.warn(f"IncreLoRA: at step {step} no module can take more rank (each is "
                          f"full or has a frozen lora_lambda); allocation stops at a total rank "
                          f"of {self.current_total_rank()} of the budget's {self.total_budget}",
                          RuntimeWarning)
            self._finish()
            self._set_tracking(False)
            return
        # Highest score first; equal scores keep module order (sorted() is stable).
        ranked = sorted(eligible, key=lambda i: -float(score[i]))
        n_modules = min(cfg.top_h, math.ceil(remaining / cfg.incre_rank_num))
        for i in ranked[:n_modules]:
            layer = self.layers[i]
            old_rank = layer.active_rank
            added = layer.activate_reserve(min(cfg.incre_rank_num, remaining), step)
            layer.condition_growth(old_rank, preserve_scale=cfg.scale_preserving_growth,
                                   unit_norm=cfg.normalize_on_activation)
            remaining -= added
            # in the last round too (spec 2): retired at once, the fresh reserve still counts
            # in the penalty and trains through it, as in the authors' code
            layer.add_reserve(cfg.incre_rank_num, step, generator=self.generator)
            entry = {"step": step, "module": self.names[i], "new_rank": layer.active_rank,
                     "score": float(score[i])}
            self.allocation_log.append(entry)
            logger.info("step %d: %s -> rank %d (score %.4g)", step, entry["module"],
                        entry["new_rank"], entry["score"])
        if remaining <= 0:
            self._budget_reached(step)

    def _budget_reached(self, step: int) -> None:
        """End allocation at ``step``, the budget met: reserves retired, tracking off."""
        self._finish()
        self._set_tracking(False)
        logger.info("step %d: rank budget %d reached", step, self.total_budget)

    def _random_scores(self, step: int) -> torch.Tensor:
        """``score="random"``: one uniform draw per module from (config.seed, step) alone, so
        every process, a resumed run and a rerun rank the modules the same way."""
        rng = random.Random(f"increlora-random-score/{self.config.seed}/{step}")
        return torch.tensor([rng.random() for _ in self.layers], dtype=torch.float64)

    def _finish(self) -> None:
        for layer in self.layers:
            layer.retire_reserve()
        self.budget_reached = True

    def passes_track(self, tracked: bool) -> bool:
        """Whether the layers track scores in the forward and backward passes of a step whose
        `is_tracked` is ``tracked``: only the exact ``delta_w`` score is taken in the passes (the
        triplet score reads ``.grad`` after them, the random one takes none). A caller that
        runs passes of a tracking state itself (`training.cuda_graphs.GraphedSteps`) sets the
        layers' ``score_enabled`` to this, so they launch what the state's steps launch."""
        return tracked and self.config.score == "delta_w"

    def stop_tracking(self) -> None:
        """Switch score tracking off in every layer and free its buffers (exact-step mode's
        dense float32 copy of each target weight among them) until `track_step` sets it again,
        which training that goes on calls before its next step's passes (a `step` in the score
        window whose passes ran untracked only warns, and a round due at it waits). For when
        training ends: the end of ``step(s)`` sets the layers up for step ``s + 1``, which a
        finished run never takes, so later passes (a second fine-tuning stage, gradients taken
        for analysis) would pay for scores nobody reads. `integrations.IncreLoRACallback` calls
        it when ``train()`` ends (and `track_step` when it begins)."""
        self._set_tracking(False)

    def track_step(self, step: int) -> None:
        """Set the layers' score tracking to what the passes of optimizer step ``step`` need
        (`is_tracked`), as the end of ``step(step - 1)`` does: to go on after `stop_tracking`."""
        self._set_tracking(self.is_tracked(step))

    def _set_tracking(self, on: bool) -> None:
        """Switch the layers' score tracking (`passes_track`); buffers are released (the dense
        G of exact-step mode freed) whenever tracking turns on or off, and exact-step mode's
        G is allocated here when it turns on: allocated in a forward that torch.compile
        traces, it failed in AOT autograd."""
        on = self.passes_track(on)
        for layer in self.layers:
            if layer.score_enabled != on or layer.exact_step_score != self.exact_step_score:
                layer.release_score_buffers()
            layer.score_enabled = on
            layer.exact_step_score = self.exact_step_score
            if on and self.exact_step_score and layer.score_grad is None:
                layer.score_grad = torch.zeros(layer.out_features, layer.in_features,
                                               dtype=torch.float32, device=layer.lora_A.device)
        self._tracking = on

    # ------------------------------------------------------------------ regularisation
    def regularization_loss(self) -> torch.Tensor:
        """orth_reg_weight x sum over modules of (||A A^T - I|| + ||B^T B - I||) / (2 x modules),
        over active and reserve slots, and after the budget the retired reserves (active only
        with ``reserve_in_penalty=False``): one launch forward and one backward on the Triton
        path, batched over modules of the same shape on the torch path
        (`penalty.OrthogonalPenalty`). Nothing is read on the host.

        Raises:
            RuntimeError: called inside a ``torch.func`` transform while every layer holds its
                own parameters (not those of a ``functional_call``), which the transform
                would take as constants: the penalty would add no gradient.
        """
        # (any layer's: those of adapters frozen on purpose are no functional_call's to pass)
        if torch._C._are_functorch_transforms_active() \
                and not any(torch._C._functorch.is_functorch_wrapped_tensor(t)
                            for layer in self.layers for t in (layer.lora_A, layer.lora_B)):
            raise RuntimeError(
                "controller.regularization_loss() inside a torch.func transform reads the "
                "layers' own parameters, not the ones the transform differentiates, so it "
                "would add no gradient; call it outside the transform "
                "(controller.regularization_loss().backward() adds its gradient to .grad), or "
                "inside the functional_call of a module whose forward calls it")
        return self.penalty.loss()

    def refresh_cached_masks(self) -> None:
        """Bring the penalty's cached masks up to date with the layers' slots now, in place. An
        allocation round calls it, so that a step replayed from a CUDA graph captured before the
        round (which does not run the Python that would refresh them) reads the new masks."""
        self.penalty.refresh_cached_masks()

    @property
    def cache_epoch(self) -> int:
        """How many times the penalty's cached masks were made as new tensors rather than
        refreshed in place (`device_scalar.refresh_in_place`): a CUDA graph captured at another
        count reads tensors the step no longer uses."""
        return self.penalty.cache_epoch

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything needed to resume; the slot states themselves live in the model. It
        reads the host (the scores, and the first non-finite step not yet warned about, which
        the next round warns about: also after a resume)."""
        return {"ipt": self.ipt.detach().cpu().clone(), "unc": self.unc.detach().cpu().clone(),
                "budget_reached": self.budget_reached, "round_pending": self.round_pending,
                "names": list(self.names),
                "allocation_log": [dict(e) for e in self.allocation_log],
                "warned_nonfinite": self._warned_nonfinite,
                "nonfinite_step": int(self._nonfinite_step),
                "next_step": None if self._next_step is None else int(self._next_step),
                "generator": self.generator.get_state()}

    def check_state_dict(self, state: dict) -> None:
        """Raise ValueError unless `load_state_dict` can restore ``state`` completely."""
        if not isinstance(state, dict):
            raise ValueError(f"controller state must be a dict, got {type(state).__name__}")
        required = ("ipt", "unc", "budget_reached", "names", "allocation_log", "warned_nonfinite")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"controller state lacks {missing}")
        names = list(state["names"])
        if names != self.names and not (all(isinstance(n, str) for n in names)
                                        and [older_saved_name(n) for n in names] == self.names):
            extra = sorted(set(state["names"]) - set(self.names))[:3]
            absent = sorted(set(self.names) - set(state["names"]))[:3]
            raise ValueError("controller state is for other modules: "
                             f"{len(state['names'])} saved vs {len(self.names)} in the model "
                             f"(saved only: {extra}; model only: {absent})")
        for key in ("ipt", "unc"):
            value = state[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (len(self.names),):
                raise ValueError(f"controller state {key} must be a tensor of shape "
                                 f"({len(self.names)},)")
        generator = state.get("generator")
        if generator is not None and not (isinstance(generator, torch.Tensor)
                                          and generator.dtype == torch.uint8):
            raise ValueError("controller state generator must be a torch.Generator state "
                             "(a uint8 tensor)")
        log = state["allocation_log"]
        if not isinstance(log, list) or not all(isinstance(entry, dict)
                                                and isinstance(entry.get("module", ""), str)
                                                for entry in log):
            raise ValueError("controller state allocation_log must be a list of dicts (one per "
                             "round)")
        nonfinite = state.get("nonfinite_step", -1)
        if isinstance(nonfinite, bool) or not isinstance(nonfinite, int) or nonfinite < -1:
            raise ValueError("controller state nonfinite_step must be an int >= -1")
        for key in ("budget_reached", "warned_nonfinite", "round_pending"):  # bool("no") is True
            if not isinstance(state.get(key, False), bool):
                raise ValueError(f"controller state {key} must be True or False")
        next_step = state.get("next_step")
        if next_step is not None and (isinstance(next_step, bool) or not isinstance(next_step, int)
                                      or next_step < 0):
            raise ValueError("controller state next_step must be an int >= 0 or None")

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` output; everything is checked first (`check_state_dict`), so a
        state that does not fit raises ValueError and changes nothing. A state saved before
        the controller owned a generator keeps the generator seeded from the config."""
        self.check_state_dict(state)
        generator = torch.Generator().manual_seed(self.config.seed)
        if state.get("generator") is not None:
            generator.set_state(state["generator"])
        device = self.layers[0].lora_A.device
        self.ipt = state["ipt"].to(device=device, dtype=torch.float64, copy=True)
        self.unc = state["unc"].to(device=device, dtype=torch.float64, copy=True)
        self._nonfinite_step = torch.full((), state.get("nonfinite_step", -1), dtype=torch.long,
                                          device=device)
        self._finite = torch.ones((), dtype=torch.bool, device=device)
        self.budget_reached = bool(state["budget_reached"])
        self.round_pending = bool(state.get("round_pending", False))
        current = dict(zip(state["names"], self.names))  # (the same unless saved by older code)
        self.allocation_log = [dict(e, module=current[e["module"]])
                               if e.get("module") in current else dict(e)
                               for e in state["allocation_log"]]
        self._warned_nonfinite = bool(state["warned_nonfinite"])
        self.generator = generator
        # Older states do not say which step comes next: track it; it is dropped if untracked.
        self._next_step = state.get("next_step")
        self._set_tracking(not self.budget_reached if self._next_step is None
                           else self.is_tracked(self._next_step))
