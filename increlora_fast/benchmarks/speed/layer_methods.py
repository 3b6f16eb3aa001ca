"""Layer-level methods: each factory builds one adapted linear of a given shape, ready to time.

Every method holds ``r_max`` components, all in use, with nonzero values everywhere (peft's zero
``B`` and ``E`` and our zero lambda are re-drawn), so no implementation can skip work that a
trained adapter would not let it skip. Adapter dropout is 0 for all. Ours and peft hold their
adapters as each does by default: float32 on a 16-bit base, the base dtype otherwise (the
authors' dense layer: the base dtype). Names: ``+score`` marks
importance tracking on (the allocation phase); without it tracking is off.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ...functional import refresh_settings
from .dense_increlora import DenseIncreLoRALinear

LORA_ALPHA = 16.0
SCORE_SUFFIX = "+score"
INTERPRETER_NOTE = ("Triton interpreter on CPU: shows the path runs, its time says nothing "
                    "about speed")


@dataclass
class LayerCase:
    """One built method: call ``module(x)``; ``after_backward(step)`` runs after each backward
    (peft AdaLoRA's importance update); ``env`` holds the environment variables it runs under."""

    module: nn.Module
    env: Dict[str, str] = field(default_factory=dict)
    after_backward: Optional[Callable[[int], None]] = None


@dataclass(frozen=True)
class LayerMethod:
    name: str
    description: str
    build: Callable[[int, int, int, torch.dtype, torch.device], LayerCase]
    needs_triton: bool = False


def _frozen_linear(in_f: int, out_f: int, dtype: torch.dtype, device: torch.device) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, device=device, dtype=dtype)
    lin.requires_grad_(False)
    return lin


class _Holder(nn.Module):
    """A one-layer model for peft to inject into."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _redraw(*params: torch.Tensor) -> None:
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.02)


def build_floor(in_f: int, out_f: int, r_max: int, dtype: torch.dtype,
                device: torch.device) -> LayerCase:
    return LayerCase(_frozen_linear(in_f, out_f, dtype, device))


def build_peft_lora(in_f: int, out_f: int, r_max: int, dtype: torch.dtype,
                    device: torch.device) -> LayerCase:
    from peft import LoraConfig, get_peft_model

    holder = _Holder(_frozen_linear(in_f, out_f, dtype, device))
    get_peft_model(holder, LoraConfig(r=r_max, lora_alpha=LORA_ALPHA, target_modules=["lin"],
                                      lora_dropout=0.0))
    layer = holder.lin
    _redraw(layer.lora_B["default"].weight)
    return LayerCase(layer)


def build_peft_adalora(in_f: int, out_f: int, r_max: int, dtype: torch.dtype,
                       device: torch.device) -> LayerCase:
    """SVDLinear at rank r_max; every backward is followed by ``update_and_allocate``, in its
    budgeting phase (sensitivity and uncertainty of every A, B, E entry), never masking here."""
    from peft import AdaLoraConfig, get_peft_model

    holder = _Holder(_frozen_linear(in_f, out_f, dtype, device))
    never = 10 ** 9
    peft_model = get_peft_model(holder, AdaLoraConfig(
        init_r=r_max, target_r=max(1, r_max // 2), lora_alpha=LORA_ALPHA, target_modules=["lin"],
        lora_dropout=0.0, total_step=never, tinit=0, tfinal=0, deltaT=never))
    layer = holder.lin
    _redraw(layer.lora_E["default"])
    adalora = peft_model.base_model
    return LayerCase(layer, after_backward=lambda step: adalora.update_and_allocate(step + 1))


def _dense_factory(track: bool):
    def build(in_f: int, out_f: int, r_max: int, dtype: torch.dtype,
              device: torch.device) -> LayerCase:
        layer = DenseIncreLoRALinear(_frozen_linear(in_f, out_f, dtype, device), r_max,
                                     LORA_ALPHA, track_score=track)
        _redraw(layer.lora_E)
        return LayerCase(layer.train())
    return build


def _increlora_factory(backend: str, fused: bool, track: bool):
    def build(in_f: int, out_f: int, r_max: int, dtype: torch.dtype,
              device: torch.device) -> LayerCase:
        from ...layer import IncreLoRALinear

        layer = IncreLoRALinear(_frozen_linear(in_f, out_f, dtype, device), r_max=r_max,
                                init_r=r_max, reserve_rank=0, lora_alpha=LORA_ALPHA)
        _redraw(layer.lora_lambda)
        layer.score_enabled = track
        env = {"INCRELORA_BACKEND": backend, "INCRELORA_FUSED_LINEAR": "1" if fused else "0"}
        return LayerCase(layer.train(), env=env)
    return build


def _ours(name: str, backend: str, fused: bool, what: str) -> Tuple[LayerMethod, LayerMethod]:
    return tuple(
        LayerMethod(name + (SCORE_SUFFIX if track else ""),
                    f"{what}, importance tracking {'on (exact score)' if track else 'off'}",
                    _increlora_factory(backend, fused, track), needs_triton=backend == "triton")
        for track in (False, True))


LAYER_METHODS: Dict[str, LayerMethod] = {m.name: m for m in (
    LayerMethod("floor", "frozen base linear alone: forward and input gradient",
                build_floor),
    LayerMethod("peft-lora", "peft LoRA Linear, r = r_max", build_peft_lora),
    LayerMethod("peft-adalora", "peft AdaLoRA SVDLinear, r = r_max, RankAllocator update after "
                                "each backward", build_peft_adalora),
    LayerMethod("dense-increlora", "the authors' layer: dense dW in forward, tracking off",
                _dense_factory(False)),
    LayerMethod("dense-increlora" + SCORE_SUFFIX, "the authors' layer: dense dW in forward, "
                                                  "dense G, module score in a hook",
                _dense_factory(True)),
    *_ours("increlora-torch", "torch", False, "IncreLoRALinear, PyTorch reference path"),
    *_ours("increlora-triton", "triton", False,
           "IncreLoRALinear, Triton low-rank kernels beside the cuBLAS base GEMM"),
    *_ours("increlora-triton-fused", "triton", True,
           "IncreLoRALinear, base GEMM and adapter in one Triton kernel "
           "(INCRELORA_FUSED_LINEAR=1)"),
)}


# Why a Triton method's row that launched no Triton kernel is failed (layer and model level).
TORCH_PATH_NOTE = ("it took the torch path (a first-use check failed? see the warnings), so its "
                   "times are not the Triton path's")


def triton_status(device: torch.device) -> Tuple[bool, str]:
    """Whether Triton methods can run on ``device`` here, and the note their rows carry.

    CUDA needs triton installed. Elsewhere they run only under the Triton interpreter
    (``TRITON_INTERPRET=1`` set before ``increlora_fast.kernels`` was first imported)."""
    try:
        from ...kernels.utils import interpreter_active
    except ImportError as err:
        return False, f"skipped: triton is not importable ({err})"
    if device.type == "cuda":
        return True, ""
    if interpreter_active():
        return True, INTERPRETER_NOTE
    return False, (f"skipped: Triton kernels need CUDA; on {device.type} only the Triton "
                   "interpreter (TRITON_INTERPRET=1 before the first import) can run them")


# Environment variables the methods set (LayerCase.env).
ENV_KEYS = ("INCRELORA_BACKEND", "INCRELORA_FUSED_LINEAR")


class MethodEnv:
    """Set ``env`` for the duration of a block; afterwards `ENV_KEYS` and the keys of ``env``
    are back to what they were (methods may set them inside the block)."""

    def __init__(self, env: Dict[str, str]) -> None:
        self.env = env

    def __enter__(self) -> "MethodEnv":
        self._saved = {k: os.environ.get(k) for k in set(self.env) | set(ENV_KEYS)}
        os.environ.update(self.env)
        refresh_settings()
        return self

    def __exit__(self, *exc) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        refresh_settings()
