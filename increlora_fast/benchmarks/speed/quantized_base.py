"""A model preset's base in 4-bit NF4 (QLoRA): random weights saved, then loaded with
bitsandbytes, as the H200 probe of 2026-12-04 did (bf16 compute; the head stays unquantized)."""
from __future__ import annotations

import importlib.util
import tempfile
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from .model_presets import ModelPreset

BNB_MODULE = "bitsandbytes"


def bnb_skip_note() -> Optional[str]:
    """None when bitsandbytes is importable, else the skip note of the 4-bit rows."""
    if importlib.util.find_spec(BNB_MODULE) is None:
        return ("skipped: bitsandbytes not importable (for a GPU machine without network, "
                "`gpu-check --pack-assets DIR --bnb-wheel WHEEL` packs it for --assets DIR)")
    return None


def build_4bit(preset: "ModelPreset", device: torch.device) -> nn.Module:
    """``preset`` with random weights (the caller seeds torch), saved to a temporary folder and
    loaded back with every linear but the head in 4-bit NF4 on ``device``."""
    from transformers import BitsAndBytesConfig

    note = bnb_skip_note()
    if note:
        raise RuntimeError(note)
    model_cls, _ = preset.classes()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="increlora-4bit-") as tmp:
        preset.build().save_pretrained(tmp)
        return model_cls.from_pretrained(tmp, quantization_config=quant,
                                         device_map={"": str(device)})
