"""A layer's Triton kernels build one variant whatever the token count: the JIT specialises an
int argument on its value (== 1, divisible by 16), so a kernel taking the row count M (or an
int derived from it) as a plain argument gets a new variant, and a compile of about 0.2-0.8 s
(measured for sm_90 on CPU), whenever a batch brings a new class of M. The kernels mark those
arguments ``do_not_specialize``; this checks, with Triton's own binder for sm_90 and no GPU, that
every launch of a layer's forward and backward (with and without the score, with a separate
adapter input, in bfloat16, AMP and float32) specialises alike for token counts from 1 to
16,384, so that a run with varying batch shapes compiles each kernel once per layer shape.

The launches are recorded on meta tensors (`test_kernels_aot.record_launches` does the same for
the compile test) in a child process without ``TRITON_INTERPRET`` (the interpreter's kernels
have no binder).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TOKENS = (1, 17, 37, 48, 2048, 2055, 4225, 16384)
# (in, out, bias, Conv1D weight layout), r_max
LAYERS = (((384, 1536, True, False), 16), ((1536, 384, True, False), 16),
          ((768, 3072, True, True), 16), ((4096, 11008, False, False), 128))
DTYPES = {"bf16": ("bfloat16", "bfloat16"), "amp": ("bfloat16", "float32"),
          "fp32": ("float32", "float32")}


def variants_by_tokens() -> dict:
    """{config: {kernel: {M: specialisation key}}} for every launch of `LAYERS` x `DTYPES`,
    tracked and untracked, with and without a separate adapter input."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    from increlora_fast.kernels import linear
    from increlora_fast.kernels import utils as kutils
    from increlora_fast.kernels.utils import kernel_name
    from test_kernels_aot import variant_keys

    backend = make_backend(GPUTarget("cuda", 90, 32))
    found: dict = {}
    current = [""]

    def recorder(kernel, grid, *args, **kwargs):
        found.setdefault(current[0], {}).setdefault(kernel_name(kernel), {}) \
            .setdefault(current[1], set()).update(variant_keys(kernel, backend, args, kwargs))

    kutils.launch = recorder
    linear.multiprocessor_count = lambda device: 132
    linear.check_device = lambda *args, **kwargs: torch.device("meta")

    def meta(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    for name, (act_name, ada_name) in DTYPES.items():
        act, ada = getattr(torch, act_name), getattr(torch, ada_name)
        for (k, n, has_bias, in_out), r in LAYERS:
            w = meta(k, n, dtype=act) if in_out else meta(n, k, dtype=act)
            bias = meta(n, dtype=act) if has_bias else None
            slots = (meta(r, k, dtype=ada), meta(n, r, dtype=ada), meta(r, dtype=torch.float32),
                     meta(r, dtype=torch.int8), 8.0, 1e-5)
            for score in (False, True):
                for separate in (False, True):
                    current[:] = [f"{name} {k}->{n} r{r} score={score} separate={separate}", 0]
                    for m in TOKENS:
                        current[1] = m
                        x, dy = meta(m, k, dtype=act), meta(m, n, dtype=act)
                        xa = meta(m, k, dtype=act) if separate else None
                        _, h = linear.adapted_linear_forward(x, xa, w, bias, in_out, *slots,
                                                             act, True, False)
                        linear.adapted_linear_backward(
                            dy, x, xa, w, in_out, *slots, h,
                            meta(dtype=torch.float32) if score else None, None,
                            True, separate, True, True, True)
    return {config: {kernel: {m: sorted(keys) for m, keys in by_m.items()}
                     for kernel, by_m in kernels.items()} for config, kernels in found.items()}


@pytest.fixture(scope="module")
def recorded() -> dict:
    pytest.importorskip("triton")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    child = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_every_launch_was_recorded(recorded):
    assert len(recorded) == len(DTYPES) * len(LAYERS) * 4
    for config, kernels in recorded.items():
        expected = {"_project_kernel", "_expand_kernel", "_backward_rows_kernel",
                    "_finish_kernel"} | ({"_score_tiles_kernel"} if "score=True" in config
                                         else set())
        assert set(kernels) == expected, config
        for kernel, by_m in kernels.items():
            assert sorted(int(m) for m in by_m) == sorted(TOKENS), (config, kernel)


def test_one_variant_per_kernel_whatever_the_token_count(recorded):
    varying = {}
    for config, kernels in recorded.items():
        for kernel, by_m in kernels.items():
            keys = {tuple(k) for k in by_m.values()}
            if len(keys) != 1 or len(next(iter(keys))) != 1:
                varying.setdefault(kernel, set()).add(config.split(" score")[0])
    assert not varying, "kernels with variants that depend on the token count: " + "; ".join(
        f"{kernel} ({len(configs)} layer configs, e.g. {min(configs)})"
        for kernel, configs in sorted(varying.items()))


def fused_variants_by_tokens() -> dict:
    """{dtype: {M: [specialisation keys]}} of the fused GEMM's forward (``fused_gemm``,
    ``INCRELORA_FUSED_LINEAR=1``: the plain kernel in float32, the autotuned one, each of its
    configs, in bfloat16) for `TOKENS`."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    from increlora_fast.kernels import fused_linear
    from increlora_fast.kernels import utils as kutils
    from increlora_fast.kernels.lowrank import Slots
    from increlora_fast.kernels.utils import dot_config
    from test_kernels_aot import variant_keys

    backend = make_backend(GPUTarget("cuda", 90, 32))
    found: dict = {}
    current = [""]

    def recorder(kernel, grid, *args, **kwargs):
        found.setdefault(current[0], {}).setdefault(current[1], set()).update(
            variant_keys(kernel, backend, args, kwargs))

    kutils.launch = recorder

    def meta(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    k, n, r = 384, 1536, 16
    for name in ("bf16", "fp32"):
        dtype = getattr(torch, DTYPES[name][0])
        slots = Slots(meta(r, dtype=torch.float32), meta(r, dtype=torch.int8), 8.0, 1e-5)
        for m in TOKENS:
            current[:] = [name, m]
            fused_linear.fused_linear_forward(
                meta(m, k, dtype=dtype), meta(n, k, dtype=dtype), meta(n, dtype=dtype), False,
                meta(m, r, dtype=torch.float32), meta(n, r, dtype=torch.float32), slots,
                dot_config(dtype, False))
    return {name: {m: sorted(keys) for m, keys in by_m.items()} for name, by_m in found.items()}


def test_the_fused_gemm_specialises_alike_whatever_the_token_count():
    """The opt-in fused GEMM takes the token count too (M, and M_BUCKET, its autotune key): a
    new variant per class of M would be a build per new batch class, and `precompile_kernels`,
    which calls on one token, would build variants no batch uses."""
    pytest.importorskip("triton")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    child = subprocess.run([sys.executable, __file__, "fused"], capture_output=True, text=True,
                           env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    recorded = json.loads(child.stdout.strip().splitlines()[-1])
    assert sorted(recorded) == ["bf16", "fp32"]
    for name, by_m in recorded.items():
        assert sorted(int(m) for m in by_m) == sorted(TOKENS), name
        assert len({tuple(keys) for keys in by_m.values()}) == 1, \
            f"{name}: the fused GEMM's variants depend on the token count"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(fused_variants_by_tokens() if sys.argv[1:] == ["fused"]
                     else variants_by_tokens()))
