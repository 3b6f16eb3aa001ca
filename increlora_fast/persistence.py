"""Saving and loading adapters: ``adapter_model.safetensors`` + ``adapter_config.json``.

The weights file is self-contained: its metadata repeats the config and the rank pattern, so a
save interrupted between the two file renames still leaves a consistent weights file, and every
write goes to a temporary file that is renamed over the old one only when complete.

Two layouts:
- inference (default): per module only the used slots (active, then reserve) with their lambda
  and states; what a forward pass needs.
- training state (``training_state=True``): all r_max slots, slot states and activation steps, so
  training resumes exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .config import IncreLoRAConfig
from .layer import IncreLoRALinear, SlotState
from .model import get_config, increlora_layers, saved_module_parameters

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "increlora_fast"
FORMAT_VERSION = "1"
SAVED_PREFIX = "modules_to_save."
SLOT_KEYS = ("lora_A", "lora_B", "lora_lambda", "slot_state")
TRAINING_KEYS = SLOT_KEYS + ("slot_alloc_step", "slot_active_step")

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order.

    safetensors carries no checksum of its own, so flipped bytes inside tensor data would
    otherwise load silently.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rank_pattern(model: nn.Module) -> Dict[str, int]:
    """{module name: active rank} of every IncreLoRA layer."""
    return {name: layer.active_rank for name, layer in increlora_layers(model)}


def _layer_tensors(layer: IncreLoRALinear, training_state: bool) -> Dict[str, torch.Tensor]:
    if training_state:
        return {k: getattr(layer, k) for k in TRAINING_KEYS}
    used = layer.used_rank
    return {"lora_A": layer.lora_A[:used], "lora_B": layer.lora_B[:, :used],
            "lora_lambda": layer.lora_lambda[:used], "slot_state": layer.slot_state[:used]}


def save_adapter(model: nn.Module, save_directory: PathLike, training_state: bool = False) -> None:
    """Write the adapter of ``model`` into ``save_directory`` (created if missing).

    Args:
        training_state: store all slots, slot states and activation steps for resuming training;
            the default stores what inference needs.
    """
    config = get_config(model)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in increlora_layers(model):
        for key, value in _layer_tensors(layer, training_state).items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    for name, param in saved_module_parameters(model).items():
        tensors[SAVED_PREFIX + name] = param.detach().cpu().contiguous()
    pattern = rank_pattern(model)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "config": config.to_json(), "rank_pattern": json.dumps(pattern),
              "training_state": "1" if training_state else "0",
              "sha256": tensors_digest(tensors)}
    atomic_write_bytes(out / WEIGHTS_NAME, safetensors_bytes(tensors, metadata=header))
    summary = dict(config.to_dict(), adapter_type="INCRELORA", format_version=FORMAT_VERSION,
                   rank_pattern=pattern, training_state=training_state)
    atomic_write_bytes(out / CONFIG_NAME, json.dumps(summary, indent=2, sort_keys=True).encode())


def _read(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable safetensors adapter file "
                         f"(truncated or corrupted?): {err}") from err
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path} is not an increlora_fast adapter (metadata {sorted(meta)})")
    if meta.get("sha256") != tensors_digest(tensors):
        raise ValueError(f"{path} is corrupted: its tensors do not match the checksum saved "
                         "with them")
    return meta, tensors


def load_config(save_directory: PathLike) -> IncreLoRAConfig:
    """The config an adapter was saved with (read from the weights file)."""
    meta, _ = _read(Path(save_directory) / WEIGHTS_NAME)
    return IncreLoRAConfig.from_dict(json.loads(meta["config"]))


def _check(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise ValueError(f"adapter {path} does not fit this model: {message}")


def _check_slot_layout(states: torch.Tensor, path: Path, name: str) -> None:
    """Slot states must be known values laid out active, then reserve, then inactive, with at
    least one active slot: the layout every computation relies on."""
    values = states.to(torch.long)
    _check(bool(((values >= SlotState.INACTIVE) & (values <= SlotState.ACTIVE)).all()), path,
           f"{name}.slot_state holds unknown states {sorted(set(values.tolist()))}")
    _check(bool((values[:-1] >= values[1:]).all()) and int((values == SlotState.ACTIVE).sum()) > 0,
           path, f"{name}.slot_state {values.tolist()} is not laid out active, reserve, inactive "
           "with at least one active slot")


def _full_slots(layer: IncreLoRALinear, found: Dict[str, torch.Tensor], training: bool,
                path: Path, name: str) -> Dict[str, torch.Tensor]:
    """Target values for every slot buffer of ``layer``, validated against its shapes."""
    r, n_in, n_out = layer.r_max, layer.in_features, layer.out_features
    _check(found["slot_state"].dim() == 1, path, f"{name}.slot_state is not a vector")
    _check_slot_layout(found["slot_state"], path, name)
    if training:
        expected = {"lora_A": (r, n_in), "lora_B": (n_out, r), "lora_lambda": (r,),
                    "slot_state": (r,), "slot_alloc_step": (r,), "slot_active_step": (r,)}
        for key, shape in expected.items():
            _check(tuple(found[key].shape) == shape, path,
                   f"{name}.{key} has shape {tuple(found[key].shape)}, the model needs {shape}")
        return found
    k = found["slot_state"].shape[0]
    _check(k <= r, path, f"{name} uses {k} slots, the model holds r_max={r}")
    for key, shape in {"lora_A": (k, n_in), "lora_B": (n_out, k), "lora_lambda": (k,)}.items():
        _check(tuple(found[key].shape) == shape, path,
               f"{name}.{key} has shape {tuple(found[key].shape)}, the model needs {shape}")
    full = {key: getattr(layer, key).detach().clone() for key in TRAINING_KEYS}
    full["lora_A"][:k] = found["lora_A"]
    full["lora_B"][:, :k] = found["lora_B"]
    full["lora_lambda"].zero_()
    full["lora_lambda"][:k] = found["lora_lambda"]
    full["slot_state"].fill_(SlotState.INACTIVE)
    full["slot_state"][:k] = found["slot_state"]
    used = full["slot_state"] != SlotState.INACTIVE
    full["slot_alloc_step"] = torch.where(used, 0, -1).to(full["slot_alloc_step"])
    full["slot_active_step"] = torch.where(full["slot_state"] == SlotState.ACTIVE, 0, -1).to(
        full["slot_active_step"])
    return full


def load_adapter(model: nn.Module, save_directory: PathLike) -> nn.Module:
    """Restore an adapter saved by `save_adapter` into a model injected with the same config.

    Every check runs before anything is copied: a file that does not fit (other config, unknown
    or missing module names, other shapes, a damaged file) raises ValueError and leaves the
    model unchanged. Values are cast to the model's dtypes, so an adapter saved with a float16
    lambda (``adapter_dtype="base"`` on a float16 base, before lambda was float32 always)
    loads into the float32 lambda.
    """
    path = Path(save_directory) / WEIGHTS_NAME
    meta, tensors = _read(path)
    saved_config = IncreLoRAConfig.from_dict(json.loads(meta["config"]))
    config = get_config(model)
    merged = [n for n, layer in increlora_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"cannot load an adapter into merged layers {merged[:3]}: unmerge them "
                         "first, or the old adapter would stay folded into the base weights")
    diff = sorted(k for k, v in config.to_dict().items() if saved_config.to_dict()[k] != v)
    _check(not diff, path, "config differs in " + ", ".join(
        f"{k} (file {saved_config.to_dict()[k]!r}, model {config.to_dict()[k]!r})" for k in diff))
    training = meta.get("training_state") == "1"
    keys = TRAINING_KEYS if training else SLOT_KEYS
    layers = dict(increlora_layers(model))
    saved_params = saved_module_parameters(model)
    expected = {f"{n}.{k}" for n in layers for k in keys} | {SAVED_PREFIX + n for n in saved_params}
    unknown, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    _check(not unknown, path, f"unknown tensors {unknown[:5]}")
    _check(not missing, path, f"missing tensors {missing[:5]}")
    updates = []
    for name, layer in layers.items():
        found = {k: tensors[f"{name}.{k}"] for k in keys}
        for key, value in _full_slots(layer, found, training, path, name).items():
            updates.append((getattr(layer, key), value))
    for name, param in saved_params.items():
        value = tensors[SAVED_PREFIX + name]
        _check(value.shape == param.shape, path, f"{name} has shape {tuple(value.shape)}, "
               f"the model needs {tuple(param.shape)}")
        updates.append((param, value))
    with torch.no_grad():
        for target, value in updates:
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    for layer in layers.values():
        layer.mark_slots_changed()
    return model
