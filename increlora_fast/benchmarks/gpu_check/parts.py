"""`increlora-fast gpu-check`: the one-shot check of the GPU path, in six parts, the most
important first (a check stopped from outside keeps what it finished):

- ``kernels``: the kernel correctness suite (`increlora_fast.kernels.checks.run_kernel_checks`)
  against float64 references, the gate for every number below;
- ``graphs``: a tiny random BERT classifier trained the same steps eagerly and with the step
  replayed from CUDA graphs, in fp32, bf16 and fp16 (GradScaler, overflowing steps included):
  whether the graphed run agrees with the eager one (`graphs.graph_agreement`; seconds);
- ``finetune``: the main job, `increlora-fast finetune` on the device, run four times
  (`FINETUNE_RUNS`): ``--cuda-graphs off`` with graphs-on's padding (``--pad-to max_length``,
  the run the graphed one must equal; first, so that it pays the kernel builds), ``--cuda-graphs
  on``, ``--cuda-graphs off`` and ``--method lora``, each with its dev accuracy and tokens/s,
  and ours/lora in tokens/s;
- ``model``: training steps of random-weight models, MiniLM-L6 at the main job's shape first,
  then DeBERTa-v3-base and a 2-layer Llama-7B: the frozen floor, peft LoRA (eager and under
  torch.compile), peft AdaLoRA and ours (eager Triton, and the graphed step), with medians of
  the steps that track the importance score and of those that do not
  (`model_level.run_model_level`);
- ``qlora``: the same steps on a 4-bit NF4 base (bitsandbytes), ours against peft LoRA;
- ``layer``: one adapted linear, fwd+bwd, bf16: the frozen layer (floor), peft LoRA at
  r = r_max, ours on the default Triton path and on the fused GEMM, each with and without
  score tracking (`layer_level.run_layer_level`), and per method the Triton launches and the
  host time of one call (`host_overhead`).

Each part records its error instead of stopping the check; the JSON and the Markdown report are
rewritten after every part, and within the two long parts after each preset (``model``) and each
run (``finetune``), so that a check cut short keeps what they finished. A method that cannot
run here is recorded as skipped with the reason, never with a number. The dry run is the same
code at toy sizes (on CPU the Triton methods run under the interpreter).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ...files import atomic_write_bytes
from ..speed.plans import LayerPlan, ModelPlan
from .graphs import check_graphs
from .plan import CheckPlan, dry_run_plan, full_plan

JSON_FILE = "gpu_check.json"
MD_FILE = "gpu_check.md"
FINETUNE_DIR = "finetune"
KIND = "gpu_check"
PARTS = ("kernels", "graphs", "finetune", "model", "qlora", "layer")
LAYER_METHODS_CHECKED = ("floor", "peft-lora", "increlora-triton", "increlora-triton+score",
                         "increlora-triton-fused", "increlora-triton-fused+score")
MODEL_METHODS_CHECKED = ("floor", "peft-lora", "peft-lora-compiled", "peft-adalora",
                         "increlora-triton", "increlora-graphs")
# Skipped rows of these (with their reason) do not fail the model part: the graphed step needs
# CUDA and the step runner, torch.compile is measured on CUDA only.
OPTIONAL_MODEL_METHODS = ("peft-lora-compiled", "increlora-graphs")
QLORA_METHODS_CHECKED = ("peft-lora", "increlora-triton")
# (name, extra `increlora-fast finetune` arguments) of the main job's runs, in order; the runs
# in FINETUNE_NEEDS_CUDA are skipped on other devices.
# The runs share this process, so the first one pays what any first run on a machine pays once
# (building the Triton kernels, which Triton then keeps on disk; CUDA's and cuBLAS's setup).
# The first is graphs-off-padded, whose shapes and kernels are graphs-on's: graphs-on, graphs-off
# and lora, the runs whose tokens/s are compared, all run warm (until 2026-12-05 graphs-on ran
# first and paid the builds alone).
FINETUNE_RUNS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    # eager with graphs-on's padding: the run graphs-on must equal (rank pattern, accuracy);
    # graphs-off pads each batch to its longest input, which alone changes the scores
    ("graphs-off-padded", ("--cuda-graphs", "off", "--pad-to", "max_length")),
    ("graphs-on", ("--cuda-graphs", "on")),
    ("graphs-off", ("--cuda-graphs", "off")),
    ("lora", ("--method", "lora")),
)
FINETUNE_NEEDS_CUDA = ("graphs-on",)
# Given a long part's results so far (the model part's records after each preset, the main
# job's runs after each run), so that a check cut short inside the part keeps them.
Progress = Callable[[Dict], None]
def environment_info(device: torch.device, dry_run: bool) -> Dict[str, object]:
    """Device, versions and the run's identity, shared by every record of the check."""
    from ..records import environment, package_version

    env = environment(device, "gpu-check-dry-run" if dry_run else "gpu-check")
    env.update(python=platform.python_version(), cuda=torch.version.cuda,
               bitsandbytes=package_version("bitsandbytes"),
               triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
               command=" ".join(["increlora-fast", "gpu-check"] + sys.argv[2:])
               if len(sys.argv) > 1 and sys.argv[1] == "gpu-check" else "(called in-process)")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   gpu_memory_mb=round(props.total_memory / 2 ** 20),
                   gpu_count=torch.cuda.device_count(),
                   multiprocessors=props.multi_processor_count)
    return env


# ---------------------------------------------------------------------------------- the parts
def kernel_case(record: Dict) -> str:
    """One kernel check record in words: the case and why it failed (if it did)."""
    why = record.get("error") or (f"max_rel_err {record.get('max_rel_err')} > tol "
                                  f"{record.get('tol')}")
    return (f"{record.get('op')} {record.get('dtype')} M={record.get('M')} "
            f"in={record.get('in')} out={record.get('out')} r_max={record.get('r_max')}: {why}")


def check_kernels(device: torch.device, plan: CheckPlan, env: Dict, log: Callable) -> Dict:
    """The kernel suite; failed when any record is not ok."""
    from ...kernels.checks import run_kernel_checks

    records = [dict(r) for r in run_kernel_checks(device, quick=plan.kernel_quick,
                                                  log=log)]
    bad = [r for r in records if not r.get("ok")]
    log(f"kernels: {len(records)} checks, {len(bad)} failed")
    if not records:
        raise RuntimeError("run_kernel_checks returned no records")
    out = {"records": records, "checks": len(records), "failed_checks": len(bad)}
    if bad:
        out["error"] = (f"{len(bad)} of {len(records)} kernel checks failed, first: "
                        f"{kernel_case(bad[0])}")
    return out


def measure_isolated(measure: Callable[[List[str]], List[dict]], methods: List[str],
                     what: str, log: Callable) -> Tuple[List[dict], Dict[str, str]]:
    """``measure(methods)``; when it raises, each method alone, so that one failing method
    loses only its own rows; those records carry ``measured_alone`` (their times were not
    interleaved with the others'). Returns (records, {failed method: its error line})."""
    try:
        return measure(methods), {}
    except Exception as err:  # a variant nobody has run on this GPU may fail in any way
        log(traceback.format_exc())
        log(f"{what}: {type(err).__name__}: {err}; measuring each method alone")
    records: List[dict] = []
    errors: Dict[str, str] = {}
    for method in methods:
        try:
            records += [dict(r, measured_alone=True) for r in measure([method])]
        except Exception as err:
            errors[method] = f"{what} {method}: {type(err).__name__}: {err}"
            log(traceback.format_exc())
    return records, errors


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _host_records(device: torch.device, plan: CheckPlan, env: Dict) -> List[dict]:
    """Triton launches and host time per fwd+bwd call of each layer method: on CUDA issued on
    the device (`host_overhead.measure_on_device`), elsewhere with the launches stubbed in a
    process under the Triton interpreter (`host_overhead.measure`)."""
    from ..speed.host_overhead import measure, measure_on_device

    if device.type == "cuda":
        return measure_on_device(plan.host, LAYER_METHODS_CHECKED, device, env)
    return measure(plan.host, timeout_s=600)


def check_layer(device: torch.device, plan: CheckPlan, env: Dict, log: Callable) -> Dict:
    """The layer benchmark, the host time per call, the optimizer's host time per step and the
    penalty's time per call; failed when a method could not be measured. On CUDA each (shape, tokens) point is measured on its own, so a failure loses
    only that point's rows."""
    from ..speed.layer_level import run_layer_level

    lp = plan.layer
    points = ([dataclasses.replace(lp, shapes=[shape], tokens=[tokens])
               for shape in lp.shapes for tokens in lp.tokens]
              if device.type == "cuda" else [lp])
    records: List[dict] = []
    errors: List[str] = []
    for point in points:
        found, failed = measure_isolated(
            lambda methods: run_layer_level(point, methods, device, env, log),
            list(LAYER_METHODS_CHECKED),
            f"layer {point.shapes[0][0]}x{point.shapes[0][1]} tokens={point.tokens[0]}"
            if len(points) > 1 else "layer", log)
        records += found + [_unmeasured_layer(env, point, method, line)
                            for method, line in failed.items()]
        errors += failed.values()
        _release(device)
    done = {r["method"] for r in records if r["status"] == "ok"}
    missing = [m for m in LAYER_METHODS_CHECKED if m not in done]
    if missing:
        notes = sorted({r["note"] for r in records if r["method"] in missing and r["note"]})
        errors.append(f"not measured: {missing} ({'; '.join(notes) or 'see the errors'})")
    host: List[dict] = []
    try:
        host = _host_records(device, plan, env)
    except Exception as err:  # the layer rows above stay
        log(traceback.format_exc())
        errors.append(f"host time per call: {type(err).__name__}: {err}")
    for r in host:
        log(f"host {r['method']:30s} {r['median_us']:10.1f} us per call  "
            f"{r['launches_per_call']} launches")
    dy_pass, failed = _dy_pass_records(device, plan, env, log)
    from ..speed.optimizer_host import measure_optimizer_host
    from ..speed.penalty_time import measure_penalty_time

    optimizer = _on_first_model("optimizer host time", measure_optimizer_host,
                                plan.optimizer_repeats, device, plan, env, errors, log)
    for r in optimizer:
        log(f"optimizer {r['method']:13s} {r['median_us']:10.1f} us per step  "
            f"{r['launches_per_step']} launches")
    penalty = _on_first_model("penalty time", measure_penalty_time, plan.penalty_repeats,
                              device, plan, env, errors, log)
    for r in penalty:
        if r["status"] == "failed":  # (the other way is still timed)
            log(f"penalty {r['method']:8s} failed: {r['note']}")
            errors.append(f"penalty time {r['method']}: {r['note'].split('; ')[0]}")
            continue
        log(f"penalty {r['method']:8s} {r['median_us']:10.1f} us per fwd+bwd "
            f"({r['host_median_us']:.1f} us host)  {r['launches_per_call']} launches")
    return {"records": records, "host_records": host, "dy_pass_records": dy_pass,
            "optimizer_host_records": optimizer, "penalty_time_records": penalty,
            "error": "; ".join(errors + failed) or None}


def _on_first_model(what: str, measure: Callable, repeats: int, device: torch.device,
                    plan: CheckPlan, env: Dict, errors: List[str], log: Callable
                    ) -> List[dict]:
    """``measure(preset, model plan, device, env, repeats)`` on the first model plan's preset
    (`speed.optimizer_host`: the optimizer's host time per step; `speed.penalty_time`: the
    penalty's time per call): its records, or none and an error naming ``what`` if it
    failed (the part's other rows stay)."""
    model_plan = plan.models[0]
    try:
        return measure(model_plan.models[0], model_plan, device, env, repeats)
    except Exception as err:
        log(traceback.format_exc())
        errors.append(f"{what}: {type(err).__name__}: {err}")
        return []
    finally:
        _release(device)


def _dy_pass_records(device: torch.device, plan: CheckPlan, env: Dict, log: Callable
                     ) -> Tuple[List[dict], List[str]]:
    """The adapter's pass over dy against cuBLAS ``dy W``, and the exact score against cuBLAS
    ``dy^T x``, at each point of ``plan.dy_pass`` (`speed.dy_pass`); a point that fails loses
    only its record."""
    from ..speed.dy_pass import measure_dy_pass

    records: List[dict] = []
    errors: List[str] = []
    for k, n, tokens in plan.dy_pass:
        try:
            r = measure_dy_pass(k, n, tokens, plan.layer.r_max[0], plan.layer.dtypes[0],
                                device, env)
        except Exception as err:  # the other points and parts still go
            log(traceback.format_exc())
            errors.append(f"dy pass {k}x{n} tokens={tokens}: {type(err).__name__}: {err}")
            continue
        records.append(r)
        log(f"dy pass {r['shape']:>10s} tokens={tokens:<6d} r={r['r_max']:<3d} ours "
            f"{_num(r['ours_ms'], '8.3f')} ms  cuBLAS dy W {_num(r['cublas_ms'], '8.3f')} ms  "
            f"{_num(r['x_cublas'], '.2f')}x  score {_num(r['score_ms'], '8.3f')} ms  "
            f"cuBLAS dy^T x {_num(r['gemm_dw_ms'], '8.3f')} ms  "
            f"{_num(r['x_gemm_score'], '.2f')}x")
    return records, errors


def _num(value: Optional[float], spec: str) -> str:
    """``value`` formatted by ``spec``; "n/a" for None (a ratio over a time of 0), so that a
    log line never ends a part."""
    return "n/a" if value is None else format(value, spec)


def _unmeasured_layer(env: Dict, plan: LayerPlan, method: str, note: str) -> dict:
    """The ``failed`` record of a layer method that raised at ``plan``'s first point, with
    why (its rows are lost; this one names it in the report)."""
    (in_f, out_f), dtype = plan.shapes[0], plan.dtypes[0]
    return dict(env, level="layer", method=method, status="failed", note=note,
                shape=f"{in_f}x{out_f}", tokens=plan.tokens[0], r_max=plan.r_max[0],
                dtype=dtype, phase=plan.phases[0], median_ms=None, mean_ms=None,
                peak_mem_mb=None, interpreter_point=False)


def _unmeasured(env: Dict, plan: ModelPlan, method: str, status: str, note: str) -> dict:
    """The record of a model method that has no measurement, with why."""
    dtype = plan.dtypes[0]
    return dict(env, level="model", method=method, status=status, note=note,
                shape=f"{plan.models[0]}{' nf4' if plan.base_4bit else ''} "
                      f"b{plan.batch_size}x{plan.seq_len}",
                dtype=dtype if dtype == "fp32" else f"{dtype}-autocast", r_max=plan.r_max,
                median_ms=None, mean_ms=None, peak_mem_mb=None)


def _model_records(plans: Sequence[ModelPlan], methods: Sequence[str], device: torch.device,
                   env: Dict, log: Callable, progress: Optional[Progress] = None
                   ) -> Tuple[List[dict], List[str]]:
    """Every method on every plan, each plan measured on its own; a method that raised gets a
    ``failed`` record with its error; ``progress`` is given the records so far after each
    plan. Returns (records, one error line per failure and per skipped required method)."""
    from ..speed.model_level import run_model_level

    records: List[dict] = []
    errors: List[str] = []
    for model_plan in plans:
        found, failed = measure_isolated(
            lambda todo: run_model_level(model_plan, todo, device, env, log, interpreter=True),
            list(methods), f"model {model_plan.models[0]}", log)
        records += found + [_unmeasured(env, model_plan, method, "failed", line)
                            for method, line in failed.items()]
        errors += failed.values()
        _release(device)
        if progress is not None:
            progress({"records": list(records)})
    errors += [f"{r['shape']} {r['method']}: {r['note']}" for r in records
               if r["status"] == "skipped" and r["method"] not in OPTIONAL_MODEL_METHODS]
    return records, errors


def check_model(device: torch.device, plan: CheckPlan, env: Dict, log: Callable,
                progress: Optional[Progress] = None) -> Dict:
    """Training steps of every model preset; failed when a method other than the optional
    ones could not be measured (every skip is recorded with its reason). ``progress`` is given
    the records so far after each preset."""
    records, errors = _model_records(plan.models, MODEL_METHODS_CHECKED, device, env, log,
                                     progress)
    return {"records": records, "error": "; ".join(errors) or None}


def check_qlora(device: torch.device, plan: CheckPlan, env: Dict, log: Callable) -> Dict:
    """Ours against peft LoRA on a 4-bit NF4 base; when bitsandbytes is not importable, one
    skipped record per method saying so (the part is then skipped, which does not fail the
    check: it is an optional extra)."""
    from ..speed.quantized_base import bnb_skip_note

    note = bnb_skip_note()
    if note:
        log(f"qlora: {note}")
        return {"records": [_unmeasured(env, plan.qlora, m, "skipped", note)
                            for m in QLORA_METHODS_CHECKED], "error": None}
    records, errors = _model_records([plan.qlora], QLORA_METHODS_CHECKED, device, env, log)
    return {"records": records, "error": "; ".join(errors) or None}


def finetune_options_missing(extra: Sequence[str]) -> List[str]:
    """The options among ``extra`` that this version's `increlora-fast finetune` does not
    accept."""
    from ...cli.finetune import add_arguments

    parser = argparse.ArgumentParser(prog="increlora-fast finetune")
    add_arguments(parser)
    unknown = parser.parse_known_args(list(extra))[1]
    return [a for a in unknown if a.startswith("--")]


def _finetune_once(device: torch.device, plan: CheckPlan, extra: Sequence[str],
                   out_dir: Path) -> Dict:
    """`increlora-fast finetune` in this process with ``extra``; its metrics.json, with
    ``warnings``: the warnings the run raised, each once, as "Category: message" (its stderr
    is not shown, and some failures, such as `precompile_kernels`' builds, are only warned)."""
    from ...cli.main import main as cli_main

    argv = ["finetune", "--output-dir", str(out_dir), "--device", str(device),
            "--save-steps", "0", "--no-progress", *plan.finetune, *extra]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), warnings.catch_warnings(record=True) as caught:
        try:
            code = cli_main(argv)
        except SystemExit as exit_:  # argparse refusing a value: this run fails, not the check
            code = exit_.code
    if code != 0:
        tail = stderr.getvalue().strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"`increlora-fast {' '.join(argv)}` exited {code}: {tail[0]}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    metrics["warnings"] = list(dict.fromkeys(f"{w.category.__name__}: {w.message}"
                                             for w in caught))
    return metrics


FINETUNE_KEEP = ("eval_accuracy", "eval_macro_f1", "eval_loss", "eval_examples", "method", "task",
                 "model", "steps", "train_seconds", "eval_seconds", "total_seconds",
                 "train_tokens", "tokens_per_second", "tokens_per_second_warm",
                 "first_step_seconds", "precompile_seconds",
                 "peak_device_memory_mb",
                 "peak_device_memory_kind", "device", "precision", "total_rank",
                 "trainable_params_active", "trainable_params_padded", "cuda_graphs",
                 "cuda_graphs_fallback", "cuda_graphs_steps", "rank_pattern", "warnings")


def check_finetune(device: torch.device, plan: CheckPlan, env: Dict, log: Callable,
                   out_dir: Path, progress: Optional[Progress] = None) -> Dict:
    """The main job's runs (`FINETUNE_RUNS`) on ``device`` (precision auto), each into
    ``out_dir/finetune/NAME``. A run whose options this version's finetune lacks is recorded
    as skipped (so is a run of `FINETUNE_NEEDS_CUDA` elsewhere); when that leaves no
    IncreLoRA run, the plain default runs instead. Each
    IncreLoRA run gets ``x_lora_tokens_per_s`` (its tokens/s over the LoRA run's) and must
    reach ``plan.min_accuracy``; ``metrics`` is graphs-on's, else the first IncreLoRA run's.
    ``progress`` is given the runs so far after each run."""
    todo: List[Tuple[str, Tuple[str, ...], Optional[str]]] = []
    for name, extra in FINETUNE_RUNS:
        missing = finetune_options_missing(extra)
        skip = (f"skipped: this version's finetune has no {missing[0]}" if missing else
                "skipped: needs CUDA" if name in FINETUNE_NEEDS_CUDA and device.type != "cuda"
                else None)
        todo.append((name, extra, skip))
    if all(skip for name, extra, skip in todo if "lora" not in extra):
        todo.insert(len(todo) - 1, ("default", (), None))
    runs: List[Dict] = []
    errors: List[str] = []
    for name, extra, skip in todo:
        run: Dict[str, object] = {"name": name, "args": list(extra), "status": "skipped",
                                  "note": skip, "metrics": None}
        if skip is None:
            try:
                metrics = _finetune_once(device, plan, extra, out_dir / FINETUNE_DIR / name)
                run.update(status="ok", metrics={k: metrics.get(k) for k in FINETUNE_KEEP})
                log(f"finetune {name}: dev accuracy {metrics['eval_accuracy']:.4f} after "
                    f"{metrics['steps']} steps on {metrics['device']} ({metrics['precision']}), "
                    f"{metrics['tokens_per_second']} tokens/s")
                for warning in metrics.get("warnings") or []:
                    log(f"finetune {name}: warning: {warning}")
            except Exception as err:  # the other runs still go
                log(traceback.format_exc())
                run.update(status="failed", note=f"{type(err).__name__}: {err}")
                errors.append(f"{name}: {run['note']}")
        else:
            log(f"finetune {name}: {skip}")
        runs.append(run)
        if progress is not None:
            progress({"runs": list(runs)})
    lora = next((r["metrics"] for r in runs if r["status"] == "ok"
                 and r["metrics"]["method"] == "lora"), None)
    for run in runs:
        m = run["metrics"]
        if not m or m["method"] != "increlora":
            continue
        if lora and lora.get("tokens_per_second"):
            run["x_lora_tokens_per_s"] = m["tokens_per_second"] / lora["tokens_per_second"]
        if plan.min_accuracy is not None and m["eval_accuracy"] < plan.min_accuracy:
            errors.append(f"{run['name']}: dev accuracy {m['eval_accuracy']:.4f} is below "
                          f"{plan.min_accuracy} (the default run reaches 0.81-0.82 on CPU)")
    ours = [r for r in runs if r["metrics"] and r["metrics"]["method"] == "increlora"]
    ours = next((r for r in ours if r["name"] == "graphs-on"), ours[0] if ours else None)
    ours = ours["metrics"] if ours else None
    return {"runs": runs, "metrics": ours, "min_accuracy": plan.min_accuracy,
            "error": "; ".join(errors) or None}


# ---------------------------------------------------------------------------------- the runner
def _skip_reason(result: Dict) -> Optional[str]:
    """Why a part ran nothing: its records' reasons when every record it holds (its record
    lists, the main job's ``runs``, the graphs part's ``fallback``) was skipped; None when
    one of them ran or it holds none."""
    rows = [r for key, value in result.items() if key.endswith("records") or key == "runs"
            for r in value] + ([result["fallback"]] if result.get("fallback") else [])
    if not rows or any(r.get("status") != "skipped" for r in rows):
        return None
    notes = (str(r.get("note") or "no reason recorded") for r in rows)
    return "; ".join(dict.fromkeys(n[len("skipped: "):] if n.startswith("skipped: ") else n
                                   for n in notes))


def _run_part(name: str, fn: Callable[[], Dict], log: Callable, device: torch.device) -> Dict:
    """Run part ``name`` and hand its memory back; its result, failed with the error where it
    raised (CUDA reports a kernel's fault at the next synchronizing call: the release),
    skipped with why in ``note`` where every record it holds was skipped."""
    t0 = time.perf_counter()
    log(f"[gpu-check] {name} ...")
    try:
        result = fn()
        _release(device)
        note = None if result.get("error") else _skip_reason(result)
        status = "failed" if result.get("error") else "skipped" if note else "ok"
        if note:
            result["note"] = note
    except Exception as err:  # every failure is recorded, the next part still runs
        tb = traceback.format_exc()
        log(tb)
        result = {"error": f"{type(err).__name__}: {err}", "traceback": tb[-4000:]}
        status = "failed"
        with contextlib.suppress(Exception):  # the part's own error is the one reported
            _release(device)
    result.setdefault("error", None)
    result.update(status=status, seconds=round(time.perf_counter() - t0, 1))
    log(f"[gpu-check] {name}: {status} in {result['seconds']} s"
        + (f" ({result['error'] or result.get('note')})"
           if result["error"] or status == "skipped" else ""))
    return result


def write_report(report: Dict, out_dir: Path) -> None:
    """Write ``gpu_check.json``, then ``gpu_check.md`` (each replaced whole, never
    half-written). A Markdown that cannot be made stops neither the JSON nor the check: the
    Markdown file then holds the error."""
    from . import markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / JSON_FILE, json.dumps(report, indent=1, default=str).encode())
    try:
        text = markdown.gpu_check_markdown(report)
    except Exception:  # the records are in the JSON; the parts after this one still run
        text = (f"# GPU check: the Markdown report could not be made\n\nEvery record is in "
                f"{JSON_FILE}. The error:\n\n```text\n{traceback.format_exc().rstrip()}\n```\n")
    atomic_write_bytes(out_dir / MD_FILE, text.encode())


def run_gpu_check(out_dir: Path, device: torch.device, dry_run: bool,
                  parts: Tuple[str, ...] = PARTS, log: Callable[[str], None] = print,
                  notes: Optional[List[str]] = None) -> Dict:
    """Run ``parts`` on ``device`` and write the reports into ``out_dir``; returns the report
    (``status`` "ok" only when every part that ran passed; ``failed_parts``, and
    ``skipped_parts``: those that ran nothing)."""
    plan = dry_run_plan() if dry_run else full_plan()
    started = time.perf_counter()
    env = environment_info(device, dry_run)
    report: Dict[str, object] = {
        "kind": KIND, "version": 1, "dry_run": dry_run, "environment": env,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parts": {}, "status": "running", "notes": list(notes or [])}

    def progress(name: str) -> Progress:
        """Write the report with part ``name``'s results so far (status "running")."""
        def write(partial: Dict) -> None:
            report["parts"][name] = dict(partial, status="running", error=None, seconds=None)
            write_report(report, out_dir)
        return write

    runners = {
        "kernels": lambda: check_kernels(device, plan, env, log),
        "graphs": lambda: check_graphs(device, plan, env, log),
        "layer": lambda: check_layer(device, plan, env, log),
        "model": lambda: check_model(device, plan, env, log, progress("model")),
        "qlora": lambda: check_qlora(device, plan, env, log),
        "finetune": lambda: check_finetune(device, plan, env, log, out_dir,
                                           progress("finetune")),
    }
    for name in parts:
        report["parts"][name] = _run_part(name, runners[name], log, device)
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_report(report, out_dir)
    failed = [n for n, p in report["parts"].items() if p["status"] not in ("ok", "skipped")]
    report["status"] = "failed" if failed else "ok"
    report["failed_parts"] = failed
    report["skipped_parts"] = [n for n, p in report["parts"].items() if p["status"] == "skipped"]
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(report, out_dir)
    return report
