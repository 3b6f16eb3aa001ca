"""The methods a memory breakdown compares (IncreLoRA, peft LoRA at two ranks, peft AdaLoRA):
their exact static sizes from shapes and dtypes (on a meta-device model), and one training step
of each on a real model, split into forward/backward and optimizer step."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Dict, List, Optional, Tuple

import torch
from torch import nn

from ...kernels.reference import dtype_name, lambda_dtype

if TYPE_CHECKING:
    from ...training.step_runner import StepRunner

LR = 1e-4
FP32, INT64, INT8 = 4, 8, 1
# IncreLoRAAdamW keeps, per adapter tensor and slot: slot_count (fp32), seen_alloc and
# seen_active (int64); per dense tensor: one fp32 step. torch AdamW: one fp32 step per tensor.
INCRELORA_SLOT_STATE_BYTES = FP32 + 2 * INT64
ADAMW_STEP_BYTES = FP32
# Layer buffers per slot: slot_state (int8), slot_alloc_step and slot_active_step (int64).
INCRELORA_SLOT_BUFFER_BYTES = INT8 + 2 * INT64
# Per module: the layer's score_sum (fp32) and the controller's ipt and unc (float64).
INCRELORA_SCORE_BYTES = FP32 + 2 * INT64
ADALORA_SCORE_COPIES = 3  # RankAllocator: ipt, exp_avg_ipt, exp_avg_unc per adapter tensor


@dataclass(frozen=True)
class AdapterSetting:
    """The adapter the breakdown is for.

    ``adapter_dtype``: `IncreLoRAConfig.adapter_dtype` (``"auto"``: float32 on bf16/fp16 bases,
    ``"float32"`` or ``"base"``).
    ``adalora_init_r``: AdaLoRA's starting rank (None: ``r_max``); it prunes to ``target_rank``.
    ``modules_to_save``: module-name suffixes every method trains in full (a classifier's head,
    as `finetune` trains it).
    """

    target_modules: Optional[Tuple[str, ...]] = None
    r_max: int = 16
    init_r: int = 1
    target_rank: int = 2
    adalora_init_r: Optional[int] = None
    lora_alpha: float = 16.0
    adapter_dtype: str = "auto"
    exact_step_score: bool = False
    gradient_checkpointing: bool = False
    modules_to_save: Tuple[str, ...] = ()

    def increlora_config(self, targets: Optional[List[str]] = None, **overrides):
        """The IncreLoRA config of this setting: no allocation round within a measurement
        (``init_warmup`` 10**6), and a score window as long as the round interval, so that
        every measured step tracks the score as the allocation phase does (as AdaLoRA's steps
        before ``tfinal`` update its sensitivity)."""
        from ...config import IncreLoRAConfig

        kwargs = dict(target_modules=list(targets or self.target_modules or []) or None,
                      r_max=self.r_max, init_r=self.init_r, target_rank=self.target_rank,
                      lora_alpha=self.lora_alpha, init_warmup=10 ** 6,
                      exact_step_score=self.exact_step_score, adapter_dtype=self.adapter_dtype,
                      modules_to_save=list(self.modules_to_save) or None)
        kwargs.update(overrides)
        kwargs.setdefault("score_window", kwargs.get("incre_interval",
                                                     IncreLoRAConfig.incre_interval))
        return IncreLoRAConfig(**kwargs)


def target_names(meta_model: nn.Module, setting: AdapterSetting) -> List[str]:
    """Full names of the modules IncreLoRA adapts (peft gets the same list)."""
    from ...model import _find_targets

    return _find_targets(meta_model, setting.increlora_config())


def _in_out(module: nn.Module) -> Tuple[int, int]:
    rows, cols = module.weight.shape
    return (rows, cols) if not isinstance(module, nn.Linear) else (cols, rows)  # Conv1D: (in, out)


def increlora_adapter_dtype(base_dtype: torch.dtype, setting: AdapterSetting) -> torch.dtype:
    """The dtype `inject_increlora` gives adapters on a base of ``base_dtype``, read from a
    one-weight model injected with the same setting."""
    from ...model import inject_increlora

    probe = nn.Sequential(nn.Linear(2, 2, dtype=base_dtype))  # 2 wide: r_max=2 fits, no warning
    inject_increlora(probe, setting.increlora_config(["0"], r_max=2, init_r=1, target_rank=1,
                                                     incre_rank_num=1, modules_to_save=None))
    return probe[0].lora_A.dtype


Sizes = Dict[str, Tuple[int, str, str]]  # component -> (bytes, how, detail)


def _saved_parameters(meta_model: nn.Module, setting: AdapterSetting) -> List[nn.Parameter]:
    """The parameters of the modules ``setting.modules_to_save`` names (trained in full), each
    once (a tied weight is one tensor)."""
    from ...model import suffix_match

    found = {id(p): p for name, module in meta_model.named_modules()
             if name and any(suffix_match(name, key) for key in setting.modules_to_save)
             for p in module.parameters()}
    return list(found.values())


def increlora_sizes(meta_model: nn.Module, base_dtype: torch.dtype,
                    setting: AdapterSetting, quantized_names: Collection[str] = ()) -> Sizes:
    """IncreLoRA's exact sizes; the targets among ``quantized_names`` (bitsandbytes layers on a
    4/8-bit base, whose weight is not a float) get float32 A and B whatever ``adapter_dtype``
    says, as `layer.adapter_dtype_for` gives them."""
    names = target_names(meta_model, setting)
    dims = [_in_out(meta_model.get_submodule(n)) for n in names]
    on_float = increlora_adapter_dtype(base_dtype, setting)
    dtypes = [torch.float32 if n in quantized_names else on_float for n in names]
    r, n = setting.r_max, len(names)

    def per_slot(dims_dtype: Tuple[Tuple[int, int], torch.dtype]) -> int:
        (i, o), dtype = dims_dtype
        return (i + o) * dtype.itemsize + lambda_dtype(dtype).itemsize
    padded = sum(r * per_slot(d) for d in zip(dims, dtypes))
    active = sum(setting.target_rank * per_slot(d) for d in zip(dims, dtypes))
    uniform = len(set(i + o for i, o in dims)) == 1 and len(set(dtypes)) == 1
    dense = sum(i * o for i, o in dims) * FP32
    saved = _saved_parameters(meta_model, setting)
    saved_bytes = sum(p.numel() * p.element_size() for p in saved)
    name = dtype_name
    kinds = sorted(set(dtypes), key=str)
    where = (f"{n} modules, r_max={r}, A and B "
             + (name(kinds[0]) if len(kinds) == 1 else " or ".join(
                 f"{name(d)} ({sum(t == d for t in dtypes)} modules)" for d in kinds))
             + ", lambda " + " or ".join(sorted({name(lambda_dtype(d)) for d in kinds})))
    return {
        "padded": (padded, "exact", f"A (r_max, in), B (out, r_max), lambda (r_max,); {where}"),
        "active": (active, "exact" if uniform else "estimated",
                   f"target_rank={setting.target_rank} slots per module at the end of "
                   "allocation (inside the padded tensors)"
                   + ("" if uniform else "; modules differ in size, so the real figure depends "
                      "on where allocation puts the rank")),
        "buffers": (n * r * INCRELORA_SLOT_BUFFER_BYTES, "exact",
                    "slot_state int8, slot_alloc_step and slot_active_step int64 per slot"),
        "grads": (padded + saved_bytes, "exact", "one gradient per padded adapter tensor"
                  + _saved_note(saved)),
        "optimizer": (2 * (padded + saved_bytes) + 3 * n * r * INCRELORA_SLOT_STATE_BYTES
                      + len(saved) * ADAMW_STEP_BYTES, "exact",
                      "IncreLoRAAdamW: exp_avg, exp_avg_sq; per slot step count (fp32) and "
                      "seen alloc/active stamps (int64); one fp32 step per tensor trained in "
                      "full"),
        "score": (n * INCRELORA_SCORE_BYTES, "exact",
                  "per module: score_sum (fp32) in the layer, ipt and unc (float64) in the "
                  "controller"),
        "score_dense": (dense, "exact", "exact_step_score: one fp32 (out, in) gradient per "
                        "module while allocating (plus a transient copy of one module's at "
                        "each controller step)"),
    }


def _saved_note(saved: List[torch.Tensor]) -> str:
    return f" and per parameter of modules_to_save ({len(saved)} tensors)" if saved else ""


@functools.lru_cache(maxsize=None)
def peft_trains_ranknum(base_dtype: torch.dtype) -> bool:
    """Whether this peft's AdaLoRA trains ``ranknum`` on a real base layer of ``base_dtype``.
    peft 0.21 and older move the float32 ranknum to a bf16/fp16 layer's dtype and back by
    assignment into its ParameterDict: a new parameter, which requires grad; peft 0.22 keeps it
    frozen. The meta copy the sizes are read from moves nothing, so this asks a tiny real one."""
    from peft import AdaLoraConfig, get_peft_model

    if base_dtype not in (torch.float16, torch.bfloat16):
        return False
    model = nn.Sequential(nn.Linear(2, 2)).to(base_dtype)
    model = get_peft_model(model, AdaLoraConfig(target_modules=["0"], init_r=1, target_r=1,
                                                total_step=10))
    return any(p.requires_grad for name, p in model.named_parameters() if "ranknum" in name)


def peft_sizes(meta_model: nn.Module, setting: AdapterSetting, adalora: bool) -> Sizes:
    """Sizes of a peft adapter built on ``meta_model`` (wrapped in place) on the meta device,
    with peft's own choice of dtypes."""
    from accelerate import init_empty_weights
    from peft import get_peft_model

    names = target_names(meta_model, setting)
    ranknum_trained = adalora and any(
        peft_trains_ranknum(meta_model.get_submodule(n).weight.dtype) for n in names)
    with init_empty_weights():
        model = get_peft_model(meta_model, peft_config(names, setting, adalora))
    adapter = other = trained = count = 0
    saved = []  # peft's trained copies of the modules_to_save
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if p.requires_grad and "lora_" not in name and "ranknum" not in name:
            saved.append(p)
            trained += nbytes
            count += 1
        elif "lora_" in name:
            adapter += nbytes
            count += 1
        elif "ranknum" in name:
            other += nbytes
            if ranknum_trained:
                trained += nbytes
                count += 1
    r = peft_rank(setting, adalora)
    sizes = {
        "padded": (adapter, "exact", f"peft {'AdaLoRA' if adalora else 'LoRA'} r={r}, "
                   f"{len(names)} modules"),
        "grads": (adapter + trained, "exact", "one gradient per adapter tensor"
                  + (" and ranknum (peft trains it on a bf16/fp16 base)" if ranknum_trained
                     and adalora else "") + _saved_note(saved)),
        "optimizer": (2 * (adapter + trained) + count * ADAMW_STEP_BYTES, "exact",
                      "torch AdamW: exp_avg, exp_avg_sq, one fp32 step per tensor"),
    }
    if saved:
        sizes["saved_copy"] = (sum(p.numel() * p.element_size() for p in saved), "exact",
                               "peft's trained copy of the modules_to_save (the base keeps "
                               "the original)")
    if adalora:
        sizes["active"] = (adapter * setting.target_rank // r, "estimated",
                           f"target_r={setting.target_rank} of init_r={r} triplets kept (the "
                           "pruned ones stay allocated)")
        sizes["buffers"] = (other, "exact", "ranknum per module")
        sizes["score"] = (ADALORA_SCORE_COPIES * adapter, "exact",
                          "RankAllocator: ipt, exp_avg_ipt, exp_avg_unc per adapter tensor")
    else:
        sizes["active"] = (adapter, "exact", "every allocated slot is in use")
    return sizes


def peft_rank(setting: AdapterSetting, adalora: bool, lora_r: Optional[int] = None) -> int:
    if adalora:
        return setting.adalora_init_r or setting.r_max
    return lora_r or setting.r_max


def peft_config(names: List[str], setting: AdapterSetting, adalora: bool,
                lora_r: Optional[int] = None):
    from peft import AdaLoraConfig, LoraConfig

    common = dict(target_modules=list(names), lora_alpha=setting.lora_alpha, lora_dropout=0.0,
                  modules_to_save=list(setting.modules_to_save) or None)
    if adalora:
        return AdaLoraConfig(init_r=peft_rank(setting, True), target_r=setting.target_rank,
                             total_step=10 ** 6, tinit=10, tfinal=10, deltaT=10, **common)
    return LoraConfig(r=peft_rank(setting, False, lora_r), **common)


@dataclass(frozen=True)
class MemoryMethod:
    """One column of the breakdown: ``kind`` is increlora, lora or adalora."""

    key: str
    kind: str
    rank: int

    def sizes(self, meta_model: nn.Module, base_dtype: torch.dtype,
              setting: AdapterSetting, quantized_names: Collection[str] = ()) -> Sizes:
        """Exact static sizes; ``meta_model`` is a fresh meta-device model (peft wraps it).
        ``quantized_names``: the linears a 4/8-bit base holds in bitsandbytes' layout."""
        if self.kind == "increlora":
            return increlora_sizes(meta_model, base_dtype, setting, quantized_names)
        if self.kind == "lora":
            setting = dataclasses.replace(setting, r_max=self.rank)
        return peft_sizes(meta_model, setting, adalora=self.kind == "adalora")

    def build(self, model: nn.Module, setting: AdapterSetting) -> "MemoryStep":
        return MemoryStep(self, model, setting)


def methods_for(setting: AdapterSetting) -> List[MemoryMethod]:
    """IncreLoRA, peft LoRA at r = r_max and at r = target_rank, peft AdaLoRA at its init_r."""
    out = [MemoryMethod("increlora", "increlora", setting.r_max),
           MemoryMethod(f"peft-lora-r{setting.r_max}", "lora", setting.r_max)]
    if setting.target_rank != setting.r_max:
        out.append(MemoryMethod(f"peft-lora-r{setting.target_rank}", "lora",
                                setting.target_rank))
    r = peft_rank(setting, True)
    if r < setting.target_rank:
        raise ValueError(f"--adalora-init-r {r} is invalid: AdaLoRA prunes from it to "
                         f"--target-rank {setting.target_rank}, so it must be >= that")
    out.append(MemoryMethod(f"peft-adalora-r{r}", "adalora", r))
    return out


class MemoryStep:
    """A method on a real model: `forward_backward` then `update` make one step, as the plain
    loop of the README does it. IncreLoRA is `finetune`'s method (`IncreLoRARun`) stepped by
    the one `StepRunner` (fp32, no gradient clipping); the peft methods step here."""

    def __init__(self, method: MemoryMethod, model: nn.Module, setting: AdapterSetting) -> None:
        self.method = method
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # training keeps no KV cache
        if setting.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        self.runner = None
        self.loss: Optional[torch.Tensor] = None
        if method.kind == "increlora":
            self.runner = increlora_runner(model, setting.increlora_config(), LR)
            self.model, self.optimizer = self.runner.run.model, self.runner.run.optimizer
        else:
            from peft import get_peft_model

            names = target_names(model, setting)
            self.model = get_peft_model(model, peft_config(
                names, setting, method.kind == "adalora", lora_r=method.rank))
            self.optimizer = torch.optim.AdamW(
                [p for p in self.model.parameters() if p.requires_grad], lr=LR)
        self.model.train()

    def forward_backward(self, batch: Dict[str, torch.Tensor], step: int) -> None:
        """Like ``loss = model(**batch).loss; loss.backward()`` in a loop: the previous step's
        loss (and whatever its graph still holds) lives until this one replaces it."""
        if self.runner is not None:
            self.runner.forward_backward(step, batch)
            return
        self.loss = self.model(**batch).loss
        self.loss.backward()

    def update(self, step: int) -> None:
        """The optimizer step and what goes with it (IncreLoRA's controller before it, AdaLoRA's
        allocator after it), then zero_grad."""
        if self.runner is not None:
            self.runner.update(step)
            return
        self.optimizer.step()
        if self.method.kind == "adalora":
            self.model.base_model.update_and_allocate(step)
        self.optimizer.zero_grad(set_to_none=True)


def increlora_runner(model: nn.Module, config, lr: float) -> "StepRunner":
    """IncreLoRA injected into ``model`` with ``config`` (`IncreLoRARun`, AdamW at ``lr``) and
    the `StepRunner` that steps it on the model's device in fp32 without gradient clipping: the
    README's plain loop, as the memory breakdown and its check measure it."""
    from ...training.device import Placement
    from ...training.increlora_method import IncreLoRARun
    from ...training.step_runner import StepRunner

    run = IncreLoRARun.from_config(model, config, lr=lr)
    return StepRunner(run, Placement(next(run.model.parameters()).device, "fp32"))
