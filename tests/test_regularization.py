"""Spec section 6: the batched orthogonal penalty equals a per-module float64 loop."""
import torch
from torch import nn

from increlora_fast import IncreLoRAConfig, inject_increlora
from increlora_fast.controller import IncreLoRAController
from increlora_fast.layer import SlotState


def test_batched_penalty_equals_per_module_loop_and_has_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 9), nn.Linear(9, 9), nn.Linear(9, 4)).double()
    config = IncreLoRAConfig(target_modules=["0", "1", "2", "3"], r_max=5, target_rank=3,
                             incre_rank_num=1, orth_reg_weight=0.3)
    inject_increlora(model, config)
    controller = IncreLoRAController(model, config)
    model[1].activate_reserve(1, step=0)
    model[1].add_reserve(1, step=0)
    model[2].add_reserve(2, step=0)
    expected = 0.0
    for layer in model:
        used = layer.slot_state != SlotState.INACTIVE
        a, b = layer.lora_A[used], layer.lora_B[:, used]
        eye = torch.eye(int(used.sum()), dtype=torch.float64)
        expected = expected + torch.linalg.norm(a @ a.T - eye) + torch.linalg.norm(b.T @ b - eye)
    expected = 0.3 * expected / (2 * 4)
    got = controller.regularization_loss()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    got.backward()
    for layer in model:
        inactive = layer.slot_state == SlotState.INACTIVE
        assert layer.lora_A.grad[~inactive].abs().sum() > 0
        assert torch.all(layer.lora_A.grad[inactive] == 0)
        assert torch.all(layer.lora_B.grad[:, inactive] == 0)


def test_zero_weight_gives_zero_penalty():
    model = nn.Sequential(nn.Linear(3, 3))
    config = IncreLoRAConfig(target_modules=["0"], r_max=3, orth_reg_weight=0.0)
    inject_increlora(model, config)
    assert float(IncreLoRAController(model, config).regularization_loss()) == 0.0
