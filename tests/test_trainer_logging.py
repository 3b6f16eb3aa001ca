"""The Trainer integration logs total rank, per-module ranks and importance scores through the
Trainer's own logging: a callback's ``on_log`` (as TensorBoard's or W&B's) receives them."""
from __future__ import annotations

import pytest
from transformers import Trainer, TrainerCallback, TrainingArguments

from increlora_fast.controller import IncreLoRAController
from increlora_fast.integrations.trainer import IncreLoRACallback, IncreLoRATrainer
from trainer_helpers import TinyTask, tiny_increlora_bert

STEPS = 12
TOTAL = "increlora/total_rank"


class Recorder(TrainerCallback):
    """What a reporting integration would receive."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def _model():
    return tiny_increlora_bert()


def _args(out):
    return TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=5, report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, save_strategy="no")


def _check(recorder: Recorder, controller: IncreLoRAController, history: list) -> None:
    assert sorted({e["step"] for e in controller.allocation_log}) == [4, 6, 8, 10]
    # A round at the 0-based optimizer step i is logged when the Trainer has taken i + 1 steps.
    rounds = [5, 7, 9, 11]
    train_logs = [(step, logs) for step, logs in recorder.logs if "loss" in logs]
    # logging_steps=5 logs at 5 and 10; each allocation round forces a log at its step
    assert sorted({step for step, _ in train_logs}) == [5, 7, 9, 10, 11]
    with_ranks = {}
    for step, logs in train_logs:
        assert logs[TOTAL] == sum(v for k, v in logs.items() if k.startswith("increlora/rank/")) \
            or not any(k.startswith("increlora/rank/") for k in logs)
        if any(k.startswith("increlora/rank/") for k in logs):
            with_ranks[step] = logs
    assert sorted(with_ranks) == rounds  # module ranks once per round, at the round
    assert [with_ranks[s][TOTAL] for s in rounds] == [5, 6, 7, 8]
    last = with_ranks[11]
    assert {k[len("increlora/rank/"):]: v for k, v in last.items()
            if k.startswith("increlora/rank/")} == controller.rank_pattern()
    scores = {k[len("increlora/importance/"):]: v for k, v in last.items()
              if k.startswith("increlora/importance/")}
    assert list(scores) == controller.names
    assert scores == dict(zip(controller.names, controller.importance().tolist()))
    assert any(v > 0 for v in scores.values())
    # the Trainer's own history holds them too
    logged = {e["step"]: e for e in history if "loss" in e}
    assert logged[10][TOTAL] == 7 and logged[11][TOTAL] == 8
    assert logged[11]["increlora/rank/" + controller.names[0]] >= 1


def test_increlora_trainer_logs_ranks_and_scores_to_other_callbacks(tmp_path):
    model, _ = _model()
    recorder = Recorder()
    trainer = IncreLoRATrainer(model=model, args=_args(tmp_path), train_dataset=TinyTask(),
                               callbacks=[recorder])
    trainer.train()
    _check(recorder, trainer.increlora_controller, trainer.state.log_history)


def test_plain_trainer_with_installed_callback_logs_the_same(tmp_path):
    model, config = _model()
    controller = IncreLoRAController(model, config)
    recorder = Recorder()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=TinyTask(),
                      callbacks=[recorder])
    IncreLoRACallback(controller).install(trainer)
    trainer.train()
    _check(recorder, controller, trainer.state.log_history)


@pytest.mark.parametrize("plain", [False, True], ids=["increlora-trainer", "plain-trainer"])
def test_the_logged_learning_rate_is_the_schedules(tmp_path, plain):
    """IncreLoRATrainer logged the base learning rate at every step (its ConstantSchedule's),
    while the optimizer warms up and decays it (found by an audit: 0.01 was logged at step 0,
    which warmup trains at 0, and at the last step, which decay trains at a tenth). A plain
    Trainer with ``optimizers=increlora_optimizers(...)`` and the installed callback logged the
    constant base rate likewise, to the reporting callbacks too (found by a later audit)."""
    from increlora_fast.integrations.trainer import increlora_optimizers

    model, _ = tiny_increlora_bert(warmup_steps=2)
    args = _args(tmp_path)
    args.logging_steps = 1
    recorder = Recorder()
    if plain:
        trainer = Trainer(model=model, args=args, train_dataset=TinyTask(), callbacks=[recorder],
                          optimizers=increlora_optimizers(model, lr=1e-2))
        IncreLoRACallback(IncreLoRAController(model)).install(trainer)
    else:
        trainer = IncreLoRATrainer(model=model, args=args, train_dataset=TinyTask(),
                                   callbacks=[recorder])
    trainer.train()
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history
              if "learning_rate" in e}
    reported = {step: logs["learning_rate"] for step, logs in recorder.logs
                if "learning_rate" in logs}
    # the step taken before each log (global_step - 1): warmup over 2 steps, decay to 0 at 12
    expected = {s + 1: 1e-2 * (s / 2 if s < 2 else (STEPS - s) / (STEPS - 2)) for s in range(STEPS)}
    assert logged.keys() == expected.keys() == reported.keys()
    for step, lr in expected.items():
        assert logged[step] == pytest.approx(lr, abs=1e-12), step
        assert reported[step] == pytest.approx(lr, abs=1e-12), step
