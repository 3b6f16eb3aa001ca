"""inject_increlora on users' own PyTorch models built in unusual but real ways: lazy modules,
linears reached through plain Python containers, training through ``torch.func``."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from increlora_fast import IncreLoRAConfig, IncreLoRAController, increlora_layers, inject_increlora


def config(targets, **kwargs) -> IncreLoRAConfig:
    return IncreLoRAConfig(target_modules=targets, r_max=4, init_r=1, target_rank=2,
                           init_warmup=2, incre_interval=2, top_h=1, total_step=10, **kwargs)


@pytest.mark.parametrize("targets", [["0", "2"], ["2"], "all-linear"])
def test_uninitialized_lazy_module_is_refused_naming_it(targets):
    """A LazyLinear before its first forward holds uninitialized parameters: injection failed
    with torch's "Attempted to use an uninitialized parameter in requires_grad_" (freezing the
    model), naming no module, also where the lazy module was not a target."""
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError) as error:
        inject_increlora(model, config(targets))
    message = str(error.value)
    assert "\n" not in message and "'0'" in message and "lazy" in message.lower()
    assert "forward" in message  # the fix: one dry-run forward initializes it
    assert type(model[0]) is nn.LazyLinear and type(model[2]) is nn.Linear
    assert not hasattr(model, "increlora_config")
    model(torch.randn(3, 5))  # the dry run: afterwards the model injects and computes
    inject_increlora(model, config(targets))
    assert model(torch.randn(3, 5)).shape == (3, 4)


class CalledThroughAList(nn.Module):
    """A cell registered as ``self.cell`` and also held in a plain Python container (not
    registered) that the forward calls it through."""

    def __init__(self, container: str) -> None:
        super().__init__()
        self.cell = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)
        self.container = container
        self.steps = [self.cell, self.cell] if container == "list" else {"a": self.cell}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = self.steps if self.container == "list" else list(self.steps.values())
        for cell in cells:
            x = torch.tanh(cell(x))
        return self.out(x)


@pytest.mark.parametrize("container", ["list", "dict"])
def test_target_also_held_in_a_plain_container_is_refused(container):
    """Injection replaced ``self.cell`` but the list (or dict) kept the plain nn.Linear, which
    the forward called: the adapter never ran, and the run trained ``out`` alone with nothing
    said until the first allocation round (and nothing at all where the layer was also called
    once through its attribute)."""
    model = CalledThroughAList(container)
    with pytest.raises(ValueError) as error:
        inject_increlora(model, config(["cell", "out"]))
    message = str(error.value)
    assert "\n" not in message and "'cell'" in message and "'steps'" in message
    assert "ModuleList" in message or "ModuleDict" in message
    assert type(model.cell) is nn.Linear and not hasattr(model, "increlora_config")
    with pytest.warns(UserWarning, match="'cell'"):  # all-linear leaves it out, saying so
        inject_increlora(model, config("all-linear"))
    assert type(model.cell) is nn.Linear and type(model.out).__name__ == "IncreLoRALinear"


def small_model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = inject_increlora(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)),
                             config(["0", "2"], **kwargs))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_lambda.normal_()
    return model


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_func_grad_over_an_injected_model(kernel_device, monkeypatch, backend):
    """``torch.func.grad`` of a loss through ``functional_call`` gives the gradients autograd
    gives (passes that track no score: the triplet score reads ``.grad`` afterwards). The
    Triton path failed in every forward under the transform with torch's "In order to use an
    autograd.Function with functorch transforms ... it must override the setup_context
    staticmethod" (or, when the first call came under the transform, the kernels' first-use
    check failed there, warned to report a kernel bug, and kept Triton off for the process);
    under a transform the layer takes the torch path."""
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    model = small_model(score="triplet").to(kernel_device)
    IncreLoRAController(model, model.increlora_config)
    x = torch.randn(6, 5, 8, device=kernel_device)
    y = torch.randn(6, 5, 4, device=kernel_device)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss(p):
        return (torch.func.functional_call(model, p, (x,)) - y).square().mean()
    (model(x) - y).square().mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = torch.func.grad(loss)(params)
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_score_tracking_under_torch_func_is_refused_in_one_line():
    """The exact score is accumulated in autograd's backward as a side effect, which torch.func
    transforms cannot run: a tracked pass failed with torch's message on an internal
    autograd.Function, naming neither the layer nor a way out."""
    model = small_model()
    IncreLoRAController(model, model.increlora_config).track_step(4)  # a round's window
    assert model[0].score_enabled
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(6, 8)
    with pytest.raises(RuntimeError) as error:
        torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
    message = str(error.value)
    assert "\n" not in message and "'0'" in message and "torch.func" in message
    assert "score='triplet'" in message and "backward()" in message


class WithPenalty(nn.Module):
    """A module whose forward returns the controller's penalty, for ``functional_call``."""

    def __init__(self, model: nn.Module, controller: IncreLoRAController) -> None:
        super().__init__()
        self.model, self.controller = model, controller

    def forward(self) -> torch.Tensor:
        return self.controller.regularization_loss()


def test_penalty_under_torch_func_on_the_models_own_parameters_is_refused():
    """``controller.regularization_loss()`` reads the layers' own parameters: inside a
    ``torch.func.grad`` over ``functional_call``'s parameters it is a constant to the
    transform, and the penalty's gradient was silently zero. Called there it is refused in one
    line; its gradient taken by autograd outside the transform matches the one computed inside
    a ``functional_call`` of a module whose forward calls it (the supported ways)."""
    model = small_model(score="triplet")
    controller = IncreLoRAController(model, model.increlora_config)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError) as error:
        torch.func.grad(lambda p: controller.regularization_loss())(params)
    message = str(error.value)
    assert "\n" not in message and "regularization_loss" in message and "torch.func" in message

    wrapper = WithPenalty(model, controller)
    inside = torch.func.grad(lambda p: torch.func.functional_call(wrapper, p, ()))(
        {f"model.{n}": p for n, p in params.items()})
    controller.regularization_loss().backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in params.items()}
    assert any(float(g.abs().max()) > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(inside[f"model.{name}"], grad, msg=name)


def test_penalty_under_a_compiled_torch_func_is_refused_and_its_supported_way_compiles():
    """Compiled, ``torch.func.grad`` over the layers' own parameters' penalty failed inside
    the compiler ("Cannot access storage of TensorWrapper", a BackendCompilerFailed) instead of
    refusing in one line; the supported way (inside a ``functional_call``) compiles and gives
    autograd's gradient."""
    model = small_model(score="triplet")
    controller = IncreLoRAController(model, model.increlora_config)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch._dynamo.reset()
    try:
        with pytest.raises(RuntimeError) as error:
            torch.compile(torch.func.grad(lambda p: controller.regularization_loss()),
                          backend="aot_eager")(params)
        wrapper = WithPenalty(model, controller)
        inside = torch.compile(torch.func.grad(
            lambda p: torch.func.functional_call(wrapper, p, ())), backend="aot_eager")(
            {f"model.{n}": p for n, p in params.items()})
    finally:
        torch._dynamo.reset()
    assert "regularization_loss" in str(error.value) and "\n" not in str(error.value)
    controller.regularization_loss().backward()
    for name, p in params.items():
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(inside[f"model.{name}"], grad, msg=name)


def test_a_listed_name_means_the_parametrized_layer_not_its_parametrization():
    """In an nn.Sequential, ``target_modules=["0"]`` also matched the weight_norm
    parametrization's own module ``0.parametrizations.weight.0`` (a suffix "0"), and the whole
    injection was refused as "a _WeightNorm". It adapts the parametrized linear "0" now, and the
    output with zero-initialized B is the parametrized layer's own."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    want = model(x)
    model = inject_increlora(model, IncreLoRAConfig(target_modules=["0"], r_max=4, init_r=1,
                                                    target_rank=2))
    assert [n for n, _ in increlora_layers(model)] == ["0"]
    torch.testing.assert_close(model(x), want)


def test_an_unrelated_error_under_torch_func_in_a_tracked_pass_is_not_blamed_on_the_score():
    """A tracked pass under a torch.func transform that fails for a reason of its own (an
    input of the wrong width here) was reported as score tracking that torch.func cannot run,
    sending the user to loss.backward() or score='triplet' for a wrong input: the error is
    torch's own, as outside the transform."""
    model = small_model()
    IncreLoRAController(model, model.increlora_config).track_step(4)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(6, 7)  # the layers take 8 features
    with pytest.raises(RuntimeError) as outside:
        model(x)
    with pytest.raises(RuntimeError) as inside:
        torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
    assert "score" not in str(inside.value) and str(inside.value) == str(outside.value)


def test_penalty_in_a_functional_call_with_the_first_layer_frozen_is_taken():
    """An adapter frozen on purpose (the first layer's here) is not among the parameters a
    ``functional_call`` over those that require grad passes: the penalty was refused there as
    reading the layers' own parameters, though the other layers' were the transform's. Its
    gradient matches autograd's outside the transform."""
    model = small_model(score="triplet")
    controller = IncreLoRAController(model, model.increlora_config)
    for name in ("lora_A", "lora_B", "lora_lambda"):
        getattr(model[0], name).requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and not any(n.startswith("0.") for n in params)

    wrapper = WithPenalty(model, controller)
    inside = torch.func.grad(lambda p: torch.func.functional_call(wrapper, p, ()))(
        {f"model.{n}": p for n, p in params.items()})
    controller.regularization_loss().backward()
    assert any(float(p.grad.abs().max()) > 0 for p in params.values() if p.grad is not None)
    for name, p in params.items():
        want = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(inside[f"model.{name}"], want, msg=name)


def test_the_model_itself_is_named_as_such_in_the_refusals():
    """Where the model itself (name '') held the plain container or the lazy parameter, the
    refusals named "module ''"; they say "the model"."""
    with pytest.raises(ValueError) as held:
        inject_increlora(CalledThroughAList("list"), config(["cell"]))
    with pytest.raises(ValueError) as lazy:
        inject_increlora(nn.LazyLinear(4), config(["weight"]))
    for message in (str(held.value), str(lazy.value)):
        assert "''" not in message and "the model" in message, message


@pytest.mark.parametrize("targets", ["all-linear", ".*", ["fc"]])
def test_a_model_that_is_one_linear_is_refused_saying_to_wrap_it(targets):
    """A model that is one nn.Linear has no submodule to replace in place: injection said that
    ``'all-linear'`` "selected no module to adapt" (IncreLoRA "adapts nn.Linear", which the
    model is), or that a name matches nothing among names ending in ``[]``."""
    model = nn.Linear(8, 4)
    with pytest.raises(ValueError) as error:
        inject_increlora(model, config(targets))
    message = str(error.value)
    assert "\n" not in message and "the model itself" in message and "nn.Sequential" in message
    assert type(model) is nn.Linear and not hasattr(model, "increlora_config")
    wrapped = nn.Sequential(model)
    inject_increlora(wrapped, config(["0"]))
    assert [name for name, _ in increlora_layers(wrapped)] == ["0"]
