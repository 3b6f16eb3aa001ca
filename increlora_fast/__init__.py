"""increlora_fast: IncreLoRA fine-tuning on fixed-shape slot buffers with fused Triton kernels."""
from .config import IncreLoRAConfig
from .controller import IncreLoRAController
from .layer import IncreLoRALinear, SlotState
from .model import count_trainable_parameters, increlora_layers, inject_increlora, merge_and_unload
from .optimizer import IncreLoRAAdamW, create_optimizer
from .persistence import load_adapter, load_config, rank_pattern, save_adapter

__version__ = "0.1.0"

__all__ = [
    "IncreLoRAConfig", "IncreLoRALinear", "SlotState", "inject_increlora", "merge_and_unload",
    "increlora_layers", "count_trainable_parameters", "save_adapter", "load_adapter",
    "load_config", "rank_pattern", "IncreLoRAController", "IncreLoRAAdamW", "create_optimizer",
]
