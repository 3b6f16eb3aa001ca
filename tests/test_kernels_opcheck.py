"""``torch.library.opcheck`` of the custom ops ``increlora::adapted_linear_fwd`` / ``_bwd``
that torch.compile sees (`kernels.linear`): schema (declared mutations, no aliasing), fake
implementations against the real outputs (shapes, dtypes, strides), autograd registration and
their use by AOTAutograd. A fake output that differs from the real one makes compiled graphs fail or
compute on wrong strides.

On CPU the kernels run under the Triton interpreter (conftest), on CUDA compiled.
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch

pytestmark = pytest.mark.usefixtures("kernel_device")

ALPHA, RESERVE = 2.0, 0.5
# Runs the op on real and fake tensors, checks its autograd registration, and runs it under
# AOTAutograd (through its backward where an input requires grad).
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _operands(m: int, k: int, n: int, r: int, dtype: torch.dtype, *, bias: bool = True,
              slots: bool = True, dropout: bool = False, weight_in_out: bool = False,
              weight: bool = True, adapter_dtype: Optional[torch.dtype] = None) -> dict:
    dev, adapter_dtype = _device(), adapter_dtype or dtype
    return dict(
        x=torch.randn(m, k, dtype=dtype, device=dev),
        x_adapter=torch.randn(m, k, dtype=dtype, device=dev) if dropout else None,
        weight=None if not weight else torch.randn(*((k, n) if weight_in_out else (n, k)),
                                                   dtype=dtype, device=dev),
        bias=torch.randn(n, dtype=dtype, device=dev) if bias and weight else None,
        weight_in_out=weight_in_out,
        lora_A=torch.randn(r, k, dtype=adapter_dtype, device=dev),
        lora_B=torch.randn(n, r, dtype=adapter_dtype, device=dev),
        lora_lambda=torch.randn(r, dtype=adapter_dtype, device=dev),
        slot_state=torch.tensor([2, 1, 0, 2] * (r // 4), dtype=torch.int8, device=dev)
        if slots else None)


def _opcheck(ops: dict, dtype: torch.dtype, *, need=(True,) * 5, score: bool = False,
             grad: bool = False, fused: bool = False) -> None:
    """opcheck of the forward op on ``ops``, then of the backward op on its outputs."""
    from increlora_fast.kernels.linear import _bwd_op, _fwd_op
    o = ops
    fwd = (o["x"], o["x_adapter"], o["weight"], o["bias"], o["weight_in_out"], o["lora_A"],
           o["lora_B"], o["lora_lambda"], o["slot_state"], ALPHA, RESERVE, dtype, need[4], fused)
    torch.library.opcheck(_fwd_op, fwd, test_utils=OPCHECK_TESTS)
    _, h = _fwd_op(*fwd)
    m, n, k = o["x"].shape[0], o["lora_B"].shape[0], o["x"].shape[1]
    dev = o["x"].device
    bwd = (torch.randn(m, n, dtype=dtype, device=dev), o["x"], o["x_adapter"], o["weight"],
           o["weight_in_out"], o["lora_A"], o["lora_B"], o["lora_lambda"], o["slot_state"],
           ALPHA, RESERVE, h, torch.zeros((), device=dev) if score else None,
           torch.zeros(n, k, device=dev) if grad else None, *need)
    torch.library.opcheck(_bwd_op, bwd, test_utils=OPCHECK_TESTS)


def test_adapter_input_without_base_weight():
    """Without a base weight, y reads x only through the adapter input (dropout(x)): the
    backward has no dx of x itself, and its fake says so too. Compiled, the gradient of x
    (through the dropout) equals eager's; it failed with a size mismatch when the fake promised
    an (M, in) dx the kernels never write."""
    from increlora_fast.kernels.linear import adapted_linear_triton
    _opcheck(_operands(5, 24, 40, 4, torch.float32, dropout=True, weight=False), torch.float32)

    dev = _device()
    lora_A = torch.randn(4, 24, device=dev, requires_grad=True)
    lora_B = torch.randn(40, 4, device=dev, requires_grad=True)
    lam = torch.randn(4, device=dev, requires_grad=True)
    state = torch.tensor([2, 1, 0, 2], dtype=torch.int8, device=dev)

    def adapter(x):
        return adapted_linear_triton(x, None, None, lora_A, lora_B, lam, state, ALPHA, RESERVE,
                                     x_adapter=x * 2.0)
    x = torch.randn(5, 24, device=dev, requires_grad=True)
    adapter(x).square().sum().backward()
    eager = [t.grad.clone() for t in (x, lora_A, lora_B, lam)]
    for t in (x, lora_A, lora_B, lam):
        t.grad = None
    torch._dynamo.reset()
    torch.compile(adapter, backend="aot_eager", fullgraph=True)(x).square().sum().backward()
    torch._dynamo.reset()
    for got, want in zip((x.grad, lora_A.grad, lora_B.grad, lam.grad), eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_strided_slot_buffers_get_contiguous_gradients():
    """Slot buffers that are views with other strides (a transposed A or B, as a caller of
    `lowrank_adapter` may pass) get row-major gradients, as the fake says and the GEMM backward
    gives: the kernels allocated them like the buffer (transposed), and inductor's graph,
    built on the fake's strides, refused the op's output."""
    ops = _operands(5, 24, 40, 4, torch.float32)
    ops["lora_A"] = ops["lora_A"].t().contiguous().t()
    ops["lora_B"] = ops["lora_B"].t().contiguous().t()
    _opcheck(ops, torch.float32)


# (id, operands, opcheck options): odd row counts (1, 5, 37), in/out 24 and 40, r_max 4 and 16,
# every dtype, bias or none, slot and direct mode, dropout, Conv1D weights, the fused forward,
# float32 adapters on bfloat16 activations, score and dense-gradient accumulators, need flags.
CASES = [
    ("f32-slots-bias", dict(m=5, k=24, n=40, r=4, dtype=torch.float32), dict(score=True)),
    ("f32-direct-dropout-conv1d-m1", dict(m=1, k=40, n=24, r=16, dtype=torch.float32,
                                         bias=False, slots=False, dropout=True,
                                         weight_in_out=True), dict(grad=True)),
    ("bf16-dropout-m37", dict(m=37, k=24, n=40, r=16, dtype=torch.bfloat16, dropout=True),
     dict(score=True, grad=True)),
    ("bf16-f32-adapters", dict(m=5, k=24, n=40, r=4, dtype=torch.bfloat16,
                               adapter_dtype=torch.float32), dict(score=True)),
    ("f16-conv1d-fused", dict(m=5, k=40, n=24, r=4, dtype=torch.float16, bias=False,
                              weight_in_out=True), dict(fused=True, score=True)),
    ("f64-direct", dict(m=5, k=24, n=40, r=4, dtype=torch.float64, slots=False),
     dict(score=True, grad=True)),
    ("f32-no-base", dict(m=5, k=24, n=40, r=4, dtype=torch.float32, weight=False),
     dict(score=True)),
    ("f32-dropout-dx-dlam-only", dict(m=5, k=24, n=40, r=4, dtype=torch.float32, dropout=True),
     dict(need=(False, True, False, False, True))),
    ("f32-dx-db-only", dict(m=5, k=24, n=40, r=4, dtype=torch.float32),
     dict(need=(True, False, False, True, False), score=True)),
    ("f32-nothing-needed", dict(m=5, k=24, n=40, r=4, dtype=torch.float32),
     dict(need=(False,) * 5)),
]


@pytest.mark.parametrize("operands, options", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_opcheck(operands, options):
    dtype = operands["dtype"]
    _opcheck(_operands(**operands), dtype, **options)


def test_gemm_backward_opcheck(monkeypatch):
    """The adapter's backward as cuBLAS GEMMs and aten ops (`linear.GEMM_BACKWARD_ROWS`)."""
    from increlora_fast.kernels import linear
    monkeypatch.setattr(linear, "GEMM_BACKWARD_ROWS", 0)
    linear.clear_plan_cache()
    try:
        _opcheck(_operands(5, 24, 40, 4, torch.float32, dropout=True), torch.float32,
                 score=True, grad=True)
    finally:
        linear.clear_plan_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [False, True], ids=["x", "dropout"])
def test_forward_op_called_on_its_own_is_differentiable(dtype, dropout):
    """``torch.ops.increlora.adapted_linear_fwd`` called directly on tensors that require grad
    (not through `AdaptedLinearFunction`): opcheck runs it under AOTAutograd through its
    backward, and the gradients are those of `adapted_linear_triton`. Without an autograd
    registration the backward raised "no autograd formula was registered"."""
    from increlora_fast.kernels.linear import adapted_linear_triton
    o = _operands(37, 24, 40, 16, dtype, dropout=dropout)
    leaves = [o[k] for k in ("x", "x_adapter", "lora_A", "lora_B", "lora_lambda")
              if o[k] is not None]
    for t in leaves:
        t.requires_grad_(True)
    fwd = (o["x"], o["x_adapter"], o["weight"], o["bias"], o["weight_in_out"], o["lora_A"],
           o["lora_B"], o["lora_lambda"], o["slot_state"], ALPHA, RESERVE, dtype, True, False)
    torch.library.opcheck(torch.ops.increlora.adapted_linear_fwd, fwd, test_utils=OPCHECK_TESTS)
    dy = torch.randn(37, 40, dtype=dtype, device=o["x"].device)
    y, _ = torch.ops.increlora.adapted_linear_fwd(*fwd)
    got = torch.autograd.grad(y, leaves, dy)
    y = adapted_linear_triton(o["x"], o["weight"], o["bias"], o["lora_A"], o["lora_B"],
                              o["lora_lambda"], o["slot_state"], ALPHA, RESERVE,
                              x_adapter=o["x_adapter"])
    for g, want in zip(got, torch.autograd.grad(y, leaves, dy)):
        torch.testing.assert_close(g, want, rtol=0, atol=0)


def test_forward_op_refuses_a_lambda_gradient_it_did_not_prepare():
    """With ``need_all=False`` the forward keeps H only for slots of nonzero effective lambda,
    which leaves the lambda gradient of the others wrong: refused when lambda requires grad."""
    o = _operands(5, 24, 40, 4, torch.float32)
    o["lora_lambda"].requires_grad_(True)
    with pytest.raises(ValueError, match="need_all=False.*lora_lambda requires grad"):
        torch.ops.increlora.adapted_linear_fwd(
            o["x"], None, o["weight"], o["bias"], False, o["lora_A"], o["lora_B"],
            o["lora_lambda"], o["slot_state"], ALPHA, RESERVE, torch.float32, False, False)
