"""The speed and memory targets of issue 5 (item 7) and of issue 13 (`issue13_verdicts`, for
`gpu-check`), checked against benchmark records.

A target is "met" or "missed" only from records of the kind it names (device type, dtype,
shape, tokens, r_max); otherwise it is "not measurable" with the reason. For the GPU layer and
model targets, the same comparison on CPU records is reported separately as a "CPU analog",
which says something about the PyTorch path and nothing about the GPU target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

TARGET_SHAPE, TARGET_TOKENS, TARGET_R, TARGET_DTYPE = "768x3072", 16384, 16, "bf16"
GPU_OURS = ("increlora-triton", "increlora-triton-fused")
CPU_OURS = ("increlora-torch",)


@dataclass
class Verdict:
    target: str
    scope: str
    status: str  # "met", "missed" or "not measurable"
    detail: str


def _ok(records: Iterable[dict], **match) -> List[dict]:
    return [r for r in records if r.get("status") == "ok"
            and all(r.get(k) == v for k, v in match.items())]


def _one(records: List[dict], method: str) -> Optional[dict]:
    found = [r for r in records if r["method"] == method]
    return found[0] if found else None


def _check(ok: bool) -> str:
    return "met" if ok else "missed"


def _layer_point(records: List[dict], device_type: str
                 ) -> Tuple[Optional[List[dict]], str]:
    """The fwd+bwd rows of the target point; on CPU the nearest point measured (fp32)."""
    if device_type == "cuda":
        rows = _ok(records, level="layer", device_type="cuda", shape=TARGET_SHAPE,
                   tokens=TARGET_TOKENS, dtype=TARGET_DTYPE, phase="fwd+bwd")
        rows = [r for r in rows if r["r_max"] in (TARGET_R, None)]
        where = f"{TARGET_DTYPE}, {TARGET_SHAPE}, {TARGET_TOKENS} tokens, r_max {TARGET_R}"
        return (rows or None), where
    rows = _ok(records, level="layer", device_type="cpu", shape=TARGET_SHAPE, phase="fwd+bwd")
    rows = [r for r in rows if not r.get("note")]
    if not rows:
        return None, ""
    tokens = max(r["tokens"] for r in rows)
    ranks = sorted({r["r_max"] for r in rows if r["r_max"] is not None},
                   key=lambda r: abs(r - TARGET_R))
    if not ranks:
        return None, ""
    dtype = "fp32" if any(r["dtype"] == "fp32" for r in rows) else rows[0]["dtype"]
    rows = [r for r in rows if r["tokens"] == tokens and r["dtype"] == dtype
            and r["r_max"] in (ranks[0], None)]
    return rows, f"{dtype}, {TARGET_SHAPE}, {tokens} tokens, r_max {ranks[0]}"


def layer_verdicts(records: List[dict], device_type: str) -> List[Verdict]:
    """The four layer targets at the target point (CUDA) or their CPU analog."""
    names = ("fwd+bwd, tracking off, <= 1.10x floor",
             "fwd+bwd, tracking off, no slower than peft-lora",
             "fwd+bwd, exact score on, <= 1.5x floor",
             "score-on overhead over floor <= half of dense-increlora+score's")
    scope = "GPU" if device_type == "cuda" else "CPU analog (not the target)"
    rows, where = _layer_point(records, device_type)
    if rows is None:
        why = ("no CUDA records at that point (run the full mode on a GPU)"
               if device_type == "cuda" else "no CPU layer records at 768x3072")
        return [Verdict(n, scope, "not measurable", why) for n in names]
    ours_names = GPU_OURS if device_type == "cuda" else CPU_OURS
    floor, lora, dense = (_one(rows, m) for m in ("floor", "peft-lora", "dense-increlora+score"))
    off = [r for r in rows if r["method"] in ours_names]
    on = [r for r in rows if r["method"] in tuple(n + "+score" for n in ours_names)]
    if floor is None or not off or not on:
        return [Verdict(n, scope, "not measurable", f"{where}: floor or ours missing")
                for n in names]
    best_off = min(off, key=lambda r: r["median_ms"])
    best_on = min(on, key=lambda r: r["median_ms"])
    f = floor["median_ms"]
    out = [Verdict(names[0], scope, _check(best_off["median_ms"] <= 1.10 * f),
                   f"{where}: {best_off['method']} {best_off['median_ms'] / f:.2f}x floor")]
    if lora is None:
        out.append(Verdict(names[1], scope, "not measurable", f"{where}: no peft-lora row"))
    else:
        out.append(Verdict(names[1], scope, _check(best_off["median_ms"] <= lora["median_ms"]),
                           f"{where}: {best_off['method']} "
                           f"{best_off['median_ms'] / lora['median_ms']:.2f}x peft-lora"))
    out.append(Verdict(names[2], scope, _check(best_on["median_ms"] <= 1.5 * f),
                       f"{where}: {best_on['method']} {best_on['median_ms'] / f:.2f}x floor"))
    if dense is None:
        out.append(Verdict(names[3], scope, "not measurable", f"{where}: no dense row"))
    else:
        ours_over, dense_over = best_on["median_ms"] - f, dense["median_ms"] - f
        out.append(Verdict(names[3], scope, _check(ours_over <= 0.5 * dense_over),
                           f"{where}: {best_on['method']} +{ours_over:.2f} ms over floor, "
                           f"dense-increlora+score +{dense_over:.2f} ms"))
    return out


def _model_groups(records: List[dict], device_type: str) -> Dict[Tuple[str, str], List[dict]]:
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for r in _ok(records, level="model", device_type=device_type):
        groups.setdefault((r["shape"], r["dtype"]), []).append(r)
    return groups


def model_verdicts(records: List[dict], device_type: str) -> List[Verdict]:
    """The three model targets (GPU: ours = increlora-triton) or their CPU analog."""
    names = ("step after allocation no slower than peft-lora (r = r_max)",
             "run-average step no slower than peft-adalora",
             "peak memory <= peft-lora")
    scope = "GPU" if device_type == "cuda" else "CPU analog (not the target)"
    ours_name = "increlora-triton" if device_type == "cuda" else "increlora-torch"
    groups = _model_groups(records, device_type)
    out: List[Verdict] = []
    for (shape, dtype), rows in sorted(groups.items()):
        ours, lora, ada = (_one(rows, m) for m in (ours_name, "peft-lora", "peft-adalora"))
        where = f"{shape} {dtype}"
        if ours is None:
            continue
        if lora is not None and ours.get("final_median_ms") is not None:
            ratio = ours["final_median_ms"] / lora["median_ms"]
            out.append(Verdict(names[0], scope, _check(ratio <= 1.0),
                               f"{where}: {ours_name} final-phase median {ratio:.2f}x peft-lora"))
        if ada is not None:
            ratio = ours["mean_ms"] / ada["mean_ms"]
            out.append(Verdict(names[1], scope, _check(ratio <= 1.0),
                               f"{where}: {ours_name} run mean {ratio:.2f}x peft-adalora"))
        if lora is not None:
            ratio = ours["peak_mem_mb"] / max(lora["peak_mem_mb"], 1e-9)
            out.append(Verdict(names[2], scope, _check(ratio <= 1.0),
                               f"{where}: {ours['peak_mem_mb']:.0f} vs {lora['peak_mem_mb']:.0f} "
                               f"MiB ({ratio:.2f}x, {ours.get('mem_kind')})"))
    if not out:
        why = ("no CUDA model records (run the full mode on a GPU)" if device_type == "cuda"
               else "no CPU model records")
        return [Verdict(n, scope, "not measurable", why) for n in names]
    return out


def cpu_model_verdicts(records: List[dict]) -> List[Verdict]:
    """The CPU target: increlora-torch's model step no slower than peft-adalora's."""
    name = "increlora-torch model step no slower than peft-adalora"
    out = []
    for (shape, dtype), rows in sorted(_model_groups(records, "cpu").items()):
        ours, ada = _one(rows, "increlora-torch"), _one(rows, "peft-adalora")
        if ours is None or ada is None:
            continue
        ratio = ours["mean_ms"] / ada["mean_ms"]
        detail = f"{shape} {dtype}: run mean {ratio:.2f}x peft-adalora"
        for phase in ("alloc", "round", "final"):
            a, b = ours.get(f"{phase}_median_ms"), ada.get(f"{phase}_median_ms")
            if a is not None and b is not None:
                detail += f"; {phase}-phase medians {a / b:.2f}x"
        out.append(Verdict(name, "CPU", _check(ratio <= 1.0), detail))
    return out or [Verdict(name, "CPU", "not measurable", "no CPU model records with both")]


def all_verdicts(records: List[dict]) -> List[Verdict]:
    """Every item-7 target, GPU first, then the CPU target, then the CPU analogs."""
    return (layer_verdicts(records, "cuda") + model_verdicts(records, "cuda")
            + cpu_model_verdicts(records)
            + layer_verdicts(records, "cpu") + model_verdicts(records, "cpu"))


ISSUE13_LAYER = ("fwd+bwd, tracking off, <= 1.25x floor",
                 "fwd+bwd, tracking off, <= 0.8x peft-lora",
                 "fwd+bwd, tracking on, <= 1.6x floor")
ISSUE13_MODEL = ("training step <= peft-lora (r = r_max)", "training step <= 0.8x peft-adalora",
                 "peak memory <= peft-lora")


def issue13_verdicts(records: List[dict]) -> List[Verdict]:
    """The GPU targets of issue 13 (`gpu-check`): the layer at bf16, 16,384 tokens, 768x3072,
    r_max 16 (ours = the better of the default and the fused Triton path) and the model step of
    every preset measured (ours = increlora-triton, run-average step), all from CUDA records."""
    rows, where = _layer_point(records, "cuda")
    out: List[Verdict] = []
    floor = lora = None
    if rows is not None:
        floor, lora = _one(rows, "floor"), _one(rows, "peft-lora")
        off = [r for r in rows if r["method"] in GPU_OURS]
        on = [r for r in rows if r["method"] in tuple(n + "+score" for n in GPU_OURS)]
    if rows is None or floor is None or not off or not on:
        why = f"{where}: floor or ours missing" if rows else "no CUDA layer records at that point"
        out += [Verdict(n, "GPU", "not measurable", why) for n in ISSUE13_LAYER]
    else:
        f = floor["median_ms"]
        best_off = min(off, key=lambda r: r["median_ms"])
        best_on = min(on, key=lambda r: r["median_ms"])
        out.append(Verdict(ISSUE13_LAYER[0], "GPU", _check(best_off["median_ms"] <= 1.25 * f),
                           f"{where}: {best_off['method']} {best_off['median_ms'] / f:.2f}x floor"))
        if lora is None:
            out.append(Verdict(ISSUE13_LAYER[1], "GPU", "not measurable", f"{where}: no peft-lora"))
        else:
            ratio = best_off["median_ms"] / lora["median_ms"]
            out.append(Verdict(ISSUE13_LAYER[1], "GPU", _check(ratio <= 0.8),
                               f"{where}: {best_off['method']} {ratio:.2f}x peft-lora"))
        out.append(Verdict(ISSUE13_LAYER[2], "GPU", _check(best_on["median_ms"] <= 1.6 * f),
                           f"{where}: {best_on['method']} {best_on['median_ms'] / f:.2f}x floor"))
    groups = _model_groups(records, "cuda")
    model: List[Verdict] = []
    for (shape, dtype), group in sorted(groups.items()):
        ours, lora_m, ada = (_one(group, m) for m in ("increlora-triton", "peft-lora",
                                                      "peft-adalora"))
        if ours is None:
            continue
        where_m = f"{shape} {dtype}"
        if lora_m is not None:
            ratio = ours["mean_ms"] / lora_m["mean_ms"]
            model.append(Verdict(ISSUE13_MODEL[0], "GPU", _check(ratio <= 1.0),
                                 f"{where_m}: run mean {ratio:.2f}x peft-lora"))
        if ada is not None:
            ratio = ours["mean_ms"] / ada["mean_ms"]
            model.append(Verdict(ISSUE13_MODEL[1], "GPU", _check(ratio <= 0.8),
                                 f"{where_m}: run mean {ratio:.2f}x peft-adalora"))
        if lora_m is not None:
            ratio = ours["peak_mem_mb"] / max(lora_m["peak_mem_mb"], 1e-9)
            model.append(Verdict(ISSUE13_MODEL[2], "GPU", _check(ratio <= 1.0),
                                 f"{where_m}: {ours['peak_mem_mb']:.0f} vs "
                                 f"{lora_m['peak_mem_mb']:.0f} MiB ({ratio:.2f}x)"))
    if not model:
        model = [Verdict(n, "GPU", "not measurable", "no CUDA model records")
                 for n in ISSUE13_MODEL]
    return out + model
