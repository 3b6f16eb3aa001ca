"""increlora_fast: IncreLoRA fine-tuning on fixed-shape slot buffers with fused Triton kernels.

The public names below are imported on first use (PEP 562), so that ``import increlora_fast``
and the modules that need no tensors (the comparison statistics, the command line's option
checks and help) start without importing torch and transformers.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "IncreLoRAConfig": "config",
    "IncreLoRAController": "controller",
    "IncreLoRALinear": "layer", "SlotState": "layer",
    "IncreLoRAAveragedModel": "model", "count_trainable_parameters": "model",
    "increlora_layers": "model",
    "inject_increlora": "model", "merge_and_unload": "model",
    "IncreLoRAAdamW": "optimizer", "create_optimizer": "optimizer",
    "load_adapter": "persistence", "load_config": "persistence", "rank_pattern": "persistence",
    "save_adapter": "persistence",
}

__all__ = [
    "IncreLoRAConfig", "IncreLoRALinear", "SlotState", "inject_increlora", "merge_and_unload",
    "increlora_layers", "count_trainable_parameters", "save_adapter", "load_adapter",
    "load_config", "rank_pattern", "IncreLoRAController", "IncreLoRAAdamW", "create_optimizer",
    "IncreLoRAAveragedModel",
]

if TYPE_CHECKING:  # what type checkers and editors read
    from .config import IncreLoRAConfig
    from .controller import IncreLoRAController
    from .layer import IncreLoRALinear, SlotState
    from .model import (IncreLoRAAveragedModel, count_trainable_parameters, increlora_layers,
                        inject_increlora, merge_and_unload)
    from .optimizer import IncreLoRAAdamW, create_optimizer
    from .persistence import load_adapter, load_config, rank_pattern, save_adapter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # a submodule (``increlora_fast.pooling.apply_pooling``), as the eager package gave it
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
