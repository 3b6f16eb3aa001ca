"""torch.compile of a model with IncreLoRALinear on the Triton kernels: one graph, no breaks.

The kernels are torch.library custom ops, opaque to the compiler. On CPU this uses the cheap
``aot_eager`` backend (inductor compiles C++), and inductor once, with the kernels under the
Triton interpreter; on a CUDA machine it uses inductor and the compiled kernels.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from increlora_fast.kernels import launch_counts, reset_launch_counts
from increlora_fast.layer import IncreLoRALinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("kernel_device")
BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"
# Same kernels in the same order in both runs: equal up to float32 rounding [0 seen on CPU].
TOL = 1e-6


def make_model() -> nn.Sequential:
    model = nn.Sequential(
        IncreLoRALinear(nn.Linear(19, 40), r_max=8, init_r=2, reserve_rank=2), nn.GELU(),
        IncreLoRALinear(nn.Linear(40, 5, bias=False), r_max=8, init_r=1, reserve_rank=1),
    ).to(DEVICE).train()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_lambda.normal_()
            layer.score_enabled = True
    return model


# On CPU also inductor once: the custom ops inside a graph whose C++ code inductor generates.
BACKENDS = [(BACKEND, False), (BACKEND, True)] + ([("inductor", False)] if DEVICE == "cpu" else [])


@pytest.mark.parametrize("backend, fused", BACKENDS)
def test_compiled_training_step_matches_eager(backend, fused, monkeypatch):
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_FUSED_LINEAR", "1" if fused else "0")
    eager = make_model()
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(3, 7, 19, device=DEVICE)

    eager(x).square().sum().backward()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    reset_launch_counts()
    compiled(x).square().sum().backward()
    counts = launch_counts()
    torch._dynamo.reset()

    # One backward pass, one score and one finish launch per layer.
    for name in ("_backward_rows_kernel", "_score_tiles_kernel", "_finish_kernel"):
        assert counts.get(name) == 2, counts
    assert (counts.get("_fused_linear_adapter_kernel") == 2) == fused, counts
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        if p_eager.grad is not None:
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=TOL, atol=TOL,
                                       msg=name)
    for i in (0, 2):
        torch.testing.assert_close(compiled_model[i].score_sum, eager[i].score_sum, rtol=TOL,
                                   atol=0)
        assert compiled_model[i].score_sum.item() > 0


def test_slot_growth_does_not_recompile(monkeypatch):
    """Activating reserve slots flips slot states only: the compiled graph stays valid. Dynamo
    warns nothing while tracing the layers (it warned that it ignores the ``lru_cache`` of the
    path's lazy import, "silent incorrectness is only a potential risk", once per process)."""
    from torch._dynamo import utils as dynamo_utils
    from torch._dynamo.utils import counters

    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_FUSED_LINEAR", "0")
    monkeypatch.setattr(dynamo_utils, "warn_once_cache", set())  # warn again in this process
    model = make_model()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    x = torch.randn(3, 7, 19, device=DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            compiled(x).square().sum().backward()
            model[0].activate_reserve(1, step)
            model[0].add_reserve(1, step)
    # (the Triton interpreter's own NumPy deprecations, under Triton 3.6 with NumPy 1.26, are
    # not the trace's)
    assert [str(w.message) for w in caught
            if "site-packages/triton/" not in w.filename.replace("\\", "/")] == []
    assert model[0].active_rank == 5
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_an_eager_call_between_compiled_steps_does_not_recompile(path, monkeypatch):
    """The path cache (`functional._PATHS`) is not read while dynamo traces: an eager call of
    the model between compiled steps (an evaluation on the plain model) fills it, and every
    graph guarded on the key's absence recompiled, once per score state. (The variant's
    first-use check: `test_an_eager_check_after_compiling_does_not_recompile`.)"""
    from torch._dynamo.utils import counters
    from increlora_fast import functional

    monkeypatch.setenv("INCRELORA_BACKEND", path)
    monkeypatch.setenv("INCRELORA_FUSED_LINEAR", "0")
    model = make_model()
    x = torch.randn(3, 7, 19, device=DEVICE)
    model(x)
    functional._PATHS.clear()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                compiled(x).square().sum().backward()
                model(x).square().sum().backward()
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


def test_the_first_triton_call_traced_does_not_recompile(monkeypatch):
    """The Triton op's lazy import (`functional._triton_op`) is not read from its module
    global while dynamo traces: a model whose first Triton call was compiled found the global
    None, then set, and recompiled once."""
    from torch._dynamo.utils import counters
    from increlora_fast import functional

    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_FUSED_LINEAR", "0")
    monkeypatch.setattr(functional, "_TRITON_OP", None)
    model = make_model()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    x = torch.randn(3, 7, 19, device=DEVICE)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                compiled(x).square().sum().backward()
        assert counters["stats"]["unique_graphs"] == 1
        assert functional._TRITON_OP is not None
    finally:
        torch._dynamo.reset()


def test_compiled_torch_func_grad_takes_the_torch_path(monkeypatch):
    """``torch.compile(torch.func.grad(loss))`` over Triton-path layers (the CUDA default)
    gives autograd's gradients: under the transform the layer takes the torch path when
    compiled too. The Triton op, traced with functorch's gradient-tracking tensors, failed
    ("RuntimeError when making fake tensor call")."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_FUSED_LINEAR", "0")
    model = make_model()
    for i in (0, 2):
        model[i].score_enabled = False  # (torch.func cannot run the score's side effect)
    x = torch.randn(3, 7, 19, device=DEVICE)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).square().sum()
    model(x).square().sum().backward()
    torch._dynamo.reset()
    counters.clear()
    reset_launch_counts()
    try:
        grads = torch.compile(torch.func.grad(loss), backend=BACKEND, fullgraph=True)(params)
    finally:
        torch._dynamo.reset()
    assert launch_counts() == {}
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _counting_checks(monkeypatch, result=None):
    """The variants `kernels.checks.check_variant` is asked to check, in order; with
    ``result`` it returns that instead of checking (a forced failure)."""
    from increlora_fast.kernels import checks
    asked, real = [], checks.check_variant

    def check_variant(device, *variant):
        asked.append(variant)
        return result if result is not None else real(device, *variant)
    monkeypatch.setattr(checks, "check_variant", check_variant)
    return asked


def _compiled_on_triton(monkeypatch):
    """(model, its compilation with `BACKEND` and fullgraph, an input) on the Triton path
    (not the fused GEMM), with the first-use check results and dynamo's caches and counters
    forgotten; `torch._dynamo.reset()` again after the test."""
    from torch._dynamo.utils import counters
    from increlora_fast import functional

    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_FUSED_LINEAR", "0")
    functional.reset_kernel_checks()
    model = make_model()
    torch._dynamo.reset()
    counters.clear()
    return (model, torch.compile(model, backend=BACKEND, fullgraph=True),
            torch.randn(3, 7, 19, device=DEVICE))


def test_a_compiled_only_run_checks_each_variant_once(monkeypatch):
    """A run that only calls the model compiled checks each Triton variant once, while the
    graph is traced, then compiles one graph that never recompiles (while dynamo traced, the
    check was skipped and nothing remembered: such a run never checked its kernels)."""
    from torch._dynamo.utils import counters
    from increlora_fast import functional

    model, compiled, x = _compiled_on_triton(monkeypatch)
    asked = _counting_checks(monkeypatch)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                compiled(x).square().sum().backward()
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    # two variants: the first layer's base has a bias, the second's has none
    assert len(asked) == 2 and asked[0] != asked[1]
    assert list(functional.kernel_check_results().values()) == [True, True]


def test_a_check_failed_while_tracing_sends_the_graph_to_the_torch_path(monkeypatch):
    """A variant failing its check while dynamo traces: one warning per variant, and the graph
    traced takes the torch path (no Triton launch), eager's results, with no recompile."""
    from torch._dynamo.utils import counters
    from increlora_fast import functional

    model, compiled, x = _compiled_on_triton(monkeypatch)
    reference = copy.deepcopy(model)
    asked = _counting_checks(monkeypatch, (False, "forced failure"))
    reset_launch_counts()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                y = compiled(x)
                y.square().sum().backward()
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    failures = [str(w.message) for w in caught if "forced failure" in str(w.message)]
    assert len(failures) == len(asked) == 2
    assert list(functional.kernel_check_results().values()) == [False, False]
    assert launch_counts() == {}
    monkeypatch.setenv("INCRELORA_BACKEND", "torch")
    torch.testing.assert_close(y, reference(x), rtol=TOL, atol=TOL)


def test_an_eager_check_after_compiling_does_not_recompile(monkeypatch):
    """While tracing, only failed checks are consulted: an eager call (an evaluation pass)
    whose variant check passes, here after the results were forgotten, leaves the compiled
    graph valid (it guarded on the check's result being absent, and recompiled once)."""
    from torch._dynamo.utils import counters
    from increlora_fast import functional

    model, compiled, x = _compiled_on_triton(monkeypatch)
    asked = _counting_checks(monkeypatch)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(x).square().sum().backward()
            model(x).square().sum().backward()
            compiled(x).square().sum().backward()
            functional.reset_kernel_checks()
            model(x).square().sum().backward()
            compiled(x).square().sum().backward()
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    assert len(asked) == 4  # each of the two variants checked, then checked again
    assert list(functional.kernel_check_results().values()) == [True, True]


def test_a_failed_eager_check_after_compiling_recompiles_to_the_torch_path(monkeypatch):
    """A variant failing its check after a graph was traced on it (here checked again after
    the results were forgotten) changes the path: the graph recompiles once and takes the
    torch path."""
    from torch._dynamo.utils import counters
    from increlora_fast import functional

    model, compiled, x = _compiled_on_triton(monkeypatch)
    try:
        compiled(x).square().sum().backward()
        functional.reset_kernel_checks()
        _counting_checks(monkeypatch, (False, "forced failure"))
        with pytest.warns(RuntimeWarning, match="forced failure"):
            model(x)
        reset_launch_counts()
        compiled(x).square().sum().backward()
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()
    assert launch_counts() == {}
