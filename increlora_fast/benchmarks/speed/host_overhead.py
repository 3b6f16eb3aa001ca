"""Host overhead per layer call, measured without a GPU: the Triton launches are stubbed.

What a fwd+bwd call of one adapted linear costs the host (Python, autograd, torch dispatch, our
argument checks and buffer allocation) when no kernel runs: ``y = layer(x); y.sum().backward()``
on CPU tensors, timed with ``time.perf_counter`` (median of interleaved calls, one torch thread),
for ``IncreLoRALinear`` on the Triton path (tracking off and on) with every
`increlora_fast.kernels.utils.launch` replaced by a stub that only counts the launch, peft LoRA
at r = r_max, the plain ``nn.Linear`` (``floor``), and ``aten-compute``: the matmuls the frozen
linear runs (``addmm`` forward, ``mm`` for dx) called directly, the CPU compute every row
contains and the reader can subtract.

Triton's own launcher (binding the arguments, the per-launch call into the driver) is not
included: it is what the stub replaces. ``launches_per_call`` says how many such launches a GPU
call would add. The outputs of the stubbed calls are garbage (uninitialised buffers); only the
host time means anything.

The Triton path runs on CPU only under the Triton interpreter, which must be switched on before
``increlora_fast.kernels`` is imported, so `measure` runs the measurement in a fresh Python
process (``python -m increlora_fast.benchmarks.speed.host_overhead --json PATH``) with
``TRITON_INTERPRET=1``, ``INCRELORA_BACKEND=triton`` and ``INCRELORA_KERNEL_CHECK=0``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

LEVEL = "host"
OURS = ("increlora-triton", "increlora-triton+score")
METHODS = ("aten-compute", "floor", "peft-lora") + OURS
STUBBED_NOTE = "Triton launches stubbed (counted, not run): host time only"
SUBPROCESS_ENV = {"TRITON_INTERPRET": "1", "INCRELORA_BACKEND": "triton",
                  "INCRELORA_KERNEL_CHECK": "0", "INCRELORA_FUSED_LINEAR": "0"}


@dataclass(frozen=True)
class HostPlan:
    """One point: a linear ``in_features`` -> ``out_features`` on ``tokens`` rows, adapters of
    ``r_max`` slots (all active), ``warmup`` untimed and ``repeats`` timed calls per method."""

    in_features: int = 768
    out_features: int = 3072
    tokens: int = 16
    r_max: int = 16
    warmup: int = 20
    repeats: int = 200

    def validate(self) -> None:
        """Raise ValueError naming the option that is out of range."""
        for name in ("in_features", "out_features", "tokens", "r_max", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"host overhead: {name}={getattr(self, name)} must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"host overhead: warmup={self.warmup} must be >= 0")
        if self.r_max > 128:
            raise ValueError(f"host overhead: r_max={self.r_max} is above the kernels' 128")


# ------------------------------------------------------------------ the stub
@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Within the block every kernel launch of the package is counted but not run:
    `kernels.utils.launch`, the one launch function every kernel module calls through the
    module, is replaced, and restored afterwards. The stub does what `launch` does before the
    kernel call (the empty-grid test, the name lookup and count, the device test), so only
    Triton's own launcher is left out."""
    from ...kernels import utils
    from ...kernels.launches import count_launch

    real, names = utils.launch, utils._NAMES

    def stub(kernel, grid, *args, **kwargs) -> None:
        if not callable(grid) and min(grid) <= 0:
            return
        entry = names.get(id(kernel))
        count_launch(entry[1] if entry is not None else utils.cached_kernel_name(kernel))
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if first is not None and first.is_cuda:
            raise RuntimeError("host overhead: the launch stub runs on CPU tensors only")

    utils.launch = stub
    try:
        yield
    finally:
        utils.launch = real


def require_launches(method: str, launches: Dict[str, int]) -> None:
    """RuntimeError when ``method``, a Triton method, launched no kernel in the counted call:
    it took the torch path, so its time is not the Triton path's."""
    if not sum(launches.values()):
        raise RuntimeError(f"host overhead: {method} launched no Triton kernel in the counted "
                           "call: it took the torch path, so its time would not be its own")


# ------------------------------------------------------------------ the methods
def _call_factory(plan: HostPlan, method: str) -> Callable[[], None]:
    """A function running one fwd+bwd call of ``method`` with fresh gradients."""
    from .layer_methods import LAYER_METHODS

    device, dtype = torch.device("cpu"), torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(plan.tokens, plan.in_features, generator=gen).requires_grad_(True)
    if method == "aten-compute":
        case = LAYER_METHODS["floor"].build(plan.in_features, plan.out_features, plan.r_max,
                                            dtype, device)
        w, b = case.module.weight.detach(), case.module.bias.detach()
        xd, dy = x.detach(), torch.ones(plan.tokens, plan.out_features)

        def compute() -> None:
            torch.addmm(b, xd, w.t())
            torch.mm(dy, w)
        return compute
    case = LAYER_METHODS[method].build(plan.in_features, plan.out_features, plan.r_max, dtype,
                                       device)
    os.environ.update(case.env)  # ours: the Triton path, unfused, as SUBPROCESS_ENV has it
    module = case.module.train()
    params = [p for p in module.parameters() if p.requires_grad]

    def call() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        module(x).sum().backward()
    return call


def python_calls(call: Callable[[], None]) -> int:
    """Python function calls (profiler ``call`` events) made by one ``call()``."""
    count = 0

    def profile(frame, event, arg) -> None:
        nonlocal count
        if event == "call":
            count += 1
    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return max(count - 1, 0)  # the call itself


def measure_in_process(plan: HostPlan) -> List[dict]:
    """The records of every method at ``plan``, measured in this process (the interpreter and
    the environment of `SUBPROCESS_ENV` must already be in place; see `measure`)."""
    from ...kernels import launch_counts, reset_launch_counts
    from ...kernels.utils import interpreter_active
    from ..records import environment

    plan.validate()
    if not interpreter_active():
        raise RuntimeError("host overhead: the Triton interpreter is off (TRITON_INTERPRET=1 "
                           "must be set before increlora_fast.kernels is imported); use "
                           "measure(), which starts a process with it")
    torch.set_num_threads(1)
    env = environment(torch.device("cpu"), "host-overhead")
    env.update(python=platform.python_version(), cpu_count=os.cpu_count(),
               load_start=os.getloadavg()[0])
    calls = {m: _call_factory(plan, m) for m in METHODS}
    times: Dict[str, List[float]] = {m: [] for m in METHODS}
    launches: Dict[str, Dict[str, int]] = {}
    py_calls: Dict[str, int] = {}
    with stubbed_launches():
        for method, call in calls.items():
            for _ in range(plan.warmup):
                call()
            reset_launch_counts()
            call()
            launches[method] = launch_counts()
            if method in OURS:
                require_launches(method, launches[method])
            py_calls[method] = python_calls(call)
        for _ in range(plan.repeats):  # interleaved: drift hits every method alike
            for method, call in calls.items():
                start = time.perf_counter()
                call()
                times[method].append(time.perf_counter() - start)
    load_end = os.getloadavg()[0]
    records = []
    for method in METHODS:
        median_s = statistics.median(times[method])
        records.append(dict(
            env, level=LEVEL, method=method, shape=f"{plan.in_features}x{plan.out_features}",
            tokens=plan.tokens, r_max=None if method in ("aten-compute", "floor") else plan.r_max,
            dtype="fp32", phase="fwd+bwd", status="ok", median_ms=median_s * 1e3,
            median_us=median_s * 1e6, mean_ms=statistics.fmean(times[method]) * 1e3,
            repeats=plan.repeats, warmup=plan.warmup, peak_mem_mb=None, mem_kind=None,
            launches_per_call=sum(launches[method].values()), launches=launches[method],
            python_calls_per_call=py_calls[method], load_end=load_end,
            note=STUBBED_NOTE if method in OURS else ""))
    return records


def measure(plan: HostPlan, timeout_s: Optional[float] = None) -> List[dict]:
    """Run `measure_in_process` in a fresh Python process with the interpreter switched on and
    the layer forced onto the Triton path; its records."""
    plan.validate()
    with tempfile.TemporaryDirectory(prefix="increlora-host-") as tmp:
        out = os.path.join(tmp, "host.json")
        cmd = [sys.executable, "-m", __name__, "--json", out,
               "--in-features", str(plan.in_features), "--out-features", str(plan.out_features),
               "--tokens", str(plan.tokens), "--r-max", str(plan.r_max),
               "--warmup", str(plan.warmup), "--repeats", str(plan.repeats)]
        # The child imports this same checkout (the folder above increlora_fast/), wherever
        # the command was started from.
        root = str(Path(__file__).resolve().parents[3])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=path, **SUBPROCESS_ENV),
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"host overhead: the measuring process failed "
                               f"(exit {done.returncode}): {tail[0]}")
        with open(out) as f:
            return json.load(f)


DEVICE_NOTE = ("on the device: host time to issue one call (until it returns, the device "
               "synchronized before each call, not after), kernels run")


def measure_on_device(plan: HostPlan, methods: Sequence[str], device: torch.device,
                      env: Dict[str, object]) -> List[dict]:
    """On a GPU: per layer method (bf16), the Triton launches of one fwd+bwd call and the host
    time to issue one (`DEVICE_NOTE`), median over ``plan.repeats`` interleaved calls."""
    from ...kernels import launch_counts, reset_launch_counts
    from .layer_level import build_cases
    from .layer_methods import LAYER_METHODS, MethodEnv
    from ...training.device import wait_for_device

    plan.validate()

    times: Dict[str, List[float]] = {m: [] for m in methods}
    launches: Dict[str, Dict[str, int]] = {}
    with MethodEnv({}):
        cases = build_cases(list(methods), plan.in_features, plan.out_features, plan.tokens,
                            plan.r_max, "bf16", "fwd+bwd", device)
        for method, (run, setup) in cases.items():
            for _ in range(plan.warmup):
                setup()
                run()
            setup()
            wait_for_device(device)
            reset_launch_counts()
            run()
            launches[method] = launch_counts()
            if LAYER_METHODS[method].needs_triton:
                require_launches(method, launches[method])
        for _ in range(plan.repeats):  # interleaved: drift hits every method alike
            for method, (run, setup) in cases.items():
                setup()
                wait_for_device(device)
                start = time.perf_counter()
                run()
                times[method].append(time.perf_counter() - start)
        wait_for_device(device)
    records = []
    for method in methods:
        median_s = statistics.median(times[method])
        records.append(dict(
            env, level=LEVEL, method=method, shape=f"{plan.in_features}x{plan.out_features}",
            tokens=plan.tokens, r_max=None if method == "floor" else plan.r_max, dtype="bf16",
            phase="fwd+bwd", status="ok", median_ms=median_s * 1e3, median_us=median_s * 1e6,
            mean_ms=statistics.fmean(times[method]) * 1e3, repeats=plan.repeats,
            warmup=plan.warmup, peak_mem_mb=None, mem_kind=None,
            launches_per_call=sum(launches[method].values()), launches=launches[method],
            note=DEVICE_NOTE))
    return records


# ------------------------------------------------------------------ the table
COLUMNS = ("shape", "tokens", "r_max", "method", "median_us", "minus_compute_us", "x_floor",
           "x_peft_lora", "launches_per_call", "python_calls_per_call")


def host_rows(records: Sequence[dict]) -> List[dict]:
    """The host-overhead records of one run with ``minus_compute_us`` (the median less the
    ``aten-compute`` median of the same point) and the ratios ``x_floor`` and ``x_peft_lora``,
    in `METHODS` order."""
    ok = [r for r in records if r.get("level") == LEVEL and r.get("status") == "ok"]
    by_point: Dict[tuple, Dict[str, dict]] = {}
    for r in ok:
        by_point.setdefault((r["shape"], r["tokens"]), {})[r["method"]] = r
    rows = []
    for point in sorted(by_point):
        found = by_point[point]
        ref = {m: found[m]["median_us"] for m in ("aten-compute", "floor", "peft-lora")
               if m in found}
        for method in sorted(found, key=lambda m: METHODS.index(m) if m in METHODS else 99):
            r = found[method]
            row = dict(r)
            row["minus_compute_us"] = (r["median_us"] - ref["aten-compute"]
                                       if "aten-compute" in ref else None)
            row["x_floor"] = r["median_us"] / ref["floor"] if ref.get("floor") else None
            row["x_peft_lora"] = (r["median_us"] / ref["peft-lora"]
                                  if ref.get("peft-lora") and method != "aten-compute" else None)
            rows.append(row)
    return rows


HOST_LEGEND = (
    "Host overhead per layer call, fwd+bwd (`y = layer(x); y.sum().backward()`, gradients set "
    "to None between calls), on CPU with one torch thread: median µs of interleaved calls "
    "(time.perf_counter). Ours (`increlora-triton`, `+score` = tracking on) runs its Triton "
    "path with every kernel launch stubbed (counted, not run), so its time is host work plus "
    "the torch ops it still runs (the base GEMM); Triton's own launcher cost is not included "
    "(`launches_per_call` launches would add it on a GPU). `floor` is the plain nn.Linear, "
    "`peft-lora` peft LoRA at r = r_max, `aten-compute` the base GEMMs alone (addmm forward, mm "
    "for dx), the CPU compute in every row; `minus_compute_us` is the median less it. "
    "`python_calls_per_call`: Python function calls of one call (sys.setprofile).")


# ------------------------------------------------------------------ command line
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m increlora_fast.benchmarks.speed.host_overhead --json PATH [sizes]``: measure
    in this process (run it with `SUBPROCESS_ENV` set) and write the records."""
    parser = argparse.ArgumentParser(
        prog="python -m increlora_fast.benchmarks.speed.host_overhead",
        description=__doc__.splitlines()[0])
    defaults = HostPlan()
    parser.add_argument("--json", required=True, metavar="PATH", help="records to write")
    for name in ("in_features", "out_features", "tokens", "r_max", "warmup", "repeats"):
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            default=getattr(defaults, name))
    args = parser.parse_args(argv)
    plan = HostPlan(args.in_features, args.out_features, args.tokens, args.r_max, args.warmup,
                    args.repeats)
    try:
        records = measure_in_process(plan)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with open(args.json, "w") as f:
        json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
