"""Layer level: forward, backward and both of one adapted linear, per method, shape and dtype.

``fwd`` is a training forward (grad enabled, graph built); ``bwd`` times ``y.backward(dy)`` after
an untimed forward; ``fwd+bwd`` times both. Backward always computes the input gradient (the
layer sits inside a network) and the adapter's parameter gradients; peft AdaLoRA's importance
update runs after every backward and is timed with it. Gradients are cleared, untimed, before
every run. All methods of one point share the input and are timed interleaved
(`timing.measure_interleaved`); a row's peak memory is that of one run (setup included) above
what was allocated before it, so layer weights and the input are not in it.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Iterator, List, Tuple

import torch

from ...functional import refresh_settings
from .layer_methods import LAYER_METHODS, TORCH_PATH_NOTE, LayerCase, MethodEnv, triton_status
from .plans import DTYPES, PHASES, LayerPlan
from .timing import Measurement, measure_interleaved


def _phase_functions(case: LayerCase, x: torch.Tensor, dy: torch.Tensor, phase: str
                     ) -> Tuple[Callable[[], None], Callable[[], None]]:
    """(run, setup) of one phase of one built method."""
    params = [p for p in case.module.parameters() if p.requires_grad]
    state = {"step": 0, "y": None}

    def clear() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    def backward(y: torch.Tensor) -> None:
        y.backward(dy)
        if case.after_backward is not None:
            case.after_backward(state["step"])
        state["step"] += 1

    if phase == "fwd":
        def run() -> None:
            case.module(x)
        return run, clear
    if phase == "bwd":
        def setup() -> None:
            clear()
            state["y"] = case.module(x)

        def run() -> None:
            y, state["y"] = state["y"], None
            backward(y)
        return run, setup
    if phase == "fwd+bwd":
        def run() -> None:
            backward(case.module(x))
        return run, clear
    raise ValueError(f"phase={phase!r} is invalid: use one of {PHASES}")


def build_cases(methods: List[str], in_f: int, out_f: int, tokens: int, r_max: int, dtype: str,
                 phase: str, device: torch.device) -> Dict[str, Tuple[Callable, Callable]]:
    """(run, setup) per method, on one shared input; setup also sets the method's environment."""
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, in_f, device=device, dtype=torch_dtype, generator=gen)
    x.requires_grad_(True)
    dy = torch.randn(tokens, out_f, device=device, dtype=torch_dtype, generator=gen)
    cases = {}
    for method in methods:
        case = LAYER_METHODS[method].build(in_f, out_f, r_max, torch_dtype, device)
        run, setup = _phase_functions(case, x, dy, phase)

        def setup_in_env(env: Dict[str, str] = case.env, setup: Callable = setup) -> None:
            os.environ.update(env)
            refresh_settings()
            setup()
        cases[method] = (run, setup_in_env)
    return cases


def measure_layer(methods: List[str], in_f: int, out_f: int, tokens: int, r_max: int, dtype: str,
                  phase: str, device: torch.device, warmup: int, repeats: int
                  ) -> Dict[str, Measurement]:
    """Build every method at this point and time ``phase`` of each, interleaved."""
    unknown = [m for m in methods if m not in LAYER_METHODS]
    if unknown:
        raise ValueError(f"unknown layer methods {unknown}; known: {list(LAYER_METHODS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: use one of {list(DTYPES)}")
    if not methods:
        return {}
    cases = build_cases(methods, in_f, out_f, tokens, r_max, dtype, phase, device)
    with MethodEnv({}):
        return measure_interleaved(cases, device, warmup, repeats)


def _points(plan: LayerPlan, interpreted: bool) -> Iterator[Tuple[int, int, int, str, str, bool]]:
    """(in, out, tokens, dtype, phase, at_interpreter_point) in run order."""
    for in_f, out_f in plan.shapes:
        for tokens in plan.tokens:
            for dtype in plan.dtypes:
                for phase in plan.phases:
                    yield in_f, out_f, tokens, dtype, phase, False
    if interpreted:
        in_f, out_f, tokens = plan.interpreter_point
        yield in_f, out_f, tokens, plan.dtypes[0], "fwd+bwd", True


def run_layer_level(plan: LayerPlan, methods: List[str], device: torch.device, env: Dict,
                    log: Callable[[str], None] = print) -> List[dict]:
    """Measure every method at every point of ``plan``; returns one record per row.

    ``floor`` does not depend on r_max and is measured once per point (its ``r_max`` is None).
    On a device without CUDA, Triton methods run only at the plan's interpreter point (one
    timed run, no warmup) and are recorded as skipped elsewhere; without a Triton method in
    ``methods`` that point is not measured.
    """
    triton_ok, triton_note = triton_status(device)
    # the interpreter point is the Triton methods' one point on CPU: none, no point
    interpreted = triton_ok and device.type != "cuda" and \
        any(LAYER_METHODS[m].needs_triton for m in methods)
    i_in, i_out, i_tokens = plan.interpreter_point
    records = []
    for in_f, out_f, tokens, dtype, phase, at_interp in _points(plan, interpreted):
        for r_max in plan.r_max:
            todo = [m for m in methods if not (m == "floor" and r_max != plan.r_max[0])]
            triton = [m for m in todo if LAYER_METHODS[m].needs_triton]
            # one interleaved set per point; under the interpreter the Triton methods run apart
            together = todo if triton_ok and not interpreted else \
                [m for m in todo if m not in triton]
            results = measure_layer(together, in_f, out_f, tokens, r_max, dtype, phase, device,
                                    plan.warmup, plan.repeats)
            if interpreted and at_interp:
                results.update(measure_layer(triton, in_f, out_f, tokens, r_max, dtype, phase,
                                             device, 0, 1))
            for method in todo:
                rec = dict(env, level="layer", method=method, shape=f"{in_f}x{out_f}",
                           tokens=tokens, r_max=None if method == "floor" else r_max,
                           dtype=dtype, phase=phase, status="ok", note="", median_ms=None,
                           mean_ms=None, peak_mem_mb=None, mem_kind=None, repeats=0,
                           interpreter_point=at_interp)
                m = results.get(method)
                if m is None:
                    rec["status"] = "skipped"
                    rec["note"] = triton_note if not triton_ok else (
                        f"skipped: needs CUDA; the Triton interpreter runs only at "
                        f"{i_in}x{i_out}, {i_tokens} tokens")
                else:
                    rec.update(median_ms=m.median_ms, mean_ms=m.mean_ms, repeats=len(m.times_ms),
                               peak_mem_mb=m.peak_mem_mb, mem_kind=m.mem_kind,
                               note=triton_note if method in triton else "")
                    if method in triton and not m.triton_launches:
                        rec.update(status="failed",
                                   note=f"launched no Triton kernel in its timed runs: "
                                        f"{TORCH_PATH_NOTE}")
                    log(f"layer {rec['shape']:>10s} tokens={tokens:<6d} r={r_max:<3d} {dtype} "
                        f"{phase:8s} {method:30s} {m.median_ms:10.3f} ms "
                        f"{m.peak_mem_mb:9.1f} MiB")
                records.append(rec)
    return records
