"""GPU time of the adapter's pass over dy against the frozen layer's cuBLAS ``dx = dy W``.

Issue 27 asks that the adapter's part of a layer's backward (today `_backward_rows_kernel` and
`_finish_kernel`: T = dy B, the adapter's dx, the partials of dA, dB and dlambda and their sum)
cost at most 1.5x the cuBLAS GEMM ``dy W`` of the same layer. The layer's whole backward
(cuBLAS ``dy W``, then the adapter's pass adding into that dx in place, as a layer call runs it;
tracking off, every slot active) and the GEMM alone are timed as GPU time, without the host:
each is captured once in a CUDA graph (after eager warm-up calls, which compile and load the
kernels) and the graph is replayed ``repeats`` times between two CUDA events. The adapter's
pass is the difference.

Issue 27 lets speed decide between designs, so the same record also times the other design:
the adapter's backward as cuBLAS skinny GEMMs and aten elementwise ops (`kernels.gemm_backward`,
the library's own path from `linear.GEMM_BACKWARD_ROWS` rows on, here forced by a copy of the
layer's plan; dy read twice) after the same cuBLAS ``dy W`` (the ``aten_*`` fields); and our
kernels with up to
four programs per SM instead of one (``ours_4x_ms``: four times the warps in flight to hide
the latency of the sweep over dy's columns, at four times the partials of dB; at 16,384 tokens
one row block per program, so the partials are written once, never read back and rewritten).

The same record times the exact importance score as a tracked step's backward pays it
(``score_ms``: the layer's backward with the score less the one without), against cuBLAS's GEMM
``dy^T x`` (``gemm_dw_ms``: the dense weight gradient, the FLOPs the score cannot avoid) and
against the torch path's score in cuBLAS chunks (`reference.delta_w_score_chunked`,
``score_chunked_ms``), the design the fused kernel would be swapped for if it were faster.

Off CUDA (the Triton interpreter) each is called once and timed on the host: the record shows
the path runs, its times say nothing about speed.
"""
from __future__ import annotations

import time
from typing import Callable, Dict

import torch

from ...kernels.reference import ACTIVE, delta_w_score_chunked, effective_lambda
from ...training.cuda_graphs import CUDAStepGraph, on_side_stream
from .plans import DTYPES

LEVEL = "dy_pass"
INTERPRETER_NOTE = "Triton interpreter on CPU: shows the path runs, its times mean nothing"


def _gpu_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """GPU ms per call of ``fn`` (mean over ``repeats``): captured in a CUDA graph, replayed
    ``repeats`` times between two events."""
    with on_side_stream():  # compiles and loads the kernels before the capture
        for _ in range(warmup):
            fn()
    graph = CUDAStepGraph()  # a failed capture leaves the process on its own stream
    with graph.capture():
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _host_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure_dy_pass(in_features: int, out_features: int, tokens: int, r_max: int, dtype: str,
                    device: torch.device, env: Dict, repeats: int = 50,
                    warmup: int = 3) -> dict:
    """One record: GPU ms per call of the layer's backward on the row and finish kernels
    (``backward_ms``), of cuBLAS ``dy W`` alone (``cublas_ms``) and of the adapter's pass over
    dy (``ours_ms``, their difference), with ``x_cublas`` = ours_ms / cublas_ms; the same for
    the GEMM design (``aten_backward_ms``, ``aten_ms``, ``x_cublas_aten``), each forced; which
    of the two the library takes at this many rows (``design``: "kernels" or "gemm",
    `linear.GEMM_BACKWARD_ROWS`); and the exact score's share of a
    tracked backward (``score_ms``) and the chunked cuBLAS score (``score_chunked_ms``), each
    over cuBLAS ``dy^T x`` (``gemm_dw_ms``: ``x_gemm_score``, ``x_gemm_chunked``)."""
    import copy

    from ...kernels.linear import _plan, adapted_linear_backward, adapted_linear_forward

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: use one of {list(DTYPES)}")
    dt = DTYPES[dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, dtype=dt):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rand(tokens, in_features)
    dy = rand(tokens, out_features, scale=1.0 / tokens)
    weight = rand(out_features, in_features, scale=in_features ** -0.5)
    lora_A = rand(r_max, in_features, scale=in_features ** -0.5, dtype=torch.float32)
    lora_B = rand(out_features, r_max, scale=0.1, dtype=torch.float32)
    lam = rand(r_max, dtype=torch.float32)
    state = torch.full((r_max,), ACTIVE, dtype=torch.int8, device=device)
    alpha, reserve = float(r_max), 0.0
    _, h = adapted_linear_forward(x, None, weight, None, False, lora_A, lora_B, lam, state,
                                  alpha, reserve, dt, need_all=True, fused_gemm=False)

    score = torch.zeros((), dtype=torch.float32, device=device)
    lam_eff = effective_lambda(lam, state, alpha, reserve)

    plan = _plan(x, None, weight, None, False, lora_A, lora_B, lam, state, None, dt)
    # each design forced, whichever `linear.GEMM_BACKWARD_ROWS` makes the library's at M rows
    # (`adapted_linear_backward`'s test, written out there: a call is host time every backward)
    design = "gemm" if plan.gemm_rows is not None and tokens >= plan.gemm_rows else "kernels"
    kernels, four_per_sm, gemms = copy.copy(plan), copy.copy(plan), copy.copy(plan)
    kernels.gemm_rows = four_per_sm.gemm_rows = None
    four_per_sm.row_programs *= 4  # `linear.ROW_PROGRAMS_PER_SM` at 4 (for the default 1)
    gemms.gemm_rows = 0

    def backward(score_out=None, plan=kernels):
        return adapted_linear_backward(dy, x, None, weight, False, lora_A, lora_B, lam, state,
                                       alpha, reserve, h, score_out, None, need_x=True,
                                       need_xa=False, need_a=True, need_b=True, need_lam=True,
                                       plan=plan)

    def backward_4x():
        return backward(plan=four_per_sm)

    def aten_backward():
        return backward(plan=gemms)

    def backward_score():
        return backward(score)

    def gemm_dw():
        return torch.mm(dy.t(), x)

    def score_chunked():
        delta_w_score_chunked(dy, x, lora_A, lora_B, lam_eff, score)

    def cublas():
        return torch.mm(dy, weight)

    on_gpu = device.type == "cuda"
    timed = {name: (_gpu_ms(fn, repeats, warmup) if on_gpu else _host_ms(fn))
             for name, fn in (("backward", backward), ("cublas", cublas),
                              ("aten", aten_backward), ("backward_4x", backward_4x),
                              ("backward_score", backward_score),
                              ("gemm_dw", gemm_dw), ("score_chunked", score_chunked))}
    backward_ms, cublas_ms, aten_backward_ms = timed["backward"], timed["cublas"], timed["aten"]
    ours_ms, aten_ms = backward_ms - cublas_ms, aten_backward_ms - cublas_ms
    ours_4x_ms = timed["backward_4x"] - cublas_ms
    score_ms, gemm_dw_ms = timed["backward_score"] - backward_ms, timed["gemm_dw"]
    return dict(env, level=LEVEL, method="increlora-triton", shape=f"{in_features}x{out_features}",
                tokens=tokens, r_max=r_max, dtype=dtype, phase="bwd", status="ok", design=design,
                median_ms=ours_ms, ours_ms=ours_ms, cublas_ms=cublas_ms, backward_ms=backward_ms,
                x_cublas=ours_ms / cublas_ms if cublas_ms else None,
                aten_backward_ms=aten_backward_ms, aten_ms=aten_ms,
                x_cublas_aten=aten_ms / cublas_ms if cublas_ms else None,
                ours_4x_ms=ours_4x_ms, x_cublas_4x=ours_4x_ms / cublas_ms if cublas_ms else None,
                backward_score_ms=timed["backward_score"], score_ms=score_ms,
                gemm_dw_ms=gemm_dw_ms, score_chunked_ms=timed["score_chunked"],
                x_gemm_score=score_ms / gemm_dw_ms if gemm_dw_ms else None,
                x_gemm_chunked=timed["score_chunked"] / gemm_dw_ms if gemm_dw_ms else None,
                peak_mem_mb=None,
                repeats=repeats if on_gpu else 1,
                timing="CUDA graph replay between events (GPU time)" if on_gpu else "host",
                note="" if on_gpu else INTERPRETER_NOTE)
