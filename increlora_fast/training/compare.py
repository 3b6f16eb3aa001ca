"""`--compare`: the methods at the same final rank budget, several seeds, one table.

Every adapter method gets the same learning-rate sweep on the first seed, and the full fine-tune
the same grid moved to its own default rate (`sweep_lrs`; ``--lrs`` gives one grid to all); the
best rate on the dev split is then run for the remaining seeds. A rate whose run diverges
(non-finite loss or parameters) is shown as "diverged" in the sweep and never chosen; a
divergence at the chosen rate stops the comparison, so no seed is ever left out of a mean. Each
method keeps its own schedule defaults (see `settings.resolve`); they are printed beside the
numbers.

Runs already finished in the output folder with the same resolved settings are reused, so an
interrupted comparison continues where it stopped, and methods can be run by separate processes
(``--methods lora`` in one, ``--methods adalora`` in another) before one full ``--compare``
writes the table. A finished run with other settings is never overwritten.

The comparison holds a shared lock on its output folder (`output_lock.OutputLock`): several
comparisons may run into one folder at once (e.g. one per method), a plain run into it is
refused while they do, and each method/lr/seed run folder is locked by its own run, so a second
process reaching a run that is still training is refused at once, naming the process.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..files import atomic_write_bytes
from ..model import suffix_match
from .compare_stats import mean_interval
from .finetune_run import (DATA_FILE_KEYS, HEAD_NAMES, load_data, run_finetune, split_holdout,
                           uses_cuda_graphs, with_data_identity)
from .output_lock import OutputLock
from .outputs import METRICS_FILE, check_output_path, check_writable
from .settings import DEFAULT_LR, MAX_SEED, METHODS, RunSettings, resolve, stored_model, validate

COMPARE_METHODS = ("increlora", "lora", "adalora")
DEFAULT_LRS = (1e-3, 2e-3, 4e-3, 8e-3)
# The full fine-tune's default sweep: the same 4 rates a factor 2 apart, moved so that its own
# default rate (`settings.DEFAULT_LR`, 5e-5) stands where 4e-3 stands: 1.25e-5 to 1e-4. The
# adapters' rates are 20 to 160 times its default.
FULL_LRS = tuple(DEFAULT_LR["full"] * (lr / DEFAULT_LRS[2]) for lr in DEFAULT_LRS)
RESULTS_JSON = "compare.json"
RESULTS_TABLE = "compare.md"


def sweep_lrs(method: str, lrs: Optional[Sequence[float]] = None) -> List[float]:
    """The learning rates ``method`` sweeps: ``lrs`` (``--lrs``) for every method when given,
    else `FULL_LRS` for the full fine-tune and `DEFAULT_LRS` for the adapters."""
    if lrs is not None:
        return list(lrs)
    return list(FULL_LRS if method == "full" else DEFAULT_LRS)


def _lr_dir(lr: float) -> str:
    return f"lr{lr:g}"


DATA_KEYS = {key for keys in DATA_FILE_KEYS for key in keys[:2]}


def head_saved_variants(modules: Sequence[str]) -> List[List[str]]:
    """The ``modules_to_save`` a run given ``modules`` may record: `finetune_run.with_head_saved`
    adds the model's head (one of `HEAD_NAMES`) where no entry names it, in place of the other
    family's head name when that names no module (a decoder's ``score`` for the default
    ``classifier``). Which one depends on the model, the same for runs of one ``--model``."""
    variants = [list(modules)]
    for head in HEAD_NAMES:
        if not any(suffix_match(head, key) for key in modules):
            variants.append(list(modules) + [head])
            variants.append([key for key in modules if key not in HEAD_NAMES] + [head])
    return variants


def _same_setting(key: str, stored, wanted, added: Sequence[str] = ()) -> bool:
    """Whether a finished run's stored setting ``key`` is what this comparison asks for.
    ``added``: the entries finetune added to the run's ``modules_to_save`` itself (its
    metrics' ``modules_to_save_added``: the head, layers of it the checkpoint lacks). A
    ``--model`` folder is compared as runs store it now (`settings.stored_model`)."""
    if key == "modules_to_save" and isinstance(stored, list):
        variants = head_saved_variants(wanted)
        return stored in variants or [k for k in stored if k not in added] in variants
    if key == "model" and isinstance(stored, str):  # (runs before 2026-12-07: as given)
        return stored_model(stored) == wanted
    return stored == wanted


def _run_or_reuse(s: RunSettings, run_dir: Path, train_size: int, progress: bool,
                  echo: Callable[[str], None], overwrite: bool = False) -> Dict:
    """The metrics of run ``s`` in ``run_dir``: read back when it already finished there with the
    same resolved settings and the same data, trained when there is none. A finished run on
    other data (or on data it recorded no checksum of) is trained again in its place only with
    ``overwrite``; otherwise ValueError: an earlier comparison's results are never replaced
    unasked."""
    done = run_dir / METRICS_FILE
    if done.exists():
        try:
            metrics = json.loads(done.read_text())
        except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
            raise ValueError(f"{done} is not a readable metrics file ({err}); remove {run_dir} "
                             "to train that run again") from err
        wanted = resolve(s, train_size, uses_cuda_graphs(s)).to_dict()
        # Settings added after a run finished read as their defaults, which it ran with.
        stored = RunSettings.from_dict(metrics.get("settings", {})).to_dict()
        added = metrics.get("modules_to_save_added") or []
        differing = sorted(k for k in wanted
                           if not _same_setting(k, stored.get(k), wanted[k], added))
        if any(k in DATA_KEYS for k in differing):
            if not overwrite:
                raise ValueError(f"{run_dir} holds a finished run on other data (or on data it "
                                 "recorded no checksum of); use another --output-dir, or "
                                 "--overwrite to train it again in its place")
            echo(f"[compare] {s.method} lr={s.lr:g} seed={s.seed}: the run in {run_dir} used "
                 "other data (or recorded no checksum of it); training it again (--overwrite)")
            return run_finetune(s, str(run_dir), progress=progress, overwrite=True)
        if differing:
            raise ValueError(
                f"{run_dir} holds a finished run with other settings ("
                + ", ".join(f"{k}: {stored.get(k)!r} there, {wanted[k]!r} now"
                            for k in differing[:3])
                + "); use another --output-dir or remove that folder")
        echo(f"[compare] {s.method} lr={s.lr:g} seed={s.seed}: reusing the finished run in "
             f"{run_dir}")
        return metrics
    echo(f"[compare] {s.method} lr={s.lr:g} seed={s.seed}")
    return run_finetune(s, str(run_dir), progress=progress, overwrite=overwrite)


def with_shared_padding(base: RunSettings, methods: Sequence[str],
                        echo: Callable[[str], None] = print) -> RunSettings:
    """``base`` with ``--pad-to max_length`` when it leaves the padding to each run and one of
    ``methods`` replays its steps from CUDA graphs here (``--cuda-graphs auto`` on CUDA graphs
    IncreLoRA, whose batches then pad to ``--max-seq-len``): every method of the comparison
    then trains on the same batches, not the graphed one on padded batches and its peers on
    batches cut to their longest input."""
    if base.pad_to is not None or \
            not any(uses_cuda_graphs(dataclasses.replace(base, method=m)) for m in methods):
        return base
    echo("[compare] every method pads its batches to --max-seq-len (--pad-to max_length), as "
         "the IncreLoRA steps replayed from CUDA graphs need")
    return dataclasses.replace(base, pad_to="max_length")


def compare_methods(base: RunSettings, methods: Sequence[str], lrs: Optional[Sequence[float]],
                    seeds: int, output_dir: str, progress: bool = True,
                    echo: Callable[[str], None] = print, overwrite: bool = False) -> Dict:
    """Run the comparison; writes ``compare.json`` and ``compare.md`` and returns the results.

    ``lrs`` (``--lrs``) None: each method sweeps its default grid (`sweep_lrs`). ``overwrite``
    lets a run replace unfinished leftovers in its own folder."""
    out = check_output_path(output_dir)
    if seeds < 1:
        raise ValueError(f"--seeds {seeds} is invalid: use an integer >= 1")
    if base.seed + seeds - 1 > MAX_SEED:  # (the later seeds' runs would be refused)
        raise ValueError(f"--seeds {seeds} is invalid with --seed {base.seed}: the seeds run to "
                         f"{base.seed + seeds - 1}, past {MAX_SEED}; use fewer or a lower --seed")
    if lrs is not None and (not lrs or not all(math.isfinite(lr) and lr > 0 for lr in lrs)):
        raise ValueError(f"--lrs {list(lrs)} is invalid: give finite learning rates > 0")
    folders: Dict[str, float] = {}
    for lr in lrs or ():  # each rate's runs go to its own folder, lr<rate:g>
        if _lr_dir(lr) in folders:
            raise ValueError(f"--lrs {list(lrs)} is invalid: {folders[_lr_dir(lr)]!r} and "
                             f"{lr!r} would share the run folder {_lr_dir(lr)}; give each rate "
                             "once, rates that differ in their first 6 significant digits")
        folders[_lr_dir(lr)] = lr
    for method in methods:  # e.g. --cuda-graphs on with a peer, before any run starts
        validate(dataclasses.replace(base, method=method))
    base = with_shared_padding(base, methods, echo)
    with OutputLock(out, shared=True):
        check_writable(out)
        return _compare(base, methods, lrs, seeds, out, progress, echo, overwrite)


def _compare(base: RunSettings, methods: Sequence[str], lrs: Optional[Sequence[float]],
             seeds: int, out: Path, progress: bool, echo: Callable[[str], None],
             overwrite: bool) -> Dict:
    """`compare_methods` with its folder locked."""
    base = with_data_identity(base)
    data = load_data(base)
    train_size = len(split_holdout(base, data.train, data.label_names)[0])  # rows trained on
    results: Dict[str, Dict] = {}
    for method in methods:
        sweep: Dict[str, float] = {}
        runs: Dict[float, Dict] = {}
        for lr in sweep_lrs(method, lrs):
            s = dataclasses.replace(base, method=method, lr=lr)
            try:
                runs[lr] = _run_or_reuse(s, out / method / _lr_dir(lr) / f"seed{base.seed}",
                                         train_size, progress, echo, overwrite)
            except FloatingPointError as err:  # diverged (non-finite loss or parameters)
                # a failed point of the sweep, shown as such and never chosen; the method's
                # grid stays whole
                echo(f"[compare] {method} lr={lr:g} seed={base.seed}: diverged ({err})")
                sweep[f"{lr:g}"] = None
                continue
            sweep[f"{lr:g}"] = runs[lr]["eval_accuracy"]
        if not runs:
            raise FloatingPointError(f"{method}: every learning rate of --lrs "
                                     f"({', '.join(sweep)}) diverged; give lower ones")
        # a run at the chosen lr that diverges on a later seed still stops the comparison: it is
        # never left out of the mean
        best = max(runs, key=lambda lr: runs[lr]["eval_accuracy"])
        per_seed = [runs[best]]
        for seed in range(base.seed + 1, base.seed + seeds):
            s = dataclasses.replace(base, method=method, lr=best, seed=seed)
            per_seed.append(_run_or_reuse(s, out / method / _lr_dir(best) / f"seed{seed}",
                                          train_size, progress, echo, overwrite))
        accs = [m["eval_accuracy"] for m in per_seed]
        first = per_seed[0]
        results[method] = {
            "lr": best, "lr_sweep": sweep, "seeds": [m["seed"] for m in per_seed],
            "eval_accuracy": accs, "mean": statistics.fmean(accs),
            # None (null) for one seed: it has no spread, and 0.0 read as seeds that agree
            "std": statistics.stdev(accs) if len(accs) > 1 else None,
            "trainable_params_active": first["trainable_params_active"],
            "trainable_params_padded": first["trainable_params_padded"],
            "total_rank": first["total_rank"], "steps": first["steps"],
            "train_examples": first["train_examples"], "eval_examples": first["eval_examples"],
            "method_settings": first["method_settings"],
            "train_seconds": [m["train_seconds"] for m in per_seed],
            # steps replayed from CUDA graphs per seed (None: a run written before the count)
            "cuda_graphs_steps": [m.get("cuda_graphs_steps") for m in per_seed],
            "eval_majority_accuracy": first.get("eval_majority_accuracy"),
        }
    common = {k: v for k, v in dataclasses.asdict(base).items() if k not in ("method", "lr")}
    report = {"task": per_seed[0]["task"], "seeds": seeds,
              "lrs": {method: sweep_lrs(method, lrs) for method in methods}, "common": common,
              "methods": results}
    # atomic: comparisons sharing the folder may write these at the same time
    atomic_write_bytes(out / RESULTS_JSON, json.dumps(report, indent=2, sort_keys=True).encode())
    table = format_table(report)
    atomic_write_bytes(out / RESULTS_TABLE, (table + "\n").encode())
    return report


def _settings_text(method: str, ms: Dict) -> str:
    if method == "increlora":
        return (f"init_r {ms['init_r']} -> avg {ms['target_rank']} (r_max {ms['r_max']}), "
                f"alpha {ms['lora_alpha']:g}, +{ms['incre_rank_num']} x top_h {ms['top_h']} "
                f"every {ms['incre_interval']} steps after {ms['init_warmup']}, "
                f"restart warmup {ms['warmup_steps']}, orth {ms['orth_reg_weight']:g}"
                + ("" if ms.get("advance_learning", True) else ", no advance learning"))
    if method == "adalora":
        return (f"init_r {ms['init_r']} -> avg {ms['target_r']}, alpha {ms['lora_alpha']:g}, "
                f"tinit {ms['tinit']}, tfinal {ms['tfinal']}, deltaT {ms['deltaT']}, "
                f"orth {ms['orth_reg_weight']:g}")
    if method == "lora":
        return f"r {ms['r']}, alpha {ms['lora_alpha']:g}"
    return f"weight decay {ms['weight_decay']:g}"


def _grids_text(lrs: Dict[str, List[float]]) -> str:
    """The swept rates of ``{method: rates}``: the first method's grid, then each other grid in
    parentheses after the methods that swept it (``0.001, 0.002 (full: 1e-05, 2e-05)``)."""
    grids: Dict[str, List[str]] = {}
    for method, rates in lrs.items():
        grids.setdefault(", ".join(f"{lr:g}" for lr in rates), []).append(method)
    first, *others = grids
    return first + "".join(f" ({', '.join(grids[grid])}: {grid})" for grid in others)


def _graphs_text(methods: Dict[str, Dict]) -> str:
    """Which methods' runs replayed steps from CUDA graphs (their training time is not eager
    time), as ``; steps from CUDA graphs: increlora 300 of 300 per seed``; empty when none did."""
    graphed = {m: r["cuda_graphs_steps"] for m, r in methods.items()
               if any(n for n in r.get("cuda_graphs_steps") or ())}
    return "" if not graphed else "; steps from CUDA graphs: " + ", ".join(
        f"{m} {' / '.join('?' if n is None else str(n) for n in counts)} of "
        f"{methods[m]['steps']} per seed" for m, counts in graphed.items())


def format_table(report: Dict) -> str:
    """The comparison as a line of common settings and a Markdown table (mean ± sample std over
    seeds; n/a for one seed, whose std the report holds as null, or as 0.0 when written
    before); every accuracy to 4 decimals, so runs one dev example apart stay apart on dev sets
    of up to 10,000 examples."""
    n = report["seeds"]
    c = report["common"]
    any_run = next(iter(report["methods"].values()))
    lines = [f"{report['task']} ({any_run['train_examples']:,} train / {any_run['eval_examples']:,} "
             f"dev), {c['model']}: {any_run['steps']} steps x batch {c['batch_size']}, max_seq_len "
             f"{c['max_seq_len']}, warmup {c['warmup_ratio']:g}, weight decay "
             f"{c['weight_decay']:g}, grad clip {c['grad_clip']:g}, target rank "
             f"{c['target_rank']}, seeds {c['seed']}..{c['seed'] + n - 1}; lr sweep "
             f"{_grids_text(report['lrs'])} on the first seed, best lr for all"
             " (chosen on the dev set reported here, which flatters every method alike)"
             + ("" if any_run.get("eval_majority_accuracy") is None else
                f"; always predicting the dev set's majority class scores "
                f"{any_run['eval_majority_accuracy']:.4f}")
             + _graphs_text(report["methods"]),
             "",
             f"| method | dev accuracy (mean ± std, {n} seeds) | per seed | trainable params "
             "(active / padded) | final total rank | best lr | sweep (first seed) "
             "| method settings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    edges = {m for m, r in report["methods"].items()
             if _at_edge(r["lr"], report["lrs"].get(m, ()))}
    for method, r in report["methods"].items():
        rank = "-" if r["total_rank"] is None else str(r["total_rank"])
        per_seed = " / ".join(f"{a:.4f}" for a in r["eval_accuracy"])
        std = "n/a" if r["std"] is None or len(r["eval_accuracy"]) < 2 else f"{r['std']:.4f}"
        sweep = ", ".join(f"{lr}: " + ("diverged" if acc is None else f"{acc:.4f}")
                          for lr, acc in r["lr_sweep"].items())
        edge = " (edge)" if method in edges else ""
        lines.append(f"| {method} | {r['mean']:.4f} ± {std} | {per_seed} | "
                     f"{r['trainable_params_active']:,} / {r['trainable_params_padded']:,} | "
                     f"{rank} | {r['lr']:g}{edge} | {sweep} | "
                     f"{_settings_text(method, r['method_settings'])} |")
    if edges:
        lines += ["", "(edge): the best lr is the lowest or the highest rate of its sweep, so a "
                  "better one may lie outside it; sweep further out with --lrs."]
    differences = _differences_text(report["methods"])
    if differences:
        lines += ["", differences]
    return "\n".join(lines)


def _at_edge(lr: float, grid: Sequence[float]) -> bool:
    """Whether ``lr`` is the lowest or the highest rate of a sweep of several rates."""
    return len(grid) > 1 and any(math.isclose(lr, end, rel_tol=1e-9)
                                 for end in (min(grid), max(grid)))


def _differences_text(methods: Dict[str, Dict]) -> str:
    """Each method's dev accuracy minus the first method's, paired by seed (every method ran
    the same seeds, which give the same batches): the mean difference with its 95 %
    t-interval and the number of pairs; empty for one method. One pair, or pairs that all
    differ alike, give no interval (their spread estimates nothing) and say so."""
    (first, base), *others = methods.items()
    if not others:
        return ""
    by_seed = dict(zip(base["seeds"], base["eval_accuracy"]))
    parts = []
    for method, r in others:
        diffs = [a - by_seed[seed] for seed, a in zip(r["seeds"], r["eval_accuracy"])
                 if seed in by_seed]
        if not diffs:
            parts.append(f"{method} no seed in common")
            continue
        mean, _, low, high = mean_interval(diffs)
        n = len(diffs)
        interval = (f"[{low:+.4f}, {high:+.4f}]" if low is not None else
                    "no interval (one pair)" if n == 1 else "no interval (every pair alike)")
        parts.append(f"{method} {mean:+.4f} {interval} ({n})")
    return (f"Dev accuracy minus {first}'s, paired by seed: mean with its 95 % t-interval "
            f"(pairs): " + "; ".join(parts) + ".")


def methods_from_text(text: str) -> List[str]:
    """``"increlora,lora"`` -> ["increlora", "lora"], validated (known methods, each once)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if not names or bad or len(set(names)) < len(names):
        raise ValueError(f"--methods {text!r} is invalid: give a comma-separated subset of "
                         f"{METHODS}, each once")
    return names
