"""The benchmark report: the console summary, the time-vs-tokens plot and ``bench/RESULTS.md``,
all computed from benchmark records (rows and tables in `speed.tables`)."""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..training.outputs import write_figure
from .gpu_check.markdown import results_section
from .speed.host_overhead import COLUMNS as HOST_COLUMNS
from .speed.host_overhead import HOST_LEGEND, host_rows
from .speed.layer_methods import INTERPRETER_NOTE, LAYER_METHODS
from .speed.tables import (INTERP_MARK, LAYER_COLUMNS, MODEL_COLUMNS, alone_lines, layer_rows,
                           markdown_table, model_rows, text_table)
from .speed.targets import all_verdicts


def run_key(record: dict) -> Tuple[str, str]:
    """Records of one CLI run share their device and start date."""
    return record["device"], record["date"]


def group_runs(records: Sequence[dict]) -> "OrderedDict[Tuple[str, str], List[dict]]":
    runs: "OrderedDict[Tuple[str, str], List[dict]]" = OrderedDict()
    for r in records:
        runs.setdefault(run_key(r), []).append(r)
    return runs


def skipped_summary(records: Sequence[dict]) -> List[str]:
    """One line per (method, reason) among the skipped rows and the failed ones."""
    seen: "OrderedDict[Tuple[str, str, str], int]" = OrderedDict()
    for r in records:
        if r.get("status") in ("skipped", "failed"):
            note = " ".join(str(r.get("note") or "").split())  # one line, as the tables need
            if r["status"] == "failed" and not note.startswith("failed"):
                note = f"failed: {note or 'no note'}"
            key = (r["level"], r["method"], note)
            seen[key] = seen.get(key, 0) + 1
    return [f"{level} `{method}`: {note} ({n} rows)" for (level, method, note), n in seen.items()]


def console_report(records: Sequence[dict]) -> str:
    """What the CLI prints at the end of a run."""
    parts = []
    layer, model = layer_rows(records), model_rows(records)
    if layer:
        parts += ["LAYER LEVEL (median ms of repeats; x_floor, x_peft_lora = ratio of medians; "
                  "peak_mem_mb above the run's baseline)", text_table(layer, LAYER_COLUMNS)]
    if model:
        parts += ["MODEL LEVEL (one training step: forward, backward, allocation, optimizer)",
                  text_table(model, MODEL_COLUMNS)]
    host = host_rows(records)
    if host:
        parts += ["HOST OVERHEAD per layer call, fwd+bwd, CPU, Triton launches stubbed (median "
                  "us; minus_compute_us = less the aten-compute row)",
                  text_table(host, HOST_COLUMNS)]
    skipped = skipped_summary(records)
    if skipped:
        parts.append("\n".join(["SKIPPED"] + skipped))
    if any(r.get("note") == INTERPRETER_NOTE for r in records):
        parts.append(f"{INTERP_MARK.strip()}: {INTERPRETER_NOTE}")
    parts += alone_lines(layer + model)
    return "\n\n".join(parts)


def plot_time_vs_tokens(records: Sequence[dict], path: str) -> Optional[str]:
    """Layer fwd+bwd time against tokens, one line per method, one panel per shape and one row
    per (dtype, r_max); only shapes measured at two or more token counts. Returns the path, or
    None when nothing qualifies."""
    rows = [r for r in records if r["level"] == "layer" and r.get("status") == "ok"
            and r["phase"] == "fwd+bwd" and not r.get("interpreter_point")]
    tokens_by_shape: Dict[str, set] = {}
    for r in rows:
        tokens_by_shape.setdefault(r["shape"], set()).add(r["tokens"])
    shapes = sorted((s for s, t in tokens_by_shape.items() if len(t) >= 2),
                    key=lambda s: tuple(int(v) for v in s.split("x")))
    combos = sorted({(r["dtype"], r["r_max"]) for r in rows if r["r_max"] is not None})
    if not shapes or not combos:
        return None
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    fig = Figure(figsize=(4.2 * len(shapes) + 3.0, 3.4 * len(combos) + 0.6))
    axes = fig.subplots(len(combos), len(shapes), squeeze=False)
    for i, (dtype, r_max) in enumerate(combos):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            for method in LAYER_METHODS:
                pts = sorted((r["tokens"], r["median_ms"]) for r in rows
                             if r["method"] == method and r["shape"] == shape
                             and r["dtype"] == dtype and r["r_max"] in (r_max, None))
                if len(pts) >= 2:
                    style = dict(color="black", linestyle="--") if method == "floor" else {}
                    ax.plot(*zip(*pts), marker="o", label=method, **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{shape} {dtype} r_max={r_max}", fontsize=9)
            ax.set_xlabel("tokens")
            ax.set_ylabel("fwd+bwd median ms")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(f"Layer fwd+bwd time vs tokens - {rows[0]['device']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 3.0 / fig.get_figwidth(), 0.95))
    write_figure(fig, Path(path), dpi=110)  # whole or not at all, its folders made
    return path


LEGEND = """\
Methods (`+score` = importance tracking on, the allocation phase; without it tracking is off):
`floor` the frozen base linear alone (forward + input gradient, what every LoRA pays);
`peft-lora` peft LoRA at r = r_max; `peft-adalora` peft AdaLoRA SVDLinear at r = r_max with
`update_and_allocate` after each backward; `dense-increlora` the authors' layer (dense dW
materialised in forward, dense dL/d(dW) in backward, module score in a hook when `+score`);
`increlora-torch` ours, PyTorch reference path (its exact score is dense: dy^T x and dW per pass);
`increlora-triton` ours, Triton low-rank kernels, fused exact score; `increlora-triton-fused` ours
with the base GEMM and the adapter in one Triton kernel (`INCRELORA_FUSED_LINEAR=1`).
Layer rows: median of interleaved repeats; `x_floor` and `x_peft_lora` are ratios of medians at
the same shape, tokens, r_max, dtype and phase; `peak_mem_mb` is the peak of one run above what
was allocated before it (weights and input excluded). Model rows: one training step (forward,
backward, controller or AdaLoRA update, optimizer); `mean_ms` is the run average (allocation
phase included), `alloc_median_ms`/`round_median_ms`/`final_median_ms` the medians of the
allocation phase's steps that track scores only, of those that also run an allocation round
(ours; AdaLoRA: mask to its budget), both every second step, and of the steps after it; the timed steps of all methods run round-robin; `peak_mem_mb` is the
peak over the method's untimed first steps (allocation phase) above the memory before its model
was built (weights, optimizer state and activations included). `x_peft_lora_mean` divides
`mean_ms` by peft LoRA's, `x_peft_lora_final` the step once the budget is fixed
(`final_median_ms`; `median_ms` for methods without phases, whose steps are all alike; blank when
no final-phase step was timed) by peft LoRA's `median_ms`, `x_peft_lora_mem` `peak_mem_mb` by
peft LoRA's."""


def _environment_lines(records: Sequence[dict]) -> List[str]:
    r = records[0]
    kinds = sorted({str(x.get("mem_kind")) for x in records if x.get("mem_kind")})
    timing = ("torch.cuda.Event pairs" if r["device_type"] == "cuda"
              else "time.perf_counter")
    lines = [f"- device: {r['device']} ({r['device_type']}), {r.get('threads')} torch threads",
             f"- torch {r['torch']}, triton {r.get('triton')}, peft {r.get('peft')}, "
             f"transformers {r.get('transformers')}"
             + (f", python {r['python']}" if r.get("python") else ""),
             f"- git commit {r['git_commit']}, started {r['date']}, mode `{r.get('mode')}`",
             f"- timing: {timing}; memory: {', '.join(kinds) or '-'}"]
    if r.get("load_start") is not None:
        lines.append(f"- 1-minute load average at start / end: {r['load_start']:.2f} / "
                     f"{r.get('load_end', float('nan')):.2f} on {r.get('cpu_count')} logical CPUs")
    if r.get("command"):
        lines.append(f"- command: `{r['command']}`")
    return lines


def _model_settings(model: List[dict]) -> List[str]:
    """The settings beside the model rows: one block per model (shape) of the run, as plans
    of several models differ in steps, batch and rank (one block, unnamed, for one model)."""
    by_shape: "OrderedDict[str, List[dict]]" = OrderedDict()
    for row in model:
        by_shape.setdefault(row["shape"], []).append(row)
    out: List[str] = []
    for shape, rows in by_shape.items():
        named = f" (`{shape}`)" if len(by_shape) > 1 else ""
        settings = OrderedDict((row["method"], row.get("settings")) for row in rows)
        out += [f"Settings, beside the numbers{named}: " + rows[0].get("run_settings", "")
                + "; same random batches, dropout of the model config, adapter dropout 0, "
                "adapters on the same targets, the classification head (and the pooler, where "
                "the model has one) trained by every method."]
        out += [f"- `{m}`: {s}" for m, s in settings.items()] + [""]
    return out


def _run_section(records: List[dict], plot_rel: Optional[str]) -> List[str]:
    r0 = records[0]
    out = [f"## {r0['device_type'].upper()}: {r0['device']} ({r0.get('mode')} mode, {r0['date']})",
           ""] + _environment_lines(records) + [""]
    layer = layer_rows(records)
    for dtype in sorted({row["dtype"] for row in layer}):
        for phase in ("fwd+bwd", "fwd", "bwd"):
            rows = [row for row in layer if row["dtype"] == dtype and row["phase"] == phase]
            if rows:
                out += [f"### Layer level, {phase}, {dtype}", "",
                        markdown_table(rows, LAYER_COLUMNS), ""]
    if any(INTERP_MARK in row["method"] for row in layer):
        out += [f"`{INTERP_MARK.strip()}`: {INTERPRETER_NOTE}.", ""]
    if alone_lines(layer):
        out += alone_lines(layer) + [""]
    if plot_rel:
        out += [f"![layer fwd+bwd time vs tokens]({plot_rel})", ""]
    model = model_rows(records)
    if model:
        out += ["### Model level (one training step)", "", markdown_table(model, MODEL_COLUMNS),
                ""]
        if alone_lines(model):
            out += alone_lines(model) + [""]
        out += _model_settings(model)
    host = host_rows(records)
    if host and all(row.get("device_type") == "cuda" for row in host):
        # a gpu-check's host records: issued on the device, kernels run (not the CPU legend)
        out += ["### Host time per layer call on the device", "",
                f"Triton launches and host time per fwd+bwd call ({host[0].get('dtype')}; "
                f"{host[0].get('note') or host[-1].get('note')}): median µs of interleaved "
                "calls.", "", markdown_table(host, HOST_COLUMNS), ""]
    elif host:
        out += ["### Host overhead per layer call (Triton launches stubbed)", "", HOST_LEGEND,
                "", markdown_table(host, HOST_COLUMNS), ""]
    skipped = skipped_summary(records)
    if skipped:
        out += ["Not measured in this run:", ""] + [f"- {line}" for line in skipped] + [""]
    if any(row.get("interpreter_point") for row in layer):
        out += ["The rows at the Triton interpreter point (the smallest shape, after the grid) "
                "only show that every method runs; none of their times means anything.", ""]
    if not (layer or model):
        return out  # a host-overhead run: the item-7 targets are about layer and model rows
    out += ["### Issue 5 item-7 targets", "",
            "| target | scope | verdict | measured |", "|---|---|---|---|"]
    out += [f"| {v.target} | {v.scope} | **{v.status}** | {v.detail} |"
            for v in all_verdicts(records)]
    return out + [""]


RESULTS_TITLE = "# Benchmark results"


def written_by_report(path: str) -> bool:
    """Whether the existing file ``path`` is a ``RESULTS.md`` `results_markdown` wrote (it
    begins with `RESULTS_TITLE` on a line of its own), which a new report may replace."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\n") == RESULTS_TITLE
    except (OSError, UnicodeDecodeError):
        return False


def results_markdown(records: Sequence[dict], plots: Dict[Tuple[str, str], str],
                     md_path: str, notes: Optional[str] = None,
                     gpu_checks: Sequence[dict] = ()) -> str:
    """The whole ``RESULTS.md``: one section per run (CPU and GPU runs alike), one per
    `gpu-check` report in ``gpu_checks`` (kernels, fine-tune, targets), then the notes.

    ``plots`` maps a run key to its PNG; links are made relative to ``md_path``.
    """
    base = Path(md_path).resolve().parent
    out = [RESULTS_TITLE, "",
           "Generated by `increlora-fast bench` (`--results-md` or `--report-only`) from "
           "benchmark records (`increlora_fast/benchmarks/report.py`); do not edit by hand. "
           "To regenerate it, or to add a GPU run: `increlora-fast bench --report-only "
           "--include-json "
           "bench/records/<run>.json [--include-json <gpu-check out>/gpu_check.json ...] "
           "--notes bench/NOTES.md`.", "",
           LEGEND, ""]
    for key, run in group_runs(records).items():
        plot = plots.get(key)
        rel = os.path.relpath(Path(plot).resolve(), base) if plot else None
        out += _run_section(run, rel)
    if gpu_checks:
        for check in gpu_checks:
            out += results_section(check)
    if notes:
        out += ["## Notes", "", notes.strip(), ""]
    return "\n".join(out)
