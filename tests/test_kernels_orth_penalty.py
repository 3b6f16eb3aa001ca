"""The orthogonal penalty's kernels (`kernels.orth_penalty`) against the float64 reference, and
the controller's penalty on them (`penalty.OrthogonalPenalty`): its Triton path against its
torch path, its launches, its first-use check and what it does when that fails.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported); on a CUDA machine the same tests run them on the GPU.

Tolerances, relative to the largest magnitude of each float64 result: float32 2e-6 (float32
accumulation, IEEE dots); float16 2e-3 and bfloat16 1.6e-2 (each gradient is stored in the
buffer's dtype, half an ulp is 2**-11 and 2**-8 of its largest element, and the backward's
GEMM rounds P to that dtype; the interpreter truncates where GPUs round).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("kernel_device")
triton = pytest.importorskip("triton")

from increlora_fast import IncreLoRAConfig, IncreLoRAController, inject_increlora  # noqa: E402
from increlora_fast.functional import reset_kernel_checks  # noqa: E402
from increlora_fast.kernels import launch_counts, reset_launch_counts  # noqa: E402
from increlora_fast.kernels.orth_penalty import (OrthPenalty, orth_penalty_triton,  # noqa: E402
                                                  penalty_masks)
from increlora_fast.kernels.reference import orth_penalty_float64  # noqa: E402

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FWD, BWD = "_orth_penalty_fwd_kernel", "_orth_penalty_bwd_kernel"


def _buffers(shapes, dtypes):
    """Fresh random A (r, in) and B (out, r) leaves of each (r, in, out), A in dtypes[0] and B
    in dtypes[1]; which slots count (some do not) and which of those train (some do not)."""
    a = [(torch.randn(r, k, device=DEVICE) / k ** 0.5).to(dtypes[0]).requires_grad_(True)
         for r, k, _ in shapes]
    b = [(torch.randn(n, r, device=DEVICE) / n ** 0.5).to(dtypes[1]).requires_grad_(True)
         for r, _, n in shapes]
    used = [torch.rand(r, device=DEVICE) > 0.25 for r, _, _ in shapes]
    for u in used:
        u[0] = True
    trains = [u & (torch.rand(u.numel(), device=DEVICE) > 0.3) for u in used]
    for t in trains:
        t[0] = True
    return a, b, used, trains


def _run(fn, a, b, used, trains, scale=0.3):
    for t in a + b:
        t.grad = None
    loss = fn(a, b, used, trains, scale)
    loss.backward()
    return [loss.detach()] + [t.grad.clone() for t in a + b]


def _assert_close(got, ref, tol):
    names = ["loss"] + [f"dA{k}" for k in range((len(got) - 1) // 2)] + \
        [f"dB{k}" for k in range((len(got) - 1) // 2)]
    for name, g, r in zip(names, got, ref):
        err = (g.double() - r).abs().max().item() / (r.abs().max().item() or 1.0)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# (slots, in, out): odd sizes, one slot, a long dimension over several column blocks, r above
# 16 (a 32-slot tile) and at the kernels' 128
@pytest.mark.parametrize("shapes", [
    [(5, 7, 9), (16, 33, 40), (1, 70, 19), (13, 130, 3)],
    [(17, 24, 11), (3, 5, 97)],
    [(128, 40, 24)],
], ids=["odd", "r17", "r128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_and_every_gradient_match_float64(shapes, dtype):
    a, b, used, trains = _buffers(shapes, (dtype, dtype))
    reset_launch_counts()
    got = _run(orth_penalty_triton, a, b, used, trains)
    assert launch_counts() == {FWD: 1, BWD: 1}
    ref = _run(orth_penalty_float64, a, b, used, trains)
    _assert_close(got, ref, TOL[dtype])
    for k, (u, t) in enumerate(zip(used, trains)):
        # rows / columns of slots that do not train get exactly nothing
        assert torch.all(got[1 + k][~t] == 0) and torch.all(got[1 + len(a) + k][:, ~t] == 0)
        assert got[1 + k][t].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_small_scale_and_a_scaled_loss_keep_half_precision_gradients_accurate(dtype):
    """The controller's scale is its weight over twice the modules (5e-5 for 1,000 modules)
    and a GradScaler multiplies the loss by 65,536: the gradients keep their precision (the
    scale is applied in float32, not inside the float16 operand of the backward's GEMM)."""
    a, b, used, trains = _buffers([(128, 256, 256), (40, 100, 77)], (dtype, dtype))

    def scaled(a_, b_, used_, trains_, scale):
        return fn(a_, b_, used_, trains_, 0.1 / 2000) * 65536.0
    results = []
    for fn in (orth_penalty_triton, orth_penalty_float64):
        results.append(_run(scaled, a, b, used, trains))
    _assert_close(*results, TOL[dtype])


def test_rows_of_slots_that_do_not_count_are_never_read():
    """NaN and inf in the A rows and B columns of slots that do not count change nothing:
    the kernels do not read them (the stacked torch path multiplies them by 0, which gives
    NaN)."""
    a, b, used, trains = _buffers([(7, 9, 11), (16, 40, 33)], (torch.float32, torch.float32))
    with torch.no_grad():
        for x, y, u in zip(a, b, used):
            u[-1] = False
            x[~u] = float("nan")
            y[:, ~u] = float("inf")
    got = _run(orth_penalty_triton, a, b, used, trains)
    with torch.no_grad():
        for x, y, u in zip(a, b, used):
            x[~u] = 0.0
            y[:, ~u] = 0.0
    ref = _run(orth_penalty_float64, a, b, used, trains)
    assert all(torch.isfinite(g).all() for g in got)
    _assert_close(got, ref, TOL[torch.float32])


def test_buffers_of_two_dtypes_launch_once_each():
    a, b, used, trains = _buffers([(5, 7, 9), (9, 33, 40)], (torch.float32, torch.bfloat16))
    reset_launch_counts()
    got = _run(orth_penalty_triton, a, b, used, trains)
    assert launch_counts() == {FWD: 2, BWD: 2}
    ref = _run(orth_penalty_float64, a, b, used, trains)
    assert got[1].dtype == torch.float32 and got[-1].dtype == torch.bfloat16
    _assert_close(got, ref, TOL[torch.bfloat16])
    _assert_close(got[:1 + len(a)], ref[:1 + len(a)], TOL[torch.float32] * 10)


def test_a_module_whose_slots_all_do_not_count_adds_nothing():
    """Its M is 0: term 0 and gradient 0 (torch's norm backward gives 0 at 0), not NaN."""
    a, b, used, trains = _buffers([(5, 7, 9), (4, 12, 6)], (torch.float32, torch.float32))
    used[1][:] = False
    trains[1][:] = False
    got = _run(orth_penalty_triton, a, b, used, trains)
    only_first = _run(orth_penalty_float64, a[:1], b[:1], used[:1], trains[:1])
    torch.testing.assert_close(got[0].double(), only_first[0], rtol=2e-6, atol=0)
    assert torch.all(got[2] == 0) and torch.all(got[4] == 0)


def test_the_backward_refuses_buffers_that_moved_after_the_forward():
    """A buffer given new memory between forward and backward (its old memory may be gone):
    a RuntimeError that says so, not a read of freed memory."""
    a, b, used, trains = _buffers([(5, 7, 9)], (torch.float32, torch.float32))
    loss = orth_penalty_triton(a, b, used, trains, 0.3)
    with torch.no_grad():
        a[0].data = a[0].data.clone()
    with pytest.raises(RuntimeError, match="new memory .* between the penalty's forward and "
                       "its backward"):
        loss.backward()


def test_no_double_backward_and_no_silent_one():
    """The backward is not differentiable: a second derivative raises, whatever the incoming
    gradient, rather than dropping the penalty's second-order terms."""
    a, b, used, trains = _buffers([(5, 7, 9)], (torch.float32, torch.float32))
    weight = torch.tensor(2.0, requires_grad=True)  # an incoming gradient that requires grad
    loss = orth_penalty_triton(a, b, used, trains, 0.3) * weight
    (grad,) = torch.autograd.grad(loss, [a[0]], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (grad.sum() * weight).backward()  # without the mark: weight.grad, the rest dropped


def test_the_dtypes_of_the_path_choice_are_the_kernels():
    from increlora_fast import functional
    from increlora_fast.kernels import orth_penalty
    assert functional.PENALTY_DTYPES == orth_penalty.PENALTY_DTYPES


def test_the_tables_follow_buffers_that_moved():
    """One `OrthPenalty` kept across calls: it launches from its tables while the buffers stay
    where they are, and builds them again when one has new memory (a new tensor, or its
    ``.data`` replaced), computing on the new values."""
    shapes = [(5, 7, 9), (6, 20, 11)]
    a, b, used, trains = _buffers(shapes, (torch.float32, torch.float32))
    penalty = OrthPenalty(6)
    masks = penalty_masks(used, trains, penalty.r)

    def kept(a_, b_, used_, trains_, scale):
        return penalty(a_, b_, masks, scale)

    first = _run(kept, a, b, used, trains)
    table = penalty._launches[torch.float32].table
    again = _run(kept, a, b, used, trains)
    assert penalty._launches[torch.float32].table is table
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    with torch.no_grad():
        a[1].data = torch.randn_like(a[1]) * 0.5     # new memory, same tensor object
    b[0] = (torch.randn_like(b[0]) * 0.5).requires_grad_(True)
    moved = _run(kept, a, b, used, trains)
    assert penalty._launches[torch.float32].table is not table
    _assert_close(moved, _run(orth_penalty_float64, a, b, used, trains), TOL[torch.float32])


@pytest.mark.parametrize("change, match", [
    (lambda a, b: (a[0].t(), b[0]), "contiguous matrix"),
    (lambda a, b: (a[0].double(), b[0]), "float64"),
])
def test_refuses_buffers_it_cannot_read_by_name(change, match):
    a, b, used, trains = _buffers([(5, 5, 9)], (torch.float32, torch.float32))
    a0, b0 = change(a, b)
    with pytest.raises((ValueError, TypeError), match=f"orth_penalty_triton.*{match}"):
        OrthPenalty(5)([a0], [b0], penalty_masks(used, trains, 16), 0.1)


def test_refuses_more_slots_than_it_was_built_for():
    a, b, used, trains = _buffers([(20, 5, 9)], (torch.float32, torch.float32))
    with pytest.raises(ValueError, match="20 slots exceed the 16"):
        OrthPenalty(16)(a, b, penalty_masks(used, trains, 32), 0.1)
    with pytest.raises(ValueError, match="penalty_masks: module 0 has 20 .* <= 16"):
        penalty_masks(used, trains, 16)
    with pytest.raises(ValueError, match=r"masks must be float32 of shape \(1, 2, 32\)"):
        OrthPenalty(20)(a, b, penalty_masks(used, trains, 64), 0.1)


# ------------------------------------------------------------------ the controller's penalty
def _model_and_controller(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                          nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 7)).to(DEVICE)
    config = IncreLoRAConfig(**dict(dict(target_modules=["0", "2", "4", "6"], r_max=6,
                                         init_r=2, target_rank=4, orth_reg_weight=0.3),
                                    **overrides))
    inject_increlora(model, config)
    model.to(dtype)
    controller = IncreLoRAController(model, config)
    with torch.no_grad():
        for layer in controller.layers:  # buffers far from orthogonal: every term counts
            layer.lora_A.normal_()
            layer.lora_B.normal_()
    controller.layers[1].add_reserve(2, step=0)
    controller.layers[2].add_reserve(1, step=0)
    return model, controller


def _penalty_and_grads(controller):
    for layer in controller.layers:
        layer.lora_A.grad = layer.lora_B.grad = None
    loss = controller.regularization_loss()
    loss.backward()
    return [loss.detach()] + [g for layer in controller.layers
                              for g in (layer.lora_A.grad, layer.lora_B.grad)]


@pytest.mark.parametrize("advance_learning", [True, False])
@pytest.mark.parametrize("reserve_in_penalty", [True, False])
def test_the_controllers_penalty_on_its_kernels_equals_its_torch_path(
        monkeypatch, reserve_in_penalty, advance_learning):
    """The same model's penalty with the layers on Triton (one launch forward and one
    backward) and on torch (stacked per shape group): loss and every gradient; again after
    the slots changed (the masks follow), and after the budget retired the reserves, which
    changes neither (they count and train as before)."""
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("INCRELORA_BACKEND", backend)
        model, controller = _model_and_controller(reserve_in_penalty=reserve_in_penalty,
                                                  advance_learning=advance_learning)
        reset_launch_counts()
        before = _penalty_and_grads(controller)
        assert launch_counts() == ({FWD: 1, BWD: 1} if backend == "triton" else {})
        controller.layers[0].add_reserve(1, step=1)
        controller.layers[1].activate_reserve(1, step=1)
        after = _penalty_and_grads(controller)
        assert not torch.equal(before[0], after[0])
        for layer in controller.layers:  # the budget: retired reserves stay as they counted
            layer.retire_reserve()
        retired = _penalty_and_grads(controller)
        for a, r in zip(after, retired):
            assert (a is None and r is None) or torch.equal(a, r)
        results[backend] = before, after, retired
    for got, ref in zip(results["triton"], results["torch"]):
        for name, g, r in zip(range(len(got)), got, ref):
            torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-6, msg=f"result {name}")


def test_the_controllers_penalty_on_bfloat16_buffers_matches_float64(monkeypatch):
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    model, controller = _model_and_controller(torch.bfloat16)
    reset_launch_counts()
    got = _penalty_and_grads(controller)
    assert launch_counts() == {FWD: 1, BWD: 1}
    layers = controller.layers
    a = [layer.lora_A.detach().clone().requires_grad_(True) for layer in layers]
    b = [layer.lora_B.detach().clone().requires_grad_(True) for layer in layers]
    used = [layer.slot_state != 0 for layer in layers]
    trains = [layer.trainable_slot_masks()[0] for layer in layers]
    ref = _run(orth_penalty_float64, a, b, used, trains, 0.3 / (2 * len(layers)))
    interleaved = [ref[0]] + [g for pair in zip(ref[1:1 + len(a)], ref[1 + len(a):])
                              for g in pair]
    for k, (g, r) in enumerate(zip(got, interleaved)):
        err = (g.double() - r).abs().max().item() / (r.abs().max().item() or 1.0)
        assert err <= TOL[torch.bfloat16], (k, err)


def test_the_first_use_check_runs_once_per_dtype_and_a_failure_means_the_torch_path(
        monkeypatch):
    """The check runs once per device and dtype, before the kernels are built; where it
    fails, one warning names the versions and the penalty takes its torch path, with its
    result."""
    from increlora_fast.kernels import checks
    monkeypatch.delenv("INCRELORA_KERNEL_CHECK", raising=False)
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    calls = []
    real = checks.check_orth_penalty

    def failing(*args, **kwargs):
        calls.append(args)
        return dict(real(*args, **kwargs), ok=False, error="dA2: relative error 3.0e-01 > 1e-04")
    reset_kernel_checks()
    try:
        monkeypatch.setattr(checks, "check_orth_penalty", failing)
        _, controller = _model_and_controller()
        reset_launch_counts()
        with pytest.warns(RuntimeWarning, match="first-use check.*triton .*variant orthogonal "
                          r"penalty, float32 slot buffers, slot tile \d+\): .*relative error "
                          "3.0e-01.*orthogonal penalty now takes its torch path"):
            got = _penalty_and_grads(controller)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _penalty_and_grads(controller)
        assert len(calls) == 1 and FWD not in launch_counts()
        monkeypatch.setenv("INCRELORA_BACKEND", "torch")
        _, controller = _model_and_controller()
        ref = _penalty_and_grads(controller)
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
        # a check that passes: the kernels from then on
        reset_kernel_checks()
        monkeypatch.setattr(checks, "check_orth_penalty", real)
        monkeypatch.setenv("INCRELORA_BACKEND", "triton")
        _, controller = _model_and_controller()
        reset_launch_counts()
        _penalty_and_grads(controller)
        assert launch_counts() == {FWD: 1, BWD: 1}
    finally:
        reset_kernel_checks()


def test_the_first_use_check_runs_the_kernels_at_the_penalty_s_slot_tile(monkeypatch):
    """The kernels are built per r tile (`OrthPenalty.r`: 16, 32, 64 or 128 slots, with
    their own column blocks and warps): the first-use check runs them at the tile of the
    penalty that asks, so a tile whose kernels are wrong is caught (one warning, the torch
    path's result) whatever tile passed. Here the 64-slot tile's gradients are 1 % off; before,
    the check ran 16 slots only, and r_max 40 trained on those gradients."""
    from increlora_fast.kernels import orth_penalty
    monkeypatch.delenv("INCRELORA_KERNEL_CHECK", raising=False)
    real = orth_penalty.OrthPenalty.backward_grads

    def off_at_64(self, *args):
        grads = real(self, *args)
        return [g * 1.01 for g in grads] if self.r == 64 else grads
    monkeypatch.setattr(orth_penalty.OrthPenalty, "backward_grads", off_at_64)
    results = {}
    reset_kernel_checks()
    try:
        for backend in ("triton", "torch"):
            monkeypatch.setenv("INCRELORA_BACKEND", backend)
            _, small = _model_and_controller()  # r_max 6: the 16-slot tile, whose check passes
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                _penalty_and_grads(small)
            _, controller = _model_and_controller(r_max=40)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results[backend] = _penalty_and_grads(controller)
            results[backend + " warnings"] = [str(w.message) for w in caught
                                              if "first-use check" in str(w.message)]
    finally:
        reset_kernel_checks()
    _assert_close(results["triton"], [r.double() for r in results["torch"]],
                  TOL[torch.float32])
    assert len(results["triton warnings"]) == 1 and not results["torch warnings"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_device_check_of_the_penalty_kernels_passes(dtype):
    from increlora_fast.kernels.checks import check_orth_penalty
    record = check_orth_penalty(torch.device(DEVICE), dtype, seed=3)
    assert record["ok"], record
    assert record["op"] == "orth_penalty" and record["max_rel_err"] < record["tol"]


def test_device_check_of_the_penalty_kernels_sees_a_wrong_gradient(monkeypatch):
    from increlora_fast.kernels import checks, orth_penalty
    real = orth_penalty.OrthPenalty.backward_grads

    def off_by_a_bit(self, *args):
        grads = real(self, *args)
        return [g * 1.01 for g in grads]
    monkeypatch.setattr(orth_penalty.OrthPenalty, "backward_grads", off_by_a_bit)
    record = checks.check_orth_penalty(torch.device(DEVICE), torch.float32)
    assert not record["ok"] and record["error"].startswith("d")


class _Subclass(torch.Tensor):
    """A tensor subclass standing in for an FSDP2 DTensor shard, whose address (0) no kernel
    may read."""


class _OnCuda(torch.Tensor):
    @property
    def is_cuda(self) -> bool:
        return True


def test_more_slots_than_the_kernels_take_means_the_torch_path_decided_once(monkeypatch):
    """A model with a layer of more slots than the kernels take (r_max 130) takes the stacked
    torch path, as its layers do, and asks nothing of the kernels at its calls (a refusal made
    once, not re-tested at every step)."""
    from increlora_fast import functional
    from increlora_fast.penalty import OrthogonalPenalty
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    _, controller = _model_and_controller(r_max=functional.TRITON_MAX_R + 2)
    asked = []
    monkeypatch.setattr(OrthogonalPenalty, "_new_kernels",
                        lambda self, buffers: asked.append(len(buffers)))
    monkeypatch.setattr(functional, "penalty_on_triton", lambda a: asked.append(a) or True)
    reset_launch_counts()
    got = _penalty_and_grads(controller)
    assert asked == [] and launch_counts() == {}
    monkeypatch.setenv("INCRELORA_BACKEND", "torch")
    _, controller = _model_and_controller(r_max=functional.TRITON_MAX_R + 2)
    for g, r in zip(got, _penalty_and_grads(controller)):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_tensor_subclasses_are_not_read_by_address(monkeypatch):
    """The penalty leaves buffers that are tensor subclasses (FSDP2 shards are DTensors, whose
    address reads 0) to its torch path, and the optimizer steps them without its kernels."""
    from increlora_fast import functional
    from increlora_fast.optimizer import _fused_kernel_applies
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    assert functional.kernel_readable(nn.Parameter(torch.randn(2)))
    assert not functional.kernel_readable(nn.Parameter(torch.randn(2).as_subclass(_Subclass)))
    assert not _fused_kernel_applies(nn.Parameter(torch.randn(2).as_subclass(_OnCuda)))
    results = []
    for subclass in (True, False):
        _, controller = _model_and_controller()
        if subclass:
            layer = controller.layers[1]
            layer.lora_A = nn.Parameter(layer.lora_A.detach().as_subclass(_Subclass))
        reset_launch_counts()
        results.append([t.as_subclass(torch.Tensor) for t in _penalty_and_grads(controller)])
        assert (FWD in launch_counts()) != subclass
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_first_call_under_inference_mode_leaves_training_intact(monkeypatch, backend):
    """A first penalty under ``torch.inference_mode()`` (a validation pass before training):
    its first-use check still passes, and the masks it caches serve the training steps."""
    monkeypatch.delenv("INCRELORA_KERNEL_CHECK", raising=False)
    monkeypatch.setenv("INCRELORA_BACKEND", backend)
    reset_kernel_checks()
    try:
        _, controller = _model_and_controller()
        with warnings.catch_warnings():
            # no warning of ours (Triton 3.6's interpreter warns of NumPy deprecations itself)
            warnings.simplefilter("error", RuntimeWarning)
            with torch.inference_mode():
                before = controller.regularization_loss()
            reset_launch_counts()
            got = _penalty_and_grads(controller)
        assert (launch_counts() == {FWD: 1, BWD: 1}) == (backend == "triton")
        torch.testing.assert_close(got[0], before.clone(), rtol=1e-6, atol=0)
    finally:
        reset_kernel_checks()


def test_the_weight_and_reserve_choice_are_read_at_each_call(monkeypatch):
    """``orth_reg_weight`` and ``reserve_in_penalty`` changed on the controller's config after
    it was built take effect at the next call, on both paths alike."""
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("INCRELORA_BACKEND", backend)
        _, controller = _model_and_controller()
        first = _penalty_and_grads(controller)
        controller.config.orth_reg_weight = 0.6
        doubled = _penalty_and_grads(controller)
        torch.testing.assert_close(doubled[0], 2 * first[0], rtol=1e-6, atol=0)
        controller.config.reserve_in_penalty = False
        results[backend] = _penalty_and_grads(controller)
        assert not torch.allclose(results[backend][0], doubled[0])
    for g, r in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-6)


def test_the_penalty_kernels_refuse_other_dtypes_and_more_slots_unchecked(kernel_device):
    """float64 slot buffers, or more slots than the kernels take: refused at once, with no
    first-use check run or remembered."""
    from increlora_fast import functional
    reset_kernel_checks()
    device = torch.device(kernel_device)
    assert not functional.orth_penalty_ok(device, torch.float64, 8)
    assert not functional.orth_penalty_ok(device, torch.float32, functional.TRITON_MAX_R + 1)
    assert functional.kernel_check_results() == {}


def test_a_compiled_penalty_takes_its_torch_path_and_reads_no_check(monkeypatch):
    """Compiled, the penalty takes its torch path (`functional.penalty_on_triton`): no launch,
    and its first-use check neither runs nor is read in the trace, so an eager penalty
    afterwards, on the kernels once its check passed, leaves the compiled graph valid; both
    give the same loss."""
    from torch._dynamo.utils import counters
    from increlora_fast import functional

    monkeypatch.delenv("INCRELORA_KERNEL_CHECK", raising=False)
    monkeypatch.setenv("INCRELORA_BACKEND", "torch")
    reset_kernel_checks()
    _, controller = _model_and_controller()
    controller.regularization_loss()  # the penalty's own caches (its layout), filled eagerly
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(controller.regularization_loss, backend="aot_eager",
                             fullgraph=True)
    reset_launch_counts()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = compiled()
            assert launch_counts() == {} and functional.kernel_check_results() == {}
            eager = controller.regularization_loss()
            assert launch_counts() == {FWD: 1}
            assert list(functional.kernel_check_results().values()) == [True]
            again = compiled()
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
        reset_kernel_checks()
    _assert_close([got], [eager.detach()], TOL[torch.float32])
    assert torch.equal(again, got)


def test_a_penalty_compiled_before_any_eager_call_counts_the_slots_eager_does(monkeypatch):
    """Traced with its mask cache empty, the penalty makes its masks in the trace, where dynamo
    folded ``slot_state != SlotState.INACTIVE`` (an IntEnum) to True: every slot, unused ones
    included, counted in the compiled loss and in the masks it cached for the eager calls
    after it."""
    monkeypatch.setenv("INCRELORA_BACKEND", "torch")
    _, reference = _model_and_controller()
    _, controller = _model_and_controller()
    torch._dynamo.reset()
    try:
        got = torch.compile(controller.regularization_loss, backend="aot_eager",
                            fullgraph=True)()
        after = controller.regularization_loss()
    finally:
        torch._dynamo.reset()
    expected = reference.regularization_loss()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-7)


def test_a_compiled_penalty_recompiles_neither_at_its_first_trace_nor_when_slots_change(
        monkeypatch):
    """The compiled penalty (torch path) reads none of its caches while dynamo traces: traced
    before any eager call it recompiled once (dynamo guarded on the empty layout cache), and it
    recompiled at every allocation round (guarded on each layer's ``slot_version`` in its mask
    cache), falling back to eager after dynamo's cache limit. Loss and gradients stay eager's
    as the slots grow and retire."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("INCRELORA_BACKEND", "torch")
    _, controller = _model_and_controller()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(controller.regularization_loss, backend="aot_eager",
                             fullgraph=True)

    def loss_and_grads(fn):
        for layer in controller.layers:
            layer.lora_A.grad = layer.lora_B.grad = None
        loss = fn()
        loss.backward()
        return [loss.detach()] + [layer.lora_A.grad for layer in controller.layers]

    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for step in range(1, 5):
                got, eager = loss_and_grads(compiled), loss_and_grads(
                    controller.regularization_loss)
                for g, e in zip(got, eager):
                    torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
                if step < 4:
                    controller.layers[0].add_reserve(1, step=step)
                    controller.layers[0].activate_reserve(1, step=step)
                else:
                    for layer in controller.layers:
                        layer.retire_reserve()
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
