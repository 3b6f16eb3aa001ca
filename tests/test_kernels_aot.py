"""Every bfloat16 kernel variant the host functions launch compiles for an H100 (sm_90), without
a GPU: Triton's own ptxas builds the cubin and cuobjdump reports its resources.

The interpreter tests check the numbers; this checks the GPU lowering the interpreter skips
(tl.dot layouts, shared memory, registers). It runs in a child process because the other kernel
test modules switch Triton to interpreter mode in this one. Run the file directly to print the
table: ``python tests/test_kernels_aot.py 90 bfloat16,float32``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

# H100: 227 KB of shared memory per block.
MAX_SHARED = 232448


def _resources(cubin: bytes, tool: str) -> dict:
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {key: int(val) for key, val in re.findall(r"(REG|STACK|LOCAL):(\d+)", line)}


def compile_launches(arch: int, dtype_names: list) -> list:
    """Record the launches of the host functions at real sizes and compile each variant."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from increlora_fast.kernels import adamw, fused_linear, lowrank, score

    records = []
    for mod in (lowrank, score, fused_linear, adamw):
        mod.launch = lambda kernel, grid, *args, **kwargs: records.append((kernel, args, kwargs))
    adamw.check_device = lambda *args, **kwargs: torch.device("cpu")
    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
           torch.float64: "*fp64", torch.uint8: "*u8"}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    m, k, n = 256, 768, 3072
    for dtype in [getattr(torch, name) for name in dtype_names]:
        x = torch.randn(m, k, dtype=dtype)
        dy = torch.randn(m, n, dtype=dtype)
        for r in (16, 128):
            a, b, lam = (torch.randn(r, k, dtype=dtype), torch.randn(n, r, dtype=dtype),
                         torch.randn(r, dtype=dtype))
            _, h = lowrank.lowrank_forward(x, a, b, lam, dtype, True)
            lowrank.lowrank_backward(dy, x, a, b, lam, h, torch.zeros(()), torch.zeros(3, r),
                                     torch.randn(m, k, dtype=dtype), True, True, True, True)
            fused_linear.fused_linear_forward(x, torch.randn(n, k, dtype=dtype), None, False,
                                              a, b, lam, dtype, True)
        p = torch.randn(16, k, dtype=dtype)
        adamw.masked_adamw_triton_(p, p.clone(), torch.zeros(16, k), torch.zeros(16, k),
                                   torch.ones(16, dtype=torch.bool), torch.rand(16),
                                   torch.ones(16), 0, 0.9, 0.999, 1e-8, 0.0)
    seen, rows = set(), []
    for kernel, args, kwargs in records:
        consts = dict(kwargs)
        num_warps = consts.pop("num_warps", 4)
        sig = {}
        for name, arg in zip(kernel.arg_names, args):
            if isinstance(arg, torch.Tensor):
                sig[name] = ptr[arg.dtype]
            else:
                sig[name] = "i1" if isinstance(arg, bool) else "i32" if isinstance(arg, int) \
                    else "fp32"
        sig.update({name: "constexpr" for name in consts})
        key = repr((kernel.fn.__name__, sorted(sig.items()), sorted(map(str, consts.items()))))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, sig, consts),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps})
        rows.append(dict(kernel=kernel.fn.__name__, shared=compiled.metadata.shared,
                         num_warps=num_warps,
                         blocks={c: v for c, v in consts.items() if c.startswith("BLOCK")},
                         op=str(consts.get("OP", "")), **_resources(compiled.asm["cubin"], tool)))
    return rows


def test_bfloat16_kernels_compile_for_sm90_without_spills():
    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, tool)) for tool in ("ptxas", "cuobjdump")):
        pytest.skip("this triton has no bundled ptxas / cuobjdump")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    child = subprocess.run([sys.executable, __file__, "90", "bfloat16"], capture_output=True,
                           text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    rows = json.loads(child.stdout.strip().splitlines()[-1])
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_project_kernel", "_expand_kernel", "_reduce_rows_kernel",
                       "_finalize_grad_kernel", "_delta_w_score_kernel",
                       "_fused_linear_adapter_kernel", "_masked_adamw_kernel"}
    for row in rows:
        assert row["STACK"] == 0 and row["LOCAL"] == 0, row
        assert row["shared"] <= MAX_SHARED, row


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(compile_launches(int(sys.argv[1]), sys.argv[2].split(","))))
