"""Layer level under pytest-benchmark: fwd+bwd of every layer method at one point per device."""
from __future__ import annotations

import pytest
import torch

from increlora_fast.benchmarks.speed.layer_level import build_cases
from increlora_fast.benchmarks.speed.layer_methods import LAYER_METHODS, MethodEnv
from increlora_fast.benchmarks.speed.timing import PeakMemory

from conftest import DEVICE, synchronize

# (in, out, tokens, r_max, dtype): the GPU target point, or a CPU-sized one.
POINT = (768, 3072, 16384, 16, "bf16") if DEVICE.type == "cuda" else (768, 3072, 512, 16, "fp32")
PHASES = ("fwd", "bwd", "fwd+bwd")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("method", list(LAYER_METHODS))
def test_layer(benchmark, method: str, phase: str) -> None:
    if LAYER_METHODS[method].needs_triton and DEVICE.type != "cuda":
        pytest.skip("Triton methods need CUDA (interpreter timings say nothing about speed)")
    in_f, out_f, tokens, r_max, dtype = POINT
    with MethodEnv({}):
        run, setup = build_cases([method], in_f, out_f, tokens, r_max, dtype, phase,
                                  DEVICE)[method]
        setup()
        run()  # compile and allocate once before anything is measured
        peak = PeakMemory(DEVICE)
        peak.start()
        setup()
        run()
        benchmark.extra_info.update(peak_mem_mb=peak.peak_mb(), mem_kind=peak.kind,
                                    shape=f"{in_f}x{out_f}", tokens=tokens, r_max=r_max,
                                    dtype=dtype, device=str(DEVICE))

        def timed() -> None:
            run()
            synchronize()
        benchmark.pedantic(timed, setup=setup, rounds=10 if DEVICE.type == "cuda" else 5,
                           warmup_rounds=1)
    assert torch.isfinite(torch.tensor(benchmark.stats.stats.median))
