"""IncreLoRA as a `MethodRun`: injection, per-slot AdamW, controller, adapter checkpoints."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ..config import IncreLoRAConfig
from ..controller import IncreLoRAController
from ..layer import is_supported_base
from ..model import count_trainable_parameters, inject_increlora
from ..optimizer import create_optimizer
from ..persistence import BaseMismatchError, load_adapter, save_adapter
from .methods import MethodRun, matches_suffix
from .settings import RunSettings, default_top_h


def increlora_config(model: nn.Module, s: RunSettings) -> IncreLoRAConfig:
    """The IncreLoRA config of a run: its schedule scaled to ``s.max_steps`` (see `resolve`)."""
    base = IncreLoRAConfig(
        target_modules=list(s.target_modules), r_max=s.r_max, init_r=s.init_r,
        target_rank=s.target_rank, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
        init_warmup=s.init_warmup, incre_interval=s.incre_interval, top_h=1,
        advance_learning=s.advance_learning,
        orth_reg_weight=s.orth_reg_weight, warmup_steps=s.warmup_steps, total_step=s.max_steps,
        modules_to_save=list(s.modules_to_save) or None, score=s.score, seed=s.seed,
        scale_preserving_growth=s.scale_preserving_growth,
        reserve_in_penalty=s.reserve_in_penalty, reserve_lambda=s.reserve_lambda,
        normalize_on_activation=s.normalize_on_activation)
    n_targets = sum(1 for name, m in model.named_modules()
                    if is_supported_base(m) and matches_suffix(name, base.target_modules))
    config = dataclasses.replace(base, top_h=default_top_h(s, n_targets, base.incre_rank_num))
    warn_budget_out_of_reach(s, config, n_targets)
    return config


def warn_budget_out_of_reach(s: RunSettings, config: IncreLoRAConfig, n_targets: int) -> None:
    """Warn (RuntimeWarning) when the run's schedule cannot grow ``n_targets`` modules from
    ``init_r`` to an average of ``target_rank``: too few allocation rounds before ``max_steps``
    (``--init-warmup``, ``--incre-interval``) or too few modules per round (``--top-h``). The run
    would otherwise end below the budget it was asked for, saying nothing."""
    if n_targets == 0:
        return
    rounds = config.allocation_rounds(0, s.max_steps)
    budget = config.total_budget(n_targets)
    reach = config.reachable_total_rank([config.init_r] * n_targets, 0, s.max_steps)
    if reach >= budget:
        return
    warnings.warn(f"IncreLoRA: {rounds} allocation round(s) in {s.max_steps} steps (--init-warmup "
                  f"{config.init_warmup}, --incre-interval {config.incre_interval}), each growing "
                  f"at most --top-h {config.top_h} module(s) by {config.incre_rank_num} (or what "
                  f"is left of --r-max {config.r_max}), reach a "
                  f"total rank of at most {reach} of the budget's {budget} (--target-rank "
                  f"{config.target_rank} x {n_targets} modules): the run ends below --target-rank;"
                  " train longer, " + ("lower --init-warmup or --incre-interval, or raise --top-h"
                                       if config.top_h < n_targets
                                       else "or lower --init-warmup or --incre-interval"),
                  RuntimeWarning, stacklevel=2)


class IncreLoRARun(MethodRun):
    """IncreLoRA: ranks grow from ``init_r`` to an average of ``target_rank``.

    Args:
        model: the model to inject (in place).
        settings: the run's settings.
        config: the IncreLoRA config to inject (default: `increlora_config` of ``settings``);
            see `from_config` for runs described by a config alone.
    """

    name = "increlora"
    records_pooling = True  # `save_adapter` records it, `load_adapter` applies it

    def __init__(self, model: nn.Module, settings: RunSettings,
                 config: Optional[IncreLoRAConfig] = None) -> None:
        self.settings = settings
        self.config = config or increlora_config(model, settings)
        try:
            self.model = inject_increlora(model, self.config)
        except TypeError as err:  # a target that is not a linear layer
            raise ValueError(f"--target-modules: {err}") from err
        self.optimizer = create_optimizer(self.model, self.config, lr=settings.lr,
                                          weight_decay=settings.weight_decay)
        self.controller = IncreLoRAController(self.model, self.config)
        self.controller.budget_reach_checked = True  # (`increlora_config` warned in --options)

    @classmethod
    def from_config(cls, model: nn.Module, config: IncreLoRAConfig, lr: float,
                    weight_decay: float = 0.0) -> "IncreLoRARun":
        """The method built from an IncreLoRA config (the benchmarks' runs): ``config`` is
        injected as it is; ``settings`` holds the learning rate, weight decay and the config's
        own fields that `RunSettings` also has (the rest keep their defaults)."""
        shared = {f.name for f in dataclasses.fields(RunSettings)} & \
            {f.name for f in dataclasses.fields(IncreLoRAConfig)}
        values = {k: getattr(config, k) for k in shared}
        values.update(method=cls.name, lr=lr, weight_decay=weight_decay,
                      target_modules=list(config.target_modules or []),
                      modules_to_save=list(config.modules_to_save or []),
                      max_steps=config.total_step)
        return cls(model, RunSettings(**values), config)

    def penalty(self, model_loss: bool = False) -> Optional[torch.Tensor]:
        """IncreLoRA's regularization (`IncreLoRAController.regularization_loss`), whichever
        loss the step took: it is never inside the model's own loss."""
        return self.controller.regularization_loss()

    def begin_training(self, step: int) -> None:
        """Score tracking as step ``step``'s passes need it (`IncreLoRAController.track_step`):
        off since the loop before this one ended."""
        self.controller.track_step(step)

    def end_training(self) -> None:
        """No score tracking (nor exact-step mode's dense buffers) in passes after the loop,
        such as the final evaluation or a caller's own (`IncreLoRAController.stop_tracking`)."""
        self.controller.stop_tracking()

    def before_optimizer_step(self, step: int,
                              loss_scale: Union[float, torch.Tensor] = 1.0,
                              overflow: Optional[torch.Tensor] = None) -> None:
        self.controller.step(step, loss_scale=loss_scale, overflow=overflow)

    def after_optimizer_step(self, step: int) -> None:
        """The schedule lives inside the optimizer (per-slot restart warmup)."""

    def allocation_due(self, step: int) -> bool:
        """`IncreLoRAController.allocation_due`."""
        return self.controller.allocation_due(step)

    def total_rank(self) -> int:
        return self.controller.current_total_rank()

    def rank_pattern(self) -> Dict[str, int]:
        return self.controller.rank_pattern()

    def allocation_log(self) -> List[dict]:
        return list(self.controller.allocation_log)

    def describe(self) -> Dict[str, object]:
        c = self.config
        return dict(super().describe(), lora_alpha=c.lora_alpha, init_r=c.init_r,
                    target_rank=c.target_rank, r_max=c.r_max, init_warmup=c.init_warmup,
                    incre_interval=c.incre_interval, top_h=c.top_h,
                    incre_rank_num=c.incre_rank_num, advance_learning=c.advance_learning,
                    orth_reg_weight=c.orth_reg_weight,
                    warmup_steps=c.warmup_steps, score=c.score,
                    scale_preserving_growth=c.scale_preserving_growth,
                    reserve_in_penalty=c.reserve_in_penalty, reserve_lambda=c.reserve_lambda,
                    normalize_on_activation=c.normalize_on_activation)

    def parameter_counts(self) -> Dict[str, int]:
        counts = count_trainable_parameters(self.model)
        return {"active": counts["active"], "padded": counts["padded"]}

    def save_artifacts(self, out_dir: Path) -> None:
        save_adapter(self.model, out_dir)

    def save_state(self, ckpt_dir: Path) -> dict:
        save_adapter(self.model, ckpt_dir, training_state=True)
        return {"controller": self.controller.state_dict()}

    def load_state(self, ckpt_dir: Path, state: dict) -> None:
        try:
            load_adapter(self.model, ckpt_dir)
        except BaseMismatchError as err:  # its hint names an API argument; a resume has none
            raise ValueError(f"{err.detail}: the model files changed since the checkpoint was "
                             "written; resume with the ones it was trained on") from err
        self.controller.load_state_dict(state["controller"])
