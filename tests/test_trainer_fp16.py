"""The Trainer integrations under fp16 with a GradScaler, as on CUDA: accelerate's fp16 set-up
(its GradScaler on the Accelerator, handed to the wrapped optimizer) with a CPU GradScaler and
autocast off, so that everything but the scaling equals an fp32 run.

- The scores are divided by the scale wherever the callback runs: `IncreLoRATrainer`, and a
  plain `Trainer` with `IncreLoRACallback(controller).install(trainer)` (before 2026-12-05 the
  plain Trainer's scores came out scale^2 too large).
- The gradients are unscaled before the callback's penalty and the scores, with clipping or
  without.
- A step the scaler skips for an overflow outside the adapters (the trained classifier) is
  skipped by the controller too: no score update, no allocation round at it.
"""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from increlora_fast.controller import IncreLoRAController  # noqa: E402
from increlora_fast.integrations.trainer import (IncreLoRACallback, IncreLoRATrainer,  # noqa: E402
                                                 increlora_optimizers)
from trainer_helpers import TinyTask, tiny_increlora_bert  # noqa: E402

SCALE = 2.0 ** 12


def _train(tmp_path, plain: bool, fp16: bool, max_grad_norm: float = 1.0, score="delta_w",
           inf_in_classifier_at=None, steps: int = 10):
    """A tiny BERT trained ``steps`` steps; (controller, model, per-step log of the EMA sum
    and the total rank)."""
    from accelerate.utils import AutocastKwargs

    model, config = tiny_increlora_bert(warmup_steps=2, score=score)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps,
                             per_device_train_batch_size=8, learning_rate=1e-2,
                             save_strategy="no", logging_steps=100, report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, max_grad_norm=max_grad_norm, fp16=fp16)
    if plain:
        controller = IncreLoRAController(model, config)
        trainer = Trainer(model=model, args=args, train_dataset=TinyTask(),
                          optimizers=increlora_optimizers(model, 1e-2))
        IncreLoRACallback(controller).install(trainer)
    else:
        trainer = IncreLoRATrainer(model=model, args=args, train_dataset=TinyTask())
        controller = trainer.increlora_controller
    if fp16:  # what Accelerator.__init__ sets up for fp16 on CUDA, with a CPU scaler
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE,
                                                          growth_interval=10 ** 6)
        trainer.accelerator.native_amp = True
        trainer.accelerator.autocast_handler = AutocastKwargs(enabled=False)
    log = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            log.append((float(controller.ipt.sum()), controller.current_total_rank()))

    trainer.add_callback(Watch())
    if inf_in_classifier_at is not None:
        step_once = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            out = step_once(model, inputs, num_items_in_batch)
            if trainer.state.global_step == inf_in_classifier_at:
                model.classifier.weight.grad[0, 0] = float("inf")
            return out
        trainer.training_step = training_step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return controller, model, log


@pytest.mark.parametrize("plain", [True, False], ids=["Trainer+callback", "IncreLoRATrainer"])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_fp16_scaled_training_equals_fp32(tmp_path, plain, max_grad_norm):
    """With the scaling exact (a power of two, no overflow), an fp16-scaled run gives the fp32
    run's scores, allocations and weights: the scores are divided by the scale and the
    penalty's gradient joins unscaled gradients, with clipping or without."""
    runs = [_train(tmp_path, plain, fp16, max_grad_norm) for fp16 in (False, True)]
    (c32, m32, _), (c16, m16, _) = runs
    assert c16.allocation_log and c16.allocation_log == c32.allocation_log
    torch.testing.assert_close(c16.ipt, c32.ipt, rtol=1e-5, atol=0)
    torch.testing.assert_close(c16.importance(), c32.importance(), rtol=1e-5, atol=0)
    for (name, p16), p32 in zip(m16.named_parameters(), m32.parameters()):
        torch.testing.assert_close(p16, p32, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("score", ["delta_w", "triplet"])
def test_a_step_skipped_for_an_overflow_outside_the_adapters_changes_no_score(tmp_path, score):
    """inf in the classifier's gradient at step 4, an allocation round: the scaler skips the
    step, and the controller leaves its EMAs as they were and moves the round to step 5
    (before 2026-12-05 it took the adapters' finite scores, or with the triplet score and
    clipping the zeros clipping by an infinite norm leaves, and ran the round)."""
    controller, _, log = _train(tmp_path, plain=False, fp16=True, score=score,
                                inf_in_classifier_at=4)
    assert log[4][0] == log[3][0]  # step 4 (the 5th logged): the EMAs unchanged
    rounds = [e["step"] for e in controller.allocation_log]
    assert 4 not in rounds and 5 in rounds
