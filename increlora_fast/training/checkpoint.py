"""Checkpoints of the plain loop: everything needed to continue a run exactly, verified on load.

A checkpoint folder holds ``settings.json`` (the resolved `RunSettings`), the method's weights
(IncreLoRA: ``save_adapter(training_state=True)``; peft and full: the trainable tensors) and
``trainer_state.pt`` (step, losses, optimizer, method state such as the controller, RNG states,
and the model's pooling: ``settings.json`` holds ``--pooling`` as given, and ``auto`` is read
again from the model folder on resume, so a folder whose pooling changed is refused).

``trainer_state.pt`` is an envelope: the pickled state as bytes, its sha256, and the sha256 of
every other file of the folder. Loading checks all of them before anything is restored, so a
truncated, corrupted or missing part is a ValueError naming the file, never a silently wrong run.
The folder is written as ``<name>.tmp`` and renamed over the old one only when complete; a
failed write (a full disk) removes the ``.tmp`` folder and says why.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from ..data.files import file_sha256
from ..optimizer import IncreLoRAAdamW
from ..files import atomic_write_bytes
from .loop import LoopState
from .methods import MethodRun
from .outputs import CHECKPOINT_PREFIX, describe_os_error
from ..pooling import model_pooling
from .settings import RunSettings

SETTINGS_FILE = "settings.json"
STATE_FILE = "trainer_state.pt"
STATE_FORMAT = "increlora_fast.trainer_state"
STATE_VERSION = 2
DELETING_SUFFIX = ".deleting"
# A checkpoint of the same name that a new one replaces is set aside as
# ``.checkpoint-<step>.replaced`` until the new one is in place; the next run into the folder
# puts it back if a kill came in between (`output_folder.recover_leftovers`).
REPLACED_SUFFIX = ".replaced"
# The name a run gives the checkpoint of a step (`finetune_run._Checkpointer`): its decimal
# digits without leading zeros.
CANONICAL_CHECKPOINT = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(0|[1-9][0-9]*)")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); nothing partial is left."""

    def __str__(self) -> str:
        return str(self.strerror)


def _rng_state() -> dict:
    """The RNG states a run draws from: torch's CPU generator, Python's, NumPy's and, once CUDA
    is in use, every GPU's (dropout on a GPU draws from the GPU's generator, not the CPU's)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") and torch.cuda.is_available():  # a CPU machine has no GPU draws to set
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(directory: Path, run: MethodRun, settings: RunSettings,
                    state: LoopState, scaler: Optional[torch.amp.GradScaler] = None) -> Path:
    """Write a checkpoint of ``run`` after ``state.step`` steps into ``directory``; the state's
    pending losses are read first (`LoopState.sync`, which raises FloatingPointError on a
    non-finite one). ``scaler``: the fp16 run's GradScaler, whose scale and growth count are
    saved too (a resume that started from the initial scale again would skip steps an
    uninterrupted run does not).

    Raises:
        CheckpointWriteError: the folder could not be written (the message says why, e.g. no
            space left); the previous checkpoint of that name, if any, is untouched.
    """
    state.sync(run.name)
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        method_state = run.save_state(tmp)
        atomic_write_bytes(tmp / SETTINGS_FILE,
                           json.dumps(settings.to_dict(), indent=2, sort_keys=True).encode())
        payload = _torch_bytes({"step": state.step, "losses": list(state.losses),
                                "train_seconds": state.train_seconds, "method": run.name,
                                "optimizer": run.optimizer.state_dict(),
                                "method_state": method_state, "rng": _rng_state(),
                                "best": state.best, "pooling": model_pooling(run.model),
                                "label_names": _label_names(run.model),
                                "save_steps": state.save_steps,
                                "grad_scaler": scaler.state_dict() if scaler is not None
                                else None})
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        envelope = {"format": STATE_FORMAT, "version": STATE_VERSION,
                    "sha256": hashlib.sha256(payload).hexdigest(), "files": files,
                    "payload": payload}
        atomic_write_bytes(tmp / STATE_FILE, _torch_bytes(envelope))
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(err.errno, f"cannot write checkpoint {directory}: "
                                              f"{describe_os_error(err)}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The old checkpoint of this name (the same step saved again) is set aside, whole, until the
    # new one is in place: a kill between the two renames leaves it for the next run to restore.
    aside = directory.with_name(f".{directory.name}{REPLACED_SUFFIX}")
    if directory.is_dir():
        if aside.exists():  # an earlier one's leftover, while this name holds a checkpoint
            shutil.rmtree(aside)
        os.replace(directory, aside)
    os.replace(tmp, directory)
    shutil.rmtree(aside, ignore_errors=True)
    return directory


def remove_checkpoint(directory: Path) -> None:
    """Delete a checkpoint folder (if present) so that an interruption never leaves a half
    ``checkpoint-<step>``: it is renamed to ``.checkpoint-<step>.deleting`` first, which the
    next run into the folder finishes deleting (`output_folder.recover_leftovers`)."""
    if not directory.is_dir():
        return
    doomed = directory.with_name(f".{directory.name}{DELETING_SUFFIX}")
    os.replace(directory, doomed)
    shutil.rmtree(doomed)


def _verified_envelope(directory: Path) -> Dict:
    """The checksummed envelope of ``directory/trainer_state.pt``, with every file it lists
    verified; ValueError naming the file otherwise."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {directory} has no {STATE_FILE}")
    try:
        envelope = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(f"{path} is not readable (truncated or corrupted, or written by an "
                         f"older increlora-fast without checksums): {type(err).__name__}") \
            from err
    if not isinstance(envelope, dict) or envelope.get("format") != STATE_FORMAT or \
            not isinstance(envelope.get("payload"), bytes):
        raise ValueError(f"{path} is not an increlora-fast trainer state with checksums")
    if envelope.get("version") != STATE_VERSION:
        raise ValueError(f"{path} is a trainer state of version {envelope.get('version')}, and "
                         f"this increlora-fast reads version {STATE_VERSION} only; resume it "
                         "with the increlora-fast that wrote it")
    if hashlib.sha256(envelope["payload"]).hexdigest() != envelope.get("sha256"):
        raise ValueError(f"{path} is corrupted: its contents do not match the checksum saved "
                         "with them")
    for name, digest in envelope.get("files", {}).items():
        part = directory / name
        if not part.is_file():
            raise ValueError(f"checkpoint {directory} is missing {name}")
        if file_sha256(part) != digest:
            raise ValueError(f"{part} is corrupted: it does not match the checksum in "
                             f"{STATE_FILE}")
    return envelope


def checkpoints_by_step(folder: Path) -> Dict[int, Path]:
    """The ``checkpoint-<step>`` folders in ``folder`` that hold a checkpoint's files, by step
    (none when ``folder`` is no folder). Only the name a run writes counts (``str(step)``):
    ``checkpoint-07`` would be step 7 too, beside ``checkpoint-7``."""
    if not folder.is_dir():
        return {}
    found = ((CANONICAL_CHECKPOINT.fullmatch(p.name), p)
             for p in folder.glob(CHECKPOINT_PREFIX + "*"))
    return {int(m.group(1)): p for m, p in found if m and (p / SETTINGS_FILE).is_file()
            and (p / STATE_FILE).is_file()}


def newest_checkpoint(folder: Path) -> Optional[Path]:
    """The ``checkpoint-<step>`` folder in ``folder`` with the highest step that holds a
    checkpoint's files, None when there is none (or ``folder`` is no folder)."""
    found = checkpoints_by_step(folder)
    return found[max(found)] if found else None


def read_checkpoint_settings(directory: Path) -> RunSettings:
    """The resolved settings a checkpoint was written with (the checkpoint is verified).

    A checkpoint without ``pad_to`` was written before ``--pad-to`` existed, by a run that
    padded each batch to its longest input and stepped eagerly: it reads as ``longest``, so
    that a resume on CUDA does not resolve ``--cuda-graphs auto`` to graphs and pad to
    ``--max-seq-len`` from then on (`step_runner.resolve_cuda_graphs`)."""
    directory = Path(directory)
    path = directory / SETTINGS_FILE
    if not path.is_file() or not (directory / STATE_FILE).is_file():
        newest = newest_checkpoint(directory)
        raise FileNotFoundError(f"--resume {directory} is not a checkpoint written by "
                                f"`increlora-fast finetune` (no {SETTINGS_FILE} / {STATE_FILE})"
                                + (f"; it holds checkpoints: pass the newest, --resume {newest}"
                                   if newest else ""))
    _verified_envelope(directory)
    try:
        settings = RunSettings.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a valid settings file: {err}") from err
    if settings.pad_to is None:
        settings.pad_to = "longest"
    return settings


def _label_names(model: torch.nn.Module) -> Optional[list]:
    """The class names of ``model``'s head by label id (its config's ``id2label``), None for a
    model without them."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not isinstance(id2label, dict):
        return None
    return [id2label[i] for i in sorted(id2label)]


def load_checkpoint(directory: Path, run: MethodRun,
                    scaler: Optional[torch.amp.GradScaler] = None) -> LoopState:
    """Restore ``run`` (built from the checkpoint's settings), the RNG states and, for an fp16
    run, ``scaler`` (its GradScaler; checkpoints written before it was saved leave it as it
    is); returns the loop state to continue from. Every file is verified before anything is
    restored."""
    directory = Path(directory)
    envelope = _verified_envelope(directory)
    # On the CPU first: a state written on a GPU (the optimizer's moments are CUDA tensors) then
    # loads on any machine; load_state_dict puts each tensor on its parameter's device.
    blob = torch.load(io.BytesIO(envelope["payload"]), weights_only=False, map_location="cpu")
    if blob["method"] != run.name:
        raise ValueError(f"checkpoint {directory} is a {blob['method']} run, not {run.name}")
    pooling = model_pooling(run.model)
    if blob.get("pooling", pooling) != pooling:  # checkpoints before the field: not checked
        raise ValueError(f"checkpoint {directory} was trained with pooling {blob['pooling']}, "
                         f"but --pooling {run.settings.pooling} now gives {pooling} (the model "
                         "folder's 1_Pooling/config.json changed?); resume with the model files "
                         "it was trained on")
    saved_labels, labels = blob.get("label_names"), _label_names(run.model)
    if saved_labels is not None and saved_labels != labels:  # before the field: not checked
        raise ValueError(f"checkpoint {directory} was trained on the labels {saved_labels}, but "
                         f"the data now reads as the labels {labels} (label spellings read as "
                         "one label since 2026-12-07: true / True, composed / decomposed "
                         "accents); resume with the release that wrote it, or start a new run")
    saved_groups = len(blob["optimizer"]["param_groups"])
    if saved_groups != len(run.optimizer.param_groups) and \
            not isinstance(run.optimizer, IncreLoRAAdamW):  # which splits the old group itself
        raise ValueError(f"checkpoint {directory}: its optimizer state has {saved_groups} "
                         f"parameter groups, this {run.name} run's optimizer "
                         f"{len(run.optimizer.param_groups)} (biases and normalization weights "
                         "have had a group of their own without weight decay since "
                         "2026-12-06); resume it with the release that wrote it")
    run.load_state(directory, blob["method_state"])
    run.optimizer.load_state_dict(blob["optimizer"])
    _set_rng_state(blob["rng"])
    if scaler is not None and blob.get("grad_scaler"):
        scaler.load_state_dict(blob["grad_scaler"])
    return LoopState(step=blob["step"], losses=list(blob["losses"]),
                     train_seconds=blob["train_seconds"], best=blob.get("best"),
                     save_steps=blob.get("save_steps"))
