"""Host-side helpers shared by the kernel modules: dtypes of a launch, block sizes, checks, and
the launch itself (on the tensors' device, counted)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from .launches import count_launch

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
SUPPORTED_DTYPES = tuple(TL_DTYPES)
# Smallest tile edge tl.dot accepts.
MIN_BLOCK = 16
# Slot buffers up to this many slots are handled in one slot block by the kernels that need every
# slot of a row at once (the pass over dy).
MAX_R_MAX = 128
# Kernel arguments that carry the token count M: the JIT would specialise them on their value
# (== 1, divisible by 16) and build a new variant, a compile of 0.2-0.8 s, whenever a batch brings
# a new class of M. They only bound loops and masks, so the kernels take them as plain ints
# (``do_not_specialize``); tests/test_kernel_variants.py checks one variant for 1 to 16,384 tokens.
TOKEN_ARGS = ("M",)


@dataclass(frozen=True)
class DotConfig:
    """The constexpr dtypes of a launch.

    op: dtype the tl.dot operands are rounded to (the compute dtype of the op).
    dot: dtype actually fed to tl.dot; equals ``op`` except for bfloat16 under the interpreter,
        whose tl.dot multiplies bfloat16 bit patterns (triton-lang/triton#11584), so the operands,
        already rounded to bfloat16, are widened to float32 there.
    acc: accumulator dtype (float64 for float64 inputs, float32 otherwise).
    precision: tl.dot input precision of float32 operands: "tf32" when torch allows TF32 for
        float32 matmuls (`tf32_enabled`), else "ieee".
    """

    op: tl.dtype
    dot: tl.dtype
    acc: tl.dtype
    acc_torch: torch.dtype
    precision: str


def is_interpreted(kernel) -> bool:
    """True when the jit function was built by the Triton interpreter (TRITON_INTERPRET=1)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel, op_name: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors share one device the kernel can run on; returns that device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) != 1:
        found = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"{op_name}: all tensors must be on one device, got {found}")
    device = devices.pop()
    if device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(f"{op_name}: Triton kernels run on CUDA tensors, got {device}; to run "
                           f"them on CPU set TRITON_INTERPRET=1 before importing "
                           f"increlora_fast.kernels modules, or use INCRELORA_BACKEND=torch")
    return device


def check_dtype(op_name: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in TL_DTYPES:
        raise TypeError(f"{op_name}: {name} has dtype {t.dtype}; supported: "
                        f"{[str(d) for d in SUPPORTED_DTYPES]}")


def compute_dtype(device: torch.device, x: torch.Tensor) -> torch.dtype:
    """The dtype an adapted linear computes in: the autocast dtype when autocast is on for
    ``device`` and ``x`` is not float64 (autocast leaves float64 alone, so a float64 linear
    computes in float64), else the dtype of the activation ``x`` (adapter tensors are rounded
    to it, as the base layer's weight is; a float32 adapter on a bfloat16 base computes in
    bfloat16 and accumulates in float32)."""
    if torch.is_autocast_enabled(device.type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device.type)
    return x.dtype


def tf32_enabled() -> bool:
    """Whether torch lets float32 matmuls use TF32, read without touching the legacy
    ``allow_tf32`` flag (torch 2.9+ raises on reading it once the new ``fp32_precision`` API was
    used)."""
    try:
        mode = torch.backends.cuda.matmul.fp32_precision
    except (AttributeError, RuntimeError):
        mode = "none"
    if mode in ("tf32", "ieee"):
        return mode == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def dot_config(dtype: torch.dtype, interpreted: bool) -> DotConfig:
    op = TL_DTYPES[dtype]
    dot = tl.float32 if (interpreted and dtype == torch.bfloat16) else op
    wide = dtype == torch.float64
    tf32 = dtype == torch.float32 and not interpreted and tf32_enabled()
    return DotConfig(op=op, dot=dot, acc=tl.float64 if wide else tl.float32,
                     acc_torch=torch.float64 if wide else torch.float32,
                     precision="tf32" if tf32 else "ieee")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype of a compute dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block(n: int, cap: int) -> int:
    """A power-of-two tile edge covering ``n`` when it can, between MIN_BLOCK and ``cap``."""
    return max(MIN_BLOCK, min(cap, triton.next_power_of_2(max(n, 1))))


def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device; a small number under the interpreter so split paths still run."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has unit stride, else a contiguous copy: kernels
    compiled for unit inner strides vectorise and pipeline their loads (Liger does the same)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _first_tensor(args: tuple) -> Optional[torch.Tensor]:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def kernel_name(kernel) -> str:
    """The Python name of a jit (or autotuned jit) kernel."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn.__name__


# id(kernel) -> (kernel, its `kernel_name`): a launch looks its name up here instead of walking
# the kernel's wrappers. The entry holds the kernel, so its id cannot be reused while cached.
_NAMES: Dict[int, Tuple[object, str]] = {}


def cached_kernel_name(kernel) -> str:
    """`kernel_name` of ``kernel``, remembered: what `launch` counts a launch under (the
    cache is read inline there, so a launch of a known kernel makes no call for its name)."""
    entry = _NAMES.get(id(kernel))
    if entry is None:
        entry = _NAMES[id(kernel)] = (kernel, kernel_name(kernel))
    return entry[1]


def launch(kernel, grid, *args, **kwargs) -> None:
    """The one launch of every kernel of the package: the kernel modules call it as
    ``utils.launch`` (looked up at each call), so replacing it here stubs or records them all.
    Count and launch ``kernel`` on ``grid`` (a tuple, or a function of the chosen meta
    parameters for autotuned kernels) on the device of its first tensor argument, not the
    current CUDA device (layers of one model can live on several GPUs). An empty grid launches
    nothing.

    It runs on every launch, so it makes no Python call of its own for a known kernel whose
    first argument is a tensor (every kernel of the package) beyond `count_launch`."""
    if not callable(grid) and min(grid) <= 0:
        return
    entry = _NAMES.get(id(kernel))
    count_launch(entry[1] if entry is not None else cached_kernel_name(kernel))
    first = args[0] if args and isinstance(args[0], torch.Tensor) else _first_tensor(args)
    if first is not None and first.is_cuda and first.device.index != torch.cuda.current_device():
        with torch.cuda.device(first.device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def build_only(kernel, grid, *args, **kwargs) -> None:
    """What `launch` is within `building_only`: count the launch and have Triton build the
    kernel variant these arguments need (``warmup``: a compile submitted to the builders, when
    it is not in Triton's cache yet) without running it; under the interpreter there is
    nothing to build."""
    if not callable(grid) and min(grid) <= 0:
        return
    count_launch(cached_kernel_name(kernel))
    if is_interpreted(kernel):
        return
    first = _first_tensor(args)
    guard = torch.cuda.device(first.device) if first is not None and first.is_cuda else \
        contextlib.nullcontext()
    with guard, _build_mode(None if first is None else first.device):
        kernel.warmup(*args, grid=grid, **kwargs)


# Within `building_only` with several workers: the pool the builds run in, and Triton's
# AsyncCompileMode of each device (made at its first launch).
_BUILDS: Dict[str, object] = {"pool": None, "modes": {}}


@contextlib.contextmanager
def _build_mode(device: Optional[torch.device]) -> Iterator[None]:
    """``device``'s AsyncCompileMode as Triton's active one for one warmup, in whatever thread
    the launch comes from: Triton reads it from a ContextVar, which the autograd engine's
    device threads (where a CUDA backward runs) do not inherit. One mode per device: a mode
    merges builds by source and options only, and Triton 3.9 would hand the kernel object
    built for one device (its module loaded there only) to the others."""
    pool = _BUILDS["pool"]
    if pool is None:
        yield
        return
    from triton.runtime._async_compile import AsyncCompileMode, active_mode
    modes = _BUILDS["modes"]
    mode = modes.get(device)
    if mode is None:
        mode = modes[device] = AsyncCompileMode(pool, ignore_errors=True)
    token = active_mode.set(mode)
    try:
        yield
    finally:
        active_mode.reset(token)


def _finish_builds() -> None:
    """Wait for every build submitted within `building_only` and put each into its kernel's
    cache (a failed one is left to the first real launch)."""
    from triton.runtime._async_compile import active_mode
    modes = list(_BUILDS["modes"].values())
    _BUILDS["pool"], _BUILDS["modes"] = None, {}
    token = active_mode.set(None)  # a mode's __exit__ sets None: the caller's is kept
    try:
        with contextlib.ExitStack() as stack:
            for mode in modes:  # every mode is finished, whatever another raises
                stack.push(mode.__exit__)
    finally:
        active_mode.reset(token)


@contextlib.contextmanager
def building_only(workers: int) -> Iterator[None]:
    """Within the block every launch of the package only builds its kernel (`build_only`),
    the builds run in ``workers`` threads (Triton's ``AsyncCompileMode``, one per device, where
    this Triton has it; else one at a time) and the block ends when all are done. Nothing runs
    on the device, so the outputs of the launches are garbage. A build that fails is left to
    the first real launch, which builds it again and raises its error."""
    global launch
    from concurrent.futures import ThreadPoolExecutor
    from . import launches
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401
        parallel = workers > 1
    except ImportError:  # a Triton without it: the builds run one at a time
        parallel = False
    if _BUILDS["pool"] is not None:
        raise RuntimeError("building_only: already within a building_only block")
    real = launch
    with contextlib.ExitStack() as stack:
        if parallel:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers))
            stack.callback(_finish_builds)  # before the pool shuts down
            _BUILDS["pool"], _BUILDS["modes"] = pool, {}
        launch = build_only
        launches._BUILDING_ONLY[0] = True
        try:
            yield
        finally:
            launch = real
            launches._BUILDING_ONLY[0] = False


def stream_capturing(device: torch.device) -> bool:
    """Whether a CUDA graph capture is under way on the current stream (never off CUDA): what
    is launched now is recorded, with its arguments, for replays."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@triton.jit
def _probe_kernel():
    pass


def interpreter_active() -> bool:
    """True when the kernel modules were built by the Triton interpreter (TRITON_INTERPRET=1 was
    set before they were imported)."""
    return is_interpreted(_probe_kernel)
