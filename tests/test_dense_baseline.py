"""The benchmarks' baseline of the authors' dense IncreLoRA layer (`DenseIncreLoRALinear`, the
layer level's ``increlora-dense`` method): it computes what the authors' layer computes, so the
speed it is compared at is that of the right arithmetic."""
import math

import pytest
import torch
from torch import nn

from increlora_fast.benchmarks.speed.dense_increlora import DenseIncreLoRALinear


def test_forward_and_score_are_the_authors_dense_ones():
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()
    layer = DenseIncreLoRALinear(base, rank=3, lora_alpha=6.0)
    with torch.no_grad():
        layer.lora_E.copy_(torch.randn(3, 1, dtype=torch.float64))
    x = torch.randn(11, 7, dtype=torch.float64)
    y = layer(x)
    dw = layer.lora_B @ torch.diag(layer.lora_E[:, 0]) @ layer.lora_A * 6.0 / (3 + 1e-5)
    torch.testing.assert_close(y, x @ (base.weight + dw).t() + base.bias, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    y.backward(dy)
    g = dy.t() @ x  # dL/d(dW)
    assert layer.score == pytest.approx(float((dw * g).abs().sum() / math.sqrt(dw.numel())),
                                        rel=1e-6)
    assert base.weight.grad is None and layer.lora_E.grad is not None


def test_no_score_when_not_tracking_or_in_eval():
    torch.manual_seed(0)
    for track, train in ((False, True), (True, False)):
        layer = DenseIncreLoRALinear(nn.Linear(4, 3), rank=2, track_score=track).train(train)
        layer(torch.randn(2, 4)).sum().backward()
        assert float(layer.score) == 0.0


@pytest.mark.parametrize("base, rank, error", [(nn.Conv1d(2, 2, 1), 2, TypeError),
                                               (nn.Linear(4, 3), 0, ValueError)])
def test_bad_arguments_are_refused(base, rank, error):
    with pytest.raises(error, match="DenseIncreLoRALinear"):
        DenseIncreLoRALinear(base, rank=rank)
