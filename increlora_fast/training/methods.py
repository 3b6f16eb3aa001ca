"""The fine-tuning methods behind one interface: a model, its optimizer and per-step hooks.

A training step (`step_runner.StepRunner`) calls, per optimizer step: forward, ``penalty()``,
backward, gradient clipping, ``before_optimizer_step(step)``, ``optimizer.step()``,
``after_optimizer_step(step)``, ``zero_grad``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from safetensors.torch import load_file, save as safetensors_bytes
from torch import nn

from ..model import suffix_match
from ..optimizer import split_weight_decay
from ..files import atomic_write_bytes
from .settings import RunSettings

TRAINABLE_FILE = "trainable.safetensors"
# Values `frozen_fingerprint` samples from each frozen parameter.
FROZEN_SAMPLES = 8


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup from 0, then linear decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def matches_suffix(name: str, suffixes: List[str]) -> bool:
    """Whether ``name`` matches one of ``suffixes`` (`model.suffix_match`)."""
    return any(suffix_match(name, s) for s in suffixes)


def frozen_fingerprint(model: nn.Module) -> Dict[str, str]:
    """Per frozen parameter of ``model``: its shape and `FROZEN_SAMPLES` values spread over it,
    exact (float32 bytes, in hex), so that a checkpoint holding only the trainable tensors
    knows the base weights it was trained on, at a cost that does not grow with the model."""
    found = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        flat = p.detach().reshape(-1)
        at = torch.linspace(0, flat.numel() - 1, min(FROZEN_SAMPLES, flat.numel()),
                            device=flat.device).long()
        found[name] = f"{tuple(p.shape)}:{flat[at].float().cpu().numpy().tobytes().hex()}"
    return found


class MethodRun:
    """Base: the model trains every parameter with ``requires_grad`` under AdamW and a linear
    schedule (this is also full fine-tuning as it stands)."""

    name = "full"
    # per-class weights of the training loss (``--class-weights``), on the model's device;
    # None: the model's own unweighted loss
    class_weights: Optional[torch.Tensor] = None
    # whether `save_artifacts` records the model's pooling (`pooling.model_pooling`), so that
    # loading the artifacts gives it again; peft's adapters and transformers' models cannot
    records_pooling = False
    # the pad_token_id the run gave a model config without one (`finetune_run.set_pad_token`),
    # and whether `save_artifacts` records the config's pad_token_id (transformers' config.json
    # does; peft's adapter files cannot)
    given_pad_token_id: Optional[int] = None
    records_pad_token = True

    def __init__(self, model: nn.Module, settings: RunSettings) -> None:
        self.model = model
        self.settings = settings
        params = [p for p in model.parameters() if p.requires_grad]
        # biases and norms take no weight decay, as in IncreLoRA's optimizer and the Trainer's
        decayed, spared = split_weight_decay(model, params)
        groups = [{"params": decayed}, {"params": spared, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr,
                                           weight_decay=settings.weight_decay)
        self.scheduler = linear_schedule(self.optimizer, settings.warmup_steps, settings.max_steps)

    def penalty(self, model_loss: bool = False) -> Optional[torch.Tensor]:
        """Extra loss term added before backward (None: nothing to add).

        ``model_loss``: the step's loss is the model's own, the model having been given the
        labels (`step_runner.takes_model_loss`), so a term the model adds to its own loss is
        already in it and must not be returned again; False: the step computed the loss from
        the logits."""
        return None

    def begin_training(self, step: int) -> None:
        """Called when a training loop starts (or goes on) at optimizer step ``step``."""

    def end_training(self) -> None:
        """Called when a training loop ends, finished, failed or interrupted."""

    def before_optimizer_step(self, step: int,
                              loss_scale: Union[float, torch.Tensor] = 1.0,
                              overflow: Optional[torch.Tensor] = None) -> None:
        """Called after backward and gradient clipping, before ``optimizer.step()``;
        ``loss_scale`` is the fp16 GradScaler's factor on the loss (1 otherwise), ``overflow``
        its flag of a step it will skip (a 0-d device tensor, nonzero then; None without
        one)."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after ``optimizer.step()``, before ``zero_grad``."""
        self.scheduler.step()

    def allocation_due(self, step: int) -> bool:
        """Whether step ``step`` is an allocation round, which changes the adapters' slot layout
        and so cannot be replayed from a captured CUDA graph. False here: only IncreLoRA has
        rounds the step runner knows of (CUDA graphs are for IncreLoRA only)."""
        return False

    def total_rank(self) -> Optional[int]:
        """Current total adapter rank (None when the method has no rank)."""
        return None

    def rank_pattern(self) -> Dict[str, int]:
        """{module name: rank}; empty when the method has no rank."""
        return {}

    def allocation_log(self) -> List[dict]:
        return []

    def describe(self) -> Dict[str, object]:
        """The method's own settings, printed beside its results."""
        return {"lr": self.settings.lr, "weight_decay": self.settings.weight_decay}

    def parameter_counts(self) -> Dict[str, int]:
        """Trainable parameters: ``active`` (those in use now) and ``padded`` (allocated)."""
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"active": n, "padded": n}

    def update_norm(self) -> Optional[float]:
        """Mean Frobenius norm of the weight change the adapters apply (scale included) over
        the adapted target modules; None when nothing is wrapped (full fine-tuning).

        Read off the modules' outputs, ``m(I) - m.base_layer(I)``, so it is the same measure for
        every method whatever its parametrisation.
        """
        norms = []
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for name, m in self.model.named_modules():
                base = getattr(m, "base_layer", None)
                weight = getattr(base, "weight", None)
                if weight is None or not matches_suffix(name, self.settings.target_modules):
                    continue
                # our IncreLoRALinear and peft's LoRA/AdaLoRA layers both record in_features,
                # whether the base is an nn.Linear or a transformers Conv1D
                eye = torch.eye(m.in_features, dtype=weight.dtype, device=weight.device)
                norms.append(float(torch.linalg.norm(m(eye) - base(eye))))
        self.model.train(was_training)
        return sum(norms) / len(norms) if norms else None

    def save_artifacts(self, out_dir: Path) -> None:
        """The trained model or adapter, in the method's usual format."""
        self.model.save_pretrained(str(out_dir))

    def save_state(self, ckpt_dir: Path) -> dict:
        """Write the trainable weights into ``ckpt_dir``; return the rest of the method's state."""
        tensors = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters()
                   if p.requires_grad}
        atomic_write_bytes(ckpt_dir / TRAINABLE_FILE, safetensors_bytes(tensors))
        return {"scheduler": self.scheduler.state_dict(), "frozen": frozen_fingerprint(self.model)}

    def load_state(self, ckpt_dir: Path, state: dict) -> None:
        """Inverse of `save_state`, on a run built from the same settings; ValueError when the
        model's frozen weights are not those the checkpoint was trained on (checkpoints written
        before they were recorded are not checked)."""
        saved, current = state.get("frozen"), frozen_fingerprint(self.model)
        if saved is not None and saved != current:
            first = next(n for n in sorted(set(saved) | set(current))
                         if saved.get(n) != current.get(n))
            raise ValueError(f"checkpoint {ckpt_dir} was trained on other base weights than "
                             f"--model {self.settings.model} holds now (first difference in "
                             f"{first}): the model files changed since the checkpoint was "
                             "written; resume with the ones it was trained on")
        tensors = load_file(str(ckpt_dir / TRAINABLE_FILE))
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(tensors) != set(params):
            raise ValueError(f"checkpoint {ckpt_dir} holds other trainable tensors than this run "
                             f"({len(tensors)} vs {len(params)})")
        wrong = [n for n, p in params.items() if tensors[n].shape != p.shape]
        if wrong:
            raise ValueError(f"checkpoint {ckpt_dir}: {wrong[0]} has shape "
                             f"{tuple(tensors[wrong[0]].shape)}, this run needs "
                             f"{tuple(params[wrong[0]].shape)}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[n])
        self.scheduler.load_state_dict(state["scheduler"])
