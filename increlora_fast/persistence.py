"""Saving and loading adapters: ``adapter_model.safetensors`` + ``adapter_config.json``.

The weights file is self-contained: its metadata repeats the config and the rank pattern (the
JSON file is a readable summary). Both files are written complete beside the folder's old ones
and renamed over them only then; a failure puts the old ones back (`write_adapter_files`).

Two layouts:
- inference (default): per module only the used slots (active, then reserve) with their lambda
  and states; what a forward pass needs.
- training state (``training_state=True``): all r_max slots, slot states and activation steps, so
  training resumes exactly.
Both layouts hold the parameters and persistent buffers (e.g. BatchNorm running statistics) of
the modules to save, and any other parameter outside the adapters that requires grad when saved
(see `save_adapter`).

Every adapter records its base (`base_model_name` and `base_fingerprint`, in the weights file's
metadata and in ``adapter_config.json``); `load_adapter` refuses a model whose adapted weights
differ from the recorded ones, so an adapter never silently lands on the wrong base.

An adapter records the pooling of the model it was saved from (weights-file metadata and
``adapter_config.json``): ``mean`` for a model given mean pooling (`pooling.apply_pooling`,
``finetune --pooling mean``), else ``cls``. `load_adapter` gives the model it loads into mean
pooling for a ``mean`` adapter, or refuses a model that cannot take it, and refuses a
mean-pooled model for a ``cls`` adapter. An adapter saved before the field existed loads into
the model as it is.

An adapter records its model's ``config.pad_token_id`` (``finetune`` gives a decoder without a pad
token its EOS token, and a decoder classifier reads each input's last token before the first
pad): `load_adapter` gives it to a model whose config has none, and warns when the model has
another.

A folder that already holds an adapter is replaced only when asked (``overwrite=True``), and
then as a whole: see `write_adapter_files`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .config import ADAPTER_FIELDS, MODULE_NAME_FIELDS, IncreLoRAConfig
from .layer import IncreLoRALinear, SlotState, is_quantized_base
from .model import (get_config, increlora_layers, is_fsdp1_flattened, older_saved_name,
                    plain_name, saved_module_buffers, saved_module_parameters, unwrapped)
from .pooling import apply_pooling, mean_pooling_available, model_pooling

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "increlora_fast"
FORMAT_VERSION = "1"
SAVED_PREFIX = "modules_to_save."
SLOT_KEYS = ("lora_A", "lora_B", "lora_lambda", "slot_state")
TRAINING_KEYS = SLOT_KEYS + ("slot_alloc_step", "slot_active_step")
BASE_KEY = "base"  # weights-file metadata: {"name_or_path": ..., "fingerprint": ...} as JSON
POOLING_KEY = "pooling"  # weights-file metadata and adapter_config.json
PAD_KEY = "pad_token_id"  # weights-file metadata (as JSON) and adapter_config.json
SAVED_BY_KEY = "saved_by"  # adapter_config.json: what wrote the adapter, when not save_adapter
# Files that make a folder an adapter folder (ours, or peft's in either of its formats).
ADAPTER_FILES = (WEIGHTS_NAME, CONFIG_NAME, "adapter_model.bin")
SAMPLE_COLUMNS = 8
# Markers in place of sampled values: modules whose float weights cannot be read here
# ("quantized": what adapters saved before quantized weights were sampled record).
UNREAD = ("quantized", "merged", "offloaded", "sharded")
# `base_fingerprint`'s format: 2 added the error bound of quantized values to their entries
FINGERPRINT_VERSION = 2

PathLike = Union[str, os.PathLike]


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


def base_model_name(model: nn.Module) -> Optional[str]:
    """The base model's name or path (transformers' ``config._name_or_path``, else a
    ``name_or_path`` attribute); None when it has none, e.g. a model built from a config."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or \
        getattr(model, "name_or_path", None)
    return str(name) if name else None


def _spread(n: int, k: int) -> List[int]:
    """Up to ``k`` indices spread evenly over ``range(n)``, first and last included."""
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))})


def _is_sharded(weight: torch.Tensor) -> bool:
    """A DTensor (FSDP2 shards the frozen base into them): reading its rows would take a
    collective, which a save on one rank would wait for forever; or a weight FSDP1 flattened,
    which outside the forward pass holds only this rank's piece of a flat shard (or, a view
    of the flat parameter with ``use_orig_params=False``, no storage: `is_fsdp1_flattened`)."""
    if is_fsdp1_flattened(weight):
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(weight, DTensor)


def _half_gap(code: torch.Tensor) -> float:
    """Half the largest gap between neighbouring values of a quantization's code: the most a
    value rounded to its nearest code value moves, in units of its block's scale."""
    return float(code.float().sort().values.diff().max()) / 2


def _quantized_sample(base: nn.Module, rows: torch.Tensor, cols: torch.Tensor
                      ) -> Tuple[str, torch.Tensor, Optional[torch.Tensor]]:
    """The quantization's marker (``"quantized-<nf4|fp4>-<blocksize>[-nested]"`` for 4 bits,
    ``"quantized-int8"`` for 8), the dequantized values of a bitsandbytes layer's weight at
    ``rows`` x ``cols`` of its (out, in) matrix, read from the packed data and its scales alone
    (no whole weight is dequantized), and how far each may lie from the float weight it was
    quantized from (None where that cannot be told: a nested 4-bit weight repacked for CPU
    has dropped its scales' own quantization state).

    The bound: 8 bits, half a step of the row's scale (``absmax / 254``); 4 bits, half the
    largest gap of the code times the block's absmax, plus twice the absmax's own error (its
    8-bit quantization when nested, bfloat16 rounding when repacked), since the dequantized
    absmax scales a code of magnitude at most 1 chosen with the exact one."""
    weight, n_in = base.weight, base.in_features
    state = getattr(weight, "quant_state", None)
    flat = (rows[:, None] * n_in + cols[None, :]).reshape(-1)
    if state is None:  # 8 bits: int8 rows, each scaled by its absmax / 127; the row scales
        # move from the weight to the layer's state at its first forward
        row_scales = weight.SCB if weight.SCB is not None else base.state.SCB
        scale = row_scales.float()[flat // n_in]
        return "quantized-int8", weight.data.reshape(-1)[flat].float() * scale / 127, scale / 254
    nested = getattr(state, "original_nested", state.nested)
    kind = f"quantized-{state.quant_type}-{state.blocksize}" + ("-nested" if nested else "")
    if getattr(state, "packing_format_for_cpu", False):
        # repacked by a CPU forward in inference (AVX512-bf16 kernels; inject_increlora turns
        # that off for the 4-bit layers the model holds then, a layer put in later may): bytes
        # of 32 rows x 2 columns, 32 low halves then 32 high ones, each over (out, in/2); the
        # absmax (nested ones dequantized) transposed to (in/blocksize, out), in bfloat16
        out_row, col = rows[:, None], cols[None, :]
        pos = (out_row % 32) * 2 + col % 2
        byte = ((out_row // 32 * (n_in // 2) + col // 2) * 32 + pos % 32).reshape(-1)
        packed = weight.data.reshape(-1)[byte].long()
        codes = torch.where((pos >= 32).reshape(-1), packed >> 4, packed & 0xF)
        scales = state.absmax[col // state.blocksize, out_row].reshape(-1).float()
        scale_error = None if nested else scales * 2 ** -8
    else:
        # two codes a byte (the first in the high half) over the flat (out, in) matrix, each
        # block of `blocksize` codes scaled by its absmax (itself 8-bit data when nested)
        packed = weight.data.view(torch.uint8).reshape(-1)[flat // 2].long()
        codes = torch.where(flat % 2 == 0, packed >> 4, packed & 0xF)
        absmax, block = state.absmax, flat // state.blocksize
        scale_error = torch.zeros(len(flat), device=weight.device)
        if state.nested:
            import bitsandbytes
            absmax = (bitsandbytes.functional.dequantize_blockwise(absmax, state.state2)
                      + state.offset)
            outer = state.state2
            scale_error = _half_gap(outer.code) * outer.absmax.float()[block // outer.blocksize]
        scales = absmax[block].float()
    values = state.code.to(weight.device)[codes] * scales
    bound = (None if scale_error is None
             else _half_gap(state.code) * scales + 2 * scale_error)
    return kind, values, bound


def _hex_bfloat16(values: torch.Tensor) -> str:
    """``values`` rounded to bfloat16, 4 hex digits each."""
    bits = values.to(torch.float32).cpu().to(torch.bfloat16).view(torch.int16).reshape(-1)
    return "".join(f"{b & 0xFFFF:04x}" for b in bits.tolist())


def _module_fingerprint(layer: IncreLoRALinear) -> str:
    """``"<out>x<in>:<values>"``: the frozen weight's shape and, from rows 0, middle and last,
    `SAMPLE_COLUMNS` evenly spread values, each cast to float32, rounded to bfloat16 and written
    as 4 hex digits; in place of the values a marker from `UNREAD` for a merged, offloaded
    (meta) or sharded (DTensor, FSDP1) weight. A bitsandbytes 4-bit/8-bit weight gives
    ``"<out>x<in>:<quantization>:<values>:<bounds>"``, the values dequantized and the bounds
    how far each may lie from the float weight (`_quantized_sample`; rounded up to bfloat16
    like the values; left out, with their colon, where not known)."""
    n_out, n_in = layer.out_features, layer.in_features
    shape = f"{n_out}x{n_in}"
    weight = layer.base_layer.weight
    if layer.merged:
        return f"{shape}:merged"
    if weight.is_meta:
        return f"{shape}:offloaded"
    if _is_sharded(weight):
        return f"{shape}:sharded"
    rows = torch.tensor(_spread(n_out, 3), device=weight.device)
    cols = torch.tensor(_spread(n_in, SAMPLE_COLUMNS), device=weight.device)
    if layer.is_quantized and (getattr(weight, "quant_state", None) is not None
                               or not weight.is_floating_point()):
        try:
            kind, sample, bound = _quantized_sample(layer.base_layer, rows, cols)
        except Exception as error:  # a layout of another bitsandbytes: never fail a save here
            warnings.warn(f"increlora_fast: the quantized base weight's layout is not known "
                          f"({type(error).__name__}: {error}); its shape alone is recorded "
                          "for the base check", RuntimeWarning, stacklevel=2)
            return f"{shape}:quantized"
        # 1 + 2**-7 before rounding to nearest: the recorded bound is never below the bound
        bounds = "" if bound is None else ":" + _hex_bfloat16(bound * (1 + 2 ** -7))
        return f"{shape}:{kind}:{_hex_bfloat16(sample)}{bounds}"
    # (an 8-bit layer with float16 weights holds them as they are)
    w = weight.detach()
    sample = (w.index_select(0, cols).index_select(1, rows).t() if layer.is_conv1d
              else w.index_select(0, rows).index_select(1, cols))
    return f"{shape}:{_hex_bfloat16(sample)}"


def base_fingerprint(model: nn.Module) -> Dict[str, Any]:
    """A cheap fingerprint of the frozen weights under every IncreLoRA layer of ``model``.

    Per module (see `_module_fingerprint`) the weight's shape and 24 sampled values rounded to
    bfloat16, so the same base in float32, bfloat16 or float16, on any device, gives values that
    `base_difference` accepts. bitsandbytes 4-bit/8-bit bases hold packed data: their values
    are sampled dequantized, under a marker naming the quantization, with how far each may lie
    from the float weight it was quantized from: the same quantization's values compare as
    full precision's do, another quantization's or full precision's within that bound (so a
    QLoRA adapter loads onto its full-precision base, and not onto another model of the same
    shapes). Only the shape is recorded for a merged layer (its weight includes the adapter),
    an offloaded (meta) weight and a weight sharded by FSDP2 (a DTensor) or FSDP1.

    Returns:
        ``{"version": FINGERPRINT_VERSION, "digest": <16 hex digits over all modules>,
        "modules": {name: entry}}``; version 1 entries recorded no bound for quantized values.
    """
    modules = {name: _module_fingerprint(layer) for name, layer in increlora_layers(model)}
    digest = hashlib.sha256(json.dumps(modules, sort_keys=True).encode()).hexdigest()[:16]
    return {"version": FINGERPRINT_VERSION, "digest": digest, "modules": modules}


def _sampled_values(text: str) -> List[float]:
    return [struct.unpack(">f", bytes.fromhex(text[i:i + 4] + "0000"))[0]
            for i in range(0, len(text), 4)]


def _entry_parts(entry: str) -> Tuple[str, str, str, Optional[List[float]]]:
    """A module entry of `base_fingerprint` as (shape, quantization marker or "", values or an
    `UNREAD` marker, bounds: zeros for full precision, None for quantized values saved
    without them)."""
    shape, _, rest = entry.partition(":")
    parts = rest.split(":")
    if len(parts) == 1:
        return shape, "", rest, [0.0] * (len(rest) // 4)
    bounds = _sampled_values(parts[2]) if len(parts) > 2 else None
    return shape, parts[0], parts[1], bounds


def _entry_difference(saved: str, current: str) -> Optional[str]:
    """Why two module entries of `base_fingerprint` belong to different weights, or None.

    Values match within one bfloat16 step (2**-7 relative) plus float16's smallest step
    (2**-24): loading a float32 base as float16 rounds twice and may land one step away.
    Values of one quantization compare so too (of the same weights they agree); against
    another quantization or full precision within both sides' bounds added, and by the shape
    alone where a quantized side recorded none (saved before bounds were)."""
    saved_shape, saved_kind, saved_values, saved_bounds = _entry_parts(saved)
    shape, kind, values, bounds = _entry_parts(current)
    if saved_shape != shape:
        return f"weight shape {saved_shape} in the adapter, {shape} in the model"
    if saved_values in UNREAD or values in UNREAD:
        return None
    a, b = _sampled_values(saved_values), _sampled_values(values)
    if saved_kind == kind:
        allowed = [0.0] * len(a)
    elif saved_bounds is None or bounds is None:
        return None
    else:
        allowed = [x + y for x, y in zip(saved_bounds, bounds)]
    if len(a) != len(b) or len(allowed) != len(a) or any(
            abs(x - y) > bound + 2 ** -7 * max(abs(x), abs(y)) + 2 ** -24
            for x, y, bound in zip(a, b, allowed)):
        return "its weight values differ"
    return None


def base_difference(recorded: Dict[str, Any], current: Dict[str, Any]) -> Optional[str]:
    """The first module (in ``current``'s order, the model's) where two `base_fingerprint`
    results disagree, as ``"<module>: <why>"``; None when they describe the same base."""
    saved, current = recorded["modules"], current["modules"]
    for name, entry in current.items():
        if name not in saved:
            return f"{name}: not in the adapter's base"
        why = _entry_difference(saved[name], entry)
        if why:
            return f"{name}: {why}"
    extra = sorted(set(saved) - set(current))
    return f"{extra[0]}: not in this model" if extra else None


class BaseMismatchError(ValueError):
    """An adapter was saved from another base model than the one it is loaded into.

    ``detail`` names both bases and the first module that differs; the message adds how to
    load it anyway."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{detail}; pass check_base=False to load it anyway")
        self.detail = detail


def _recorded_base(meta: Dict[str, str], directory: Path) -> Dict[str, Any]:
    """The base recorded in the weights file's metadata, ``{"name_or_path": ..., "fingerprint":
    `base_fingerprint`}``; ValueError naming the file when it is not that (damaged or edited
    metadata, which the tensor checksum does not cover) or its fingerprint's version is newer
    than `FINGERPRINT_VERSION` (saved by a newer increlora_fast, whose entries this one could
    misread)."""
    try:
        recorded = json.loads(meta[BASE_KEY])
        fingerprint = recorded["fingerprint"]
        entries = fingerprint["modules"].items()
        if not isinstance(fingerprint["digest"], str) or not all(
                isinstance(n, str) and isinstance(e, str) for n, e in entries):
            raise ValueError("module entries are not strings")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"adapter {directory / WEIGHTS_NAME}: its recorded base (metadata "
                         f"{BASE_KEY!r}) is damaged or edited ({type(err).__name__}: {err}); "
                         "pass check_base=False to load it without checking the base") from err
    version = fingerprint.get("version", 1)
    if not isinstance(version, int) or version > FINGERPRINT_VERSION:
        raise ValueError(f"adapter {directory / WEIGHTS_NAME} records its base in fingerprint "
                         f"version {version!r}, and this increlora_fast reads versions 1 to "
                         f"{FINGERPRINT_VERSION}: upgrade increlora_fast, or pass "
                         "check_base=False to load it without checking the base")
    return recorded


def _older_names(names: Sequence[str], known: Set[str]) -> Dict[str, str]:
    """{name: the model's name} for each of an adapter file's ``names`` (tensor keys or module
    names) that is not in ``known``, the model's, and is once the wrapper parts older code
    saved are dropped (`model.older_saved_name`; a module to save's key after its
    ``modules_to_save.``): an adapter saved before the layers were named by the plain model's
    names, from a wrapped model or one with checkpointed or compiled blocks. Empty where two
    names would become one."""
    renames = {}
    for name in names:
        if name not in known:
            prefix = SAVED_PREFIX if name.startswith(SAVED_PREFIX) else ""
            current = prefix + older_saved_name(name[len(prefix):])
            if current in known:
                renames[name] = current
    return renames if len({renames.get(n, n) for n in names}) == len(names) else {}


def _check_base(meta: Dict[str, str], model: nn.Module, directory: Path,
                carried: Sequence[str] = ()) -> None:
    """`BaseMismatchError`, one line naming both bases, when ``model`` is not the base the
    adapter in ``directory`` was saved from; a warning when the adapter records no base (saved
    before fingerprints were written).

    ``carried``: adapted modules whose base weight the adapter itself holds (a base weight that
    trains: tied to a module to save, or unfrozen by hand): they are left out of the comparison,
    since the recorded value is the trained weight, which the load puts in place."""
    if BASE_KEY not in meta:
        warnings.warn(f"adapter {directory} records no base model fingerprint (saved by an older "
                      "increlora_fast), so which base it belongs to cannot be checked; save it "
                      "again to record it", stacklevel=3)
        return
    recorded = _recorded_base(meta, directory)
    fingerprint, current = recorded["fingerprint"], base_fingerprint(model)
    renames = _older_names(list(fingerprint["modules"]), set(current["modules"]))
    fingerprint = dict(fingerprint, modules={renames.get(n, n): e
                                             for n, e in fingerprint["modules"].items()})

    def compared(entries: Dict[str, Any]) -> Dict[str, Any]:
        return dict(entries, modules={n: e for n, e in entries["modules"].items()
                                      if n not in carried})
    difference = base_difference(compared(fingerprint), compared(current))
    if difference is None:
        return

    recorded_name, name = recorded.get("name_or_path"), base_model_name(model)
    theirs = f"base {recorded_name!r} (" if recorded_name else "an unnamed base ("
    ours = f"this model {name!r} (" if name else "this model (unnamed; "
    raise BaseMismatchError(
        f"adapter {directory} belongs to {theirs}fingerprint {fingerprint['digest']}), not to "
        f"{ours}fingerprint {current['digest']}): first difference in {difference}")


def _write_new_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _backup(source: Path, target: Path) -> None:
    """Keep ``source``'s contents at ``target``: a hard link, or a copy where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


try:
    import fcntl
except ImportError:  # Windows: no flock; saves into one folder then go unordered
    fcntl = None

STAGING_PREFIX = ".adapter-staging-"
# flock's errors on a file system that has no locks
UNLOCKABLE = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def is_adapter_staging(path: Path) -> bool:
    """Whether ``path`` is a staging folder `write_adapter_files` left when it was killed: a
    ``.adapter-staging-*`` folder holding nothing but its ``new`` and ``old`` folders of
    adapter files (`ADAPTER_FILES`). Anything else of that name is not one of ours."""
    if not (path.name.startswith(STAGING_PREFIX) and path.is_dir() and not path.is_symlink()):
        return False
    for part in path.iterdir():
        if part.name not in ("new", "old") or not part.is_dir() or part.is_symlink():
            return False
        if any(f.name not in ADAPTER_FILES or not f.is_file() for f in part.iterdir()):
            return False
    return True


def write_adapter_files(directory: PathLike, files: Dict[str, bytes], overwrite: bool) -> None:
    """Write ``files`` ({file name: contents}) into ``directory`` (created if missing) as one
    adapter, replacing any adapter there as a whole.

    The files are first written complete into a hidden ``.adapter-staging-*`` folder inside
    ``directory``, beside a link (or copy) of every adapter file already there; then each new
    file is renamed over its old one (a reader sees either, never a partial file) and old adapter
    files the new adapter lacks are removed. A failure on the way puts the old files back, so
    the folder holds the old adapter whole or the new one whole. (Only a power loss during the
    renames, or a failure to put the old files back, can leave a mix; the old files then remain
    in the staging folder, which the error names.)

    Writers into one folder take turns: each holds an exclusive ``flock`` on the folder itself
    from its check for an adapter there to its last rename, so two saves at once (two processes,
    or two threads) never leave the weights of one beside the summary of the other, and of two
    saves without ``overwrite`` the second is refused as if the first had finished before it.
    (On a file system without locks, e.g. some FUSE mounts, and on Windows, which has no
    ``flock``, they are written unordered.)

    Raises:
        FileExistsError: ``directory`` holds adapter files (`ADAPTER_FILES`) and ``overwrite``
            is False.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        _write_locked(out, files, overwrite)
        return
    folder = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)  # released when closed
        except OSError as err:
            if err.errno not in UNLOCKABLE:
                raise  # (on a file system without locks the writers go unordered, as documented)
        _write_locked(out, files, overwrite)
    finally:
        os.close(folder)


def _write_locked(out: Path, files: Dict[str, bytes], overwrite: bool) -> None:
    """`write_adapter_files` once its caller holds the folder's lock."""
    present = [name for name in ADAPTER_FILES if (out / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{out} already holds an adapter ({', '.join(present)}); pass "
                              "overwrite=True to replace it, or choose another folder")
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    keep_staging = False
    try:
        (staging / "new").mkdir()
        (staging / "old").mkdir()
        for name, data in files.items():
            _write_new_file(staging / "new" / name, data)
        for name in present:
            _backup(out / name, staging / "old" / name)
        touched: List[str] = []
        try:
            for name in files:
                os.replace(staging / "new" / name, out / name)
                touched.append(name)
            for name in present:
                if name not in files:
                    os.unlink(out / name)
                    touched.append(name)
        except BaseException as err:
            try:
                for name in reversed(touched):
                    if name in present:
                        os.replace(staging / "old" / name, out / name)
                    else:
                        os.unlink(out / name)
            except OSError as undo:
                keep_staging = True
                raise OSError(f"{out}: writing the adapter failed ({err}) and putting the old one "
                              f"back failed too ({undo}); its files are in {staging / 'old'}") \
                    from err
            raise
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)


def rank_pattern(model: nn.Module) -> Dict[str, int]:
    """{module name: active rank} of every IncreLoRA layer."""
    return {name: layer.active_rank for name, layer in increlora_layers(model)}


def _layer_tensors(layer: IncreLoRALinear, training_state: bool) -> Dict[str, torch.Tensor]:
    if training_state:
        return {k: getattr(layer, k) for k in TRAINING_KEYS}
    used = layer.used_rank
    return {"lora_A": layer.lora_A[:used], "lora_B": layer.lora_B[:, :used],
            "lora_lambda": layer.lora_lambda[:used], "slot_state": layer.slot_state[:used]}


def save_adapter(model: nn.Module, save_directory: PathLike, training_state: bool = False,
                 overwrite: bool = False, saved_by: Optional[str] = None) -> None:
    """Write the adapter of ``model`` into ``save_directory`` (created if missing).

    The adapter records its base: `base_model_name` and `base_fingerprint`, which
    `load_adapter` checks; and its pooling (`pooling.model_pooling`: ``mean`` or
    ``cls``), which `load_adapter` gives the model it loads into again.

    Saved beside the adapters (`model.saved_module_parameters`, `model.saved_module_buffers`):
    the parameters and persistent buffers of ``modules_to_save``, whatever their
    ``requires_grad``, and any other parameter that requires grad now (one unfrozen by hand:
    what the run trains). A parameter unfrozen by hand and frozen again before this call is
    not saved: list its module in ``modules_to_save`` to save it whatever its
    ``requires_grad``. transformers' ``model.dequantize()`` puts full-precision layers
    requiring grad in place of the quantized ones outside the adapters (as under peft; those
    under an adapter are frozen, `IncreLoRALinear`), so they are saved in full unless frozen
    first (``requires_grad_(False)``).

    Args:
        training_state: store all slots, slot states and activation steps for resuming training;
            the default stores what inference needs.
        overwrite: replace an adapter already in ``save_directory`` (as a whole, see
            `write_adapter_files`); without it such a folder is refused.
        saved_by: what writes the adapter, recorded in ``adapter_config.json`` (the Trainer
            integration's saves record theirs, so that they replace only adapters they wrote:
            `integrations.trainer.save_trainer_adapter`); None records nothing.

    Raises:
        FileExistsError: ``save_directory`` already holds an adapter and ``overwrite`` is False.

    A ``torch.compile`` or (Distributed)DataParallel wrapper saves the model it holds, under
    that model's names (`model.unwrapped`).
    """
    model = unwrapped(model)
    config = get_config(model)
    tensors = {}
    for name, layer in increlora_layers(model):
        for key, value in _layer_tensors(layer, training_state).items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    # own copies: a tensor registered under two names (a buffer shared by two modules to save)
    # must not share memory in the file, which safetensors refuses; .cpu() copies only on a GPU
    for name, param in saved_module_parameters(model).items():
        tensors[SAVED_PREFIX + name] = param.detach().cpu().clone(
            memory_format=torch.contiguous_format)
    for name, buffer in saved_module_buffers(model).items():
        tensors[SAVED_PREFIX + name] = buffer.detach().cpu().clone(
            memory_format=torch.contiguous_format)
    pattern = rank_pattern(model)
    base = {"name_or_path": base_model_name(model), "fingerprint": base_fingerprint(model)}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "config": config.to_json(), "rank_pattern": json.dumps(pattern),
              "training_state": "1" if training_state else "0",
              "sha256": tensors_digest(tensors), BASE_KEY: json.dumps(base, sort_keys=True)}
    summary = dict(config.to_dict(), adapter_type="INCRELORA", format_version=FORMAT_VERSION,
                   rank_pattern=pattern, training_state=training_state,
                   base_model_name_or_path=base["name_or_path"],
                   base_model_fingerprint=base["fingerprint"])
    header[POOLING_KEY] = summary[POOLING_KEY] = model_pooling(model)
    summary[PAD_KEY] = model_pad_token_id(model)
    header[PAD_KEY] = json.dumps(summary[PAD_KEY])
    if saved_by is not None:
        summary[SAVED_BY_KEY] = saved_by
    write_adapter_files(save_directory, {
        WEIGHTS_NAME: safetensors_bytes(tensors, metadata=header),
        CONFIG_NAME: json.dumps(summary, indent=2, sort_keys=True).encode()}, overwrite)


def _peft_hint(directory: Path) -> str:
    """``": <directory> holds a peft <type> adapter ..."`` when ``directory``'s
    ``adapter_config.json`` is peft's (it names a ``peft_type``), else ``""``."""
    try:
        data = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    peft_type = data.get("peft_type") if isinstance(data, dict) else None
    if not peft_type:
        return ""
    return (f": {directory} holds a peft {peft_type} adapter ({CONFIG_NAME} names its "
            "peft_type), which peft.PeftModel.from_pretrained loads")


# Files of a whole model saved by transformers (`save_pretrained`, the Trainer's `save_model`
# and checkpoints), whichever of them a folder holds.
WHOLE_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")


def _whole_model_hint(directory: Path) -> str:
    """``": <directory> holds a whole model ..."`` when ``directory`` holds a transformers
    model's weights (a Trainer's ``save_model`` or checkpoint folder) and no adapter, else
    ``""``."""
    found = next((name for name in WHOLE_MODEL_FILES if (directory / name).is_file()), None)
    if found is None:
        return ""
    return (f": {directory} holds a whole model ({found}: save_pretrained, or a Trainer's "
            "save_model or checkpoint, which resume_from_checkpoint reads), not an adapter; "
            "save_adapter(model, folder) writes the adapter load_adapter reads")


def _read(path: Path):
    if not path.is_file():
        hint = _peft_hint(path.parent) or _whole_model_hint(path.parent)
        raise FileNotFoundError(f"no adapter file at {path}{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable safetensors adapter file "
                         f"(truncated or corrupted?): {err}") from err
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path} is not an increlora_fast adapter (metadata {sorted(meta)})"
                         + _peft_hint(path.parent))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is an increlora_fast adapter of format version "
                         f"{meta.get('format_version')}, and this increlora_fast reads version "
                         f"{FORMAT_VERSION} only; load it with the increlora_fast that saved it")
    if meta.get("sha256") != tensors_digest(tensors):
        raise ValueError(f"{path} is corrupted: its tensors do not match the checksum saved "
                         "with them")
    return meta, tensors


def _saved_config(meta: Dict[str, str], path: Path) -> IncreLoRAConfig:
    """The config in the metadata of the weights file at ``path``; ValueError, one line naming
    the file and the field, when it is not a valid `IncreLoRAConfig` (unknown or invalid fields:
    written by hand or by another increlora_fast version)."""
    try:
        data = json.loads(meta["config"])
        if not isinstance(data, dict):
            raise ValueError(f"a JSON object is needed, not {type(data).__name__}")
        return IncreLoRAConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: its saved config is not a valid IncreLoRAConfig (written by "
                         f"another increlora_fast version?): {err}") from err


def load_config(save_directory: PathLike) -> IncreLoRAConfig:
    """The config an adapter was saved with (read from the weights file).

    Raises:
        ValueError: the file is not a readable increlora_fast adapter, or its config has
            unknown or invalid fields (the message names the file and the field).
    """
    path = Path(save_directory) / WEIGHTS_NAME
    meta, _ = _read(path)
    return _saved_config(meta, path)


def _comparable(config: IncreLoRAConfig) -> Dict[str, Any]:
    """``config.to_dict()`` with its lists of module names (`config.MODULE_NAME_FIELDS`) as
    sorted sets: they select modules by name whatever their order or repeats (peft's
    LoraConfig holds them as sets), so configs that adapt and save the same modules compare
    equal."""
    data = config.to_dict()
    for key in MODULE_NAME_FIELDS:
        if isinstance(data[key], list):
            data[key] = sorted(set(data[key]))
    return data


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


def model_pad_token_id(model: nn.Module) -> Optional[int]:
    """``model.config.pad_token_id`` (transformers), or None for a model without one."""
    return getattr(getattr(model, "config", None), "pad_token_id", None)


def _saved_pad_token_id(meta: Dict[str, str], path: Path) -> Optional[int]:
    """The ``pad_token_id`` recorded in the weights file at ``path`` (None: none recorded);
    ValueError naming the file when the record is not null or a token id."""
    text = meta.get(PAD_KEY, "null")
    try:
        pad = json.loads(text)
    except ValueError:
        pad = text
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 0):
        raise ValueError(f"{path}: its recorded {PAD_KEY} {text!r} is not a token id "
                         "(damaged or edited metadata)")
    return pad


def _check_pad_token(pad: Optional[int], model: nn.Module, directory: Path) -> None:
    """A warning, one line, when ``model`` pads with another token than the model the adapter
    in ``directory`` was trained as (``pad``; None: not recorded, or that model had none)."""
    current = model_pad_token_id(model)
    if pad is not None and current is not None and current != pad:
        warnings.warn(f"adapter {directory} was trained with pad_token_id {pad}, and this "
                      f"model's config has pad_token_id {current}; a decoder classifier reads "
                      "each input's last token before the first pad, so its predictions on "
                      f"padded inputs may differ: set model.config.pad_token_id = {pad} and pad "
                      "with that token", UserWarning, stacklevel=3)


def _check_pooling(pooling: Optional[str], model: nn.Module, directory: Path) -> None:
    """ValueError, one line, when the adapter in ``directory`` records a ``pooling`` that
    ``model`` cannot be given (`pooling.apply_pooling`). None: an adapter saved before
    the pooling was recorded (before 2026-12-05, when ``--pooling mean`` already existed), taken
    as it is, with a warning where the pooling matters (a model that has mean pooling or could
    be given it)."""
    if pooling is None:
        if mean_pooling_available(model):
            warnings.warn(f"adapter {directory} records no pooling (saved by an increlora_fast "
                          "before 2026-12-05); it is loaded into this model as it is, with "
                          f"{model_pooling(model)} pooling: if it was trained with another "
                          "--pooling, give the model that one first (apply_pooling) or its "
                          "predictions differ from training", UserWarning)
        return
    if model_pooling(model) == pooling:
        return
    if pooling == "cls":
        raise ValueError(f"adapter {directory} was trained with the model's own CLS pooling, "
                         "and this model was given mean pooling (apply_pooling); load it into "
                         "the model without apply_pooling")
    if pooling != "mean":
        raise ValueError(f"adapter {directory} records pooling {pooling!r}, which this "
                         "increlora_fast does not know (only 'mean'); load it with the "
                         "increlora_fast version that saved it")
    if not mean_pooling_available(model):
        raise ValueError(f"adapter {directory} was trained with pooling 'mean', which "
                         f"{type(model).__name__} cannot take (no encoder with a BERT-style "
                         "pooler to replace); load it into the sequence classifier it was "
                         "trained on (e.g. AutoModelForSequenceClassification of its base)")


def load_adapter(model: nn.Module, save_directory: PathLike, check_base: bool = True
                 ) -> nn.Module:
    """Restore an adapter saved by `save_adapter` into a model injected with the same adapter:
    the config fields that decide what it computes (`config.ADAPTER_FIELDS`: its modules, their
    lists compared as sets, ``r_max``, ``lora_alpha``, ``adapter_dtype``, ``reserve_lambda``,
    ``advance_learning``) must be equal. The training-only fields (allocation, schedules,
    penalty, score) may differ: the model's own config steers any further training, with a
    warning naming them when the file holds a training state (``training_state=True``).

    The parameters saved outside the adapters load into the model's parameters of their names:
    those of the modules to save, and any other the saved model trained (one unfrozen by hand,
    frozen again in a fresh model), which is made trainable again as it was saved, so that a
    later `save_adapter` of this model keeps it. Every check runs before anything is copied: a
    file that does not fit (other config, unknown or missing module names, other shapes, a
    damaged file, another base model: then `BaseMismatchError`) raises ValueError and leaves the
    model unchanged. Values are cast to the model's dtypes, so an adapter saved with a float16
    lambda (``adapter_dtype="base"`` on a float16 base, before lambda was float32 always) loads
    into the float32 lambda.

    An adapter that records a ``pad_token_id`` gives it to a ``model.config`` without one, so
    padded inputs are read as in training (e.g. a decoder that ``finetune`` padded with its EOS
    token); a model with another one is warned about and keeps it.

    An adapter that records ``pooling: mean`` gives ``model`` mean pooling
    (`pooling.apply_pooling`) unless it has it already, so its predictions are the
    trained model's; a model that cannot take it is refused (ValueError) before anything changes,
    and so is a mean-pooled model for an adapter that records ``pooling: cls``.

    Args:
        check_base: refuse a model whose adapted weights differ from the base the adapter was
            saved from (`base_fingerprint`; the same base in another dtype or on another device
            matches; a base weight the adapter carries itself, one that trains (tied to a
            module to save, or unfrozen by hand), is not compared). A bitsandbytes 4-bit or
            8-bit base weight is compared by its dequantized values: with one quantized the
            same way as full precision's are, with another quantization or full precision
            within the quantization's error bound (so a QLoRA adapter loads onto its
            full-precision base, not onto another model of the same shapes); by its shape only
            where no bound is known (an adapter saved before bounds were recorded, a nested
            4-bit weight repacked for CPU).
            False loads onto any model that fits. Adapters saved before the base was recorded
            load with a warning.

    A ``torch.compile`` or (Distributed)DataParallel wrapper loads into the model it holds
    (`model.unwrapped`) and is returned. An adapter saved before 2026-12-07 from such a
    wrapper or from a model with checkpointed or compiled blocks holds their parts in its names
    (``_orig_mod.``, ``module.``, ``_checkpoint_wrapped_module``, in its tensor keys and base
    fingerprint): its names load as the model's where they are those once the parts are
    dropped (`model.older_saved_name`).
    """
    wrapper, model = model, unwrapped(model)
    path = Path(save_directory) / WEIGHTS_NAME
    meta, tensors = _read(path)
    saved_config = _saved_config(meta, path)
    try:
        config = get_config(model)
    except ValueError as err:
        raise ValueError(f"adapter {path} cannot load into this model: {err} (the adapter's "
                         f"config: load_config({str(save_directory)!r}))") from err
    merged = [n for n, layer in increlora_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"cannot load an adapter into merged layers {merged[:3]}: unmerge them "
                         "first, or the old adapter would stay folded into the base weights")
    mine, saved = _comparable(config), _comparable(saved_config)
    diff = sorted(k for k, v in mine.items() if saved[k] != v)

    def described(keys: List[str]) -> str:
        return ", ".join(f"{k} (file {saved_config.to_dict()[k]!r}, model "
                         f"{config.to_dict()[k]!r})" for k in keys)
    _check(not any(k in ADAPTER_FIELDS for k in diff), path,
           "config differs in " + described([k for k in diff if k in ADAPTER_FIELDS]))
    training = meta.get("training_state") == "1"
    keys = TRAINING_KEYS if training else SLOT_KEYS
    layers = dict(increlora_layers(model))
    saved_params = saved_module_parameters(model)
    params = {plain_name(n): p for n, p in model.named_parameters()}
    # buffers of the modules to save: adapters saved before they were written lack them
    model_buffers = saved_module_buffers(model)
    # an adapter saved by older code under wrapped names loads under the model's
    renames = _older_names(list(tensors), {f"{n}.{k}" for n in layers for k in keys} | {
        SAVED_PREFIX + n for n in (*params, *model_buffers)})
    tensors = {renames.get(k, k): v for k, v in tensors.items()}
    # a parameter trained outside the modules to save (unfrozen by hand) was saved as trainable;
    # it is frozen again in a fresh model, but it still names that model's parameter
    unfrozen = {n: p for n, p in params.items()
                if SAVED_PREFIX + n in tensors and n not in saved_params
                and not n.split(".")[-1].startswith("lora_")}
    saved_params.update(unfrozen)
    saved_buffers = {n: b for n, b in model_buffers.items() if SAVED_PREFIX + n in tensors}
    expected = {f"{n}.{k}" for n in layers for k in keys} | {
        SAVED_PREFIX + n for n in (*saved_params, *saved_buffers)}
    unknown, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    _check(not unknown, path, f"unknown tensors {unknown[:5]}")
    _check(not missing, path, f"missing tensors {missing[:5]}")
    updates = []
    for name, layer in layers.items():
        found = {k: tensors[f"{name}.{k}"] for k in keys}
        for key, value in _full_slots(layer, found, training, path, name).items():
            updates.append((getattr(layer, key), value))
    packed = {id(m.weight): m for m in model.modules() if is_quantized_base(m)}
    for name, param in {**saved_params, **saved_buffers}.items():
        value = tensors[SAVED_PREFIX + name]
        _check(value.shape == param.shape, path, f"{name} has shape {tuple(value.shape)}, "
               f"the model needs {tuple(param.shape)}")
        # an 8-bit weight has the float weight's shape: the copy would cast into packed data
        _check(id(param) not in packed
               and (param.is_floating_point() or param.dtype == value.dtype), path,
               f"{name} is quantized data ({param.dtype}, "
               f"{type(packed.get(id(param), param)).__name__}) in this model, and the adapter "
               f"holds it as {value.dtype} values (trained in full precision, or dequantized): "
               "load it into the full-precision base")
        updates.append((param, value))
    pooling = meta.get(POOLING_KEY)
    _check_pooling(pooling, model, Path(save_directory))
    pad = _saved_pad_token_id(meta, path)
    _check_pad_token(pad, model, Path(save_directory))
    if check_base:
        # by identity: a base weight tied to a parameter to save is saved under that name
        saved_ids = {id(p) for p in saved_params.values()}
        carried = [n for n, layer in layers.items()
                   if id(layer.base_layer.weight) in saved_ids]
        _check_base(meta, model, Path(save_directory), carried)
    if training and diff:
        warnings.warn(f"adapter {path} holds a training state saved under other training "
                      f"settings: {described(diff)}; it loads as saved, and training goes on "
                      "with this model's config", UserWarning, stacklevel=2)
    absent = sorted(set(model_buffers) - set(saved_buffers))
    if absent:
        warnings.warn(f"adapter {path} holds no {absent[0]} ({len(absent)} buffers of the "
                      "modules to save missing: saved by an older increlora_fast); they keep "
                      "this model's values, so eval-mode outputs may differ from the trained "
                      "model's", UserWarning, stacklevel=2)
    with torch.no_grad():
        for target, value in updates:
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    for param in unfrozen.values():  # trainable as saved, so a later save_adapter keeps it
        param.requires_grad_(True)
    for layer in layers.values():  # the model's own stamps are gone, as after load_state_dict
        layer.note_loaded_stamps()
    if pooling is not None and model_pooling(model) != pooling:
        apply_pooling(model, pooling)
    if pad is not None and hasattr(model, "config") and model_pad_token_id(model) is None:
        model.config.pad_token_id = pad
    return wrapper
