"""An IncreLoRA layer called more than once per forward (weight sharing): a block applied
several times (ALBERT's one layer group, universal transformers), one linear applied to two
inputs, a linear registered under two names (siamese encoders). Gradients, scores, the penalty,
merging and saving count the layer once and its calls together."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from increlora_fast import IncreLoRAConfig, increlora_layers, inject_increlora


class Siamese(nn.Module):
    """One linear registered as ``left`` and ``right`` and called three times per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(8, 8)
        self.right = self.left
        self.head = nn.Linear(8, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.left(a)) - torch.tanh(self.right(b)) + self.left(b))


@pytest.mark.parametrize("targets", [["right"], ["left", "right"], r"right", r"left|right"])
def test_a_linear_registered_under_two_names_is_adapted_once_by_either(targets):
    """Any of a shared linear's names selects it (peft's targets match every name), and it is
    wrapped once, under both names."""
    model = inject_increlora(Siamese(), IncreLoRAConfig(target_modules=targets, r_max=4,
                                                        init_r=2, target_rank=3))
    assert model.left is model.right and [n for n, _ in increlora_layers(model)] == ["left"]


@pytest.mark.parametrize("exclude", [["right"], ["left"]])
def test_excluding_one_name_of_a_shared_linear_leaves_it_out(exclude):
    model = inject_increlora(Siamese(), IncreLoRAConfig(
        target_modules=["left", "right", "head"], exclude_modules=exclude, r_max=2, init_r=1,
        target_rank=2))
    assert [n for n, _ in increlora_layers(model)] == ["head"]
    assert type(model.left) is nn.Linear and model.left is model.right


def test_a_shared_linear_selected_by_its_second_name_keeps_its_first():
    model = inject_increlora(Siamese(), IncreLoRAConfig(target_modules=["right"], r_max=4,
                                                        init_r=2, target_rank=3))
    assert model.left._name_at_injection == "left"
