"""What a run measures: the quick (CPU, minutes) and full (GPU) grids of both levels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

PHASES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LayerPlan:
    """Layer level: every (in, out) shape x tokens x r_max x dtype x phase.

    ``interpreter_point`` (in, out, tokens): the one extra point, fwd+bwd only, where Triton
    methods run under the Triton interpreter on a device without CUDA.
    """

    shapes: List[Tuple[int, int]]
    tokens: List[int]
    r_max: List[int]
    dtypes: List[str]
    phases: List[str]
    warmup: int
    repeats: int
    interpreter_point: Tuple[int, int, int] = (64, 64, 64)


@dataclass
class ModelPlan:
    """Model level: whole training steps of each model preset, per dtype (bf16 = autocast);
    ``base_4bit``: the base loaded in 4-bit NF4 with bitsandbytes (`quantized_base`)."""

    models: List[str]
    batch_size: int
    seq_len: int
    steps: int
    warmup_steps: int
    dtypes: List[str]
    r_max: int = 8
    init_r: int = 1
    target_rank: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    base_4bit: bool = False


def quick_plans() -> Tuple[LayerPlan, ModelPlan]:
    layer = LayerPlan(shapes=[(768, 768), (768, 3072), (3072, 768)], tokens=[128, 512],
                      r_max=[16], dtypes=["fp32"], phases=list(PHASES), warmup=1, repeats=5)
    model = ModelPlan(models=["minilm-l6"], batch_size=4, seq_len=64, steps=12,
                      warmup_steps=2, dtypes=["fp32"])
    return layer, model


def full_plans() -> Tuple[LayerPlan, ModelPlan]:
    layer = LayerPlan(shapes=[(768, 768), (768, 3072), (3072, 768), (4096, 4096), (4096, 11008)],
                      tokens=[2048, 4096, 8192, 16384, 32768], r_max=[8, 16, 64],
                      dtypes=["fp32", "bf16"], phases=list(PHASES), warmup=3, repeats=10)
    model = ModelPlan(models=["deberta-v3-base", "minilm-l6"], batch_size=32, seq_len=128,
                      steps=40, warmup_steps=5, dtypes=["fp32", "bf16"])
    return layer, model
