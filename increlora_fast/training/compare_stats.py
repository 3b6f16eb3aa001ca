"""Paired-seed comparison of a folder of fine-tuning runs: mean differences with 95 % intervals.

A run is a folder holding the ``metrics.json`` of one ``increlora-fast finetune``; its variant is
the name of the folder above it and its task the name of the folder above that
(``<root>/<task>/<variant>/seed<k>/metrics.json``, as ``scripts/compare/run_issue15.sh`` writes
them, so a run on a data file of one's own has a readable task name); its seed comes from the
metrics. The output folder of ``increlora-fast finetune --compare`` (it holds ``compare.json``)
is read as well: each method is a variant, at the learning rate its sweep chose, over the seeds
of the comparison. Two variants are paired on (task, seed): with the same seed every method sees
the same batches, so a difference per seed removes most of the seed-to-seed noise; what that
leaves out (a task without baseline runs, a variant sharing no seed with the baseline, a seed
only one of the two ran) is a warning on stderr, and a table left empty an error. The interval
is Student's t over the seeds' differences. ``--power-for D`` adds, from the standard deviation
of those differences, the chance that the seeds run would show a true difference of D (paired
two-sided t-test at 5 %) and the number of pairs that would give 80 %.

    python -m increlora_fast.training.compare_stats results/compare/issue15/runs \\
        --baseline default --out table.md [--only 'rank*' --exclude 'h1200_*' \\
        --metric eval_macro_f1 --power-for 0.005 --json-out summary.json \\
        --growth-profile loss.json --growth-plot loss.png --diff-plot diff.png \\
        --allocation-plot allocation.png]
    python -m increlora_fast.training.compare_stats outputs/compare --baseline lora
"""
from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import math
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .allocation_stats import plot_allocation, read_allocation_log
from ..files import write_output
from .outputs import (ALLOCATION_LOG_FILE, METRICS_FILE, RUN_FILES, check_distinct_outputs,
                      write_figure)
from .settings import RunSettings

COMPARE_REPORT = "compare.json"  # what `--compare` writes at the top of its output folder


@dataclass(frozen=True)
class RunResult:
    """One run's metric and where it came from."""

    task: str
    variant: str
    seed: int
    value: float
    path: str
    # what its dev score was computed on (`dev_data`); None where the metrics do not say
    dev: Optional[Tuple] = None


@dataclass
class PairedDifference:
    """``variant`` minus ``baseline`` on one task, over the seeds both have."""

    task: str
    variant: str
    baseline: str
    seeds: List[int]
    variant_mean: float
    baseline_mean: float
    mean_diff: float
    std_diff: Optional[float]  # None with a single pair
    ci_low: Optional[float]
    ci_high: Optional[float]
    power_for: Optional[float] = None  # the true difference the two fields below are about
    power: Optional[float] = None  # chance these seeds show it (interval excludes 0)
    pairs_for_80: Optional[int] = None  # pairs that give that chance 80 %

    @property
    def verdict(self) -> str:
        """"better" / "worse" when the 95 % interval excludes 0, "tie" when it does not."""
        if self.ci_low is None:
            return "n/a (1 seed)" if len(self.seeds) < 2 else "n/a (identical differences)"
        if self.ci_low > 0:
            return "better"
        if self.ci_high < 0:
            return "worse"
        return "tie"


def _t_density(x: float, df: int) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int) -> float:
    """Student's t distribution function (Simpson's rule on the density; error < 1e-9 for the
    quantiles used here)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    n = 4000
    h = x / n
    total = _t_density(0.0, df) + _t_density(x, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, n))
    return 0.5 + total * h / 3


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` >= 1 degrees of freedom."""
    if not (0.5 < p < 1) or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    # Newton's method on t_cdf from the Cornish-Fisher expansion around the normal quantile,
    # kept inside a bracket [lo, hi] of the root (a step that leaves it bisects instead)
    z = NormalDist().inv_cdf(p)
    x = z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df * df)
    lo, hi = 0.0, math.inf
    for _ in range(100):
        error = t_cdf(x, df) - p
        if error == 0.0:
            return x
        lo, hi = (x, hi) if error < 0 else (lo, x)
        step = x - error / _t_density(x, df)
        if not lo < step < hi:
            step = (lo + hi) / 2 if math.isfinite(hi) else 2 * x
        if abs(step - x) <= 1e-14 * x:
            return step
        x = step
    return x


def mean_interval(values: Sequence[float], level: float = 0.95
                  ) -> Tuple[float, Optional[float], Optional[float], Optional[float]]:
    """(mean, sample std, low, high) of the t-interval for the mean; std and bounds are None for
    a single value, and the bounds None (std 0) for values that are all the same up to rounding:
    their spread estimates nothing, and a zero-width interval would call any mean other than 0
    a difference (2 seeds both +0.002 are no evidence)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, None, None, None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if std <= 1e-12 * max(1.0, max(abs(v) for v in values)):
        return mean, 0.0, None, None
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _chi_density(w: float, df: int) -> float:
    """Density of sqrt(V) for V chi-squared with ``df`` degrees of freedom."""
    if w <= 0.0:
        return math.sqrt(2.0 / math.pi) if df == 1 else 0.0
    log_c = (1 - df / 2) * math.log(2.0) - math.lgamma(df / 2)
    return math.exp(log_c + (df - 1) * math.log(w) - w * w / 2)


def paired_power(std_diff: float, pairs: int, true_diff: float, level: float = 0.95) -> float:
    """The chance that ``pairs`` paired seeds whose differences have standard deviation
    ``std_diff`` give a ``level`` t-interval that excludes 0 when the true mean difference is
    ``true_diff`` (the power of the two-sided paired t-test; the noncentral t integrated over
    the chi-distributed sample std by Simpson's rule)."""
    if pairs < 2 or not std_diff > 0 or not math.isfinite(true_diff):
        raise ValueError(f"paired_power needs pairs >= 2, std_diff > 0 and a finite true_diff, "
                         f"got {pairs}, {std_diff}, {true_diff}")
    df = pairs - 1
    crit = t_quantile(0.5 + level / 2, df)
    shift = abs(true_diff) / (std_diff / math.sqrt(pairs))
    n, top = 2000, math.sqrt(df) + 12.0
    h = top / n
    total = 0.0
    for i in range(n + 1):
        w = i * h
        scale = crit * w / math.sqrt(df)
        reject = 1.0 - _normal_cdf(scale - shift) + _normal_cdf(-scale - shift)
        weight = 1 if i in (0, n) else (4 if i % 2 else 2)
        total += weight * _chi_density(w, df) * reject
    return min(1.0, total * h / 3)


def pairs_for_power(std_diff: float, true_diff: float, target: float = 0.8,
                    level: float = 0.95, limit: int = 100_000) -> Optional[int]:
    """The fewest paired seeds whose ``paired_power`` reaches ``target``, taking ``std_diff`` as
    the true spread of the differences (a planning estimate); None beyond ``limit`` pairs.

    The power grows with the pairs; the search starts at the normal approximation's count
    (z-test), whose t-test power is just below ``target``, and brackets the answer from there."""
    def reached(pairs: int) -> bool:
        return paired_power(std_diff, pairs, true_diff, level) >= target

    normal = NormalDist()
    z = normal.inv_cdf(0.5 + level / 2) + normal.inv_cdf(target)
    guess = ((z * std_diff / true_diff) ** 2 if true_diff else math.inf)
    guess = int(min(max(guess, 2.0), float(limit)))
    if reached(guess):  # bracket (low, high]: high reaches the target, low does not
        high, gap = guess, 1
        while high > 2 and reached(max(2, high - gap)):
            high, gap = max(2, high - gap), 2 * gap
        if high == 2:
            return 2
        low = max(2, high - gap)
    else:
        low, gap = guess, 1
        while True:
            if low >= limit:
                return None
            high = min(low + gap, limit)
            if reached(high):
                break
            low, gap = high, 2 * gap
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if reached(mid) else (mid, high)
    return high


def with_power(rows: Sequence[PairedDifference], true_diff: float) -> List[PairedDifference]:
    """``rows`` with ``power_for``, ``power`` and ``pairs_for_80`` filled in for a true
    difference of ``true_diff`` (left None for a row of one pair or identical differences)."""
    out = []
    for r in rows:
        power = pairs = None
        if r.std_diff and len(r.seeds) >= 2:
            power = paired_power(r.std_diff, len(r.seeds), true_diff)
            pairs = pairs_for_power(r.std_diff, true_diff)
        out.append(replace(r, power_for=true_diff, power=power, pairs_for_80=pairs))
    return out


def _read_metrics(path: Path) -> Dict:
    """The metrics file ``path`` as a dict with an integer ``seed``; raises ValueError naming
    the file for one that is damaged (truncated, not UTF-8, not JSON) or not a run's metrics."""
    try:
        data = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not a readable metrics file ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a run's metrics (a JSON {type(data).__name__})")
    seed = data.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{path}: 'seed' is {seed!r}, not an integer")
    return data


def _metric_value(path: Path, data: Dict, metric: str) -> float:
    """``data[metric]`` of the metrics file ``path`` as a finite number; raises ValueError naming
    the file otherwise (a NaN would read as a "tie" and a null would end in a traceback)."""
    if metric not in data:
        raise ValueError(f"{path}: no {metric!r} in the metrics; known: {sorted(data)}")
    value = data[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise ValueError(f"{path}: {metric!r} is {value!r}, not a finite number; that run "
                         "cannot be compared on it")
    return float(value)


DEV_DATA_KEYS = ("task", "text_column", "text_pair_column", "label_column", "max_eval_samples")


def dev_data(data: Dict) -> Optional[Tuple]:
    """What a run's eval metrics were computed on, from the ``settings`` of its metrics.json:
    the packaged task or the eval file's checksum (the train file's when the dev split is held
    out from it), the columns and the eval cap; None for metrics without settings."""
    settings = data.get("settings")
    if not isinstance(settings, dict):
        return None
    source = ("eval_file", settings.get("eval_file_sha256")) if settings.get("eval_file") else \
        ("train_file", settings.get("train_file_sha256"))
    return tuple(settings.get(k) for k in DEV_DATA_KEYS) + source


# settings that may differ between the runs of one variant: the seed, the data files' paths
# (their checksums are what counts, and stay compared) and the device asked for
PER_RUN_SETTINGS = ("seed", "train_file", "eval_file", "device")


def variant_settings(data: Dict) -> Optional[Dict]:
    """A run's settings without `PER_RUN_SETTINGS`, those it predates read as their defaults
    (as it ran with them); None for metrics without settings."""
    settings = data.get("settings")
    if not isinstance(settings, dict):
        return None
    try:
        settings = RunSettings.from_dict(settings).to_dict()
    except TypeError:  # a required setting missing: compare what there is
        pass
    return {k: v for k, v in settings.items() if k not in PER_RUN_SETTINGS}


def _read_compare_report(path: Path) -> Dict:
    """The ``compare.json`` at ``path``; raises ValueError naming it for one that is damaged or
    lacks the task, the methods or a method's lr and seeds."""
    try:
        report = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not a readable comparison report ({err})") from err
    methods = report.get("methods") if isinstance(report, dict) else None
    if "task" not in (report if isinstance(report, dict) else {}) or \
            not isinstance(methods, dict) or \
            not all(isinstance(r, dict) and isinstance(r.get("lr"), (int, float)) and
                    isinstance(r.get("seeds"), list) for r in methods.values()):
        raise ValueError(f"{path} is not the report of `finetune --compare` (it needs 'task' "
                         "and 'methods', each with its 'lr' and 'seeds')")
    return report


def load_compare_runs(root: Path, metric: str = "eval_accuracy",
                      selection: Optional[Selection] = None) -> List[RunResult]:
    """The runs of an ``increlora-fast finetune --compare`` output folder: every method as a
    variant, at the learning rate its sweep chose, over the comparison's seeds (the sweep's
    other rates ran on the first seed only and are left out); with ``selection``, only the
    methods it keeps are read. Raises ValueError naming what is missing, and for two runs of
    one method, lr and seed."""
    root = Path(root)
    report = _read_compare_report(root / COMPARE_REPORT)
    if selection is not None:
        selection.check(report["methods"])
    runs = []
    for method, result in report["methods"].items():
        if selection is not None and not selection.keeps(method, report["methods"]):
            continue
        found = {}
        for path in sorted((root / method).glob(f"*/seed*/{METRICS_FILE}")):
            data = _read_metrics(path)
            if data.get("settings", {}).get("lr") == result["lr"]:
                seed = int(data["seed"])
                if seed in found:  # e.g. a copy of a run folder kept beside it
                    raise ValueError(f"{path}: {method} at lr {result['lr']:g} seed {seed} "
                                     f"already comes from {found[seed][0].parent}")
                found[seed] = (path, data)
        for seed in result["seeds"]:
            if seed not in found:
                raise ValueError(f"{root}: no {METRICS_FILE} of {method} at lr {result['lr']:g} "
                                 f"seed {seed} below {root / method}")
            path, data = found[seed]
            runs.append(RunResult(task=str(report["task"]), variant=method, seed=seed,
                                  value=_metric_value(path, data, metric),
                                  path=str(path.parent), dev=dev_data(data)))
    if not runs:
        raise ValueError(f"{root / COMPARE_REPORT}: no methods in it"
                         + ("" if not report["methods"] else
                            f" but {sorted(report['methods'])}, all left out by --baseline, "
                            "--only and --exclude"))
    return runs


def load_runs(root: Path, metric: str = "eval_accuracy",
              selection: Optional[Selection] = None) -> List[RunResult]:
    """Every run under ``root`` (`load_compare_runs` when it is a ``--compare`` output folder);
    with ``selection``, only those of the variants it keeps: the others are not read, so a
    variant left out cannot stop the table. Raises ValueError naming the file for a run without
    ``metric``, for two runs of one (task, variant, seed) and for runs of one variant with other
    settings (`variant_settings`)."""
    if (Path(root) / COMPARE_REPORT).is_file():
        return load_compare_runs(Path(root), metric, selection)
    runs, seen = [], {}
    setups: Dict[Tuple[str, str], Tuple[Dict, Path]] = {}
    # not below a hidden folder: a killed run's staged final outputs (`.final-outputs.tmp`) or
    # a replaced checkpoint, which the next run into that folder clears
    paths = sorted(p for p in Path(root).rglob(METRICS_FILE)
                   if not any(part.startswith(".") for part in p.relative_to(root).parts[:-1]))
    names = {path.parent.parent.name for path in paths}
    if selection is not None and paths:
        selection.check(names)
    for path in paths:
        if selection is not None and not selection.keeps(path.parent.parent.name, names):
            continue
        data = _read_metrics(path)
        run = RunResult(task=path.parent.parent.parent.name, variant=path.parent.parent.name,
                        seed=int(data["seed"]), value=_metric_value(path, data, metric),
                        path=str(path.parent), dev=dev_data(data))
        key = (run.task, run.variant, run.seed)
        if key in seen:
            raise ValueError(f"{path}: task {run.task!r}, variant {run.variant!r}, seed "
                             f"{run.seed} already comes from {seen[key]}")
        seen[key] = path
        setup = variant_settings(data)
        if setup is not None:
            first, where = setups.setdefault((run.task, run.variant), (setup, path.parent))
            differing = sorted(k for k in set(first) | set(setup)
                               if first.get(k) != setup.get(k))
            if differing:
                raise ValueError(
                    f"{path.parent} ran with other settings than {where}, a run of the same "
                    f"variant (" + ", ".join(f"{k}: {setup.get(k)!r} against {first.get(k)!r}"
                                             for k in differing[:3])
                    + "): one variant name must hold one setup")
        runs.append(run)
    if not runs:
        if paths:  # every run left out
            raise ValueError(f"{root}: neither the baseline {selection.baseline!r} nor a "
                             f"variant --only/--exclude leave has runs; variants: "
                             f"{sorted(names)}")
        raise ValueError(f"{root}: no {METRICS_FILE} found below it")
    return runs


def _matches(name: str, globs: Optional[str], names: Iterable[str] = ()) -> bool:
    """Whether ``name`` matches one of the comma-separated ``globs``; a glob that is one of the
    variant ``names`` stands for that variant alone (``rank[8]`` for the variant ``rank[8]``,
    not for ``rank8``, as fnmatch would read it)."""
    names = set(names)
    return any(name == g if g in names else fnmatch.fnmatchcase(name, g)
               for g in (g.strip() for g in globs.split(",")) if g)


@dataclass(frozen=True)
class Selection:
    """The variants a table reads: ``baseline`` and those the comma-separated globs ``only``
    (None: all) keep and ``exclude`` do not leave out (`_matches`)."""

    baseline: str
    only: Optional[str] = None
    exclude: Optional[str] = None

    def check(self, names: Iterable[str]) -> None:
        """Raise ValueError naming an ``only`` glob that matches none of the variant ``names``
        (a typo would leave its variant out without a word). ``exclude`` globs may match
        nothing: one list of variants to set aside serves tables of different variants."""
        names = sorted(set(names))
        for glob in (g.strip() for g in (self.only or "").split(",")):
            if glob and not any(_matches(name, glob, names) for name in names):
                raise ValueError(f"--only glob {glob!r} matches no variant; variants: {names}")

    def keeps(self, variant: str, names: Iterable[str]) -> bool:
        """Whether ``variant``, one of the variant ``names``, is read."""
        return variant == self.baseline or (
            (not self.only or _matches(variant, self.only, names))
            and not (self.exclude and _matches(variant, self.exclude, names)))


def seeds_text(seeds: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``: sorted seeds, consecutive ones as a range."""
    spans: List[List[int]] = []
    for seed in sorted(set(seeds)):
        if spans and seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def paired_differences(runs: Iterable[RunResult], baseline: str, only: Optional[str] = None,
                       exclude: Optional[str] = None,
                       warn: Optional[Callable[[str], None]] = None) -> List[PairedDifference]:
    """Every variant against ``baseline``, per task, over the seeds both ran; ``only`` and
    ``exclude`` are comma-separated globs of variant names to keep and to leave out. What the
    pairing leaves out of a kept variant (a task without baseline runs, a variant sharing no
    seed with the baseline, the seeds only one of the two ran) is told to ``warn``, one line
    each. Raises ValueError when no task has the baseline, for a run whose value is not finite,
    for two runs of one (task, variant, seed), and for a pair whose runs were scored on other
    dev data (`dev_data`: another eval file, task or cap), which is no paired difference."""
    warn = warn or (lambda message: None)
    table: Dict[str, Dict[str, Dict[int, RunResult]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        if not math.isfinite(run.value):  # a NaN interval would read as a "tie"
            raise ValueError(f"{run.path}: {run.variant!r} seed {run.seed} scored {run.value}, "
                             "not a finite number; that run cannot be compared")
        first = table[run.task][run.variant].setdefault(run.seed, run)
        if first is not run:  # which of the two is meant cannot be told
            raise ValueError(f"{run.path}: task {run.task!r}, variant {run.variant!r}, seed "
                             f"{run.seed} already comes from {first.path}")
    if not any(baseline in variants for variants in table.values()):
        known = sorted({v for variants in table.values() for v in variants})
        raise ValueError(f"baseline variant {baseline!r} has no runs; variants: {known}")
    names = {v for variants in table.values() for v in variants}
    selection = Selection(baseline, only, exclude)
    selection.check(names)
    rows = []
    for task in sorted(table):
        base = table[task].get(baseline)
        kept = [v for v in sorted(table[task]) if v != baseline and selection.keeps(v, names)]
        if base is None:
            if kept:
                warn(f"task {task!r} has no runs of the baseline {baseline!r}; left out "
                     + ", ".join(f"{v!r} (seeds {seeds_text(table[task][v])})" for v in kept))
            continue
        for variant in kept:
            mine = table[task][variant]
            seeds = sorted(set(mine) & set(base))
            if not seeds:
                warn(f"task {task!r}: {variant!r} shares no seed with the baseline "
                     f"{baseline!r} (seeds {seeds_text(mine)} against {seeds_text(base)}); "
                     "left out")
                continue
            unpaired = [(seeds_text(set(a) - set(b)), who) for a, b, who in
                        ((mine, base, variant), (base, mine, baseline)) if set(a) - set(b)]
            if unpaired:
                warn(f"task {task!r}: {variant!r} paired on {len(seeds)} seeds; left out seeds "
                     + ", ".join(f"{text} {'run by' if i == 0 else 'by'} {who!r} only"
                                 for i, (text, who) in enumerate(unpaired)))
            for s in seeds:
                if None not in (mine[s].dev, base[s].dev) and mine[s].dev != base[s].dev:
                    raise ValueError(
                        f"{mine[s].path} and {base[s].path} were scored on other dev data "
                        f"({mine[s].dev} against {base[s].dev}): they are no pair of seed {s}")
            diffs = [mine[s].value - base[s].value for s in seeds]
            mean, std, low, high = mean_interval(diffs)
            rows.append(PairedDifference(
                task=task, variant=variant, baseline=baseline, seeds=seeds,
                variant_mean=sum(mine[s].value for s in seeds) / len(seeds),
                baseline_mean=sum(base[s].value for s in seeds) / len(seeds),
                mean_diff=mean, std_diff=std, ci_low=low, ci_high=high))
    return rows


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def markdown_table(rows: Sequence[PairedDifference], metric: str = "eval_accuracy") -> str:
    """One Markdown table per task: each variant's mean, the baseline's on the same seeds, the
    mean paired difference, its 95 % t-interval and whether the interval excludes 0; with the
    power of those seeds and the pairs for 80 % when the rows carry them (`with_power`)."""
    out = []
    for task in sorted({r.task for r in rows}):
        task_rows = [r for r in rows if r.task == task]
        power_for = task_rows[0].power_for
        extra = "" if power_for is None else \
            f" | power at {power_for:g} | pairs for 80 % at {power_for:g}"
        out += [f"### {task}: {metric}, paired on seeds against `{task_rows[0].baseline}`", "",
                "| variant | seeds | variant mean | baseline mean | mean paired diff "
                f"| 95 % interval | verdict{extra} |",
                "| --- | --- | --- | --- | --- | --- | ---" + ("" if power_for is None else
                                                          " | --- | ---") + " |"]
        for r in task_rows:
            interval = "n/a" if r.ci_low is None else \
                f"[{_fmt(r.ci_low, True)}, {_fmt(r.ci_high, True)}]"
            cells = ""
            if power_for is not None:
                power = "n/a" if r.power is None else f"{r.power:.2f}"
                pairs = "n/a" if r.pairs_for_80 is None else str(r.pairs_for_80)
                cells = f" {power} | {pairs} |"
            out.append(f"| {r.variant} | {len(r.seeds)} | {_fmt(r.variant_mean)} | "
                       f"{_fmt(r.baseline_mean)} | {_fmt(r.mean_diff, True)} | {interval} | "
                       f"{r.verdict} |{cells}")
        out.append("")
    return "\n".join(out)


def loss_around_growth(run_dir: Path, before: int = 5, after: int = 15) -> Dict[int, float]:
    """{offset: mean training loss at round step + offset} over a run's allocation rounds, from
    ``train_losses`` in metrics.json and the rounds of allocation_log.jsonl. The loss of step s
    comes from the forward before that step's round, so offset 0 is the last loss before the
    growth and offset 1 the first after it. Empty for a run without rounds."""
    run_dir = Path(run_dir)
    losses = json.loads((run_dir / METRICS_FILE).read_text()).get("train_losses")
    if losses is None:
        raise ValueError(f"{run_dir / METRICS_FILE}: no 'train_losses' (written since issue 15)")
    log = run_dir / ALLOCATION_LOG_FILE
    rounds = sorted({e["step"] for e in read_allocation_log(log)}) if log.exists() else []
    profile: Dict[int, List[float]] = defaultdict(list)
    for step in rounds:
        for offset in range(-before, after + 1):
            if 0 <= step + offset < len(losses):
                profile[offset].append(losses[step + offset])
    return {k: sum(v) / len(v) for k, v in sorted(profile.items())}


def growth_profiles(runs: Iterable[RunResult], variants: Sequence[str], before: int = 5,
                    after: int = 15) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{task: {variant: {offset: mean loss}}} of `loss_around_growth`, averaged per task over
    the seeds that every listed variant with rounds ran there (paired, so the distance between
    two variants' lines is their mean paired difference; variants without rounds are left out,
    and a task where they share no seed too)."""
    profiles: Dict[Tuple[str, str], Dict[int, Dict[int, float]]] = defaultdict(dict)
    for run in runs:
        if run.variant in variants:
            profile = loss_around_growth(Path(run.path), before, after)
            if profile:
                profiles[run.task, run.variant][run.seed] = profile
    out: Dict[str, Dict[str, Dict[str, float]]] = defaultdict(dict)
    for task in sorted({task for task, _ in profiles}):
        per_variant = {v: seeds for (t, v), seeds in sorted(profiles.items()) if t == task}
        shared = set.intersection(*(set(seeds) for seeds in per_variant.values()))
        if not shared:
            continue
        for variant, seeds in per_variant.items():
            sums: Dict[int, List[float]] = defaultdict(list)
            for seed in sorted(shared):
                for offset, loss in seeds[seed].items():
                    sums[offset].append(loss)
            out[task][variant] = {str(k): sum(v) / len(v) for k, v in sorted(sums.items())}
    return dict(out)


def plot_growth_profiles(profiles: Dict[str, Dict[str, Dict[str, float]]], path: Path) -> None:
    """A PNG of `growth_profiles`: one panel per task, one line per variant, the mean training
    loss against the step offset from the growth rounds (matplotlib, the ``finetune`` extra)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    tasks = sorted(profiles)
    if not tasks:
        raise ValueError("no growth rounds to plot: none of the runs grew a rank")
    fig = Figure(figsize=(5 * len(tasks), 3.5))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for variant, profile in sorted(profiles[task].items()):
            offsets = sorted(int(k) for k in profile)
            ax.plot(offsets, [profile[str(k)] for k in offsets], marker=".", label=variant)
        ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(title=task, xlabel="steps from the growth round", ylabel="mean training loss")
        ax.legend(fontsize="small")
    fig.tight_layout()
    write_figure(fig, path, dpi=120)


def plot_differences(rows: Sequence[PairedDifference], path: Path,
                     metric: str = "eval_accuracy") -> None:
    """A PNG of the paired differences: one panel per task, each variant's mean difference from
    the baseline with its 95 % interval as a bar, 0 marked (matplotlib, the ``finetune`` extra)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    tasks = sorted({r.task for r in rows})
    if not tasks:
        raise ValueError("no paired differences to plot")
    height = max(2.5, 0.45 * max(sum(r.task == t for r in rows) for t in tasks) + 1.2)
    fig = Figure(figsize=(5.2 * len(tasks), height))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        task_rows = [r for r in rows if r.task == task][::-1]
        y = list(range(len(task_rows)))
        means = [r.mean_diff for r in task_rows]
        low = [r.mean_diff - (r.ci_low if r.ci_low is not None else r.mean_diff)
               for r in task_rows]
        high = [(r.ci_high if r.ci_high is not None else r.mean_diff) - r.mean_diff
                for r in task_rows]
        ax.errorbar(means, y, xerr=[low, high], fmt="o", capsize=3)
        ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.set_yticks(y, [f"{r.variant} ({len(r.seeds)})" for r in task_rows])
        ax.set(title=f"{task}: {metric} minus {task_rows[0].baseline!r}",
               xlabel="mean paired difference, 95 % interval (seeds)")
    fig.tight_layout()
    write_figure(fig, path, dpi=110)


OUTPUT_OPTIONS = ("out", "json_out", "growth_profile", "growth_plot", "diff_plot",
                  "allocation_plot")


def check_outputs(args: argparse.Namespace) -> None:
    """Every output option (`OUTPUT_OPTIONS`) names a file that can be written once the runs
    are read: not empty, not a folder, no file where a folder above it must be, not a file of
    the runs below ``args.root`` (`outputs.RUN_FILES`: a run's metrics.json, the compare.md of
    ``--compare``), and no two on one file (the later would replace the earlier). ValueError
    naming the option, before any run is read; a device or pipe such as ``/dev/null`` passes."""
    root = Path(args.root).expanduser().resolve()
    files = []  # (option, path) of the outputs that are files: no two may be one
    for dest in OUTPUT_OPTIONS:
        path = getattr(args, dest, None)
        if path is None:
            continue
        option = "--" + dest.replace("_", "-")
        target = Path(path).expanduser()
        if not path.strip():
            raise ValueError(f"{option} is empty: give a file path, or leave the option out")
        if target.is_dir():
            raise ValueError(f"{option} {path} is a folder; give a file path")
        if target.exists() and not target.is_file():
            continue  # a device or pipe: written to, never replaced
        if target.is_file() and target.name in RUN_FILES and root in target.resolve().parents:
            raise ValueError(f"{option} {path} is a file of the runs in {args.root}, which "
                             "this command reads and never replaces; give another path")
        for above in target.absolute().parents:
            if above.exists():
                if not above.is_dir():
                    raise ValueError(f"{option} {path} cannot be written: {above} is a file")
                break
        files.append((option, path))
    check_distinct_outputs(files)


PLOT_OPTIONS = ("growth_plot", "diff_plot", "allocation_plot")


def check_plotting(args: argparse.Namespace) -> None:
    """ValueError naming the first plot option given (`PLOT_OPTIONS`) when matplotlib cannot
    be imported, or one whose path ends in a suffix that is no image format matplotlib writes
    (none: PNG), before any run is read or output written."""
    asked = {"--" + dest.replace("_", "-"): getattr(args, dest) for dest in PLOT_OPTIONS
             if getattr(args, dest, None)}
    if not asked:
        return
    try:  # (imports the package too: a test blocks it in sys.modules)
        import matplotlib.backend_bases
    except ImportError as err:
        raise ValueError(f"{next(iter(asked))} needs matplotlib ({err}): pip install -e "
                         "\".[finetune]\", or leave the plot options out") from err
    formats = matplotlib.backend_bases.FigureCanvasBase.get_supported_filetypes()
    for option, path in asked.items():
        suffix = Path(path).suffix[1:].lower()
        if suffix and suffix not in formats:
            raise ValueError(f"{option} {path}: '.{suffix}' is no image format matplotlib "
                             f"writes; end the path in one of "
                             f"{', '.join('.' + f for f in sorted(formats))}")


def _row_json(row: PairedDifference) -> Dict:
    """A row as JSON with its verdict; the power fields only when they were asked for."""
    data = dict(asdict(row), verdict=row.verdict)
    if row.power_for is None:
        for key in ("power_for", "power", "pairs_for_80"):
            del data[key]
    return data


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m increlora_fast.training.compare_stats",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder of runs, <root>/<task>/<variant>/seed<k>/, or the "
                                     "output folder of `finetune --compare`")
    parser.add_argument("--baseline", required=True, help="variant the others are paired with")
    parser.add_argument("--only", help="comma-separated globs of the variants to compare "
                                       "(default: all; a variant's exact name stands for it "
                                       "alone); the others' runs are not read. A glob that "
                                       "matches no variant is an error")
    parser.add_argument("--exclude", help="comma-separated globs of variants to leave out, "
                                          "unread; a glob may match no variant (one list can "
                                          "serve several tables)")
    parser.add_argument("--metric", default="eval_accuracy",
                        help="metrics.json field (default eval_accuracy)")
    parser.add_argument("--power-for", type=float, metavar="DIFF",
                        help="add the chance that the seeds run show a true difference of DIFF "
                             "and the pairs that give 80 %% (from the differences' std)")
    parser.add_argument("--out", help="write the Markdown table here (default: print it)")
    parser.add_argument("--json-out", help="also write the rows as JSON here")
    parser.add_argument("--growth-profile", metavar="JSON",
                        help="also write the mean training loss around growth rounds of the "
                             "baseline and the compared variants here")
    parser.add_argument("--growth-plot", metavar="PNG",
                        help="also plot that loss around growth rounds here")
    parser.add_argument("--diff-plot", metavar="PNG",
                        help="also plot the paired differences with their intervals here")
    parser.add_argument("--allocation-plot", metavar="PNG",
                        help="also plot the baseline's mean rank per module type and per layer "
                             "over training here")
    args = parser.parse_args(argv)
    try:
        check_outputs(args)
        check_plotting(args)
        if args.power_for is not None and (args.power_for == 0 or
                                           not math.isfinite(args.power_for)):
            raise ValueError(f"--power-for needs a finite difference other than 0, got "
                             f"{args.power_for:g}")
        runs = load_runs(Path(args.root), args.metric,
                         Selection(args.baseline, args.only, args.exclude))
        left_out: List[str] = []  # the runs read are those selected
        rows = paired_differences(runs, args.baseline, warn=left_out.append)
        if not rows and (args.diff_plot or not (args.allocation_plot or args.growth_profile or
                                                args.growth_plot)):
            filters = " left by --only/--exclude" if args.only or args.exclude else ""
            raise ValueError(f"no variant{filters} shares a seed of a task with the baseline "
                             f"{args.baseline!r}: there is nothing to compare"
                             + "".join(f"; {line}" for line in left_out))
        for line in left_out:
            print(f"compare_stats: warning: {line}", file=sys.stderr)
        if args.power_for is not None:
            rows = with_power(rows, args.power_for)
        if args.growth_profile or args.growth_plot:
            variants = {args.baseline} | {r.variant for r in rows}
            profiles = growth_profiles(runs, sorted(variants))
            if args.growth_plot and not profiles:  # before the profile is written
                raise ValueError("no growth rounds to plot: none of the runs grew a rank")
            if args.growth_profile:
                write_output(Path(args.growth_profile),
                             (json.dumps(profiles, indent=2) + "\n").encode())
            if args.growth_plot:
                plot_growth_profiles(profiles, Path(args.growth_plot))
        if args.diff_plot:
            plot_differences(rows, Path(args.diff_plot), args.metric)
        if args.allocation_plot:
            by_task: Dict[str, List[Path]] = defaultdict(list)
            for run in runs:
                if run.variant == args.baseline:
                    by_task[run.task].append(Path(run.path))
            # replaced, as every output of this command is (`check_outputs` keeps the runs')
            plot_allocation(by_task, Path(args.allocation_plot),
                            title=f"allocation of {args.baseline!r}", overwrite=True)
    except ValueError as err:
        print(f"compare_stats: error: {err}", file=sys.stderr)
        return 2
    text = markdown_table(rows, args.metric)
    if args.out:
        write_output(Path(args.out), (text + "\n").encode())
    else:
        print(text)
    if args.json_out:
        write_output(Path(args.json_out),
                     (json.dumps([_row_json(r) for r in rows], indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
