"""Relative positions computed once per training shape, so that DeBERTa's step can be captured.

DeBERTa's encoders (`DebertaEncoder`, `DebertaV2Encoder` of transformers) rebuild their relative
position ids on every forward (``get_rel_pos``); DeBERTa-v2/v3's log-bucketed positions copy a
host scalar to the device there (``torch.tensor(mid - 1).type_as(relative_pos)`` in
``make_log_bucket_position``), which a CUDA graph capture refuses: on an H200 (2026-12-05) the
graphed DeBERTa-v3-base step failed at that op. The ids depend only on the sequence length and
the device, so `cache_relative_positions` makes each such encoder compute them once per
(length, device) in training mode, on its first forward (an eager step, before any capture),
and hands the cached tensor to every later forward as its ``relative_pos`` argument: the same
values the encoder would have built, and nothing for a capture to refuse. Evaluation (eval
mode) and calls that pass their own positions or query states are left alone.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _uses_relative_positions(module: nn.Module) -> bool:
    """A DeBERTa-style encoder: relative attention on, positions built by ``get_rel_pos``."""
    return bool(getattr(module, "relative_attention", False)) and \
        callable(getattr(module, "get_rel_pos", None))


# The attribute of an encoder that holds the handle of its cache's hook.
_HANDLE = "_increlora_relative_positions"


def cache_relative_positions(model: nn.Module) -> List[RemovableHandle]:
    """Install the relative-position cache on every DeBERTa-style encoder of ``model`` (see the
    module docstring); returns the hooks' handles (none for other models). An encoder that has
    the cache already (another step runner on the same model) keeps its one hook and cache, and
    its handle is returned again; once removed, the cache can be installed anew. Left installed,
    the hook changes nothing a forward computes."""
    handles = []
    for module in model.modules():
        if _uses_relative_positions(module):
            handle = getattr(module, _HANDLE, None)
            if handle is None or handle.id not in module._forward_pre_hooks:
                cache: Dict[Tuple[int, torch.device], torch.Tensor] = {}
                handle = module.register_forward_pre_hook(_with_cached_positions(cache),
                                                          with_kwargs=True)
                setattr(module, _HANDLE, handle)
            handles.append(handle)
    return handles


def _with_cached_positions(cache: Dict[Tuple[int, torch.device], torch.Tensor]):
    def hook(module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not module.training or not isinstance(hidden, torch.Tensor) or hidden.dim() < 2 \
                or kwargs.get("relative_pos") is not None \
                or kwargs.get("query_states") is not None or len(args) > 4:
            return None  # (positional query_states or relative_pos: the caller's own)
        key = (hidden.shape[-2], hidden.device)
        positions = cache.get(key)
        if positions is None:
            positions = cache[key] = module.get_rel_pos(hidden)
        return args, dict(kwargs, relative_pos=positions)
    return hook
