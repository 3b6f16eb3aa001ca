"""Finding targets in any `nn.Module`, replacing them with `IncreLoRALinear`, and merging back."""
from __future__ import annotations

import difflib
import re
from typing import Dict, Iterator, List, Tuple

from torch import nn

from .config import DEFAULT_TARGET_MODULES, IncreLoRAConfig
from .layer import IncreLoRALinear, is_supported_base

CONFIG_ATTR = "increlora_config"


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _similar_names(key: str, names: List[str]) -> List[str]:
    leaves = sorted({n.split(".")[-1] for n in names} | set(names))
    return difflib.get_close_matches(key, leaves, n=5, cutoff=0.5)


def _find_targets(model: nn.Module, config: IncreLoRAConfig) -> List[str]:
    names = [n for n, _ in model.named_modules() if n]
    spec = config.target_modules
    if isinstance(spec, str):
        matched = [n for n in names if re.fullmatch(spec, n)]
        if not matched:
            raise ValueError(f"target_modules regex {spec!r} matches no module name; "
                             f"similar names: {_similar_names(spec, names)}")
    else:
        suffixes = list(DEFAULT_TARGET_MODULES) if spec is None else spec
        matched = [n for n in names if any(_suffix_match(n, s) for s in suffixes)]
        if spec is None and not matched:
            raise ValueError("target_modules=None found none of the default attention/FFN names "
                             f"{list(DEFAULT_TARGET_MODULES)}; set target_modules")
        if spec is not None:
            for s in spec:
                if not any(_suffix_match(n, s) for n in names):
                    raise ValueError(f"target module {s!r} matches no module name; "
                                     f"similar names: {_similar_names(s, names)}")
    modules = dict(model.named_modules())
    targets = []
    for n in matched:
        module = modules[n]
        if isinstance(module, IncreLoRALinear) or n.endswith(".base_layer"):
            continue
        if is_supported_base(module):
            targets.append(n)
        elif spec is not None and not any(is_supported_base(m) for m in module.modules()):
            raise TypeError(f"target module {n!r} is a {type(module).__name__}; IncreLoRA adapts "
                            "nn.Linear and transformers Conv1D layers")
    return targets


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_increlora(model: nn.Module, config: IncreLoRAConfig) -> nn.Module:
    """Replace the targeted linears of ``model`` in place with `IncreLoRALinear`.

    Every other parameter is frozen except those of ``config.modules_to_save``. The config is
    attached to the model as ``model.increlora_config``. Returns the model.

    Everything is checked before the model is changed, and a failure while wrapping undoes
    what was done: a call that raises leaves the model exactly as it was.

    Raises:
        ValueError: a target or a module to save matches nothing (the message lists similar
            names), the model is already injected, the rank budget does not fit the modules,
            or a target's weights are still on the meta device.
        TypeError: a target is neither a linear layer nor contains one.
    """
    if getattr(model, CONFIG_ATTR, None) is not None or any(
            isinstance(m, IncreLoRALinear) for m in model.modules()):
        raise ValueError("model already holds IncreLoRA layers; inject once per model")
    targets = _find_targets(model, config)
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matched only modules that "
                         "are not nn.Linear or Conv1D")
    config.total_budget(len(targets))
    names = [n for n, _ in model.named_modules() if n]
    save_roots = []
    for key in config.modules_to_save or []:
        found = [n for n in names if _suffix_match(n, key)]
        if not found:
            raise ValueError(f"modules_to_save entry {key!r} matches no module name; "
                             f"similar names: {_similar_names(key, names)}")
        save_roots.extend(found)
    for name in targets:
        for pname, p in model.get_submodule(name).named_parameters():
            if p.is_meta:
                raise ValueError(f"target module {name!r} has its {pname} on the meta device: "
                                 "load the base weights first (e.g. to_empty() then "
                                 "load_state_dict(), or from_pretrained), then inject; the "
                                 "adapter's slot bookkeeping needs real tensors")
    # Nothing has changed yet; build every layer first, and undo everything if one fails.
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    originals = {name: model.get_submodule(name) for name in targets}
    try:
        wrapped = {name: IncreLoRALinear(
            base, r_max=config.r_max, init_r=config.init_r, reserve_rank=config.incre_rank_num,
            lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            reserve_lambda=config.reserve_lambda, advance_learning=config.advance_learning)
            for name, base in originals.items()}
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in wrapped.items():
            _set_submodule(model, name, layer)
        for root in save_roots:
            for p in model.get_submodule(root).parameters():
                p.requires_grad_(True)
    except BaseException:
        for name, base in originals.items():
            _set_submodule(model, name, base)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        raise
    setattr(model, CONFIG_ATTR, config)
    return model


def increlora_layers(model: nn.Module) -> Iterator[Tuple[str, IncreLoRALinear]]:
    """(name, layer) for every IncreLoRA layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, IncreLoRALinear):
            yield name, module


def get_config(model: nn.Module) -> IncreLoRAConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("model has no IncreLoRA adapter: call inject_increlora(model, config)")
    return config


def saved_module_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Trainable parameters outside the adapters (the modules_to_save), by full name."""
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and not n.split(".")[-1].startswith("lora_")}


def count_trainable_parameters(model: nn.Module) -> Dict[str, int]:
    """Trainable parameters counted two ways.

    ``active``: adapter parameters of the active slots (rank x (in + out + 1) per module) plus
    the modules to save; ``padded``: the allocated capacity (r_max slots) plus the same modules;
    ``other``: the modules to save alone.
    """
    other = sum(p.numel() for p in saved_module_parameters(model).values())
    active = padded = 0
    for _, layer in increlora_layers(model):
        per_slot = layer.in_features + layer.out_features + 1
        active += layer.active_rank * per_slot
        padded += layer.r_max * per_slot
    return {"active": active + other, "padded": padded + other, "other": other}


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layers back in place."""
    for name, layer in list(increlora_layers(model)):
        if not layer.merged:
            layer.merge()
        _set_submodule(model, name, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model
