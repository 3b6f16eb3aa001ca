"""TRL's `SFTTrainer` with IncreLoRA (needs the optional ``trl`` extra).

`IncreLoRASFTTrainer` is `SFTTrainer` with everything `IncreLoRATrainer` adds: the per-slot
AdamW, the orthogonal penalty in the loss, scores and allocation after gradient clipping, rank
logging and the controller in every checkpoint. Give it the model returned by
`inject_increlora` (not a ``peft_config``). Gradient checkpointing (SFTConfig's default) works:
transformers checkpoints non-reentrantly, so the adapters inside checkpointed blocks get their
gradients and scores once per backward.

With a stock `SFTTrainer` instead: ``optimizers=increlora_optimizers(model, lr)`` and
``IncreLoRACallback(controller).install(trainer)`` (the penalty's gradient is then added after
clipping, as under a plain `Trainer`).
"""
from __future__ import annotations

from typing import Optional

from trl import SFTTrainer

from ..controller import IncreLoRAController
from .trainer import IncreLoRATrainer


class IncreLoRASFTTrainer(IncreLoRATrainer, SFTTrainer):
    """`SFTTrainer` for a model returned by `inject_increlora`; takes `SFTTrainer`'s arguments
    and ``controller`` (default: a new one over the model)."""

    def __init__(self, *args, controller: Optional[IncreLoRAController] = None,
                 **kwargs) -> None:
        if kwargs.get("peft_config") is not None:
            raise ValueError("IncreLoRASFTTrainer: pass the model returned by inject_increlora "
                             "and no peft_config (the adapters are IncreLoRA's, not peft's)")
        super().__init__(*args, controller=controller, **kwargs)
