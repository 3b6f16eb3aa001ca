"""An IncreLoRA layer called more than once per forward (weight sharing): a block applied
several times (ALBERT's one layer group, universal transformers), one linear applied to two
inputs, a linear registered under two names (siamese encoders). Gradients, scores, the penalty,
merging and saving count the layer once and its calls together."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from increlora_fast import (IncreLoRAConfig, IncreLoRAController, increlora_layers,
                            inject_increlora, load_adapter, save_adapter)
from increlora_fast.integrations.peft_export import export_peft
from increlora_fast.kernels.reference import effective_lambda, read_slots

# Relative to the largest float64 reference gradient: float64 everywhere [1e-16 measured].
TOL64 = 1e-12


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


@pytest.mark.parametrize("exclude", [["right"], ["left"], r"right"])
def test_all_linear_excluding_one_name_of_a_shared_linear_leaves_it_out(exclude):
    """Under ``target_modules='all-linear'`` too: the second name was refused as naming 'not a
    target' (all-linear knew each module by its first name only)."""
    model = inject_increlora(Siamese(), IncreLoRAConfig(
        target_modules="all-linear", exclude_modules=exclude, r_max=2, init_r=1,
        target_rank=2))
    assert [n for n, _ in increlora_layers(model)] == ["head"]
    assert type(model.left) is nn.Linear and model.left is model.right


@pytest.mark.parametrize("targets", ["all-linear", r"left|head"])
@pytest.mark.parametrize("saved", [["right"], ["left"]])
def test_either_name_of_a_shared_linear_saves_it_in_full(saved, targets, tmp_path):
    """``modules_to_save`` sees every name of a shared linear, as ``target_modules`` and
    ``exclude_modules`` do: ``["right"]`` was refused as 'matches no module name'. The module
    trains in full and gets no adapter, under either name; save_adapter / load_adapter carry
    it, and peft loads the export with our outputs."""
    torch.manual_seed(0)
    base = Siamese()
    state = copy.deepcopy(base.state_dict())
    config = IncreLoRAConfig(target_modules=targets, modules_to_save=saved, r_max=2, init_r=1,
                             target_rank=2)
    model = inject_increlora(base, config)
    assert [n for n, _ in increlora_layers(model)] == ["head"]
    assert type(model.left) is nn.Linear and model.left is model.right
    assert model.left.weight.requires_grad and model.left.bias.requires_grad
    with torch.no_grad():  # what training does
        model.left.weight.add_(0.5)
        model.head.lora_B.normal_()
        model.head.lora_lambda.normal_()
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    expected = model.eval()(a, b)
    save_adapter(model, tmp_path / "ours")
    fresh = Siamese()
    fresh.load_state_dict(state)
    loaded = load_adapter(inject_increlora(fresh, copy.deepcopy(config)), tmp_path / "ours")
    torch.testing.assert_close(loaded.eval()(a, b), expected, rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    export_peft(model, tmp_path / "peft")
    fresh = Siamese()
    fresh.load_state_dict(state)
    theirs = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(theirs(a, b), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target,saved", [("right", "left"), ("left", "right"),
                                          ("right", "right")])
def test_a_target_named_only_inside_modules_to_save_is_refused_by_either_name(target, saved):
    """A listed target whose module lies in modules_to_save gets no adapter and is refused,
    whichever names of a shared linear the two fields use: naming its second name as the
    target, it was left unadapted silently."""
    with pytest.raises(ValueError) as error:
        inject_increlora(Siamese(), IncreLoRAConfig(
            target_modules=[target, "head"], modules_to_save=[saved], r_max=2, init_r=1,
            target_rank=2))
    message = str(error.value)
    assert "\n" not in message and f"target module {target!r} matches only modules inside " \
        "modules_to_save" in message


def test_a_shared_linear_selected_by_its_second_name_keeps_its_first():
    model = inject_increlora(Siamese(), IncreLoRAConfig(target_modules=["right"], r_max=4,
                                                        init_r=2, target_rank=3))
    assert model.left._name_at_injection == "left"


class Repeated(nn.Module):
    """One linear applied ``CALLS`` times in a row (a universal transformer's shared block)."""
    CALLS = 3

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(12, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.CALLS):
            x = torch.tanh(self.block(x))
        return self.head(x)


def _repeated_model(device: str) -> nn.Module:
    model = inject_increlora(Repeated(), IncreLoRAConfig(target_modules=["block"], r_max=6,
                                                         init_r=3, target_rank=4))
    layer = model.block
    with torch.no_grad():  # every part of the adapter counts; one active slot at lambda 0
        for t in (layer.lora_A, layer.lora_B, layer.lora_lambda):
            t.normal_()
        layer.lora_lambda[1] = 0.0
    return model.double().to(device)


def _float64_reference(model: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """(gradients of x, A, B, lambda; the per-call Gs) of ``Repeated`` in plain float64 ops."""
    layer = model.block
    leaves = [t.detach().clone().requires_grad_() for t in
              (x, layer.lora_A, layer.lora_B, layer.lora_lambda)]
    xx, a, b, lam = leaves
    reserve = layer.reserve_lambda if layer.advance_learning else 0.0
    lam_eff = effective_lambda(lam, layer.slot_state, layer.lora_alpha, reserve)
    a, b = read_slots(a, b, layer.slot_state, layer.lora_alpha, reserve)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    inputs, outputs = [], []
    h = xx
    for _ in range(Repeated.CALLS):
        inputs.append(h.detach().reshape(-1, h.shape[-1]))
        y = h @ w.t() + bias + ((h @ a.t()) * lam_eff) @ b.t()
        y.retain_grad()
        outputs.append(y)
        h = torch.tanh(y)
    model.head(h).backward(dy)
    calls = [o.grad.reshape(-1, o.shape[-1]).t() @ i for o, i in zip(outputs, inputs)]
    return [t.grad for t in leaves], calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tracking", ["off", "per_pass", "exact_step"])
def test_a_layer_called_three_times_gets_the_float64_gradients_and_scores(
        backend, tracking, monkeypatch, kernel_device):
    """Each call saves its own input and H (no workspace shared between calls): the gradients
    are the sums over the calls, with the score tracked or not. The exact-step score is spec
    section 3's |dW * sum_calls G|; the per-pass score adds each call's |dW * G_call|, as it
    adds each micro-batch's (`IncreLoRAConfig.exact_step_score`)."""
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    model = _repeated_model(kernel_device)
    x = torch.randn(2, 5, 12, dtype=torch.float64, device=kernel_device)
    dy = torch.randn(2, 5, 2, dtype=torch.float64, device=kernel_device)
    ref, calls = _float64_reference(copy.deepcopy(model), x, dy)
    layer = model.block
    layer.score_enabled = tracking != "off"
    layer.exact_step_score = tracking == "exact_step"
    xx = x.clone().requires_grad_()
    model(xx).backward(dy)
    got = [xx.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_lambda.grad]
    for g, r in zip(got, ref):
        assert (g - r).abs().max() <= TOL64 * r.abs().max()
    dw = layer.delta_weight()
    if tracking == "per_pass":
        expected = sum((dw * g).abs().sum() for g in calls) / math.sqrt(dw.numel())
        assert torch.isclose(layer.take_score().double(), expected, rtol=1e-6)
    elif tracking == "exact_step":
        expected = (dw * sum(calls)).abs().sum() / math.sqrt(dw.numel())
        got_score = (dw * layer.take_score_grad().double()).abs().sum() / math.sqrt(dw.numel())
        assert torch.isclose(got_score, expected, rtol=1e-6)  # float32 accumulator


def _tiny_albert():
    transformers = pytest.importorskip("transformers")
    config = transformers.AlbertConfig(
        vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=24, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    model = inject_increlora(transformers.AlbertForSequenceClassification(config),
                             IncreLoRAConfig(target_modules=["query", "value", "ffn"], r_max=4,
                                             init_r=2, target_rank=3))
    for _, layer in increlora_layers(model):
        with torch.no_grad():
            layer.lora_lambda.normal_()
    return model


def test_albert_shared_layers_on_the_kernels_match_the_torch_path(monkeypatch, kernel_device):
    """ALBERT applies its one layer group num_hidden_layers times: the Triton path's gradients
    and per-pass scores of those layers equal the torch path's (float64)."""
    model = _tiny_albert().double().to(kernel_device)
    ids = torch.randint(0, 50, (2, 6), device=kernel_device)
    labels = torch.tensor([0, 1], device=kernel_device)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("INCRELORA_BACKEND", backend)
        m = copy.deepcopy(model)
        layers = [layer for _, layer in increlora_layers(m)]
        for layer in layers:
            layer.score_enabled = True
        embeds = m.albert.embeddings(input_ids=ids).detach().requires_grad_()
        m(inputs_embeds=embeds, labels=labels).loss.backward()
        results[backend] = [embeds.grad] + [p.grad for layer in layers for p in (
            layer.lora_A, layer.lora_B, layer.lora_lambda)] + [
            layer.take_score() for layer in layers]
    for got, ref in zip(results["triton"], results["torch"]):
        assert (got - ref).abs().max() <= TOL64 * ref.abs().max()


def test_a_shared_linear_counts_once_in_the_penalty_merge_and_saved_adapter(tmp_path):
    model = inject_increlora(Siamese(), IncreLoRAConfig(target_modules=["left"], r_max=4,
                                                        init_r=2, target_rank=3))
    with torch.no_grad():
        for t in (model.left.lora_A, model.left.lora_B, model.left.lora_lambda):
            t.normal_()
    controller = IncreLoRAController(model)
    assert controller.layers == [model.left] and controller.total_budget == 3
    alone = IncreLoRAController(inject_increlora(
        nn.Sequential(copy.deepcopy(model.left.base_layer)),
        IncreLoRAConfig(target_modules=["0"], r_max=4, init_r=2, target_rank=3)))
    alone.layers[0].load_state_dict(model.left.state_dict())
    assert torch.equal(controller.regularization_loss(), alone.regularization_loss())
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    model.eval()
    y = model(a, b)
    save_adapter(model, tmp_path / "adapter")
    model.left.merge()
    torch.testing.assert_close(model(a, b), y)
    model.left.unmerge()
    torch.testing.assert_close(model(a, b), y)
    fresh = Siamese()
    fresh.left.load_state_dict(model.left.base_layer.state_dict())
    fresh.head.load_state_dict(model.head.state_dict())
    fresh = inject_increlora(fresh, IncreLoRAConfig(target_modules=["left"], r_max=4, init_r=2,
                                                    target_rank=3))
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh.eval()(a, b), y)
