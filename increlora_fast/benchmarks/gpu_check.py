"""`increlora-fast gpu-check`: the one-shot check of the GPU path, in four parts.

- ``kernels``: the kernel correctness suite (`increlora_fast.kernels.checks.run_kernel_checks`)
  against float64 references;
- ``layer``: one adapted linear, fwd+bwd, bf16: the frozen layer (floor), peft LoRA at
  r = r_max, ours on the default Triton path and on the fused GEMM, each with and without
  score tracking (`layer.run_layer_level`);
- ``model``: training steps of a DeBERTa-v3-base-shaped and a Llama-shaped random-weight model,
  ours against peft LoRA and AdaLoRA (`model.run_model_level`);
- ``finetune``: the default `increlora-fast finetune` on the device, with its dev accuracy.

Each part records its error instead of stopping the check; the JSON and the Markdown report are
rewritten after every part, so a check stopped from outside keeps what it finished. The dry run
is the same code at toy sizes (on CPU the Triton methods run under the interpreter).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .plans import LayerPlan, ModelPlan

JSON_FILE = "gpu_check.json"
MD_FILE = "gpu_check.md"
FINETUNE_DIR = "finetune"
KIND = "gpu_check"
PARTS = ("kernels", "layer", "model", "finetune")
LAYER_METHODS_CHECKED = ("floor", "peft-lora", "increlora-triton", "increlora-triton+score",
                         "increlora-triton-fused", "increlora-triton-fused+score")
MODEL_METHODS_CHECKED = ("increlora-triton", "peft-lora", "peft-adalora")
# The default fine-tune reaches 0.81-0.82 on CPU (README); a broken GPU path lands near 0.5.
MIN_FULL_ACCURACY = 0.75


@dataclass
class CheckPlan:
    """What each part runs: the layer grid, one model plan per preset, the fine-tune's
    overrides of the default `RunSettings`, and the accuracy the fine-tune must reach."""

    kernel_quick: bool
    layer: LayerPlan
    models: List[ModelPlan]
    finetune: Dict[str, object] = field(default_factory=dict)
    min_accuracy: Optional[float] = None


def full_plan() -> CheckPlan:
    """The GPU sizes (about 7 minutes in all on one recent GPU, kernel compilation included)."""
    layer = LayerPlan(shapes=[(768, 3072), (4096, 11008)], tokens=[2048, 16384], r_max=[16],
                      dtypes=["bf16"], phases=["fwd+bwd"], warmup=3, repeats=10)
    common = dict(steps=20, warmup_steps=4, dtypes=["bf16"], r_max=16, init_r=2, target_rank=8)
    models = [ModelPlan(models=["deberta-v3-base"], batch_size=16, seq_len=256, **common),
              ModelPlan(models=["llama-7b-2l"], batch_size=4, seq_len=1024, **common)]
    return CheckPlan(kernel_quick=False, layer=layer, models=models, finetune={},
                     min_accuracy=MIN_FULL_ACCURACY)


def dry_run_plan() -> CheckPlan:
    """Toy sizes of every part, for CPU (Triton interpreter) in a few minutes."""
    layer = LayerPlan(shapes=[(24, 40)], tokens=[16, 32], r_max=[8], dtypes=["bf16"],
                      phases=["fwd+bwd"], warmup=1, repeats=2, interpreter_point=(16, 24, 16))
    common = dict(batch_size=2, seq_len=8, steps=3, warmup_steps=1, dtypes=["bf16"], r_max=8,
                  init_r=1, target_rank=4)
    models = [ModelPlan(models=["tiny-deberta"], **common),
              ModelPlan(models=["tiny-llama"], **common)]
    finetune = dict(max_steps=4, max_train_samples=64, max_eval_samples=64, batch_size=8,
                    eval_batch_size=32, max_seq_len=32)
    return CheckPlan(kernel_quick=True, layer=layer, models=models, finetune=finetune)


def environment_info(device: torch.device, dry_run: bool) -> Dict[str, object]:
    """Device, versions and the run's identity, shared by every record of the check."""
    from .records import environment

    env = environment(device, "gpu-check-dry-run" if dry_run else "gpu-check")
    env.update(python=platform.python_version(), cuda=torch.version.cuda,
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
    from ..kernels.checks import run_kernel_checks

    records = [dict(r) for r in run_kernel_checks(device, quick=plan.kernel_quick)]
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
                     what: str, log: Callable) -> Tuple[List[dict], List[str]]:
    """``measure(methods)``; when it raises, each method alone, so that one failing method
    loses only its own rows. Returns (records, one error line per failure)."""
    try:
        return measure(methods), []
    except Exception as err:  # a variant nobody has run on this GPU may fail in any way
        log(traceback.format_exc())
        log(f"{what}: {type(err).__name__}: {err}; measuring each method alone")
    records: List[dict] = []
    errors: List[str] = []
    for method in methods:
        try:
            records += measure([method])
        except Exception as err:
            errors.append(f"{what} {method}: {type(err).__name__}: {err}")
            log(traceback.format_exc())
    return records, errors


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_layer(device: torch.device, plan: CheckPlan, env: Dict, log: Callable) -> Dict:
    """The layer benchmark; failed when a method could not be measured. On CUDA each
    (shape, tokens) point is measured on its own, so a failure loses only that point's rows."""
    from .layer import run_layer_level

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
        records += found
        errors += failed
        _release(device)
    done = {r["method"] for r in records if r["status"] == "ok"}
    missing = [m for m in LAYER_METHODS_CHECKED if m not in done]
    if missing:
        notes = sorted({r["note"] for r in records if r["method"] in missing and r["note"]})
        errors.append(f"not measured: {missing} ({'; '.join(notes) or 'see the errors'})")
    return {"records": records, "error": "; ".join(errors) or None}


def check_model(device: torch.device, plan: CheckPlan, env: Dict, log: Callable) -> Dict:
    """Training steps of every model preset; failed when a method could not be measured."""
    from .model import run_model_level

    records: List[dict] = []
    errors: List[str] = []
    for model_plan in plan.models:
        found, failed = measure_isolated(
            lambda methods: run_model_level(model_plan, methods, device, env, log,
                                            interpreter=True),
            list(MODEL_METHODS_CHECKED), f"model {model_plan.models[0]}", log)
        records += found
        errors += failed
        _release(device)
    errors += [f"{r['shape']} {r['method']}: {r['note']}" for r in records
               if r["status"] != "ok"]
    return {"records": records, "error": "; ".join(errors) or None}


def check_finetune(device: torch.device, plan: CheckPlan, env: Dict, log: Callable,
                   out_dir: Path) -> Dict:
    """The default fine-tune on ``device`` (precision auto) into ``out_dir/finetune``."""
    from ..training.finetune import run_finetune
    from ..training.settings import RunSettings

    settings = dataclasses.replace(RunSettings(), device=str(device), precision="auto",
                                   **plan.finetune)
    metrics = run_finetune(settings, str(out_dir / FINETUNE_DIR), save_steps=0, progress=False,
                           echo=log)
    keep = ("eval_accuracy", "eval_macro_f1", "eval_loss", "eval_examples", "method", "task",
            "model", "steps", "train_seconds", "eval_seconds", "total_seconds", "train_tokens",
            "tokens_per_second", "peak_device_memory_mb", "peak_device_memory_kind", "device",
            "precision", "total_rank", "trainable_params_active", "trainable_params_padded")
    result: Dict[str, object] = {"metrics": {k: metrics.get(k) for k in keep},
                                 "min_accuracy": plan.min_accuracy}
    log(f"finetune: dev accuracy {metrics['eval_accuracy']:.4f} after {metrics['steps']} steps "
        f"on {metrics['device']} ({metrics['precision']}), {metrics['tokens_per_second']} "
        "tokens/s")
    if plan.min_accuracy is not None and metrics["eval_accuracy"] < plan.min_accuracy:
        result["error"] = (f"dev accuracy {metrics['eval_accuracy']:.4f} is below "
                           f"{plan.min_accuracy} (the default run reaches 0.81-0.82 on CPU)")
    return result


# ---------------------------------------------------------------------------------- the runner
def _run_part(name: str, fn: Callable[[], Dict], log: Callable) -> Dict:
    t0 = time.perf_counter()
    log(f"[gpu-check] {name} ...")
    try:
        result = fn()
        status = "failed" if result.get("error") else "ok"
    except Exception as err:  # every failure is recorded, the next part still runs
        tb = traceback.format_exc()
        log(tb)
        result = {"error": f"{type(err).__name__}: {err}", "traceback": tb[-4000:]}
        status = "failed"
    result.setdefault("error", None)
    result.update(status=status, seconds=round(time.perf_counter() - t0, 1))
    log(f"[gpu-check] {name}: {status} in {result['seconds']} s"
        + (f" ({result['error']})" if result["error"] else ""))
    return result


def write_report(report: Dict, out_dir: Path) -> None:
    """Write ``gpu_check.json`` and ``gpu_check.md`` (each replaced whole, never half-written)."""
    from .gpu_check_report import gpu_check_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in ((JSON_FILE, json.dumps(report, indent=1, default=str)),
                       (MD_FILE, gpu_check_markdown(report))):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


def run_gpu_check(out_dir: Path, device: torch.device, dry_run: bool,
                  parts: Tuple[str, ...] = PARTS, log: Callable[[str], None] = print,
                  notes: Optional[List[str]] = None) -> Dict:
    """Run ``parts`` on ``device`` and write the reports into ``out_dir``; returns the report
    (``status`` "ok" only when every part that ran passed)."""
    plan = dry_run_plan() if dry_run else full_plan()
    started = time.perf_counter()
    env = environment_info(device, dry_run)
    report: Dict[str, object] = {
        "kind": KIND, "version": 1, "dry_run": dry_run, "environment": env,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parts": {}, "status": "running", "notes": list(notes or [])}
    runners = {
        "kernels": lambda: check_kernels(device, plan, env, log),
        "layer": lambda: check_layer(device, plan, env, log),
        "model": lambda: check_model(device, plan, env, log),
        "finetune": lambda: check_finetune(device, plan, env, log, out_dir),
    }
    for name in parts:
        report["parts"][name] = _run_part(name, runners[name], log)
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_report(report, out_dir)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = [n for n, p in report["parts"].items() if p["status"] != "ok"]
    report["status"] = "failed" if failed else "ok"
    report["failed_parts"] = failed
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(report, out_dir)
    return report



PACKED_ASSETS = ("all-MiniLM-L6-v2", "rotten_tomatoes")


def pack_assets(dest: Path, log: Callable[[str], None] = print) -> Path:
    """Write what the fine-tune part needs into ``dest``, laid out as the asset cache for
    ``--assets``: the packaged model with its weights as float16 (about 45 MB; the run loads
    them as float32) and the Rotten Tomatoes file, read from the local cache."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ..data.assets import ASSETS, locate_asset

    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"--pack-assets {dest}: the folder is not empty; give a new one")
    for name in PACKED_ASSETS:
        asset = ASSETS[name]
        src = locate_asset(name)
        target = dest / "unpacked" / f"{asset.module}-{asset.version}" / asset.member.rstrip("/")
        if not src.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        else:
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("*.safetensors"))
            for weights in src.glob("*.safetensors"):
                tensors = load_file(str(weights))
                save_file({k: v.half() if v.is_floating_point() else v
                           for k, v in tensors.items()}, str(target / weights.name),
                          metadata={"format": "pt"})
        log(f"{name}: {target}")
    return dest
