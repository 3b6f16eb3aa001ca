"""The Triton low-rank adapter op against the float64 PyTorch reference.

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
from increlora_fast.kernels.lowrank import _project_kernel, lowrank_adapter  # noqa: E402
from increlora_fast.kernels.utils import is_interpreted  # noqa: E402

if DEVICE == "cpu" and not is_interpreted(_project_kernel):
    raise RuntimeError("increlora_fast.kernels was imported before TRITON_INTERPRET=1 was set")

# Largest error allowed, relative to the largest magnitude of the float64 reference (worst seen
# over these tests in brackets): float64 accumulates in float64, only the order differs [4e-16];
# float32 in float32 [2e-7]; float16 rounds operands and intermediates to 11 bits [6e-4],
# bfloat16 to 8 bits [8e-3; the Triton interpreter truncates float32 -> bfloat16, GPUs round].
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# The score and the triplet are float32 accumulators whatever the input dtype [7e-8].
SCORE_TOL_FLOOR = 1e-6
KERNELS = ("_project_kernel", "_expand_kernel", "_reduce_rows_kernel", "_delta_w_score_kernel")


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    reset_launch_counts()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (got.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def make_x(m: int, k: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """Random (m, k) input, contiguous or as a strided / transposed view."""
    if layout == "strided":
        return torch.randn(m, 2 * k + 1, dtype=dtype, device=DEVICE)[:, 1::2]
    if layout == "transposed":
        return torch.randn(k, m, dtype=dtype, device=DEVICE).t()
    return torch.randn(m, k, dtype=dtype, device=DEVICE)


def make_adapter(k: int, n: int, r_max: int, used: int, dtype: torch.dtype, zero_used=()):
    """A, B, lam with the first ``used`` slots live (lam != 0 except at ``zero_used``)."""
    a = torch.randn(r_max, k, dtype=dtype, device=DEVICE) * 0.5
    b = torch.randn(n, r_max, dtype=dtype, device=DEVICE) * 0.5
    lam = torch.zeros(r_max, dtype=dtype, device=DEVICE)
    lam[:used] = torch.randn(used, dtype=dtype, device=DEVICE)
    lam[:used][lam[:used] == 0] = 1.0
    lam[list(zero_used)] = 0.0
    return a, b, lam


def run_both(x, a, b, lam, dy, lam_grad: bool = True):
    """(triton results, float64 reference results): out, grads of x/A/B/lam, score, triplet."""
    leaves = [t.detach().clone().requires_grad_(t is not lam or lam_grad) for t in (x, a, b, lam)]
    score = torch.zeros((), dtype=torch.float32, device=DEVICE)
    triplet = torch.zeros(3, a.shape[0], dtype=torch.float32, device=DEVICE)
    out = lowrank_adapter(*leaves, score_out=score, triplet_out=triplet)
    out.backward(dy)
    got = [out.detach()] + [t.grad for t in leaves] + [score, triplet]

    ref_leaves = [t.detach().double().requires_grad_(t is not lam or lam_grad)
                  for t in (x, a, b, lam)]
    ref_score = torch.zeros((), dtype=torch.float64, device=DEVICE)
    ref_out = adapter_delta_torch(*ref_leaves, score_out=ref_score)
    ref_out.backward(dy.double())
    _, ar, br, lr = ref_leaves
    trip = torch.stack([(ar * ar.grad).abs().sum(1), (br * br.grad).abs().sum(0),
                        (lr * lr.grad).abs() if lam_grad else torch.zeros_like(lr)])
    ref = [ref_out.detach()] + [t.grad for t in ref_leaves] + [ref_score, trip]
    return got, ref


NAMES = ("out", "dx", "dA", "dB", "dlam", "score", "triplet")


def check_all(got, ref, dtype, used):
    for name, g, r in zip(NAMES, got, ref):
        if r is None:
            assert g is None, name
            continue
        assert torch.isfinite(g).all(), name
        err = rel_err(g, r)
        tol = max(TOL[dtype], SCORE_TOL_FLOOR) if name in ("score", "triplet") else TOL[dtype]
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    _, _, da, db, *_ = got
    # Slots with lam == 0 get exactly zero gradient in A and B.
    assert torch.count_nonzero(da[used:]) == 0
    assert torch.count_nonzero(db[:, used:]) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n,r_max,used,layout", [
    (1, 5, 19, 8, 3, "contiguous"),
    (7, 19, 40, 16, 11, "strided"),
    (33, 40, 5, 8, 8, "transposed"),
    (7, 5, 19, 128, 37, "contiguous"),
])
def test_matches_reference(dtype, m, k, n, r_max, used, layout):
    x = make_x(m, k, dtype, layout)
    a, b, lam = make_adapter(k, n, r_max, used, dtype)
    dy = torch.randn(m, n, dtype=dtype, device=DEVICE)
    got, ref = run_both(x, a, b, lam, dy)
    check_all(got, ref, dtype, used)
    counts = launch_counts()
    assert all(counts.get(name, 0) > 0 for name in KERNELS), counts


@pytest.mark.parametrize("used", [0, 1, 5, 16, 17, 24])
def test_active_rank_sweep(used):
    """Every active rank from none to all of r_max = 24 (two slot blocks and a partial one)."""
    dtype = torch.float32
    x = make_x(19, 40, dtype, "contiguous")
    a, b, lam = make_adapter(40, 19, 24, used, dtype)
    dy = torch.randn(19, 19, dtype=dtype, device=DEVICE)
    got, ref = run_both(x, a, b, lam, dy)
    check_all(got, ref, dtype, used)
    if used == 0:
        assert torch.count_nonzero(got[0]) == 0 and got[5].item() == 0.0
        assert torch.count_nonzero(got[4]) > 0  # lambda still gets its true gradient


def test_zero_lambda_of_used_slot_gets_its_gradient():
    """Active slots start with lambda = 0; their lambda gradient must not be skipped."""
    dtype = torch.float64
    x = make_x(33, 19, dtype, "contiguous")
    a, b, lam = make_adapter(19, 40, 16, 16, dtype, zero_used=range(16))
    lam[3] = 0.7  # one live slot in the block, fifteen at lambda = 0
    dy = torch.randn(33, 40, dtype=dtype, device=DEVICE)
    got, ref = run_both(x, a, b, lam, dy)
    err = rel_err(got[4], ref[4])
    assert err <= TOL[dtype]
    assert torch.count_nonzero(got[4]) == 16
    assert torch.count_nonzero(got[2]) == 19  # only row 3 of dA is nonzero


def test_strided_lambda():
    """lam as a stride-2 view (NaN in between): the op reads the view, not its storage."""
    dtype = torch.float64
    x = make_x(7, 19, dtype, "contiguous")
    a, b, lam = make_adapter(19, 5, 8, 6, dtype)
    storage = torch.stack([lam, torch.full_like(lam, float("nan"))], dim=1).requires_grad_()
    view = storage[:, 0]
    assert view.stride() == (2,)
    dy = torch.randn(7, 5, dtype=dtype, device=DEVICE)
    out = lowrank_adapter(x, a, b, view)
    out.backward(dy)
    lam_ref = lam.clone().requires_grad_()
    ref = adapter_delta_torch(x, a, b, lam_ref)
    ref.backward(dy)
    assert rel_err(out, ref.detach()) <= TOL[dtype]
    assert rel_err(storage.grad[:, 0], lam_ref.grad) <= TOL[dtype]
    assert torch.count_nonzero(storage.grad[:, 1]) == 0


def test_lambda_without_grad():
    """lam not requiring a gradient: slot blocks with lam == 0 are skipped in both projections."""
    dtype = torch.float32
    x = make_x(7, 40, dtype, "strided")
    a, b, lam = make_adapter(40, 19, 40, 18, dtype)
    dy = torch.randn(7, 19, dtype=dtype, device=DEVICE)
    got, ref = run_both(x, a, b, lam, dy, lam_grad=False)
    assert got[4] is None
    check_all(got, ref, dtype, 18)


def test_inactive_blocks_are_skipped_not_multiplied():
    """NaN in slots 64.. of r_max = 128 with lam == 0 there: a kernel that multiplied those
    blocks by zero would return NaN (as the dense reference does); skipping keeps everything
    exact, and lambda's gradient is NaN exactly where A and B are."""
    dtype = torch.float32
    x = make_x(33, 19, dtype, "contiguous")
    a, b, lam = make_adapter(19, 5, 128, 6, dtype)
    a_nan, b_nan = a.clone(), b.clone()
    a_nan[64:] = float("nan")
    b_nan[:, 64:] = float("nan")
    dy = torch.randn(33, 5, dtype=dtype, device=DEVICE)
    got, _ = run_both(x, a_nan, b_nan, lam, dy)
    _, ref = run_both(x, a, b, lam, dy)
    for name, g, r in zip(NAMES[:4], got[:4], ref[:4]):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) <= TOL[dtype], name
    assert rel_err(got[5], ref[5]) <= max(TOL[dtype], SCORE_TOL_FLOOR)
    assert torch.isnan(got[4][64:]).all() and rel_err(got[4][:64], ref[4][:64]) <= TOL[dtype]
    assert torch.count_nonzero(got[2][6:64]) == 0 and torch.count_nonzero(got[2][64:]) == 0


def test_score_accumulates_over_backward_passes_only():
    dtype = torch.float32
    x = make_x(7, 19, dtype, "contiguous").requires_grad_()
    a, b, lam = make_adapter(19, 40, 8, 4, dtype)
    score = torch.zeros((), device=DEVICE)
    with torch.no_grad():
        lowrank_adapter(x, a, b, lam, score_out=score)
    assert score.item() == 0.0
    dys = [torch.randn(7, 40, dtype=dtype, device=DEVICE) for _ in range(2)]
    for dy in dys:
        lowrank_adapter(x, a, b, lam, score_out=score).backward(dy)
    ref = torch.zeros((), dtype=torch.float64, device=DEVICE)
    xd = x.detach().double().requires_grad_()
    for dy in dys:
        adapter_delta_torch(xd, a.double(), b.double(), lam.double(), ref).backward(dy.double())
    assert rel_err(score, ref) <= max(TOL[dtype], SCORE_TOL_FLOOR)
    assert launch_counts()["_delta_w_score_kernel"] == 2


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast case")
def test_autocast_computes_in_autocast_dtype():
    x = make_x(7, 19, torch.float32, "contiguous")
    a, b, lam = make_adapter(19, 5, 8, 5, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lowrank_adapter(x, a, b, lam)
    assert out.dtype == torch.bfloat16
    ref = adapter_delta_torch(x.double(), a.double(), b.double(), lam.double())
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(3, 4, 5)), "x must be 2-D"),
    (dict(lora_A=torch.randn(8, 6)), "shapes do not chain"),
    (dict(lam=torch.randn(7)), "shapes do not chain"),
    (dict(score_out=torch.zeros(1)), "score_out must be a 0-d"),
    (dict(triplet_out=torch.zeros(3, 7)), "triplet_out must be a contiguous \\(3, 8\\)"),
    (dict(triplet_out=torch.zeros(8, 3).t()), "triplet_out must be a contiguous"),
    (dict(x=torch.randn(3, 5, dtype=torch.float64).to(torch.int32)), "x has dtype"),
])
def test_rejects_bad_arguments(bad, match):
    args = dict(x=torch.randn(3, 5), lora_A=torch.randn(8, 5), lora_B=torch.randn(4, 8),
                lam=torch.randn(8), score_out=None, triplet_out=None)
    args.update({k: v.to(DEVICE) for k, v in bad.items()})
    args = {k: (v.to(DEVICE) if v is not None else None) for k, v in args.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        lowrank_adapter(**args)
