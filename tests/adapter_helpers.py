"""Adapters that look trained, on conftest's hand-written TinyNet, for the save/load tests."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable

from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

import torch
from torch import nn

from increlora_fast import IncreLoRAConfig, increlora_layers, inject_increlora
from increlora_fast.layer import IncreLoRALinear
from increlora_fast.persistence import SAVED_PREFIX, tensors_digest


def fresh(base: nn.Module, config: IncreLoRAConfig) -> nn.Module:
    """An injected copy of ``base`` (``base`` itself is left as it is)."""
    return inject_increlora(copy.deepcopy(base), config)


def trained(base: nn.Module, config: IncreLoRAConfig,
            grow: Callable[[int, IncreLoRALinear], None]) -> nn.Module:
    """An injected copy of ``base`` whose adapters and head look trained: ``grow(i, layer)``
    gives the i-th adapted layer its rank pattern, then its factors and lambda get random
    values, and so does the head's weight."""
    model = fresh(base, config)
    with torch.no_grad():
        for i, (_, layer) in enumerate(increlora_layers(model)):
            grow(i, layer)
            layer.lora_A.normal_(std=0.2)
            layer.lora_B.normal_(std=0.2)
            layer.lora_lambda.normal_()
        model.head.weight.normal_()
    return model


def tied_tiny_llama() -> nn.Module:
    """A 1-layer Llama (seed 7, eval mode) whose ``lm_head`` shares the input embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)).eval()


def old_style_adapter(directory: Path, rename: Callable[[str], str]) -> None:
    """Rewrite the adapter that `save_adapter` wrote into ``directory`` as the code before the
    layers were named by the plain model's names (2026-12-07) wrote it from a wrapped model or
    one with checkpointed or compiled blocks: every module name, ``rename(plain name)``, in the
    tensor keys (those of the modules to save after their ``modules_to_save.``), the rank
    pattern and the base fingerprint's modules (and the digest and checksum over them), in
    the weights file and in ``adapter_config.json``. (Checked against the files commit d12aa96
    saved under checkpointed or compiled blocks: the same metadata, tensors and
    ``adapter_config.json``; 3d9b36c~1 saved these names under ``torch.compile`` or a
    DataParallel wrapper given to inject_increlora.)"""
    weights, summary_path = directory / "adapter_model.safetensors", \
        directory / "adapter_config.json"
    with safe_open(str(weights), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors = {(SAVED_PREFIX + rename(k[len(SAVED_PREFIX):]) if k.startswith(SAVED_PREFIX)
                else rename(k)): v for k, v in tensors.items()}
    summary = json.loads(summary_path.read_text())
    pattern = {rename(n): r for n, r in json.loads(meta["rank_pattern"]).items()}
    base = json.loads(meta["base"])
    modules = {rename(n): e for n, e in base["fingerprint"]["modules"].items()}
    base["fingerprint"] = dict(base["fingerprint"], modules=modules, digest=hashlib.sha256(
        json.dumps(modules, sort_keys=True).encode()).hexdigest()[:16])
    meta.update(rank_pattern=json.dumps(pattern), base=json.dumps(base, sort_keys=True),
                sha256=tensors_digest(tensors))
    summary.update(rank_pattern=pattern, base_model_fingerprint=base["fingerprint"])
    weights.write_bytes(safetensors_bytes(tensors, metadata=meta))
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True))
