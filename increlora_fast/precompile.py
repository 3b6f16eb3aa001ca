"""Build the Triton kernels of a model's adapted layers before its first step, in parallel.

On a GPU, Triton builds (compiles) each kernel variant the first time it is launched: 0.2-0.8 s
per variant (measured for sm_90 on a CPU, `docs/kernels.md`), one after another inside the first
training step, with the variants of the layers' first-use checks. `precompile_kernels` calls
every distinct adapted-layer configuration of a model once on a one-token input, in each way a
training step calls it (score tracked or not, an input with or without a gradient; an
evaluation's forward launches what a step's does), while every launch only submits its
kernel's build (`kernels.utils.building_only`: Triton's ``AsyncCompileMode`` over a pool of
threads, whose builds release the GIL: two threads built 15 variants in 3.0 s against 6.1 s in
one). The calls
themselves run one after another in the calling thread and no kernel runs. The kernels take the
token count unspecialised (`kernels.utils.TOKEN_ARGS`), so one token builds what a batch of any
size needs. Triton keeps its builds on disk, so a later run on the same machine finds them and
this costs it little.

The calls run on copies of each layer's adapter tensors and on scratch score buffers, reading
the base weight: nothing of the model changes (parameters, gradients, buffers, scores, random
state), and the base layer itself is not called (its hooks do not fire). A call that fails is
reported in the result and with one warning; a build that fails is left to the first step, which
builds it again and raises its error.

Given the run's optimizer (`IncreLoRAAdamW.build_kernels`) and orthogonal penalty, it also
builds their kernels at the step's shapes: two steps of a new optimizer over the same
parameters with stand-in gradients, and the forward and backward of a new penalty over the same
layers, both while no kernel runs (the gradients come back as they were, the penalty's through
``torch.autograd.grad``). The first-use checks of both are built either way; the checks
themselves run at the first step, which decides whether the kernels built here are used.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from . import functional
from .functional import adapted_linear, select_backend
from .layer import IncreLoRALinear, _plain_base_operands
from .model import increlora_layers
from .optimizer import IncreLoRAAdamW
from .penalty import OrthogonalPenalty


@dataclass
class PrecompileResult:
    """What `precompile_kernels` did: ``configs`` distinct layer configurations, ``calls``
    calls made (one-token layer calls, and one each for the optimizer's steps and the
    penalty's pass where given), ``seconds`` of wall time, ``errors`` one line per failed
    call."""

    configs: int = 0
    calls: int = 0
    seconds: float = 0.0
    errors: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Call:
    """One way a training step calls a layer: the score tracked (``track``), the input needing
    a gradient (``x_grad``: every layer but those fed by frozen inputs, e.g. a first attention
    layer, whose backward skips dx). An evaluation's forward launches what a step's does."""

    track: bool
    x_grad: bool


_CALLS = (_Call(True, True), _Call(False, True), _Call(True, False), _Call(False, False))


def _config_key(layer: IncreLoRALinear) -> tuple:
    """What decides the kernel variants of ``layer``'s calls, besides how it is called."""
    weight, bias = _plain_base_operands(layer.base_layer, (), {})
    base = None if weight is None else (weight.dtype, bias is not None and bias.dtype)
    return (tuple(layer.lora_A.shape), tuple(layer.lora_B.shape), layer.lora_A.dtype,
            layer.lora_B.dtype, layer.lora_lambda.dtype, layer.lora_A.device, layer.is_conv1d,
            base, isinstance(layer.lora_dropout, nn.Dropout), layer.exact_step_score,
            tuple(p.requires_grad for p in (layer.lora_A, layer.lora_B, layer.lora_lambda)))


def _activation_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the activations between ``model``'s layers: that of its first
    floating-point parameter outside the adapters and the packed weights of quantized bases
    (a transformers model's embeddings, what its ``dtype`` says), None where it has none."""
    skipped = {id(p) for _, layer in increlora_layers(model)
               for p in (layer.lora_A, layer.lora_B, layer.lora_lambda)
               + ((layer.base_layer.weight,) if layer.is_quantized else ())}
    return next((p.dtype for p in model.parameters()
                 if p.is_floating_point() and id(p) not in skipped), None)


def _input_dtype(layer: IncreLoRALinear, autocast_dtype: Optional[torch.dtype],
                 activations: Optional[torch.dtype]) -> torch.dtype:
    """The dtype of the activations the layer gets: under autocast any (the kernels compute in
    the autocast dtype), else the base weight's; a quantized base gets the model's
    ``activations`` (its compute and storage dtypes are internal to it: it returns its input's
    dtype), or without them the adapter's dtype."""
    if autocast_dtype is not None:
        return autocast_dtype
    if not layer.is_quantized:
        return layer.base_layer.weight.dtype
    return activations or layer.lora_A.dtype


def _base_shaped(out_features: int, t: torch.Tensor) -> torch.Tensor:
    """Zeros of the base layer's output shape for input ``t``."""
    return t.new_zeros(*t.shape[:-1], out_features)


def _separate_input(t: torch.Tensor) -> torch.Tensor:
    """The adapter's own input, as dropout gives it in training (its values do not matter)."""
    return t.clone()


def _call_once(layer: IncreLoRALinear, call: _Call, autocast_dtype: Optional[torch.dtype],
               activations: Optional[torch.dtype] = None) -> None:
    """One forward and backward of ``layer``'s adapted op on one token, on copies of its
    adapter tensors; ``activations``: the model's (`_activation_dtype`)."""
    device = layer.lora_A.device
    weight, bias = _plain_base_operands(layer.base_layer, (), {})
    out_features = layer.out_features
    # the base runs as a module in a step (quantized, hooked): its output only needs a shape
    base_forward = None if weight is not None else functools.partial(_base_shaped, out_features)
    dropout = _separate_input if isinstance(layer.lora_dropout, nn.Dropout) else None
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None \
        else contextlib.nullcontext()
    with autocast, torch.enable_grad():
        a, b, lam = (p.detach().clone().requires_grad_(p.requires_grad)
                     for p in (layer.lora_A, layer.lora_B, layer.lora_lambda))
        score_out = grad_out = None
        if call.track and layer.exact_step_score:
            grad_out = torch.zeros(out_features, layer.in_features, dtype=torch.float32,
                                   device=device)
        elif call.track:
            score_out = torch.zeros((), dtype=torch.float32, device=device)
        x = torch.zeros(1, layer.in_features,
                        dtype=_input_dtype(layer, autocast_dtype, activations), device=device,
                        requires_grad=call.x_grad)
        y = adapted_linear(x, weight, bias, a, b, lam, layer.slot_state, layer.lora_alpha,
                           layer.reserve_value(), weight_in_out=layer.is_conv1d,
                           base_forward=base_forward, dropout=dropout, score_out=score_out,
                           grad_out=grad_out)
        inputs = [t for t in (x, a, b, lam) if t.requires_grad]
        if inputs and y.requires_grad:
            torch.autograd.grad(y, inputs, torch.zeros_like(y))


class _DetachedAdapters:
    """A layer as the penalty reads it, its ``lora_A`` and ``lora_B`` detached aliases (the
    same memory: the same kernel variants), so that a backward into them fires no hook of the
    parameters (whose gradients here would be garbage: no kernel runs)."""

    def __init__(self, layer: IncreLoRALinear) -> None:
        self._layer = layer
        self.lora_A, self.lora_B = (t.detach().requires_grad_(t.requires_grad)
                                    for t in (layer.lora_A, layer.lora_B))

    def __getattr__(self, name: str):
        return getattr(self._layer, name)


def _penalty_once(penalty: OrthogonalPenalty) -> None:
    """The forward and backward of a new penalty like ``penalty`` (its layers and config, the
    adapters read through detached aliases): its kernels' tables and masks are its own, and
    the gradients are returned, neither accumulated into the layers' ``.grad`` nor passed to
    the parameters' hooks."""
    layers = [_DetachedAdapters(layer) for layer in penalty.layers]
    twin = OrthogonalPenalty(layers, penalty.config)
    with torch.enable_grad():
        loss = twin.loss()
        inputs = [t for layer in layers for t in (layer.lora_A, layer.lora_B)
                  if t.requires_grad]
        if inputs and loss.requires_grad:
            torch.autograd.grad(loss, inputs, allow_unused=True)


def _optimizer_once(optimizer: Optional[torch.optim.Optimizer],
                    autocast_dtype: Optional[torch.dtype] = None):
    """``optimizer.build_kernels`` for an `IncreLoRAAdamW` (also inside a wrapper that holds
    it as ``.optimizer``, as accelerate's does), else None; for fp16 steps those of a
    GradScaler's step (the step runner and the Trainer scale fp16 losses)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, IncreLoRAAdamW):
        return None
    return functools.partial(inner.build_kernels, scaled=autocast_dtype == torch.float16)


def precompile_kernels(model: nn.Module, autocast_dtype: Optional[torch.dtype] = None, *,
                       optimizer: Optional[torch.optim.Optimizer] = None,
                       penalty: Optional[OrthogonalPenalty] = None,
                       workers: Optional[int] = None) -> PrecompileResult:
    """Build the Triton kernels that ``model``'s adapted layers launch in training and
    evaluation, and those of the run's optimizer and penalty, before the first step,
    ``workers`` builds at a time (default: one per CPU).

    Args:
        model: a model returned by `inject_increlora`.
        autocast_dtype: the dtype the training step autocasts to (e.g. ``torch.bfloat16``), or
            None for a step without autocast: the kernels are built for the dtype they will
            compute in.
        optimizer: the run's optimizer; an `IncreLoRAAdamW` gets its step's kernels built
            (`IncreLoRAAdamW.build_kernels`; for float16, those of a GradScaler's step), any
            other is left alone.
        penalty: the run's orthogonal penalty (``controller.penalty``), whose forward and
            backward kernels are built on a new penalty over the same layers.
        workers: builds at a time.

    Returns:
        A `PrecompileResult`; ``configs`` is 0 (and nothing ran) where the layers do not take
        the Triton path (on CPU, unless ``INCRELORA_BACKEND=triton``).
    """
    if workers is not None and workers < 1:
        raise ValueError(f"precompile_kernels: workers={workers} must be >= 1")
    start = time.perf_counter()
    configs: Dict[tuple, IncreLoRALinear] = {}
    for _, layer in increlora_layers(model):
        if layer.merged or not layer.adapter_enabled:
            continue
        configs.setdefault(_config_key(layer), layer)
    result = PrecompileResult()
    layers = [layer for layer in configs.values() if select_backend(layer.lora_A) == "triton"]
    if not layers:
        return result
    from .kernels.utils import building_only
    result.configs = len(layers)
    activations = _activation_dtype(model)
    with building_only(workers or os.cpu_count() or 1):
        for call in _CALLS:
            for layer in layers:
                try:
                    _call_once(layer, call, autocast_dtype, activations)
                except Exception as err:  # noqa: BLE001 - reported; the first step builds it
                    result.errors.append(
                        f"{layer.in_features} -> {layer.out_features} r_max {layer.r_max} "
                        f"({call}): {type(err).__name__}: {err}")
                result.calls += 1
        # the first-use checks of the optimizer's and the penalty's kernels, for the adapter
        # dtypes (built here even when neither is given; their own kernels only when given)
        buffers = {(t.device, t.dtype) for layer in layers for t in (layer.lora_A, layer.lora_B)}
        r_max = max(layer.r_max for layer in layers)  # the penalty's tile: of the most slots
        for device, dtype in buffers:  # the penalty reads A and B
            functional.orth_penalty_ok(device, dtype, r_max)
        for device, dtype in buffers | {(layer.lora_lambda.device, layer.lora_lambda.dtype)
                                        for layer in layers}:  # moments of the param's dtype
            functional.multi_adamw_ok(device, dtype)
        for name, build in (("the optimizer's step", _optimizer_once(optimizer, autocast_dtype)),
                            ("the orthogonal penalty", penalty and
                             functools.partial(_penalty_once, penalty))):
            if not build:
                continue
            try:
                build()
            except Exception as err:  # noqa: BLE001 - reported; the first step builds it
                result.errors.append(f"{name}: {type(err).__name__}: {err}")
            result.calls += 1
    result.seconds = time.perf_counter() - start
    if result.errors:
        warnings.warn(f"precompile_kernels: {len(result.errors)} of {result.calls} calls failed "
                      f"(their kernels are built by the first step instead); the first: "
                      f"{result.errors[0]}", RuntimeWarning, stacklevel=2)
    return result
