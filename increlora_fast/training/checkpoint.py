"""Checkpoints of the plain loop: everything needed to continue a run exactly.

A checkpoint folder holds ``settings.json`` (the resolved `RunSettings`), the method's weights
(IncreLoRA: ``save_adapter(training_state=True)``; peft and full: the trainable tensors) and
``trainer_state.pt`` (step, losses, optimizer, method state such as the controller, RNG states).
It is written into a temporary folder that replaces the old one only when complete.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
import numpy as np
import torch

from .loop import LoopState
from .methods import MethodRun
from .settings import RunSettings

SETTINGS_FILE = "settings.json"
STATE_FILE = "trainer_state.pt"


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(directory: Path, run: MethodRun, settings: RunSettings,
                    state: LoopState) -> Path:
    """Write a checkpoint of ``run`` after ``state.step`` steps into ``directory``."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    method_state = run.save_state(tmp)
    torch.save({"step": state.step, "losses": list(state.losses),
                "train_seconds": state.train_seconds, "method": run.name,
                "optimizer": run.optimizer.state_dict(), "method_state": method_state,
                "rng": _rng_state()}, tmp / STATE_FILE)
    (tmp / SETTINGS_FILE).write_text(json.dumps(settings.to_dict(), indent=2, sort_keys=True))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def read_checkpoint_settings(directory: Path) -> RunSettings:
    """The resolved settings a checkpoint was written with."""
    path = Path(directory) / SETTINGS_FILE
    if not path.is_file() or not (Path(directory) / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {directory} is not a checkpoint written by "
                                f"`increlora-fast finetune` (no {SETTINGS_FILE} / {STATE_FILE})")
    return RunSettings.from_dict(json.loads(path.read_text()))


def load_checkpoint(directory: Path, run: MethodRun) -> LoopState:
    """Restore ``run`` (built from the checkpoint's settings) and the RNG states; returns the
    loop state to continue from."""
    directory = Path(directory)
    blob = torch.load(directory / STATE_FILE, weights_only=False)
    if blob["method"] != run.name:
        raise ValueError(f"checkpoint {directory} is a {blob['method']} run, not {run.name}")
    run.load_state(directory, blob["method_state"])
    run.optimizer.load_state_dict(blob["optimizer"])
    _set_rng_state(blob["rng"])
    return LoopState(step=blob["step"], losses=list(blob["losses"]),
                     train_seconds=blob["train_seconds"])
