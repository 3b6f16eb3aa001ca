"""The one call an `IncreLoRALinear` makes, `adapted_linear`, and the choice of path behind it.

Paths:

- ``torch``: `reference.adapted_linear_torch` (the CPU default and the reference of every
  kernel test).
- ``triton``: `kernels.linear.adapted_linear_triton`, one autograd op: cuBLAS base GEMM with the
  adapter accumulated into its output in place (the CUDA default).
- ``fused``: the same op with the base and the adapter in one Triton GEMM
  (``INCRELORA_FUSED_LINEAR=1``; opt-in until a GPU benchmark shows it beats cuBLAS).

``INCRELORA_BACKEND=torch|triton`` overrides the default choice (triton on CUDA, torch
elsewhere); under ``torch.func`` transforms every call takes the torch path. The environment
variables are read when this module is imported and again by `refresh_settings()`: a layer call
reads no environment, imports nothing and builds no key beyond one cached lookup. The first
time a Triton variant runs on a device it is checked once against the torch path on a small
problem (`kernels.checks.check_variant`); on an exception or a mismatch one warning names the
GPU and the versions, and that variant takes the torch path from then on. The optimizer's
launch over many tensors (`kernels.adamw.MultiTensorAdamW`) is checked the same way once per
device and parameter dtype (`multi_adamw_ok`); where it fails, the optimizer launches its
kernel per tensor; so are the orthogonal penalty's kernels (`orth_penalty_ok`), which give way
to its torch path. ``INCRELORA_KERNEL_CHECK=0`` turns the checks off.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Dict, Optional, Set, Tuple

import torch
from torch._C import _are_functorch_transforms_active as _functorch_active

from .kernels.launches import building_only_active
from .kernels.reference import (accumulate_dense_grad_, adapted_linear_torch, delta_w_score_dense,
                                dtype_name, effective_lambda)

__all__ = ["adapted_linear", "adapted_linear_torch", "effective_lambda", "delta_w_score_dense",
           "accumulate_dense_grad_", "select_backend", "triton_available", "choose_path",
           "refresh_settings", "refuse_mixed_base_dtypes"]

BACKEND_ENV = "INCRELORA_BACKEND"
BACKENDS = ("torch", "triton")
FUSED_LINEAR_ENV = "INCRELORA_FUSED_LINEAR"
KERNEL_CHECK_ENV = "INCRELORA_KERNEL_CHECK"
# The kernels handle r_max up to this many slots; larger buffers take the torch path.
TRITON_MAX_R = 128

_VARIANT_OK: Dict[tuple, bool] = {}
# The keys of `_VARIANT_OK` whose check failed: all of the checks a graph dynamo traces reads.
_FAILED: Set[tuple] = set()
# Path decisions of the call keys seen so far (`choose_path`).
_PATHS: Dict[tuple, str] = {}
# Check keys whose check ran while launches only built kernels (its kernels are built).
_CHECKS_BUILT: Set[tuple] = set()


# `triton_available`'s answer, once asked.
_TRITON_AVAILABLE: Optional[bool] = None


def triton_available() -> bool:
    """Whether triton imports; asked once and kept in a module global (not an ``lru_cache``,
    which dynamo traces through with a warning when a compiled CUDA model picks its path)."""
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON_AVAILABLE = False
        else:
            _TRITON_AVAILABLE = True
    return _TRITON_AVAILABLE


def _read_settings() -> Tuple[str, bool, bool]:
    """(backend override or "", fused opt-in, first-use check on) from the environment."""
    return (os.environ.get(BACKEND_ENV, "").strip().lower(),
            os.environ.get(FUSED_LINEAR_ENV, "").strip() == "1",
            os.environ.get(KERNEL_CHECK_ENV, "").strip() != "0")


# Read at import and by `refresh_settings`, never inside a call (nor a compiled graph).
_SETTINGS: Tuple[str, bool, bool] = _read_settings()


def refresh_settings() -> None:
    """Read ``INCRELORA_BACKEND``, ``INCRELORA_FUSED_LINEAR`` and ``INCRELORA_KERNEL_CHECK``
    again (they are read when this module is imported and cached, so a layer call costs no
    environment lookups)."""
    global _SETTINGS
    _SETTINGS = _read_settings()
    _PATHS.clear()


def select_backend(x: torch.Tensor) -> str:
    """`INCRELORA_BACKEND` if set, else triton on CUDA and torch elsewhere."""
    choice = _SETTINGS[0]
    if choice:
        if choice not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={choice!r} is invalid: use one of {BACKENDS}")
        return choice
    return "triton" if x.is_cuda and triton_available() else "torch"


def _variant(x: torch.Tensor, weight: Optional[torch.Tensor], lora_A: torch.Tensor,
             weight_in_out: bool, has_bias: bool, fused: bool, dropout: bool) -> tuple:
    from .kernels.utils import compute_dtype
    return (str(x.device), compute_dtype(x.device, x), lora_A.dtype,
            None if weight is None else weight.dtype, weight_in_out, has_bias, fused, dropout,
            _slot_tile(lora_A.shape[0]))


def _slot_tile(r_max: int) -> int:
    """The slot tile the kernels are built for at ``r_max`` <= `TRITON_MAX_R` slots: 16, 32,
    64 or 128 (`kernels.utils.block`), one first-use check each."""
    return next(b for b in (16, 32, 64, 128) if r_max <= b)


def _variant_ok(key: tuple) -> bool:
    """Whether the Triton variant ``key`` passed its first-use check on its device (trusted
    unchecked, and not remembered, while capturing or compiling other than by dynamo). While
    dynamo traces, the check runs then, outside the graph (`_variant_checked_in_trace`), and
    the graph reads only the failed checks (`_FAILED`): it guards on what can change its path,
    and a passing check run later (an eager call) leaves it valid, where a read of
    `_VARIANT_OK` recompiled it."""
    if torch.compiler.is_dynamo_compiling():
        return _variant_checked_in_trace(key) and (not _SETTINGS[2] or key not in _FAILED)
    return _variant_checked(key, False)


def _variant_checked(key: tuple, in_trace: bool) -> bool:
    """`_checked_once` of `kernels.checks.check_variant` for the variant ``key``."""
    device = torch.device(key[0])

    def check() -> Dict[str, object]:
        from .kernels.checks import check_variant
        ok, detail = check_variant(device, *key[1:])
        return {"ok": ok, "error": detail}
    return _checked_once(device, key, check,
                         "This variant now runs on the torch path (slower, correct)",
                         while_capturing=True, label=_variant_label(key), in_trace=in_trace)


def _variant_checked_in_trace(key: tuple) -> bool:
    """`_variant_checked` of ``key`` while dynamo traces: dynamo calls it as Python, not
    traced, and takes its result as a constant (no graph break and no guard), so a run that
    only ever calls its model compiled checks each variant once, as it is traced."""
    return _variant_checked(key, True)


# What `torch.compiler.assume_constant_result` sets (it imports dynamo: 1 s at import here).
_variant_checked_in_trace._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _variant_label(key: tuple) -> str:
    """A `_variant` key in words, for the warning of a failed check."""
    compute, adapter, weight, in_out, bias, fused, dropout, tile = key[1:]
    name = dtype_name
    base = "no base weight" if weight is None else \
        f"{name(weight)} base weight ({'in x out, Conv1D' if in_out else 'out x in'})"
    flags = [flag for flag, on in (("bias", bias), ("fused forward", fused),
                                   ("adapter dropout", dropout)) if on]
    return ", ".join([f"compute {name(compute)}", f"{name(adapter)} adapters", base]
                     + flags + [f"slot tile {tile}"])


def _report(device: torch.device, key: tuple, detail: str, fallback: str,
            label: Optional[str] = None) -> str:
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return (f"increlora_fast: the Triton kernels failed their first-use check on {name} "
            f"(torch {torch.__version__}, triton {triton.__version__}, variant "
            f"{label or key[1:]}): {detail}. {fallback}. Please report it with this message at "
            f"the project's issue tracker; set {KERNEL_CHECK_ENV}=0 to skip the check (in "
            "the environment before the import, or call "
            "increlora_fast.functional.refresh_settings() after setting it).")


def multi_adamw_ok(device: torch.device, dtype: torch.dtype,
                   moment_dtype: Optional[torch.dtype] = None) -> bool:
    """Whether `IncreLoRAAdamW` may step ``dtype`` parameters with ``moment_dtype`` moments
    (default: ``dtype``) on ``device`` in one launch over many tensors
    (`kernels.adamw.MultiTensorAdamW`): checked once per device and dtypes against float64
    (`kernels.checks.check_adamw`, two steps); on a wrong result one warning, and the optimizer
    launches its kernel per tensor there. A launch that faults is not caught: CUDA errors are
    sticky, as for any kernel. True without checking when ``INCRELORA_KERNEL_CHECK=0``; False,
    unchecked and not remembered, while compiling or capturing a CUDA graph (the check
    allocates, reads results and warns)."""
    moment_dtype = moment_dtype or dtype

    def check() -> Dict[str, object]:
        from .kernels.checks import check_adamw
        return check_adamw(device, dtype, multi=True, moment_dtype=moment_dtype)
    return _checked_once(device, (str(device), "masked_adamw_multi", dtype, moment_dtype), check,
                         "The optimizer now launches its kernel once per tensor there",
                         label=f"masked AdamW over many tensors, {dtype_name(dtype)} parameters, "
                               f"{dtype_name(moment_dtype)} moments")


def _checked_once(device: torch.device, key: tuple, check: Callable[[], Dict[str, object]],
                  fallback: str, while_capturing: bool = False,
                  label: Optional[str] = None, in_trace: bool = False) -> bool:
    """The first-use check of a kernel family: ``check()`` (a record with ``ok`` and
    ``error``, as `kernels.checks` makes) run once per ``key`` and remembered; on a failure one
    warning naming the variant (``label``, else ``key``) and saying what happens instead
    (``fallback``). True unchecked when
    ``INCRELORA_KERNEL_CHECK=0``, a remembered failure included (turned on again, it holds);
    ``while_capturing``, unchecked and not remembered, while compiling or capturing a CUDA
    graph (a check allocates, reads results and warns), unless ``in_trace``: called by
    dynamo outside the graph it traces (`_variant_checked_in_trace`), where the check runs
    (torch 2.13 says it is compiling there too). False, unchecked and not remembered,
    under a fake tensor mode (`_faking`). True, not remembered, while launches
    only build their kernels (`kernels.utils.building_only`, where nothing runs: the check
    then runs once to build its own kernels, its result, made of outputs no kernel wrote, is
    dropped, and the caller goes on to build the family's kernels; the first real use
    checks).

    The check runs on an autograd of its own wherever the first call comes: outside
    ``torch.inference_mode()`` (a validation pass before training; its tensors would be
    inference tensors, which cannot require grad) and with the tensors it saves for its
    backward kept as they are, not through the caller's saved-tensor hooks (non-reentrant
    activation checkpointing would count them in the forward and miss them in its
    recomputation, where the check is remembered and does not run)."""
    if not _SETTINGS[2]:  # before a remembered failure: the warning says this skips the check
        return True
    if key in _VARIANT_OK:
        return _VARIANT_OK[key]
    if (torch.compiler.is_compiling() and not in_trace) or \
            (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return while_capturing
    if _faking():
        return False
    if building_only_active():  # `precompile_kernels`: build the check's kernels, trust for now
        if key not in _CHECKS_BUILT:
            _CHECKS_BUILT.add(key)
            check()
        return True
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        try:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_kept, _kept))
        except RuntimeError:  # hooks disabled here (torch's compiled regions): none to bypass
            pass
        record = check()
    ok = _VARIANT_OK[key] = bool(record["ok"])
    if not ok:
        _FAILED.add(key)
        warnings.warn(_report(device, key, str(record["error"]), fallback, label),
                      RuntimeWarning, stacklevel=4)
    return ok


def _faking() -> bool:
    """Whether a ``FakeTensorMode`` is active (shape inference, memory estimation): tensors
    hold no data, so no kernel runs and a check would fail for that alone; the torch paths run
    on fake tensors."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _kept(t: torch.Tensor) -> torch.Tensor:
    """A saved tensor, packed and unpacked as it is."""
    return t


def kernel_readable(t: torch.Tensor) -> bool:
    """Whether a kernel may read ``t`` through its address (a table of addresses, a raw
    pointer): a plain tensor or parameter. Not a tensor subclass: the DTensor of an FSDP2
    shard reports address 0, and a wrapper subclass holds no memory of its own."""
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


# Slot buffer dtypes the penalty's kernels take (`kernels.orth_penalty.PENALTY_DTYPES`).
PENALTY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def penalty_on_triton(lora_A: torch.Tensor) -> bool:
    """Whether the orthogonal penalty over buffers like ``lora_A`` may take its Triton kernels
    (`kernels.orth_penalty.OrthPenalty`): where the layers would (`select_backend`), not while
    torch.compile traces (the torch path compiles into its graph). The caller also asks
    `orth_penalty_ok` for each buffer dtype before it builds the kernels' tables."""
    return select_backend(lora_A) == "triton" and not torch.compiler.is_compiling()


def orth_penalty_ok(device: torch.device, dtype: torch.dtype, r_max: int) -> bool:
    """Whether the orthogonal penalty's kernels may run on ``dtype`` slot buffers of up to
    ``r_max`` slots on ``device``: a dtype and ``r_max`` they take, checked once per device,
    dtype and slot tile (`_slot_tile`: the kernels are built per tile) against float64
    (`kernels.checks.check_orth_penalty` at that tile, loss and every gradient); on a wrong
    result one warning, and the penalty takes its torch path there. True without checking
    when ``INCRELORA_KERNEL_CHECK=0``; False, unchecked and not remembered, while compiling or
    capturing a CUDA graph."""
    if dtype not in PENALTY_DTYPES or r_max > TRITON_MAX_R:
        return False
    tile = _slot_tile(r_max)

    def check() -> Dict[str, object]:
        from .kernels.checks import check_orth_penalty, orth_shapes_at
        return check_orth_penalty(device, dtype, shapes=orth_shapes_at(tile))
    return _checked_once(device, (str(device), "orth_penalty", dtype, tile), check,
                         "The orthogonal penalty now takes its torch path there",
                         label=f"orthogonal penalty, {dtype_name(dtype)} slot buffers, "
                               f"slot tile {tile}")


def reset_kernel_checks() -> None:
    """Forget the first-use check results (tests; after changing GPUs or versions)."""
    _VARIANT_OK.clear()
    _FAILED.clear()
    _PATHS.clear()
    _CHECKS_BUILT.clear()


def choose_path(x: torch.Tensor, weight: Optional[torch.Tensor], lora_A: torch.Tensor,
                weight_in_out: bool, has_bias: bool, dropout: bool,
                exact_step: bool) -> str:
    """``"torch"``, ``"triton"`` or ``"fused"`` for one call (see the module docstring); the
    decision is cached per (devices, dtypes, autocast, r_max, flags). A bias is taken to be of
    the weight's dtype.

    Raises:
        RuntimeError: ``weight``'s dtype and x's differ where ``nn.Linear`` would refuse them
            (`refuse_mixed_base_dtypes`).
    """
    bias_dtype = (x.dtype if weight is None else weight.dtype) if has_bias else None
    return _path_and_dtype(x, weight, bias_dtype, lora_A, weight_in_out, dropout,
                           exact_step, torch.compiler.is_dynamo_compiling())[0]


def _path_and_dtype(x: torch.Tensor, weight: Optional[torch.Tensor],
                    bias_dtype: Optional[torch.dtype], lora_A: torch.Tensor,
                    weight_in_out: bool, dropout: bool, exact_step: bool,
                    tracing: bool) -> Tuple[str, torch.dtype]:
    """(`choose_path`, the compute dtype: the autocast dtype under autocast, else x's, as
    `kernels.utils.compute_dtype`), from one read of the autocast state; a new key is first
    checked by `refuse_mixed_base_dtypes` (raising, it is not remembered). ``tracing``
    (dynamo's): decided without the cache, whose read dynamo would guard on (an eager call
    remembering the key later recompiled every graph traced before it)."""
    device = x.device
    autocast = torch.is_autocast_enabled(device.type) and x.dtype != torch.float64 and \
        torch.get_autocast_dtype(device.type)
    key = (device, x.dtype, autocast, lora_A.dtype, lora_A.shape[0],
           None if weight is None else weight.dtype, weight_in_out, bias_dtype, dropout,
           exact_step)
    path = None if tracing else _PATHS.get(key)
    if path is None:
        if weight is not None:
            refuse_mixed_base_dtypes(x.dtype, weight.dtype, bias_dtype, device.type)
        path = _decide_path(x, weight, lora_A, weight_in_out, bias_dtype is not None, dropout,
                            exact_step)
        # A variant checked while capturing, compiling or only building kernels is trusted
        # unchecked, and one under fake tensors refused unchecked: decide again.
        if not (torch.compiler.is_compiling() or building_only_active() or _faking()
                or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
            _PATHS[key] = path
    return path, autocast or x.dtype


def refuse_mixed_base_dtypes(x_dtype: torch.dtype, weight_dtype: torch.dtype,
                             bias_dtype: Optional[torch.dtype], device_type: str) -> None:
    """RuntimeError where ``nn.Linear`` (and transformers Conv1D) refuse a ``x_dtype`` input to
    a base of ``weight_dtype`` (and ``bias_dtype``) on ``device_type`` now: without autocast the
    dtypes must be equal; autocast casts float32, bfloat16 and float16 tensors to its dtype and
    leaves float64 alone, so float64 must meet float64. The torch path's ``F.linear`` raises
    there by itself; the Triton path would cast the weight to x's dtype and compute silently,
    so both paths ask this first, with one message."""
    autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)

    def cast(dtype: torch.dtype) -> torch.dtype:
        return autocast if autocast and dtype != torch.float64 else dtype
    for name, dtype in (("weight", weight_dtype), ("bias", bias_dtype)):
        if dtype is not None and cast(dtype) != cast(x_dtype):
            under = f" under {device_type} autocast to {autocast}" if autocast else ""
            raise RuntimeError(
                f"adapted linear: a {x_dtype} input to a base layer with a {dtype} {name}"
                f"{under}, which nn.Linear refuses too; cast the input or the model to one "
                "dtype, or run under torch.autocast (it casts both unless one is float64)")


def _decide_path(x: torch.Tensor, weight: Optional[torch.Tensor], lora_A: torch.Tensor,
                 weight_in_out: bool, has_bias: bool, dropout: bool, exact_step: bool) -> str:
    if select_backend(x) != "triton" or lora_A.shape[0] > TRITON_MAX_R:
        return "torch"
    fused = weight is not None and not dropout and not exact_step and _SETTINGS[1]
    key = _variant(x, weight, lora_A, weight_in_out, has_bias, fused, dropout)
    if not _variant_ok(key):
        return "torch"
    return "fused" if fused else "triton"


def adapted_linear(x: torch.Tensor, base_weight: Optional[torch.Tensor],
                   base_bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                   lora_B: torch.Tensor, lora_lambda: torch.Tensor,
                   slot_state: Optional[torch.Tensor], lora_alpha: float,
                   reserve_value: float, *, weight_in_out: bool = False,
                   base_forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   dropout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   score_out: Optional[torch.Tensor] = None,
                   grad_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Base plus adapter for x of any leading shape, on the path `choose_path` picks.

    Args:
        x: (..., in).
        base_weight, base_bias: the frozen base linear, (out, in) or with ``weight_in_out``
            (in, out) like transformers Conv1D; ignored when ``base_forward`` is given.
        base_forward: computes the base output itself (quantized or other bases); the adapter
            is then added out of place on the torch or Triton adapter path.
        lora_A, lora_B, lora_lambda, slot_state, lora_alpha, reserve_value: the slot buffers
            and how lambda becomes effective (`reference.effective_lambda`).
        dropout: applied to the adapter's input only (None or inactive: the adapter reads x).
        score_out: 0-d float32 accumulator of the exact per-pass module score.
        grad_out: (out, in) float32 accumulator of ``dy^T x`` (exact-step score mode).
    """
    x_adapter = dropout(x) if dropout is not None else None
    weight = None if base_forward is not None else base_weight
    tracing = torch.compiler.is_dynamo_compiling()
    if _functorch_active():
        # torch.func transforms (grad, vmap) run only the torch path's autograd, compiled too
        # (dynamo answers this test as it traces); nor may the Triton path's first-use check
        # run there
        path = "torch"
    else:
        path, out_dtype = _path_and_dtype(x, weight,
                                          None if base_bias is None else base_bias.dtype,
                                          lora_A, weight_in_out, x_adapter is not None,
                                          grad_out is not None, tracing)
    if path == "torch":
        return adapted_linear_torch(x, base_weight, base_bias, lora_A, lora_B, lora_lambda,
                                    slot_state, lora_alpha, reserve_value,
                                    weight_in_out=weight_in_out, base_forward=base_forward,
                                    x_adapter=x_adapter, score_out=score_out, grad_out=grad_out)
    # (the op is not read from its module global while dynamo traces: see `_triton_op`)
    apply_adapted_linear = _triton_op() if tracing else _TRITON_OP or _triton_op()
    alpha, reserve = float(lora_alpha), float(reserve_value)
    flat = x.dim() != 2  # the op takes (M, in): other shapes go through a reshape
    if flat:
        lead, in_features = x.shape[:-1], lora_A.shape[1]
        x2 = x.reshape(-1, in_features)
        xa2 = None if x_adapter is None else x_adapter.reshape(-1, in_features)
    else:
        x2, xa2 = x, x_adapter
    if base_forward is not None:
        y = base_forward(x).reshape(x2.shape[0], -1)
        delta = apply_adapted_linear(x2 if xa2 is None else xa2, None, None, None, lora_A,
                                     lora_B, lora_lambda, slot_state, False, alpha, reserve,
                                     score_out, grad_out, out_dtype, False)
        out = y + delta.to(y.dtype)
    else:
        out = apply_adapted_linear(x2, xa2, weight, base_bias, lora_A, lora_B, lora_lambda,
                                   slot_state, weight_in_out, alpha, reserve, score_out,
                                   grad_out, out_dtype, path == "fused")
    return out.reshape(*lead, out.shape[-1]) if flat else out


# `_triton_op`'s import, kept after the first Triton call.
_TRITON_OP: Optional[Callable] = None


def _triton_op() -> Callable:
    """`kernels.linear.apply_adapted_linear` (`adapted_linear_triton` with its arguments
    resolved here), imported on the first Triton call only (the package works without
    triton). Kept in a module global, which `adapted_linear` reads outside dynamo's trace
    only: a traced read guards on it, and a graph traced before the first import recompiled
    once the global was set. Not an ``lru_cache``: dynamo traces through that cache and warns
    that it ignores it."""
    global _TRITON_OP
    from .kernels.linear import apply_adapted_linear
    _TRITON_OP = apply_adapted_linear
    return apply_adapted_linear


def kernel_check_results() -> Dict[tuple, bool]:
    """A copy of {variant: passed} of the first-use checks run in this process."""
    return dict(_VARIANT_OK)

