"""IncreLoRALinear against a dense float64 reference: forward, every gradient, the exact score,
dtypes and autocast, slot operations and the transformers Conv1D base."""
from __future__ import annotations

import math
from typing import Dict

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from increlora_fast import IncreLoRALinear, SlotState

IN, OUT, R_MAX = 24, 20, 8
# (active, reserve) of the first seeds; later seeds draw both at random
EDGE_SLOTS = [(1, 0), (R_MAX, 0), (1, R_MAX - 1), (2, 3)]


def random_layer(seed: int, advance_learning: bool = True, dtype=torch.float32,
                 conv1d: bool = False, reserve_lambda: float = 0.3,
                 adapter_dtype: str = "auto") -> IncreLoRALinear:
    """A layer with a random number of active and reserve slots and random values everywhere.

    A and B are drawn larger than at init and every lambda (inactive and reserve slots included)
    is random and nonzero, so each slot state visibly changes the output unless masked.
    ``reserve_lambda`` is large for the same reason.
    """
    gen = torch.Generator().manual_seed(seed)
    if seed < len(EDGE_SLOTS):
        init_r, reserve = EDGE_SLOTS[seed]
    else:
        init_r = int(torch.randint(1, R_MAX, (1,), generator=gen))
        reserve = int(torch.randint(0, R_MAX - init_r + 1, (1,), generator=gen))
    base = Conv1D(OUT, IN) if conv1d else nn.Linear(IN, OUT)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    layer = IncreLoRALinear(base.to(dtype), r_max=R_MAX, init_r=init_r, reserve_rank=reserve,
                            lora_alpha=6.0, reserve_lambda=reserve_lambda,
                            advance_learning=advance_learning, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(R_MAX, IN, generator=gen) * 0.4)
        layer.lora_B.copy_(torch.randn(OUT, R_MAX, generator=gen) * 0.4)
        layer.lora_lambda.copy_(torch.randn(R_MAX, generator=gen) + 0.5)
    return layer


def reference_params(layer: IncreLoRALinear) -> Dict[str, torch.Tensor]:
    """float64 leaf copies of the layer's tensors, with W0 as (out, in) for both base kinds."""
    w0 = layer.base_layer.weight.detach().double()
    bias = layer.base_layer.bias
    return {
        "W0": w0.t().contiguous() if layer.is_conv1d else w0,
        "b": torch.zeros(layer.out_features, dtype=torch.float64) if bias is None
        else bias.detach().double(),
        "A": layer.lora_A.detach().double().requires_grad_(True),
        "B": layer.lora_B.detach().double().requires_grad_(True),
        "lam": layer.lora_lambda.detach().double().requires_grad_(True),
    }


def reference_lam_eff(layer: IncreLoRALinear, lam: torch.Tensor) -> torch.Tensor:
    """lambda on active slots, the configured reserve lambda on reserve slots, 0 elsewhere."""
    state = layer.slot_state
    reserve_value = layer.reserve_lambda if layer.advance_learning else 0.0
    return torch.where(state == SlotState.ACTIVE, lam,
                       torch.where(state == SlotState.RESERVE,
                                   torch.full_like(lam, reserve_value), torch.zeros_like(lam)))


def reference_forward(layer: IncreLoRALinear, ref: Dict[str, torch.Tensor],
                      x: torch.Tensor) -> torch.Tensor:
    scale = layer.lora_alpha / int((layer.slot_state == SlotState.ACTIVE).sum())
    delta_w = ref["B"] @ torch.diag(reference_lam_eff(layer, ref["lam"])) @ ref["A"]
    return x @ ref["W0"].t() + ref["b"] + x @ delta_w.t() * scale


SEEDS = range(8)
SHAPES = [(7, IN), (3, 5, IN)]


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_output_equals_base_at_init(shape, conv1d):
    base = Conv1D(OUT, IN) if conv1d else nn.Linear(IN, OUT)
    x = torch.randn(shape)
    expected = base(x)
    exact = IncreLoRALinear(base, r_max=R_MAX, init_r=2, reserve_rank=2, advance_learning=False)
    assert torch.equal(exact(x), expected)
    # advance learning: reserve slots contribute with lambda 1e-5 only (|x| ~ 1 gives ~1e-6)
    near = IncreLoRALinear(base, r_max=R_MAX, init_r=2, reserve_rank=2, reserve_lambda=1e-5)
    torch.testing.assert_close(near(x), expected, rtol=0, atol=1e-5)
    assert torch.all(near.lora_lambda[near.active_mask] == 0)
    for p in (near.lora_A, near.lora_B):
        assert 0.01 < float(p.detach().std()) < 0.03


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)],
                         ids=["fp64", "fp32"])
@pytest.mark.parametrize("advance_learning", [True, False], ids=["advance", "no_advance"])
def test_forward_and_gradients_match_dense_reference(seed, shape, dtype, tol, advance_learning):
    layer = random_layer(seed, advance_learning=advance_learning, dtype=dtype)
    ref = reference_params(layer)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    x_ref = x.detach().double().requires_grad_(True)
    grad_out = torch.randn(*shape[:-1], OUT, dtype=torch.float64)

    y = layer(x)
    y_ref = reference_forward(layer, ref, x_ref)
    assert y.shape == y_ref.shape and y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)

    (y.double() * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    pairs = {"x": (x.grad, x_ref.grad), "A": (layer.lora_A.grad, ref["A"].grad),
             "B": (layer.lora_B.grad, ref["B"].grad), "lam": (layer.lora_lambda.grad, ref["lam"].grad)}
    for name, (got, want) in pairs.items():
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=name)

    active, reserve = layer.active_mask, layer.reserve_mask
    inactive = ~(active | reserve)
    assert torch.all(layer.lora_A.grad[inactive] == 0)
    assert torch.all(layer.lora_B.grad[:, inactive] == 0)
    assert torch.all(layer.lora_lambda.grad[~active] == 0)
    assert torch.all(layer.lora_A.grad[active] != 0) and torch.all(layer.lora_lambda.grad[active] != 0)
    if advance_learning:
        assert torch.all(layer.lora_A.grad[reserve].abs().sum(1) > 0)
        assert torch.all(layer.lora_B.grad[:, reserve].abs().sum(0) > 0)
    else:
        assert torch.all(layer.lora_A.grad[reserve] == 0)
        assert torch.all(layer.lora_B.grad[:, reserve] == 0)


def test_random_slot_states_cover_every_mix():
    """The seeds above draw layers with and without reserve and with inactive slots."""
    layers = [random_layer(seed) for seed in SEEDS]
    mixes = {(layer.active_rank, layer.reserve_rank) for layer in layers}
    assert set(EDGE_SLOTS) <= mixes and len(mixes) >= len(EDGE_SLOTS) + 2


# bf16 has an 8-bit mantissa (eps 2**-8), fp16 a 11-bit one (eps 2**-11); the adapter path adds a
# few roundings on O(1) values, so a few eps of the output scale is the stated tolerance.
LOW_PRECISION = [(torch.bfloat16, 5e-2), (torch.float16, 8e-3)]


@pytest.mark.parametrize("adapter_dtype", ["auto", "base"])
@pytest.mark.parametrize("dtype,tol", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_low_precision_forward(dtype, tol, seed, adapter_dtype):
    """On a 16-bit base A and B are float32 by default (peft's choice), or the base dtype with
    adapter_dtype="base"; lambda is float32 either way (updates below the base dtype's resolution
    would vanish); the layer computes in the base dtype."""
    layer = random_layer(seed, dtype=dtype, adapter_dtype=adapter_dtype)
    expected = torch.float32 if adapter_dtype == "auto" else dtype
    assert layer.lora_A.dtype == layer.lora_B.dtype == expected
    assert layer.lora_lambda.dtype == torch.float32
    x = torch.randn(3, 5, IN).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    y_ref = reference_forward(layer, reference_params(layer), x.double())
    scale = float(y_ref.detach().abs().max())
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_autocast_bf16_forward_and_backward(seed):
    layer = random_layer(seed)
    x = torch.randn(3, 5, IN)
    ref = reference_params(layer)
    y_ref = reference_forward(layer, ref, x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    scale = float(y_ref.detach().abs().max())
    torch.testing.assert_close(y.double(), y_ref, rtol=5e-2, atol=5e-2 * scale)
    grad_out = torch.randn_like(y_ref)
    (y.double() * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    # bf16 rounds each term of a gradient's sum, so its error scales with the sum of the
    # terms' magnitudes (the same gradient from |x|, |A|, |B|, |lam| and |grad_out|), not with
    # the sum itself, which may cancel (one live lambda slot: its gradient is one such sum)
    mag = {k: v.detach().abs().requires_grad_(v.requires_grad) for k, v in ref.items()}
    (reference_forward(layer, mag, x.double().abs()) * grad_out.abs()).sum().backward()
    for name in ("A", "B", "lam"):
        got = getattr(layer, {"A": "lora_A", "B": "lora_B", "lam": "lora_lambda"}[name]).grad
        assert got.dtype == torch.float32
        want = ref[name].grad
        atol = max(5e-2 * float(want.abs().max()), 1e-2 * float(mag[name].grad.max()))
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=atol, msg=name)
    assert torch.all(layer.lora_A.grad[~(layer.active_mask | layer.reserve_mask)] == 0)


def reference_score(layer: IncreLoRALinear, x: torch.Tensor, grad_out: torch.Tensor) -> float:
    """sum(|dW * G|) / sqrt(out * in) with G = dL/d(dW) by autograd on a materialised dW."""
    ref = reference_params(layer)
    scale = layer.lora_alpha / layer.active_rank
    with torch.no_grad():
        delta_w = ref["B"] @ torch.diag(reference_lam_eff(layer, ref["lam"])) @ ref["A"] * scale
    delta_w.requires_grad_(True)
    x64 = x.double()
    y = x64 @ ref["W0"].t() + ref["b"] + x64 @ delta_w.t()
    (grad,) = torch.autograd.grad((y * grad_out).sum(), delta_w)
    return float((delta_w.detach() * grad).abs().sum() / math.sqrt(OUT * IN))


@pytest.mark.parametrize("seed", SEEDS[:4])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_exact_score_accumulates_over_backward_passes(seed, conv1d):
    layer = random_layer(seed, conv1d=conv1d)
    layer.train()
    layer.score_enabled = True
    expected = 0.0
    for _ in range(2):
        x = torch.randn(4, 6, IN)
        grad_out = torch.randn(4, 6, OUT, dtype=torch.float64)
        (layer(x).double() * grad_out).sum().backward()
        expected += reference_score(layer, x, grad_out)
        assert expected > 0
        torch.testing.assert_close(float(layer.score_sum), expected, rtol=1e-4, atol=0)
    taken = layer.take_score()
    torch.testing.assert_close(float(taken), expected, rtol=1e-4, atol=0)
    assert float(layer.score_sum) == 0.0


def test_score_only_when_enabled_and_in_a_backward_pass():
    """Scored in train and eval mode alike (a model trained in eval mode, without dropout,
    scores as in train mode), never under no_grad or by a forward alone."""
    layer = random_layer(0)
    x = torch.randn(5, IN)
    layer.train()
    layer(x).sum().backward()
    assert float(layer.score_sum) == 0.0
    layer.score_enabled = True
    with torch.no_grad():
        layer(x)
    layer(x)
    assert float(layer.score_sum) == 0.0
    layer(x).sum().backward()
    trained = float(layer.score_sum)
    assert trained > 0.0
    layer.score_sum.zero_()
    layer.eval()
    layer(x).sum().backward()
    assert float(layer.score_sum) == trained


@pytest.mark.parametrize("exact", [False, True], ids=["per_pass", "exact_step"])
def test_gradcheck_of_a_layer_whose_score_is_tracked(exact):
    """torch.autograd.gradcheck in float64 on a layer while its score is tracked: its check of
    undefined output gradients called the score hook with None, which failed in the hook
    ("'NoneType' object has no attribute 'shape'"), found by an audit. An undefined gradient
    adds nothing to the score; the next real backward is scored."""
    torch.manual_seed(0)
    layer = IncreLoRALinear(nn.Linear(5, 4).double(), r_max=4, init_r=2, reserve_rank=1)
    with torch.no_grad():
        layer.lora_lambda.normal_()
    layer.train()
    layer.score_enabled = True
    layer.exact_step_score = exact
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    layer.release_score_buffers()
    layer(x).sum().backward()
    scored = layer.take_score_grad() if exact else layer.take_score()
    assert bool(torch.isfinite(scored).all()) and bool(scored.abs().sum() > 0)


def _param_ids(layer: IncreLoRALinear) -> Dict[str, int]:
    return {n: id(p) for n, p in layer.named_parameters()}


def _shapes(layer: IncreLoRALinear) -> Dict[str, tuple]:
    return {n: tuple(t.shape) for n, t in layer.state_dict().items()}


def test_slot_operations_keep_shapes_and_parameter_objects():
    layer = IncreLoRALinear(nn.Linear(IN, OUT), r_max=R_MAX, init_r=1, reserve_rank=2,
                            reserve_lambda=1e-5)
    ids, shapes = _param_ids(layer), _shapes(layer)
    states = lambda: layer.slot_state.tolist()  # noqa: E731
    assert states() == [2, 1, 1, 0, 0, 0, 0, 0]
    assert layer.slot_alloc_step.tolist()[:3] == [0, 0, 0]

    with torch.no_grad():
        layer.lora_A[1:3].normal_()  # stands for what the reserve learnt
        trained_a, trained_b = layer.lora_A[1:3].clone(), layer.lora_B[:, 1:3].clone()
        untouched_a = layer.lora_A[3:].clone()
    assert layer.activate_reserve(2, step=7) == 2
    assert states()[:3] == [2, 2, 2] and layer.active_rank == 3 and layer.reserve_rank == 0
    assert layer.slot_active_step.tolist()[:3] == [0, 7, 7]
    assert torch.equal(layer.lora_A[1:3], trained_a) and torch.equal(layer.lora_B[:, 1:3], trained_b)
    assert torch.all(layer.lora_lambda[1:3] == 1e-5)

    assert layer.add_reserve(2, step=7) == 2
    assert states() == [2, 2, 2, 1, 1, 0, 0, 0]
    assert layer.slot_alloc_step.tolist()[3:6] == [7, 7, -1]
    assert layer.slot_active_step.tolist()[3:5] == [-1, -1]
    assert not torch.equal(layer.lora_A[3:5], untouched_a[:2])
    assert torch.equal(layer.lora_A[5:], untouched_a[2:])
    assert torch.all(layer.lora_lambda[3:5] == 1e-5)

    assert layer.activate_reserve(1, step=9) == 1
    assert states() == [2, 2, 2, 2, 1, 0, 0, 0]
    assert layer.add_reserve(10, step=9) == 3  # only 3 slots are left
    assert states() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert layer.add_reserve(1, step=9) == 0

    layer.retire_reserve()
    assert states() == [2, 2, 2, 2, 0, 0, 0, 0]
    assert torch.all(layer.lora_lambda[4:] == 0)
    assert layer.slot_alloc_step.tolist()[4:] == [7, 9, 9, 9]  # retired slots keep their step
    assert _param_ids(layer) == ids and _shapes(layer) == shapes


def test_retired_reserve_no_longer_affects_output():
    layer = random_layer(3, reserve_lambda=0.5)
    assert layer.reserve_rank > 0
    x = torch.randn(6, IN)
    before = layer(x)
    layer.retire_reserve()
    after = layer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.double(), reference_forward(layer, reference_params(layer),
                                                                 x.double()), rtol=2e-5, atol=2e-5)


def test_slot_state_is_in_state_dict_and_restores_outputs():
    layer = random_layer(2)
    layer.activate_reserve(1, step=3)
    layer.add_reserve(1, step=3)
    state = layer.state_dict()
    for key in ("slot_state", "slot_alloc_step", "slot_active_step", "lora_A", "lora_B",
                "lora_lambda"):
        assert key in state
    assert "score_sum" not in state
    other = IncreLoRALinear(nn.Linear(IN, OUT), r_max=R_MAX, init_r=1, reserve_rank=0,
                            lora_alpha=6.0, reserve_lambda=0.3)
    x = torch.randn(4, IN)
    assert not torch.allclose(other(x), layer(x))
    other.load_state_dict(state)
    assert torch.equal(other.slot_state, layer.slot_state)
    assert torch.equal(other(x), layer(x))


def test_conv1d_forward_and_merge():
    layer = random_layer(5, conv1d=True)
    assert layer.is_conv1d and (layer.in_features, layer.out_features) == (IN, OUT)
    x = torch.randn(2, 5, IN)
    y = layer(x)
    torch.testing.assert_close(y.double(), reference_forward(layer, reference_params(layer),
                                                             x.double()), rtol=2e-5, atol=2e-5)
    layer.merge()
    assert layer.base_layer.weight.shape == (IN, OUT)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(TypeError, match="Conv2d"):
        IncreLoRALinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="r_max=4"):
        IncreLoRALinear(nn.Linear(IN, OUT), r_max=4, init_r=3, reserve_rank=2)
    with pytest.raises(ValueError, match="init_r=0"):
        IncreLoRALinear(nn.Linear(IN, OUT), r_max=4, init_r=0, reserve_rank=1)


@pytest.mark.parametrize("field,value,allowed", [
    ("r_max", 4.0, "an integer >= 1"), ("init_r", 1.5, "an integer >= 1"),
    ("reserve_rank", True, "an integer >= 0"), ("lora_alpha", -16.0, "a finite number > 0"),
    ("lora_alpha", float("nan"), "a finite number > 0"),
    ("lora_dropout", -0.1, "a probability in [0, 1)"), ("lora_dropout", 1.5, "[0, 1)"),
    ("reserve_lambda", -1e-5, "a finite number >= 0"),
    ("adapter_dtype", "fp8", "is invalid: one of ('auto', "),
    ("advance_learning", "no", "True or False"), ("advance_learning", 0, "True or False"),
])
def test_constructor_names_a_bad_argument_and_what_is_allowed(field, value, allowed):
    """A layer built by hand (not through the validated IncreLoRAConfig) accepted lora_alpha
    <= 0 (an adapter of flipped sign, or NaN outputs) and a negative lora_dropout (silently no
    dropout), and r_max=4.0 failed inside torch.empty: each is refused in one line."""
    with pytest.raises(ValueError) as err:
        IncreLoRALinear(nn.Linear(IN, OUT), **{field: value})
    message = str(err.value)
    assert f"{field}={value!r}" in message and allowed in message and "\n" not in message


def test_a_layer_built_by_hand_reports_itself_and_its_empty_accumulators():
    """Its repr names its sizes, a hand-built layer knows no ties, the dense score gradient
    taken before any tracked backward is zeros of the weight's shape, and `scale` is the
    ``alpha / active_rank`` of `effective_lambda`."""
    layer = IncreLoRALinear(nn.Linear(IN, OUT), r_max=6, init_r=2, reserve_rank=1,
                            lora_alpha=12.0)
    assert f"in_features={IN}, out_features={OUT}, r_max=6, lora_alpha=12.0" in repr(layer)
    assert layer.tied_parameters() == []
    grad = layer.take_score_grad()
    assert grad.shape == (OUT, IN) and not grad.any()
    assert float(layer.scale()) == 6.0
    with torch.no_grad():
        layer.lora_lambda.fill_(0.5)
    torch.testing.assert_close(layer.effective_lambda()[:2], 0.5 * layer.scale().expand(2))


def test_an_unknown_backend_in_the_environment_is_named(monkeypatch):
    layer = IncreLoRALinear(nn.Linear(IN, OUT))
    monkeypatch.setenv("INCRELORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"INCRELORA_BACKEND='cuda' is invalid: use one of "
                                         r"\('torch', 'triton'\)"):
        layer(torch.randn(2, IN))
    monkeypatch.setenv("INCRELORA_BACKEND", " Torch ")  # case and spaces do not matter
    assert layer(torch.randn(2, IN)).shape == (2, OUT)


def test_base_layer_is_frozen():
    layer = IncreLoRALinear(nn.Linear(IN, OUT))
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_lambda"}


@pytest.mark.parametrize("advance_learning", [True, False], ids=["advance", "no_advance"])
@pytest.mark.parametrize("features", [(IN, OUT), (320, 288)], ids=["dense_score", "chunked_score"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_poison_in_dead_slots_changes_nothing_on_the_torch_path(advance_learning, features,
                                                                poison):
    """NaN or inf in the A rows and B columns of slots whose effective lambda is 0 (inactive
    ones, and reserve ones without advance learning) change no output, gradient or score: the
    torch path masks them by value as the kernels do (NaN * 0 is NaN), and gives them exactly
    zero dA and dB. An active slot at lambda 0 still reads its A and B for its own dlambda.
    Both score forms: dense (small G) and chunked (G above `DENSE_SCORE_MAX_NUMEL`)."""
    from increlora_fast.kernels.reference import DENSE_SCORE_MAX_NUMEL
    n_in, n_out = features
    assert (n_in * n_out > DENSE_SCORE_MAX_NUMEL) == (n_in > IN)

    def layer_and_step(poisoned: bool):
        torch.manual_seed(0)
        layer = IncreLoRALinear(nn.Linear(n_in, n_out), r_max=R_MAX, init_r=3, reserve_rank=2,
                                lora_alpha=6.0, reserve_lambda=0.3,
                                advance_learning=advance_learning)
        dead = layer.effective_lambda().detach() == 0
        dead &= ~layer.active_mask
        with torch.no_grad():
            layer.lora_A.normal_(std=0.4)
            layer.lora_B.normal_(std=0.4)
            layer.lora_lambda.normal_(0.5, 1.0)
            layer.lora_lambda[1] = 0.0  # an active slot at lambda 0
            layer.lora_A[dead] = poison if poisoned else 0.0
            layer.lora_B[:, dead] = -poison if poisoned else 0.0
        layer.train()
        layer.score_enabled = True
        x = torch.randn(2, 5, n_in, requires_grad=True)
        y = layer(x)
        (y * torch.randn_like(y)).sum().backward()
        return layer, dead, [y, x.grad, layer.lora_A.grad, layer.lora_B.grad,
                             layer.lora_lambda.grad, layer.score_sum]

    layer, dead, got = layer_and_step(poisoned=True)
    _, _, want = layer_and_step(poisoned=False)
    assert int(dead.sum()) == (3 if advance_learning else 5)
    for name, g, w in zip(("y", "dx", "dA", "dB", "dlambda", "score"), got, want):
        assert torch.isfinite(g).all(), name
        assert torch.equal(g, w), name
    assert torch.count_nonzero(layer.lora_A.grad[dead]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[:, dead]) == 0
    assert float(layer.lora_lambda.grad[1]) != 0 and float(layer.score_sum) > 0


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_poison_in_dead_slots_stays_out_of_delta_weight_and_merge(poison):
    """The dense adapter (`delta_weight`, what merge and the peft export fold in) skips the
    slots whose effective lambda is 0, as the forward does: NaN or inf there never reaches the
    merged base weight."""
    torch.manual_seed(0)
    layer = IncreLoRALinear(nn.Linear(IN, OUT), r_max=R_MAX, init_r=3, reserve_rank=2,
                            lora_alpha=6.0, reserve_lambda=0.3)
    with torch.no_grad():
        layer.lora_A.normal_(std=0.4)
        layer.lora_B.normal_(std=0.4)
        layer.lora_lambda.normal_(0.5, 1.0)
    dead = layer.effective_lambda().detach() == 0
    assert dead.any()
    want = layer.delta_weight()
    x = torch.randn(4, IN)
    with torch.no_grad():
        y_want = layer(x)
        layer.lora_A[dead] = poison
        layer.lora_B[:, dead] = poison
    got = layer.delta_weight()
    assert torch.isfinite(got).all() and torch.equal(got, want)
    layer.merge()
    with torch.no_grad():
        y_merged = layer(x)
    assert torch.isfinite(layer.base_layer.weight).all()
    torch.testing.assert_close(y_merged, y_want, rtol=1e-5, atol=1e-5)
