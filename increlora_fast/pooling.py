"""`--pooling`: what the sequence-classification head reads from the encoder.

``cls`` leaves the model class as transformers builds it (BERT: the CLS token's state through the
pretrained pooler's dense layer and tanh). ``mean`` replaces the encoder's pooler with the mean
of the token states under the attention mask, the way sentence-transformers models such as
all-MiniLM-L6-v2 were trained to be read. ``auto`` takes the mode from a sentence-transformers
folder (``modules.json`` naming a Pooling module whose ``config.json`` sets
``pooling_mode_mean_tokens`` or ``pooling_mode_cls_token``; for a hub id, its snapshot in the
local hub cache); any other model gets ``cls``.

The replaced pooler has no weights, so the pooling is a property of the model, not of its
weights: `model_pooling` reads it off a model, `persistence.save_adapter` records it in the adapter
when it is ``mean``, and `persistence.load_adapter` applies it again to the model it loads into.
"""
from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn


class MeanPooler(nn.Module):
    """Mean of the token states over the attention mask of the current forward (set by the
    encoder's forward pre-hook that `apply_pooling` registers); every token counts without one."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: Optional[torch.Tensor] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(dim=1)
        mask = self.mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def pooling_of_folder(folder: Optional[Path]) -> str:
    """``mean`` or ``cls`` as a sentence-transformers folder's Pooling module says; ``cls`` for a
    folder without one (or None: no folder to read, e.g. a hub id missing from the hub cache).
    A ``modules.json`` that names a Pooling module whose config cannot be read (missing, as in
    a hub cache holding part of a snapshot, or damaged) gives ``cls`` with a one-line warning:
    the folder says the model pools, but not how.

    Raises:
        ValueError: the Pooling module pools otherwise (max, mean/sqrt(len), last token, or
            several modes at once): neither reads what the model was trained to give.
    """
    if folder is None or not (folder / "modules.json").is_file():
        return "cls"
    path = folder / "modules.json"
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
        pooling = next((m for m in modules if str(m.get("type", "")).endswith(".Pooling")),
                       None)
        if pooling is None:
            return "cls"
        path = folder / pooling.get("path", "") / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        modes = sorted(key for key, on in config.items() if key.startswith("pooling_mode_")
                       and on)
    except (OSError, ValueError, AttributeError, TypeError) as err:
        warnings.warn(f"--pooling auto: {path} could not be read ({type(err).__name__}), so the "
                      "sentence-transformers pooling is unknown; cls is used (give --pooling "
                      "mean or --pooling cls to choose)", UserWarning, stacklevel=3)
        return "cls"
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    if modes in ([], ["pooling_mode_cls_token"]):
        return "cls"
    raise ValueError(f"--pooling auto: {path} pools by {' + '.join(modes)}, which the "
                     "classifier cannot read (only pooling_mode_mean_tokens or "
                     "pooling_mode_cls_token); choose --pooling mean or --pooling cls")


def resolve_pooling(choice: str, folder: Optional[Path]) -> str:
    """The pooling a run uses: ``choice``, or for ``auto`` the folder's (`pooling_of_folder`)."""
    return pooling_of_folder(folder) if choice == "auto" else choice


def model_pooling(model: nn.Module) -> str:
    """``mean`` when `apply_pooling` gave ``model`` (or a model it wraps, e.g. a peft model)
    mean pooling, else ``cls`` (the model's own pooling)."""
    return "mean" if any(isinstance(m, MeanPooler) for m in model.modules()) else "cls"


def _encoder(model: nn.Module) -> nn.Module:
    """The transformers encoder of ``model``: ``base_model`` followed through wrappers (a peft
    model's is peft's own module, whose ``base_model`` is the encoder) until it is the model
    itself, as a transformers base model's is."""
    while isinstance(getattr(model, "base_model", None), nn.Module) and \
            model.base_model is not model:
        model = model.base_model
    return model


def mean_pooling_available(model: nn.Module) -> bool:
    """Whether `apply_pooling` can give ``model`` mean pooling: a transformers model (or a model
    wrapping one, e.g. a peft model) whose encoder (``base_model``) has a BERT-style ``pooler``
    to replace, a module that takes the token states (``hidden_states``) and whose output the
    head reads. Not RoBERTa's or MPNet's classifier (built without a pooler, ``None``: the head
    reads the first token itself) nor ALBERT's (its pooler is a Linear on the first token's
    state)."""
    pooler = getattr(_encoder(model), "pooler", None)
    return isinstance(pooler, nn.Module) and \
        "hidden_states" in inspect.signature(pooler.forward).parameters


def check_pooling(model: nn.Module, pooling: str) -> None:
    """Whether `apply_pooling` can give ``model`` ``pooling``; it can be asked of a model built
    without weights (on the meta device) before the weights load.

    Raises:
        ValueError: ``pooling`` is neither ``cls`` nor ``mean``, or ``mean`` on a model whose
            encoder has no pooler to replace (`mean_pooling_available`).
    """
    if pooling != "cls" and (pooling != "mean" or not mean_pooling_available(model)):
        raise ValueError(f"--pooling {pooling} is not available for {type(model).__name__} "
                         "(only mean, for encoders with a BERT-style pooler); use --pooling cls")


def apply_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """Make ``model`` (a transformers sequence classifier, or a peft model wrapping one) pool as
    ``pooling`` says (``cls``: unchanged; ``mean``: `MeanPooler` in place of its encoder's
    pooler, and the hook that gives it the mask; a model that has one already is left as it is,
    so a second call leaves no stale hook behind); returns it.

    Raises:
        ValueError: as `check_pooling`.
    """
    check_pooling(model, pooling)
    if pooling == "cls" or model_pooling(model) == "mean":
        return model
    encoder = _encoder(model)
    pooler = MeanPooler()
    encoder.pooler = pooler
    signature = inspect.signature(encoder.forward)

    def keep_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # by name: the second positional parameter is not the mask everywhere (FNet, LayoutLM)
        pooler.mask = kwargs.get("attention_mask", signature.bind_partial(
            *args, **kwargs).arguments.get("attention_mask"))

    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)
    return model
