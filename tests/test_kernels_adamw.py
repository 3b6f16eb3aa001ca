"""The fused masked AdamW kernel against `masked_adamw_torch_`, its reference.

On CPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported); on a CUDA machine the same tests run the compiled kernel on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from increlora_fast.optim_functional import masked_adamw_torch_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("kernel_device")
triton = pytest.importorskip("triton")

from increlora_fast.kernels import launch_counts, reset_launch_counts  # noqa: E402
from increlora_fast.kernels.adamw import masked_adamw_triton_  # noqa: E402

# Moments: the same float32 operations in the same order as the reference [bitwise equal on
# CPU]. float32 parameter: beta**n comes from exp2/log2 and may differ from torch's pow by one
# ulp [bitwise equal on all but <= 3 of 333 elements; 5e-7 relative where p nearly cancels],
# so the absolute tolerance is relative to the size of the step. bfloat16 / float16 parameter:
# one ulp, as the Triton interpreter truncates float32 -> bfloat16 where GPUs round to nearest.
PARAM_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
STEP_ATOL = 1e-6
MOMENT_RTOL = 1e-6


def make_state(shape, slot_dim, dtype, moment_dtype=torch.float32):
    r = shape[slot_dim]
    tensors = [torch.randn(shape, device=DEVICE).to(dtype),
               torch.randn(shape, device=DEVICE).to(dtype),
               (torch.randn(shape, device=DEVICE) * 0.1).to(moment_dtype),
               (torch.rand(shape, device=DEVICE) * 0.01).to(moment_dtype)]
    mask = torch.rand(r, device=DEVICE) > 0.4
    mask[-1], mask[0] = False, True  # r = 1 (a dense tensor as one slot) stays masked in
    lr = torch.rand(r, device=DEVICE) * 1e-2
    count = torch.randint(1, 60, (r,), device=DEVICE).float()
    return tensors, mask, lr, count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,slot_dim", [((8, 19), 0), ((40, 16), 1), ((128,), 0),
                                            ((1, 333), 0)])
def test_matches_reference(dtype, shape, slot_dim):
    tensors, mask, lr, count = make_state(shape, slot_dim, dtype)
    before = [t.clone() for t in tensors]
    ref = [t.clone() for t in tensors]
    reset_launch_counts()
    masked_adamw_triton_(*tensors, mask, lr, count, slot_dim, 0.9, 0.999, 1e-8, 0.01)
    masked_adamw_torch_(*ref, mask, lr, count, slot_dim, 0.9, 0.999, 1e-8, 0.01)
    assert launch_counts() == {"_masked_adamw_kernel": 1}

    along = [1] * len(shape)
    along[slot_dim] = -1
    on = mask.view(along).expand(shape)
    for got, old in zip(tensors, before):
        assert torch.equal(got[~on], old[~on])  # masked-out slots bitwise unchanged
    p, _, m, v = tensors
    p_ref, _, m_ref, v_ref = ref
    torch.testing.assert_close(m, m_ref, rtol=MOMENT_RTOL, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=MOMENT_RTOL, atol=0)
    step = (p_ref.float() - before[0].float()).abs().max().item()
    torch.testing.assert_close(p.float(), p_ref.float(), rtol=PARAM_RTOL[dtype],
                               atol=STEP_ATOL * step)
    assert not torch.equal(p[on], before[0][on])  # the step did update the masked-in slots


def test_bfloat16_moments_and_weight_decay_only_step():
    """Zero gradient: the update is pure weight decay plus the decaying moments."""
    tensors, mask, lr, count = make_state((16, 8), 1, torch.float32, torch.bfloat16)
    tensors[1].zero_()
    p_before = tensors[0].clone()
    ref = [t.clone() for t in tensors]
    masked_adamw_triton_(*tensors, mask, lr, count, 1, 0.85, 0.99, 1e-6, 0.1)
    masked_adamw_torch_(*ref, mask, lr, count, 1, 0.85, 0.99, 1e-6, 0.1)
    for got, want in zip(tensors, ref):  # bfloat16 moments: one ulp (interpreter truncation)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-12)
    assert not torch.equal(tensors[0][:, mask], p_before[:, mask])
    assert torch.equal(tensors[0][:, ~mask], p_before[:, ~mask])


@pytest.mark.parametrize("change,match", [
    ("grad_shape", "grad has shape"),
    ("noncontiguous", "param must be contiguous"),
    ("mask_len", "slot_mask must have shape \\(8,\\)"),
    ("mask_dtype", "slot_mask must be bool"),
    ("slot_dim", "slot_dim=2 is out of range"),
    ("beta", "beta1=1.0 must lie in"),
])
def test_rejects_bad_arguments(change, match):
    (p, g, m, v), mask, lr, count = make_state((8, 6), 0, torch.float32)
    slot_dim, beta1 = 0, 0.9
    if change == "grad_shape":
        g = g[:, :5]
    elif change == "noncontiguous":
        p = torch.randn(6, 8, device=DEVICE).t()
    elif change == "mask_len":
        mask = mask[:7]
    elif change == "mask_dtype":
        mask = mask.float()
    elif change == "slot_dim":
        slot_dim = 2
    else:
        beta1 = 1.0
    with pytest.raises((ValueError, TypeError), match=match):
        masked_adamw_triton_(p, g, m, v, mask, lr, count, slot_dim, beta1, 0.999, 1e-8, 0.0)


# (shape, slot dim, param dtype, moment dtype): odd shapes, a tensor over several blocks of the
# interpreter's 256 elements, a dense tensor as one slot, three dtype combinations
MULTI_TENSORS = [((8, 19), 0, torch.float32, torch.float32),
                 ((40, 16), 1, torch.float32, torch.float32),
                 ((1, 333), 0, torch.float32, torch.float32),
                 ((7, 101), 0, torch.bfloat16, torch.bfloat16),
                 ((5,), 0, torch.bfloat16, torch.bfloat16),
                 ((33, 3), 1, torch.float16, torch.float32)]


def _multi_state(specs):
    """Parameters with gradients, their moments, counts, masks and lrs, and a `MultiTensorAdamW`
    over them."""
    from increlora_fast.kernels.adamw import MultiTensorAdamW, adamw_launch
    params, moments, masks, lrs, counts = [], [], [], [], []
    for shape, slot_dim, dtype, moment_dtype in specs:
        (p, g, m, v), mask, lr, count = make_state(shape, slot_dim, dtype, moment_dtype)
        # slot 0 (always masked in) takes a step above 0.14 lr (>= 0.007), over 3 ulps of its
        # values: a gradient of size 1 with the sign of its first moment, values below 0.5.
        # Random slots alone may all step by less than a bfloat16 ulp, which the interpreter
        # truncates away, and "every tensor changed" would fail by chance (it did, on CI).
        g.select(slot_dim, 0).copy_(torch.where(m.select(slot_dim, 0) < 0, -1.0, 1.0))
        p.select(slot_dim, 0).mul_(0.1).clamp_(-0.45, 0.45)
        p.requires_grad_(True)
        p.grad = g
        params.append(p)
        moments.append((m, v))
        masks.append(mask)
        lrs.append(lr + 0.05)
        counts.append(count)
    multi = MultiTensorAdamW(params, moments, counts,
                             [adamw_launch(p, spec[1]) for p, spec in zip(params, specs)])
    return multi, params, moments, masks, lrs, counts


def _per_tensor_steps(specs, params, moments, masks, lrs, counts, hyper):
    """The same step, one `masked_adamw_triton_` launch per tensor, on copies: (params,
    moments) after it."""
    out = []
    for (_, slot_dim, _, _), p, (m, v), mask, lr, count in zip(specs, params, moments, masks,
                                                               lrs, counts):
        p, m, v = p.detach().clone(), m.clone(), v.clone()
        grad = params[len(out)].grad
        masked_adamw_triton_(p, grad, m, v, mask, lr, count, slot_dim, *hyper)
        out.append((p, m, v))
    return out


def _assert_bitwise(params, moments, expected):
    for p, (m, v), (p_ref, m_ref, v_ref) in zip(params, moments, expected):
        for got, want in ((p.detach(), p_ref), (m, m_ref), (v, v_ref)):
            assert got.dtype == want.dtype
            assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))


def test_multi_tensor_step_equals_a_launch_per_tensor_bitwise():
    """`MultiTensorAdamW`: one launch per dtype combination, the very operations of the
    per-tensor kernel (the same float32 math on the same values), so the results are bitwise
    those of one launch per tensor, masked-out slots untouched; with fresh random state."""
    hyper = (0.9, 0.999, 1e-8, 0.01)
    multi, params, moments, masks, lrs, counts = _multi_state(MULTI_TENSORS)
    before = [p.detach().clone() for p in params]
    expected = _per_tensor_steps(MULTI_TENSORS, params, moments, masks, lrs, counts, hyper)
    reset_launch_counts()
    multi.step(torch.cat(masks).view(torch.uint8), torch.cat(lrs), *hyper)
    assert launch_counts() == {"_masked_adamw_multi_kernel": 3}
    _assert_bitwise(params, moments, expected)
    changed = [not torch.equal(p.detach(), old) for p, old in zip(params, before)]
    assert all(changed)  # not vacuous: every tensor has a masked-in slot that moved


def test_multi_tensor_step_follows_gradients_and_data_that_moved():
    """The table of addresses is rebuilt when a gradient or a parameter's data lives in other
    memory (a new gradient each step; ``p.data = ...`` with another dtype): the step reads the
    current tensors, grouped by their current dtypes."""
    hyper = (0.85, 0.99, 1e-6, 0.0)
    specs = list(MULTI_TENSORS)
    multi, params, moments, masks, lrs, counts = _multi_state(specs)
    flat = (torch.cat(masks).view(torch.uint8), torch.cat(lrs))
    multi.step(*flat, *hyper)
    held = [p.grad for p in params]  # kept alive: the new gradients get other memory
    for p in params:
        p.grad = torch.randn_like(p)
    with torch.no_grad():
        params[0].data = params[0].data.to(torch.bfloat16)  # now in the bf16 group
    specs[0] = (specs[0][0], specs[0][1], torch.bfloat16, torch.float32)
    expected = _per_tensor_steps(specs, params, moments, masks, lrs, counts, hyper)
    reset_launch_counts()
    multi.step(*flat, *hyper)
    assert launch_counts() == {"_masked_adamw_multi_kernel": 4}
    _assert_bitwise(params, moments, expected)
    assert len(held) == len(params)


def test_multi_tensor_step_follows_a_new_dtype_at_the_same_address_and_moved_moments():
    """What the table points to besides the gradients is compared with the last step too: a
    parameter's data replaced by another dtype at the same address (a caching allocator can
    hand the freed block back) is grouped anew, and moments and counts given new data are
    stepped where they now are."""
    hyper = (0.9, 0.999, 1e-8, 0.0)
    specs = list(MULTI_TENSORS)
    multi, params, moments, masks, lrs, counts = _multi_state(specs)
    flat = (torch.cat(masks).view(torch.uint8), torch.cat(lrs))
    multi.step(*flat, *hyper)
    with torch.no_grad():
        p = params[1]  # float32 -> bfloat16 in the same memory, the gradient in place too
        same = p.data.view(-1).view(torch.bfloat16)[:p.numel()].view(p.shape)
        same.copy_(p.detach().to(torch.bfloat16))
        grad = p.grad.view(-1).view(torch.bfloat16)[:p.numel()].view(p.shape)
        grad.copy_(torch.randn(p.shape, device=DEVICE))
        p.data, p.grad = same, grad
    specs[1] = (specs[1][0], specs[1][1], torch.bfloat16, torch.float32)
    expected = _per_tensor_steps(specs, params, moments, masks, lrs, counts, hyper)
    reset_launch_counts()
    assert multi.step(*flat, *hyper)
    assert launch_counts() == {"_masked_adamw_multi_kernel": 4}  # (bf16, bf16, fp32, fp32) too
    _assert_bitwise(params, moments, expected)
    with torch.no_grad():  # moments and counts of one tensor given new memory, in place
        for t in (*moments[2], counts[3]):
            t.data = t.data.clone()
    expected = _per_tensor_steps(specs, params, moments, masks, lrs, counts, hyper)
    assert multi.step(*flat, *hyper)
    _assert_bitwise(params, moments, expected)


def test_multi_tensor_step_launches_nothing_for_dtypes_it_may_not_launch():
    """``accepts`` (the optimizer's first-use check) refusing a dtype combination: no launch,
    False, and nothing changed; the caller then launches per tensor."""
    from increlora_fast.kernels.adamw import MultiTensorAdamW
    _, params, moments, masks, lrs, counts = _multi_state(MULTI_TENSORS)
    from increlora_fast.kernels.adamw import adamw_launch
    asked = []
    multi = MultiTensorAdamW(params, moments, counts,
                             [adamw_launch(p, spec[1]) for p, spec in zip(params, MULTI_TENSORS)],
                             lambda dtypes: asked.append(dtypes) or dtypes[0] != torch.float16)
    before = [p.detach().clone() for p in params]
    reset_launch_counts()
    for _ in range(2):
        assert not multi.step(torch.cat(masks).view(torch.uint8), torch.cat(lrs),
                              0.9, 0.999, 1e-8, 0.0)
    assert launch_counts() == {}
    assert all(torch.equal(p.detach(), old) for p, old in zip(params, before))
    assert len(asked) == 3  # each combination once, at the first step


def test_multi_tensor_step_refuses_a_noncontiguous_gradient():
    multi, params, _, masks, lrs, _ = _multi_state(MULTI_TENSORS)
    p = params[1]
    p.grad = torch.randn(p.shape[1], p.shape[0], device=DEVICE).t()
    with pytest.raises(ValueError, match="gradient of shape \\(40, 16\\) is not contiguous"):
        multi.step(torch.cat(masks).view(torch.uint8), torch.cat(lrs), 0.9, 0.999, 1e-8, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_device_check_of_the_optimizer_kernels_passes(dtype):
    """`gpu-check`'s records of the optimizer's kernels (both launches, two steps, against
    float64) pass here, with an error that was computed."""
    from increlora_fast.kernels.checks import check_adamw
    for multi in (True, False):
        record = check_adamw(torch.device(DEVICE), dtype, multi)
        assert record["ok"] and record["error"] == "", record
        assert 0 < record["max_rel_err"] <= record["tol"]
        assert record["op"] == ("masked_adamw_multi" if multi else "masked_adamw")


def test_device_check_of_the_optimizer_kernels_sees_a_stale_table(monkeypatch):
    """A table of addresses not rebuilt after the gradients moved steps the old gradients: the
    check's second step reports it, as it would on a GPU where the kernel read wrong memory."""
    from increlora_fast.kernels.adamw import MultiTensorAdamW
    from increlora_fast.kernels.checks import check_adamw
    real = MultiTensorAdamW._refresh

    def first_only(self, params_at, grads_at):
        if not self._tables:
            real(self, params_at, grads_at)
    monkeypatch.setattr(MultiTensorAdamW, "_refresh", first_only)
    record = check_adamw(torch.device(DEVICE), torch.float32, True)
    assert not record["ok"] and "relative error" in record["error"], record


# ------------------------------------------------ slots whose Adam step does not count (count 0)
# A slot the controller changed at this step has Adam step count 0 after the step's increment
# (`IncreLoRAAdamW._restart_fresh_slots`): like a parameter just added to AdamW it takes no step,
# not even weight decay, so it stays bitwise unchanged, parameter and moments, as a masked-out
# slot does. Error of the counted slots relative to the largest float64 result of the tensor.
REF_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
# The float32 step against the float64 reference: ``1 - beta2**n`` is taken from the float32
# beta2 (0.999 rounds to 0.99900001), 1.3e-5 off at n = 1 where it cancels, so the Adam part of
# the update is up to about 7e-6 off (its square root); measured up to 1.4e-5 of the largest
# Adam update over 300 seeds, so a bound of 3e-5 of it.
BIAS_CORRECTION_RTOL = 3e-5
# (shape, slot dim): A (slots along dim 0), B (along dim 1), lambda (1-D), a dense tensor as one
# slot; odd sizes, over several of the interpreter's blocks of 256 elements
UNCOUNTED_SHAPES = [((7, 37), 0), ((19, 5), 1), ((11,), 0), ((1, 333), 0)]
WD_HYPER = (0.9, 0.999, 1e-8, 0.1)


def _uncounted_state(shape, slot_dim, dtype, moment_dtype=torch.float32):
    """`make_state` with lrs large enough for weight decay to show and, among the slots that
    train, some of count 0 (never the only slot of a one-slot tensor)."""
    tensors, mask, lr, count = make_state(shape, slot_dim, dtype, moment_dtype)
    r = shape[slot_dim]
    lr = 0.05 + lr
    if r > 1:
        mask[1] = mask[2] = True
        count[1] = 0.0
        count[2:] = torch.where(torch.rand(r - 2, device=DEVICE) > 0.5, 0.0, count[2:])
        count[2] = 1.0  # a first step next to an uncounted one
    return tensors, mask, lr, count


def _check_uncounted(shape, slot_dim, got, before, mask, lr, count, dtype):
    """The slots that train with count 0 (and the masked-out ones) are bitwise unchanged; the
    others match `masked_adamw_float64`."""
    from increlora_fast.kernels.reference import masked_adamw_float64
    p, g, m, v = before
    want = masked_adamw_float64(p, g, m, v, mask, lr, count, slot_dim, *WD_HYPER)
    along = [1] * len(shape)
    along[slot_dim] = -1
    counted = (mask & (count >= 1)).view(along).expand(shape)
    # the Adam part of each parameter's update (the float64 reference's, weight decay taken out)
    decay = 1 - lr.double().view(along) * WD_HYPER[3]
    adam = (want[0] - p.double() * decay)[counted].abs().max()
    for name, t, old, ref in zip(("param", "exp_avg", "exp_avg_sq"), got, (p, m, v), want):
        assert torch.equal(t[~counted], old[~counted]), f"{name} changed where it may not"
        assert torch.equal(ref[~counted], old[~counted].double()), f"reference {name}"
        err = (t.double() - ref)[counted].abs()
        if name == "param":
            bound = REF_RTOL[dtype] * ref[counted].abs() + BIAS_CORRECTION_RTOL * adam
            assert (err <= bound).all(), (name, float((err / bound).max()))
        else:
            rel = err.max() / ref[counted].abs().max()
            assert rel <= REF_RTOL[old.dtype], (name, float(rel))
    assert not torch.equal(got[0][counted], p[counted])  # the counted slots did move


@pytest.mark.parametrize("step", [masked_adamw_triton_, masked_adamw_torch_],
                         ids=["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,slot_dim", UNCOUNTED_SHAPES)
def test_a_slot_of_count_zero_is_left_unchanged(step, dtype, shape, slot_dim):
    """The kernel and `masked_adamw_torch_` (`masked_adamw_into`, the optimizer's torch
    path) alike."""
    tensors, mask, lr, count = _uncounted_state(shape, slot_dim, dtype)
    before = [t.clone() for t in tensors]
    step(*tensors, mask, lr, count, slot_dim, *WD_HYPER)
    p, _, m, v = tensors
    _check_uncounted(shape, slot_dim, (p, m, v), before, mask, lr, count, dtype)


def test_a_slot_of_count_zero_is_left_unchanged_by_the_multi_tensor_launch():
    """`MultiTensorAdamW` over A-, B- and lambda-shaped tensors of three dtype combinations:
    count-0 slots untouched, the rest as float64 and bitwise as one launch per tensor."""
    from increlora_fast.kernels.adamw import MultiTensorAdamW, adamw_launch
    specs = [((7, 37), 0, torch.float32, torch.float32), ((19, 5), 1, torch.float32, torch.float32),
             ((11,), 0, torch.float32, torch.float32), ((1, 333), 0, torch.float32, torch.float32),
             ((9, 30), 0, torch.bfloat16, torch.bfloat16), ((13,), 0, torch.bfloat16, torch.bfloat16),
             ((33, 3), 1, torch.float16, torch.float32)]
    states = [_uncounted_state(shape, slot_dim, dtype, moment_dtype)
              for shape, slot_dim, dtype, moment_dtype in specs]
    befores = [[t.clone() for t in tensors] for tensors, *_ in states]
    params = []
    for (p, g, _, _), *_ in states:
        p.requires_grad_(True)
        p.grad = g
        params.append(p)
    multi = MultiTensorAdamW(params, [(m, v) for (_, _, m, v), *_ in states],
                             [count for *_, count in states],
                             [adamw_launch(p, spec[1]) for p, spec in zip(params, specs)])
    expected = _per_tensor_steps(specs, params, [(t[2], t[3]) for t, *_ in states],
                                 [s[1] for s in states], [s[2] for s in states],
                                 [s[3] for s in states], WD_HYPER)
    reset_launch_counts()
    assert multi.step(torch.cat([s[1] for s in states]).view(torch.uint8),
                      torch.cat([s[2] for s in states]), *WD_HYPER)
    assert launch_counts() == {"_masked_adamw_multi_kernel": 3}
    _assert_bitwise(params, [(t[2], t[3]) for t, *_ in states], expected)
    for (shape, slot_dim, dtype, _), (t, mask, lr, count), before in zip(specs, states, befores):
        _check_uncounted(shape, slot_dim, (t[0].detach(), t[2], t[3]), before, mask, lr, count,
                         dtype)
