"""The adapted linear in plain PyTorch: the CPU path and the reference every kernel is tested
against. Tensors in, tensors out; nothing here imports triton or the rest of the package.

``y = base(x) + ((x_a @ A.T) * lam_eff) @ B.T * 1`` where ``lam_eff`` (`effective_lambda`) is
lambda on active slots, the fixed reserve value on reserve slots and 0 on inactive ones, times
``alpha / active_rank``. Inactive slots (lam_eff == 0) receive exactly zero gradient in A and B,
and their A rows and B columns are masked by value as in the kernels (`read_slots`): NaN or inf
there reaches no output, gradient or score.
Also the optimizer kernel's masked AdamW step in float64 (`masked_adamw_float64`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch

ACTIVE = 2
RESERVE = 1


def lambda_dtype(adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``lora_lambda`` (and so its gradient and optimizer moments) is kept in next to
    A and B of ``adapter_dtype``: float32, or float64 with float64 adapters. Never 16-bit: the
    gradient of one lambda sums over every token and overflows float16 (it reached 2.4e5 on a
    GPU), and updates below a 16-bit lambda's resolution would vanish."""
    return torch.promote_types(adapter_dtype, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` of torch.bfloat16: a dtype as reports and messages write it."""
    return str(dtype).replace("torch.", "")


def effective_lambda(lora_lambda: torch.Tensor, slot_state: Optional[torch.Tensor],
                     lora_alpha: float, reserve_value: float) -> torch.Tensor:
    """lambda with the slot mask, the reserve value and the ``alpha / active_rank`` scale
    applied (float32 or wider; differentiable in ``lora_lambda``, only active entries carry
    gradient). ``slot_state`` None returns ``lora_lambda`` itself (direct mode)."""
    if slot_state is None:
        return lora_lambda
    lam = lora_lambda if lora_lambda.dtype == torch.float64 else lora_lambda.float()
    return _scaled_slots(lam, slot_state, lora_alpha, reserve_value)[0]


def slot_factors(lora_lambda: torch.Tensor, slot_state: Optional[torch.Tensor], alpha: float,
                 reserve: float, acc: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lam_eff, coef) in ``acc``: the effective lambda and d(lam_eff)/d(lambda), as
    `lowrank._slot_lambda` computes them (direct mode, ``slot_state`` None: lambda and 1)."""
    lam = lora_lambda.to(acc)
    if slot_state is None:
        return lam, torch.ones_like(lam)
    lam_eff, active, scale = _scaled_slots(lam, slot_state, alpha, reserve)
    return lam_eff, torch.where(active, scale, 0.0)


def _scaled_slots(lam: torch.Tensor, slot_state: torch.Tensor, alpha: float,
                  reserve: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lam_eff, the active mask, ``alpha / active_rank``) of ``lam`` in its own dtype."""
    active = slot_state == ACTIVE
    fixed = (slot_state == RESERVE).to(lam.dtype) * reserve
    scale = alpha / active.sum().clamp(min=1).to(lam.dtype)
    return torch.where(active, lam, fixed) * scale, active, scale


def read_slots(lora_A: torch.Tensor, lora_B: torch.Tensor, slot_state: Optional[torch.Tensor],
               lora_alpha: float, reserve_value: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with the A rows and B columns of the slots the kernels never read replaced by
    exact zeros (``torch.where``, differentiable: those slots get exactly zero dA and dB).

    The kernels mask by value: they read the slots whose lam_eff is not 0 and the active ones
    (an active slot at lambda 0 needs its A and B for its own dlambda), so inactive slots, and
    reserve ones when their lam_eff ``reserve_value * alpha / active_rank`` is 0, are never
    read. Multiplying by lam_eff instead would let NaN or inf there through (NaN * 0 is NaN).
    The mask comes from the slot states alone (one comparison, no read of lambda). Direct mode
    (``slot_state`` None) trains every lambda, so every slot is read and A, B come back as they
    are."""
    if slot_state is None:
        return lora_A, lora_B
    read = slot_state >= RESERVE if reserve_value * lora_alpha != 0 else slot_state == ACTIVE
    return torch.where(read[:, None], lora_A, 0.0), torch.where(read, lora_B, 0.0)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device and would cast x (not float64,
    which autocast leaves alone), else x's dtype."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def delta_w_score_dense(dw: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum(|dW * (dy.T @ x)|) / sqrt(out * in) computed densely in float32 or wider."""
    acc = torch.promote_types(dw.dtype, torch.float32)
    grad = dy.to(acc).t() @ x.to(acc)
    return (dw.to(acc) * grad).abs().sum() / math.sqrt(dw.numel())


# Rows of G = dy.T @ x computed per chunk by the chunked exact score: a float32 chunk of about
# 4 MB (it stays in L2 on a GPU), between 256 and 1024 rows, and at most half of out.
SCORE_CHUNK_BYTES = 4 << 20
_MM_OUT_DTYPE: dict = {}


def score_chunk_rows(out_features: int, in_features: int) -> int:
    """Columns of dy (rows of G) per chunk of the chunked exact score; under half of
    ``out_features`` (when it is above 1), so no chunk is ever the whole (out, in) G."""
    rows = max(256, min(1024, SCORE_CHUNK_BYTES // (4 * max(in_features, 1))))
    return max(1, min(rows, (out_features + 1) // 2))


def _mm_out_dtype_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` on ``device``
    (cuBLAS on torch >= 2.8; no CPU kernel); probed once per (device type, dtype)."""
    key = (device.type, dtype)
    if key not in _MM_OUT_DTYPE:
        try:
            probe = torch.zeros(2, 2, dtype=dtype, device=device)
            out = torch.empty(2, 2, dtype=torch.float32, device=device)
            torch.mm(probe.t(), probe, out_dtype=torch.float32, out=out)  # the form used below
            _MM_OUT_DTYPE[key] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


def weight_grad_chunks(dy: torch.Tensor, x: torch.Tensor, acc: torch.dtype, rows: int):
    """Yield ``(n0, n1, G[n0:n1])`` for ``G = dy.T @ x``, every chunk written into one reused
    ``(rows, in)`` buffer of dtype ``acc`` (float32 or float64).

    Nothing of size M x out, M x in or out x in is allocated: each chunk is one GEMM on a view of
    dy's columns (``out_dtype=float32`` where torch has it for half inputs), or, for mixed dtypes
    and half inputs without that GEMM (CPU), a sum over row blocks (at most 1024 rows and a
    quarter of M) converted to acc.
    """
    M, N = dy.shape
    buf = torch.empty(rows, x.shape[1], dtype=acc, device=dy.device)
    if dy.dtype == x.dtype == acc:
        mode = "plain"
    elif (dy.dtype == x.dtype and acc == torch.float32 and dy.dtype in (torch.bfloat16, torch.float16)
          and _mm_out_dtype_supported(dy.device, dy.dtype)):
        mode = "out_dtype"
    else:  # converted row blocks of at most a quarter of M: fewer bytes than half of x
        mode, block = "blocks", max(1, min(1024, (M + 3) // 4))
    for n0 in range(0, N, rows):
        n1 = min(n0 + rows, N)
        g = buf[:n1 - n0]
        dy_c = dy[:, n0:n1]
        if mode == "plain":
            torch.mm(dy_c.t(), x, out=g)
        elif mode == "out_dtype":
            torch.mm(dy_c.t(), x, out_dtype=acc, out=g)
        else:
            g.zero_()
            for m0 in range(0, M, block):
                g.addmm_(dy_c[m0:m0 + block].t().to(acc), x[m0:m0 + block].to(acc))
        yield n0, n1, g


def delta_w_score_chunked(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                          lora_B: torch.Tensor, lam: torch.Tensor, score_out: torch.Tensor, *,
                          chunk_rows: Optional[int] = None) -> None:
    """Add ``sum(|B diag(lam) A * (dy.T @ x)|) / sqrt(out * in)`` into the 0-d ``score_out``,
    in chunks of dy's columns (`weight_grad_chunks`), in torch ops.

    dy (M, out) and x (M, in) of any float dtype; A, B, lam (the effective lambda) of any float
    dtype; slots with lam == 0 are ignored. Accumulates in float32 (float64 when any input is
    float64); chunks are summed in a fixed order, so the result is deterministic. The largest
    temporaries are two (rows, in) chunks (G and dW), ``rows = score_chunk_rows(out, in)``
    unless ``chunk_rows`` is given.
    """
    N, K = dy.shape[1], x.shape[1]
    wide = torch.float64 in (dy.dtype, x.dtype, lora_A.dtype, lora_B.dtype, lam.dtype)
    acc = torch.float64 if wide else torch.float32
    rows = min(chunk_rows or score_chunk_rows(N, K), N)
    with torch.no_grad():
        lam = lam if lam.dtype == acc else lam.to(acc)
        live = lam != 0  # dead slots are never read: NaN there cannot reach the score
        a = torch.where(live[:, None], lora_A, 0.0).to(acc)
        b_lam = torch.where(live, lora_B * lam, 0.0).to(acc)
        dw_buf = torch.empty(rows, K, dtype=acc, device=dy.device)
        total = None
        for n0, n1, g in weight_grad_chunks(dy, x, acc, rows):
            dw = dw_buf[:n1 - n0]
            torch.mm(b_lam[n0:n1], a, out=dw)
            part = dw.mul_(g).abs_().sum()
            total = part if total is None else total.add_(part)
        score_out.add_(total, alpha=1.0 / math.sqrt(N * K))


# The score hook's choice: a G of at most this many entries (256 KB in float32) is scored
# densely (`delta_w_score_dense`), a larger one in chunks (`delta_w_score_chunked`). On CPU the
# chunked form's extra small ops cost 25-90 us per call at 64 x 64 to 128 x 256 (float32,
# bfloat16); the dense form's (out, in) temporaries and their page faults made the hook about
# 1.5x slower in MiniLM-L6's training step (384 x 384 and 384 x 1536 layers) and one call about
# 2x slower at 768 x 3072.
DENSE_SCORE_MAX_NUMEL = 1 << 16


def accumulate_dense_grad_(grad_out: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """``grad_out (out, in) += dy.T @ x`` in float32, from 16-bit operands without float32
    copies where torch can (``out_dtype``; CUDA)."""
    if dy.dtype == x.dtype and dy.dtype in (torch.bfloat16, torch.float16) and dy.is_cuda:
        try:
            grad_out.add_(torch.mm(dy.t(), x, out_dtype=grad_out.dtype))
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    grad_out.addmm_(dy.t().to(grad_out.dtype), x.to(grad_out.dtype))


class _ScoreTap(torch.autograd.Function):
    """The identity on the adapted linear's output ``y`` (marked dirty: no copy, no view)
    whose backward adds the exact module score of its gradient dy, and ``dy^T x_a``, into the
    accumulators, as the Triton op's backward does: once per backward through it, so a second
    backward through a retained graph (two losses of one forward) adds its own, the sum over
    backwards of the step (spec section 3). The tensors it reads are saved for the backward as
    autograd saves any: freed after a backward that does not retain the graph (a loss kept
    alive into the next step keeps no layer's input alive), under the caller's saved-tensor
    hooks (activation checkpointing, offloading)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, xa: torch.Tensor, lora_A: torch.Tensor,
                lora_B: torch.Tensor, lam: torch.Tensor,
                accumulators: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
                ) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(xa, lora_A, lora_B, lam)
        ctx.accumulators = accumulators
        return y

    @staticmethod
    def backward(ctx, dy: Optional[torch.Tensor]) -> tuple:
        if dy is not None:  # an undefined gradient (gradcheck asks for one) adds nothing
            xs, a, b, lam = ctx.saved_tensors
            score_out, grad_out = ctx.accumulators
            with torch.no_grad():
                if score_out is not None and dy.shape[1] * xs.shape[1] <= DENSE_SCORE_MAX_NUMEL:
                    dw = (b.to(lam.dtype) * lam) @ a.to(lam.dtype)
                    score_out.add_(delta_w_score_dense(dw, dy, xs).to(score_out.dtype))
                elif score_out is not None:
                    delta_w_score_chunked(dy, xs, a, b, lam, score_out)
                if grad_out is not None:
                    accumulate_dense_grad_(grad_out, dy, xs)
        return dy, None, None, None, None, None


def adapted_linear_torch(x: torch.Tensor, base_weight: Optional[torch.Tensor],
                         base_bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                         lora_B: torch.Tensor, lora_lambda: torch.Tensor,
                         slot_state: Optional[torch.Tensor], lora_alpha: float = 1.0,
                         reserve_value: float = 0.0, *, weight_in_out: bool = False,
                         base_forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                         x_adapter: Optional[torch.Tensor] = None,
                         score_out: Optional[torch.Tensor] = None,
                         grad_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The adapted linear on torch ops, for x of any leading shape.

    The base is ``base_forward(x)`` when given (any module, e.g. a quantized linear), else
    ``x W^T + bias`` (``x W + bias`` with ``weight_in_out``), else absent (the adapter alone).
    The adapter reads ``x_adapter`` (dropout(x)) when given, computes in the base's compute
    dtype (adapter tensors are rounded to it, float32 lam_eff and H) and is added into the base
    output in place; lambda's gradient comes in lambda's own dtype (float32 with 16-bit A and B,
    see `lambda_dtype`), summed in float32. ``score_out`` receives the exact module score of
    each backward (dense up to `DENSE_SCORE_MAX_NUMEL` entries of G, else in chunks) and
    ``grad_out`` the dense ``dy^T x_a``, at each backward through ``y`` (`_ScoreTap`). The
    slots the kernels never read enter as exact zeros (`read_slots`): NaN or inf in their A
    rows and B columns reaches no output, gradient or score.
    """
    in_features = lora_A.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    xa2 = x2 if x_adapter is None else x_adapter.reshape(-1, in_features)
    cdt = compute_dtype(x)
    in_place = False
    if base_forward is not None:
        y = base_forward(x).reshape(-1, lora_B.shape[0])
    elif base_weight is not None:
        w = base_weight.t() if weight_in_out else base_weight
        y = torch.nn.functional.linear(x2, w, base_bias)
        in_place = y.dtype == cdt  # linear's backward does not need its output
    else:
        y = None
    lam = effective_lambda(lora_lambda, slot_state, lora_alpha, reserve_value)
    lora_A, lora_B = read_slots(lora_A, lora_B, slot_state, lora_alpha, reserve_value)
    xa2 = xa2 if xa2.dtype == cdt else xa2.to(cdt)
    h = xa2 @ lora_A.to(cdt).t()
    s = (h.to(lam.dtype) * lam).to(cdt)
    b_t = lora_B.to(cdt).t()
    if in_place:
        y = y.addmm_(s, b_t)
    else:
        delta = s @ b_t
        y = delta if y is None else y + delta.to(y.dtype)
    if (score_out is not None or grad_out is not None) and y.requires_grad:
        y = _ScoreTap.apply(y, xa2.detach(), lora_A.detach(), lora_B.detach(), lam.detach(),
                            (score_out, grad_out))
    return y.reshape(*lead, y.shape[-1])


def masked_adamw_float64(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                         exp_avg_sq: torch.Tensor, slot_mask: torch.Tensor,
                         slot_lr: torch.Tensor, slot_count: torch.Tensor, slot_dim: int,
                         beta1: float, beta2: float, eps: float, weight_decay: float
                         ) -> tuple:
    """The masked AdamW step of the fused optimizer kernel in float64, out of place: (param,
    exp_avg, exp_avg_sq) after one step of the slots where ``slot_mask`` is true (slot i along
    ``slot_dim`` with learning rate ``slot_lr[i]`` and Adam step count ``slot_count[i]``,
    this step included); masked-out slots and slots of count below 1 (no step counted: no
    weight decay either) keep their values."""
    along = [1] * param.dim()
    along[slot_dim] = -1

    def per_slot(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64).view(along)

    p, g, m, v = (t.to(torch.float64) for t in (param, grad, exp_avg, exp_avg_sq))
    on = (slot_mask & (slot_count >= 1)).view(along).expand_as(p)
    lr, n = per_slot(slot_lr), per_slot(slot_count).clamp(min=1.0)
    m_new = beta1 * m + (1 - beta1) * g
    v_new = beta2 * v + (1 - beta2) * g * g
    step = lr * (m_new / (1 - beta1 ** n)) / ((v_new / (1 - beta2 ** n)).sqrt() + eps)
    p_new = p * (1 - lr * weight_decay) - step
    return tuple(torch.where(on, new, old) for new, old in ((p_new, p), (m_new, m), (v_new, v)))


def orth_penalty_float64(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor],
                         used: Sequence[torch.Tensor], trains: Sequence[torch.Tensor],
                         scale: float) -> torch.Tensor:
    """The orthogonal penalty in float64, one module at a time: ``scale`` times the sum over
    modules of ||(w A)(w A)^T - diag(w)||_F + ||(B w)^T (B w) - diag(w)||_F, w the slots that
    count (``used``); differentiable with respect to the buffers that require grad, through
    the rows (A) and columns (B) of the slots that train (``trains``) only."""
    total = torch.zeros((), dtype=torch.float64, device=lora_As[0].device)
    for a, b, u, t in zip(lora_As, lora_Bs, used, trains):
        w = u.to(torch.float64)
        a64 = a.to(torch.float64)
        a64 = torch.where(t[:, None], a64, a64.detach()) * w[:, None]
        b64 = b.to(torch.float64)
        b64 = torch.where(t[None, :], b64, b64.detach()) * w[None, :]
        total = total + torch.linalg.matrix_norm(a64 @ a64.T - torch.diag(w)) \
            + torch.linalg.matrix_norm(b64.T @ b64 - torch.diag(w))
    return scale * total
