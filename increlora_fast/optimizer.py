"""`IncreLoRAAdamW`: one AdamW optimizer over fixed tensors with per-slot restart warmup.

For adapter tensors every slot (row of A, column of B, entry of lambda) has
- its own learning-rate schedule starting at the step the slot was allocated (A, B) or activated
  (lambda): linear warmup over ``warmup_steps``, then linear decay to 0 at ``total_step`` (spec
  section 5, the authors' per-group schedulers on fixed shapes);
- fresh moments and bias correction whenever the layer re-allocates or activates it, detected by
  comparing the layer's ``slot_alloc_step`` / ``slot_active_step`` with what the optimizer last saw;
- a mask: inactive slots, and reserve lambdas, are left bitwise unchanged (no weight-decay drift).
Other trainable parameters (e.g. a classifier) follow the ordinary warmup + linear decay from step 0.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .config import IncreLoRAConfig
from .functional import select_backend
from .layer import IncreLoRALinear
from .model import get_config, increlora_layers
from .optim_functional import masked_adamw_torch_

ADAPTER_SLOT_DIM = {"lora_A": 0, "lora_B": 1, "lora_lambda": 0}


def schedule_multiplier(step: torch.Tensor, start: torch.Tensor, warmup_steps: int,
                        total_step: Optional[int]) -> torch.Tensor:
    """Learning-rate multiplier at optimizer step ``step`` of a schedule that began at ``start``.

    Linear warmup from 0 over ``warmup_steps``, then linear decay reaching 0 at ``total_step``
    (constant 1 when ``total_step`` is None), as transformers' linear schedule shifted to ``start``.
    """
    step = torch.as_tensor(step, dtype=torch.float64)
    start = torch.as_tensor(start, dtype=torch.float64)
    since = step - start
    if warmup_steps > 0:
        warm = since / warmup_steps
    else:
        warm = torch.ones_like(since)
    if total_step is None:
        decay = torch.ones_like(since)
    else:
        decay = ((total_step - step) / (total_step - start - warmup_steps).clamp(min=1)).clamp(min=0)
    return torch.where(since < warmup_steps, warm, decay).clamp(min=0)


def _masked_adamw(param: torch.Tensor, *args, **kwargs) -> None:
    if param.is_cuda and select_backend(param) == "triton":
        from .kernels.adamw import masked_adamw_triton_
        masked_adamw_triton_(param, *args, **kwargs)
    else:
        masked_adamw_torch_(param, *args, **kwargs)


class IncreLoRAAdamW(torch.optim.Optimizer):
    """AdamW with per-slot schedules and masks for IncreLoRA adapters; build it with
    `create_optimizer`. ``lr`` in each group is the base learning rate; the schedule is applied
    inside `step`, so no separate LR scheduler is needed (or wanted)."""

    def __init__(self, params: Iterable[dict], slots: Dict[int, Tuple[IncreLoRALinear, str]],
                 lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, warmup_steps: int = 0,
                 total_step: Optional[int] = None) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"IncreLoRAAdamW got lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}: need lr > 0, eps > 0, "
                             "weight_decay >= 0 and betas in [0, 1)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        warmup_steps=warmup_steps, total_step=total_step)
        super().__init__(params, defaults)
        self._slots = slots
        self.global_step = 0

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["global_step"] = self.global_step
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.global_step = int(state_dict.pop("global_step", 0))
        super().load_state_dict(state_dict)

    def current_lr_multiplier(self, start: int = 0) -> float:
        """Schedule multiplier the next step applies to a schedule that began at ``start``."""
        g = self.param_groups[0]
        return float(schedule_multiplier(self.global_step, start, g["warmup_steps"], g["total_step"]))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.global_step
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if id(p) in self._slots:
                    self._step_adapter(p, group, t)
                else:
                    self._step_dense(p, group, t)
        self.global_step += 1
        return loss

    def _step_dense(self, p: torch.Tensor, group: dict, t: int) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr = group["lr"] * float(schedule_multiplier(t, 0, group["warmup_steps"], group["total_step"]))
        one = torch.ones(1, dtype=torch.bool, device=p.device)
        flat = lambda v: v.view(1, -1)  # noqa: E731 - one slot holding the whole tensor
        _masked_adamw(flat(p), flat(p.grad), flat(state["exp_avg"]), flat(state["exp_avg_sq"]),
                      one, torch.full((1,), lr, device=p.device),
                      state["step"].reshape(1).to(p.device), 0, beta1, beta2, group["eps"],
                      group["weight_decay"])

    def _step_adapter(self, p: torch.Tensor, group: dict, t: int) -> None:
        layer, kind = self._slots[id(p)]
        slot_dim = ADAPTER_SLOT_DIM[kind]
        r = layer.r_max
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["slot_count"] = torch.zeros(r, dtype=torch.float32, device=p.device)
            state["seen_alloc"] = torch.full((r,), -2, dtype=torch.long, device=p.device)
            state["seen_active"] = torch.full((r,), -2, dtype=torch.long, device=p.device)
        fresh = state["seen_alloc"] != layer.slot_alloc_step
        if kind == "lora_lambda":
            fresh |= state["seen_active"] != layer.slot_active_step
        if bool(fresh.any()):
            keep = (~fresh).to(p.dtype)
            shape = [1] * p.dim()
            shape[slot_dim] = r
            state["exp_avg"].mul_(keep.view(shape))
            state["exp_avg_sq"].mul_(keep.view(shape))
            state["slot_count"].masked_fill_(fresh, 0)
            state["seen_alloc"].copy_(layer.slot_alloc_step)
            state["seen_active"].copy_(layer.slot_active_step)
        ab_mask, lam_mask = layer.trainable_slot_masks()
        mask = lam_mask if kind == "lora_lambda" else ab_mask
        start = layer.slot_active_step if kind == "lora_lambda" else layer.slot_alloc_step
        state["slot_count"] += mask.to(torch.float32)
        mult = schedule_multiplier(torch.tensor(t), start.cpu(), group["warmup_steps"],
                                   group["total_step"])
        slot_lr = (group["lr"] * mult).to(device=p.device, dtype=torch.float32)
        beta1, beta2 = group["betas"]
        _masked_adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"], mask, slot_lr,
                      state["slot_count"], slot_dim, beta1, beta2, group["eps"],
                      group["weight_decay"])


def create_optimizer(model: nn.Module, config: Optional[IncreLoRAConfig] = None, lr: float = 1e-3,
                     weight_decay: float = 0.0, betas: Tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8) -> IncreLoRAAdamW:
    """One `IncreLoRAAdamW` over every trainable parameter of an injected model.

    Adapter slots get restart warmup (``config.warmup_steps``, ``config.total_step``); other
    trainable parameters get the same warmup and decay from step 0.
    """
    config = config or get_config(model)
    slots: Dict[int, Tuple[IncreLoRALinear, str]] = {}
    adapter, dense = [], []
    for _, layer in increlora_layers(model):
        for kind in ADAPTER_SLOT_DIM:
            param = getattr(layer, kind)
            slots[id(param)] = (layer, kind)
            adapter.append(param)
    for p in model.parameters():
        if p.requires_grad and id(p) not in slots:
            dense.append(p)
    groups = [{"params": adapter, "name": "increlora"}]
    if dense:
        groups.append({"params": dense, "name": "other"})
    return IncreLoRAAdamW(groups, slots, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                          warmup_steps=config.warmup_steps, total_step=config.total_step)
