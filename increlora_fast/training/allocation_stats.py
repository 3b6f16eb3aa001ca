"""How a run's ranks were allocated over training, from its allocation_log.jsonl.

A run's modules and their initial rank come from its metrics.json (``rank_pattern`` keys and
``method_settings.init_r``); every line of the allocation log raises one module to ``new_rank``
at ``step``. `ranks_over_time` replays that; `allocation_by_group` averages the ranks per module
type (``attention.self.query`` ...) or per layer over the seeds of a variant, and
`plot_allocation` draws both, one row of panels per task.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterable, List

from ..visualize import (distinct_colours, expert_kind, module_layers, natural_key,
                         one_stack_per_index, split_module_name)
from .outputs import ALLOCATION_LOG_FILE, METRICS_FILE, write_figure


def module_type(name: str) -> str:
    """The part of a module name after its layer index (``attention.self.query``;
    `visualize.split_module_name`: its first integer), or the name when it has none; an
    expert's number as ``*`` (`visualize.expert_kind`: a layer's experts are one type)."""
    return expert_kind(split_module_name(name)[1])


def module_layer(name: str) -> str:
    """The layer index in a module name (``"3"``; its first integer component, T5's block),
    or the name when it has none."""
    index, _ = split_module_name(name)
    return name if index == "-" else index


def type_group(names: Iterable[str]) -> Callable[[str], str]:
    """How `allocation_by_group` groups ``names`` per module type: what follows each name's
    layer index read against all of them (`visualize.module_layers`: a number every name
    shares, a wrapper's ``0.``, is not the layer), or the name when it has none; the experts
    of a layer are one type (`visualize.expert_kind`), as in the rank table."""
    split = module_layers(names)
    return lambda name: expert_kind((split.get(name) or module_layers([name])[name]).kind)


def layer_group(names: Iterable[str]) -> Callable[[str], str]:
    """How `allocation_by_group` groups ``names`` per layer: by layer index
    (`visualize.module_layers`), or, where one index belongs to several stacks (an encoder's
    and a decoder's layer 0), by the name up to its index (``model.decoder.layers.0``), so
    that no line averages two layers; a name without an index is a group of its own."""
    split = module_layers(names)
    by_index = one_stack_per_index(split.values())

    def group(name: str) -> str:
        index, prefix, _ = split.get(name) or module_layers([name])[name]
        return name if index == "-" else index if by_index else prefix
    return group


def read_allocation_log(log: Path) -> List[dict]:
    """The entries of the allocation log ``log``, in file order; ValueError naming the file and
    line of one that is damaged (cut off, not JSON) or lacks an integer ``step``, a ``module``
    name or an integer ``new_rank``."""
    entries = []
    for number, line in enumerate(Path(log).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as err:  # JSONDecodeError
            raise ValueError(f"{log}:{number} is not a readable allocation entry ({err})") \
                from err
        if not (isinstance(entry, dict) and _is_int(entry.get("step"))
                and isinstance(entry.get("module"), str) and _is_int(entry.get("new_rank"))):
            raise ValueError(f"{log}:{number}: an allocation entry needs an integer 'step', a "
                             f"'module' name and an integer 'new_rank', got "
                             f"{line.strip()[:80]!r}")
        entries.append(entry)
    return entries


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ranks_over_time(run_dir: Path) -> Dict[int, Dict[str, int]]:
    """{step: {module: rank after that step's round}} at step 0, at every round's step and at
    the last training step (a ``--select-best`` run's selected step). ValueError naming the
    file when the log does not grow init_r into the run's rank_pattern (an AdaLoRA run, a log
    of another run)."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    pattern = metrics.get("rank_pattern")
    init_r = (metrics.get("method_settings") or {}).get("init_r")
    if not pattern or init_r is None:
        raise ValueError(f"{run_dir / METRICS_FILE}: no rank_pattern / method_settings.init_r "
                         "(not an IncreLoRA run)")
    ranks = {name: int(init_r) for name in pattern}
    out = {0: dict(ranks)}
    log = run_dir / ALLOCATION_LOG_FILE
    events = read_allocation_log(log) if log.exists() else []
    for event in sorted(events, key=lambda e: e["step"]):
        if event["module"] not in ranks:
            raise ValueError(f"{log}: module {event['module']!r} is not in the run's "
                             "rank_pattern")
        ranks[event["module"]] = event["new_rank"]
        out[event["step"]] = dict(ranks)
    differ = [name for name in ranks if ranks[name] != pattern[name]]
    if differ:
        raise ValueError(f"{run_dir / METRICS_FILE}: its rank_pattern is not what "
                         f"{ALLOCATION_LOG_FILE} grows from init_r {init_r} ({differ[0]}: "
                         f"{pattern[differ[0]]}, the log gives {ranks[differ[0]]}); not an "
                         f"IncreLoRA run (method {metrics.get('method')!r}), or another run's log")
    # the pattern holds to the end of training, or to the step --select-best took the adapter
    # at (its log ends there)
    end = metrics.get("steps") if metrics.get("selected_step") is None \
        else metrics["selected_step"]
    if isinstance(end, int) and end > max(out):
        out[end] = dict(ranks)
    return out


def allocation_by_group(run_dirs: Iterable[Path], group: Callable[[str], str] = module_type
                        ) -> Dict[str, Dict[int, float]]:
    """{group: {step: mean rank}} over the modules of each group and over the runs, at every
    step where one of the runs has a round (or ends): a run without a round there counts with
    the ranks it holds then (its last round before it), so a seed that needs one round more
    than the others (a module at r_max takes no rank) does not stand for all of them there.
    Groups in `visualize.natural_key` order (layer 2 before layer 10)."""
    return _mean_by_group([ranks_over_time(run_dir) for run_dir in run_dirs], group)


def _mean_by_group(replays: List[Dict[int, Dict[str, int]]], group: Callable[[str], str]
                   ) -> Dict[str, Dict[int, float]]:
    """`allocation_by_group` of runs already replayed by `ranks_over_time`."""
    every_step = sorted({step for replay in replays for step in replay})
    sums: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    for replay in replays:
        ranks = replay[0]
        for step in every_step:
            ranks = replay.get(step, ranks)
            per_group: Dict[str, List[int]] = defaultdict(list)
            for name, rank in ranks.items():
                per_group[group(name)].append(rank)
            for name, values in per_group.items():
                sums[name][step].append(sum(values) / len(values))
    return {g: {s: sum(v) / len(v) for s, v in sorted(sums[g].items())}
            for g in sorted(sums, key=natural_key)}


def plot_allocation(by_task: Dict[str, List[Path]], path: Path, title: str = "",
                    overwrite: bool = False) -> None:
    """A PNG: per task (rows), the mean rank per module type and per layer (columns) against
    the training step, averaged over the given runs (matplotlib, the ``finetune`` extra).
    Written whole or not at all (`outputs.write_figure`), its folders made; a device such as
    ``/dev/null`` is written to.

    Raises:
        FileExistsError: a file is at ``path`` and ``overwrite`` is False.
    """
    path = Path(path).expanduser()
    if not overwrite and path.is_file():
        raise FileExistsError(f"plot_allocation: {path} already exists; choose another path, "
                              "or pass overwrite=True to replace it")
    from matplotlib.figure import Figure

    tasks = sorted(t for t, runs in by_task.items() if runs)
    if not tasks:
        raise ValueError("no runs to plot the allocation of")
    fig = Figure(figsize=(13, 3.4 * len(tasks)))
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    for row, task in zip(axes, tasks):
        replays = [ranks_over_time(run) for run in by_task[task]]  # each run read once
        names = {name for replay in replays for name in replay[0]}
        for ax, (group, label) in zip(row, ((type_group(names), "module type"),
                                            (layer_group(names), "layer"))):
            curves = _mean_by_group(replays, group)
            for colour, (name, curve) in zip(distinct_colours(len(curves)), curves.items()):
                steps = sorted(curve)
                ax.step(steps, [curve[s] for s in steps], where="post", label=name,
                        color=colour)
            ax.set(title=f"{task}: mean rank per {label} ({len(by_task[task])} runs)",
                   xlabel="training step", ylabel="mean rank")
            # beside the panel: inside it, the group that grew most ran behind it
            ax.legend(fontsize="x-small", ncol=1 + (len(curves) > 12), loc="upper left",
                      bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    write_figure(fig, path, dpi=110)
