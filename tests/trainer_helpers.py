"""A tiny random BERT classifier with IncreLoRA injected and a token-id data set, for the HF
Trainer tests."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from increlora_fast import IncreLoRAConfig, inject_increlora


class TinyTask(torch.utils.data.Dataset):
    """``rows`` fixed random sequences of 8 token ids; the label is the first id's parity."""

    def __init__(self, rows: int = 64) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": int(ids[0] % 2)}


def tiny_increlora_bert(targets: Sequence[str] = ("query", "value"), **config
                        ) -> Tuple[nn.Module, IncreLoRAConfig]:
    """A 2-layer hidden-16 BERT (seed 0) with IncreLoRA on ``targets``: r_max 4, average rank
    2, a round every 2 steps after 2, one module per round, the classifier trained; ``config``
    overrides or adds IncreLoRAConfig fields."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2))
    settings = dict(target_modules=list(targets), r_max=4, target_rank=2, init_warmup=2,
                    incre_interval=2, top_h=1, modules_to_save=["classifier"])
    settings.update(config)
    increlora_config = IncreLoRAConfig(**settings)
    return inject_increlora(model, increlora_config), increlora_config
