"""The masked, per-slot AdamW update on plain tensors (the reference for the fused kernel).

An adapter tensor holds one slot per index along ``slot_dim`` (rows of A, columns of B, entries
of lambda). Each slot has its own learning rate (restart warmup), its own Adam step count (fresh
moments start their bias correction anew) and a mask: a masked-out slot is left bitwise unchanged,
parameter and moments alike.
"""
from __future__ import annotations

import torch


def _along(v: torch.Tensor, slot_dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[slot_dim] = -1
    return v.reshape(shape)


@torch.no_grad()
def masked_adamw_torch_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                        exp_avg_sq: torch.Tensor, slot_mask: torch.Tensor, slot_lr: torch.Tensor,
                        slot_count: torch.Tensor, slot_dim: int, beta1: float, beta2: float,
                        eps: float, weight_decay: float) -> None:
    """One AdamW step on the slots where ``slot_mask`` is true, in place.

    Args:
        slot_mask: (r,) bool, slots to update.
        slot_lr: (r,) float32, learning rate of each slot (base lr x its schedule multiplier).
        slot_count: (r,) float32, Adam step count of each slot including this step (>= 1 where
            masked in).
        slot_dim: the dimension of ``param`` that indexes slots.

    Math per updated element, with ``n = slot_count`` and ``lr = slot_lr`` of its slot::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p * (1 - lr * weight_decay) - lr * (m / (1 - beta1**n)) / (sqrt(v / (1 - beta2**n)) + eps)

    computed in float32 and written back in the parameter's dtype.
    """
    nd = param.dim()
    mask = _along(slot_mask, slot_dim, nd)
    lr = _along(slot_lr.float(), slot_dim, nd)
    n = _along(slot_count.float().clamp(min=1), slot_dim, nd)
    g = grad.float()
    m = torch.where(mask, beta1 * exp_avg.float() + (1 - beta1) * g, exp_avg.float())
    v = torch.where(mask, beta2 * exp_avg_sq.float() + (1 - beta2) * g * g, exp_avg_sq.float())
    bc1 = 1 - beta1 ** n
    bc2 = 1 - beta2 ** n
    p = param.float()
    new_p = p * (1 - lr * weight_decay) - lr * (m / bc1) / ((v / bc2).sqrt() + eps)
    param.copy_(torch.where(mask, new_p, p).to(param.dtype))
    exp_avg.copy_(m.to(exp_avg.dtype))
    exp_avg_sq.copy_(v.to(exp_avg_sq.dtype))
