"""Correctness checks of the Triton kernels on a live device, against float64 torch references:
the first-use check of one adapted-linear variant (`check_variant`, run by `functional` before a
variant is trusted), the optimizer's kernels (`check_adamw`) and the whole suite
(`run_kernel_checks`, run by ``increlora-fast gpu-check``). Needs nothing beyond torch and
triton.

Every problem is drawn from a CPU generator of its own, on the CPU named in each draw (the
default device may be another, ``torch.set_default_device``), then moved to the device checked.

Tolerances are relative to the largest magnitude of the float64 reference: float64 1e-10,
float32 1e-4 (TF32 may be on), float16 5e-3, bfloat16 3e-2 (operands rounded to 8 bits; the
interpreter truncates where GPUs round); the exact score has its own (`SCORE_TOL`).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .reference import (adapted_linear_torch, dtype_name, lambda_dtype, masked_adamw_float64,
                        orth_penalty_float64)
from . import launches

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
NAMES = ("y", "dx", "dA", "dB", "dlambda", "score")
# The exact score's tolerance, per compute dtype (relative). For 16-bit activations no input
# rounding enters it: the score kernel's G = dy^T x reads the same 16-bit dy and x the float64
# reference reads, each product of two 16-bit values (significands of 8 or 11 bits) is exact in
# float32 (24), and dW is built from float32 A, B and lam_eff split into bfloat16 parts to
# float32's precision (`score._split3`). What is left is float32 accumulation (u = 2^-24, about
# 6e-8) over the M rows of G, the r_max slots of dW, a tile and its partials: rounded to
# nearest, these grow like u sqrt(M / 2) per G entry, 8e-6 at gpu-check's 32,768 rows, and the
# score averages them over out x in entries of random sign (measured under the interpreter at
# M = 37, r_max 16 and 128: at most 1.5e-7; an independent check on the H200, 2026-12-04, 4e-6
# at up to 4,097 rows). Hence 1e-4, ten times the per-entry bound at 32,768 rows, so that a GPU
# that accumulates in another order never fails a correct kernel (a failed first-use check
# sends every call of that variant to the torch path): a score 0.05 % off, or one slot left out
# of dW, still fails. Float32 activations may have dy and x rounded to TF32 (u = 2^-11) as
# every float32 GEMM then: `TOL`'s 1e-4. Float64 computes in float64, but the check's score
# accumulator is float32 for every dtype (as a layer's is, but for float64 layers): at most two
# roundings to float32 (the total, the add) of 2^-24 each, 2e-7.
SCORE_TOL = {torch.float64: 2e-7, torch.float32: 1e-4, torch.float16: 1e-4,
             torch.bfloat16: 1e-4}


@contextlib.contextmanager
def _uncounted():
    """Launches made by a check do not show in `launch_counts`."""
    saved = launches.launch_counts()
    try:
        yield
    finally:
        launches.reset_launch_counts()
        for name, n in saved.items():
            launches._LAUNCHES[name] = n


def _problem(device: torch.device, m: int, k: int, n: int, r_max: int, dtype: torch.dtype,
             adapter_dtype: torch.dtype, weight_dtype: Optional[torch.dtype],
             weight_in_out: bool, has_bias: bool, gen: torch.Generator) -> dict:
    def rand(*shape, dt=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cpu") * scale).to(device, dt)

    used = max(1, (3 * r_max) // 4 - 1)
    state = torch.zeros(r_max, dtype=torch.int8, device="cpu")
    state[:used - 1] = 2
    state[used - 1] = 1
    lam = torch.randn(r_max, generator=gen, device="cpu")
    lam[0] = 0.0  # an active slot at lambda 0 (every slot starts so)
    a = torch.randn(r_max, k, generator=gen, device="cpu") * 0.5
    b = torch.randn(n, r_max, generator=gen, device="cpu") * 0.5
    a[used:] = float("nan")  # dead slots must not poison anything
    b[:, used:] = float("inf")
    # dy as the backward of a loss averaged over the M tokens gives it: about 1/M per row. Unit
    # rows summed over M = 32,768 tokens (r_max 16) gave |dlambda| = 2.4e5, beyond float16's
    # 65,504 (the H200 run of 2026-12-04); at 1/M it is 7.2. Lambda is float32 in any case now,
    # as in IncreLoRALinear (`lambda_dtype`).
    p = dict(x=rand(m, k, dt=dtype), dy=rand(m, n, dt=dtype, scale=1.0 / m),
             A=a.to(device=device, dtype=adapter_dtype), B=b.to(device=device, dtype=adapter_dtype),
             lam=lam.to(device=device, dtype=lambda_dtype(adapter_dtype)), state=state.to(device),
             alpha=16.0, reserve=1e-5, weight_in_out=weight_in_out, W=None, bias=None)
    if weight_dtype is not None:
        shape = (k, n) if weight_in_out else (n, k)
        p["W"] = rand(*shape, dt=weight_dtype, scale=k ** -0.5)
        p["bias"] = rand(n, dt=weight_dtype) if has_bias else None
    return p


def _run(p: dict, triton_path: bool, fused: bool, dropout_mask: Optional[torch.Tensor]
         ) -> List[torch.Tensor]:
    """y, dx, dA, dB, dlambda, score of one forward+backward. The torch path runs on float64
    copies with the dead slots' A rows and B columns zeroed (they hold NaN and inf here, which
    the kernels must ignore and the dense reference would propagate)."""
    wide = not triton_path

    def cast(t):
        if t is None:
            return None
        t = t.detach()
        return torch.nan_to_num(t.double(), nan=0.0, posinf=0.0, neginf=0.0) if wide else t
    x = cast(p["x"]).requires_grad_(True)
    leaves = [cast(p[k]).requires_grad_(True) for k in ("A", "B", "lam")]
    score = torch.zeros((), dtype=torch.float64 if wide else torch.float32, device=x.device)
    xa = None
    if dropout_mask is not None:
        # The adapter's input as a layer's dropout gives it, in the compute dtype: the mask's
        # 1/keep and the product x * mask rounded to it. The float64 reference takes these very
        # values (with the gradient of x * mask): that rounding is the kernel's input, not its
        # error. Given 1/0.75 exact, the reference's score and dA were 2.0e-3 (bfloat16) and
        # 2.4e-4 (float16) off, the bias of 4/3 rounded to 8 and 11 bits.
        mask = dropout_mask.to(p["x"].dtype)
        xa = x * mask.to(x.dtype)
        if wide:
            xa = xa + ((p["x"].detach() * mask).double() - xa).detach()
    kwargs = dict(weight_in_out=p["weight_in_out"], score_out=score)
    if triton_path:
        from .linear import adapted_linear_triton
        y = adapted_linear_triton(x, cast(p["W"]), cast(p["bias"]), *leaves, p["state"],
                                  p["alpha"], p["reserve"], x_adapter=xa, fused_gemm=fused,
                                  **kwargs)
    else:
        y = adapted_linear_torch(x, cast(p["W"]), cast(p["bias"]), *leaves, p["state"],
                                 p["alpha"], p["reserve"], x_adapter=xa, **kwargs)
    y.backward(cast(p["dy"]))
    return [y.detach(), x.grad] + [t.grad for t in leaves] + [score]


def _compare(got: List[torch.Tensor], ref: List[torch.Tensor], dtype: torch.dtype,
             r_used: int) -> Tuple[float, str]:
    worst, bad = 0.0, ""
    for name, g, r in zip(NAMES, got, ref):
        if g is None or r is None:
            if (g is None) != (r is None):
                return float("inf"), f"{name}: missing"
            continue
        if not torch.isfinite(g).all():
            return float("inf"), f"{name}: non-finite values"
        scale = r.abs().max().item() or 1.0
        err = (g.double() - r).abs().max().item() / scale
        if not err <= float("inf"):  # NaN in the reference
            return float("inf"), f"{name}: the reference is not finite"
        label = name
        if name == "score":  # in units of its own tolerance, scaled to `TOL`'s
            label = (f"score (relative error {err:.2e} against its own tolerance "
                     f"{SCORE_TOL[dtype]:.0e}, scaled to the operands' below)")
            err *= TOL[dtype] / SCORE_TOL[dtype]
        if err > worst:
            worst, bad = err, label
    da, db = got[2], got[3]
    if torch.count_nonzero(da[r_used:]) or torch.count_nonzero(db[:, r_used:]):
        return float("inf"), "dead slots received a gradient"
    return worst, bad


def check_problem(device: torch.device, m: int, k: int, n: int, r_max: int, dtype: torch.dtype,
                  adapter_dtype: torch.dtype, weight_dtype: Optional[torch.dtype],
                  weight_in_out: bool = False, has_bias: bool = True, fused: bool = False,
                  dropout: bool = False, seed: int = 0) -> Dict[str, object]:
    """One forward+backward of the Triton op against float64 torch; a record for reports.
    The tolerance is `TOL` of the coarser of ``dtype`` and ``adapter_dtype``: dA, dB and
    dlambda are stored in the adapter's dtype (float32 next to float64 activations)."""
    tol_dtype = max((dtype, adapter_dtype), key=TOL.__getitem__)
    gen = torch.Generator().manual_seed(seed)
    p = _problem(device, m, k, n, r_max, dtype, adapter_dtype, weight_dtype, weight_in_out,
                 has_bias, gen)
    mask = None
    if dropout:
        mask = (torch.rand(m, k, generator=gen, device="cpu") > 0.25).to(device) / 0.75
    record: Dict[str, object] = dict(op="adapted_linear" + ("_fused" if fused else ""),
                                     dtype=dtype_name(dtype), M=m, K=k, N=n,
                                     r_max=r_max, tol=TOL[tol_dtype], ok=False, error="")
    record["in"], record["out"] = record.pop("K"), record.pop("N")

    def compare() -> Tuple[float, str]:
        with _uncounted(), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False), warnings.catch_warnings():
            # The interpreter evaluates both sides of tl.where in numpy: NaN * 0 in dead slots.
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            got = _run(p, True, fused, mask)
            ref = _run(p, False, False, mask)
        return _compare(got, ref, tol_dtype, max(1, (3 * r_max) // 4 - 1))
    return _measured(record, tol_dtype, compare)


def _measured(record: Dict[str, object], dtype: torch.dtype,
              compare: Callable[[], Tuple[float, str]]) -> Dict[str, object]:
    """``record`` completed by ``compare`` (runs a check: its worst relative error and where):
    ``max_rel_err``, ``ok`` against `TOL`, ``error`` and ``seconds``; an exception fails the
    check with its message."""
    start = time.perf_counter()
    try:
        err, where = compare()
        record["max_rel_err"] = err
        record["ok"] = err <= TOL[dtype]
        if not record["ok"]:
            record["error"] = f"{where}: relative error {err:.2e} > {TOL[dtype]:.0e}"
    except Exception as exc:  # noqa: BLE001 - a check reports every failure
        record["max_rel_err"] = float("nan")
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def check_variant(device: torch.device, dtype: torch.dtype, adapter_dtype: torch.dtype,
                  weight_dtype: Optional[torch.dtype], weight_in_out: bool, has_bias: bool,
                  fused: bool, dropout: bool, r_bucket: int) -> Tuple[bool, str]:
    """The first-use check of one variant on a small odd problem: (passed, what failed)."""
    if weight_dtype is not None and weight_dtype != dtype:
        weight_dtype = dtype  # autocast casts the base weight to the compute dtype
    rec = check_problem(device, 37, 24, 40, r_bucket, dtype, adapter_dtype, weight_dtype,
                        weight_in_out, has_bias, fused, dropout)
    return bool(rec["ok"]), str(rec["error"])


# (shape, slot dim) of the tensors `check_adamw` steps: odd shapes, a dense tensor as one slot,
# slots that straddle the GPU kernel's blocks of 1,024 elements
ADAMW_TENSORS = (((37, 24), 0), ((40, 19), 1), ((1, 333), 0), ((3, 1100), 0))
ADAMW_HYPER = (0.9, 0.999, 1e-8, 0.01)


def _adamw_state(device: torch.device, dtype: torch.dtype, moment_dtype: torch.dtype,
                 gen: torch.Generator) -> list:
    """Per tensor of `ADAMW_TENSORS`: [param, exp_avg, exp_avg_sq, mask, lr, count, slot_dim].
    Where there are more than two slots, slot 1 trains with a count that stays below 1 over
    both steps (it must not change) and, with more than three, slot 2 with one that reaches 0
    then 1 (a slot changed at the first step, its first real step at the second)."""
    state = []
    for shape, slot_dim in ADAMW_TENSORS:
        r = shape[slot_dim]
        mask = torch.rand(r, generator=gen, device="cpu") > 0.3
        mask[0], mask[-1] = True, r == 1
        count = torch.randint(1, 60, (r,), generator=gen, device="cpu").float()
        for slot, start in ((1, -2.0), (2, -1.0)):
            if r > slot + 1:
                mask[slot], count[slot] = True, start
        values = [torch.randn(shape, generator=gen, device="cpu"),
                  torch.randn(shape, generator=gen, device="cpu") * 0.1,
                  torch.rand(shape, generator=gen, device="cpu") * 0.01, mask,
                  0.01 + torch.rand(r, generator=gen, device="cpu") * 0.01, count]
        dtypes = (dtype, moment_dtype, moment_dtype, None, None, None)
        state.append([t.to(device, d) for t, d in zip(values, dtypes)] + [slot_dim])
    return state


def check_adamw(device: torch.device, dtype: torch.dtype, multi: bool, seed: int = 0,
                moment_dtype: Optional[torch.dtype] = None) -> Dict[str, object]:
    """The optimizer's masked AdamW kernel on ``dtype`` parameters and ``moment_dtype`` moments
    (default ``dtype``) against float64:
    over all tensors of `ADAMW_TENSORS` in one launch (``multi``: `adamw.MultiTensorAdamW`, an
    eager step's) or one launch per tensor (`adamw.masked_adamw_triton_`, a captured step's);
    two steps, the second with the gradients in new memory. Error relative to the largest
    magnitude of each float64 result, within `TOL` of ``dtype`` (of float32 for float64
    parameters: the step computes in float32 whatever the dtype); masked-out slots, and slots
    whose step count stayed below 1, must stay bitwise unchanged."""
    tol_dtype = torch.float32 if dtype == torch.float64 else dtype
    # M: the elements stepped; in, out and r_max belong to the linear's records
    record: Dict[str, object] = dict(
        op="masked_adamw" + ("_multi" if multi else ""), dtype=dtype_name(dtype),
        M=sum(math.prod(shape) for shape, _ in ADAMW_TENSORS), r_max=None, tol=TOL[tol_dtype],
        ok=False, error="")
    record["in"] = record["out"] = None
    if moment_dtype is not None and moment_dtype != dtype:
        record["dtype"] += f"/{dtype_name(moment_dtype)} moments"
    return _measured(record, tol_dtype, lambda: _adamw_error(device, dtype,
                                                             moment_dtype or dtype, multi, seed))


def _adamw_error(device: torch.device, dtype: torch.dtype, moment_dtype: torch.dtype,
                 multi: bool, seed: int) -> Tuple[float, str]:
    """`check_adamw`'s two steps: the worst relative error and where."""
    from .adamw import MultiTensorAdamW, adamw_launch, masked_adamw_triton_

    gen = torch.Generator().manual_seed(seed)
    state = _adamw_state(device, dtype, moment_dtype, gen)
    before = [[t.clone() for t in s[:3]] for s in state]
    ref = [[t.to(torch.float64) for t in s[:3]] for s in state]
    params = [s[0].requires_grad_(True) for s in state]
    stepper = MultiTensorAdamW(params, [(s[1], s[2]) for s in state], [s[5] for s in state],
                               [adamw_launch(s[0], s[6]) for s in state])
    held = []
    with _uncounted(), torch.no_grad():
        for _ in range(2):
            held += [p.grad for p in params]  # kept: the new gradients get new memory
            for k, (p, s) in enumerate(zip(params, state)):
                p.grad = torch.randn(p.shape, generator=gen, device="cpu").to(device, dtype)
                s[5] += s[3].float()  # the step counts of the slots that train
                ref[k] = masked_adamw_float64(ref[k][0], p.grad, ref[k][1], ref[k][2], s[3],
                                              s[4], s[5], s[6], *ADAMW_HYPER)
            if multi:
                stepper.step(torch.cat([s[3] for s in state]).view(torch.uint8),
                             torch.cat([s[4] for s in state]), *ADAMW_HYPER)
            else:
                for p, s in zip(params, state):
                    masked_adamw_triton_(p, p.grad, s[1], s[2], s[3], s[4], s[5], s[6],
                                         *ADAMW_HYPER)
    results = []
    for k, s in enumerate(state):
        along = [1] * s[0].dim()
        along[s[6]] = -1
        off = ~(s[3] & (s[5] >= 1)).view(along).expand_as(s[0])
        for name, got, want, old in zip(("param", "exp_avg", "exp_avg_sq"), s[:3], ref[k],
                                        before[k]):
            if not torch.equal(got.detach()[off], old[off]):
                raise AssertionError(f"{name} {k} changed in a masked-out or uncounted slot")
            results.append((f"{name} {k}", got, want))
    return _worst_relative_error(results)


def _worst_relative_error(results: Sequence[Tuple[str, torch.Tensor, torch.Tensor]]
                          ) -> Tuple[float, str]:
    """The largest error of a result relative to the largest magnitude of its float64
    reference, over (name, result, reference), and whose it is; inf at the first result that
    is not finite (NaN or inf), whatever follows."""
    worst, where = 0.0, ""
    for name, got, want in results:
        err = (got.detach().double() - want).abs().max().item() / \
            (want.abs().max().item() or 1.0)
        if not err < float("inf"):
            return float("inf"), f"{name}: not finite"
        if err > worst:
            worst, where = err, name
    return worst, where


# (slots, in, out) of the modules `check_orth_penalty` puts in one penalty: odd sizes, a module
# of one slot, long dimensions over several of the kernels' column blocks
ORTH_SHAPES = ((5, 7, 9), (16, 33, 40), (1, 70, 19), (13, 130, 3))
ORTH_SHAPES_LARGE = ((16, 768, 3072), (37, 1000, 769), (128, 4096, 11008))


def orth_shapes_at(r_tile: int) -> Tuple[Tuple[int, int, int], ...]:
    """`ORTH_SHAPES` on the kernels' ``r_tile``-slot tile (16, 32, 64 or 128; `OrthPenalty.r`
    is the tile of the most slots): with a module of ``r_tile`` slots where 16 fall short."""
    return ORTH_SHAPES if r_tile <= 16 else ORTH_SHAPES + ((r_tile, 33, 40),)


def check_orth_penalty(device: torch.device, dtype: torch.dtype, seed: int = 0,
                       shapes: Sequence[Tuple[int, int, int]] = ORTH_SHAPES
                       ) -> Dict[str, object]:
    """The orthogonal penalty's kernels (`orth_penalty.orth_penalty_triton`, one launch forward
    and one backward over every module) on ``dtype`` slot buffers, at a penalty scale of 1e-4
    and a loss scaled by 1,024 (as the controller's weight over 500 modules and a GradScaler
    give), against float64
    (`reference.orth_penalty_float64`): the loss and the gradient of every A and B, with slots
    that do not count, reserve slots that count but do not train, and one module whose slots
    all do not count (its term and gradients are 0). Error relative to the largest magnitude of
    each float64 result."""
    record: Dict[str, object] = dict(
        op="orth_penalty", dtype=dtype_name(dtype),
        M=sum(r * (k + n) for r, k, n in shapes), r_max=max(r for r, _, _ in shapes),
        tol=TOL[dtype], ok=False, error="")
    record["in"] = record["out"] = None
    return _measured(record, dtype, lambda: _orth_penalty_error(device, dtype, seed, shapes))


def _orth_penalty_error(device: torch.device, dtype: torch.dtype, seed: int,
                        shapes: Sequence[Tuple[int, int, int]]) -> Tuple[float, str]:
    from .orth_penalty import orth_penalty_triton

    gen = torch.Generator().manual_seed(seed)
    a = [(torch.randn(r, k, generator=gen, device="cpu") / k ** 0.5).to(device, dtype)
         for r, k, _ in shapes]
    b = [(torch.randn(n, r, generator=gen, device="cpu") / n ** 0.5).to(device, dtype)
         for r, _, n in shapes]
    used = [torch.rand(r, generator=gen, device="cpu") > 0.25 for r, _, _ in shapes]
    used[0][0] = True
    used[-1][:] = False
    trains = [u & (torch.rand(u.numel(), generator=gen, device="cpu") > 0.3) for u in used]
    used, trains = ([m.to(device) for m in ms] for ms in (used, trains))
    results = []
    for kernel in (True, False):
        with _uncounted(), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            leaves = [t.detach().clone().requires_grad_(True) for t in a + b]
            fn = orth_penalty_triton if kernel else orth_penalty_float64
            # the controller's scale, its weight over twice the modules (0.1 / 1,000 here),
            # and a GradScaler's factor on the loss
            loss = fn(leaves[:len(a)], leaves[len(a):], used, trains, 1e-4)
            (loss * 1024.0).backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    names = ["loss"] + [f"d{side}{k}" for side in "AB" for k in range(len(shapes))]
    for name, got in zip(names, results[0]):
        if got is None or not torch.isfinite(got).all():
            raise AssertionError(f"{name} is missing or not finite")
    return _worst_relative_error(list(zip(names, *results)))


def run_kernel_checks(device: torch.device, quick: bool,
                      log: Optional[Callable[[str], None]] = None) -> List[Dict[str, object]]:
    """The kernel correctness suite: every variant family, fp32/bf16/fp16, odd shapes, r_max 16
    and 128, M up to 32k unless ``quick``, the optimizer's kernels (`check_adamw`), the
    orthogonal penalty's (`check_orth_penalty`, at the benchmark layers' sizes too on CUDA or
    unless ``quick``), and a tensor on a non-current device when there are two GPUs. One record per
    problem (see `check_problem`). ``log`` gets a line after each dtype (the suite takes a
    minute on a GPU, half of one on CPU under the interpreter)."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    shapes = [(37, 24, 40)] if quick else \
        [(37, 24, 40), (1000, 769, 3071), (32768, 768, 3072), (4099, 4096, 1100)]
    records = []
    for dtype in dtypes:
        for (m, k, n) in shapes:
            for r_max in (16, 128):
                for adapter in ({dtype, torch.float32} if dtype != torch.float32 else {dtype}):
                    records.append(check_problem(device, m, k, n, r_max, dtype, adapter, dtype))
        records.append(check_problem(device, 53, 40, 24, 16, dtype, torch.float32, dtype,
                                     weight_in_out=True, has_bias=True))
        records.append(check_problem(device, 53, 40, 24, 16, dtype, torch.float32, None))
        records.append(check_problem(device, 53, 40, 24, 16, dtype, torch.float32, dtype,
                                     dropout=True))
        if dtype != torch.float32:
            records.append(check_problem(device, 130, 64, 96, 16, dtype, torch.float32, dtype,
                                         fused=True))
        records += [check_adamw(device, dtype, multi) for multi in (True, False)]
        records.append(check_orth_penalty(device, dtype))
        if not quick or device.type == "cuda":  # the benchmark layers' sizes, 16 to 128 slots
            records.append(check_orth_penalty(device, dtype, shapes=ORTH_SHAPES_LARGE))
        if log is not None:
            failed = sum(1 for r in records if not r.get("ok"))
            log(f"kernels: {dtype_name(dtype)} checked, {len(records)} checks so far, "
                f"{failed} failed")
    with _deterministic():
        records.append(dict(check_problem(device, 301, 40, 72, 16, torch.bfloat16,
                                          torch.float32, torch.bfloat16),
                            op="adapted_linear_deterministic"))
    with _gemm_backward():  # the other design of the adapter's backward (`gemm_backward`)
        for dtype in dtypes:
            records.append(dict(check_problem(device, 301, 40, 72, 16, dtype, torch.float32,
                                              dtype), op="adapted_linear_gemm_backward"))
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        other = torch.device("cuda", (device.index or 0) + 1 if (device.index or 0) + 1 <
                             torch.cuda.device_count() else 0)
        with torch.cuda.device(device):
            records.append(dict(check_problem(other, 77, 40, 56, 16, torch.bfloat16,
                                              torch.float32, torch.bfloat16),
                                op="adapted_linear_other_device"))
    return records


@contextlib.contextmanager
def _gemm_backward():
    """Every layer's backward as cuBLAS GEMMs (`linear.GEMM_BACKWARD_ROWS` 0) within the block;
    the setting before, and plans made under it forgotten, after it."""
    from . import linear
    before = linear.GEMM_BACKWARD_ROWS
    linear.GEMM_BACKWARD_ROWS = 0
    linear.clear_plan_cache()
    try:
        yield
    finally:
        linear.GEMM_BACKWARD_ROWS = before
        linear.clear_plan_cache()


@contextlib.contextmanager
def _deterministic():
    """Deterministic algorithms (warn only) within the block; the caller's setting, warn_only
    included, after it."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
