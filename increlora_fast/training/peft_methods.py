"""The peft baselines as `MethodRun`s: LoRA at a fixed rank and AdaLoRA pruning to a budget.

AdaLoRA in a plain loop needs ``update_and_allocate(step)`` after every ``optimizer.step()`` and
before ``zero_grad`` (it reads the gradients), with ``total_step`` set to the run's step count;
peft adds its orthogonal penalty inside the forward pass when the model is given labels; a
classifier's step runs the model without them (`step_runner.forward_with_loss`), so the run adds
the same penalty itself (`adalora_orth_penalty`), and only then: with token labels the step keeps
the model's own loss, penalty included (`step_runner.takes_model_loss`).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .methods import MethodRun
from .settings import RunSettings

ADAPTER = "default"
# the model card peft's save_pretrained writes beside an adapter
MODEL_CARD = "README.md"


def is_peft_model_card(path: Path) -> bool:
    """Whether ``path`` is a model card peft wrote (its YAML header names the library)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    header = text.split("\n---", 1)[0] if text.startswith("---") else ""
    return "library_name: peft" in header


def adalora_orth_penalty(model: nn.Module, weight: float) -> Optional[torch.Tensor]:
    """``weight`` x the mean over the adapter's A and B matrices of ||A A^T - I||_F and
    ||B^T B - I||_F, summed in peft's order: the penalty peft's AdaLoRA adds to a model's own
    loss when it is given labels. None without adapter matrices."""
    terms = []
    for name, p in model.base_model.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and ADAPTER in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
            terms.append(torch.norm(cov - eye, p="fro"))
    if not terms:
        return None
    return weight * (sum(terms) / len(terms))


class LoRARun(MethodRun):
    """peft LoRA with rank ``target_rank`` in every target module."""

    name = "lora"
    records_pad_token = False  # peft's adapter files hold no model config

    def __init__(self, model: nn.Module, settings: RunSettings) -> None:
        from peft import LoraConfig, TaskType, get_peft_model

        self.peft_config = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=settings.target_rank, lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout, target_modules=list(settings.target_modules),
            modules_to_save=list(settings.modules_to_save) or None)
        super().__init__(get_peft_model(model, self.peft_config), settings)

    def _lora_modules(self) -> Dict[str, nn.Module]:
        return {name: m for name, m in self.model.base_model.model.named_modules()
                if hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A", {})}

    def describe(self) -> Dict[str, object]:
        return dict(super().describe(), r=self.settings.target_rank,
                    lora_alpha=self.settings.lora_alpha)

    def total_rank(self) -> int:
        return sum(self.rank_pattern().values())

    def rank_pattern(self) -> Dict[str, int]:
        return {name: self.settings.target_rank for name in self._lora_modules()}


class AdaLoRARun(LoRARun):
    """peft AdaLoRA: ``adalora_init_r`` per module, pruned to an average of ``target_rank``."""

    name = "adalora"

    def __init__(self, model: nn.Module, settings: RunSettings) -> None:
        from peft import AdaLoraConfig, TaskType, get_peft_model

        s = settings
        self.peft_config = AdaLoraConfig(
            task_type=TaskType.SEQ_CLS, init_r=s.adalora_init_r, target_r=s.target_rank,
            lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
            target_modules=list(s.target_modules), modules_to_save=list(s.modules_to_save) or None,
            tinit=s.adalora_tinit, tfinal=s.adalora_tfinal, deltaT=s.adalora_delta_t,
            total_step=s.max_steps, beta1=0.85, beta2=0.85, orth_reg_weight=s.orth_reg_weight)
        MethodRun.__init__(self, get_peft_model(model, self.peft_config), settings)

    @property
    def _live_config(self):
        return self.model.peft_config[ADAPTER]

    def describe(self) -> Dict[str, object]:
        c = self._live_config
        return dict(MethodRun.describe(self), init_r=c.init_r, target_r=c.target_r,
                    lora_alpha=c.lora_alpha, tinit=c.tinit, tfinal=c.tfinal, deltaT=c.deltaT,
                    orth_reg_weight=c.orth_reg_weight)

    def penalty(self, model_loss: bool = False) -> Optional[torch.Tensor]:
        """AdaLoRA's orthogonal penalty, as peft computes it (`adalora_orth_penalty`), when the
        step took its loss from the logits (one label per row, `step_runner.forward_with_loss`);
        None when it took the model's own loss (``model_loss``: token labels), to which peft has
        already added the penalty: it counts once either way."""
        if model_loss:
            return None
        return adalora_orth_penalty(self.model, self._live_config.orth_reg_weight)

    def after_optimizer_step(self, step: int) -> None:
        self.model.base_model.update_and_allocate(step)
        super().after_optimizer_step(step)

    def rank_pattern(self) -> Dict[str, int]:
        modules = self._lora_modules()
        pattern = self._live_config.rank_pattern
        if not pattern:
            return {name: self.settings.adalora_init_r for name in modules}
        by_module = {re.sub(rf"\.lora_E(\.{ADAPTER})?$", "", k): int(sum(v))
                     for k, v in pattern.items()}
        return {name: by_module[name] for name in modules}

    def parameter_counts(self) -> Dict[str, int]:
        padded = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        modules = self._lora_modules()
        adapter_padded = sum(p.numel() for m in modules.values()
                             for d in (m.lora_A, m.lora_B, m.lora_E) for p in [d[ADAPTER]])
        active = padded - adapter_padded
        for name, rank in self.rank_pattern().items():
            a, b = modules[name].lora_A[ADAPTER], modules[name].lora_B[ADAPTER]
            active += rank * (a.shape[1] + b.shape[0] + 1)
        return {"active": active, "padded": padded}

    def save_artifacts(self, out_dir: Path) -> None:
        with warnings.catch_warnings():
            # peft reads a module pruned to rank 0 as an unsharded DeepSpeed/FSDP tensor
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
            super().save_artifacts(out_dir)

    def save_state(self, ckpt_dir: Path) -> dict:
        state = super().save_state(ckpt_dir)
        alloc = self.model.base_model.rankallocator
        state["allocator"] = {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt,
                              "exp_avg_unc": alloc.exp_avg_unc}
        state["rank_pattern"] = self._live_config.rank_pattern
        return state

    def load_state(self, ckpt_dir: Path, state: dict) -> None:
        super().load_state(ckpt_dir, state)
        alloc = self.model.base_model.rankallocator
        for key, value in state["allocator"].items():
            setattr(alloc, key, dict(value))
        self._live_config.rank_pattern = state["rank_pattern"]
