"""Hugging Face `Trainer` integration.

- `IncreLoRATrainer`: a `Trainer` that does everything with no manual calls: the per-slot AdamW
  (restart warmup), the orthogonal penalty added to the training loss, scores and allocation after
  gradient clipping, and the controller saved into / restored from every checkpoint (pushed
  checkpoints included: ``push_to_hub`` with ``hub_strategy`` ``checkpoint`` or
  ``all_checkpoints``).
- `IncreLoRACallback`: the same scores, allocation and checkpointing for a plain `Trainer`. A
  plain Trainer builds its own optimizer, so restart warmup is only active if you pass
  ``optimizers=increlora_optimizers(...)``; the orthogonal penalty's gradient is then added after
  clipping (the callback has no access to the loss). The callback warns about both.

Both write the adapter `load_adapter` reads beside the whole model the Trainer saves: into
every checkpoint, and (`IncreLoRATrainer` only: a callback sees no ``save_model`` call) into
the folder of ``trainer.save_model(folder)``; see `save_trainer_adapter`.

Both log through the Trainer's own ``log`` (so whatever ``report_to`` names receives it): the
total rank at every log, and at the first log after each allocation round (forced at that step)
every module's rank and importance score; see `IncreLoRACallback.install`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
import weakref
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import transformers.trainer
from transformers import Trainer, TrainerCallback
from transformers.utils import SAFE_WEIGHTS_NAME, WEIGHTS_NAME as MODEL_WEIGHTS_NAME

from ..controller import IncreLoRAController
from ..device_scalar import grad_scaler_scale, unscale_once
from ..layer import IncreLoRALinear
from ..model import frozen_adapters_message, get_config
from ..optimizer import IncreLoRAAdamW, create_optimizer, schedule_multiplier
from ..files import atomic_write_bytes
from ..persistence import (ADAPTER_FILES, CONFIG_NAME, SAVED_BY_KEY, WEIGHTS_NAME as ADAPTER_WEIGHTS,
                           save_adapter)
from ..precompile import precompile_kernels

CONTROLLER_FILE = "increlora_controller.pt"
LOG_PREFIX = "increlora/"


CONTROLLER_FORMAT = "increlora_fast.controller"


def save_controller(controller: IncreLoRAController, directory: str) -> None:
    """Write the controller state into ``directory`` atomically, with a sha256 of its bytes."""
    payload = _torch_bytes(controller.state_dict())
    envelope = {"format": CONTROLLER_FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": payload}
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(directory) / CONTROLLER_FILE, _torch_bytes(envelope))


def read_controller_state(directory: str) -> dict:
    """The controller state saved in ``directory``, verified against its checksum.

    Raises:
        FileNotFoundError: the checkpoint has no controller file.
        ValueError: the file is truncated, corrupted or not a controller state (names it).
    """
    path = os.path.join(directory, CONTROLLER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {directory} has no {CONTROLLER_FILE}: it was not "
                                "written by an IncreLoRA run, so allocation cannot resume")
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(f"{path} is not readable (truncated or corrupted?): "
                         f"{type(err).__name__}: {err}") from err
    if isinstance(blob, dict) and blob.get("format") == CONTROLLER_FORMAT:
        payload = blob.get("payload")
        if not isinstance(payload, bytes) or \
                hashlib.sha256(payload).hexdigest() != blob.get("sha256"):
            raise ValueError(f"{path} is corrupted: its contents do not match the checksum "
                             "saved with them")
        return torch.load(io.BytesIO(payload), weights_only=True)
    if isinstance(blob, dict) and "names" in blob:
        return blob  # written before controller files carried a checksum
    raise ValueError(f"{path} is not an IncreLoRA controller state")


def load_controller(controller: IncreLoRAController, directory: str) -> None:
    """Restore the controller state from ``directory``; a missing or damaged file is an error
    and leaves the controller unchanged."""
    controller.load_state_dict(read_controller_state(directory))


# `save_adapter`'s ``saved_by`` in the adapters written beside a whole model the Trainer saves
SAVED_BY_TRAINER = "transformers.Trainer"


def check_adapter_replaceable(directory: str) -> None:
    """FileExistsError, one line, when ``directory`` holds an adapter that no Trainer save of
    this integration wrote (the user's `save_adapter`, a peft adapter): a Trainer's save never
    replaces it. One that such a save wrote (a second ``save_model`` into the folder, a rerun's
    checkpoint of the same step) is replaced, as the whole model beside it is."""
    folder = Path(directory)
    present = [name for name in ADAPTER_FILES if (folder / name).exists()]
    if not present:
        return
    try:
        summary = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict) or summary.get(SAVED_BY_KEY) != SAVED_BY_TRAINER:
        raise FileExistsError(f"{folder} holds an adapter the Trainer did not write "
                              f"({', '.join(present)}: save_adapter's or peft's), which a "
                              "Trainer save or checkpoint push into it would replace; save "
                              "into another folder (or train with another output_dir)")


def save_trainer_adapter(model: torch.nn.Module, directory: str) -> None:
    """The adapter of ``model`` (`save_adapter`, what inference needs) into ``directory``, where
    the Trainer saves the whole model, so that `load_adapter` reads the folder; an adapter there
    is replaced only when a Trainer save wrote it (`check_adapter_replaceable`)."""
    check_adapter_replaceable(directory)
    save_adapter(model, directory, overwrite=True, saved_by=SAVED_BY_TRAINER)


def check_model_checkpoint(model: torch.nn.Module, directory: str) -> None:
    """Check, without loading them, that the adapter tensors of the model weights in
    ``directory`` (``model.safetensors``, sharded or not) are exactly the model's, with equal
    shapes; ValueError naming the first difference otherwise. Other weight formats are not
    checked here."""
    from safetensors import safe_open

    files = _weight_files(directory)
    if not files:
        return
    saved: Dict[str, tuple] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    saved[key] = tuple(f.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{file} is not a readable safetensors file: {err}") from err
    ours = {k: tuple(v.shape) for k, v in _adapter_state(model).items()}
    theirs = {k: v for k, v in saved.items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}
    missing, unknown = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or unknown:
        raise ValueError(f"checkpoint {directory} holds adapters for other modules than this "
                         f"model (model only: {missing[:3]}; checkpoint only: {unknown[:3]}); "
                         "nothing was loaded")
    for key, shape in ours.items():
        if theirs[key] != shape:
            raise ValueError(f"checkpoint {directory}: {key} has shape {theirs[key]}, the model "
                             f"needs {shape}; nothing was loaded")


ADAPTER_KEYS = ("lora_A", "lora_B", "lora_lambda", "slot_state", "slot_alloc_step",
                "slot_active_step")


def _weight_files(directory: str) -> list:
    """The ``model.safetensors`` files of the checkpoint in ``directory`` (sharded or not);
    empty when its weights are in another format or missing."""
    root = Path(directory)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    return []


def _adapter_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter tensors (slots and their states) of ``model``'s state dict, by key."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}


def check_model_holds_checkpoint(model: torch.nn.Module, directory: str, advice: str) -> None:
    """ValueError (one line, ending in ``advice``) when the adapter tensors of the checkpoint in
    ``directory`` differ from ``model``'s: the checkpoint the Trainer resumed from (and loaded
    into the model) is another one, so the controller state saved in ``directory`` belongs to
    another run. Checkpoints in another format than safetensors are not checked."""
    from safetensors import safe_open

    ours = _adapter_state(model)
    for file in _weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in ours and not torch.equal(f.get_tensor(key), ours[key].cpu()):
                    raise ValueError(f"IncreLoRA: checkpoint {directory} is not the one the "
                                     f"Trainer resumed from ({key} differs from the weights "
                                     f"it loaded), so its controller state is another run's; "
                                     f"{advice}")


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class ConstantSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The Trainer's scheduler over an `IncreLoRAAdamW`, whose schedules live inside it: a
    constant factor of 1 on every parameter group. A state saved while the optimizer had other
    groups (two, ``"increlora"`` and ``"other"``, until biases and normalization weights got
    ``"other_no_decay"`` on 2026-12-06) loads as this optimizer's: the optimizer's state, loaded
    first, has been split already (`IncreLoRAAdamW.load_state_dict`), and torch's LambdaLR zips
    its base rates with the groups strictly (the first step after the resume failed)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer, lambda _: 1.0)
        # a factor of 1: no warning from IncreLoRAAdamW (inside accelerate's wrapper, if any)
        getattr(optimizer, "optimizer", optimizer).outer_schedule_ok = True

    def load_state_dict(self, state_dict: dict) -> None:
        groups = self.optimizer.param_groups
        if len(state_dict.get("base_lrs", groups)) != len(groups):
            state_dict = dict(state_dict, lr_lambdas=[None] * len(groups),
                              base_lrs=[g.get("initial_lr", g["lr"]) for g in groups],
                              _last_lr=[g["lr"] for g in groups])
        super().load_state_dict(state_dict)


def increlora_optimizers(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                         betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                         ) -> Tuple[IncreLoRAAdamW, torch.optim.lr_scheduler.LambdaLR]:
    """(optimizer, scheduler) for ``Trainer(optimizers=...)``: the per-slot AdamW and a constant
    scheduler (the schedule lives inside the optimizer).

    As for any optimizer handed to a `Trainer`, its ``TrainingArguments`` (``learning_rate``,
    ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``) do not reach it: pass
    them here (`IncreLoRATrainer` reads them itself). Weight decay applies to the adapters and
    the other trainable parameters but their biases and normalization weights, as in the
    Trainer's own AdamW (`create_optimizer`). With ``total_step`` None in the model's config,
    `IncreLoRACallback` sets it to the Trainer's ``max_steps`` at train begin (the Trainer's
    linear decay, as `IncreLoRATrainer` has it); before, every rate stays constant after
    warmup."""
    optimizer = create_optimizer(model, get_config(model), lr=lr, weight_decay=weight_decay,
                                 betas=betas, eps=eps)
    return optimizer, ConstantSchedule(optimizer)


# A parameter group key: the group's ``total_step`` is the Trainer's ``max_steps``.
FOLLOWS_MAX_STEPS = "total_step_is_max_steps"


def follow_max_steps(optimizer: IncreLoRAAdamW, max_steps: int) -> None:
    """End the schedules of ``optimizer``'s groups at the Trainer's ``max_steps``: the groups
    without a ``total_step`` of their own, and those this function set before (marked in the
    group, so the optimizer state saved in a checkpoint keeps the mark). A resume with another
    ``max_steps`` then decays to the new last step, as the Trainer's own scheduler does."""
    for group in optimizer.param_groups:
        if group["total_step"] is None or group.get(FOLLOWS_MAX_STEPS):
            group["total_step"] = max_steps
            group[FOLLOWS_MAX_STEPS] = True


def scheduled_learning_rate(optimizer: IncreLoRAAdamW) -> float:
    """The rate of ``optimizer``'s last step (read after ``optimizer.step()``) on the schedule
    begun at step 0: the trained head's, and the first slots' (a slot added later runs its own
    restart of it). What the Trainer logs as ``learning_rate``: its scheduler over the
    optimizer is constant (`ConstantSchedule`), the schedules live inside it."""
    group = optimizer.param_groups[0]
    taken = max(optimizer.global_step - 1, 0)  # `step` has moved the clock past it already
    return group["lr"] * float(schedule_multiplier(taken, 0, group["warmup_steps"],
                                                   group["total_step"]))


def _shards_the_model(trainer: Optional[Trainer], args=None) -> bool:
    """Whether FSDP or DeepSpeed trains the model, named in ``args`` or set up from
    accelerate's config (as ``trainer`` says): the model's tensors are this process's shards,
    and the Trainer saves and loads through their own code."""
    return bool(getattr(args, "fsdp", None) or getattr(args, "deepspeed", None)
                or getattr(trainer, "is_fsdp_enabled", False)
                or getattr(trainer, "is_deepspeed_enabled", False))


def _sharded_beside_adapter(trainer: Trainer, directory: str) -> bool:
    """Whether ``directory`` holds a sharded whole model (no single weights file) beside the
    adapter a Trainer save wrote (`save_trainer_adapter`), outside DeepSpeed and FSDP, whose
    own loaders the Trainer uses."""
    folder = Path(directory)
    return ((folder / ADAPTER_WEIGHTS).is_file()
            and not any((folder / n).is_file() for n in (SAFE_WEIGHTS_NAME, MODEL_WEIGHTS_NAME))
            and not _shards_the_model(trainer))


def load_best_model_with_controller(trainer: Trainer, controller: IncreLoRAController,
                                    load_best: Callable[[], None]) -> None:
    """``load_best_model_at_end``: ``load_best()`` (the Trainer's own loading of the best
    checkpoint's weights, slot states included; a sharded one beside the adapter is read here,
    `_sharded_beside_adapter`) and the controller state saved with them, so
    that the controller describes the model it now holds (its rounds, budget and scores). A
    checkpoint without a readable controller state leaves the controller as it is, with a
    warning."""
    best = trainer.state.best_model_checkpoint
    try:
        state = read_controller_state(best)
        controller.check_state_dict(state)
    except (FileNotFoundError, ValueError) as err:
        warnings.warn(f"IncreLoRA: the best checkpoint's controller state was not loaded ({err}); "
                      "the controller keeps the last step's state", UserWarning)
        state = None
    if _sharded_beside_adapter(trainer, best):
        # the Trainer's loader takes the adapter file for a single-file model and then fails
        # to open pytorch_model.bin: the shards are read as its sharded branch reads them
        trainer._issue_warnings_after_load(
            transformers.trainer.load_sharded_checkpoint(trainer.model, best, strict=False))
    else:
        load_best()
    if state is not None:
        controller.load_state_dict(state)


class IncreLoRACallback(TrainerCallback):
    """Scores, allocation, rank logging and controller checkpoints for a `Trainer`.

    Under a plain Trainer use ``IncreLoRACallback(controller).install(trainer)`` so that its log
    entries reach the reporting callbacks too (`install`).

    Args:
        controller: the run's controller.
        apply_regularization: add the orthogonal penalty's gradient before each optimizer step
            (needed under a plain Trainer; `IncreLoRATrainer` adds the penalty to the loss and
            turns this off).
        loss_scale: the factor on the loss (fp16); default: the scale of the GradScaler the
            Trainer's optimizer holds (accelerate's ``AcceleratedOptimizer.scaler``), 1 without
            one.

    Under fp16 with a torch GradScaler, each step's gradients are unscaled before the penalty
    and the scores (unless clipping did it already; the scaler's step then does not do it
    again), and a step the scaler skips for an overflow is skipped by the controller too.

    Under a plain Trainer each checkpoint also gets the adapter `load_adapter` reads
    (`on_save`); ``trainer.save_model(folder)`` calls no callback, so after training use
    ``save_adapter(trainer.model, folder)`` (or `IncreLoRATrainer`, whose ``save_model`` writes
    it).
    """

    def __init__(self, controller: IncreLoRAController, apply_regularization: bool = True,
                 loss_scale: Optional[Callable[[], Union[float, torch.Tensor]]] = None) -> None:
        if not isinstance(controller, IncreLoRAController):
            raise TypeError(f"IncreLoRACallback controller={type(controller).__name__} is "
                            "invalid: pass an IncreLoRAController, built over the Trainer's "
                            "model (IncreLoRAController(model))")
        self.controller = controller
        self.apply_regularization = apply_regularization
        self.loss_scale = loss_scale
        self.restored = False
        self.logged_rounds = 0  # allocation-log entries already reported
        self._trainer: Optional[weakref.ReferenceType] = None  # set by `install`

    def __getstate__(self) -> dict:
        """Picklable (Ray Tune's hyperparameter search pickles the Trainer with its callbacks):
        without the weak reference to the Trainer, so an unpickled callback saves under
        ``args.output_dir`` until it is installed again (`checkpoint_folder`)."""
        return dict(self.__dict__, _trainer=None)

    def install(self, trainer: Trainer) -> "IncreLoRACallback":
        """Add this callback to ``trainer`` ahead of the reporting callbacks (TensorBoard, W&B,
        the printer...), so that the entries it adds to each log reach them; a callback passed
        in ``callbacks=[...]`` or through ``add_callback`` comes after them and can only add to
        ``trainer.state.log_history``.

        On a plain Trainer it also reads the controller from the checkpoint the Trainer resumes
        from (`restore_with_checkpoints`), wherever that folder is; and the controller is saved
        into the checkpoint folder the Trainer uses, a trial's own during a
        ``hyperparameter_search`` (`checkpoint_folder`). Returns the callback."""
        self._trainer = weakref.ref(trainer)
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        if not isinstance(trainer, IncreLoRATrainer):  # which restores the controller itself
            self.restore_with_checkpoints(trainer)
        return self

    def restore_with_checkpoints(self, trainer: Trainer) -> None:
        """Make ``trainer`` restore the controller from the very folder it resumes from
        (``train(resume_from_checkpoint=<folder>)``), checked before any weight is loaded, as
        are the checkpoint's adapter tensors (`check_model_checkpoint`).
        Without this, `on_train_begin` can only look in ``<output_dir>/checkpoint-<step>``,
        which is another folder for a checkpoint pulled from the hub or moved. With
        ``load_best_model_at_end`` it also restores the controller saved with the best model
        (`load_best_model_with_controller`)."""
        load = trainer._load_from_checkpoint
        if getattr(load, "restores_increlora_controller", False):
            return

        def load_with_controller(resume_from_checkpoint, model=None):
            # checked before a weight is copied, as `IncreLoRATrainer._load_from_checkpoint`
            state = read_controller_state(resume_from_checkpoint)
            self.controller.check_state_dict(state)
            check_model_checkpoint(model or trainer.model, resume_from_checkpoint)
            load(resume_from_checkpoint, model=model)
            self.controller.load_state_dict(state)
            self.restored = True

        load_with_controller.restores_increlora_controller = True
        trainer._load_from_checkpoint = load_with_controller
        load_best = trainer._load_best_model

        def load_best_with_controller():
            load_best_model_with_controller(trainer, self.controller, load_best)

        trainer._load_best_model = load_best_with_controller

    def checkpoint_folder(self, args, state) -> str:
        """The folder of the checkpoint the Trainer saves at ``state.global_step``:
        ``<run folder>/checkpoint-<step>``, the run folder being ``args.output_dir`` or, for
        the Trainer this callback is installed on (`install`), the one it saves into
        (``Trainer._get_output_dir``: ``<output_dir>/run-<trial>`` in a
        ``hyperparameter_search`` trial)."""
        trainer = self._trainer() if self._trainer is not None else None
        root = args.output_dir
        if trainer is not None and hasattr(trainer, "_get_output_dir"):
            root = trainer._get_output_dir(getattr(trainer, "_trial", None))
        return os.path.join(root, f"checkpoint-{state.global_step}")

    def log_entries(self) -> Dict[str, float]:
        """``increlora/total_rank``; after an allocation round not yet reported also
        ``increlora/rank/<module>`` and ``increlora/importance/<module>`` of every module."""
        ctrl = self.controller
        entries: Dict[str, float] = {LOG_PREFIX + "total_rank": ctrl.current_total_rank()}
        if len(ctrl.allocation_log) > self.logged_rounds:
            self.logged_rounds = len(ctrl.allocation_log)
            for name, rank in ctrl.rank_pattern().items():
                entries[f"{LOG_PREFIX}rank/{name}"] = rank
            for name, score in zip(ctrl.names, ctrl.importance().tolist()):
                entries[f"{LOG_PREFIX}importance/{name}"] = score
        return entries

    def on_step_end(self, args, state, control, **kwargs):
        if len(self.controller.allocation_log) > self.logged_rounds:
            control.should_log = True  # report the round at the step it happened

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None:
            return
        entries = self.log_entries()
        inner = getattr(optimizer, "optimizer", optimizer)
        if "learning_rate" in logs and isinstance(inner, IncreLoRAAdamW) and \
                getattr(inner, "outer_schedule_ok", False):
            # a plain Trainer logs its scheduler's rate: under `increlora_optimizers` the
            # constant base rate of `ConstantSchedule` (IncreLoRATrainer's `_get_learning_rate`
            # gives this one). Another scheduler's rate is its own and left as it is.
            entries["learning_rate"] = scheduled_learning_rate(inner)
        logs.update(entries)
        # Trainer.log appended {**logs, "step"} to the history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        if model is not None and not any(m is self.controller.layers[0] for m in model.modules()):
            # (a Trainer with model_init makes a new model at train(): nothing would allocate)
            raise ValueError("IncreLoRACallback: the controller was built over another model "
                             "than the one the Trainer trains (model_init makes a new model at "
                             "train()); build the controller over trainer.model, or use "
                             "IncreLoRATrainer, which makes one over each model model_init makes")
        _refuse_peft_over_increlora("IncreLoRACallback", model)  # (SFTTrainer's peft_config)
        self.check_output_dir_adapter(args)
        if model is not None:  # the Triton kernels, built several at a time (on CUDA)
            precompile_kernels(model, torch.bfloat16 if args.bf16 else
                               torch.float16 if args.fp16 else None, optimizer=optimizer,
                               penalty=self.controller.penalty)
        if state.global_step > 0 and not self.restored:
            self.load_from_output_dir(args, state, model)
        self.refuse_a_spent_controller(state.global_step)
        self.controller.track_step(state.global_step)  # off since a train() before this one
        if state.global_step == 0 and not self.restored:
            self.restart_grown_slots()
        if state.global_step > 0:  # (each round of a checkpoint was logged before its save)
            self.logged_rounds = len(self.controller.allocation_log)
        if state.max_steps > 0:
            self.warn_budget_out_of_reach(state.global_step, state.max_steps)
        inner = getattr(optimizer, "optimizer", optimizer)
        if isinstance(inner, IncreLoRAAdamW) and state.max_steps > 0 and \
                self.controller.config.total_step is None:
            # the Trainer's linear decay to its last step, as IncreLoRATrainer sets it; again
            # after a resume, whose optimizer state holds the last run's max_steps
            follow_max_steps(inner, state.max_steps)
        if isinstance(inner, IncreLoRAAdamW):
            self.warn_total_step_before_max_steps(state.max_steps)
        if optimizer is not None and not isinstance(inner, IncreLoRAAdamW):
            warnings.warn("IncreLoRACallback: the Trainer's optimizer is not IncreLoRAAdamW, so "
                          "new slots get no restart warmup; use IncreLoRATrainer or "
                          "optimizers=increlora_optimizers(model, lr)", UserWarning)

    def load_from_output_dir(self, args, state, model: Optional[torch.nn.Module]) -> None:
        """Restore the controller for a resume at ``state.global_step`` that
        `restore_with_checkpoints` did not see (a callback passed in ``callbacks=[...]``): from
        ``args.resume_from_checkpoint`` or ``<output_dir>/checkpoint-<step>``, once the
        adapter tensors there are checked to be the ones the Trainer loaded (a folder of an
        earlier run into the same output_dir would give another run's controller)."""
        folder = args.resume_from_checkpoint or self.checkpoint_folder(args, state)
        advice = ("install the callback (IncreLoRACallback(controller).install(trainer)), "
                  "which reads the folder train(resume_from_checkpoint=...) names; a callback "
                  "in callbacks=[...] can only look in <output_dir>/checkpoint-<step>")
        if model is not None:
            check_model_holds_checkpoint(model, folder, advice)
        try:
            load_controller(self.controller, folder)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; {advice}") from err

    def refuse_a_spent_controller(self, global_step: int) -> None:
        """ValueError when the controller is past ``global_step``, the step the Trainer starts
        at: a second ``train()`` counts from 0 again, while the controller's rounds and the
        optimizer's per-slot schedules go on from the first one's last step (a step would
        fail, or the slots grown late would train at a rate of 0)."""
        next_step = self.controller.next_step
        if next_step is not None and next_step > global_step:
            raise ValueError(
                f"IncreLoRA: train() starts at step {global_step}, but the controller has "
                f"taken steps up to {next_step - 1} of an earlier train(), and its rounds and "
                "the per-slot learning-rate schedules count on from there: continue that run "
                "with train(resume_from_checkpoint=<its checkpoint>) (and a larger max_steps), "
                "or start a new run over a newly injected model with a new Trainer")

    def restart_grown_slots(self) -> None:
        """At the start of a new run (step 0, not resumed) over a model an earlier run grew:
        every slot's schedule starts at step 0 (`IncreLoRALinear.restart_schedules`), with a
        warning; a slot grown at step N would train at a rate of 0 until this run reached N."""
        last = max(int(torch.maximum(layer.slot_alloc_step, layer.slot_active_step).max())
                   for layer in self.controller.layers)
        if last <= 0:
            return
        for layer in self.controller.layers:
            layer.restart_schedules()
        warnings.warn(f"IncreLoRA: the model's slots were grown by an earlier run (up to its "
                      f"step {last}); this run counts its steps from 0, so every slot's "
                      "learning-rate schedule starts at step 0 again", UserWarning)

    def warn_budget_out_of_reach(self, start_step: int, end_step: int) -> None:
        """Warn (RuntimeWarning) when the allocation rounds among optimizer steps ``start_step ..
        end_step - 1`` cannot reach the rank budget (`IncreLoRAController.budget_out_of_reach`):
        the run would end below ``target_rank`` whatever the scores, saying nothing."""
        message = self.controller.budget_out_of_reach(start_step, end_step, "max_steps")
        if message:
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def warn_total_step_before_max_steps(self, max_steps: int) -> None:
        """Warn (RuntimeWarning) when ``IncreLoRAConfig.total_step`` ends the per-slot AdamW's
        schedules before the Trainer's ``max_steps``: from it on every learning rate is 0, so
        the last steps train nothing and slots grown in them never train."""
        total_step = self.controller.config.total_step
        if total_step is not None and total_step < max_steps:
            warnings.warn(f"IncreLoRA: IncreLoRAConfig.total_step={total_step} is before the "
                          f"Trainer's max_steps={max_steps}: every learning rate is 0 from step "
                          f"{total_step} on, so the last {max_steps - total_step} steps train "
                          "nothing; set total_step=None (it then follows max_steps) or to "
                          "max_steps", RuntimeWarning, stacklevel=2)

    def on_train_end(self, args, state, control, **kwargs):
        self.controller.stop_tracking()  # no score or score buffer in passes after training

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        scaler = getattr(optimizer, "scaler", None)  # accelerate's, under fp16
        if not isinstance(scaler, torch.amp.GradScaler) or inner is None:
            scaler = None
        # unscaled before the penalty's gradient joins them and the triplet score reads them
        overflow = unscale_once(scaler, inner) if scaler is not None else None
        if self.apply_regularization and self.controller.config.orth_reg_weight > 0:
            with torch.enable_grad():
                self.controller.regularization_loss().backward()
        if self.loss_scale is not None:
            loss_scale = self.loss_scale()
        else:
            loss_scale = grad_scaler_scale(scaler) if scaler is not None else 1.0
        self.controller.step(state.global_step, loss_scale=loss_scale, overflow=overflow)
        if isinstance(inner, IncreLoRAAdamW):
            # One clock for slot stamps and schedules, also across skipped fp16 steps.
            inner.global_step = state.global_step

    def on_save(self, args, state, control, model=None, **kwargs):
        """The controller into the checkpoint the Trainer just saved, by the processes that
        save it (``args.should_save``: the main process, or each node's with
        ``save_on_each_node``); the others would make a stray checkpoint folder on a node
        without a shared file system. Its state is the same on every process.

        Under a plain Trainer also the adapter `load_adapter` reads (`save_trainer_adapter`),
        except under FSDP or DeepSpeed, where the model holds only this process's shards.
        A callback sees no ``trainer.save_model(folder)`` call: after training, use
        ``save_adapter(model, folder)`` for an adapter (`IncreLoRATrainer` writes one there)."""
        if not getattr(args, "should_save", True):
            return
        folder = self.checkpoint_folder(args, state)
        save_controller(self.controller, folder)
        trainer = self._trainer() if self._trainer is not None else None
        if model is not None and not isinstance(trainer, IncreLoRATrainer) \
                and not _shards_the_model(trainer, args):
            save_trainer_adapter(model, folder)

    @staticmethod
    def check_output_dir_adapter(args) -> None:
        """Before training: an adapter in ``output_dir`` that no Trainer save wrote is refused
        with ``push_to_hub`` (each checkpoint push copies the checkpoint's adapter there), and
        warned of otherwise (``save_model()`` into that folder would be refused after
        training)."""
        if not (getattr(args, "should_save", True) and getattr(args, "output_dir", None)):
            return
        try:
            check_adapter_replaceable(args.output_dir)
        except FileExistsError as refused:
            if getattr(args, "push_to_hub", False):
                raise
            warnings.warn(f"{refused}; save_model() without a folder saves there",
                          UserWarning, stacklevel=2)

    def on_push_begin(self, args, state, control, **kwargs):
        """With ``push_to_hub``, the Trainer pushes each checkpoint it saves before it calls
        `on_save`: the controller is written into that checkpoint first, so the pushed one
        (``last-checkpoint`` or ``checkpoint-<step>`` on the hub) can be resumed. Only during a
        checkpoint save (``control.should_save``), not for a final ``push_to_hub()``.

        The Trainer then copies the checkpoint's model files, the adapter's included, into
        ``output_dir``: one there that no Trainer save wrote is refused first
        (`check_adapter_replaceable`)."""
        if getattr(args, "should_save", True):
            check_adapter_replaceable(args.output_dir)
        if control.should_save:
            self.on_save(args, state, control, **kwargs)


# transformers' Trainer refuses a quantized model unless it holds peft adapters (its
# ``validate_quantization_for_training`` reads this attribute, set when peft adapters are
# loaded); a model with IncreLoRA adapters is as trainable. Set only while the Trainer checks.
_PEFT_LOADED = "_hf_peft_config_loaded"
_MARKED = "_increlora_marked_peft_loaded"


def _mark_adapters_for_quantization_check(model) -> None:
    if (model is not None and getattr(model, "is_quantized", False)
            and not getattr(model, _PEFT_LOADED, False)
            and any(isinstance(m, IncreLoRALinear) for m in model.modules())):
        model.__dict__[_MARKED] = _PEFT_LOADED in model.__dict__  # its own attribute or not
        setattr(model, _PEFT_LOADED, True)


def _unmark(model) -> None:
    """Undo `_mark_adapters_for_quantization_check` on ``model`` (nothing if not marked)."""
    if model is not None and _MARKED in model.__dict__:
        if model.__dict__.pop(_MARKED):
            setattr(model, _PEFT_LOADED, False)
        else:
            delattr(model, _PEFT_LOADED)


@contextlib.contextmanager
def _adapters_seen_by_quantization_check(model):
    """While the Trainer is built: a quantized ``model`` (or `model_init`'s) holding IncreLoRA
    layers counts as carrying adapters for transformers' quantized-training check."""
    _mark_adapters_for_quantization_check(model)
    try:
        yield
    finally:
        _unmark(model)


# `TrainingArguments.optim` values whose optimizer runs inside backward (the Trainer hands
# `backward` a learning rate for them), which IncreLoRAAdamW cannot replace.
_FUSED_BACKWARD_OPTIMS = ("lomo", "adalomo")


def _optim_name(args) -> Optional[str]:
    """``TrainingArguments.optim`` as a string (an ``OptimizerNames`` member or a plain string
    in the arguments; None without arguments)."""
    optim = getattr(args, "optim", None)
    return getattr(optim, "value", optim)


def _holds_peft_adapters(model) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` or holds adapters transformers loaded through
    peft (``load_adapter``; not the mark `_mark_adapters_for_quantization_check` sets)."""
    if getattr(model, _PEFT_LOADED, False) and _MARKED not in getattr(model, "__dict__", {}):
        return True
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _refuse_peft_over_increlora(trainer_name: str, model) -> None:
    """ValueError (one line) for a model with both peft adapters and IncreLoRA's: peft froze
    IncreLoRA's adapters, so only peft's would train and no rank would grow."""
    if model is None or not _holds_peft_adapters(model) or \
            not any(isinstance(m, IncreLoRALinear) for m in model.modules()):
        return
    raise ValueError(f"{trainer_name}: the model holds peft adapters beside its IncreLoRA ones "
                     "(a peft_config, get_peft_model or load_adapter over a model from "
                     "inject_increlora): two "
                     "adapter methods, and peft froze IncreLoRA's, so no rank would grow; pass "
                     "the model returned by inject_increlora without peft")


def _controller_over(model: torch.nn.Module) -> IncreLoRAController:
    """The Trainer's controller over ``model``, made without the controller's warning about a
    model whose adapters are all frozen: ``train()`` refuses such a model in one line
    (`create_optimizer`), or warns when given an optimizer (`IncreLoRATrainer.train`), and an
    evaluation-only Trainer over it is legitimate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IncreLoRA: every adapter tensor",
                                category=RuntimeWarning)
        return IncreLoRAController(model)


class IncreLoRATrainer(Trainer):
    """`Trainer` for a model returned by `inject_increlora`; needs no manual IncreLoRA calls.

    ``config.total_step`` defaults to the Trainer's number of training steps when left as None
    (one before them is warned about at train begin: every rate is 0 from it on).
    The optimizer is `IncreLoRAAdamW` with ``learning_rate``, ``weight_decay``, ``adam_beta1``,
    ``adam_beta2`` and ``adam_epsilon`` of the ``TrainingArguments``; as in the Trainer's own
    AdamW its weight decay spares biases and normalization weights (`create_optimizer`'s group
    ``"other_no_decay"``; the adapters take it, as ``finetune`` does). Its schedules are
    IncreLoRA's linear warmup (``IncreLoRAConfig.warmup_steps``) and decay, per slot: another
    ``lr_scheduler_type`` or warmup in the ``TrainingArguments`` is not used (with a warning), nor
    is an ``optim`` other than the Trainer's AdamW defaults or an ``optimizer_cls_and_kwargs``
    (with a warning; ``lomo`` and ``adalomo``, which update inside backward, are refused).
    """

    def __init__(self, *args, controller: Optional[IncreLoRAController] = None, **kwargs) -> None:
        if controller is not None and not isinstance(controller, IncreLoRAController):
            raise TypeError(f"IncreLoRATrainer controller={type(controller).__name__} is invalid: "
                            "leave it out (one is made over the model) or pass an "
                            "IncreLoRAController built over the model")
        if controller is not None and kwargs.get("model_init") is not None:
            raise ValueError("IncreLoRATrainer: controller= cannot be given with model_init, "
                             "whose new model at train() the controller would not watch; leave "
                             "controller out (one is made over each model model_init makes)")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        optim = _optim_name(training_args)
        if optim in _FUSED_BACKWARD_OPTIMS:
            raise ValueError(f"IncreLoRATrainer: TrainingArguments.optim={optim!r} cannot be used: "
                             "it updates the weights inside backward, and IncreLoRA's per-slot "
                             "AdamW steps after it; leave optim at its default (adamw_torch)")
        model = kwargs.get("model", args[0] if args else None)
        _refuse_peft_over_increlora(type(self).__name__, model)
        self._in_init = True
        try:
            with _adapters_seen_by_quantization_check(model):
                super().__init__(*args, **kwargs)
        finally:
            self._in_init = False
            _unmark(getattr(self, "model", None))  # model_init's
        self.increlora_controller = controller or _controller_over(self.model)
        self.increlora_callback = IncreLoRACallback(self.increlora_controller,
                                                    apply_regularization=False).install(self)

    def __setstate__(self, state: dict) -> None:
        """An unpickled copy (Ray Tune runs each trial on one) gets its callback back: the
        callback pickles without the reference to its Trainer (`IncreLoRACallback.__getstate__`)
        and saves into the copy's checkpoint folders (`IncreLoRACallback.checkpoint_folder`)."""
        self.__dict__.update(state)
        callback = state.get("increlora_callback")
        if callback is not None:
            callback._trainer = weakref.ref(self)

    def call_model_init(self, trial=None):
        """The Trainer's ``model_init`` model (at construction, and anew at every ``train()``),
        with a new controller over it once the trainer has one: the old one watched the model
        this one replaces."""
        model = super().call_model_init(trial)
        if getattr(self, "_in_init", False):  # the Trainer checks it right after, in __init__
            _mark_adapters_for_quantization_check(model)
        if hasattr(self, "increlora_callback"):  # not during __init__, which makes the first
            self.increlora_controller = _controller_over(model)
            callback = self.increlora_callback
            callback.controller = self.increlora_controller
            callback.restored, callback.logged_rounds = False, 0
        return model

    def train(self, *args, **kwargs):
        """`Trainer.train`; a model whose adapter tensors are all frozen is refused by
        `create_optimizer`, or, when the Trainer was given an optimizer (which may train other
        parameters), warned about here: its adapters would not change."""
        frozen = (frozen_adapters_message(self.model)
                  if self.optimizer is not None and self.model is not None else None)
        if frozen is not None:
            warnings.warn(frozen, RuntimeWarning, stacklevel=2)
        return super().train(*args, **kwargs)

    def create_optimizer(self, model=None) -> IncreLoRAAdamW:
        if self.optimizer is None:
            optim = _optim_name(self.args)
            if optim not in ("adamw_torch", "adamw_torch_fused"):  # (the Trainer's defaults)
                warnings.warn(f"IncreLoRATrainer: TrainingArguments.optim={optim!r} is not used: "
                              "the optimizer is IncreLoRAAdamW (AdamW with per-slot schedules)",
                              UserWarning)
            cls_and_kwargs = getattr(self, "optimizer_cls_and_kwargs", None)
            if cls_and_kwargs is not None:  # (the Trainer's own create_optimizer would use it)
                cls, kw = cls_and_kwargs
                warnings.warn(f"IncreLoRATrainer: optimizer_cls_and_kwargs="
                              f"({getattr(cls, '__name__', cls)}, {kw!r}) is not used: the "
                              "optimizer is IncreLoRAAdamW (AdamW with per-slot schedules); pass "
                              "optimizers=(optimizer, None) to train with another one",
                              UserWarning)
            self.optimizer = create_optimizer(model or self.model, self.increlora_controller.config,
                                              lr=self.args.learning_rate,
                                              weight_decay=self.args.weight_decay,
                                              betas=(self.args.adam_beta1, self.args.adam_beta2),
                                              eps=self.args.adam_epsilon)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """`ConstantSchedule` over `IncreLoRAAdamW`, whose schedules live inside it; another
        optimizer (``optimizers=(optimizer, None)``) gets the Trainer's own scheduler, the only
        schedule it has."""
        optimizer = optimizer or self.optimizer
        if not isinstance(getattr(optimizer, "optimizer", optimizer), IncreLoRAAdamW):
            return super().create_scheduler(num_training_steps, optimizer)
        kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        if kind != "linear":
            warnings.warn(f"IncreLoRATrainer: TrainingArguments.lr_scheduler_type={kind!r} is not "
                          "used: every schedule (base and per slot) is IncreLoRA's linear warmup "
                          "and decay", UserWarning)
        hf_warmup = self.args.get_warmup_steps(num_training_steps)
        if hf_warmup != self.increlora_controller.config.warmup_steps:
            warnings.warn(f"IncreLoRATrainer: TrainingArguments ask for {hf_warmup} warmup steps; "
                          f"IncreLoRAConfig.warmup_steps={self.increlora_controller.config.warmup_steps}"
                          " is used for every schedule (base and per slot)", UserWarning)
        if self.increlora_controller.config.total_step is None:
            follow_max_steps(optimizer, num_training_steps)
        if self.lr_scheduler is None:
            # The schedule lives inside the optimizer, per slot.
            self.lr_scheduler = ConstantSchedule(optimizer)
        return self.lr_scheduler

    def _get_learning_rate(self) -> float:
        """The learning rate the Trainer logs, read just after ``optimizer.step()``: that step's
        rate of the schedule begun at step 0 (`scheduled_learning_rate`), not the constant
        scheduler's base rate."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if not isinstance(inner, IncreLoRAAdamW):
            return super()._get_learning_rate()
        return scheduled_learning_rate(inner)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch, **kwargs)
        if not model.training:
            return result  # evaluation losses stay the model's own
        penalty = self.increlora_controller.regularization_loss()
        loss = result[0] if return_outputs else result
        if penalty.device != loss.device:  # a model split over devices (device_map)
            penalty = penalty.to(loss.device)
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            # The Trainer will not divide this loss by the accumulation steps: count the penalty
            # once per optimizer step all the same.
            penalty = penalty / getattr(self, "current_gradient_accumulation_steps", 1)
        if return_outputs:
            return loss + penalty, result[1]
        return loss + penalty

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """The rule `Trainer.training_step` applies before dividing by the accumulation steps
        (older transformers, 5.17 among them, has no ``loss_is_scaled_for_ga``: the rule alone)."""
        # (set on a Trainer whose training_step does not read it, it would scale the penalty
        # unlike the loss)
        scaled = getattr(self, "loss_is_scaled_for_ga", None) \
            if hasattr(Trainer, "loss_is_scaled_for_ga") else None
        if scaled is not None:
            return bool(scaled)
        return bool((getattr(self, "model_accepts_loss_kwargs", False)
                     and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """`Trainer._save` (what ``save_model()`` and every checkpoint write: the whole model,
        which ``resume_from_checkpoint`` reads) and beside it the adapter `load_adapter` reads
        (`save_trainer_adapter`), by the processes that save. A folder holding an adapter no
        Trainer save wrote is refused before anything is written. Not under FSDP, DeepSpeed or
        SageMaker model parallelism, whose ``save_model`` hands a gathered ``state_dict``: the
        model's own tensors are this process's shards (`save_adapter` the gathered model)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        adapter = state_dict is None and self.args.should_save
        if adapter:
            check_adapter_replaceable(output_dir)
        super()._save(output_dir, state_dict=state_dict)
        if adapter:
            save_trainer_adapter(self.model, output_dir)

    def _load_best_model(self) -> None:
        load_best_model_with_controller(self, self.increlora_controller, super()._load_best_model)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Everything is checked before the Trainer copies a single weight into the model.
        state = read_controller_state(resume_from_checkpoint)
        self.increlora_controller.check_state_dict(state)
        check_model_checkpoint(model or self.model, resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        self.increlora_controller.load_state_dict(state)
        self.increlora_callback.restored = True
