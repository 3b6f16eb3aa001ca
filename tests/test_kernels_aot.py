"""The kernel variants a GPU's Triton JIT really builds compile for sm_80, sm_86, sm_89 and sm_90
within each arch's limits, without a GPU: Triton's own ptxas builds each cubin and cuobjdump
reports its resources.

The interpreter tests check the numbers; this checks the GPU lowering the interpreter skips
(tl.dot layouts, pipelining, shared memory, registers, 64-bit addressing). How a variant is made
the way the JIT makes it:

- **Launches.** The host functions a training step calls (`linear.adapted_linear_forward` /
  `adapted_linear_backward` with the score, unfused, with ``fused_gemm`` and with a separate
  dropout input; `adamw.masked_adamw_triton_` on A and on B, `adamw.MultiTensorAdamW` over
  both) run on meta tensors at the benchmark sizes (16,384 tokens, 768 -> 3072 with bias,
  4096 -> 11008 without, Conv1D (in, out) weight at 768 -> 3072, 384 -> 1536 with bias,
  r_max 16 and 128) with
  ``launch`` replaced by a recorder, so no kernel and no base GEMM runs. Meta tensors keep the
  offsets of views, so pointer alignment is what a CUDA allocation (base 512-byte aligned)
  gives. ``multiprocessor_count`` returns the arch's SM
  count (H100 132, RTX 4090 128, A100 108, RTX A6000 84), so the backward's row split is what
  that GPU gets.
- **Signatures.** Each launch is specialised by the kernel's own binder, as ``JITFunction.run``
  does (`triton.runtime.jit.create_function_from_signature` and ``JITFunction._pack_args``):
  ints equal to 1 become constexprs, ints divisible by 16 and 16-byte-aligned pointers get
  ``tt.divisibility=16``, floats and bools are not specialised. Where that internal API is
  missing (another Triton version), the same rules are applied here by hand.
- **Autotune.** The autotuned fused GEMM is compiled once per config of its ``@triton.autotune``.
- **Dtypes.** bfloat16, AMP (bfloat16 activations and base weight, float32 adapter tensors: the
  default on bfloat16 bases) and float32 (IEEE dots, torch's default matmul precision) on all
  four archs. float16 compiles the same code as bfloat16 but for the dtype and is left out to
  keep the test near 4 minutes; build it with ``python tests/test_kernels_aot.py 90 fp16``.

Identical variants (same kernel, signature, constexprs, attributes and options) are compiled once
per arch. Each arch is built in its own child process, two at a time: the other kernel test
modules switch Triton to interpreter mode in the pytest process (and the child must not inherit
TRITON_INTERPRET). Measured: 525 CPU-seconds in all with a cold Triton cache (116 variants per
arch), so 4-4.5 minutes on 2 free cores; about 35 CPU-seconds with a warm cache.

Also checked, on each GEMM-like kernel's TTIR: every product of a row index with a token-dimension
stride is computed in 64 bits, so element offsets cannot wrap past 2**31 (the interpreter
computes in Python ints and cannot see that).

Run the file directly to print the table of one arch, optionally for some dtype configurations
only: ``python tests/test_kernels_aot.py 80 fp32,amp`` (``--json`` prints the rows).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ARCHS = (90, 89, 86, 80)
# Max dynamic shared memory per block (bytes) and SM count of each arch's reference GPU.
MAX_SHARED = {90: 227 * 1024, 89: 99 * 1024, 86: 99 * 1024, 80: 163 * 1024}
SM_COUNT = {90: 132, 89: 128, 86: 84, 80: 108}
MAX_REGISTERS = 255
# Dtype configurations: name -> (activation and base weight dtype, adapter tensors' dtype).
DTYPES = {"bf16": ("bfloat16", "bfloat16"), "amp": ("bfloat16", "float32"),
          "fp32": ("float32", "float32"), "fp16": ("float16", "float16")}
# What the test builds; float16 (same code as bfloat16 but the dtype, ~45 s more per arch) only
# when asked for on the command line.
DTYPES_PER_ARCH = {arch: ("bf16", "amp", "fp32") for arch in ARCHS}
TOKENS = 16384
# (in, out, bias, Conv1D weight layout); MiniLM's 384 -> 1536 gets the score's smaller tiles
# (`score.score_tiles`: too few 128 x 128 tiles to fill the GPU)
LAYERS = ((768, 3072, True, False), (4096, 11008, False, False), (768, 3072, True, True),
          (384, 1536, True, False))
R_MAX = (16, 128)
# Token-dimension strides of the GEMM-like kernels: the products of a row index with these must
# be 64-bit.
TOKEN_STRIDES = {
    "_project_kernel": ("stride_xm", "stride_hm"),
    "_expand_kernel": ("stride_sm", "stride_om"),
    "_backward_rows_kernel": ("stride_dym", "stride_hm", "stride_xm", "stride_dxm"),
    "_score_tiles_kernel": ("stride_dym", "stride_xm"),
    "_fused_linear_adapter_kernel": ("stride_xm", "stride_hm", "stride_ym"),
}
# The finish kernel reads per-program partials and slot buffers: no token dimension.
KERNELS = set(TOKEN_STRIDES) | {"_finish_kernel", "_masked_adamw_kernel",
                                 "_masked_adamw_multi_kernel", "_orth_penalty_fwd_kernel",
                                 "_orth_penalty_bwd_kernel"}
# Kernels known to compute a token offset in 32 bits, reported to the kernels' owner.
KNOWN_NARROW: dict = {}


# ------------------------------------------------------------------ child side: record launches
def record_launches(arch: int, dtype_names: tuple) -> list:
    """[(tag, kernel, args, kwargs)] of every launch of one training step's host functions at
    the benchmark sizes, on meta tensors, with the SM count of ``arch``."""
    import torch

    from increlora_fast.kernels import adamw, linear, orth_penalty
    from increlora_fast.kernels import utils as kutils

    records, tag = [], [""]

    def recorder(kernel, grid, *args, **kwargs):
        records.append((tag[0], kernel, args, kwargs))

    kutils.launch = recorder
    sms = SM_COUNT[arch]
    linear.multiprocessor_count = lambda device: sms
    for mod in (linear, adamw, orth_penalty):
        mod.check_device = lambda *args, **kwargs: torch.device("meta")

    def meta(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    for name in dtype_names:
        act, ada = (getattr(torch, d) for d in DTYPES[name])
        for k, n, has_bias, in_out in LAYERS:
            x, dy = meta(TOKENS, k, dtype=act), meta(TOKENS, n, dtype=act)
            w = meta(k, n, dtype=act) if in_out else meta(n, k, dtype=act)
            bias = meta(n, dtype=act) if has_bias else None
            for r in R_MAX:
                tag[0] = f"{name} {k}->{n}{' Conv1D' if in_out else ''} r{r}"
                a, b = meta(r, k, dtype=ada), meta(n, r, dtype=ada)
                lam, state = meta(r, dtype=ada), meta(r, dtype=torch.int8)
                slots = (a, b, lam, state, 8.0, 0.0)
                dropped = meta(TOKENS, k, dtype=act)  # a separate adapter input
                for fused, xa in ((False, None), (True, None), (False, dropped)):
                    _, h = linear.adapted_linear_forward(x, xa, w, bias, in_out, *slots,
                                                         act, True, fused)
                    linear.adapted_linear_backward(
                        dy, x, xa, w, in_out, *slots, h, meta(dtype=torch.float32),
                        None, True, xa is not None, True, True, True)
                params = []
                for p, slot_dim in ((a, 0), (b, 1)):
                    adamw.masked_adamw_triton_(
                        p, p, meta(*p.shape, dtype=ada), meta(*p.shape, dtype=ada),
                        meta(r, dtype=torch.bool), meta(r, dtype=torch.float32),
                        meta(r, dtype=torch.float32), slot_dim, 0.9, 0.999, 1e-8, 0.0)
                    params.append(meta(*p.shape, dtype=ada).requires_grad_(True))
                    params[-1].grad = meta(*p.shape, dtype=ada)
                # the launch over many tensors (its table on the host here: meta tensors)
                adamw.MultiTensorAdamW(
                    params, [(meta(*p.shape, dtype=ada), meta(*p.shape, dtype=ada))
                             for p in params], [meta(r, dtype=torch.float32)] * 2,
                    [adamw.adamw_launch(a, 0), adamw.adamw_launch(b, 1)],
                ).step(meta(2 * r, dtype=torch.uint8), meta(2 * r, dtype=torch.float32),
                       0.9, 0.999, 1e-8, 0.0)
                # the orthogonal penalty over this layer's A and B, forward and backward
                penalty = orth_penalty.OrthPenalty(r)
                masks = meta(1, 2, penalty.r, dtype=torch.float32)
                penalty._build([a, b])
                _, saved = penalty.forward_terms(masks, 0.1, [a, b])
                penalty.backward_grads(masks, saved, meta(dtype=torch.float32), [a, b])
    return records


# ------------------------------------------------------------- child side: specialise, compile
def _manual_specialisation(fn, args, kwargs):
    """(signature, constexprs, attrs, options) by the JIT's rules, for Tritons without the
    binder API used by `jit_specialisation`."""
    import torch
    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
           torch.float64: "*fp64", torch.uint8: "*u8", torch.int8: "*i8", torch.int32: "*i32",
           torch.int64: "*i64"}
    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    for i, name in enumerate(fn.arg_names):
        val = values[name]
        if name in kwargs or (isinstance(val, int) and not isinstance(val, bool) and val == 1):
            signature[name] = "constexpr"
            constexprs[(i,)] = val
        elif isinstance(val, torch.Tensor):
            signature[name] = ptr[val.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]] if val.data_ptr() % 16 == 0 else []
        elif isinstance(val, bool):
            signature[name] = "u1"
        elif isinstance(val, int):
            signature[name] = "i32" if -2 ** 31 <= val < 2 ** 31 else "i64"
            attrs[(i,)] = [["tt.divisibility", 16]] if val % 16 == 0 else []
        else:
            signature[name] = "fp32"
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    return signature, constexprs, attrs, options


def jit_specialisation(fn, backend, args, kwargs):
    """(signature, constexprs, attrs, options dict, faithful) exactly as ``JITFunction.run``
    builds them; ``faithful`` False where the by-hand rules had to be used."""
    try:
        from triton.runtime.jit import create_function_from_signature
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                              specialization, options)
        return signature, constexprs, attrs, dict(options.__dict__), True
    except (ImportError, AttributeError, TypeError, ValueError):
        return (*_manual_specialisation(fn, args, kwargs), False)


def variant_keys(kernel, backend, args, kwargs) -> list:
    """``"<kernel name>\t<signature, constexprs, attributes, warps, stages>"`` of the variant a
    launch of ``kernel`` with these arguments makes the JIT build (one per config of an
    autotuned kernel), specialised by the JIT's own binder (`jit_specialisation`)."""
    from increlora_fast.kernels.utils import kernel_name

    configs = [c.all_kwargs() for c in kernel.configs] if hasattr(kernel, "configs") else [{}]
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    keys = []
    for config in configs:
        sig, consts, attrs, options, faithful = jit_specialisation(fn, backend, args,
                                                                   {**kwargs, **config})
        assert faithful, "this Triton has no binder to specialise with"
        keys.append(kernel_name(kernel) + "\t" + repr((
            sorted(sig.items()), sorted(consts.items()), sorted(attrs.items()),
            options.get("num_warps"), options.get("num_stages"))))
    return keys


def _resources(cubin: bytes, tool: str) -> dict:
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {key: int(val) for key, val in re.findall(r"(REG|STACK|LOCAL):(\d+)", line)}


def _element_type(mlir_type: str) -> str:
    """``i64`` of ``tensor<64x1xi64>`` or of ``i64``."""
    return re.sub(r"^tensor<(?:\d+x)*|>$", "", mlir_type)


def narrow_token_offsets(ttir: str, strides: tuple) -> dict:
    """{stride name: [result types of its products that are not 64-bit]} plus, under key
    ``"missing"``, the token strides that never enter a product (the check found nothing to
    check). A product counts when one operand is the stride argument itself or derives from it
    by splat / extsi / broadcast / expand_dims / reshape."""
    defs = []
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.]+) = ([\w.]+) (.*)$", line)
        if m:
            body = m.group(3).split(" loc(")[0]
            operands, _, types = body.partition(" : ")
            defs.append((m.group(1), m.group(2), re.findall(r"%[\w.]+", operands), types))
    result, missing = {}, []
    for stride in strides:
        derived = {"%" + stride}
        for name, op, operands, _ in defs:
            if op in ("tt.splat", "arith.extsi", "tt.broadcast", "tt.expand_dims", "tt.reshape") \
                    and operands and operands[0] in derived:
                derived.add(name)
        products = [types.strip() for _, op, operands, types in defs
                    if op == "arith.muli" and derived.intersection(operands)]
        if not products:
            missing.append(stride)
        narrow = [t for t in products if _element_type(t) != "i64"]
        if narrow:
            result[stride] = narrow
    if missing:
        result["missing"] = missing
    return result


def _ptx_features(ptx: str) -> str:
    found = [name for name, pat in (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"),
                                    ("cp.async", "cp.async"), ("atomic", "atom.")) if pat in ptx]
    return " ".join(found)


def compile_launches(arch: int, dtype_names: tuple) -> list:
    """One row per distinct variant the JIT would build for ``arch``: its constexprs, the
    compiled resources (REG, STACK, LOCAL, shared), the PTX features used and, for GEMM-like
    kernels, the token-offset products that are not 64-bit."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    from increlora_fast.kernels.utils import kernel_name

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    seen, rows = {}, []
    for tag, kernel, args, kwargs in record_launches(arch, dtype_names):
        name = kernel_name(kernel)
        variants = [dict(kwargs)]
        if hasattr(kernel, "configs"):  # @triton.autotune: every config gets built
            variants = [{**kwargs, **cfg.all_kwargs()} for cfg in kernel.configs]
            kernel = kernel.fn
        for kw in variants:
            signature, constexprs, attrs, options, faithful = jit_specialisation(
                kernel, backend, args, kw)
            key = repr((name, sorted(signature.items()), sorted(constexprs.items()),
                        sorted(attrs.items()), options.get("num_warps"),
                        options.get("num_stages")))
            if key in seen:
                seen[key]["tags"].append(tag)
                continue
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=target, options=options)
            consts = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
            row = dict(
                kernel=name, arch=arch, tags=[tag], faithful=faithful,
                num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                shared=compiled.metadata.shared,
                consts={c: (str(v) if not isinstance(v, (bool, int)) else v)
                        for c, v in consts.items() if c.isupper()},
                specialised=sorted(c for c in consts if not c.isupper()),
                aligned=sum(1 for a in attrs.values() if a),
                ptx=_ptx_features(compiled.asm["ptx"]),
                **_resources(compiled.asm["cubin"], tool))
            if name in TOKEN_STRIDES:
                row["narrow_offsets"] = narrow_token_offsets(compiled.asm["ttir"],
                                                             TOKEN_STRIDES[name])
            seen[key] = row
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ pytest side
def _toolchain():
    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, tool)) for tool in ("ptxas", "cuobjdump")):
        pytest.skip("this triton has no bundled ptxas / cuobjdump")


def _build(arch: int) -> list:
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    child = subprocess.run([sys.executable, __file__, str(arch), "--json"], capture_output=True,
                           text=True, env=env, timeout=900)
    assert child.returncode == 0, f"sm_{arch}: {child.stderr[-3000:]}"
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built() -> dict:
    """{arch: rows}, each arch compiled in a child process, as many at once as there are CPUs
    (at most two)."""
    _toolchain()
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        return dict(zip(ARCHS, pool.map(_build, ARCHS)))


def _rows_of(built: dict, arch: int, dtype_name: str) -> list:
    return [row for row in built[arch] if any(t.split()[0] == dtype_name for t in row["tags"])]


# Variants known not to fit, reported to the kernels' owner; strict, so a fix shows up as XPASS.
_SMALL_FRAMES = (
    "a stack frame of 8 B at 168 registers (not register pressure): sm_80 float32 "
    "_backward_rows_kernel 32x32x32, r_max 16, writing a fresh dx (the dropout path); left for "
    "a GPU session to profile")
# Set by a run under another Triton than CI's (scripts/gpu_versions_check.sh): stack frames there
# are listed in docs/kernels.md instead of failing; spills to local memory, more registers or
# shared memory than the arch allows (a launch that cannot run) still fail.
STACK_OK = os.environ.get("INCRELORA_AOT_STACK_OK") == "1"
# Stack frames of a few bytes that ptxas adds to one kernel of one (arch, dtype) without any
# local-memory traffic in the PTX (LOCAL 0): tolerated there, listed in docs/kernels.md, and
# `test_known_stack_frames_still_occur` says when one goes away.
KNOWN_FRAMES = {
    (90, "fp32", "_project_kernel"): "8 B at 80 registers whenever the row count M is not known "
    "to be divisible by 16: for odd M before 2026-12-06, for every M since the token count is "
    "not specialised (`utils.TOKEN_ARGS`); no ld/st.local in its PTX",
}
KNOWN_FAILURES = {} if STACK_OK else {(80, "fp32"): _SMALL_FRAMES}
CASES = [pytest.param(arch, name, id=f"sm{arch}-{name}",
                      marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(arch, name)])]
                      if (arch, name) in KNOWN_FAILURES else [])
         for arch in ARCHS for name in DTYPES_PER_ARCH[arch]]


@pytest.mark.parametrize("arch, dtype_name", CASES)
def test_jit_variants_compile_within_the_arch_limits(built, arch, dtype_name):
    from triton.runtime import jit

    rows = _rows_of(built, arch, dtype_name)
    wide = DTYPES[dtype_name][0] == "float32"
    fused = "_fused_linear_adapter_kernel"  # fixed blocks for float32, autotuned otherwise
    assert {row["kernel"] for row in rows} == KERNELS
    # The JIT's own specialisation was applied (by hand only where Triton lacks the binder):
    # unit inner strides are constexprs, pointers and sizes are known to be 16-divisible.
    binder = hasattr(jit, "create_function_from_signature")
    assert all(row["faithful"] == binder for row in rows), \
        "this Triton has the JIT's binder but specialising through it failed"
    for row in rows:
        if row["kernel"] == "_project_kernel":
            assert "stride_xk" in row["specialised"] and row["aligned"] >= 10, row
    if not wide:  # every autotune config of the fused GEMM; tensor cores in the GEMM-like ones
        from increlora_fast.kernels.fused_linear import _configs
        blocks = {(row["consts"]["BLOCK_M"], row["consts"]["BLOCK_N"], row["consts"]["BLOCK_K"])
                  for row in rows if row["kernel"] == fused}
        assert len(blocks) == len(_configs())
        assert all("mma" in row["ptx"] for row in rows if row["kernel"] in TOKEN_STRIDES)
    bad = [row for row in rows if (row["STACK"] and not STACK_OK
                                   and not _known_frame(arch, dtype_name, row)) or row["LOCAL"]
           or row["REG"] > MAX_REGISTERS
           or row["shared"] > MAX_SHARED[arch]]
    assert not bad, f"sm_{arch} {dtype_name}: spills or over the limits " \
                    f"(shared <= {MAX_SHARED[arch]}):\n" + markdown(bad)


def _known_frame(arch: int, dtype_name: str, row: dict) -> bool:
    return (arch, dtype_name, row["kernel"]) in KNOWN_FRAMES and row["STACK"] <= 8 \
        and not row["LOCAL"]


@pytest.mark.parametrize("arch, dtype_name, kernel", sorted(KNOWN_FRAMES))
def test_known_stack_frames_still_occur(built, arch, dtype_name, kernel):
    """Each tolerated frame is still there: once ptxas or the kernel drops it, remove it from
    `KNOWN_FRAMES` (and docs/kernels.md), so that it cannot come back unnoticed."""
    rows = [row for row in _rows_of(built, arch, dtype_name) if row["kernel"] == kernel]
    assert rows and any(row["STACK"] for row in rows), KNOWN_FRAMES[(arch, dtype_name, kernel)]


@pytest.mark.parametrize("kernel", [
    pytest.param(name, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_NARROW[name])]
                 if name in KNOWN_NARROW else []) for name in sorted(TOKEN_STRIDES)])
def test_token_offsets_are_64_bit(built, kernel):
    """M x features may exceed 2**31 elements (150k tokens at 14,336 features): the row index
    times a token-dimension stride must be a 64-bit product in every variant."""
    rows = [row for row in built[90] if row["kernel"] == kernel]
    assert rows
    for row in rows:
        assert row["narrow_offsets"] == {}, (kernel, row["consts"], row["narrow_offsets"])


def test_narrow_offset_check_can_fail():
    ttir = """
    %rm = tt.make_range {end = 32 : i32, start = 0 : i32} : tensor<32xi32> loc(#loc1)
    %a = tt.splat %stride_xm : i32 -> tensor<32xi32> loc(#loc2)
    %b = arith.muli %rm, %a : tensor<32xi32> loc(#loc3)
    %c = arith.extsi %stride_hm : i32 to i64 loc(#loc4)
    %d = arith.muli %c, %c : i64 loc(#loc5)
    """
    assert narrow_token_offsets(ttir, ("stride_xm", "stride_hm")) == \
        {"stride_xm": ["tensor<32xi32>"]}
    assert narrow_token_offsets(ttir, ("stride_ym",)) == {"missing": ["stride_ym"]}


def markdown(rows: list) -> str:
    lines = ["| kernel | constexprs | warps/stages | REG | STACK | shared | PTX | dtypes |",
             "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["kernel"], str(r["consts"]))):
        consts = ", ".join(f"{k}={v}" for k, v in row["consts"].items()
                           if k not in ("DOT", "ACC", "PRECISION", "R_ALL"))
        dtypes = sorted({tag.split()[0] for tag in row["tags"]})
        lines.append(f"| {row['kernel']} | {consts} | {row['num_warps']}/{row['num_stages']} | "
                     f"{row['REG']} | {row['STACK']} | {row['shared']} | {row['ptx']} | "
                     f"{','.join(dtypes)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cli = [a for a in sys.argv[1:] if not a.startswith("--")]
    arch_arg = int(cli[0])
    names = tuple(cli[1].split(",")) if len(cli) > 1 else DTYPES_PER_ARCH[arch_arg]
    built_rows = compile_launches(arch_arg, names)
    print(json.dumps(built_rows) if "--json" in sys.argv else markdown(built_rows))
