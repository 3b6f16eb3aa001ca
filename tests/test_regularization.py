"""Spec section 6: the batched orthogonal penalty equals a per-module float64 loop."""
import torch
from torch import nn

from increlora_fast import IncreLoRAConfig, inject_increlora
from increlora_fast.controller import IncreLoRAController
from increlora_fast.layer import SlotState
from increlora_fast.penalty import OrthogonalPenalty


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


def _four_layers_of_one_shape(orth_reg_weight: float = 0.3):
    model = nn.Sequential(*(nn.Linear(9, 9) for _ in range(4))).double()
    config = IncreLoRAConfig(target_modules=["0", "1", "2", "3"], r_max=5, target_rank=3,
                             incre_rank_num=1, orth_reg_weight=orth_reg_weight)
    inject_increlora(model, config)
    return model, config


def test_layers_of_one_shape_in_two_dtypes_each_keep_their_own_precision():
    """Two float32 and two float64 layers of one shape, a float32 one first: the float64 terms
    are computed in float64 (stacked with the float32 layers, they were computed in the first
    member's float32). The float32 layers' slots are exactly orthonormal (their terms are 0 in
    any precision); the float64 layers' are 1e-9 from orthonormal, a term float32 cannot
    resolve (its rounding of A A^T alone is about 6e-8)."""
    torch.manual_seed(0)
    model, config = _four_layers_of_one_shape()
    model[0].float()
    model[2].float()
    expected = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for layer in model:
            if layer.lora_A.dtype == torch.float32:
                layer.lora_A.copy_(torch.eye(5, 9))
                layer.lora_B.copy_(torch.eye(9, 5))
                continue
            q = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))[0]
            layer.lora_A.copy_(q[:5] + 1e-9 * torch.randn(5, 9, dtype=torch.float64))
            layer.lora_B.copy_(q[:, :5] + 1e-9 * torch.randn(9, 5, dtype=torch.float64))
            used = layer.slot_state != SlotState.INACTIVE
            a, b = layer.lora_A[used], layer.lora_B[:, used]
            eye = torch.eye(int(used.sum()), dtype=torch.float64)
            expected += torch.linalg.norm(a @ a.T - eye) + torch.linalg.norm(b.T @ b - eye)
    assert expected < 1e-7
    got = IncreLoRAController(model, config).regularization_loss()
    torch.testing.assert_close(got.double(), 0.3 * expected / 8, rtol=1e-6, atol=0)


def test_layers_of_one_shape_on_two_devices_are_stacked_per_device():
    """A model split over devices (device_map): the torch path stacks only the layers of one
    device (a stack over two devices raises). The meta device stands for the second one."""
    model, config = _four_layers_of_one_shape()
    model[1].to("meta")
    model[3].to("meta")
    penalty = OrthogonalPenalty(list(model), config)  # (the controller reads slots on the host)
    groups = penalty._groups_now()
    assert sorted(sorted(list(model).index(m) for m in g) for g in groups) == [[0, 2], [1, 3]]
    for group in groups:
        assert len({m.lora_A.device for m in group}) == 1
    meta = [g for g in groups if g[0].lora_A.device.type == "meta"][0]
    index = penalty._groups.index(meta)
    masks = penalty._masks_of_group(index, meta)
    assert all(t.device.type == "meta" for t in masks)
    model[1].to_empty(device="cpu")  # moved back: regrouped into one group of four
    model[3].to_empty(device="cpu")
    assert [len(g) for g in penalty._groups_now()] == [4]
