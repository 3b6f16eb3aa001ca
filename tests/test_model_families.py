"""The whole adapter life cycle on tiny random-init transformers families and a hand-written model:
inject, one AdamW step, save, load into a fresh copy, merge_and_unload."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from increlora_fast import (IncreLoRAConfig, IncreLoRALinear, increlora_layers, inject_increlora,
                            load_adapter, merge_and_unload, save_adapter)

VOCAB, SEQ, BATCH, LABELS = 64, 7, 3, 3
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            vocab_size=VOCAB, max_position_embeddings=64)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"]


@dataclass
class Family:
    build: Callable[[], nn.Module]
    targets: Union[List[str], str]
    num_targets: int
    modules_to_save: Optional[List[str]]
    base_type: type
    causal_lm: bool = False


FAMILIES: Dict[str, Family] = {
    "bert": Family(lambda: transformers.BertForSequenceClassification(
        transformers.BertConfig(**TINY, **NO_DROPOUT, num_labels=LABELS)),
        BERT_TARGETS, 12, ["classifier"], nn.Linear),
    "roberta": Family(lambda: transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(**TINY, **NO_DROPOUT, num_labels=LABELS)),
        BERT_TARGETS, 12, ["classifier"], nn.Linear),
    "deberta-v2": Family(lambda: transformers.DebertaV2ForSequenceClassification(
        transformers.DebertaV2Config(**TINY, **NO_DROPOUT, num_labels=LABELS,
                                     relative_attention=True, position_buckets=8,
                                     pos_att_type=["p2c", "c2p"])),
        ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
         "output.dense"], 12, ["pooler", "classifier"], nn.Linear),
    "gpt2": Family(lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        ["c_attn", "c_proj", "c_fc"], 8, None, Conv1D, causal_lm=True),
    "llama": Family(lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **TINY, num_key_value_heads=1, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
        r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)", 14,
        ["lm_head"], nn.Linear, causal_lm=True),
    "custom": Family(lambda: CustomModel(), ["fc", "proj"], 4, ["head"], nn.Linear),
}


class CustomModel(nn.Module):
    """A hand-written model: embedding, TinyNet-like blocks, a classifier over the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(16, 24),
                                                   "proj": nn.Linear(24, 16)}) for _ in range(2))
        self.head = nn.Linear(16, LABELS)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block["proj"](torch.tanh(block["fc"](h)))
        logits = self.head(h.mean(1))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def make_batch(family: Family) -> Dict[str, torch.Tensor]:
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    labels = input_ids.clone() if family.causal_lm else torch.randint(0, LABELS, (BATCH,))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def outputs(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch)["logits"]


def make_config(family: Family) -> IncreLoRAConfig:
    return IncreLoRAConfig(target_modules=family.targets, r_max=4, init_r=1, target_rank=2,
                           lora_alpha=8.0, modules_to_save=family.modules_to_save)


@pytest.fixture(params=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


def test_injection_matches_targets_and_keeps_base_outputs(family):
    pristine = family.build()
    batch = make_batch(family)
    config = IncreLoRAConfig(target_modules=family.targets, r_max=4, target_rank=2,
                             advance_learning=False, modules_to_save=family.modules_to_save)
    model = inject_increlora(copy.deepcopy(pristine), config)
    layers = dict(increlora_layers(model))
    assert len(layers) == family.num_targets
    assert all(type(layer.base_layer) is family.base_type for layer in layers.values())
    torch.testing.assert_close(outputs(model, batch), outputs(pristine, batch), rtol=0, atol=0)


def test_life_cycle_step_save_load_merge(family, tmp_path):
    pristine = family.build()
    batch = make_batch(family)
    config = make_config(family)
    model = inject_increlora(copy.deepcopy(pristine), config)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad}
    slots_before = {n: layer.lora_A.detach().clone() for n, layer in increlora_layers(model)}
    base_out = outputs(pristine, batch)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.05, weight_decay=0.0)
    model.train()
    loss = model(**batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
    for name, layer in increlora_layers(model):
        assert torch.all(layer.lora_lambda[layer.active_mask] != 0), name
        inactive = layer.slot_state == 0
        assert torch.equal(layer.lora_A[inactive], slots_before[name][inactive]), name
    trained_out = outputs(model, batch)
    assert (trained_out - base_out).abs().max() > 1e-4

    save_adapter(model, tmp_path)
    copy_model = inject_increlora(copy.deepcopy(pristine), config)
    assert not torch.allclose(outputs(copy_model, batch), trained_out, atol=1e-4)
    load_adapter(copy_model, tmp_path)
    torch.testing.assert_close(outputs(copy_model, batch), trained_out, rtol=0, atol=0)

    merged = merge_and_unload(model)
    assert not any(isinstance(m, IncreLoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(pristine.state_dict())
    for name in dict(increlora_layers(copy_model)):
        assert type(merged.get_submodule(name)) is family.base_type
    torch.testing.assert_close(outputs(merged, batch), trained_out, rtol=1e-5, atol=1e-5)
