"""The Trainer integration across train() calls: a second train() on the same trainer, a resume
with another ``max_steps``, the first log after a resume, and a callback passed in
``callbacks=[...]`` resuming from a folder it cannot see (found by the integrations audit of
2026-12-06)."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from increlora_fast.controller import IncreLoRAController
from increlora_fast.integrations.trainer import (IncreLoRACallback, IncreLoRATrainer,
                                                 increlora_optimizers,
                                                 scheduled_learning_rate)
from trainer_helpers import TinyTask, tiny_increlora_bert


def _args(out, steps=12, save_steps=6, logging_steps=100, seed=0):
    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_steps=save_steps,
                             logging_steps=logging_steps, report_to=[], use_cpu=True, seed=seed,
                             disable_tqdm=True)


def _trainer(out, plain: bool, install: bool = True, callbacks=(), **args) -> Trainer:
    """IncreLoRATrainer, or a plain Trainer with `increlora_optimizers` and the callback
    (installed, or passed in ``callbacks=[...]`` when ``install`` is False)."""
    model, config = tiny_increlora_bert(warmup_steps=2)
    if not plain:
        return IncreLoRATrainer(model=model, args=_args(out, **args), train_dataset=TinyTask(),
                                callbacks=list(callbacks))
    callback = IncreLoRACallback(IncreLoRAController(model, config))
    trainer = Trainer(model=model, args=_args(out, **args), train_dataset=TinyTask(),
                      optimizers=increlora_optimizers(model, lr=1e-2),
                      callbacks=list(callbacks) + ([] if install else [callback]))
    if install:
        callback.install(trainer)
    trainer.increlora_callback = callback
    return trainer


def _controller(trainer: Trainer) -> IncreLoRAController:
    return trainer.increlora_callback.controller


@pytest.mark.parametrize("plain", [False, True], ids=["IncreLoRATrainer", "installed callback"])
@pytest.mark.parametrize("steps", [6, 12], ids=["below the budget", "budget reached"])
def test_a_second_train_is_refused_before_its_first_step(tmp_path, plain, steps):
    """A second ``train()`` counts its steps from 0 again while the controller and the
    optimizer's per-slot schedules are where the first one left them. Below the budget it
    failed at the first step (``controller.step(0) after ... step 5``) with the step's forward
    and backward done; at the budget it trained on with the slots grown late at a learning
    rate of 0 (their schedules start at their growth step), silently. It is refused at train
    begin now, in one line, before any weight moves."""
    trainer = _trainer(tmp_path, plain, steps=steps)
    trainer.train()
    assert _controller(trainer).allocation_log
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match="resume_from_checkpoint") as error:
        trainer.train()
    message = str(error.value)
    assert "\n" not in message and "train()" in message
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("plain", [False, True], ids=["IncreLoRATrainer", "installed callback"])
def test_a_resume_with_more_steps_decays_to_the_new_last_step(tmp_path, plain):
    """Resumed with a larger ``max_steps``, the schedules must decay to the new last step, as
    the Trainer's own scheduler does; the optimizer's saved state carried the old one (12), so
    every rate was 0 from step 12 to 20 and those steps trained nothing."""
    _trainer(tmp_path / "a", plain).train()
    resumed = _trainer(tmp_path / "b", plain, steps=20)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    inner = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
    assert {group["total_step"] for group in inner.param_groups} == {20}
    assert resumed.state.global_step == 20
    assert scheduled_learning_rate(inner) > 0  # the rate of step 19, the last one


class _Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append((state.global_step, dict(logs)))


@pytest.mark.parametrize("plain", [False, True], ids=["IncreLoRATrainer", "installed callback"])
def test_the_first_log_after_a_resume_repeats_no_round(tmp_path, plain):
    """Rounds run at 0-based steps 4, 6, 8, 10; checkpoint-5 holds the first, logged before it
    was saved. The resumed run forced a log at its first step with that round's ranks again
    (the count of reported rounds was not restored); its first log is the next round's."""
    _trainer(tmp_path / "a", plain, save_steps=5).train()
    recorder = _Recorder()
    resumed = _trainer(tmp_path / "b", plain, save_steps=5, callbacks=[recorder])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    assert recorder.logs, "no training log"
    first_step, first = recorder.logs[0]
    assert first_step == 7, [step for step, _ in recorder.logs]  # the round at 0-based step 6
    assert first["increlora/total_rank"] == 6


def test_a_callback_in_callbacks_refuses_another_runs_checkpoint(tmp_path):
    """A callback passed in ``callbacks=[...]`` (not installed) cannot see the folder
    ``train(resume_from_checkpoint=...)`` names and reads ``<output_dir>/checkpoint-<step>``:
    there, a checkpoint of another run (an earlier run into the same output_dir) gave its
    controller to the model resumed from elsewhere, silently. Its adapter tensors differ from
    the ones the Trainer loaded, and that is refused, naming ``install``."""
    _trainer(tmp_path / "a", plain=True).train()
    shutil.copytree(tmp_path / "a" / "checkpoint-6", tmp_path / "pulled")
    # another run (another seed) into the output_dir of the resumed one
    _trainer(tmp_path / "b", plain=True, seed=1, steps=6).train()
    resumed = _trainer(tmp_path / "b", plain=True, install=False)
    with pytest.raises(ValueError, match="install") as error:
        resumed.train(resume_from_checkpoint=str(tmp_path / "pulled"))
    assert "\n" not in str(error.value)


def test_a_callback_in_callbacks_resumes_from_its_own_output_dir(tmp_path):
    """The same callback resumed from ``<output_dir>/checkpoint-<step>`` itself still loads
    that controller: the allocation log after the resume equals the uninterrupted run's."""
    first = _trainer(tmp_path, plain=True, install=False)
    first.train()
    resumed = _trainer(tmp_path, plain=True, install=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert _controller(resumed).allocation_log == _controller(first).allocation_log


@pytest.mark.parametrize("plain", [False, True], ids=["IncreLoRATrainer", "installed callback"])
def test_a_new_trainer_over_a_grown_model_trains_every_slot(tmp_path, plain):
    """A model grown by one Trainer, handed to a new one (a new run, counting from step 0):
    the slots grown late kept their growth steps (4, 6, 8, 10), and their schedules, which
    start there, gave them a rate of 0 until the new run reached those steps, silently (as
    load_adapter does, a new run starts every slot's schedule at its step 0)."""
    first = _trainer(tmp_path / "a", plain)
    first.train()
    model = first.model
    grown = [(layer, layer.active_mask.nonzero().flatten().tolist())
             for layer in _controller(first).layers]
    assert max(int(layer.slot_alloc_step.max()) for layer, _ in grown) > 3
    before = [layer.lora_A.detach().clone() for layer, _ in grown]
    config = _controller(first).config
    args = _args(tmp_path / "b", steps=3)
    if plain:
        callback = IncreLoRACallback(IncreLoRAController(model, config))
        second = Trainer(model=model, args=args, train_dataset=TinyTask(),
                         optimizers=increlora_optimizers(model, lr=1e-2))
        callback.install(second)
    else:
        second = IncreLoRATrainer(model=model, args=args, train_dataset=TinyTask())
    with pytest.warns(UserWarning, match="earlier run"):
        second.train()
    for (layer, active), old in zip(grown, before):
        moved = (layer.lora_A.detach() - old).abs().amax(dim=1)
        assert bool((moved[active] > 0).all()), (active, moved.tolist())
