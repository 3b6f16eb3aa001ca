"""Markdown of a `gpu-check` report: ``gpu_check.md``, and its sections in ``bench/RESULTS.md``."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from ..records import gpu_check_records
from ..speed.host_overhead import COLUMNS as HOST_COLUMNS
from ..speed.host_overhead import host_rows
from ..speed.tables import LAYER_COLUMNS, alone_lines, layer_rows, markdown_table, model_rows
from ..speed.targets import issue13_verdicts
from .verdicts import cuda_graphs_auto, gemm_backward_rows, issue27_verdicts

OPTIMIZER_COLUMNS = ("method", "launches_per_step", "median_us", "min_us", "us_per_launch_saved",
                     "repeats")
PENALTY_COLUMNS = ("method", "status", "modules", "launches_per_call", "aten_ops_per_call",
                   "host_median_us", "median_us", "min_us", "repeats")
KERNEL_COLUMNS = ("op", "dtype", "M", "in", "out", "r_max", "max_rel_err", "tol", "ok", "error")
MODEL_CHECK_COLUMNS = ("model", "dtype", "method", "mean_ms", "median_ms", "tracked_median_ms",
                       "round_median_ms", "untracked_median_ms", "tokens_per_s",
                       "x_peft_lora_mean", "peak_mem_mb", "x_peft_lora_mem")
UNMEASURED_COLUMNS = ("model", "dtype", "method", "status", "note")
DY_PASS_COLUMNS = ("shape", "tokens", "r_max", "dtype", "backward_ms", "cublas_ms", "ours_ms",
                   "x_cublas", "aten_ms", "x_cublas_aten", "ours_4x_ms", "x_cublas_4x")
SCORE_PASS_COLUMNS = ("shape", "tokens", "r_max", "dtype", "gemm_dw_ms", "score_ms",
                      "x_gemm_score", "score_chunked_ms", "x_gemm_chunked")
FINETUNE_COLUMNS = ("run", "args", "status", "eval_accuracy", "eval_macro_f1", "eval_examples",
                    "steps", "device", "precision", "tokens_per_second", "tokens_per_second_warm",
                    "x_lora_tokens_per_s", "peak_device_memory_mb", "train_seconds",
                    "precompile_seconds", "first_steps_s", "total_seconds", "total_rank", "note")
GRAPHS_COLUMNS = ("precision", "status", "steps", "replays", "captures", "ranks_equal",
                  "max_param_diff", "max_loss_diff", "tol", "loss_scale", "loss_scale_graphed",
                  "overflows", "overflows_replayed", "note")
PART_TITLES = OrderedDict((
    ("kernels", "(a) kernel correctness against float64 references"),
    ("graphs", "(b) graphed training steps against eager ones (tiny BERT, fp32/bf16/fp16)"),
    ("finetune", "(c) the main fine-tune on the device"),
    ("model", "(d) model training step"),
    ("qlora", "(e) model training step on a 4-bit NF4 base"),
    ("layer", "(f) layer fwd+bwd, bf16; launches and host time per call and per optimizer step"),
))


def _bnb_version(env: Dict) -> str:
    """bitsandbytes' version as the environment recorded it; records older than that field
    (2026-12-05) say nothing about it."""
    if "bitsandbytes" not in env:
        return "not recorded"
    return env["bitsandbytes"] or "not installed"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value).replace("|", "/").replace("\n", " ")


def _table(rows: List[Dict], columns) -> List[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def _environment(report: Dict) -> List[str]:
    env = report.get("environment", {})
    lines = [f"- device: {env.get('device')} ({env.get('device_type')})"
             + (f", compute capability {env['capability']}, {env.get('gpu_memory_mb')} MiB, "
                f"{env.get('multiprocessors')} SMs, {env.get('gpu_count')} GPU(s) visible"
                if env.get("capability") else ""),
             f"- torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}, peft {env.get('peft')}, "
             f"bitsandbytes {_bnb_version(env)}, "
             f"Python {env.get('python')}",
             f"- git commit {env.get('git_commit')}, started {report.get('date')}, "
             f"{report.get('seconds')} s in all"
             + (", dry run (toy sizes; on CPU the Triton kernels run under the interpreter, so "
                "no time here says anything about speed)" if report.get("dry_run") else ""),
             f"- command: `{env.get('command')}`"]
    return lines + [f"- note: {n}" for n in report.get("notes", [])]


def kernel_section(part: Dict) -> List[str]:
    """Counts per (op, dtype), then every failing case."""
    records = part.get("records", [])
    if not records:
        return []
    groups: "OrderedDict[tuple, List[Dict]]" = OrderedDict()
    for r in records:
        groups.setdefault((r.get("op"), r.get("dtype")), []).append(r)
    rows = []
    for (op, dtype), rs in groups.items():
        ratios = [r["max_rel_err"] / r["tol"] for r in rs
                  if isinstance(r.get("max_rel_err"), (int, float))
                  and isinstance(r.get("tol"), (int, float)) and r["tol"]]
        rows.append({"op": op, "dtype": dtype, "checks": len(rs),
                     "failed": sum(1 for r in rs if not r.get("ok")),
                     "worst err / tol": max(ratios) if ratios else None,
                     "largest M": max((r.get("M") or 0) for r in rs)})
    lines = [f"{len(records)} checks, {sum(1 for r in records if not r.get('ok'))} failed.", ""]
    lines += _table(rows, ("op", "dtype", "checks", "failed", "worst err / tol", "largest M"))
    bad = [r for r in records if not r.get("ok")]
    if bad:
        lines += ["", "Failing cases:", ""] + _table(bad, KERNEL_COLUMNS)
    return lines


def graphs_section(part: Dict) -> List[str]:
    """One row per precision: replays, rank patterns, the largest differences against the
    eager run and, for fp16, the loss scales and overflows."""
    records = part.get("records", [])
    if not records:
        return []
    ran = [r for r in records if r.get("status") != "skipped"]
    lines = [f"{len(ran)} of {len(records)} precisions ran, "
             f"{sum(1 for r in ran if not r.get('ok'))} disagreed with the eager run "
             "(differences: max |graphed - eager| of the trainable parameters and of the "
             "per-step losses; tol: relative to max(1, the eager magnitude); steps neither "
             "replayed nor captured ran eagerly: 2 warm-up steps expected, the other tracking "
             "state's kernels preloaded).", ""]
    lines += _table(records, GRAPHS_COLUMNS)
    fallback = part.get("fallback")
    if fallback:
        numbers = "" if fallback.get("status") == "skipped" else (
            f"; {fallback.get('replays')} replays, differences: parameters "
            f"{_cell(fallback.get('max_param_diff'))}, losses "
            f"{_cell(fallback.get('max_loss_diff'))}")
        lines += ["", "A model whose forward cannot be captured (dropout, a host read in its "
                  f"head; fp32) against its eager run: **{fallback.get('status')}** "
                  f"({fallback.get('note') or 'no note'}{numbers})."]
    return lines


def layer_section(part: Dict) -> List[str]:
    """The layer table, launches and host time per call, host time per optimizer step, the
    penalty's time per call, then the adapter's pass over dy against cuBLAS ``dy W``."""
    lines = []
    rows = layer_rows(part.get("records", []))
    if rows:
        lines += [markdown_table(rows, LAYER_COLUMNS), ""]
        if alone_lines(rows):
            lines += alone_lines(rows) + [""]
    host = host_rows(part.get("host_records", []))
    if host:
        lines += ["Triton launches and host time per fwd+bwd call "
                  f"({host[0].get('dtype')}; {host[0].get('note') or host[-1].get('note')}):",
                  "", markdown_table(host, HOST_COLUMNS)]
    optimizer = part.get("optimizer_host_records", [])
    if optimizer:
        lines += ["", f"Host time per optimizer step on {optimizer[0].get('model')} "
                  f"({optimizer[0].get('tensors')} tensors; {optimizer[0].get('note')}):", "",
                  markdown_table(optimizer, OPTIMIZER_COLUMNS)]
    penalty = part.get("penalty_time_records", [])
    if penalty:
        lines += ["", f"The orthogonal penalty's forward and backward on {penalty[0].get('model')} "
                  f"({penalty[-1].get('note')}):", "", markdown_table(penalty, PENALTY_COLUMNS)]
        lines += [f"- {r['method']} failed: {r['note']}" for r in penalty
                  if r.get("status") == "failed"]
    dy = part.get("dy_pass_records", [])
    if dy:
        lines += ["", "The adapter's pass over dy against the frozen layer's cuBLAS `dy W` "
                  f"({dy[0].get('timing')}; ours = the layer's backward less the GEMM, aten = "
                  "the same pass as cuBLAS skinny GEMMs and aten ops, ours_4x = our kernels "
                  "with up to four programs per SM instead of one"
                  + (f"; {dy[0]['note']}" if dy[0].get("note") else "") + "):", "",
                  markdown_table(dy, DY_PASS_COLUMNS)]
        scored = [r for r in dy if r.get("score_ms") is not None]  # since 2026-12-05
        if scored:
            lines += ["", "The exact score as a tracked backward pays it (the backward with the "
                      "score less the one without) and the torch path's score in cuBLAS chunks, "
                      "against cuBLAS `dy^T x`, the dense weight gradient's GEMM:", "",
                      markdown_table(scored, SCORE_PASS_COLUMNS)]
    return lines


def model_section(part: Dict) -> List[str]:
    """Measured rows (for ours, ``tracked_median_ms``: the median of the steps that track the
    importance score without an allocation round, ``round_median_ms``: of those with one,
    ``untracked_median_ms``: of those that do not track), then every row without a
    measurement and why."""
    rows = [dict(r, tracked_median_ms=r.get("alloc_median_ms"),
                 untracked_median_ms=r.get("final_median_ms"))
            if r["method"].startswith("increlora-") else r
            for r in model_rows(part.get("records", []))]
    missing = [dict(r, model=r["shape"]) for r in part.get("records", [])
               if r.get("status") != "ok"]
    lines = [markdown_table(rows, MODEL_CHECK_COLUMNS)] if rows else []
    if alone_lines(rows):
        lines += [""] + alone_lines(rows)
    if missing:
        lines += ["", "Not measured:", ""] + _table(missing, UNMEASURED_COLUMNS)
    return lines


def finetune_section(part: Dict) -> List[str]:
    """One row per run of the main job (a report of one run: its ``metrics``)."""
    runs = part.get("runs") or ([{"name": "default", "status": part.get("status"),
                                  "metrics": part["metrics"]}] if part.get("metrics") else [])
    if not runs:
        return []
    rows = [dict(r.get("metrics") or {}, run=r["name"], args=" ".join(r.get("args", [])),
                 status=r.get("status"), note=_run_note(r),
                 first_steps_s=_first_steps(r.get("metrics") or {}),
                 x_lora_tokens_per_s=r.get("x_lora_tokens_per_s")) for r in runs]
    lines = _table(rows, FINETUNE_COLUMNS)
    lines += ["", "first_steps_s: the seconds of the run's steps before its first log point, "
              "each waited for on the device (the one-time costs its average pays: kernel "
              "loads, graph probe and captures); precompile_seconds: the kernel builds before "
              "the first step (`precompile_kernels`, in parallel; counted in train_seconds)."]
    if part.get("min_accuracy") is not None:
        lines += ["", f"Sanity floor on the dev accuracy: {part['min_accuracy']}."]
    return lines


def _first_steps(metrics: Dict) -> Optional[str]:
    """The first steps' seconds, in order (records from before 2026-12-05 have none)."""
    seconds = metrics.get("first_step_seconds")
    return None if not seconds else " ".join(f"{t:.2f}" for t in seconds)


def _run_note(run: Dict) -> Optional[str]:
    """A main-job run's note, with why a graphed run stepped eagerly when it did and the
    warnings the run raised."""
    metrics = run.get("metrics") or {}
    fallback = metrics.get("cuda_graphs_fallback")
    notes = [n for n in (run.get("note"), fallback and
                         f"stepped eagerly: the model could not be captured ({fallback})") if n]
    notes += [f"warned: {w}" for w in metrics.get("warnings") or []]
    return "; ".join(notes) or None


def _verdict_table(verdicts) -> List[str]:
    return (["| target | verdict | measured |", "|---|---|---|"]
            + [f"| {v.target} | **{v.status}** | {v.detail} |" for v in verdicts])


def targets_section(report: Dict) -> List[str]:
    return _verdict_table(issue13_verdicts(gpu_check_records(report)))


def issue27_section(report: Dict) -> List[str]:
    """Issue 27's targets and what the run says ``--cuda-graphs auto`` should do."""
    decision, why = cuda_graphs_auto(report)
    return _verdict_table(issue27_verdicts(report)) + [
        "", f"`--cuda-graphs auto` on CUDA: {why}", "",
        f"The adapter's backward design (`kernels/linear.py`): {gemm_backward_rows(report)[1]}"]


SECTIONS = {"kernels": kernel_section, "graphs": graphs_section, "layer": layer_section,
            "model": model_section, "qlora": model_section, "finetune": finetune_section}


def part_sections(report: Dict, level: str = "##", tables: Sequence[str] = tuple(SECTIONS)
                  ) -> List[str]:
    """The status table, each part's errors and (for the parts in ``tables``) its tables, and
    the issue-13 targets."""
    parts = report.get("parts", {})
    lines = ["| part | status | seconds | error |", "|---|---|---|---|"]
    for name, part in parts.items():
        lines.append(f"| {PART_TITLES.get(name, name)} | **{part.get('status')}** | "
                     f"{part.get('seconds')} | {_cell(part.get('error'))} |")
    lines.append("")
    for name, part in parts.items():
        lines += [f"{level} {PART_TITLES.get(name, name)}: {part.get('status')}", ""]
        if name in tables:
            body = SECTIONS.get(name, lambda p: [])(part)
            lines += (body or ["Nothing measured."]) + [""]
        else:
            lines += ["Its table is in the run section of the same device and date.", ""]
        if part.get("error"):
            lines += [f"Error: {part['error']}", ""]
        if part.get("status") == "skipped":
            lines += [f"Skipped: {part.get('note')}", ""]
        if part.get("traceback"):
            lines += ["```text", part["traceback"].rstrip(), "```", ""]
    lines += [f"{level} Issue 13 targets (bf16, 16,384 tokens, 768x3072, r_max 16; model steps "
              "of every preset)", ""] + targets_section(report) + [""]
    lines += [f"{level} Issue 27 targets (bf16; one run's ratios)", ""] + issue27_section(report) \
        + [""]
    return lines


def gpu_check_markdown(report: Dict) -> str:
    """The whole ``gpu_check.md``."""
    env = report.get("environment", {})
    status = report.get("status", "running")
    skipped = report.get("skipped_parts")  # (reports before 2026-12-08 have none)
    verdict = {"ok": "PASSED", "failed": "FAILED (" + ", ".join(report.get("failed_parts", []))
               + ")"}.get(status, "INCOMPLETE (still running, or stopped from outside)") \
        + (f" (skipped: {', '.join(skipped)})" if skipped else "")
    out = [f"# GPU check: {env.get('device')}: {verdict}", ""] + _environment(report) + [""]
    return "\n".join(out + part_sections(report)) + "\n"


def results_section(report: Dict) -> List[str]:
    """A gpu-check in ``bench/RESULTS.md``: environment, part status, kernel, graphed-step and
    fine-tune tables, targets (its layer and model records form a run section of their own)."""
    env = report.get("environment", {})
    out = [f"## GPU check: {env.get('device')} ({report.get('date')}): "
           f"{report.get('status')}", ""] + _environment(report) + [""]
    return out + part_sections(report, "###", tables=("kernels", "graphs", "finetune"))
