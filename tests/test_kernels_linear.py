"""The Triton adapted linear (`kernels.linear`) against the float64 torch reference, and the
properties the GPU path promises: no extra activation-sized tensors, few torch ops, no atomics in
deterministic mode, one compiled variant whatever the row count, launches on the tensors' device,
TF32 read without raising, and the first-use safety net.

On CPU the kernels run under the Triton interpreter (conftest), on CUDA compiled.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import pytest
import torch
from torch import nn

from increlora_fast import functional
from increlora_fast.layer import IncreLoRALinear, SlotState
from increlora_fast.kernels.reference import adapted_linear_torch

# (M, in, out, r_max): single and multi-tile, odd sizes, two slot blocks, r_max 128.
SHAPES = [(1, 5, 19, 16), (37, 24, 40, 16), (70, 19, 33, 32), (33, 40, 5, 128)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


@pytest.fixture(params=["kernels", "gemm"])
def backward_design(request, monkeypatch):
    """The adapter's backward on the row and finish kernels (the default) or as cuBLAS GEMMs
    and aten ops (`kernels.gemm_backward`, from `linear.GEMM_BACKWARD_ROWS` rows on)."""
    from increlora_fast.kernels import linear
    if request.param == "gemm":
        monkeypatch.setattr(linear, "GEMM_BACKWARD_ROWS", 0)
    linear.clear_plan_cache()
    yield request.param
    linear.clear_plan_cache()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_slot_mode_matches_float64_reference(kernel_device, dtype, shape, backward_design):
    """Forward and every gradient (x, A, B, lambda) and the exact score, with active, reserve and
    dead slots (NaN/inf in the dead slots' A rows and B columns, inside live slot blocks) and an
    active slot at lambda 0; float32 adapters on 16-bit activations. Tolerances per dtype in
    `kernels.checks.TOL`."""
    from increlora_fast.kernels.checks import check_problem
    m, k, n, r = shape
    adapter = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    rec = check_problem(torch.device(kernel_device), m, k, n, r, dtype, adapter, dtype,
                        seed=_seed())
    assert rec["ok"], rec


@pytest.mark.parametrize("case", ["conv1d", "no_bias", "no_base", "dropout", "fused",
                                  "base_dtype_adapter", "base_dtype_adapter_fp16"])
def test_variants_match_float64_reference(kernel_device, case, backward_design):
    from increlora_fast.kernels.checks import check_problem
    dtype = torch.float32
    kw = dict(weight_in_out=case == "conv1d", has_bias=case != "no_bias",
              fused=case == "fused", dropout=case == "dropout")
    weight = None if case == "no_base" else dtype
    half = {"base_dtype_adapter": torch.bfloat16, "base_dtype_adapter_fp16": torch.float16}
    adapter = act = half.get(case, dtype)
    rec = check_problem(torch.device(kernel_device), 45, 29, 38, 16, act, adapter,
                        act if weight else None, seed=_seed(), **kw)
    assert rec["ok"], rec


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
def test_first_use_check_catches_a_slightly_wrong_score(kernel_device, dtype, monkeypatch):
    """The 16-bit exact score is checked to `checks.SCORE_TOL` (1e-4: no input rounding enters
    it), not to the 16-bit operands' `TOL` (bfloat16 3e-2): correct kernels pass on fresh
    inputs, with dropout too (the reference takes the adapter input rounded as the kernel's:
    with 4/3 exact it was 2e-3 off in bfloat16), with their score within 1e-5 of float64 (a
    direct measurement beside the check's: float32 accumulation alone, at 37 rows), while a
    score 0.5 % off, or one without one active slot's part of dW, fails the check."""
    from increlora_fast.kernels import checks
    device = torch.device(kernel_device)
    seed = _seed()
    args = (device, 37, 24, 40, 16, dtype, torch.float32, dtype)
    assert checks.check_problem(*args, seed=seed)["ok"]
    rec = checks.check_problem(*args, dropout=True, seed=seed)
    assert rec["ok"], rec
    problem = checks._problem(*args, False, True, torch.Generator().manual_seed(seed))
    got, want = (checks._run(problem, kernel, False, None)[5] for kernel in (True, False))
    assert abs(got.double() - want).item() <= 1e-5 * want.item()

    run = checks._run

    def off(factor: float, dead_slot: Optional[int]):
        def wrong_score(p, triton_path, fused, mask):
            out = run(p, triton_path, fused, mask)
            if triton_path:
                q = dict(p, lam=p["lam"].clone())
                if dead_slot is not None:
                    q["lam"][dead_slot] = 0.0  # its lam_eff is 0: out of dW
                out[5] = run(q, False, fused, mask)[5].float() * factor
            return out
        return wrong_score
    # the active slot of the largest |lambda|: a slot drawn near lambda 0 adds too little to
    # dW to be missed (slot 2 at lambda 9e-4 was 2e-6 of the score: seed 1532168270)
    active = (problem["state"] == SlotState.ACTIVE).nonzero().flatten()
    slot = int(active[problem["lam"][active].abs().argmax()])
    for factor, dead_slot in ((1.005, None), (0.995, None), (1.0, slot)):
        monkeypatch.setattr(checks, "_run", off(factor, dead_slot))
        rec = checks.check_problem(*args, seed=seed)
        assert not rec["ok"] and rec["error"].startswith("score"), (factor, dead_slot, rec)
    monkeypatch.setattr(checks, "_run", off(1.0, None))  # the wrapper alone changes nothing
    assert checks.check_problem(*args, seed=seed)["ok"]


def test_check_problems_are_built_as_the_layer_and_a_real_backward_build_them():
    """The kernel checks give lambda the dtype IncreLoRALinear keeps it in (float32 next to
    float16 A and B) and dy the scale of a loss averaged over the M tokens (about 1/M per row),
    not unit rows, whose sum over 32,768 tokens overflowed a float16 dlambda."""
    from increlora_fast.kernels.checks import _problem
    p = _problem(torch.device("cpu"), 512, 8, 64, 16, torch.float16, torch.float16,
                 torch.float16, False, True, torch.Generator().manual_seed(0))
    assert p["A"].dtype == p["B"].dtype == torch.float16 and p["lam"].dtype == torch.float32
    assert 0.8 / 512 < p["dy"].float().std().item() < 1.25 / 512


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_direct_mode_any_strides(kernel_device, layout):
    """lowrank_adapter: lam used as given (every slot's gradient exact), x as a strided or
    transposed view (copied to unit inner stride first)."""
    from increlora_fast.kernels.linear import lowrank_adapter
    m, k, n, r = 13, 21, 17, 16
    dev = kernel_device
    x = (torch.randn(m, 2 * k + 1, dtype=torch.float64, device=dev)[:, 1::2] if layout == "strided"
         else torch.randn(k, m, dtype=torch.float64, device=dev).t())
    a = torch.randn(r, k, dtype=torch.float64, device=dev)
    b = torch.randn(n, r, dtype=torch.float64, device=dev)
    lam = torch.randn(r, dtype=torch.float64, device=dev)
    lam[5:9] = 0.0
    dy = torch.randn(m, n, dtype=torch.float64, device=dev)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, lam)]
    out = lowrank_adapter(*leaves)
    out.backward(dy)
    ref_leaves = [t.clone().requires_grad_() for t in (x, a, b, lam)]
    ref = adapted_linear_torch(ref_leaves[0], None, None, *ref_leaves[1:], None)
    ref.backward(dy)
    for got, want in [(out, ref)] + [(g.grad, w.grad) for g, w in zip(leaves, ref_leaves)]:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(leaves[1].grad[5:9]) == 0  # lam == 0: no dA, dB
    assert torch.count_nonzero(leaves[3].grad[5:9]) == 4  # but lambda's own gradient


def _record_launches(monkeypatch) -> list:
    from increlora_fast.kernels import utils as kutils
    calls = []
    real = kutils.launch

    def recording(kernel, grid, *args, **kwargs):
        calls.append((kutils.kernel_name(kernel), grid, kwargs))
        return real(kernel, grid, *args, **kwargs)
    monkeypatch.setattr(kutils, "launch", recording)
    return calls


def _layer_step(m: int, dev: str, track: bool = False) -> None:
    layer = IncreLoRALinear(nn.Linear(24, 40), r_max=16, init_r=3, reserve_rank=2).to(dev)
    with torch.no_grad():
        layer.lora_lambda.normal_()
    layer.score_enabled = track
    x = torch.randn(m, 24, device=dev, requires_grad=True)
    layer(x).sum().backward()


def test_backward_splits_rows_without_atomics(kernel_device, monkeypatch):
    """The backward spreads the rows over several programs and sums their partials in the
    finish kernel; no kernel of the layer uses atomics, so every result is deterministic."""
    import inspect

    from increlora_fast.kernels import lowrank, score
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")
    calls = _record_launches(monkeypatch)
    _layer_step(301, kernel_device, track=True)
    grids = {name: grid for name, grid, _ in calls}
    assert grids["_backward_rows_kernel"][0] > 1, grids
    assert set(grids) == {"_project_kernel", "_expand_kernel", "_backward_rows_kernel",
                          "_score_tiles_kernel", "_finish_kernel"}, grids
    for module in (lowrank, score):
        assert "tl.atomic" not in inspect.getsource(module)


def test_deterministic_mode_is_bitwise_reproducible(kernel_device, monkeypatch):
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    grads = []
    with _deterministic():
        for _ in range(2):
            torch.manual_seed(0)
            layer = IncreLoRALinear(nn.Linear(24, 40), r_max=16, init_r=3).to(kernel_device)
            x = torch.randn(301, 24, device=kernel_device, requires_grad=True)
            layer(x).square().sum().backward()
            grads.append([x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_lambda.grad])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_row_count_changes_no_constexpr(kernel_device, monkeypatch):
    """The split of rows across programs is a runtime argument: two batch sizes launch every
    kernel with the same constexprs, so no new variant is compiled per batch shape."""
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")
    calls = _record_launches(monkeypatch)
    _layer_step(301, kernel_device)
    first = {name: kw for name, _, kw in calls}
    calls.clear()
    _layer_step(77, kernel_device)
    assert {name: kw for name, _, kw in calls} == first


def _deterministic():
    @contextlib.contextmanager
    def ctx():
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before)
    return ctx()


def _activation_allocations(run, threshold: int) -> int:
    """Ops that allocated at least ``threshold`` bytes themselves, seen by torch's profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage >= threshold)


# Ops that only allocate or describe memory: not device work.
ALLOCATION_OPS = {"aten.empty.memory_format", "aten.empty_strided.default",
                  "aten.empty_like.default", "aten.new_empty.default"}


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that do device work: neither views nor bare allocations."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func) not in ALLOCATION_OPS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _device_work(monkeypatch, run) -> list:
    """The aten compute ops and Triton launches (as ``triton:<kernel>``) of ``run()``, the
    kernels stubbed out: the interpreter's own bookkeeping ops are not the layer's, and the
    results do not matter for a count."""
    from increlora_fast.kernels import utils as kutils
    counter = _OpCounter()
    monkeypatch.setattr(kutils, "launch", lambda kernel, grid, *a, **k: counter.ops.append(
        "triton:" + kutils.kernel_name(kernel)))
    with counter:
        run()
    return counter.ops


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU profiler counts CPU allocations")
@pytest.mark.parametrize("track", [False, True])
def test_no_extra_activation_allocations_and_few_launches(kernel_device, monkeypatch, track):
    """One layer's forward+backward on the Triton path allocates no more activation-sized
    tensors than the frozen nn.Linear (y and dx), with score tracking on or off, and issues
    exactly the device launches docs/kernels.md states (Triton kernels plus aten compute ops,
    gradients set to None): 6 with tracking off and 7 with it on (the two GEMMs, project,
    expand, backward rows, [score], finish); the second call of a shape runs no validation op
    either."""
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    m, k, n = 512, 48, 80
    base = nn.Linear(k, n).requires_grad_(False)
    layer = IncreLoRALinear(nn.Linear(k, n), r_max=16, init_r=3, reserve_rank=2).train()
    with torch.no_grad():
        layer.lora_lambda.normal_()
    layer.score_enabled = track
    x = torch.randn(m, k, requires_grad=True)
    dy = torch.randn(m, n)

    def step(module):
        def run():
            for t in [x, *module.parameters()]:
                t.grad = None  # no gradient accumulation (add_) into earlier .grad
            module(x).backward(dy)
        return run
    step(layer)()  # first use: the safety-net check runs here, not below
    threshold = m * min(k, n) * 4
    floor = _activation_allocations(step(base), threshold)
    ours = _activation_allocations(step(layer), threshold)
    assert floor == 2 and ours <= floor, (floor, ours)
    work = _device_work(monkeypatch, step(layer))
    launches = [op for op in work if op.startswith("triton:")]
    assert len(launches) == (5 if track else 4), work
    assert len(work) == (7 if track else 6), work


def test_tf32_read_through_the_new_api():
    """torch 2.9+ raises on reading the legacy allow_tf32 flag once fp32_precision was set;
    the kernels' dtype config reads the precision without raising."""
    pytest.importorskip("triton")
    from increlora_fast.kernels.utils import dot_config, tf32_enabled
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert tf32_enabled()
        assert dot_config(torch.float32, interpreted=False).precision == "tf32"
        matmul.fp32_precision = "ieee"
        assert dot_config(torch.float32, interpreted=False).precision == "ieee"
    finally:
        matmul.fp32_precision = before


def test_a_cached_plan_follows_tf32_set_after_its_first_call(monkeypatch):
    """The launch plan cached per operand key (`linear._plan`) holds the dots' input precision:
    a float32 layer planned under IEEE takes TF32 once torch allows it, and IEEE again after
    (the setting is part of the key); other dtypes have one plan whatever it is. Planned as
    for a GPU (under the interpreter the kernels never take TF32)."""
    pytest.importorskip("triton")
    from increlora_fast.kernels import linear
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    monkeypatch.setattr(linear, "_INTERPRETED", False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def precision(dtype):
        x, a, b = (torch.randn(*shape, dtype=dtype, device=dev)
                   for shape in ((3, 24), (4, 24), (40, 4)))
        lam = torch.randn(4, dtype=dtype, device=dev)
        return linear._plan(x, None, None, None, False, a, b, lam, None, None,
                            dtype).dot["PRECISION"]
    before = matmul.fp32_precision
    linear.clear_plan_cache()
    try:
        seen = []
        for mode in ("ieee", "tf32", "ieee"):
            matmul.fp32_precision = mode
            seen.append((precision(torch.float32), precision(torch.bfloat16)))
        assert seen == [("ieee", "ieee"), ("tf32", "ieee"), ("ieee", "ieee")]
        assert len(linear._PLANS) == 3
    finally:
        matmul.fp32_precision = before
        linear.clear_plan_cache()


def test_launch_runs_under_the_tensors_device(monkeypatch):
    """A tensor on cuda:1 while cuda:0 is current: the launch happens inside
    torch.cuda.device(cuda:1)."""
    pytest.importorskip("triton")
    from increlora_fast.kernels import utils as kutils

    class OnCuda1(torch.Tensor):
        @property
        def is_cuda(self):
            return True

        @property
        def device(self):
            return torch.device("cuda", 1)

    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(torch.device(dev))
        yield

    class FakeKernel:
        fn = type("F", (), {"__name__": "_fake_kernel"})

        def __getitem__(self, grid):
            return lambda *a, **k: entered.append("launched")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    t = torch.zeros(2).as_subclass(OnCuda1)
    kutils.launch(FakeKernel(), (1,), t)
    assert entered == [torch.device("cuda", 1), "launched"]


@pytest.fixture
def first_use_checks(monkeypatch):
    """The Triton path with its first-use checks on, none remembered before or after the test."""
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.delenv("INCRELORA_KERNEL_CHECK", raising=False)
    functional.reset_kernel_checks()
    yield
    functional.reset_kernel_checks()


def test_safety_net_falls_back_and_warns_once(kernel_device, monkeypatch, first_use_checks):
    """A variant that fails its first-use check: one warning naming the versions, then the torch
    path for that variant (no kernel launches), with correct results."""
    from increlora_fast.kernels import checks, launch_counts, reset_launch_counts
    monkeypatch.setattr(checks, "check_variant", lambda *a: (False, "dy: relative error 1e+00"))
    layer = IncreLoRALinear(nn.Linear(24, 40), r_max=16, init_r=3).to(kernel_device)
    x = torch.randn(9, 24, device=kernel_device)
    with pytest.warns(RuntimeWarning, match="first-use check.*torch .*triton .*report") as got:
        y = layer(x)
    # the variant in words (it was a bare tuple of dtypes and flags), and how to turn it off
    message = str(next(w.message for w in got if "first-use check" in str(w.message)))
    assert "variant compute float32, float32 adapters, float32 base weight (out x in), bias, " \
        "slot tile 16)" in message and "refresh_settings()" in message, message
    reset_launch_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y2 = layer(x)
    assert launch_counts() == {}
    monkeypatch.setenv("INCRELORA_BACKEND", "torch")
    torch.testing.assert_close(y, layer(x))
    torch.testing.assert_close(y2, y)


def test_turning_the_check_off_after_a_failed_check_takes_the_kernels(kernel_device,
                                                                     first_use_checks,
                                                                     monkeypatch):
    """The failed check's warning says INCRELORA_KERNEL_CHECK=0 skips the check: set (and read
    again by `refresh_settings`) after a variant failed, that variant runs on the kernels, as
    the optimizer's and the penalty's kernels are then trusted; turned on again, the remembered
    failure holds."""
    from increlora_fast.kernels import checks, launch_counts, reset_launch_counts
    monkeypatch.setattr(checks, "check_variant", lambda *a: (False, "dy: relative error 1e+00"))
    monkeypatch.setattr(checks, "check_adamw", lambda *a, **k: dict(ok=False, error="param 0"))
    layer = IncreLoRALinear(nn.Linear(24, 40), r_max=16, init_r=3).to(kernel_device)
    x = torch.randn(9, 24, device=kernel_device)
    device = torch.device(kernel_device)
    with pytest.warns(RuntimeWarning, match="first-use check"):
        layer(x)
        assert not functional.multi_adamw_ok(device, torch.float32)
    for check_on in ("0", "1"):
        monkeypatch.setenv("INCRELORA_KERNEL_CHECK", check_on)
        reset_launch_counts()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            layer(x)
            assert functional.multi_adamw_ok(device, torch.float32) == (check_on == "0")
        assert bool(launch_counts()) == (check_on == "0"), check_on


def test_safety_net_check_passes_on_a_first_call_under_inference_mode(kernel_device,
                                                                      first_use_checks):
    """A layer's first call under ``torch.inference_mode()`` (a validation pass before
    training): its first-use check builds its problem on an autograd of its own and passes,
    with no warning, and training then runs on the Triton kernels."""
    from increlora_fast.kernels import launch_counts, reset_launch_counts
    layer = IncreLoRALinear(nn.Linear(24, 40), r_max=16, init_r=3).to(kernel_device)
    x = torch.randn(9, 24, device=kernel_device)
    with warnings.catch_warnings():
        # no warning of ours (Triton 3.6's interpreter warns of NumPy deprecations itself)
        warnings.simplefilter("error", RuntimeWarning)
        with torch.inference_mode():
            layer(x)
    assert list(functional.kernel_check_results().values()) == [True]
    reset_launch_counts()
    layer(x).sum().backward()
    assert launch_counts() and layer.lora_A.grad is not None


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_safety_net_check_inside_activation_checkpointing(kernel_device, use_reentrant,
                                                          first_use_checks):
    """A layer's first call inside activation checkpointing (transformers' default is
    non-reentrant): the first-use check runs in the forward and not in the recomputation, so
    the tensors it saves must not pass through checkpoint's hooks. Backward then runs, with the
    gradients of the same layer without checkpointing."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    layer = IncreLoRALinear(nn.Linear(24, 40), r_max=16, init_r=3).to(kernel_device)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(9, 24, device=kernel_device, requires_grad=True)
    grads = []
    for checkpointed in (True, False):
        functional.reset_kernel_checks()
        for t in (x, layer.lora_A, layer.lora_B, layer.lora_lambda):
            t.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            y = checkpoint(layer, x, use_reentrant=use_reentrant) if checkpointed else layer(x)
            y.square().sum().backward()
        assert list(functional.kernel_check_results().values()) == [True]
        grads.append([x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_lambda.grad])
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref)


def test_a_first_call_under_fake_tensors_neither_runs_nor_remembers_a_check(kernel_device,
                                                                           first_use_checks):
    """A layer's first call under a ``FakeTensorMode`` (shape inference, memory estimation:
    tensors without data) takes the torch path, which runs on fake tensors, without a check
    (one on fake tensors failed for that alone: a "please report" warning, and the torch path
    for the real run after it). The first real call then checks, passes and launches."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from increlora_fast.kernels import launch_counts, reset_launch_counts
    layer = IncreLoRALinear(nn.Linear(24, 40), r_max=16, init_r=3).to(kernel_device)
    x = torch.randn(9, 24, device=kernel_device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            assert layer(mode.from_tensor(x)).shape == (9, 40)
        assert functional.kernel_check_results() == {}
        reset_launch_counts()
        layer(x)
    assert list(functional.kernel_check_results().values()) == [True]
    assert launch_counts()


def test_safety_net_check_where_saved_tensor_hooks_are_disabled(kernel_device, first_use_checks):
    """Where saved-tensor hooks may not be registered (torch disables them in its compiled
    regions), the check runs without its own and passes."""
    layer = IncreLoRALinear(nn.Linear(24, 40), r_max=16, init_r=3).to(kernel_device)
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
        layer(torch.randn(9, 24, device=kernel_device))
    assert list(functional.kernel_check_results().values()) == [True]


def test_the_worst_error_of_a_check_keeps_a_non_finite_result():
    """A result with NaN (or inf) fails a check whatever results follow it."""
    from increlora_fast.kernels.checks import _worst_relative_error
    want = torch.ones(3, dtype=torch.float64)
    for bad in (float("nan"), float("inf")):
        wrong = torch.tensor([1.0, bad, 1.0])
        for results in ([("a", wrong, want), ("b", want.float(), want)],
                        [("b", want.float(), want), ("a", wrong, want)]):
            assert _worst_relative_error(results) == (float("inf"), "a: not finite")
    assert _worst_relative_error([("a", want.float() * 1.5, want), ("b", want.float(), want)]) \
        == (0.5, "a")


def test_the_checks_deterministic_block_gives_back_the_callers_setting():
    from increlora_fast.kernels.checks import _deterministic
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        for setting in ((True, True), (True, False), (False, False)):
            torch.use_deterministic_algorithms(setting[0], warn_only=setting[1])
            with _deterministic():
                assert torch.are_deterministic_algorithms_enabled()
            assert (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled()) == setting
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_safety_net_catches_a_broken_kernel(kernel_device, monkeypatch):
    """The real check: a kernel that raises on this device makes the check fail (not crash)."""
    from increlora_fast.kernels import checks, linear
    functional.reset_kernel_checks()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(linear, "adapted_linear_forward", broken)
    ok, detail = checks.check_variant(torch.device(kernel_device), torch.float32, torch.float32,
                                      torch.float32, False, True, False, False, 16)
    assert not ok and "illegal memory access" in detail


def test_the_checks_draw_their_problems_on_the_cpu_whatever_the_default_device(
        kernel_device):
    """The checks draw their problems from a CPU generator: under another default device
    (``torch.set_default_device("cuda")`` in a user's script; "meta" here, which any machine
    has) each one still builds its problem and passes. Before, a draw on the default device
    raised out of the check (a CUDA default refuses the CPU generator), so a layer's first
    call, or the optimizer's and the penalty's, raised."""
    from increlora_fast.kernels import checks
    device = torch.device(kernel_device)
    with torch.device("meta"):
        ok, detail = checks.check_variant(device, torch.float32, torch.float32, torch.float32,
                                          False, True, False, True, 16)
        adamw = checks.check_adamw(device, torch.float32, multi=True)
        penalty = checks.check_orth_penalty(device, torch.float32)
    assert ok, detail
    assert adamw["ok"], adamw["error"]
    assert penalty["ok"], penalty["error"]


def test_safety_net_check_can_be_turned_off(kernel_device, monkeypatch):
    from increlora_fast.kernels import checks
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")
    functional.reset_kernel_checks()
    monkeypatch.setattr(checks, "check_variant", lambda *a: pytest.fail("check ran"))
    layer = IncreLoRALinear(nn.Linear(24, 40), r_max=16, init_r=3).to(kernel_device)
    layer(torch.randn(9, 24, device=kernel_device))
    functional.reset_kernel_checks()


# (M, in, out, r_max, dtype, bias): r_max 1 (one live slot: a block's only slot), r_max 5 and 20
# (not powers of 2: slot blocks of 16 and 32 reach past r_max), M not a multiple of the block.
EDGE_CASES = [(19, 7, 13, 1, torch.float64, True), (33, 11, 9, 5, torch.float64, False),
              (17, 21, 18, 20, torch.float32, True)]


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: f"r{c[3]}-{str(c[4])[6:]}")
def test_r_max_edges_with_mixed_slots_and_poison_past_r_max(kernel_device, case,
                                                           backward_design):
    """Forward, every gradient and the score against float64 torch at r_max 1 and at r_max that
    are not powers of 2, with active, reserve and inactive slots interleaved in a fresh random
    order (NaN/inf in the inactive slots' A rows and B columns), a reserve value large enough to
    show at float32, and the slot buffers as the leading slices of larger buffers whose tail
    holds poison the kernels must never read: NaN lambdas, inf A rows and B columns and active
    states (an active count taken over the whole slot block would change the scale). The tails'
    gradients stay 0."""
    from increlora_fast.kernels.checks import TOL
    from increlora_fast.kernels.linear import adapted_linear_triton
    m, k, n, r, dtype, has_bias = case
    dev, pad = kernel_device, 128
    gen = torch.Generator().manual_seed(_seed())

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    if r == 1:
        states = torch.tensor([2])
    else:  # each state at least once, the rest random, in a random order
        states = torch.cat([torch.tensor([2, 2, 1, 0]), torch.randint(0, 3, (r - 4,),
                                                                      generator=gen)])
        states = states[torch.randperm(r, generator=gen)]
    active, dead = states == 2, states == 0
    lam = rand(r)
    lam[int(active.nonzero()[0])] = 0.0 if r > 1 else lam[0]  # an active slot at lambda 0
    a, b = rand(r, k) * 0.5, rand(n, r) * 0.5
    x, w, bias, dy = rand(m, k), rand(n, k) * k ** -0.5, rand(n), rand(m, n) / m
    bias = bias if has_bias else None
    alpha, reserve = 6.0, 0.3

    # the Triton operands: views of the first r slots of padded buffers
    lam_buf = torch.full((r + pad,), float("nan"), dtype=dtype)
    lam_buf[:r] = lam
    state_buf = torch.full((r + pad,), 2, dtype=torch.int8)
    state_buf[:r] = states
    a_buf = torch.full((r + pad, k), float("inf"), dtype=dtype)
    a_buf[:r] = a
    a_buf[:r][dead] = float("nan")
    b_buf = torch.full((n, r + pad), float("-inf"), dtype=dtype)
    b_buf[:, :r] = b
    b_buf[:, :r][:, dead] = float("inf")
    bufs = [t.to(dev).requires_grad_() for t in (lam_buf, a_buf, b_buf)]
    xt = x.to(dev, dtype).requires_grad_()
    score = torch.zeros((), device=dev)
    with warnings.catch_warnings():  # the interpreter evaluates NaN * 0 in masked-out lanes
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        y = adapted_linear_triton(xt, w.to(dev, dtype), None if bias is None else
                                  bias.to(dev, dtype), bufs[1][:r], bufs[2][:, :r], bufs[0][:r],
                                  state_buf.to(dev)[:r], alpha, reserve, score_out=score)
        y.backward(dy.to(dev, dtype))
    got = [y, xt.grad, bufs[1].grad[:r], bufs[2].grad[:, :r], bufs[0].grad[:r], score]

    # the float64 reference on the same (rounded) values, inactive slots zeroed
    def clean(t):
        return torch.nan_to_num(t.detach().double(), nan=0.0, posinf=0.0, neginf=0.0)
    leaves = [clean(t).requires_grad_() for t in (xt, bufs[1][:r], bufs[2][:, :r], bufs[0][:r])]
    score_ref = torch.zeros((), dtype=torch.float64, device=dev)
    y_ref = adapted_linear_torch(leaves[0], w.to(dev, dtype).double(), None if bias is None
                                 else bias.to(dev, dtype).double(), *leaves[1:],
                                 states.to(dev, torch.int8), alpha, reserve,
                                 score_out=score_ref)
    y_ref.backward(dy.to(dev, dtype).double())
    want = [y_ref, leaves[0].grad, leaves[1].grad, leaves[2].grad, leaves[3].grad, score_ref]
    for name, g, ref in zip(("y", "dx", "dA", "dB", "dlambda", "score"), got, want):
        tol = max(TOL[dtype], 1e-6) if name == "score" else TOL[dtype]  # float32 accumulator
        assert torch.isfinite(g).all(), name
        err = (g.double() - ref).abs().max().item() / (ref.abs().max().item() or 1.0)
        assert err <= tol, (name, err)
    assert float(score_ref) > 0 and torch.count_nonzero(got[4][~active]) == 0
    assert torch.count_nonzero(got[2][dead.to(dev)]) == 0
    assert torch.count_nonzero(got[3][:, dead.to(dev)]) == 0
    for buf in bufs:  # nothing past r_max was written
        assert torch.count_nonzero(buf.grad[r:] if buf.dim() == 1 or buf is bufs[1]
                                   else buf.grad[:, r:]) == 0


def test_strided_lambda_and_slot_state_are_read_by_their_strides(kernel_device):
    """lora_lambda and slot_state given as strided views (``buf[::2]``) on the public op: the
    kernels read both with unit stride, so they must be made contiguous first. Before the fix
    the Triton path silently read every other element of the buffers (output off by O(1))."""
    from increlora_fast.kernels.linear import adapted_linear_triton
    from increlora_fast.kernels.score import delta_w_score_
    dev = kernel_device
    m, k, n, r = 9, 7, 5, 16
    gen = torch.Generator().manual_seed(_seed())
    x, a, b, dy = (torch.randn(*s, generator=gen, dtype=torch.float64).to(dev)
                   for s in ((m, k), (r, k), (n, r), (m, n)))
    lam_buf = torch.randn(2 * r, generator=gen, dtype=torch.float64).to(dev).requires_grad_()
    state_buf = torch.zeros(2 * r, dtype=torch.int8, device=dev)
    state_buf[::2] = torch.tensor([2, 2, 1, 0, 2, 1, 0, 2, 2, 0, 1, 2, 2, 0, 2, 1])
    state_buf[1::2] = 2  # read these and the active count is wrong
    lam, state = lam_buf[::2], state_buf[::2]
    score = torch.zeros((), dtype=torch.float64, device=dev)
    y = adapted_linear_triton(x, None, None, a, b, lam, state, 4.0, 0.3, score_out=score)
    y.backward(dy)
    lam_ref = lam.detach().contiguous().requires_grad_()
    score_ref = torch.zeros((), dtype=torch.float64, device=dev)
    y_ref = adapted_linear_torch(x, None, None, a, b, lam_ref, state.contiguous(), 4.0, 0.3,
                                 score_out=score_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lam_buf.grad[::2], lam_ref.grad, rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(lam_buf.grad[1::2]) == 0
    torch.testing.assert_close(score, score_ref, rtol=1e-10, atol=0)
    # the score alone (direct mode: lam is the effective lambda)
    alone, alone_ref = (torch.zeros((), dtype=torch.float64, device=dev) for _ in range(2))
    delta_w_score_(dy, x, a, b, lam.detach(), alone)
    delta_w_score_(dy, x, a, b, lam.detach().contiguous(), alone_ref)
    torch.testing.assert_close(alone, alone_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dropout", [False, True])
def test_exact_step_grad_out_is_dy_t_times_the_adapters_input(kernel_device, dropout,
                                                             backward_design):
    """The exact-step accumulator ``grad_out += dy^T x_a`` on the Triton path against float64,
    with adapter dropout (x_a = dropout(x), not x) and without; it accumulates over calls."""
    from increlora_fast.kernels.linear import adapted_linear_triton
    dev = kernel_device
    m, k, n, r = 13, 9, 7, 16
    gen = torch.Generator().manual_seed(_seed())
    x, w, a, b, dy = (torch.randn(*s, generator=gen).to(dev)
                      for s in ((m, k), (n, k), (r, k), (n, r), (m, n)))
    lam = torch.randn(r, generator=gen).to(dev)
    state = torch.tensor([2, 1, 0, 2] * 4, dtype=torch.int8, device=dev)
    xa = x * ((torch.rand(m, k, generator=gen) > 0.3).to(dev) / 0.7) if dropout else None
    grad_out = torch.zeros(n, k, device=dev)
    for _ in range(2):
        xx = x.clone().requires_grad_()
        y = adapted_linear_triton(xx, w, None, a, b, lam.clone().requires_grad_(), state, 2.0,
                                  0.5, x_adapter=xa, grad_out=grad_out)
        y.backward(dy)
    want = 2 * dy.double().t() @ (x if xa is None else xa).double()
    torch.testing.assert_close(grad_out.double(), want, rtol=1e-5, atol=1e-5)


def test_r_max_128_takes_the_kernels_and_129_the_torch_path(kernel_device, monkeypatch):
    """docs/kernels.md: the torch path for r_max > 128; r_max 128 itself (the kernels' largest,
    `utils.MAX_R_MAX`) runs on the kernels. Checked at the boundary, on the layer call."""
    from increlora_fast.kernels import launch_counts, reset_launch_counts
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")
    x = torch.randn(3, 8, device=kernel_device)
    for r_max, path in ((128, "triton"), (129, "torch")):
        a = torch.zeros(r_max, 8, device=kernel_device)
        assert functional.choose_path(x, torch.zeros(6, 8, device=kernel_device), a, False,
                                      True, False, False) == path, r_max
        layer = IncreLoRALinear(nn.Linear(8, 6), r_max=r_max, init_r=2).to(kernel_device)
        reset_launch_counts()
        layer(x)
        assert bool(launch_counts()) == (path == "triton"), r_max


@pytest.mark.parametrize("tiles", [((128, 128, 32), 8), ((64, 64, 32), 4), ((32, 32, 32), 8)],
                         ids=["128x128", "64x64", "32x32"])
@pytest.mark.parametrize("dtype,adapter", [(torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16)],
                         ids=["amp-bf16", "amp-fp16", "bf16"])
def test_score_kernel_at_each_tile_score_tiles_chooses(kernel_device, tiles, dtype, adapter):
    """The exact score at every tile `score.score_tiles` returns on a GPU, with the split
    bfloat16 dW dots (DW_SPLIT): the backward's plan takes 16 x 16 tiles under the interpreter,
    and the kernel tests' layers are too small for 128 x 128 on any GPU (one tile per SM), so
    these tiles are run here directly: out and in not multiples of the tile, NaN/inf in dead
    slots, float32 precision against float64."""
    from increlora_fast.kernels import score as S
    from increlora_fast.kernels import utils as kutils
    from increlora_fast.kernels.reference import effective_lambda
    (bn, bk, bm), warps = tiles
    dev = kernel_device
    gen = torch.Generator().manual_seed(_seed())
    m, n, k, r = 45, 150, 140, 20
    states = torch.cat([torch.tensor([2, 2, 1, 0, 0]), torch.randint(0, 3, (r - 5,), generator=gen)])
    states = states[torch.randperm(r, generator=gen)].to(torch.int8)
    dead = states == 0
    dy = (torch.randn(m, n, generator=gen) / m).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    a = (torch.randn(r, k, generator=gen) * k ** -0.5).to(adapter)
    b = (torch.randn(n, r, generator=gen) * 0.1).to(adapter)
    lam = torch.randn(r, generator=gen)
    a[dead], b[:, dead] = float("nan"), float("inf")
    alpha, reserve = 6.0, 0.3
    cfg = kutils.dot_config(dtype, kutils.is_interpreted(S._score_tiles_kernel))
    dw_consts = S.dw_dot(cfg, kutils.is_interpreted(S._score_tiles_kernel))
    assert dw_consts["DW_SPLIT"]
    grid = (-(-n // bn), -(-k // bk))
    parts = torch.empty(grid[0] * grid[1], device=dev)
    dyd, xd, ad, bd, lamd, std = (t.to(dev) for t in (dy, x, a, b, lam, states))
    with warnings.catch_warnings():  # the interpreter evaluates NaN * 0 in masked-out lanes
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        kutils.launch(S._score_tiles_kernel, grid, dyd, xd, ad, bd, lamd, std, parts,
                      m, n, k, r, alpha, reserve, dyd.stride(0), xd.stride(0), *ad.stride(),
                      *bd.stride(), SLOTS=True, BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm,
                      BLOCK_R=kutils.block(r, kutils.MAX_R_MAX), OP=cfg.op, DOT=cfg.dot,
                      ACC=cfg.acc, PRECISION=cfg.precision, **dw_consts, num_warps=warps)
    got = parts.double().sum().item() / math.sqrt(n * k)
    lam_eff = effective_lambda(lam.double(), states, alpha, reserve)
    clean_a = torch.where(dead[:, None], 0.0, a.double())
    clean_b = torch.where(dead, 0.0, b.double())
    g = dy.double().t() @ x.double()
    want = ((clean_b * lam_eff) @ clean_a * g).abs().sum().item() / math.sqrt(n * k)
    assert math.isfinite(got) and want > 0
    assert abs(got - want) <= 1e-6 * want, (got, want)


@pytest.mark.parametrize("states", [(2, 2, 2, 2, 2), (2, 1, 0, 2, 1), None],
                         ids=["active", "mixed", "direct"])
@pytest.mark.parametrize("dropout", [False, True])
def test_the_gemm_backward_computes_what_the_kernels_do(kernel_device, monkeypatch, states,
                                                        dropout):
    """The adapter's backward as cuBLAS GEMMs (`gemm_backward`, from `GEMM_BACKWARD_ROWS` rows
    on) gives the row and finish kernels' dx, dA, dB, dlambda and score (float64, odd shapes,
    active, reserve and dead slots with NaN in the dead ones, an active slot at lambda 0,
    direct mode; the adapter's dx
    into the base's or, with dropout, its own), and launches neither of them."""
    from increlora_fast.kernels import linear
    from increlora_fast.kernels.launches import launch_counts, reset_launch_counts
    dev, f64 = kernel_device, torch.float64
    m, k, n, r = 7, 13, 11, 5
    gen = torch.Generator().manual_seed(_seed())
    x, dy, w, xa = (torch.randn(*s, generator=gen, dtype=f64).to(dev)
                    for s in ((m, k), (m, n), (n, k), (m, k)))
    a, b, lam = (torch.randn(*s, generator=gen, dtype=f64).to(dev)
                 for s in ((r, k), (n, r), (r,)))
    state = None if states is None else torch.tensor(states, dtype=torch.int8, device=dev)
    if states is not None:
        dead = torch.tensor(states, device=dev) == 0
        a[dead], b[:, dead] = float("nan"), float("nan")
        lam[0] = 0.0  # an active slot at lambda 0: read for its own dlambda
    xa = xa if dropout else None
    alpha, reserve = 3.0, 0.25

    def backward(rows):
        monkeypatch.setattr(linear, "GEMM_BACKWARD_ROWS", rows)
        linear.clear_plan_cache()
        _, h = linear.adapted_linear_forward(x, xa, w, None, False, a, b, lam, state, alpha,
                                             reserve, f64, need_all=True, fused_gemm=False)
        score = torch.zeros((), dtype=f64, device=dev)
        reset_launch_counts()
        grads = linear.adapted_linear_backward(
            dy, x, xa, w, False, a, b, lam, state, alpha, reserve, h, score, None,
            need_x=True, need_xa=dropout, need_a=True, need_b=True, need_lam=True)
        return [g for g in grads if g is not None] + [score], dict(launch_counts())

    with warnings.catch_warnings():  # the interpreter evaluates NaN * 0 in masked-out lanes
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        want, kernel_launches = backward(None)
        got, gemm_launches = backward(0)
    linear.clear_plan_cache()
    assert kernel_launches.get("_backward_rows_kernel") == 1
    assert "_backward_rows_kernel" not in gemm_launches
    assert gemm_launches["_score_tiles_kernel"] == gemm_launches["_finish_kernel"] == 1
    assert len(got) == len(want) == (6 if dropout else 5)
    for mine, theirs in zip(got, want):
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def test_the_interpreted_tile_variable_takes_the_tiles_a_plan_can_use(kernel_device):
    """``INCRELORA_INTERPRETED_TILE`` (read once, at import: a subprocess's setting, as the
    gpu-check dry run's test gives it) sets the interpreted token and feature tiles; a value
    no plan can use is refused naming the variable."""
    from increlora_fast.kernels import linear

    assert linear._interpreted_tile(None) == 16
    assert [linear._interpreted_tile(t) for t in ("16", "32", "64", "128")] == [16, 32, 64, 128]
    for bad in ("", "8", "48", "sixty-four", "256"):
        with pytest.raises(ValueError, match="INCRELORA_INTERPRETED_TILE") as error:
            linear._interpreted_tile(bad)
        assert "\n" not in str(error.value)
