"""The masked, per-slot AdamW update on plain tensors (the reference for the fused kernel).

An adapter tensor holds one slot per index along ``slot_dim`` (rows of A, columns of B, entries
of lambda). Each slot has its own learning rate (restart warmup), its own Adam step count (fresh
moments start their bias correction anew) and a mask: a masked-out slot is left bitwise unchanged,
parameter and moments alike, and so is a slot whose step count, this step included, is below 1
(a slot changed at this step, which like a parameter just added to AdamW takes no step on its
zero gradient: no weight decay either).
"""
from __future__ import annotations

from typing import Tuple

import torch


def along_slot_dim(v: torch.Tensor, slot_dim: int, ndim: int) -> torch.Tensor:
    """Per-slot values ``v`` of shape (..., r) shaped to broadcast against tensors of shape
    (..., *shape) with ``ndim`` = len(shape) and the slots along ``slot_dim`` of ``shape``."""
    shape = [1] * ndim
    shape[slot_dim] = -1
    return v.reshape(*v.shape[:-1], *shape)


@torch.no_grad()
def masked_adamw_into(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                      exp_avg_sq: torch.Tensor, mask: torch.Tensor, lr: torch.Tensor,
                      count: torch.Tensor, beta1: float, beta2: float, eps: float,
                      weight_decay: float, out: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                      ) -> None:
    """The step of `masked_adamw_torch_`: (param, exp_avg, exp_avg_sq) after it written into
    ``out``, three tensors of the inputs' shapes and dtypes, which may be the inputs themselves
    (the step in place).

    ``mask`` (bool), ``lr`` and ``count`` (float32) broadcast against ``param``. Where ``mask``
    is false or ``count`` below 1 ``out`` receives the inputs' own elements, bit for bit,
    whatever was computed there.
    """
    # The float32 operations of the formula, in its order (the fused kernel follows it too).
    g = grad.float()
    m = exp_avg.float() * beta1
    m += (1 - beta1) * g
    v = exp_avg_sq.float() * beta2
    v += (1 - beta2) * g * g
    n = count.float().clamp(min=1)
    step = m / (1 - beta1 ** n)
    step *= lr
    denom = v / (1 - beta2 ** n)
    denom.sqrt_()
    denom += eps
    step /= denom
    p = param.float() * (1 - lr * weight_decay)
    p -= step
    on = mask & (count >= 1)  # a slot of count 0 takes no step (see the module docstring)
    for new, old, dst in zip((p, m, v), (param, exp_avg, exp_avg_sq), out):
        torch.where(on, new.to(old.dtype), old, out=dst)


@torch.no_grad()
def masked_adamw_torch_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                        exp_avg_sq: torch.Tensor, slot_mask: torch.Tensor, slot_lr: torch.Tensor,
                        slot_count: torch.Tensor, slot_dim: int, beta1: float, beta2: float,
                        eps: float, weight_decay: float) -> None:
    """One AdamW step on the slots where ``slot_mask`` is true and ``slot_count`` >= 1, in place;
    every other slot is left bitwise unchanged, parameter and moments.

    Args:
        slot_mask: (r,) bool, slots to update.
        slot_lr: (r,) float32, learning rate of each slot (base lr x its schedule multiplier).
        slot_count: (r,) float32, Adam step count of each slot including this step: a whole
            number, >= 1 where the slot takes a step; 0 (or below) leaves it unchanged like a
            masked-out slot (a slot the controller changed at this step, whose gradient is
            zero: no step at all, weight decay included).
        slot_dim: the dimension of ``param`` that indexes slots.

    Math per updated element, with ``n = slot_count`` and ``lr = slot_lr`` of its slot::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p * (1 - lr * weight_decay) - lr * (m / (1 - beta1**n)) / (sqrt(v / (1 - beta2**n)) + eps)

    computed in float32 and written back in the parameter's dtype.
    """
    nd = param.dim()
    masked_adamw_into(param, grad, exp_avg, exp_avg_sq, along_slot_dim(slot_mask, slot_dim, nd),
                      along_slot_dim(slot_lr.float(), slot_dim, nd),
                      along_slot_dim(slot_count, slot_dim, nd), beta1, beta2, eps, weight_decay,
                      out=(param, exp_avg, exp_avg_sq))
