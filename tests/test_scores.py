"""Spec section 3: module scores against a dense float64 re-derivation, and their smoothing;
the chunked exact score (torch ops and the Triton epilogue) against float64 references.

On CPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set before triton is
imported); on a CUDA machine the same tests run the compiled kernels.
"""
import math
import os

import pytest
import torch
from torch import nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from increlora_fast import IncreLoRAConfig, inject_increlora  # noqa: E402
from increlora_fast.controller import IncreLoRAController, triplet_score  # noqa: E402
from increlora_fast.kernels.reference import delta_w_score_chunked  # noqa: E402
from increlora_fast.layer import IncreLoRALinear, SlotState  # noqa: E402

from method_helpers import ParallelBranches  # noqa: E402


def _randomise(model: nn.Module, gen: torch.Generator) -> None:
    """Random lambdas and a random number of extra active slots per layer."""
    for module in model.modules():
        if hasattr(module, "slot_state"):
            extra = int(torch.randint(0, 3, (1,), generator=gen))
            module.activate_reserve(min(extra, module.reserve_rank), step=0)
            module.add_reserve(1, step=0)
            with torch.no_grad():
                module.lora_lambda.copy_(torch.randn(module.r_max, generator=gen, dtype=torch.float64)
                                         * (module.slot_state != SlotState.INACTIVE))
                module.lora_lambda[module.reserve_mask] = 1e-5


def _dense_scores(model: ParallelBranches, x: torch.Tensor, target: torch.Tensor):
    """Re-derive spec section 3 with autograd on materialised dW (float64)."""
    scores = []
    deltas, outs = [], 0
    for w, layer in zip(model.weights, model.branches):
        active, reserve = layer.slot_state == SlotState.ACTIVE, layer.slot_state == SlotState.RESERVE
        lam = torch.where(active | reserve, layer.lora_lambda.detach(), torch.zeros(()))
        scale = layer.lora_alpha / int(active.sum())
        dw = (scale * layer.lora_B.detach() @ torch.diag(lam) @ layer.lora_A.detach()).requires_grad_()
        deltas.append(dw)
        base = layer.base_layer
        outs = outs + w * (x @ (base.weight + dw).t() + base.bias)
    loss = ((outs - target) ** 2).sum()
    grads = torch.autograd.grad(loss, deltas)
    for dw, g in zip(deltas, grads):
        scores.append(float((dw.detach() * g).abs().sum() / math.sqrt(dw.numel())))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delta_w_score_equals_dense_float64_rederivation(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ParallelBranches(3, d_in=7, d_out=5, weights=[1.0, 0.5, 2.0]).double()
    # score_window=incre_interval: every step is tracked (steps 0-2 lie outside the default window)
    config = IncreLoRAConfig(target_modules=r"branches\.\d", r_max=6, target_rank=3,
                             init_warmup=100, incre_interval=100, score_window=100)
    inject_increlora(model, config)
    controller = IncreLoRAController(model, config)
    _randomise(model, gen)
    b1, b2 = config.beta1, config.beta2
    ipt = torch.zeros(3, dtype=torch.float64)
    unc = torch.zeros(3, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(4, 3, 7, generator=gen, dtype=torch.float64)
        target = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
        expected = _dense_scores(model, x, target)
        ((model(x) - target) ** 2).sum().backward()
        controller.step(step)
        model.zero_grad()
        ipt = b1 * ipt + (1 - b1) * expected
        unc = b2 * unc + (1 - b2) * (expected - ipt).abs()
        assert expected.min() > 0
        torch.testing.assert_close(controller.ipt, ipt, rtol=1e-5, atol=0)
        torch.testing.assert_close(controller.unc, unc, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(controller.importance(), ipt * unc, rtol=2e-4, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_delta_w_score_with_adapter_dropout_uses_the_dropped_input(backend, monkeypatch,
                                                                  kernel_device):
    """Spec sections 1 and 3 with lora_dropout in train mode: the adapter reads dropout(x), so
    G = dL/d(dW) = dy^T dropout(x), and the score is sum|dW * G| / sqrt(out * in) with dW over
    active and reserve slots and the alpha / ranknum scale. Re-derived by autograd on a
    materialised dW, with the dropout mask redrawn from the same seed."""
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double().to(kernel_device)
    layer = IncreLoRALinear(base, r_max=6, init_r=2, reserve_rank=2, lora_dropout=0.5,
                            lora_alpha=8.0).double().to(kernel_device).train()
    with torch.no_grad():
        layer.lora_lambda[:2] = torch.tensor([0.7, -1.3], dtype=torch.float64)
    layer.score_enabled = True
    x = torch.randn(11, 7, dtype=torch.float64, device=kernel_device)
    target = torch.randn(11, 5, dtype=torch.float64, device=kernel_device)
    torch.manual_seed(123)
    ((layer(x) - target) ** 2).sum().backward()
    got = float(layer.take_score())

    torch.manual_seed(123)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    assert 0 < int((dropped == 0).sum()) < dropped.numel()  # some inputs dropped, not all
    lam = torch.tensor([0.7, -1.3, 1e-5, 1e-5, 0.0, 0.0], dtype=torch.float64,
                       device=kernel_device)
    dw = ((layer.lora_B.detach() * lam) @ layer.lora_A.detach() * (8.0 / 2)).requires_grad_()
    loss = ((base(x) + dropped @ dw.t() - target) ** 2).sum()
    grad, = torch.autograd.grad(loss, dw)
    expected = float((dw.detach() * grad).abs().sum() / math.sqrt(dw.numel()))
    grad_undropped, = torch.autograd.grad(((base(x) + x @ dw.t() - target) ** 2).sum(), dw)
    undropped = float((dw.detach() * grad_undropped).abs().sum() / math.sqrt(dw.numel()))
    assert abs(undropped - expected) > 1e-3 * expected  # the mask matters to the score
    assert got == pytest.approx(expected, rel=1e-9)


def test_smoothing_and_round_by_hand_with_distinct_betas():
    """Spec 3 and 4 on two modules whose per-step scores are set by hand (beta1 0.5 for the
    importance, beta2 0.9 for the uncertainty, which takes the freshly updated importance):
    module a scores 1, 1, 1, module b 0, 0, 1.7. At the round (step 2) a has the higher
    importance (0.875 > 0.85) but b the higher final score ipt x unc (0.85 x 0.085 = 0.07225 >
    0.875 x 0.0755 = 0.0660625), so b alone grows (top_h 1). Swapped betas would grow a."""
    torch.manual_seed(0)
    model = ParallelBranches(2)
    config = IncreLoRAConfig(target_modules=r"branches\.\d", r_max=4, target_rank=2,
                             incre_rank_num=1, init_warmup=1, incre_interval=2, top_h=1,
                             beta1=0.5, beta2=0.9, score_window=2)
    inject_increlora(model, config)
    controller = IncreLoRAController(model, config)
    a, b = model.branches
    expected_ipt = [(0.5, 0.0), (0.75, 0.0), (0.875, 0.85)]
    expected_unc = [(0.05, 0.0), (0.07, 0.0), (0.0755, 0.085)]
    for step, (sa, sb) in enumerate([(1.0, 0.0), (1.0, 0.0), (1.0, 1.7)]):
        a.score_sum.fill_(sa)  # the step's module scores, as backward would leave them
        b.score_sum.fill_(sb)
        controller.step(step)
        torch.testing.assert_close(controller.ipt.tolist(), list(expected_ipt[step]),
                                   rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(controller.unc.tolist(), list(expected_unc[step]),
                                   rtol=1e-6, atol=1e-12)
        if step < 2:
            assert controller.allocation_log == []  # no round at or before init_warmup
    assert controller.rank_pattern() == {"branches.0": 1, "branches.1": 2}
    assert [e["module"] for e in controller.allocation_log] == ["branches.1"]
    assert controller.allocation_log[0]["score"] == pytest.approx(0.07225, rel=1e-6)


def test_triplet_score_equals_float64_formula():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = ParallelBranches(2, d_in=9, d_out=4).double()
    config = IncreLoRAConfig(target_modules=r"branches\.\d", r_max=5, target_rank=2,
                             score="triplet", init_warmup=100, incre_interval=100)
    inject_increlora(model, config)
    controller = IncreLoRAController(model, config)
    _randomise(model, gen)
    x = torch.randn(8, 9, generator=gen, dtype=torch.float64)
    (model(x) ** 2).sum().backward()
    expected = []
    for layer in model.branches:
        a, b, lam = layer.lora_A, layer.lora_B, layer.lora_lambda
        per_slot = ((lam * lam.grad).abs() + (a * a.grad).abs().sum(1) / a.shape[1]
                    + (b * b.grad).abs().sum(0) / b.shape[0])
        active = layer.slot_state == SlotState.ACTIVE
        expected.append(float(per_slot[active].sum() / active.sum()))
        assert float(per_slot[active].sum()) > 0
        torch.testing.assert_close(triplet_score(layer).double(), torch.tensor(expected[-1],
                                   dtype=torch.float64), rtol=1e-6, atol=0)
    controller.step(0)
    torch.testing.assert_close(controller.ipt, (1 - config.beta1) * torch.tensor(expected,
                               dtype=torch.float64), rtol=1e-6, atol=0)


def test_tracking_stops_once_budget_is_reached():
    torch.manual_seed(0)
    model = ParallelBranches(2)
    config = IncreLoRAConfig(target_modules=r"branches\.\d", r_max=4, target_rank=2,
                             init_warmup=0, incre_interval=1, top_h=2)
    inject_increlora(model, config)
    controller = IncreLoRAController(model, config)
    assert all(b.score_enabled for b in model.branches)
    model(torch.randn(3, 6)).sum().backward()
    controller.step(1)
    assert controller.budget_reached and controller.current_total_rank() == 4
    assert not any(b.score_enabled for b in model.branches)
    model(torch.randn(3, 6)).sum().backward()
    assert all(float(b.score_sum) == 0.0 for b in model.branches)
    ipt = controller.ipt.clone()
    controller.step(2)
    assert torch.equal(controller.ipt, ipt)


def test_nonfinite_gradient_step_leaves_smoothed_scores_and_warns_once_at_the_next_round():
    """A non-finite step is dropped on the device; its warning (once, naming the first bad step)
    waits for the next allocation round, the first step that reads the host."""
    import warnings
    torch.manual_seed(0)
    model = ParallelBranches(2)
    config = IncreLoRAConfig(target_modules=r"branches\.\d", r_max=8, target_rank=4,
                             init_warmup=2, incre_interval=3, score_window=100)
    inject_increlora(model, config)
    controller = IncreLoRAController(model, config)
    model(torch.randn(3, 6)).sum().backward()
    controller.step(0)
    model.zero_grad()
    ipt, unc = controller.ipt.clone(), controller.unc.clone()
    assert ipt.abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # steps 1 and 2 are no rounds: no host read, no warning
        for step, bad in ((1, float("nan")), (2, float("inf"))):
            (model(torch.full((3, 6), bad))).sum().backward()
            controller.step(step)
            model.zero_grad()
            assert torch.equal(controller.ipt, ipt) and torch.equal(controller.unc, unc)
    with pytest.warns(RuntimeWarning, match="non-finite importance scores at step 1") as caught:
        model(torch.randn(3, 6)).sum().backward()
        controller.step(3)  # the round
    assert len([w for w in caught if "non-finite" in str(w.message)]) == 1
    assert {e["step"] for e in controller.allocation_log} == {3}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later bad steps and rounds stay quiet
        for step in (4, 5, 6):
            x = torch.full((3, 6), float("nan")) if step == 4 else torch.randn(3, 6)
            model(x).sum().backward()
            controller.step(step)
            model.zero_grad()
    assert {e["step"] for e in controller.allocation_log} == {3, 6}


# ---------------------------------------------------------------- the chunked exact score
# Largest error allowed, relative to the float64 reference computed from the same (rounded)
# inputs (worst seen on CPU in brackets): float64 accumulates in float64 [4e-16]; the others
# accumulate G = dy.T x and dW in float32 (half products are exact in float32) [2e-7].
CHUNK_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _score_functions():
    fns = [("torch", delta_w_score_chunked)]
    try:
        from increlora_fast.kernels.score import delta_w_score_
    except ImportError:  # no triton: the torch path alone
        return fns
    # One kernel over (out, in) tiles: chunk_rows, the torch path's chunking, does not apply.
    return fns + [("triton", lambda *args, chunk_rows=None: delta_w_score_(*args))]


SCORE_FNS = _score_functions()


def _score_inputs(m, n, k, r, dtype, adapter_dtype, gen):
    dy = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64).to(dtype)
    a = torch.randn(r, k, generator=gen, dtype=torch.float64).to(adapter_dtype)
    b = torch.randn(n, r, generator=gen, dtype=torch.float64).to(adapter_dtype)
    lam = torch.randn(r, generator=gen, dtype=torch.float64).to(adapter_dtype)
    lam[r // 2:] = 0  # dead slots: never read, even when they hold NaN
    a[r - 1] = float("nan")
    b[:, r - 1] = float("nan")
    return [t.to(DEVICE) for t in (dy, x, a, b, lam)]


def _score_reference(dy, x, a, b, lam) -> float:
    live = lam != 0
    dw = (b[:, live].double() * lam[live].double()) @ a[live].double()
    g = dy.double().t() @ x.double()
    return float((dw * g).abs().sum() / math.sqrt(g.numel()))


@pytest.mark.parametrize("name,fn", SCORE_FNS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_rows", [None, 16])
def test_chunked_score_equals_float64_reference(name, fn, dtype, chunk_rows):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    adapter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for m, n, k, r in ((37, 53, 29, 6), (5, 17, 70, 16), (130, 40, 33, 3)):
        dy, x, a, b, lam = _score_inputs(m, n, k, r, dtype, adapter_dtype, gen)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        score = torch.zeros((), dtype=acc, device=DEVICE)
        fn(dy, x, a, b, lam, score, chunk_rows=chunk_rows)
        ref = _score_reference(dy, x, a, b, lam)
        assert ref > 0
        assert abs(float(score) - ref) <= CHUNK_TOL[dtype] * ref, (name, m, n, k, float(score), ref)


@pytest.mark.parametrize("name,fn", SCORE_FNS)
@pytest.mark.parametrize("dy_dtype,x_dtype,adapter_dtype", [
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.float16, torch.bfloat16),
    (torch.float16, torch.float64, torch.float32),
])
def test_chunked_score_mixed_dtypes_and_strides(name, fn, dy_dtype, x_dtype, adapter_dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    m, n, k, r = 41, 35, 23, 8
    dy, _, a, b, lam = _score_inputs(m, n, k, r, dy_dtype, adapter_dtype, gen)
    x = torch.randn(k, m, generator=gen, dtype=torch.float64).to(x_dtype).to(DEVICE).t()  # strided
    dy = dy[:, :]  # a view
    score = torch.zeros((), dtype=torch.float32, device=DEVICE)
    fn(dy, x, a, b, lam, score, chunk_rows=16)
    ref = _score_reference(dy, x, a, b, lam)
    tol = 1e-6 if torch.float64 in (dy_dtype, x_dtype) else 1e-5  # float32 accumulator
    assert abs(float(score) - ref) <= tol * ref


@pytest.mark.parametrize("name,fn", SCORE_FNS)
def test_chunked_score_is_deterministic_and_accumulates(name, fn):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    dy, x, a, b, lam = _score_inputs(64, 70, 48, 8, torch.bfloat16, torch.float32, gen)
    first = torch.zeros((), device=DEVICE)
    fn(dy, x, a, b, lam, first, chunk_rows=16)
    again = torch.zeros((), device=DEVICE)
    fn(dy, x, a, b, lam, again, chunk_rows=16)
    assert torch.equal(first, again)
    fn(dy, x, a, b, lam, again, chunk_rows=16)  # adds into the accumulator
    assert torch.equal(again, first + first)


def _largest_allocation(fn) -> int:
    """Bytes of the largest tensor created while ``fn`` runs (torch profiler memory timeline)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    created = [size for _, action, _, size in prof._memory_profile().timeline
               if action.name == "CREATE"]
    assert created, "the profiler recorded no allocation"
    return max(created)


@pytest.mark.parametrize("name,fn", SCORE_FNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_score_allocates_nothing_activation_or_weight_sized(name, fn, dtype, monkeypatch):
    m, n, k, r, rows = 96, 80, 24, 5, 16
    gen = torch.Generator().manual_seed(3)
    dy, x, a, b, lam = (t.cpu() for t in _score_inputs(m, n, k, r, dtype, torch.float32, gen))
    launches = []
    if name == "triton":
        # The host function's own allocations; a GPU kernel allocates nothing (the interpreter's
        # per-launch copies, and its run time under the profiler, would only blur this).
        from increlora_fast.kernels import utils as kutils
        monkeypatch.setattr(kutils, "launch", lambda *args, **kw: launches.append(args))
    score = torch.zeros(())
    chunked = _largest_allocation(lambda: fn(dy, x, a, b, lam, score, chunk_rows=rows))
    assert name != "triton" or len(launches) == 1
    elt = dy.element_size()
    limit = min(n * k * 4, m * k * elt, m * n * elt)
    # at most one (rows, in) float32 chunk, the (out, r_max) B diag(lam), or (CPU, 16-bit
    # inputs: no out_dtype GEMM) a float32 block of a quarter of x's rows
    block = math.ceil(m / 4) * k if dtype != torch.float32 else 0
    assert chunked <= max(rows * k, n * r, block) * 4 < limit, (chunked, limit)
    # the dense reference allocates the (out, in) G: the measurement does see it
    from increlora_fast.kernels.reference import delta_w_score_dense
    dense = _largest_allocation(lambda: delta_w_score_dense((b * lam) @ a, dy, x))
    assert dense >= n * k * 4


@pytest.mark.parametrize("chunked", [False, True], ids=["dense", "chunked"])
@pytest.mark.parametrize("shape", [(37, 23, 29, 6), (2, 5, 3, 9, 7), (130, 41, 3, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_torch_op_equals_the_dense_formulas_in_float64(shape, chunked, monkeypatch):
    """The PyTorch op (CPU path) against the dense formulas, in float64 on odd shapes: the score
    of its gradient hook (dense, or with the size limit at 0 chunked by `delta_w_score_chunked`
    in two chunks or more) against ``delta_w_score_dense(B diag(lam_eff) A, dy, x)``, and the
    output and every gradient against ``x W^T + b + ((x A^T) lam_eff) B^T``."""
    from increlora_fast.kernels import reference
    from increlora_fast.kernels.reference import (adapted_linear_torch, delta_w_score_dense,
                                                  effective_lambda)
    if chunked:
        monkeypatch.setattr(reference, "DENSE_SCORE_MAX_NUMEL", 0)
        calls = []
        monkeypatch.setattr(reference, "delta_w_score_chunked",
                            lambda *args: calls.append(1) or delta_w_score_chunked(*args))
    *lead, k, n, r = shape
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)
    x, w, bias, dy = rand(*lead, k), rand(n, k), rand(n), rand(*lead, n)
    leaves = [rand(r, k).requires_grad_(), rand(n, r).requires_grad_(), rand(r).requires_grad_()]
    state = torch.randint(0, 3, (r,), generator=gen, dtype=torch.uint8)
    state[0] = SlotState.ACTIVE
    x_new, x_old = x.clone().requires_grad_(), x.clone().requires_grad_()
    score = torch.zeros((), dtype=torch.float64)
    y = adapted_linear_torch(x_new, w, bias, *leaves, state, 6.0, 0.3, score_out=score)
    y.backward(dy)
    got = [y.detach(), x_new.grad] + [t.grad for t in leaves]

    old = [t.detach().clone().requires_grad_() for t in leaves]
    a, b, lam = old
    lam_eff = effective_lambda(lam, state, 6.0, 0.3)
    y_old = x_old @ w.t() + bias + ((x_old @ a.t()) * lam_eff) @ b.t()
    y_old.backward(dy)
    want = [y_old.detach(), x_old.grad] + [t.grad for t in old]
    for name, g, ref in zip(["y", "x", "A", "B", "lambda"], got, want):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12, msg=name)

    dw = (b.detach() * lam_eff.detach()) @ a.detach()
    expected = delta_w_score_dense(dw, dy.reshape(-1, n), x.reshape(-1, k))
    assert float(expected) > 0
    torch.testing.assert_close(score, expected, rtol=1e-12, atol=0)
    assert not chunked or calls == [1]
