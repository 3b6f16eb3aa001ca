"""The fused base GEMM + adapter op against the float64 PyTorch reference.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported); on a CUDA machine the same tests run the compiled kernels on the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from increlora_fast.functional import adapter_delta_torch  # noqa: E402
from increlora_fast.kernels import launch_counts, reset_launch_counts  # noqa: E402
from increlora_fast.kernels.fused_linear import (_fused_linear_adapter_kernel,  # noqa: E402
                                                 fused_linear_adapter)
from increlora_fast.kernels.utils import is_interpreted  # noqa: E402

if DEVICE == "cpu" and not is_interpreted(_fused_linear_adapter_kernel):
    raise RuntimeError("increlora_fast.kernels was imported before TRITON_INTERPRET=1 was set")

# Largest error allowed relative to the largest magnitude of the float64 reference (worst seen
# in brackets): float64 [7e-16], float32 [2e-7], float16 [5e-4], bfloat16 [9e-3].
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# Score and triplet are float32 accumulators [9e-8].
SCORE_TOL_FLOOR = 1e-6


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    reset_launch_counts()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (got.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n,r_max,used,conv1d,with_bias,strided", [
    (1, 5, 19, 8, 3, False, True, False),
    (33, 40, 19, 16, 16, True, False, False),
    (7, 19, 5, 128, 20, False, True, True),
    (7, 19, 40, 16, 0, True, True, True),
])
def test_matches_reference(dtype, m, k, n, r_max, used, conv1d, with_bias, strided):
    if strided:
        x = torch.randn(m, 2 * k, dtype=dtype, device=DEVICE)[:, ::2]
    else:
        x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    weight = torch.randn((k, n) if conv1d else (n, k), dtype=dtype, device=DEVICE) * 0.3
    bias = torch.randn(n, dtype=dtype, device=DEVICE) if with_bias else None
    a = torch.randn(r_max, k, dtype=dtype, device=DEVICE) * 0.5
    b = torch.randn(n, r_max, dtype=dtype, device=DEVICE) * 0.5
    lam = torch.zeros(r_max, dtype=dtype, device=DEVICE)
    lam[:used] = torch.rand(used, dtype=dtype, device=DEVICE) + 0.5
    dy = torch.randn(m, n, dtype=dtype, device=DEVICE)

    leaves = [t.clone().requires_grad_() for t in (x, a, b, lam)]
    score = torch.zeros((), device=DEVICE)
    triplet = torch.zeros(3, r_max, device=DEVICE)
    y = fused_linear_adapter(leaves[0], weight, bias, *leaves[1:], score_out=score,
                             triplet_out=triplet, weight_in_out=conv1d)
    y.backward(dy)

    ref_leaves = [t.double().requires_grad_() for t in (x, a, b, lam)]
    w64 = weight.double().t() if conv1d else weight.double()
    ref_score = torch.zeros((), dtype=torch.float64, device=DEVICE)
    ref_y = ref_leaves[0] @ w64.t() + adapter_delta_torch(*ref_leaves, score_out=ref_score)
    if with_bias:
        ref_y = ref_y + bias.double()
    ref_y.backward(dy.double())
    _, ar, br, lr = ref_leaves
    ref_triplet = torch.stack([(ar * ar.grad).abs().sum(1), (br * br.grad).abs().sum(0),
                               (lr * lr.grad).abs()])

    tol = TOL[dtype]
    for name, got, ref in [("y", y.detach(), ref_y.detach())] + [
            (f"d{i}", t.grad, r.grad) for i, t, r in zip("xABl", leaves, ref_leaves)]:
        assert got.dtype == dtype, name
        assert rel_err(got, ref) <= tol, f"{name}: {rel_err(got, ref):.2e} > {tol:.0e}"
    assert rel_err(score, ref_score) <= max(tol, SCORE_TOL_FLOOR)
    assert rel_err(triplet, ref_triplet) <= max(tol, SCORE_TOL_FLOOR)
    assert torch.count_nonzero(leaves[1].grad[used:]) == 0
    assert torch.count_nonzero(leaves[2].grad[:, used:]) == 0
    counts = launch_counts()
    assert counts.get("_fused_linear_adapter_kernel") == 1, counts
    assert counts.get("_expand_kernel") == 1, counts  # the adapter's dx, added onto cuBLAS dx


def test_rejects_trainable_base_and_bad_weight_shape():
    x = torch.randn(3, 5, device=DEVICE)
    a, b, lam = (torch.randn(8, 5, device=DEVICE), torch.randn(4, 8, device=DEVICE),
                 torch.randn(8, device=DEVICE))
    with pytest.raises(ValueError, match="weight must have shape \\(4, 5\\)"):
        fused_linear_adapter(x, torch.randn(5, 4, device=DEVICE), None, a, b, lam)
    with pytest.raises(ValueError, match="must be frozen"):
        fused_linear_adapter(x, torch.randn(4, 5, device=DEVICE, requires_grad=True), None,
                             a, b, lam)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear_adapter(x, torch.randn(4, 5, device=DEVICE), torch.randn(5, device=DEVICE),
                             a, b, lam)
