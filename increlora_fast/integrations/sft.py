"""TRL's `SFTTrainer` with IncreLoRA (needs the optional ``trl`` extra).

`IncreLoRASFTTrainer` is `SFTTrainer` with everything `IncreLoRATrainer` adds: the per-slot
AdamW, the orthogonal penalty in the loss, scores and allocation after gradient clipping, rank
logging and the controller in every checkpoint. Give it the model returned by
`inject_increlora` (not a ``peft_config``). Gradient checkpointing (SFTConfig's default) works:
transformers checkpoints non-reentrantly, so the adapters inside checkpointed blocks get their
gradients and scores once per backward.

With a stock `SFTTrainer` instead: ``optimizers=increlora_optimizers(model, lr)`` and
``IncreLoRACallback(controller).install(trainer)`` (the penalty's gradient is then added after
clipping, as under a plain `Trainer`); its ``peft_config`` would freeze IncreLoRA's adapters under
peft's LoRA, so the callback refuses that model at train begin.

TRL's SFTTrainer (1.16 at least) computes the loss through a fused LM head that reads
``lm_head.weight`` directly (unless a ``compute_loss_func`` or label smoothing takes the
model's own logits), so an adapter on the output embeddings would never run:
`IncreLoRASFTTrainer` refuses such a model then (leave ``lm_head`` out of ``target_modules``);
under a stock `SFTTrainer` the controller names it at its first allocation round.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

from trl import SFTTrainer

from ..controller import IncreLoRAController
from ..layer import IncreLoRALinear
from .trainer import IncreLoRATrainer


def trl_fuses_lm_head() -> bool:
    """Whether this TRL's SFTTrainer has a fused LM head
    (``trl.trainer.utils.add_fused_lm_head``), which reads the output layer's weight directly."""
    try:
        from trl.trainer import utils
    except ImportError:
        return False
    return hasattr(utils, "add_fused_lm_head")


def loss_takes_fused_lm_head(args, compute_loss_func) -> bool:
    """Whether an SFTTrainer with these ``args`` (an SFTConfig; None: its defaults) and
    ``compute_loss_func`` takes its training loss from the fused LM head: it does in TRL 1.16
    unless a ``compute_loss_func`` or label smoothing of the "nll" loss takes the model's own
    logits (the fused head then only feeds metrics)."""
    if not trl_fuses_lm_head() or compute_loss_func is not None:
        return False
    smoothing = getattr(args, "label_smoothing_factor", 0) or 0
    return not (smoothing > 0 and getattr(args, "loss_type", "nll") == "nll")


class IncreLoRASFTTrainer(IncreLoRATrainer, SFTTrainer):
    """`SFTTrainer` for a model returned by `inject_increlora` (not a model id or path, which
    SFTTrainer would load without adapters); takes `SFTTrainer`'s arguments and ``controller``
    (default: a new one over the model)."""

    def __init__(self, *args, controller: Optional[IncreLoRAController] = None,
                 **kwargs) -> None:
        # SFTTrainer's arguments by name, wherever they were given (by position or keyword)
        given = inspect.signature(SFTTrainer.__init__).bind_partial(None, *args, **kwargs)
        given = given.arguments
        if given.get("peft_config") is not None:
            raise ValueError("IncreLoRASFTTrainer: pass the model returned by inject_increlora "
                             "and no peft_config (the adapters are IncreLoRA's, not peft's)")
        model = given.get("model")
        if isinstance(model, (str, os.PathLike)):
            raise ValueError(f"IncreLoRASFTTrainer: model={str(model)!r} is a model id or path, "
                             "which SFTTrainer would load without adapters; load it "
                             "(AutoModelForCausalLM.from_pretrained), call "
                             "inject_increlora(model, config) and pass the model it returns")
        head = getattr(model, "get_output_embeddings", lambda: None)()
        if isinstance(head, IncreLoRALinear) and loss_takes_fused_lm_head(
                given.get("args"), given.get("compute_loss_func")):
            import trl
            raise ValueError("IncreLoRASFTTrainer: the model has an IncreLoRA adapter on its "
                             f"output layer, which TRL {trl.__version__}'s fused LM head would "
                             "never run (it reads the layer's weight directly); leave the output "
                             "layer (lm_head) out of target_modules")
        super().__init__(*args, controller=controller, **kwargs)
