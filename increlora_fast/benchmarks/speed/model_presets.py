"""The model presets of the model-level benchmark: transformers sequence classifiers built from
their configs with random weights (offline, nothing downloaded), the modules each adapts and
the modules it trains in full."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

DEBERTA_TARGETS = ("query_proj", "key_proj", "value_proj", "attention.output.dense",
                   "intermediate.dense", "output.dense")
BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense")
MODULES_TO_SAVE = ("pooler", "classifier")


@dataclass(frozen=True)
class ModelPreset:
    """A transformers sequence classifier (``model_class``) built from ``config_kwargs``."""

    name: str
    model_class: str
    config_class: str
    config_kwargs: Dict[str, object]
    targets: Tuple[str, ...]
    n_targets: int
    modules_to_save: Tuple[str, ...] = MODULES_TO_SAVE

    def classes(self) -> Tuple[type, type]:
        import transformers

        return getattr(transformers, self.model_class), getattr(transformers, self.config_class)

    def build(self, device: Optional[torch.device] = None) -> nn.Module:
        """The model with random weights (the caller seeds torch), initialised on ``device``
        (default: the CPU)."""
        model_cls, config_cls = self.classes()
        with torch.device(device or "cpu"):
            return model_cls(config_cls(num_labels=2, **self.config_kwargs))

    @property
    def vocab_size(self) -> int:
        return int(self.config_kwargs["vocab_size"])

    def max_seq_len(self) -> Optional[int]:
        """The longest sequence the model takes: its absolute position table's length, or
        None where it has none (relative or rotary positions)."""
        config = self.classes()[1](**self.config_kwargs)
        absolute = (config.model_type == "bert"  # (transformers 5 drops the attribute)
                    and getattr(config, "position_embedding_type", "absolute") == "absolute") \
            or (config.model_type == "deberta-v2" and config.position_biased_input)
        return int(config.max_position_embeddings) if absolute else None


def _bert(hidden: int, layers: int, heads: int, intermediate: int, vocab: int) -> Dict[str, object]:
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=intermediate)


# The architecture of microsoft/deberta-v3-base's config.json.
DEBERTA_V3_BASE = dict(
    vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0,
    relative_attention=True, max_relative_positions=-1, position_buckets=256,
    norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
    position_biased_input=False, layer_norm_eps=1e-7, pooler_hidden_size=768)

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama(hidden: int, layers: int, heads: int, intermediate: int, vocab: int
           ) -> Dict[str, object]:
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads,
                intermediate_size=intermediate, max_position_embeddings=4096, pad_token_id=0)


def _tiny_deberta() -> Dict[str, object]:
    return dict(DEBERTA_V3_BASE, vocab_size=128, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=64, pooler_hidden_size=32,
                position_buckets=8)


MODEL_PRESETS: Dict[str, ModelPreset] = {p.name: p for p in (
    ModelPreset("deberta-v3-base", "DebertaV2ForSequenceClassification", "DebertaV2Config",
                DEBERTA_V3_BASE, DEBERTA_TARGETS, 72),
    # MiniLM-L6-H384 (all-MiniLM-L6-v2): a 6-layer BERT of width 384.
    ModelPreset("minilm-l6", "BertForSequenceClassification", "BertConfig",
                _bert(384, 6, 12, 1536, 30522), BERT_TARGETS, 36),
    ModelPreset("tiny-bert", "BertForSequenceClassification", "BertConfig",
                _bert(32, 2, 2, 64, 128), BERT_TARGETS, 12),
    # MiniLM-L6's structure (6 layers, 36 adapted linears) at toy width: its host work per step
    # without its compute (`step_host`).
    ModelPreset("minilm-l6-narrow", "BertForSequenceClassification", "BertConfig",
                _bert(32, 6, 2, 64, 128), BERT_TARGETS, 36),
    # Llama-2-7B's layer shapes (4096 wide, FFN 11008, 32 heads, vocab 32000), 2 of its 32 layers.
    ModelPreset("llama-7b-2l", "LlamaForSequenceClassification", "LlamaConfig",
                _llama(4096, 2, 32, 11008, 32000), LLAMA_TARGETS, 14, ("score",)),
    # The same families at toy size (one layer), for `gpu-check --dry-run` on CPU.
    ModelPreset("tiny-deberta", "DebertaV2ForSequenceClassification", "DebertaV2Config",
                _tiny_deberta(), DEBERTA_TARGETS, 6),
    # 64 wide: bitsandbytes' CPU 4-bit kernels want feature sizes that are multiples of 64.
    ModelPreset("tiny-llama", "LlamaForSequenceClassification", "LlamaConfig",
                _llama(64, 1, 2, 128, 128), LLAMA_TARGETS, 7, ("score",)),
)}


def checked_point(what: str, preset_name: str, minimums: Dict[str, Tuple[int, int]]
                  ) -> ModelPreset:
    """The preset ``preset_name`` of a host-time measurement (``what``), its sizes checked:
    ``minimums`` maps each option to (its value, the least allowed). Raises ValueError naming
    the first that is not."""
    if preset_name not in MODEL_PRESETS:
        raise ValueError(f"{what}: preset {preset_name!r} is unknown: use one of "
                         f"{sorted(MODEL_PRESETS)}")
    for name, (value, low) in minimums.items():
        if value < low:
            raise ValueError(f"{what}: {name}={value} must be >= {low}")
    return MODEL_PRESETS[preset_name]
