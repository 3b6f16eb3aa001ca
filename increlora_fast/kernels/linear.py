"""The whole adapted linear as one autograd op: ``y = x W^T + bias + ((x A^T) * lam_eff) B^T``.

Forward (3 launches): cuBLAS writes y (the frozen layer's own GEMM), `_project_kernel` writes the
small H = x A^T (M x r_max, float32) and `_expand_kernel` adds the adapter into y **in place**.
With ``fused_gemm`` one Triton GEMM writes y with the adapter already in its accumulator instead
(opt-in, `fused_linear.py`).

Backward (3 launches; 4 with the score): cuBLAS writes dx = dy W; `_backward_rows_kernel` makes
one pass over dy per row block giving T = dy B in registers, adds the adapter's dx = (T * lam_eff)
A into dx in place and writes per-program partials of G_B = dy^T H, dA = (T * lam_eff)^T x and
dlambda = sum H * T; when the score is tracked `score._score_tiles_kernel` writes per-tile
partials of ``sum |dW * dy^T x|``; `_finish_kernel` sums every partial in a fixed order into dB,
dA, dlambda and the score. No atomics, no memset, no activation-sized tensor beyond the frozen
layer's y and dx, nothing of size out x in. From ``GEMM_BACKWARD_ROWS`` rows on (off by default)
the adapter's part runs as cuBLAS GEMMs and aten ops instead (`gemm_backward`).

Host work is paid once per (shapes, dtypes, device, flags): `_plan` validates the operands and
picks block sizes and grids the first time it sees a key and caches the result; a call then
looks its plan up, allocates outputs and launches. The frozen weight is cast to the compute
dtype once per weight version (`_cast_cached`), not twice per step. The slot mask, the reserve
value and the ``alpha / active_rank`` scale are applied inside the kernels from ``slot_state``,
so a forward+backward issues the same launches however many slots are in use. Under
``torch.compile`` the same code runs inside the custom ops ``increlora::adapted_linear_fwd`` /
``_bwd`` so dynamo sees opaque ops with fake implementations; called directly on tensors that
require grad, ``_fwd`` is differentiable on its own (its registered autograd runs ``_bwd``).
"""
from __future__ import annotations

import os
import weakref
from typing import Dict, Optional, Tuple

import torch
from torch._C._functorch import unwrap_if_dead
from torch._C import _are_functorch_transforms_active as _functorch_active
from torch.autograd.function import once_differentiable

from .lowrank import (Slots, _backward_rows_kernel, _expand_kernel, _finish_kernel,
                      _project_kernel)
from .reference import accumulate_dense_grad_
from .gemm_backward import gemm_adapter_backward
from .score import _score_tiles_kernel, dw_dot, score_tiles
from .utils import (MAX_R_MAX, acc_dtype, block, check_device, check_dtype, compute_dtype,
                    dot_config, is_interpreted, multiprocessor_count, row_major)
from . import utils as _utils

_OP = "adapted_linear_triton"


# ---------------------------------------------------------------- cached host work
class _Plan:
    """The launch configuration of one (shapes, dtypes, device, flags) key, built once.

    Everything except the row count M: grids that depend on M are two integer divisions per
    call. ``dot`` holds the constexpr dtypes of the launches."""

    __slots__ = ("dot", "slots_const", "br", "proj", "proj_warps", "exp", "exp_warps",
                 "rows", "rows_warps", "row_programs", "fin", "score", "score_warps", "score_dw",
                 "acc", "gemm_rows")

    def __init__(self, out_dtype: torch.dtype, r: int, slots: bool, device: torch.device,
                 interpreted: bool, out_features: int, in_features: int) -> None:
        cfg = dot_config(out_dtype, interpreted)
        self.dot = dict(OP=cfg.op, DOT=cfg.dot, ACC=cfg.acc, PRECISION=cfg.precision)
        self.score_dw = dw_dot(cfg, interpreted)
        self.acc = cfg.acc_torch
        br = block(r, MAX_R_MAX)
        self.br = br
        self.slots_const = slots
        wide = out_dtype in (torch.float32, torch.float64)  # IEEE dots on FMA: smaller tiles
        if interpreted:
            t = INTERPRETED_TILE
            self.proj = (t, 16, t)            # BLOCK_M, BLOCK_R, BLOCK_K
            self.exp = (t, t, 16)             # BLOCK_M, BLOCK_N, BLOCK_R
            self.rows = (t, t, t)             # BLOCK_M, BLOCK_N, BLOCK_K
            self.fin = (t, t, 16)             # BLOCK_N, BLOCK_K, BLOCK_S
            self.score = (t, t, t)            # BLOCK_N, BLOCK_K, BLOCK_M
            self.proj_warps = self.exp_warps = self.rows_warps = self.score_warps = 1
        else:
            self.proj = (64, br, 64 if br <= 64 else 32)
            self.proj_warps = 8 if br >= 128 else 4
            self.exp = (64, 64 if wide else 128, block(r, 32))
            self.exp_warps = 8 if self.exp[2] >= 32 else 4
            if wide:
                self.rows = (32, 32, 32) if br <= 32 else (16, 16, 16)
            else:
                # (K by 32 at r_max 128: by 64, Triton 3.6 needs more shared memory than an
                # sm_86/89 block has)
                self.rows = (32, 64, 64) if br <= 32 else (32, 32, 64) if br <= 64 \
                    else (32, 32, 32)
            self.rows_warps = 8 if br >= 64 else 4
            self.fin = (64, 64, 256)
        sms = multiprocessor_count(device)
        self.row_programs = sms * ROW_PROGRAMS_PER_SM
        self.gemm_rows = GEMM_BACKWARD_ROWS
        if not interpreted:
            self.score, self.score_warps = score_tiles(out_features, in_features, br, wide, sms)


# From how many rows (tokens) a layer's backward runs the adapter's part as cuBLAS GEMMs
# (`gemm_backward`) instead of the row and finish kernels; None: never. Read when a plan is made
# (`clear_plan_cache` after changing it). None until a GPU run has timed both designs at small
# layers too (gpu-check's dy-pass records): on the H200 the GEMMs took half the kernels' GPU
# time at 16,384 tokens, on 768 -> 3072 and 4096 -> 11008 alike.
GEMM_BACKWARD_ROWS: Optional[int] = None


def _interpreted_tile(text: Optional[str]) -> int:
    """The tile edge ``INCRELORA_INTERPRETED_TILE`` asks for (16 when unset): 16, 32, 64 or
    128; ValueError naming the variable otherwise."""
    if text is None:
        return 16
    if text.strip() not in ("16", "32", "64", "128"):
        raise ValueError(f"INCRELORA_INTERPRETED_TILE={text!r} is invalid: use 16, 32, 64 or 128 "
                         "(the token and feature tiles of kernels under the Triton interpreter)")
    return int(text)


# The token and feature tiles of a plan under the Triton interpreter (CPU tests), read when a
# plan is made (`clear_plan_cache` after changing it). 16: the small odd shapes of the kernel
# tests span several tiles and partial ones, the masking and sweeps a GPU runs at real sizes.
# The interpreter's cost is per program, not per element, so tests of whole training loops
# raise it to 64 (4x faster on a tiny BERT's layers: 0.73 -> 0.19 s a forward and backward):
# in this process, or in a subprocess (the gpu-check dry run's test) through the environment
# variable, read once here. A GPU's plans do not read it.
INTERPRETED_TILE = _interpreted_tile(os.environ.get("INCRELORA_INTERPRETED_TILE"))
# Programs per SM of `_backward_rows_kernel`'s row split (each writes its own partials of dB and
# dA, which `_finish_kernel` sums): 1 keeps the partials small; gpu-check times 4 beside it.
ROW_PROGRAMS_PER_SM = 1

_PLANS: Dict[tuple, _Plan] = {}
# The kernels were built by the Triton interpreter: no TF32 whatever torch allows (`dot_config`).
_INTERPRETED = is_interpreted(_project_kernel)


def _plan(x: torch.Tensor, x_adapter: Optional[torch.Tensor], weight: Optional[torch.Tensor],
          bias: Optional[torch.Tensor], weight_in_out: bool, lora_A: torch.Tensor,
          lora_B: torch.Tensor, lora_lambda: torch.Tensor, slot_state: Optional[torch.Tensor],
          score_out: Optional[torch.Tensor], out_dtype: torch.dtype) -> _Plan:
    """The cached plan of these operands; the first call of a key validates them
    (`check_adapter_args`), later calls with the same key skip every check."""
    key = (x.shape[1], lora_A.shape, lora_B.shape, lora_lambda.shape, x.dtype, lora_A.dtype,
           lora_B.dtype, lora_lambda.dtype, x.device, lora_A.device, out_dtype,
           None if weight is None else (weight.shape, weight.dtype, weight.device,
                                        weight.requires_grad),
           None if bias is None else (bias.shape, bias.dtype, bias.requires_grad),
           weight_in_out, x_adapter is None, slot_state is None,
           None if score_out is None else (score_out.shape, score_out.dtype),
           _utils.tf32_enabled() if out_dtype == torch.float32 and not _INTERPRETED else None)
    plan = _PLANS.get(key)
    if plan is None:
        device = check_adapter_args(_OP, x, lora_A, lora_B, lora_lambda, slot_state, score_out,
                                    weight, bias, weight_in_out)
        if x_adapter is not None and (x_adapter.shape != x.shape
                                      or x_adapter.device != x.device):
            raise ValueError(f"{_OP}: x_adapter must match x, got {tuple(x_adapter.shape)} on "
                             f"{x_adapter.device} vs {tuple(x.shape)} on {x.device}")
        plan = _Plan(out_dtype, lora_A.shape[0], slot_state is not None, device, _INTERPRETED,
                     lora_B.shape[0], lora_A.shape[1])
        _PLANS[key] = plan
    return plan


def clear_plan_cache() -> None:
    """Forget every cached launch plan and weight cast (tests; after changing devices)."""
    _PLANS.clear()
    _CASTS.clear()


# (id(tensor), dtype) -> (weak reference to the tensor, its version, its data address, its cast)
_CASTS: Dict[tuple, tuple] = {}


def _cast_cached(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t`` in ``dtype``: the frozen base weight (or bias) is cast once and reused until it is
    changed in place (its version counter moves, e.g. by a merge), given new data (``t.data =
    ...``, as module conversions and ``vector_to_parameters`` do: the same parameter and
    version, another address) or freed. A write through ``t.data`` in place moves neither and
    is not seen."""
    if t is None or t.dtype == dtype:
        return t
    if torch.compiler.is_compiling() or t.requires_grad:
        return t.to(dtype)
    key = (id(t), dtype)
    hit = _CASTS.get(key)
    address = t.data_ptr()
    if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] == address:
        return hit[3]
    cast = t.to(dtype)
    _CASTS[key] = (weakref.ref(t, lambda _, k=key: _CASTS.pop(k, None)), t._version, address,
                   cast)
    return cast


# ---------------------------------------------------------------- forward and backward
def _base_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  weight_in_out: bool) -> torch.Tensor:
    """cuBLAS ``x W^T + bias``, or ``x W + bias`` for a transformers Conv1D weight (in, out)."""
    if weight_in_out:
        return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
    return torch.nn.functional.linear(x, weight, bias)


def adapted_linear_forward(x: torch.Tensor, x_adapter: Optional[torch.Tensor],
                           weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           weight_in_out: bool, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           lora_lambda: torch.Tensor, slot_state: Optional[torch.Tensor],
                           alpha: float, reserve: float, out_dtype: torch.dtype,
                           need_all: bool, fused_gemm: bool, plan: Optional[_Plan] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, H). ``x`` and ``x_adapter`` are in ``out_dtype`` with unit inner stride; without a
    weight y is the adapter output alone. ``plan``: these operands' `_plan`, when the caller
    has it already."""
    if plan is None:
        plan = _plan(x, x_adapter, weight, bias, weight_in_out, lora_A, lora_B, lora_lambda,
                     slot_state, None, out_dtype)
    xa = x if x_adapter is None else x_adapter
    M, K = x.shape
    R, N = lora_A.shape[0], lora_B.shape[0]
    # (lam, state) kernel arguments: direct mode passes lambda in the state's place (unread).
    lam, state = lora_lambda, slot_state if slot_state is not None else lora_lambda
    h = torch.empty(M, R, dtype=plan.acc, device=x.device)
    bm, br, bk = plan.proj
    sx, sa = xa.stride(), lora_A.stride()
    _utils.launch(_project_kernel, (-(-M // bm), -(-R // br)),
            xa, lora_A, lam, state, h, M, K, R, alpha, reserve,
            sx[0], sx[1], sa[0], sa[1], R, 1,
            SLOTS=plan.slots_const, NEED_ALL=need_all, R_ALL=plan.br, BLOCK_M=bm, BLOCK_R=br,
            BLOCK_K=bk, **plan.dot, num_warps=plan.proj_warps)
    if weight is None:
        y = torch.empty(M, N, dtype=out_dtype, device=x.device)
        accumulate = False
    else:
        w = weight if weight.dtype == out_dtype else _cast_cached(weight, out_dtype)
        b = bias if bias is None or bias.dtype == out_dtype else _cast_cached(bias, out_dtype)
        if fused_gemm and x_adapter is None:
            from .fused_linear import fused_linear_forward
            cfg = dot_config(out_dtype, _INTERPRETED)
            slots = Slots(lora_lambda, slot_state, alpha, reserve)
            return fused_linear_forward(x, w, b, weight_in_out, h, lora_B, slots, cfg), h
        y = _base_forward(x, w, b, weight_in_out)
        accumulate = True
    sb, sy = lora_B.stride(), y.stride()
    bm, bn, br = plan.exp
    _utils.launch(_expand_kernel, (-(-M // bm), -(-N // bn)),
            h, lam, state, lora_B, y, M, N, R, alpha, reserve,
            R, 1, sb[1], sb[0], sy[0], sy[1],
            SLOTS=plan.slots_const, ACCUMULATE=accumulate, R_ALL=plan.br, BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_R=br, **plan.dot, num_warps=plan.exp_warps)
    return y, h


def adapted_linear_backward(dy: torch.Tensor, x: torch.Tensor, x_adapter: Optional[torch.Tensor],
                            weight: Optional[torch.Tensor], weight_in_out: bool,
                            lora_A: torch.Tensor, lora_B: torch.Tensor,
                            lora_lambda: torch.Tensor, slot_state: Optional[torch.Tensor],
                            alpha: float, reserve: float, h: torch.Tensor,
                            score_out: Optional[torch.Tensor], grad_out: Optional[torch.Tensor],
                            need_x: bool, need_xa: bool, need_a: bool, need_b: bool,
                            need_lam: bool, plan: Optional[_Plan] = None
                            ) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dx_adapter, dA, dB, dlambda), None where not needed.

    dx carries the base's ``dy W`` and, when the adapter reads x itself, the adapter's dx added
    in place; with a separate adapter input (dropout) its gradient is dx_adapter. Adds the exact
    module score into ``score_out`` and ``dy^T x`` into ``grad_out`` when given. ``plan``: the
    forward's `_plan` (the same key), when the caller kept it.
    """
    if dy.stride(-1) != 1:  # `row_major`, inline: a backward runs it on every layer call
        dy = dy.contiguous()
    out_dtype = dy.dtype
    if plan is None:
        plan = _plan(x, x_adapter, weight, None, weight_in_out, lora_A, lora_B, lora_lambda,
                     slot_state, score_out, out_dtype)
    xa = x if x_adapter is None else x_adapter
    M, K = xa.shape
    R, N = lora_A.shape[0], lora_B.shape[0]
    device = dy.device
    lam, state = lora_lambda, slot_state if slot_state is not None else lora_lambda
    reads_x = x_adapter is None  # the adapter's input is x itself
    need_adapter_dx = need_x if reads_x else need_xa
    dx = dxa = None
    if need_x and weight is not None:
        w = weight if weight.dtype == out_dtype else _cast_cached(weight, out_dtype)
        dx = torch.mm(dy, w.t() if weight_in_out else w)
    accumulate_dx = reads_x and dx is not None
    target = None
    if need_adapter_dx:
        target = dx if accumulate_dx else torch.empty(xa.shape, dtype=xa.dtype, device=device)
        if reads_x:
            dx = target
        else:
            dxa = target
    sa, sb, sx = lora_A.stride(), lora_B.stride(), xa.stride(0)
    acc = plan.acc
    d_a = db = dlam = None
    progs = 0
    gb = da = dl = h
    if plan.gemm_rows is not None and M >= plan.gemm_rows:  # cuBLAS GEMMs and aten ops
        d_a, db, dlam = gemm_adapter_backward(
            dy, xa, lora_A, lora_B, lora_lambda, slot_state, alpha, reserve, h, target,
            accumulate_dx, need_a, need_b, need_lam, acc)
        need_a = need_b = need_lam = False  # done: the finish kernel only sums the score
    elif need_adapter_dx or need_a or need_b or need_lam:
        bm, bn, bk = plan.rows
        m_blocks = -(-M // bm)
        per_prog = -(-m_blocks // max(1, min(m_blocks, plan.row_programs)))
        progs = -(-m_blocks // per_prog) if M else 0
        # Sizes as separate ints: torch parses them faster than a shape tuple. The gradients
        # are row-major whatever the buffers' strides (a transposed view), as the fake says.
        if need_b:
            gb = torch.empty(progs, N, R, dtype=acc, device=device)
            db = torch.empty(N, R, dtype=lora_B.dtype, device=device)
        if need_a:
            da = torch.empty(progs, R, K, dtype=acc, device=device)
            d_a = torch.empty(R, K, dtype=lora_A.dtype, device=device)
        if need_lam:
            dl = torch.empty(progs, R, dtype=acc, device=device)
            dlam = torch.empty(R, dtype=lora_lambda.dtype, device=device)
        dx_arg = target if target is not None else h
        _utils.launch(_backward_rows_kernel, (progs,),
                dy, lora_B, h, lora_A, xa, lam, state, dx_arg, gb, da, dl,
                M, N, K, R, alpha, reserve, per_prog,
                dy.stride(0), h.stride(0), sx, dx_arg.stride(0), sb[0], sb[1], sa[0], sa[1],
                SLOTS=plan.slots_const, NEED_ALL=need_lam, NEED_DX=need_adapter_dx,
                DX_ACCUMULATE=accumulate_dx, NEED_GB=need_b, NEED_DA=need_a,
                NEED_DLAM=need_lam, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=plan.br,
                **plan.dot, num_warps=plan.rows_warps)
    parts = h
    n_parts = 0
    if score_out is not None:
        sn, sk, sm = plan.score
        grid = (-(-N // sn), -(-K // sk))
        n_parts = grid[0] * grid[1]
        parts = torch.empty(n_parts, dtype=acc, device=device)
        _utils.launch(_score_tiles_kernel, grid,
                dy, xa, lora_A, lora_B, lam, state, parts, M, N, K, R, alpha, reserve,
                dy.stride(0), sx, sa[0], sa[1], sb[0], sb[1],
                SLOTS=plan.slots_const, BLOCK_N=sn, BLOCK_K=sk, BLOCK_M=sm, BLOCK_R=plan.br,
                **plan.dot, **plan.score_dw, num_warps=plan.score_warps)
    if need_a or need_b or need_lam or score_out is not None:
        fn, fk, fs = plan.fin
        tiles_db = -(-N // fn) if need_b else 0
        tiles_da = -(-K // fk) if need_a else 0
        db_arg = db if need_b else lora_B
        da_arg = d_a if need_a else lora_A
        _utils.launch(_finish_kernel, (tiles_db + tiles_da + 1,),
                gb, da, dl, parts, lora_B, lam, state, db_arg, da_arg,
                dlam if need_lam else lam,
                score_out if score_out is not None else parts,
                N, K, R, progs, alpha, reserve, tiles_db, tiles_da, n_parts,
                (N * K) ** -0.5, sb[0], sb[1], *db_arg.stride(), *da_arg.stride(),
                SLOTS=plan.slots_const, NEED_DB=need_b, NEED_DA=need_a, NEED_DLAM=need_lam,
                NEED_SCORE=score_out is not None, BLOCK_R=plan.br, BLOCK_N=fn, BLOCK_K=fk,
                BLOCK_S=fs, ACC=plan.dot["ACC"])
    if grad_out is not None:
        accumulate_dense_grad_(grad_out, dy, xa)
    return dx, dxa, d_a, db, dlam


# ---------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("increlora::adapted_linear_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, x_adapter: Optional[torch.Tensor], weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], weight_in_out: bool, lora_A: torch.Tensor,
            lora_B: torch.Tensor, lora_lambda: torch.Tensor, slot_state: Optional[torch.Tensor],
            alpha: float, reserve: float, out_dtype: torch.dtype, need_all: bool,
            fused_gemm: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return adapted_linear_forward(x, x_adapter, weight, bias, weight_in_out, lora_A, lora_B,
                                  lora_lambda, slot_state, alpha, reserve, out_dtype, need_all,
                                  fused_gemm)


@_fwd_op.register_fake
def _(x, x_adapter, weight, bias, weight_in_out, lora_A, lora_B, lora_lambda, slot_state, alpha,
      reserve, out_dtype, need_all, fused_gemm):
    M = x.shape[0]
    return (x.new_empty((M, lora_B.shape[0]), dtype=out_dtype),
            x.new_empty((M, lora_A.shape[0]), dtype=acc_dtype(out_dtype)))


def _fwd_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    """What `_fwd_backward` needs of a direct call of ``_fwd_op`` on tensors that require grad
    (`AdaptedLinearFunction` calls it with grad mode off: no autograd node)."""
    (x, x_adapter, weight, _, weight_in_out, lora_A, lora_B, lora_lambda, slot_state, alpha,
     reserve, _, need_all, _) = inputs
    if ctx.needs_input_grad[7] and not need_all:
        raise ValueError("increlora::adapted_linear_fwd: need_all=False while lora_lambda "
                         "requires grad; pass need_all=True (H of every slot, for dlambda)")
    ctx.save_for_backward(x, x_adapter, weight, lora_A, lora_B, lora_lambda, slot_state,
                          output[1])
    ctx.meta = (weight_in_out, alpha, reserve)
    ctx.mark_non_differentiable(output[1])


def _fwd_backward(ctx, dy: torch.Tensor, _: Optional[torch.Tensor]) -> tuple:
    """Gradients of x, x_adapter and the slot buffers (the base weight and bias are frozen):
    ``_bwd_op`` without score or dense-gradient accumulators."""
    x, x_adapter, weight, lora_A, lora_B, lora_lambda, slot_state, h = ctx.saved_tensors
    weight_in_out, alpha, reserve = ctx.meta
    wanted = ctx.needs_input_grad
    # y reads x through the base weight or as the adapter's input: no dx without either
    need = (wanted[0] and (weight is not None or x_adapter is None), wanted[1], wanted[5],
            wanted[6], wanted[7])
    dx, dxa, da, db, dlam = (g if n else None for g, n in zip(
        _bwd_op(dy, x, x_adapter, weight, weight_in_out, lora_A, lora_B, lora_lambda,
                slot_state, alpha, reserve, h, None, None, *need), need))
    return dx, dxa, None, None, None, da, db, dlam, None, None, None, None, None, None


@torch.library.custom_op("increlora::adapted_linear_bwd", mutates_args=("score_out", "grad_out"))
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, x_adapter: Optional[torch.Tensor],
            weight: Optional[torch.Tensor], weight_in_out: bool, lora_A: torch.Tensor,
            lora_B: torch.Tensor, lora_lambda: torch.Tensor, slot_state: Optional[torch.Tensor],
            alpha: float, reserve: float, h: torch.Tensor, score_out: Optional[torch.Tensor],
            grad_out: Optional[torch.Tensor], need_x: bool, need_xa: bool, need_a: bool,
            need_b: bool, need_lam: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, torch.Tensor]:
    grads = adapted_linear_backward(dy, x, x_adapter, weight, weight_in_out, lora_A, lora_B,
                                    lora_lambda, slot_state, alpha, reserve, h, score_out,
                                    grad_out, need_x, need_xa, need_a, need_b, need_lam)
    # A custom op returns tensors only: an empty one stands for "not needed".
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_bwd_op.register_fake
def _(dy, x, x_adapter, weight, weight_in_out, lora_A, lora_B, lora_lambda, slot_state, alpha,
      reserve, h, score_out, grad_out, need_x, need_xa, need_a, need_b, need_lam):
    def like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed \
            else x.new_empty(0)
    # y reads x through the base weight or as the adapter's input: no dx without either.
    has_dx = need_x and (weight is not None or x_adapter is None)
    return (like(x, has_dx), like(x_adapter, need_xa and x_adapter is not None),
            like(lora_A, need_a),
            like(lora_B, need_b), like(lora_lambda, need_lam))


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


class AdaptedLinearFunction(torch.autograd.Function):
    """Autograd of `adapted_linear_triton`; the frozen base weight and bias get no gradient.

    The differentiable inputs come first; everything else travels in one ``meta`` tuple
    (weight_in_out, alpha, reserve, score_out, grad_out, out_dtype, fused_gemm, plan), since
    every argument of ``apply`` costs host time on every call. ``plan`` is the operands' `_plan`
    (one lookup serves forward and backward; the score accumulator is in its key), or None under
    torch.compile, where forward and backward run the custom ops ``_fwd_op`` / ``_bwd_op``."""

    @staticmethod
    def forward(ctx, x, x_adapter, lora_A, lora_B, lora_lambda, weight, bias, slot_state, meta):
        weight_in_out, alpha, reserve, _, _, out_dtype, fused_gemm, plan = meta
        args = (x, x_adapter, weight, bias, weight_in_out, lora_A, lora_B, lora_lambda,
                slot_state, alpha, reserve, out_dtype, ctx.needs_input_grad[4], fused_gemm)
        if plan is None:
            y, h = _fwd_op(*args)
        else:
            y, h = adapted_linear_forward(*args, plan=plan)
        ctx.save_for_backward(x, x_adapter, weight, lora_A, lora_B, lora_lambda, slot_state, h)
        ctx.meta = meta
        return y

    @staticmethod
    def backward(ctx, dy):
        # Grad mode is on here only when the backward records a graph (create_graph=True):
        # then once_differentiable's guard against differentiating it again applies. A plain
        # backward runs with grad mode off already and skips that wrapper's context manager.
        if torch.is_grad_enabled():
            return _backward_once(ctx, dy)
        return _backward(ctx, dy)


def _backward(ctx, dy: torch.Tensor) -> tuple:
    """`AdaptedLinearFunction.backward` itself: the eager kernels with the forward's plan, or
    the custom op when the forward was compiled or this backward is being compiled."""
    x, x_adapter, weight, lora_A, lora_B, lora_lambda, slot_state, h = ctx.saved_tensors
    weight_in_out, alpha, reserve, score_out, grad_out, _, _, plan = ctx.meta
    need = ctx.needs_input_grad[:5]
    if weight is None and x_adapter is not None:  # y reads x only through x_adapter: no dx
        need = (False,) + need[1:]
    args = (dy, x, x_adapter, weight, weight_in_out, lora_A, lora_B, lora_lambda,
            slot_state, alpha, reserve, h, score_out, grad_out, *need)
    if plan is None or torch.compiler.is_compiling():
        grads = tuple(g if wanted else None for g, wanted in zip(_bwd_op(*args), need))
    else:
        grads = adapted_linear_backward(*args, plan=plan)
    dx, dxa, da, db, dlam = grads
    return dx, dxa, da, db, dlam, None, None, None, None


_backward_once = once_differentiable(_backward)
# ``AdaptedLinearFunction.apply`` without the Python wrapper `torch.autograd.Function.apply`
# puts around it (which routes functorch transforms and unwraps dead functorch wrappers):
# `apply_adapted_linear` calls it directly outside functorch transforms and torch.compile.
_apply_eager = super(torch.autograd.Function, AdaptedLinearFunction).apply


def check_adapter_args(op_name: str, x: torch.Tensor, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, lora_lambda: torch.Tensor,
                       slot_state: Optional[torch.Tensor],
                       score_out: Optional[torch.Tensor],
                       weight: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None,
                       weight_in_out: bool = False) -> torch.device:
    """Validate the operands of an adapted linear; returns their device."""
    for name, t, nd in (("x", x, 2), ("lora_A", lora_A, 2), ("lora_B", lora_B, 2),
                        ("lora_lambda", lora_lambda, 1)):
        if t.dim() != nd:
            raise ValueError(f"{op_name}: {name} must be {nd}-D, got shape {tuple(t.shape)}")
        check_dtype(op_name, name, t)
    r, k = lora_A.shape
    n = lora_B.shape[0]
    if x.shape[1] != k or lora_B.shape[1] != r or lora_lambda.shape[0] != r:
        raise ValueError(f"{op_name}: shapes do not chain: x {tuple(x.shape)}, lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}, lambda "
                         f"{tuple(lora_lambda.shape)}; need x (M, in), A (r, in), B (out, r), "
                         f"lambda (r,)")
    if r > MAX_R_MAX:
        raise ValueError(f"{op_name}: r_max={r} is above the kernels' limit {MAX_R_MAX}; use the "
                         f"torch path (INCRELORA_BACKEND=torch)")
    if slot_state is not None and (tuple(slot_state.shape) != (r,)
                                   or slot_state.dtype != torch.int8):
        raise ValueError(f"{op_name}: slot_state must be an int8 ({r},) tensor, got "
                         f"{slot_state.dtype} {tuple(slot_state.shape)}")
    if score_out is not None and (score_out.dim() != 0
                                  or score_out.dtype not in (torch.float32, torch.float64)):
        raise ValueError(f"{op_name}: score_out must be a 0-d float32 tensor, got shape "
                         f"{tuple(score_out.shape)} dtype {score_out.dtype}")
    if weight is not None:
        check_dtype(op_name, "weight", weight)
        expected = (k, n) if weight_in_out else (n, k)
        if tuple(weight.shape) != expected:
            raise ValueError(f"{op_name}: weight must have shape {expected} (weight_in_out="
                             f"{weight_in_out}), got {tuple(weight.shape)}")
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError(f"{op_name}: the base weight and bias must be frozen "
                             f"(requires_grad=False)")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"{op_name}: bias must have shape ({n},), got {tuple(bias.shape)}")
    return check_device(_project_kernel, op_name, x=x, lora_A=lora_A, lora_B=lora_B,
                        lora_lambda=lora_lambda, slot_state=slot_state, score_out=score_out,
                        weight=weight, bias=bias)


def adapted_linear_triton(x: torch.Tensor, weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                          lora_B: torch.Tensor, lora_lambda: torch.Tensor,
                          slot_state: Optional[torch.Tensor], lora_alpha: float = 1.0,
                          reserve_value: float = 0.0, *, weight_in_out: bool = False,
                          x_adapter: Optional[torch.Tensor] = None,
                          score_out: Optional[torch.Tensor] = None,
                          grad_out: Optional[torch.Tensor] = None,
                          fused_gemm: bool = False) -> torch.Tensor:
    """``x W^T + bias + ((x_a A^T) * lam_eff) B^T`` for a 2-D ``x`` as one autograd op.

    Args:
        x: (M, in), any strides (a non-unit inner stride is made contiguous first).
        weight: the frozen base weight, (out, in) like nn.Linear or (in, out) like transformers
            Conv1D (``weight_in_out=True``); None returns the adapter output alone.
        bias: frozen (out,) or None.
        lora_A (r_max, in), lora_B (out, r_max), lora_lambda (r_max,): the slot buffers, any
            float dtype (float32 adapters on a bfloat16 base are read as they are).
        slot_state: int8 (r_max,) slot states (2 active, 1 reserve, 0 inactive) for slot mode,
            or None for direct mode (``lora_lambda`` used as the effective lambda itself).
        lora_alpha, reserve_value: the scale numerator and the reserve slots' fixed lambda.
        x_adapter: a different adapter input (dropout(x)); its gradient is returned separately.
        score_out: 0-d float32; each backward adds the exact module score
            ``sum(|dW * G|) / sqrt(out * in)`` to it.
        grad_out: (out, in) float32; each backward adds ``G = dy^T x_a`` to it (exact-step mode).
        fused_gemm: base and adapter in one Triton GEMM (`fused_linear.py`) instead of cuBLAS
            plus an in-place adapter kernel.

    Returns:
        (M, out) in the compute dtype (autocast dtype under autocast, else x's dtype).
    """
    return apply_adapted_linear(x, x_adapter, weight, bias, lora_A, lora_B, lora_lambda,
                                slot_state, weight_in_out, float(lora_alpha),
                                float(reserve_value), score_out, grad_out,
                                compute_dtype(x.device, x), fused_gemm)


def apply_adapted_linear(x: torch.Tensor, x_adapter: Optional[torch.Tensor],
                         weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         lora_A: torch.Tensor, lora_B: torch.Tensor, lora_lambda: torch.Tensor,
                         slot_state: Optional[torch.Tensor], weight_in_out: bool, alpha: float,
                         reserve: float, score_out: Optional[torch.Tensor],
                         grad_out: Optional[torch.Tensor], out_dtype: torch.dtype,
                         fused_gemm: bool) -> torch.Tensor:
    """`adapted_linear_triton` with its arguments resolved by the caller: ``alpha`` and
    ``reserve`` floats, ``out_dtype`` the compute dtype (`utils.compute_dtype`), everything
    positional. `functional.adapted_linear` calls it on every layer call: in eager mode it
    looks the plan up once and enters the autograd op without the Python wrapper of
    ``torch.autograd.Function.apply``; under torch.compile it takes the wrapper and the custom
    ops."""
    if x.dtype != out_dtype:
        x = x.to(out_dtype)
    if x.stride(-1) != 1:  # `row_major`, inline
        x = x.contiguous()
    if x_adapter is not None:
        x_adapter = row_major(x_adapter if x_adapter.dtype == out_dtype
                              else x_adapter.to(out_dtype))
    # The kernels read lambda and the slot states with unit stride (`lowrank._slot_lambda`):
    # a strided view (buf[::2]) is copied first (C calls only; a layer's buffers never are).
    if lora_lambda.stride(0) != 1:
        lora_lambda = lora_lambda.contiguous()
    if slot_state is not None and slot_state.stride(0) != 1:
        slot_state = slot_state.contiguous()
    if torch.compiler.is_compiling():
        plan = None
    else:
        plan = _plan(x, x_adapter, weight, bias, weight_in_out, lora_A, lora_B, lora_lambda,
                     slot_state, score_out, out_dtype)
        if not _functorch_active():
            # What the wrapper does outside functorch transforms: unwrap a dead functorch
            # wrapper (a tensor that escaped a torch.func transform). Only the activations
            # can be one; the rest are the layer's own parameters and buffers.
            return _apply_eager(
                unwrap_if_dead(x), None if x_adapter is None else unwrap_if_dead(x_adapter),
                lora_A, lora_B, lora_lambda, weight, bias, slot_state,
                (weight_in_out, alpha, reserve, score_out, grad_out, out_dtype, fused_gemm, plan))
    return AdaptedLinearFunction.apply(
        x, x_adapter, lora_A, lora_B, lora_lambda, weight, bias, slot_state,
        (weight_in_out, alpha, reserve, score_out, grad_out, out_dtype, fused_gemm, plan))


def lowrank_adapter(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    lam: torch.Tensor, score_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``((x @ A.T) * lam) @ B.T`` on the Triton kernels (direct mode: ``lam`` already holds the
    mask and the scale), differentiable in all four inputs."""
    return adapted_linear_triton(x, None, None, lora_A, lora_B, lam, None, score_out=score_out)
