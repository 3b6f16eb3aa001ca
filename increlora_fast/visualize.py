"""Rank observability: a rank-pattern table, a layers x module-type heatmap PNG, and each
module's rank against the training step (PNG)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

from .files import write_output

# The rank heatmap's largest width and height (3,840 px at 120 dpi): at its usual cell size 28
# module types and 68 layers; beyond, its cells shrink, lose their numbers (the rank table has
# them) and share labels.
HEATMAP_MAX_INCHES = 32.0

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# an expert's number: the path part after one ending in "experts" (`expert_kind`)
_EXPERT_NUMBER = re.compile(r"(?<![^.])([^.]*experts)\.(?:expert_)?\d+(?![^.])")


class ModuleLayer(NamedTuple):
    """Where a module name's layer index is: the index (``"3"``, or ``"-"`` when the name has
    none), the name up to and including it (``encoder.block.3``; ``"-"`` without one) and the
    module type, what follows it (``layer.0.SelfAttention.q``; the whole name without one)."""

    index: str
    prefix: str
    kind: str


def module_layers(names: Iterable[str]) -> Dict[str, ModuleLayer]:
    """Each of ``names`` split at its layer index (`ModuleLayer`), read against all of them.

    The layer index is a name's first integer component whose place holds more than one number
    among ``names`` (a place: the text before the number), else its first integer component.
    So numbers below a layer stay in the module type (T5's
    ``encoder.block.3.layer.0.SelfAttention.q`` is block 3's ``layer.0.SelfAttention.q``, an
    expert's ``model.layers.2.mlp.experts.5.w1`` layer 2's ``mlp.experts.5.w1``), and a number
    every name shares is passed over (the ``0`` of a wrapped model's
    ``0.auto_model.encoder.layer.3.attention.self.query``), and so is an expert's number (one
    after a part ending in ``experts``), also where one layer's experts are all the names
    hold. The rank table, the heatmap and the allocation plots (`training.allocation_stats`)
    all read names so.
    """
    names = list(dict.fromkeys(names))
    found = {n: [m for m in _LAYER_INDEX.finditer(f".{n}.")
                 if not f".{n}."[:m.start()].endswith("experts")] for n in names}
    numbers: Dict[str, set] = {}
    for n, matches in found.items():
        for m in matches:
            numbers.setdefault(f".{n}."[:m.start()], set()).add(m.group(1))
    split = {}
    for n, matches in found.items():
        if not matches:
            split[n] = ModuleLayer("-", "-", n)
            continue
        wrapped = f".{n}."
        m = next((m for m in matches if len(numbers[wrapped[:m.start()]]) > 1), matches[0])
        split[n] = ModuleLayer(m.group(1), wrapped[1:m.end() - 1],
                               wrapped[m.end():].strip(".") or n)
    return split


def one_stack_per_index(layers: Iterable[ModuleLayer]) -> bool:
    """Whether each layer index among ``layers`` belongs to one stack (one name up to it), so
    that the index alone names a layer; False where one index is in several (an encoder's and
    a decoder's layer 0: ``model.encoder.layers.0``, ``model.decoder.layers.0``), which the
    name up to the index then tells apart."""
    prefixes: Dict[str, set] = {}
    for index, prefix, _ in layers:
        prefixes.setdefault(index, set()).add(prefix)
    return all(len(p) == 1 for p in prefixes.values())


def split_module_name(name: str) -> Tuple[str, str]:
    """('layer index', 'module type') of a module name alone, such as
    ``encoder.layer.3.attention.self.query``: its first integer component and what follows it
    (`module_layers` of the name alone); ``("-", name)`` for a name without one."""
    index, _, kind = module_layers([name])[name]
    return index, kind


def rank_table(rank_pattern: Dict[str, int]) -> str:
    """The rank pattern as a text table: one row per layer, one column per module type (a
    layer's experts share one, `expert_kind`, holding their mean rank, as a line under the
    table says)."""
    layers, kinds, grid, note = _grid(rank_pattern)
    width = max([len(k) for k in kinds] + [4])
    label = max([len(layer) for layer in layers] + [5])
    head = "layer".rjust(label) + " | " + " | ".join(k.rjust(width) for k in kinds)
    rows = [head, "-" * len(head)]
    for layer in layers:
        cells = [(_cell_text(grid[layer, k]) if (layer, k) in grid else "").rjust(width)
                 for k in kinds]
        rows.append(f"{layer:>{label}} | " + " | ".join(cells))
    if note:
        rows.append(note)
    n = len(rank_pattern)
    rows.append(f"total rank {sum(rank_pattern.values())} over {n} module{'' if n == 1 else 's'}")
    return "\n".join(rows)


def natural_key(label: str) -> tuple:
    """Sort key that orders the numbers in ``label`` by value: "layer.2" before "layer.10"."""
    return tuple((0, int(c), "") if c.isdigit() else (1, 0, c)
                 for c in re.split(r"(\d+)", label) if c)


def expert_kind(kind: str) -> str:
    """A module type with its expert number as ``*``: ``block_sparse_moe.experts.*.w1`` for
    ``block_sparse_moe.experts.5.w1`` (Mixtral's naming in transformers 4; Qwen2-MoE's, OLMoE's
    and DeepSeek's ``mlp.experts.5.gate_proj``; SwitchTransformers' and NLLB-MoE's
    ``mlp.experts.expert_5.wi``), so that the experts of a layer make one module type; other
    types are returned as they are."""
    return _EXPERT_NUMBER.sub(r"\1.*", kind)


def _grid(rank_pattern: Dict[str, int]
          ) -> Tuple[List[str], List[str], Dict[Tuple[str, str], Union[int, float]], str]:
    """(row labels, module types, {(row, type): rank}, note). A row is a layer index, or, where
    one index belongs to several layers (an encoder's and a decoder's layer 0: BART's
    model.encoder.layers.0 and model.decoder.layers.0, T5's encoder.block.0 and
    decoder.block.0), every row is the whole name up to its index, so that every module keeps
    a cell of its own; but the experts of a layer share one cell per weight (`expert_kind`),
    holding their mean rank, which the note ("" without experts) says."""
    split = module_layers(rank_pattern)
    by_index = one_stack_per_index(split.values())
    cells: Dict[Tuple[str, str], List[int]] = {}
    for n, (index, prefix, kind) in split.items():
        cells.setdefault((index if by_index else prefix, expert_kind(kind)), []).append(
            rank_pattern[n])
    grid = {cell: ranks[0] if len(ranks) == 1 else sum(ranks) / len(ranks)
            for cell, ranks in cells.items()}
    layers = sorted({l for l, _ in grid}, key=lambda s: (not s.isdigit(), natural_key(s)))
    kinds = list(dict.fromkeys(k for _, k in grid))
    experts = sorted({len(ranks) for (_, kind), ranks in cells.items() if "*" in kind})
    note = "" if not experts else (
        f"experts.*: mean rank over a layer's {experts[0]}"
        + ("" if len(experts) == 1 else f"-{experts[-1]}") + " experts")
    return layers, kinds, grid, note


def _cell_text(rank: Union[int, float]) -> str:
    """A cell's rank as written: a module's rank, or experts' mean to one decimal."""
    return str(rank) if isinstance(rank, int) else f"{round(rank, 1):g}"


def save_rank_heatmap(rank_pattern: Dict[str, int], path: Union[str, Path],
                      title: str = "IncreLoRA rank pattern", overwrite: bool = False) -> Path:
    """Write a PNG heatmap of active ranks (rows: layers, columns: module types, a layer's
    experts one cell per weight holding their mean rank, `expert_kind`), at most
    `HEATMAP_MAX_INCHES` wide and high; returns the path.

    Raises:
        FileExistsError: a file is at ``path`` and ``overwrite`` is False.
        ImportError: matplotlib (the ``finetune`` extra) is not installed.
    """
    if not rank_pattern:
        raise ValueError("save_rank_heatmap needs at least one module")
    path = Path(path).expanduser()  # "~/figs/x.png": no shell expanded it
    _refuse_existing(path, overwrite, "save_rank_heatmap")
    import numpy as np
    Figure = _figure_class("save_rank_heatmap")

    layers, kinds, grid, note = _grid(rank_pattern)
    data = np.full((len(layers), len(kinds)), np.nan)
    row, column = {l: i for i, l in enumerate(layers)}, {k: j for j, k in enumerate(kinds)}
    for (layer, kind), r in grid.items():
        data[row[layer], column[kind]] = r
    full = (1.2 + 1.1 * len(kinds), 1.0 + 0.45 * len(layers))
    width, height = (min(inches, HEATMAP_MAX_INCHES) for inches in full)
    cell_width, cell_height = (width - 1.2) / len(kinds), (height - 1.0) / len(layers)
    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    im = ax.imshow(data, cmap="viridis", aspect="auto")
    bright = np.nanmin(data) + 0.6 * (np.nanmax(data) - np.nanmin(data))
    if (width, height) == full:  # numbers in the cells at their usual size only
        for i in range(len(layers)):
            for j in range(len(kinds)):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, _cell_text(grid[layers[i], kinds[j]]), ha="center",
                            va="center", fontsize=8, color="k" if data[i, j] > bright else "w")
    # every k-th label where a label per cell would overlap the next
    every_x, every_y = math.ceil(0.2 / cell_width), math.ceil(0.15 / cell_height)
    ax.set_xticks(range(0, len(kinds), every_x), kinds[::every_x], rotation=35, ha="right",
                  fontsize=8)
    ax.set_yticks(range(0, len(layers), every_y), layers[::every_y], fontsize=8)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}\n{note}" if note else title)
    fig.colorbar(im, ax=ax, label="active rank")
    return _save(fig, path)


def rank_history(initial: Dict[str, int], allocation_log: Iterable[dict]
                 ) -> Dict[str, List[Tuple[int, int]]]:
    """(step, rank) points of every module: its rank at step 0, then each ``new_rank`` of the
    controller's allocation log (entries ``{"step", "module", "new_rank"}``), in step order."""
    history = {name: [(0, rank)] for name, rank in initial.items()}
    for entry in sorted(allocation_log, key=lambda e: e["step"]):
        name = entry["module"]
        if name not in history:
            raise ValueError(f"allocation log names module {name!r}, which is not among the "
                             f"{len(history)} modules of the initial rank pattern")
        history[name].append((int(entry["step"]), int(entry["new_rank"])))
    return history


def distinct_colours(n: int) -> list:
    """``n`` colours, no two alike: tab10's or tab20's, or ``n`` points along turbo beyond 20
    (matplotlib's default cycle repeats after 10: layers 0 and 10 of a 12-layer model, or the
    11th module type and the first, drew alike)."""
    import matplotlib
    if n <= 20:
        cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
        return [cmap(i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](i / (n - 1)) for i in range(n)]


# The most module types that `save_rank_over_time`'s legend names: beyond, the first
# LEGEND_TYPES - 1 keep theirs, and the others share one entry and a dotted grey.
LEGEND_TYPES = 20
_OTHER_TYPES = {"color": "0.6", "linestyle": ":"}


def save_rank_over_time(initial: Dict[str, int], allocation_log: Iterable[dict],
                        path: Union[str, Path], last_step: Optional[int] = None,
                        title: str = "IncreLoRA rank over training",
                        overwrite: bool = False) -> Path:
    """Write a PNG of each module's active rank against the optimizer step (one step line per
    module, coloured by module type (a layer's experts are one, `expert_kind`; at most
    `LEGEND_TYPES` entries), and the mean over modules in black); returns the path.

    Args:
        initial: {module: rank at step 0} (``init_r`` everywhere for IncreLoRA).
        allocation_log: the controller's ``allocation_log``.
        last_step: where the lines end (default: the last allocation step; without either,
            the figure marks the ranks at step 0 and says so in its title).
        overwrite: replace a file already at ``path``.

    Raises:
        FileExistsError: a file is at ``path`` and ``overwrite`` is False.
        ImportError: matplotlib (the ``finetune`` extra) is not installed.
    """
    path = Path(path).expanduser()  # "~/figs/x.png": no shell expanded it
    _refuse_existing(path, overwrite, "save_rank_over_time")
    Figure = _figure_class("save_rank_over_time")

    history = rank_history(initial, allocation_log)
    if not history:
        raise ValueError("save_rank_over_time needs at least one module")
    end = max([last_step or 0] + [s for points in history.values() for s, _ in points])
    split = module_layers(history)
    kinds = list(dict.fromkeys(expert_kind(split[n].kind) for n in history))
    named = kinds if len(kinds) <= LEGEND_TYPES else kinds[:LEGEND_TYPES - 1]
    colour = dict(zip(named, distinct_colours(len(named))))
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    for name, points in history.items():
        steps = [s for s, _ in points] + [end]
        ranks = [r for _, r in points] + [points[-1][1]]
        kind = expert_kind(split[name].kind)
        style = {"color": colour[kind]} if kind in colour else _OTHER_TYPES
        ax.step(steps, ranks, where="post", alpha=0.45, linewidth=1, **style)
    change_steps = sorted({s for points in history.values() for s, _ in points} | {end})
    mean = [sum(_rank_at(points, s) for points in history.values()) / len(history)
            for s in change_steps]
    # no step past 0 (no allocation round, no last_step): each line is a point, so mark them
    marker = {"marker": "o", "clip_on": False} if end == 0 else {}
    ax.step(change_steps, mean, where="post", color="k", linewidth=2, label="mean over modules",
            **marker)
    for kind, c in colour.items():
        ax.plot([], [], color=c, label=kind)
    if len(kinds) > len(named):
        ax.plot([], [], label=f"{len(kinds) - len(named)} other module types", **_OTHER_TYPES)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("active rank")
    if end == 0:
        ax.set_xlim(0, 1)
        title += "\nno allocation round and no last_step: the ranks at step 0 only"
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return _save(fig, path)


def _refuse_existing(path: Union[str, Path], overwrite: bool, caller: str) -> None:
    """FileExistsError when something is at ``path`` and ``overwrite`` is False: a saver never
    replaces a file it was not told to (a user's figure, an earlier run's PNG)."""
    if not overwrite and Path(path).exists():
        raise FileExistsError(f"{caller}: {path} already exists; choose another path, or pass "
                              "overwrite=True to replace it")


def _figure_class(caller: str) -> type:
    """matplotlib's ``Figure`` (no pyplot: the caller's backend stays as it is); without
    matplotlib, an ImportError naming ``caller`` and the extra that installs it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"{caller} needs matplotlib ({err}): pip install matplotlib, or "
                          "increlora_fast's \"finetune\" extra (pip install -e \".[finetune]\")"
                          ) from err
    return Figure


def _save(fig, path) -> Path:
    """Lay out and write a figure (creating the folder); returns the path. A file is replaced
    whole (`files.write_output`: a failed save leaves the earlier one); a device such as
    ``/dev/null`` is written to."""
    import io

    fig.tight_layout()
    path = Path(path)
    buffer = io.BytesIO()
    # the format the suffix names; PNG without one
    fig.savefig(buffer, dpi=120, format=path.suffix[1:] or "png")
    write_output(path, buffer.getvalue())
    return path


def _rank_at(points: List[Tuple[int, int]], step: int) -> int:
    """The rank a history holds at ``step`` (its last point at or before it)."""
    return [r for s, r in points if s <= step][-1]
