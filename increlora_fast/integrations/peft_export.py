"""Export an IncreLoRA adapter as a standard peft LoRA adapter directory.

The written directory is what ``peft.PeftModel.from_pretrained(base_model, directory)`` loads
(checked against peft 0.21 and 0.22), so any tool that serves peft LoRA adapters serves ours:

- ``adapter_model.safetensors``: per adapted module ``base_model.model.<module>.lora_A.weight``
  (r_i, in) and ``.lora_B.weight`` (out, r_i); per module to save its state under
  ``base_model.model.<module>.<param>`` (peft strips its ``modules_to_save.default`` wrapper
  from saved keys); per trained bias of an adapted layer (unfrozen by hand) that tensor alone,
  ``base_model.model.<module>.base_layer.bias``, in peft's ``bias: "lora_only"`` form (as a
  module to save it would carry the whole base linear). vLLM refuses adapters with biases
  (``bias`` other than "none") and with modules to save other than a classification head
  (``classifier`` / ``score``, only in its newest versions): `export_peft` warns, naming
  the layers, where the adapter has such biases.
- ``adapter_config.json``: ``peft_type`` LORA, ``r`` = the largest exported rank,
  ``rank_pattern`` with every module's own rank, and alphas chosen so that peft's scaling
  ``lora_alpha / r`` is exactly 1 for every module (``lora_alpha = r`` and
  ``alpha_pattern[module] = r_i``). The effective lambda and our scale ``alpha / active_rank``
  are folded into the factors instead, split evenly as ``sqrt(|s|)`` on A and ``sign(s) sqrt(|s|)``
  on B. A consumer that reads only ``r`` and ``lora_alpha`` (vLLM's ``PEFTHelper`` takes
  ``lora_alpha / r``) computes scaling 1 too; one that would honour ``rank_pattern`` but not
  ``alpha_pattern`` would compute ``r / r_i`` instead. Where a module of
  the base that is not adapted has a name ending with an adapted one's (``block.fc`` beside
  ``fc``), which peft's suffix match of ``target_modules`` would adapt too, ``exclude_modules``
  names it.

Exported slots per module: every active slot, plus the reserve slots that still change the output
(nonzero effective lambda, i.e. before the budget is reached with advance learning on).

The base travels with the export: ``base_model_name_or_path`` in ``adapter_config.json`` (peft's
own field), and our `base_fingerprint` in the weights file's metadata under ``increlora_base``
(JSON ``{"name_or_path": ..., "fingerprint": ...}``). Not in ``adapter_config.json``: peft 0.21
loads a config with unknown keys but warns that it was written by a newer peft and should be
upgraded; safetensors metadata it ignores silently.

peft has no pooling setting, so an adapter trained on a mean-pooled model
(`pooling.apply_pooling`) loads into peft's model as it is (CLS pooling) and predicts
otherwise: `export_peft` warns so, and records ``increlora_pooling: mean`` in the weights file's
metadata (not in ``adapter_config.json``, for the reason above).

peft records no pad token either (neither does `export_peft`; `persistence.save_adapter`
does): a decoder classifier reads each input's last token before the first pad, so the base
model peft loads the adapter into needs the ``config.pad_token_id`` the adapter was trained with
(``finetune`` gives a decoder without one its EOS token). Without one, transformers refuses
batches of more than one input, and reads a single input ending in that token at another
position than training did.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..layer import IncreLoRALinear, SlotState
from ..model import (get_config, increlora_layers, plain_name, saved_module_names,
                     saved_module_parameters, unwrapped)
from ..persistence import base_fingerprint, base_model_name, write_adapter_files
from ..pooling import model_pooling

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
BASE_METADATA_KEY = "increlora_base"
POOLING_METADATA_KEY = "increlora_pooling"

PathLike = Union[str, os.PathLike]
# Modules peft's task model saves in full on top of the config's modules_to_save (peft 0.21:
# PeftModelForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering).
PEFT_TASK_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                     "QUESTION_ANS": ("qa_outputs",)}


def _peft_task_types() -> List[str]:
    """The ``task_type`` values peft accepts (``peft.TaskType``)."""
    from peft import TaskType

    return [t.value for t in TaskType]


def exported_factors(layer: IncreLoRALinear) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A (r_i, in), B (out, r_i)) with ``B @ A`` equal to the layer's ``delta_weight()``.

    Raises ValueError for a merged layer: its adapter already lives in the base weight.
    """
    if layer.merged:
        raise ValueError("export_peft needs unmerged IncreLoRA layers: a merged layer's adapter "
                         "is already inside its base weight; call unmerge() first")
    with torch.no_grad():
        s = layer.effective_lambda().to(torch.float64)
        keep = (layer.slot_state == SlotState.ACTIVE) | (
            (layer.slot_state == SlotState.RESERVE) & (s != 0))
        idx = torch.nonzero(keep).flatten()
        s = s[idx]
        root = s.abs().sqrt()
        a = layer.lora_A[idx].to(torch.float64) * root[:, None]
        b = layer.lora_B[:, idx].to(torch.float64) * (torch.sign(s) * root)[None, :]
        dtype = layer.lora_A.dtype
        return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def _pattern_key(name: str, names: List[str]) -> str:
    """The rank_pattern key selecting exactly ``name``.

    peft picks the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module_name)``, so a plain
    module name also selects any module whose name ends with ``"." + name``; such names are
    anchored and escaped instead, as are names holding characters a regex reads otherwise
    (``nn.ModuleDict`` keys such as ``a+b`` or ``q(1)``, which peft would never match).
    """
    if set(name) & set("\\^$*+?{}[]|()"):
        return "^" + re.escape(name)
    ambiguous = any(other != name and re.match(rf"(.*\.)?({name})$", other) for other in names)
    return "^" + re.escape(name) if ambiguous else name


def _exclude_pattern(model: nn.Module, names: List[str]) -> Optional[str]:
    """peft's ``exclude_modules`` for ``target_modules=names``, or None when none is needed.

    peft adapts every module whose name is a listed target or ends with ``"." + target``, so
    a module of the base whose name merely ends with an adapted one's (``block.fc`` for an
    adapted ``fc``) would get an untrained LoRA, or be refused when it is not a linear. The
    pattern (peft matches a string with ``re.fullmatch``) names exactly those modules, by
    the plain model's names (`plain_name`: peft loads into a model without our wrappers).
    """
    adapted = set(names)
    plain = dict.fromkeys(plain_name(n) for n, _ in model.named_modules())
    extra = [n for n in plain
             if n and n not in adapted and not any(n.startswith(a + ".") for a in adapted)
             and any(n.endswith("." + a) for a in adapted)]
    return "(?:" + "|".join(re.escape(n) for n in extra) + ")" if extra else None


def _within(name: str, root: str) -> bool:
    """Whether module ``name`` is module ``root`` or lies inside it."""
    return name == root or name.startswith(root + ".")


def _saved_roots(model: nn.Module) -> List[str]:
    """Names of the modules whose full state peft must carry (``modules_to_save``).

    The configured modules to save, plus the owner of any other trainable parameter outside the
    adapters but a bias of an adapted layer (`_trained_adapted_biases`), so nothing the run
    trained is lost, plus every other module that uses one of
    their parameters (tied weights). Raises ValueError, naming why the module is saved, when
    one of them holds adapted layers.
    """
    config = get_config(model)
    # (a wrapper and the module it holds have one plain name)
    roots = list(dict.fromkeys(plain_name(n)
                               for n in saved_module_names(model, config.modules_to_save)))
    roots = [n for n in roots if not any(n.startswith(r + ".") for r in roots)]
    why = {r: f"module to save {r!r}" for r in roots}
    biases = _trained_adapted_biases(model)
    for param_name in saved_module_parameters(model):
        owner = param_name.rpartition(".")[0]
        if param_name not in biases and not any(_within(owner, r) for r in roots):
            roots.append(owner)
            why[owner] = (f"parameter {param_name!r} is trained outside the adapters, so peft "
                          f"would save its module {owner or '<the whole model>'!r} in full")
    adapted = [n for n, _ in increlora_layers(model)]
    # peft saves each module to save as its own copy: a module outside them that uses one
    # of their parameters (a tied lm_head or encoder embed_tokens) would keep the untrained
    # one there, so it is a module to save too (a layer we adapt is refused instead, by
    # _refuse_trained_base_weights); so is one sharing a trained bias of an adapted layer,
    # which goes out under the adapted layers' names only
    parameters = [(plain_name(n), p) for n, p in model.named_parameters(remove_duplicate=False)]
    saved = {id(p) for n, p in parameters if any(n.startswith(r + ".") for r in roots if r)}
    saved |= {id(p) for p in biases.values()}
    for param_name, param in parameters:
        owner = param_name.rpartition(".")[0]
        if id(param) in saved and owner and not any(_within(owner, r) for r in roots) \
                and not any(owner.startswith(a + ".") for a in adapted):
            roots.append(owner)
            why[owner] = (f"module {owner!r} uses the trained parameter {param_name!r}, so "
                          "peft would save it in full")
    for root in roots:
        inside = [n for n in adapted if not root or _within(n, root)]
        if inside or not root:
            raise ValueError(f"export_peft: {why[root]}, but it holds adapted layers "
                             f"{inside[:3]}, and peft cannot both train a module in full and put "
                             "LoRA inside it; use save_adapter / load_adapter or merge_and_unload "
                             "for this model")
    return roots


def _trained_adapted_biases(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The trained biases of adapted layers by name (``<layer>.base_layer.bias``, the plain
    model's), which go out in peft's ``bias: "lora_only"`` form: peft 0.21 and 0.22 load these
    keys alone into the LoRA layers' base linears (a module to save would carry each whole
    base linear, a weight-sized copy). A bias several adapted layers share (a tie made by
    hand, which peft's fresh base may lack) is named under each of them."""
    adapted = {f"{n}.base_layer.bias" for n, _ in increlora_layers(model)}
    trained = {id(p) for p in saved_module_parameters(model).values()}
    return {plain_name(n): p for n, p in model.named_parameters(remove_duplicate=False)
            if plain_name(n) in adapted and id(p) in trained}


def _peft_wrapped(model: nn.Module, roots: List[str], task_type: Optional[str]) -> List[str]:
    """Names of the modules peft wraps as modules to save for ``modules_to_save=roots`` and
    ``task_type`` (which adds `PEFT_TASK_MODULES`).

    peft 0.21 wraps every module whose name ends with an entry (``key.endswith(entry)``, no dot
    boundary: ``pre_classifier`` for ``classifier``) and looks up each one's state in the
    adapter, so each must be exported (a module the run did not train carries the base's
    values). Raises ValueError when such a module is or holds an adapted layer: peft refuses
    to load that (it cannot save a LoRA layer in full).
    """
    added = [r for r in PEFT_TASK_MODULES.get(task_type or "", ()) if r not in roots]
    adapted = [n for n, _ in increlora_layers(model)]
    wrapped: List[str] = []
    for name in (plain_name(n) for n, _ in model.named_modules(remove_duplicate=False)):
        if not name or any(name.startswith(w + ".") for w in wrapped):
            continue
        root = next((r for r in (*roots, *added) if name.endswith(r)), None)
        if root is None:
            continue
        inside = [n for n in adapted if _within(n, name)]
        if inside:
            why = f" (peft adds it for task_type {task_type!r})" if root in added else ""
            raise ValueError(f"export_peft: peft would save module {name!r} in full, as its name "
                             f"ends with the module to save {root!r}{why}, but it holds adapted "
                             f"layers {inside[:3]}, and peft refuses to load that; leave {inside[:3]} "
                             "out of target_modules, or use save_adapter / load_adapter or "
                             "merge_and_unload for this model")
        if name not in wrapped:
            wrapped.append(name)
    return wrapped


def _refuse_trained_base_weights(model: nn.Module) -> None:
    """ValueError when an adapted layer's base weight is a parameter trained in full (tied to
    a module to save, e.g. an adapted ``lm_head`` sharing the input embedding saved in full):
    peft saves that module as a copy and keeps the adapted layer on the untrained weight, so
    peft's outputs would differ from ours."""
    trained = {id(p): n for n, p in saved_module_parameters(model).items()}
    for name, layer in increlora_layers(model):
        other = trained.get(id(layer.base_layer.weight))
        if other is not None:
            raise ValueError(f"export_peft: the base weight of adapted layer {name!r} is "
                             f"{other!r}, which is trained in full (a module to save), and peft "
                             "would keep the adapter on the untrained weight (it saves that "
                             "module as a copy), so its outputs would differ; use save_adapter "
                             "/ load_adapter for this model, or do not adapt "
                             f"{name!r}")


def _refuse_layers_under_several_names(model: nn.Module) -> None:
    """ValueError when an adapted layer is registered under several names: peft adapts a
    module under its first name only (the others keep the plain base, and naming them as
    targets is an error there), so peft's model would skip the adapter wherever the forward
    calls it by another name."""
    names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, IncreLoRALinear):
            names.setdefault(id(module), []).append(name)
    shared = next((n for n in names.values() if len(n) > 1), None)
    if shared is not None:
        raise ValueError(f"export_peft: IncreLoRA layer {shared[0]!r} is also registered as "
                         f"{shared[1:3]}, and peft adapts a module under its first name only, "
                         "so peft's outputs would differ wherever the model calls it by another "
                         "name; use save_adapter / load_adapter or merge_and_unload for this "
                         "model")


def export_peft(model: nn.Module, save_directory: PathLike, task_type: Optional[str] = None,
                base_model_name_or_path: Optional[PathLike] = None, overwrite: bool = False
                ) -> Dict[str, int]:
    """Write the adapter of ``model`` as a peft LoRA adapter into ``save_directory``.

    Args:
        model: a model returned by `inject_increlora` (not merged), or ``torch.compile`` or
            a (Distributed)DataParallel wrapper of one (the model it wraps is exported).
        save_directory: created if missing.
        task_type: peft ``task_type`` written to the config (e.g. ``"CAUSAL_LM"``), used by
            ``AutoPeftModel*`` classes; ``None`` loads as a plain ``PeftModel``. Only a
            ``task_type`` needs peft installed (to check it against peft's task types). peft's task
            model saves its head in full (`PEFT_TASK_MODULES`, e.g. ``classifier`` and
            ``score`` for ``"SEQ_CLS"``): the export carries that head's state too.
        base_model_name_or_path: recorded in the config (a path as its string); defaults to
            the model's ``config._name_or_path`` (or ``name_or_path``) when it has one.
        overwrite: replace an adapter already in ``save_directory`` (ours or peft's), as a
            whole (see `persistence.write_adapter_files`); without it such a folder is refused.

    A mean-pooled ``model`` (`pooling.apply_pooling`) is exported with a warning: the
    base model peft loads the adapter into needs ``apply_pooling(base, "mean")`` first.
    Trained biases of adapted layers go out as ``bias: "lora_only"``, with a warning naming
    the layers: vLLM refuses such an adapter.

    Returns:
        The rank of every exported module, ``{module name: r_i}``.

    Raises:
        ValueError: ``task_type`` is not one of peft's task types, ``base_model_name_or_path``
            is neither a string nor a path, a layer is merged or is
            registered under several names (peft would adapt only the first), or a module
            to save (or a module peft would save with it, `_peft_wrapped`, or the module of a
            parameter trained by hand) contains adapted layers, or an adapted layer's base weight is trained in full (tied to a module to
            save).
        FileExistsError: ``save_directory`` already holds an adapter and ``overwrite`` is False.
    """
    if task_type is not None:  # (peft, an optional extra, is needed for this check only)
        task_types = _peft_task_types()
        if task_type not in task_types:
            raise ValueError(f"export_peft task_type={task_type!r} is invalid: use None or one "
                             f"of peft's task types {task_types}")
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise ValueError(f"export_peft base_model_name_or_path={base_model_name_or_path!r} is "
                         "invalid: use None, a hub model id or a local path (str or os.PathLike)")
    model = unwrapped(model)
    config = get_config(model)
    layers = list(increlora_layers(model))
    _refuse_layers_under_several_names(model)
    names = [n for n, _ in layers]
    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    conv1d = False
    for name, layer in layers:
        a, b = exported_factors(layer)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.cpu()
        ranks[name] = a.shape[0]
        conv1d = conv1d or layer.is_conv1d
    roots = _saved_roots(model)
    _refuse_trained_base_weights(model)
    wrapped = _peft_wrapped(model, roots, task_type)
    # a module to save inside another one peft saves in full (RoBERTa's classifier.dense in the
    # classifier that SEQ_CLS adds) is carried by that one; named too, peft would wrap it
    # inside the other's wrapper and then fail to load it (KeyError), even from its own save
    roots = [r for r in roots if not any(r.startswith(w + ".") for w in wrapped)]
    biases = _trained_adapted_biases(model)
    for name, bias in biases.items():
        tensors[f"{PEFT_PREFIX}{name}"] = bias.detach().cpu().clone(
            memory_format=torch.contiguous_format)
    modules: Dict[str, nn.Module] = {}  # by plain name: a wrapper rather than what it holds
    for name, module in model.named_modules(remove_duplicate=False):
        modules.setdefault(plain_name(name), module)
    for root in wrapped:
        for key, value in modules[root].state_dict().items():
            # a contiguous copy: tied tensors must not share memory in the file, and
            # safetensors refuses non-contiguous ones (clone() alone keeps the strides)
            tensors[f"{PEFT_PREFIX}{root}.{plain_name(key)}"] = value.detach().cpu().clone(
                memory_format=torch.contiguous_format)
    r = max(ranks.values())
    pattern = {_pattern_key(n, names): ranks[n] for n in names}
    if base_model_name_or_path is None:
        base_model_name_or_path = base_model_name(model)
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": names,
        "modules_to_save": roots or None,
        "lora_dropout": config.lora_dropout,
        "fan_in_fan_out": conv1d,
        "bias": "lora_only" if biases else "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    exclude = _exclude_pattern(model, names)
    if exclude is not None:
        peft_config["exclude_modules"] = exclude
    base = {"name_or_path": base_model_name_or_path, "fingerprint": base_fingerprint(model)}
    metadata = {"format": "pt", BASE_METADATA_KEY: json.dumps(base, sort_keys=True)}
    pooling = model_pooling(model)
    if pooling != "cls":
        metadata[POOLING_METADATA_KEY] = pooling
    write_adapter_files(save_directory, {
        PEFT_WEIGHTS_NAME: safetensors_bytes(tensors, metadata=metadata),
        PEFT_CONFIG_NAME: json.dumps(peft_config, indent=2, sort_keys=True).encode()}, overwrite)
    if biases:
        layers_with_bias = [n.rpartition(".base_layer")[0] for n in biases]
        warnings.warn(f"export_peft: the adapter in {save_directory} carries the trained biases "
                      f"of adapted layers {layers_with_bias[:3]}"
                      f"{f' and {len(biases) - 3} more' if len(biases) > 3 else ''} (peft's "
                      'bias: "lora_only"), which peft loads but vLLM refuses (it supports no '
                      "adapter bias): to serve it there, merge_and_unload the model and serve "
                      "the merged model, or train with those biases frozen", stacklevel=2)
    if pooling != "cls":
        warnings.warn(f"export_peft: the adapter in {save_directory} was trained with {pooling} "
                      "pooling, which peft does not record: apply "
                      f"increlora_fast.pooling.apply_pooling(model, {pooling!r}) to the "
                      "base model before peft loads the adapter into it, or its predictions "
                      "differ", stacklevel=2)
    return ranks
