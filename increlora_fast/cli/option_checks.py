"""Argument checks shared by the subcommands: each raises ValueError with one line naming the
option and what is allowed, before any slow work starts."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence


def check_device(text: Optional[str], option: str = "--device", auto: bool = False) -> None:
    """``text`` must be cpu, cuda or cuda:N (and auto when ``auto``); None passes (the
    command's default)."""
    if text is None:
        return
    value = text.strip().lower()
    forms = (("auto",) if auto else ()) + ("cpu", "cuda")
    if value in forms or (value.startswith("cuda:") and value[5:].isdigit()):
        return
    raise ValueError(f"{option} {text!r} is invalid: use {', '.join(forms)} or cuda:N (N a GPU "
                     "index, e.g. cuda:0)")


def check_device_index(device, option: str = "--device") -> None:
    """A ``cuda:N`` ``device`` (a torch.device) names a GPU this machine has."""
    import torch

    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(f"{option} {device} is invalid: this machine has {count} GPU"
                             f"{'' if count == 1 else 's'}; use cuda:0 to cuda:{count - 1}")


def check_names(option: str, given: Optional[Iterable[str]], known: Sequence[str]) -> None:
    """Every name in ``given`` (None: the default, passes) must be one of ``known``, each
    once."""
    names = list(given or [])
    unknown: List[str] = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{option} {','.join(unknown)} is invalid: use a comma-separated "
                         f"subset of {','.join(known)}")
    repeated = [name for i, name in enumerate(names) if name in names[:i]]
    if repeated:
        raise ValueError(f"{option} names {repeated[0]} twice: give each once")


def check_rank_budget(target_rank: int, r_max: int, init_r: int) -> None:
    """IncreLoRA's ``--init-r`` must be at most ``--r-max``, ``--target-rank`` between them, and
    ``--r-max`` must leave room for the slots added each round (`IncreLoRAConfig`'s
    ``incre_rank_num``, derived from ``--target-rank``); the message names the options in
    conflict."""
    from ..config import default_incre_rank_num

    if init_r > r_max:
        raise ValueError(f"--init-r {init_r} is invalid: use at most --r-max ({r_max}), the slot "
                         "capacity of every module")
    if target_rank > r_max:
        raise ValueError(f"--target-rank {target_rank} is invalid: use at most --r-max ({r_max}), "
                         f"the slot capacity of every module (or raise --r-max to at least "
                         f"{target_rank})")
    if target_rank < init_r:
        raise ValueError(f"--target-rank {target_rank} is invalid: use at least --init-r "
                         f"({init_r}), the rank every module starts at")
    added = default_incre_rank_num(target_rank)
    if r_max < init_r + added:
        raise ValueError(f"--r-max {r_max} is invalid: use at least --init-r + {added} = "
                         f"{init_r + added}, room for the {added} slot(s) IncreLoRA adds to a "
                         f"module per round at --target-rank {target_rank}")


def check_output_path(path: Optional[str], option: str, folder: bool = False) -> None:
    """``path`` (None or empty: nothing is written) can be created or replaced later, after the
    slow work: it is not a folder (a file, with ``folder``), no file stands where a folder
    above it must be, and the nearest existing folder above it is writable."""
    if not path:
        return
    target = Path(path).expanduser()
    if folder and target.exists() and not target.is_dir():
        raise ValueError(f"{option} {path} is a file; give a folder")
    if not folder and target.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file path")
    for above in ([target] if folder else []) + list(target.absolute().parents):
        if above.exists():
            if not above.is_dir():
                raise ValueError(f"{option} {path} cannot be written: {above} is a file")
            if not os.access(above, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {path} cannot be written: {above} is not writable")
            break
    if not folder and target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{option} {path} cannot be written: it is read-only")


def check_replaceable_json(path: Optional[str], option: str, ours: Callable[[list], bool],
                           what: str) -> None:
    """``path`` (None: nothing is written) may replace an earlier output of the command, a JSON
    list that ``ours`` accepts, never another file (a model's config, a checkpoint, notes):
    ValueError naming ``option``, before anything slow. A large file (16 MiB or more) is not
    read whole: no such output is that big."""
    target = Path(path).expanduser() if path else None
    if target is None or not target.is_file():
        return
    try:
        data = json.loads(target.read_text()) if target.stat().st_size < 1 << 24 else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not (isinstance(data, list) and ours(data)):
        raise ValueError(f"{option} {path} exists and is not {what} this command wrote; give a "
                         "new path (or delete the file)")
