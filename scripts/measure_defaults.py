"""Issue 29's measurement of default candidates for small data of one's own: resumable runner
and paired summary.

Every run is one ``finetune`` of the packaged all-MiniLM-L6-v2, on CPU, at the settings below
plus one candidate (``VARIANTS``), for each data set, method and seed. Its result (a few numbers
and the settings, no weights) is written to ``OUT/<data>/<method>/<variant>/seed<k>.json``; a
run whose file exists is skipped, so an interrupted measurement continues where it stopped and
several workers (``--worker i/n``) can share the list. Jobs are ordered seed by seed, so the
runs finished at any point pair up.

    python scripts/measure_defaults.py run [--data long_reviews,trec6] [--methods increlora,lora]
        [--variants baseline,mean,...] [--seeds 0,1,2] [--max-steps 60] [--batch-size 16]
        [--threads 1] [--worker 0/2]
    python scripts/measure_defaults.py summary      # OUT/SUMMARY_TABLES.md: paired differences

``--out`` (default ``results/defaults``) names OUT; runs already there are skipped whatever
their settings, so a measurement at other steps or batch size gets a folder of its own.

``long_reviews`` is built by ``scripts/compare/make_long_reviews.py`` into ``runs/long_reviews`` when
missing; the packaged tasks (trec6, rotten_tomatoes) may be cut to their first
``--max-train-samples`` / ``--max-eval-samples`` rows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from increlora_fast.training.compare_stats import (RunResult, markdown_table,  # noqa: E402
                                                   paired_differences)
from increlora_fast.training.settings import RunSettings  # noqa: E402

OUT = ROOT / "results" / "defaults"
DATA_DIR = ROOT / "runs" / "long_reviews"
WORK_DIR = ROOT / "runs" / "measure_defaults"
# each candidate as the settings it changes; "baseline" is the defaults
VARIANTS: Dict[str, Dict] = {
    "baseline": {},
    "seq_auto": {"max_seq_len": "auto"},
    "select_best": {"select_best": True},
    "balanced": {"class_weights": "balanced"},
    "epochs": {},  # --epochs from --epochs-variant, filled in by `settings_for`
    "mean": {"pooling": "mean"},
}
KEPT = ("eval_accuracy", "eval_macro_f1", "eval_loss", "eval_examples", "eval_majority_accuracy",
        "eval_majority_macro_f1", "eval_f1_per_class", "train_examples", "train_loss", "steps",
        "epochs", "max_seq_len", "train_truncated_share", "pooling", "selected_step",
        "holdout_accuracy", "holdout_examples", "train_seconds", "total_seconds", "device",
        "precision", "seed", "method", "task")


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def data_settings(name: str, args: argparse.Namespace) -> Dict:
    """The data options of data set ``name``."""
    if name == "long_reviews":
        if not (DATA_DIR / "train.csv").exists():
            subprocess.run([sys.executable, str(ROOT / "scripts" / "compare" / "make_long_reviews.py"),
                            str(DATA_DIR)], check=True)
        return {"task": None, "train_file": str(DATA_DIR / "train.csv"),
                "eval_file": str(DATA_DIR / "dev.csv")}
    return {"task": name, "max_train_samples": args.max_train_samples,
            "max_eval_samples": args.max_eval_samples}


def settings_for(data: str, method: str, variant: str, seed: int,
                 args: argparse.Namespace) -> RunSettings:
    """The run of one job."""
    values = dict(data_settings(data, args), method=method, seed=seed,
                  max_steps=args.max_steps, batch_size=args.batch_size, device="cpu",
                  precision="fp32")
    values.update(VARIANTS[variant])
    if variant == "epochs":
        values.update(max_steps=None, epochs=args.epochs_variant)
    return RunSettings(**values)


def versions() -> Dict[str, str]:
    import torch
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        import peft
        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def run_jobs(args: argparse.Namespace) -> int:
    import torch

    from increlora_fast.training.finetune_run import run_finetune

    torch.set_num_threads(args.threads)
    index, count = (int(x) for x in args.worker.split("/"))
    jobs = [(seed, data, method, variant) for seed in (int(s) for s in _csv(args.seeds))
            for data in _csv(args.data) for method in _csv(args.methods)
            for variant in _csv(args.variants)]
    for number, (seed, data, method, variant) in enumerate(jobs):
        if number % count != index:
            continue
        target = args.out / data / method / variant / f"seed{seed}.json"
        if target.exists():
            continue
        s = settings_for(data, method, variant, seed, args)
        work = WORK_DIR / args.out.name / data / method / variant / f"seed{seed}"
        print(f"[measure] {data} {method} {variant} seed {seed}", flush=True)
        started = datetime.datetime.now(datetime.timezone.utc)
        metrics = run_finetune(s, str(work), progress=False, overwrite=True, save_steps=0,
                               echo=lambda line: print("  " + line, flush=True))
        result = {k: metrics.get(k) for k in KEPT}
        result.update(data=data, variant=variant, settings=metrics["settings"],
                      started_utc=started.isoformat(timespec="seconds"), threads=args.threads,
                      versions=versions(), machine=f"{platform.machine()} "
                      f"{platform.processor() or ''}".strip())
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
        tmp.replace(target)
        shutil.rmtree(work, ignore_errors=True)  # weights are not kept
        print(f"  -> dev accuracy {result['eval_accuracy']:.4f} (majority "
              f"{result['eval_majority_accuracy']:.4f}), macro-F1 "
              f"{result['eval_macro_f1']:.4f}, {result['total_seconds']:.0f} s", flush=True)
    return 0


def load_results(root: Path, metric: str) -> List[RunResult]:
    """Every result file as a `RunResult` whose task is ``<data>/<method>``."""
    runs = []
    for path in sorted(root.glob("*/*/*/seed*.json")):
        r = json.loads(path.read_text())
        runs.append(RunResult(task=f"{r['data']}/{r['method']}", variant=r["variant"],
                              seed=int(r["seed"]), value=float(r[metric]), path=str(path)))
    return runs


def per_run_table(root: Path) -> str:
    """Every (data, method, variant): its runs' dev accuracy and macro-F1 per seed, the majority
    baseline, the chosen max_seq_len, --select-best's steps and the mean training time."""
    groups: Dict[tuple, List[dict]] = {}
    for path in sorted(root.glob("*/*/*/seed*.json")):
        r = json.loads(path.read_text())
        groups.setdefault((r["data"], r["method"], r["variant"]), []).append(r)
    lines = ["| data | method | variant | seeds | dev accuracy per seed | macro-F1 per seed "
             "| majority acc / macro-F1 | max_seq_len | selected step | train s (mean) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (data, method, variant), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        selected = ", ".join(str(r["selected_step"]) for r in rs) if rs[0]["selected_step"] \
            else "-"
        lines.append(
            f"| {data} | {method} | {variant} | {','.join(str(r['seed']) for r in rs)} | "
            + " / ".join(f"{r['eval_accuracy']:.3f}" for r in rs) + " | "
            + " / ".join(f"{r['eval_macro_f1']:.3f}" for r in rs) + " | "
            f"{rs[0]['eval_majority_accuracy']:.3f} / {rs[0]['eval_majority_macro_f1']:.3f} | "
            f"{rs[0]['max_seq_len']} | {selected} | "
            f"{sum(r['train_seconds'] for r in rs) / len(rs):.0f} |")
    return "\n".join(lines)


def summary(args: argparse.Namespace) -> int:
    parts = ["## every run", "", per_run_table(args.out), ""]
    for metric in ("eval_accuracy", "eval_macro_f1"):
        runs = load_results(args.out, metric)
        if not runs:
            print(f"no results under {args.out}", file=sys.stderr)
            return 1
        parts += [f"## {metric}", "", markdown_table(paired_differences(runs, "baseline"),
                                                     metric)]
    text = "\n".join(parts)
    (args.out / "SUMMARY_TABLES.md").write_text(text + "\n")
    print(text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("run", "summary"))
    parser.add_argument("--data", default="long_reviews")
    parser.add_argument("--methods", default="increlora,lora")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs-variant", type=float, default=3.0,
                        help="--epochs of the 'epochs' variant")
    parser.add_argument("--max-train-samples", type=int)
    parser.add_argument("--max-eval-samples", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", default="0/1", help="i/n: run every n-th job from the i-th")
    parser.add_argument("--out", type=Path, default=OUT,
                        help=f"results folder (default {OUT.relative_to(ROOT)}); a measurement "
                             "at other --max-steps/--batch-size needs its own")
    args = parser.parse_args(argv)
    unknown = [v for v in _csv(args.variants) if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    return run_jobs(args) if args.command == "run" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
