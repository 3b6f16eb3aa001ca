"""`--compare`: the methods at the same final rank budget, several seeds, one table.

Every method gets the same learning-rate sweep on the first seed; the best rate on the dev split
is then run for the remaining seeds. Each method keeps its own schedule defaults (see
`settings.resolve`); they are printed beside the numbers.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from .finetune import run_finetune
from .settings import METHODS, RunSettings

COMPARE_METHODS = ("increlora", "lora", "adalora")
DEFAULT_LRS = (1e-3, 2e-3, 4e-3)
RESULTS_JSON = "compare.json"
RESULTS_TABLE = "compare.md"


def _lr_dir(lr: float) -> str:
    return f"lr{lr:g}"


def compare_methods(base: RunSettings, methods: Sequence[str], lrs: Sequence[float], seeds: int,
                    output_dir: str, progress: bool = True,
                    echo: Callable[[str], None] = print) -> Dict:
    """Run the comparison; writes ``compare.json`` and ``compare.md`` and returns the results."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds} is invalid: use an integer >= 1")
    if not lrs or any(lr <= 0 for lr in lrs):
        raise ValueError(f"--lrs {list(lrs)} is invalid: give learning rates > 0")
    out = Path(output_dir)
    results: Dict[str, Dict] = {}
    for method in methods:
        sweep: Dict[str, float] = {}
        runs: Dict[float, Dict] = {}
        for lr in lrs:
            echo(f"[compare] {method} lr={lr:g} seed={base.seed}")
            s = dataclasses.replace(base, method=method, lr=lr)
            runs[lr] = run_finetune(s, str(out / method / _lr_dir(lr) / f"seed{base.seed}"),
                                    progress=progress)
            sweep[f"{lr:g}"] = runs[lr]["eval_accuracy"]
        best = max(lrs, key=lambda lr: runs[lr]["eval_accuracy"])
        per_seed = [runs[best]]
        for seed in range(base.seed + 1, base.seed + seeds):
            echo(f"[compare] {method} lr={best:g} seed={seed}")
            s = dataclasses.replace(base, method=method, lr=best, seed=seed)
            per_seed.append(run_finetune(s, str(out / method / _lr_dir(best) / f"seed{seed}"),
                                         progress=progress))
        accs = [m["eval_accuracy"] for m in per_seed]
        first = per_seed[0]
        results[method] = {
            "lr": best, "lr_sweep": sweep, "seeds": [m["seed"] for m in per_seed],
            "eval_accuracy": accs, "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "trainable_params_active": first["trainable_params_active"],
            "trainable_params_padded": first["trainable_params_padded"],
            "total_rank": first["total_rank"], "steps": first["steps"],
            "method_settings": first["method_settings"],
            "train_seconds": [m["train_seconds"] for m in per_seed],
        }
    common = {k: v for k, v in dataclasses.asdict(base).items() if k not in ("method", "lr")}
    report = {"task": per_seed[0]["task"], "seeds": seeds, "lrs": list(lrs), "common": common,
              "methods": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(report, indent=2, sort_keys=True))
    table = format_table(report)
    (out / RESULTS_TABLE).write_text(table + "\n")
    return report


def _settings_text(method: str, ms: Dict) -> str:
    if method == "increlora":
        return (f"init_r {ms['init_r']} -> avg {ms['target_rank']} (r_max {ms['r_max']}), "
                f"alpha {ms['lora_alpha']:g}, +{ms['incre_rank_num']} x top_h {ms['top_h']} "
                f"every {ms['incre_interval']} steps after {ms['init_warmup']}, "
                f"restart warmup {ms['warmup_steps']}, orth {ms['orth_reg_weight']:g}")
    if method == "adalora":
        return (f"init_r {ms['init_r']} -> avg {ms['target_r']}, alpha {ms['lora_alpha']:g}, "
                f"tinit {ms['tinit']}, tfinal {ms['tfinal']}, deltaT {ms['deltaT']}, "
                f"orth {ms['orth_reg_weight']:g}")
    if method == "lora":
        return f"r {ms['r']}, alpha {ms['lora_alpha']:g}"
    return f"weight decay {ms['weight_decay']:g}"


def format_table(report: Dict) -> str:
    """The comparison as a Markdown table (mean ± sample std over seeds)."""
    n = report["seeds"]
    lines = [f"| method | dev accuracy (mean ± std, {n} seeds) | trainable params (active / "
             f"padded) | final total rank | lr (sweep {', '.join(f'{x:g}' for x in report['lrs'])}) "
             "| method settings |",
             "| --- | --- | --- | --- | --- | --- |"]
    for method, r in report["methods"].items():
        rank = "-" if r["total_rank"] is None else str(r["total_rank"])
        lines.append(f"| {method} | {r['mean']:.4f} ± {r['std']:.4f} | "
                     f"{r['trainable_params_active']:,} / {r['trainable_params_padded']:,} | "
                     f"{rank} | {r['lr']:g} | {_settings_text(method, r['method_settings'])} |")
    return "\n".join(lines)


def methods_from_text(text: str) -> List[str]:
    """``"increlora,lora"`` -> ["increlora", "lora"], validated."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise ValueError(f"--methods {text!r} is invalid: give a comma-separated subset of "
                         f"{METHODS}")
    return names
