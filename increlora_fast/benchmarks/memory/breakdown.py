"""Where the memory of a fine-tuning step goes, per method: "will it fit" before renting a GPU.

`memory_breakdown` returns rows ``{method, component, bytes, how, detail}`` for IncreLoRA, peft
LoRA at r = r_max and at r = target_rank and peft AdaLoRA at its init_r. ``how`` is

- ``exact``: from shapes and dtypes on a meta-device copy of the model (no weights): the base
  weights (accelerate's ``compute_module_sizes``), adapter tensors, buffers, gradients, optimizer
  states, score buffers and the batch;
- ``measured``: one real training step of the model at the requested size (random weights),
  counted per tensor (`memory_probe.TensorPeak`: the CUDA allocator, or live tensor storages on
  CPU), minus the exact gradients;
- ``estimated``: from small runs scaled by their measured growth (``estimate=True``), the total
  over a 4/8-bit base (its step is measured on a full-precision stand-in; the base itself is
  exact in bitsandbytes' layout), or an active-rank share.

The total peak is everything that stays allocated plus the gradients plus the larger of the
activations (peak of forward and backward) and the optimizer step's temporaries.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ...model import suffix_match
from ...files import atomic_write_bytes
from .compared_methods import AdapterSetting, MemoryMethod, Sizes, _in_out, methods_for
from .model_spec import ModelSpec
from .step import estimate_step, measure_step

BASE = "base weights"
PADDED = "adapter tensors (padded)"
ACTIVE = "adapter tensors (active)"
BUFFERS = "adapter buffers"
SAVED_COPY = "modules_to_save copy"
GRADS = "gradients"
OPTIMIZER = "optimizer states"
SCORE = "score buffers (per-pass)"
SCORE_DENSE = "score buffers (dense exact-step mode)"
BATCH = "batch tensors"
ACTIVATIONS = "activations"
OPT_TEMPS = "optimizer step temporaries"
TOTAL = "total peak"
TOTAL_DENSE = "total peak (exact-step mode)"
COMPONENTS = (BASE, PADDED, ACTIVE, BUFFERS, SAVED_COPY, GRADS, OPTIMIZER, SCORE, SCORE_DENSE,
              BATCH, ACTIVATIONS, OPT_TEMPS, TOTAL, TOTAL_DENSE)
_SIZE_KEYS = {"padded": PADDED, "active": ACTIVE, "buffers": BUFFERS,
              "saved_copy": SAVED_COPY, "grads": GRADS,
              "optimizer": OPTIMIZER, "score": SCORE, "score_dense": SCORE_DENSE}
QUANTIZED = ("none", "4bit", "8bit")
BNB_BLOCKSIZE = 64   # bitsandbytes 4-bit: one fp32 absmax per 64 weights
BNB_CODE_BYTES = 64  # and a 16-entry fp32 code per layer
# Double quantization (compress_statistics): the absmax as uint8, in blocks of 256 with one fp32
# absmax each, a 256-entry fp32 code and an fp32 offset per layer.
BNB_NESTED_BLOCKSIZE = 256
BNB_NESTED_CODE_BYTES = 256 * 4
BNB_OFFSET_BYTES = 4
# How far `estimate_step` was from a measured step where it was checked (it came out low there
# on BERT, the unsafe direction): said wherever its figures are read.
ESTIMATE_ERROR = ("within about ±5 % of a measured step on the models tried (tiny BERT, tiny "
                  "Llama), either way")


def _quantized_linears(meta_model: nn.Module) -> Tuple[set, Dict[str, nn.Module]]:
    """(the module names transformers keeps in the base dtype, {name: linear} of the ones it
    quantizes to 4/8 bits): plain nn.Linear and Conv1D (GPT-2's) layers alike."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = set(get_keys_to_not_convert(meta_model))
    linears = {n: m for n, m in meta_model.named_modules()
               if (type(m) is nn.Linear or isinstance(m, Conv1D))
               and not any(suffix_match(n, k) for k in keep)}
    return keep, linears


def _absmax_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of a 4-bit weight's quantization state in bitsandbytes: its absmax per block (fp32,
    or with ``double_quant`` uint8 and a nested state) and its code."""
    blocks = math.ceil(numel / BNB_BLOCKSIZE)
    if not double_quant:
        return blocks * 4 + BNB_CODE_BYTES
    return (blocks + math.ceil(blocks / BNB_NESTED_BLOCKSIZE) * 4 + BNB_NESTED_CODE_BYTES
            + BNB_OFFSET_BYTES + BNB_CODE_BYTES)


def base_weights(meta_model: nn.Module, quantized: str,
                 double_quant: bool = False) -> Tuple[int, str, str]:
    """Bytes of every parameter and buffer of the base model (accelerate's
    ``compute_module_sizes``); with a 4/8-bit base, its linears in bitsandbytes' layout
    (``double_quant``: a 4-bit base's absmax quantized again, ``bnb_4bit_use_double_quant``)."""
    from accelerate.utils import compute_module_sizes

    if quantized not in QUANTIZED:
        raise ValueError(f"--quantized {quantized!r} is invalid: use one of {list(QUANTIZED)}")
    if quantized == "none":
        return (int(compute_module_sizes(meta_model)[""]), "exact",
                "accelerate compute_module_sizes: every parameter and buffer at its dtype")
    from accelerate.utils.dataclasses import CustomDtype

    keep, linears = _quantized_linears(meta_model)
    packed = CustomDtype.INT4 if quantized == "4bit" else torch.int8
    size = compute_module_sizes(meta_model,
                                special_dtypes={f"{n}.weight": packed for n in linears})[""]
    if quantized == "4bit":
        size += sum(_absmax_bytes(m.weight.numel(), double_quant) for m in linears.values())
        layout = ("4-bit weights, NF4 or FP4 (the same size), " + (
            f"double quantization: one uint8 absmax per {BNB_BLOCKSIZE}, one fp32 per "
            f"{BNB_NESTED_BLOCKSIZE} of those" if double_quant else
            f"one fp32 absmax per {BNB_BLOCKSIZE} (no double quantization)"))
    else:
        size += sum(_in_out(m)[1] * 4 for m in linears.values())
        layout = "LLM.int8: int8 weights and one fp32 scale per output row"
    return (int(size), "exact",
            f"bitsandbytes {layout} on {len(linears)} linears ({', '.join(sorted(keep))} kept "
            "in the base dtype, transformers' default; llm_int8_skip_modules would keep more)")


def _row(method: str, component: str, value: Tuple[int, str, str]) -> dict:
    nbytes, how, detail = value
    return {"method": method, "component": component, "bytes": int(nbytes), "how": how,
            "detail": detail}


def _static_sum(sizes: Sizes, base: int, batch: int) -> int:
    return base + batch + sum(sizes[k][0] for k in ("padded", "buffers", "saved_copy",
                                                    "optimizer", "score") if k in sizes)


def _held_exact(sizes: Sizes, base: int, setting: AdapterSetting) -> int:
    """The exact bytes live between two measured steps: `_static_sum` without the batch, plus,
    in exact-step mode, the dense score buffers the tracked steps hold (counted in the
    exact-step total, so they must not reach the measured step's share)."""
    dense = sizes["score_dense"][0] if setting.exact_step_score and "score_dense" in sizes \
        else 0
    return _static_sum(sizes, base, 0) + dense


def default_small_seq(seq_len: int) -> int:
    """Shortest sequence `estimate_step` measures (it also takes 2x and 4x): long enough that the
    activations, not fixed-size temporaries, make the peak."""
    return max(32, min(128, seq_len // 8))


def check_estimate_sizes(seq_len: int, small_seq: Optional[int]) -> None:
    """``--estimate`` measures ``small_seq`` (None: `default_small_seq`) x (1, 2, 4) tokens:
    ValueError naming the options unless all are shorter than ``seq_len`` (so it never measures
    more than the full size, nor runs past the positions)."""
    small = small_seq or default_small_seq(seq_len)
    if 4 * small >= seq_len:
        raise ValueError(
            f"--estimate at --seq-len {seq_len} would measure sequences of {small}, {2 * small} "
            f"and {4 * small} tokens, not shorter than the full size: drop --estimate (the full "
            "size is the cheaper run)"
            + (f" or give --small-seq {(seq_len - 1) // 4} or less" if seq_len > 4 else ""))


def method_rows(method: MemoryMethod, spec: ModelSpec, setting: AdapterSetting,
                batch_size: int, seq_len: int, device: torch.device, quantized: str = "none",
                estimate: bool = False, small_seq: Optional[int] = None,
                double_quant: bool = False) -> List[dict]:
    """The rows of one method (see the module docstring)."""
    meta = spec.build(device, meta=True)
    base = base_weights(meta, quantized, double_quant)
    base_unquantized = base_weights(meta, "none")[0]
    # A bitsandbytes weight is not a float: every adapter_dtype gives float32 A and B on it
    # (`layer.adapter_dtype_for`). The step runs on the unquantized stand-in, whose exact
    # sizes (`stand_in`) are what its measurement is corrected by.
    packed = frozenset(_quantized_linears(meta)[1]) if quantized != "none" else frozenset()
    sizes = method.sizes(meta, spec.dtype, setting, quantized_names=packed)
    stand_in_sizes = sizes if not packed or method.kind != "increlora" else \
        method.sizes(spec.build(device, meta=True), spec.dtype, setting)
    batch = spec.batch(batch_size, seq_len, torch.device("cpu"))
    batch_bytes = sum(t.numel() * t.element_size() for t in batch.values())
    rows = [_row(method.key, BASE, base)]
    rows += [_row(method.key, _SIZE_KEYS[k], sizes[k]) for k in _SIZE_KEYS if k in sizes]
    rows.append(_row(method.key, BATCH, (batch_bytes, "exact",
                                         f"{', '.join(batch)} int64, {batch_size} x {seq_len}")))
    grads = sizes["grads"][0]
    stand_in = "" if quantized == "none" else f" (on a {spec.dtype} stand-in for the " \
        f"{quantized} base)"
    if estimate:
        def exact_at(depth: Optional[int]) -> Tuple[int, int]:
            small_meta = spec.build(device, n_layers=depth, meta=True)
            small_base = base_weights(small_meta, "none")[0]
            small_sizes = method.sizes(small_meta, spec.dtype, setting)
            return small_sizes["grads"][0], _held_exact(small_sizes, small_base, setting)
        small = small_seq or default_small_seq(seq_len)
        est = estimate_step(spec, method, setting, exact_at, batch_size, seq_len, device, small)
        acts, opt, how = est.activations, est.optimizer, "estimated"
        note = f"{est.how}{stand_in}; {ESTIMATE_ERROR}"
        total_note = "exact static part + estimated step"
    else:
        step = measure_step(spec, method, setting, batch_size, seq_len, device)
        exact_static = _held_exact(stand_in_sizes, base_unquantized, setting)
        stand_in_grads = stand_in_sizes["grads"][0]
        # Held from one step into the next by the loss a loop keeps (its graph's hooks).
        carried = max(0, step.static - exact_static)
        acts = max(0, step.forward_backward - stand_in_grads + carried)
        opt = max(0, step.optimizer - stand_in_grads + carried)
        how, note = "measured", (f"one training step at {batch_size} x {seq_len} ({step.kind})"
                                 f"{stand_in}, gradients subtracted, {carried} B the previous "
                                 "step's loss still held included")
        total_note = (f"exact static part + measured step; live at the step's start "
                      f"{step.static} B vs {exact_static} B exact")
    cpu_attention = "" if device.type != "cpu" else (
        "; on CPU, attention that takes SDPA's math path (with attention dropout in training, "
        "as BERT's) holds S x S attention weights per head, which flash or memory-efficient "
        "attention on a GPU does not: at long sequences this overstates a GPU's activations")
    rows.append(_row(method.key, ACTIVATIONS, (acts, how, "peak of forward and backward: "
                                               + note + cpu_attention)))
    rows.append(_row(method.key, OPT_TEMPS, (opt, how, "peak of the update (controller, "
                                             "optimizer step, AdaLoRA allocator): " + note)))
    total = _static_sum(sizes, base[0], batch_bytes) + grads + max(acts, opt)
    # A quantized base's step is measured on a full-precision stand-in: its total is estimated.
    how_total = "estimated" if estimate or quantized != "none" else "measured"
    if packed:
        largest = max(m.weight.numel() for m in _quantized_linears(meta)[1].values())
        total_note += (f"; not counted: the temporary {spec.dtype} dequantized weight a "
                       f"{quantized} step makes per layer (the largest "
                       f"{largest * spec.dtype.itemsize} B)")
    rows.append(_row(method.key, TOTAL, (total, how_total, total_note)))
    if "score_dense" in sizes:
        rows.append(_row(method.key, TOTAL_DENSE, (total + sizes["score_dense"][0], how_total,
                                                   "total peak + the dense score buffers")))
    return rows


def memory_breakdown(spec: ModelSpec, setting: AdapterSetting, batch_size: int, seq_len: int,
                     device: torch.device, quantized: str = "none", estimate: bool = False,
                     small_seq: Optional[int] = None, progress: bool = True,
                     double_quant: bool = False) -> List[dict]:
    """Rows of every method of `methods_for` (see the module docstring)."""
    from tqdm.auto import tqdm

    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"--batch-size {batch_size} / --seq-len {seq_len}: both must be >= 1")
    methods = methods_for(setting)
    limit = spec.max_positions()
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len}: the model embeds at most {limit} positions")
    if estimate:
        check_estimate_sizes(seq_len, small_seq)
    rows = []
    for method in tqdm(methods, desc="memory", disable=not progress):
        rows += method_rows(method, spec, setting, batch_size, seq_len, torch.device(device),
                            quantized, estimate, small_seq, double_quant)
    return rows


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


_HOW_TAG = {"exact": "ex", "measured": "ms", "estimated": "es"}


def format_table(rows: List[dict]) -> str:
    """Components by methods; each cell the size and how it was obtained."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells: Dict[Tuple[str, str], str] = {
        (r["component"], r["method"]): f"{human_bytes(r['bytes'])} {_HOW_TAG[r['how']]}"
        for r in rows}
    comps = [c for c in COMPONENTS if any((c, m) in cells for m in methods)]
    width = [max(len(m), *(len(cells.get((c, m), "-")) for c in comps)) for m in methods]
    first = max(len(c) for c in comps)
    lines = [" | ".join([" " * first] + [m.rjust(w) for m, w in zip(methods, width)])]
    lines.append("-" * len(lines[0]))
    for c in comps:
        lines.append(" | ".join([c.ljust(first)] + [cells.get((c, m), "-").rjust(w)
                                                    for m, w in zip(methods, width)]))
    lines.append("ex: exact from shapes and dtypes; ms: measured; es: estimated. "
                 f"'{ACTIVE}' is part of '{PADDED}'; '{TOTAL}' counts the larger of "
                 f"'{ACTIVATIONS}' and '{OPT_TEMPS}'. Totals are tensors only: before "
                 "comparing one with a GPU's memory, add the CUDA context (several hundred MiB) "
                 "and the caching allocator's unused reserve (fragmentation).")
    if any(r["component"] == ACTIVATIONS and r["how"] == "estimated" for r in rows):
        lines.append(f"--estimate: '{ACTIVATIONS}' and '{OPT_TEMPS}' scaled from small runs, "
                     f"{ESTIMATE_ERROR}: leave that margin.")
    return "\n".join(lines)


def format_notes(rows: List[dict]) -> str:
    """How each figure was obtained, one line per (method, component)."""
    return "\n".join(f"{r['method']} / {r['component']}: {r['detail']}" for r in rows)


def write_json(rows: List[dict], path: str) -> Path:
    """Write ``rows`` to ``path`` so that a reader (or a run cut off while writing) sees the
    earlier file or the whole new one, never half of it; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(rows, indent=2) + "\n").encode())
    return out


def build_spec(model: str, head: str, dtype: str) -> ModelSpec:
    """The `ModelSpec` of a ``--model`` (folder, config file or hub id)."""
    from .model_spec import DTYPES, load_config, resolve_head

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is invalid: use one of {list(DTYPES)}")
    config = load_config(model)
    return ModelSpec(config, resolve_head(config, head), DTYPES[dtype])
