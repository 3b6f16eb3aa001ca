"""Benchmark records as table rows (ratios to ``floor`` and ``peft-lora``) and the tables that
show them, console and Markdown; shared by the benchmark report and the GPU check's report."""
from __future__ import annotations

from typing import List, Optional, Sequence

from .layer_methods import INTERPRETER_NOTE, LAYER_METHODS
from .model_level import MODEL_METHODS
from .plans import PHASES

LAYER_COLUMNS = ("shape", "tokens", "r_max", "dtype", "phase", "method", "median_ms", "x_floor",
                 "x_peft_lora", "peak_mem_mb")
MODEL_COLUMNS = ("model", "dtype", "method", "steps_per_s", "mean_ms", "median_ms",
                 "alloc_median_ms", "round_median_ms", "final_median_ms", "x_peft_lora_mean", "x_peft_lora_final",
                 "peak_mem_mb", "x_peft_lora_mem")
INTERP_MARK = " (interp.)"
# The medians of a model row's phases (`model_level.measure_models`), None where not timed
PHASE_MEDIANS = ("alloc_median_ms", "round_median_ms", "final_median_ms")
# A record measured on its own after the interleaved set of its point failed
# (`gpu_check.parts.measure_isolated`)
ALONE_MARK = " (alone)"
ALONE_NOTE = ("measured on its own after the interleaved set of its point failed, not "
              "round-robin with the other methods: its ratios divide times taken at other "
              "moments")


def _ratio(value: Optional[float], ref: Optional[float]) -> Optional[float]:
    if value is None or ref is None or ref <= 0:
        return None
    return value / ref


def _method_order(name: str, known: Sequence[str]) -> int:
    return list(known).index(name) if name in known else len(known)


def layer_rows(records: Sequence[dict]) -> List[dict]:
    """Measured layer rows of one run with ``x_floor`` and ``x_peft_lora``, in table order."""
    ok = [r for r in records if r["level"] == "layer" and r.get("status") == "ok"]
    floor = {(r["shape"], r["tokens"], r["dtype"], r["phase"]): r["median_ms"]
             for r in ok if r["method"] == "floor"}
    lora = {(r["shape"], r["tokens"], r["r_max"], r["dtype"], r["phase"]): r["median_ms"]
            for r in ok if r["method"] == "peft-lora"}
    rows = []
    for r in ok:
        row = dict(r)
        row["x_floor"] = _ratio(r["median_ms"], floor.get((r["shape"], r["tokens"], r["dtype"],
                                                           r["phase"])))
        row["x_peft_lora"] = None if r["method"] == "floor" else _ratio(
            r["median_ms"], lora.get((r["shape"], r["tokens"], r["r_max"], r["dtype"],
                                      r["phase"])))
        if r.get("note") == INTERPRETER_NOTE:
            row["method"] = r["method"] + INTERP_MARK
        rows.append(_mark_alone(row))
    phase_order = {p: i for i, p in enumerate(("fwd+bwd", "fwd", "bwd"))}

    def key(row: dict):
        return (row["dtype"], phase_order.get(row["phase"], len(PHASES)),
                bool(row.get("interpreter_point")), int(row["shape"].split("x")[0]),
                int(row["shape"].split("x")[1]), row["tokens"], row["r_max"] or 0,
                _method_order(_method(row), list(LAYER_METHODS)))
    return sorted(rows, key=key)


def model_rows(records: Sequence[dict]) -> List[dict]:
    """Measured model rows of one run with their ratios to peft-lora (time and memory)."""
    ok = [r for r in records if r["level"] == "model" and r.get("status") == "ok"]
    lora = {(r["shape"], r["dtype"]): r for r in ok if r["method"] == "peft-lora"}
    rows = []
    for r in ok:
        ref = lora.get((r["shape"], r["dtype"]))
        row = dict(r, model=r["shape"])
        row["x_peft_lora_mean"] = _ratio(r["mean_ms"], ref and ref["mean_ms"])
        # a method without phases has every step alike; one with phases has a final ratio
        # only when a step of its final phase was timed
        phased = any(r.get(k) is not None for k in PHASE_MEDIANS)
        row["x_peft_lora_final"] = _ratio(r.get("final_median_ms") if phased else r["median_ms"],
                                          ref and ref["median_ms"])
        row["x_peft_lora_mem"] = _ratio(r["peak_mem_mb"], ref and ref["peak_mem_mb"])
        rows.append(_mark_alone(row))
    return sorted(rows, key=lambda row: (row["shape"], row["dtype"],
                                         _method_order(_method(row), MODEL_METHODS)))


def _mark_alone(row: dict) -> dict:
    """``row`` with `ALONE_MARK` after its method when its record was measured alone."""
    if row.get("measured_alone"):
        row["method"] += ALONE_MARK
    return row


def _method(row: dict) -> str:
    """The method of a table row, without its marks."""
    return row["method"].replace(ALONE_MARK, "").replace(INTERP_MARK, "")


def alone_lines(rows: Sequence[dict]) -> List[str]:
    """The line that explains `ALONE_MARK`, when one of ``rows`` carries it."""
    return [f"`{ALONE_MARK.strip()}`: {ALONE_NOTE}."] \
        if any(ALONE_MARK in row["method"] for row in rows) else []


def _fmt(value, column: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if column.startswith("x_"):
            return f"{value:.2f}x"
        if column == "steps_per_s":
            return f"{value:.3f}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def text_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A fixed-width table for the console."""
    cells = [[_fmt(row.get(c), c) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c), c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
