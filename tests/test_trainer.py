"""Issue 3 (g): HF Trainer end to end grows ranks to the budget and resumes exactly."""
import warnings

import pytest
import torch
from transformers import Trainer, TrainingArguments

from increlora_fast.controller import IncreLoRAController
from increlora_fast.integrations.trainer import IncreLoRACallback, IncreLoRATrainer
from increlora_fast.optimizer import IncreLoRAAdamW
from trainer_helpers import TinyTask, tiny_increlora_bert

STEPS = 12


def _model():
    return tiny_increlora_bert(warmup_steps=2)


def _args(out, **kw):
    settings = dict(max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-2,
                    save_steps=6, logging_steps=100, report_to=[], use_cpu=True, seed=0,
                    disable_tqdm=True)
    return TrainingArguments(output_dir=str(out), **dict(settings, **kw))


def _said_while_training(trainer, phrase: str):
    """The messages of the warnings ``trainer.train()`` gives that hold ``phrase``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return [str(w.message) for w in caught if phrase in str(w.message)]


def test_increlora_trainer_grows_to_budget_and_resumes_exactly(tmp_path):
    model, config = _model()
    trainer = IncreLoRATrainer(model=model, args=_args(tmp_path / "a"), train_dataset=TinyTask())
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, IncreLoRAAdamW)
    assert trainer.optimizer.optimizer.param_groups[0]["total_step"] == STEPS
    ctl = trainer.increlora_controller
    assert ctl.budget_reached and ctl.current_total_rank() == 2 * 4
    assert [e["step"] for e in ctl.allocation_log] == [4, 6, 8, 10]
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    resumed_model, _ = _model()
    resumed = IncreLoRATrainer(model=resumed_model, args=_args(tmp_path / "a"),
                               train_dataset=TinyTask())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert resumed.increlora_controller.allocation_log == ctl.allocation_log
    state = resumed_model.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_resume_without_controller_state_fails_clearly(tmp_path):
    model, _ = _model()
    IncreLoRATrainer(model=model, args=_args(tmp_path), train_dataset=TinyTask()).train()
    (tmp_path / "checkpoint-6" / "increlora_controller.pt").unlink()
    again, _ = _model()
    with pytest.raises(FileNotFoundError, match="increlora_controller.pt"):
        IncreLoRATrainer(model=again, args=_args(tmp_path), train_dataset=TinyTask()).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


def test_plain_trainer_with_callback_allocates_and_warns_about_warmup(tmp_path):
    model, config = _model()
    controller = IncreLoRAController(model, config)
    trainer = Trainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=TinyTask(),
                      callbacks=[IncreLoRACallback(controller)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("restart warmup" in str(w.message) for w in caught)
    assert controller.budget_reached and controller.current_total_rank() == 8


@pytest.mark.parametrize("precision, dtype", [({}, None), ({"bf16": True}, torch.bfloat16)])
def test_the_kernels_are_built_at_train_begin_for_the_trainers_precision(tmp_path, monkeypatch,
                                                                        precision, dtype):
    """Both ways of training (IncreLoRATrainer, a plain Trainer with the callback) build the
    kernels of the layers, the Trainer's optimizer and the controller's penalty once, before
    the first step, for the autocast dtype the Trainer uses (`precompile_kernels`; on CPU it
    finds nothing to build)."""
    from increlora_fast.integrations import trainer as trainer_module
    calls = []

    def recorded(model, autocast_dtype, *, optimizer, penalty):
        calls.append((model, autocast_dtype, getattr(optimizer, "optimizer", optimizer),
                      penalty))
    monkeypatch.setattr(trainer_module, "precompile_kernels", recorded)
    for plain in (False, True):
        model, config = _model()
        args = _args(tmp_path / str(plain), save_strategy="no", **precision)
        if plain:
            trainer = Trainer(model=model, args=args, train_dataset=TinyTask())
            controller = IncreLoRAController(model, config)
            IncreLoRACallback(controller).install(trainer)
        else:
            trainer = IncreLoRATrainer(model=model, args=args, train_dataset=TinyTask())
            controller = trainer.increlora_controller
        trainer.train()
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        assert [(m is model, d, o is optimizer, p is controller.penalty)
                for m, d, o, p in calls] == [(True, dtype, True, True)]
        assert isinstance(optimizer, IncreLoRAAdamW) != plain
        calls.clear()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_an_lr_scheduler_type_that_is_not_used_is_said(tmp_path, kind):
    """The schedules are IncreLoRA's linear ones per slot: a cosine asked for in the
    TrainingArguments was silently trained linearly (found by an audit); it is said now."""
    model, _ = _model()
    trainer = IncreLoRATrainer(model=model, train_dataset=TinyTask(), args=_args(
        tmp_path, save_strategy="no", warmup_steps=2, lr_scheduler_type=kind))
    said = _said_while_training(trainer, "lr_scheduler_type")
    assert said == ([] if kind == "linear" else
                    ["IncreLoRATrainer: TrainingArguments.lr_scheduler_type='cosine' is not used: "
                     "every schedule (base and per slot) is IncreLoRA's linear warmup and decay"])


def test_increlora_optimizers_take_the_adam_settings():
    """``increlora_optimizers`` ignored the betas and eps a plain Trainer's arguments name (an
    optimizer handed to a Trainer does not read them): they can be given now."""
    from increlora_fast.integrations.trainer import increlora_optimizers
    model, _ = _model()
    optimizer, _ = increlora_optimizers(model, 1e-3, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    assert {(g["betas"], g["eps"], g["weight_decay"]) for g in optimizer.param_groups
            if g["name"] != "other_no_decay"} == {((0.8, 0.9), 1e-6, 0.1)}
    spared, = (g for g in optimizer.param_groups if g["name"] == "other_no_decay")
    assert (spared["betas"], spared["eps"], spared["weight_decay"]) == ((0.8, 0.9), 1e-6, 0.0)


def test_evaluation_loss_is_the_model_loss_without_penalty(tmp_path):
    model, _ = _model()
    trainer = IncreLoRATrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2),
                               train_dataset=TinyTask(), eval_dataset=TinyTask())
    before = trainer.evaluate()["eval_loss"]            # works before any training step
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    model.eval()
    with torch.no_grad():
        batch = [TinyTask()[i] for i in range(64)]
        inputs = {k: torch.stack([torch.as_tensor(b[k]) for b in batch]) for k in batch[0]}
        own = model(**inputs).loss.item()
    assert trainer.increlora_controller.regularization_loss().item() > 1e-3
    assert after == pytest.approx(own, rel=1e-5) and before != after


def test_torch_compile_trainer_matches_eager_exactly(tmp_path):
    """Issue 27: the Trainer path stays sync-free, so ``torch_compile=True`` trains the same run
    as eager (same allocation rounds, bit-identical weights after 12 steps), and it really
    compiled. aot_eager keeps CPU inductor's code generation out of the comparison."""
    from torch._dynamo.utils import counters
    results = []
    for compile_kw in ({}, {"torch_compile": True, "torch_compile_backend": "aot_eager"}):
        torch._dynamo.reset()
        counters.clear()
        model, _ = _model()
        trainer = IncreLoRATrainer(model=model, train_dataset=TinyTask(),
                                   args=_args(tmp_path / str(len(results)), save_strategy="no",
                                              warmup_steps=2, **compile_kw))
        trainer.train()
        results.append((trainer.increlora_controller.allocation_log,
                        {k: v.clone() for k, v in model.state_dict().items()},
                        counters["stats"]["unique_graphs"]))
    (eager_log, eager_state, eager_graphs), (log, state, graphs) = results
    assert eager_graphs == 0 and graphs > 0
    assert [(e["step"], e["module"], e["new_rank"]) for e in log] == \
        [(e["step"], e["module"], e["new_rank"]) for e in eager_log]
    for key, value in eager_state.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("has_attribute", [True, False])
def test_penalty_scaling_follows_the_trainers_accumulation_rule(tmp_path, monkeypatch,
                                                                has_attribute):
    """Whether the Trainer divides `compute_loss`'s loss by the accumulation steps (then the
    penalty is left whole) follows `Trainer.training_step`'s rule, also on transformers without
    ``loss_is_scaled_for_ga`` (5.17, the GPU machine's, has none: the attribute was read
    unguarded and every training step raised)."""
    native = hasattr(Trainer, "loss_is_scaled_for_ga")
    if has_attribute and not native:
        pytest.skip("this transformers has no Trainer.loss_is_scaled_for_ga")
    if not has_attribute:
        monkeypatch.delattr(Trainer, "loss_is_scaled_for_ga", raising=False)
    model, _ = _model()
    trainer = IncreLoRATrainer(model=model, args=_args(tmp_path, save_strategy="no"),
                               train_dataset=TinyTask())
    assert hasattr(trainer, "loss_is_scaled_for_ga") == has_attribute
    accepts_kwargs = trainer.model_accepts_loss_kwargs
    for accepts, items, scaled in ((True, 64, True), (True, None, False), (False, 64, False)):
        trainer.model_accepts_loss_kwargs = accepts
        assert trainer._loss_is_scaled_for_ga(items) is scaled
    trainer.model_accepts_loss_kwargs = False
    trainer.compute_loss_func = lambda *args, **kwargs: None
    assert trainer._loss_is_scaled_for_ga(None) is True
    trainer.compute_loss_func = None
    if has_attribute:  # set, it decides alone
        trainer.loss_is_scaled_for_ga = True
        assert trainer._loss_is_scaled_for_ga(None) is True
        trainer.loss_is_scaled_for_ga = None
    trainer.model_accepts_loss_kwargs = accepts_kwargs
    if has_attribute == native:  # (a Trainer that has it reads it itself)
        trainer.train()  # steps run
        assert trainer.increlora_controller.budget_reached


def test_pushed_checkpoints_hold_the_controller(tmp_path, monkeypatch):
    """push_to_hub: the Trainer uploads each checkpoint before it calls on_save; the pushed
    folder must already hold the controller, or a resume from the hub's last-checkpoint fails
    (found by an audit: the controller file was missing from every pushed checkpoint)."""
    import os
    import types

    import transformers.trainer as hf_trainer

    pushed = []

    class Hub:
        def create_repo(self, *args, **kwargs):
            return types.SimpleNamespace(repo_id="someone/tiny")

        def upload_folder(self, folder_path, path_in_repo=None, **kwargs):
            pushed.append((path_in_repo, sorted(os.listdir(folder_path))))
            return types.SimpleNamespace(done=lambda: True)

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: Hub())
    model, _ = _model()
    trainer = IncreLoRATrainer(model=model, train_dataset=TinyTask(), args=_args(
        tmp_path, push_to_hub=True, hub_model_id="someone/tiny", hub_strategy="checkpoint"))
    trainer.train()
    checkpoints = [files for where, files in pushed if where == "last-checkpoint"]
    assert len(checkpoints) == 2  # steps 6 and 12
    assert all("increlora_controller.pt" in files for files in checkpoints), checkpoints


def test_plain_trainer_resumes_from_a_checkpoint_outside_its_output_dir(tmp_path):
    """A plain Trainer with the installed callback resumed from a checkpoint in another folder
    (pulled from the hub, or moved) restores the controller from that folder (found by an
    audit: the callback looked in <output_dir>/checkpoint-<step> and raised
    FileNotFoundError)."""
    import shutil

    from increlora_fast.integrations.trainer import increlora_optimizers

    def run(out, resume=None):
        model, config = _model()
        controller = IncreLoRAController(model, config)
        trainer = Trainer(model=model, args=_args(out), train_dataset=TinyTask(),
                          optimizers=increlora_optimizers(model, lr=1e-2))
        IncreLoRACallback(controller).install(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return model, controller

    model, controller = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "checkpoint-6", tmp_path / "pulled" / "last-checkpoint")
    resumed, resumed_controller = run(tmp_path / "b", str(tmp_path / "pulled" / "last-checkpoint"))
    assert resumed_controller.allocation_log == controller.allocation_log
    state = resumed.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_plain_trainer_resume_checks_the_adapter_tensors_first(tmp_path):
    """The installed callback's resume checks the checkpoint's adapter tensors before loading,
    as IncreLoRATrainer does: a checkpoint missing some (here every lora_A) is refused instead
    of resuming with the fresh model's values for them and the checkpoint's controller."""
    from safetensors.torch import load_file, save_file

    from increlora_fast.integrations.trainer import increlora_optimizers

    def trainer_for(out):
        model, config = _model()
        trainer = Trainer(model=model, args=_args(out), train_dataset=TinyTask(),
                          optimizers=increlora_optimizers(model, lr=1e-2))
        IncreLoRACallback(IncreLoRAController(model, config)).install(trainer)
        return trainer

    trainer_for(tmp_path / "a").train()
    weights = tmp_path / "a" / "checkpoint-6" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if "lora_A" not in k}, str(weights),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="holds adapters for other modules"):
        trainer_for(tmp_path / "b").train(resume_from_checkpoint=str(weights.parent))


def test_model_init_gets_a_controller_over_the_model_it_trains(tmp_path):
    """With ``model_init`` the Trainer makes a new model at ``train()``: the controller made at
    construction watched the discarded one, so no round ever ran and the penalty trained
    nothing (found by an audit: the only sign was a warning about misplaced step calls)."""
    trainer = IncreLoRATrainer(model_init=lambda: _model()[0], train_dataset=TinyTask(),
                               args=_args(tmp_path, save_strategy="no"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # none about steps without gradients
        trainer.train()
    ctl = trainer.increlora_controller
    assert all(any(m is layer for m in trainer.model.modules()) for layer in ctl.layers)
    assert trainer.increlora_callback.controller is ctl
    assert [e["step"] for e in ctl.allocation_log] == [4, 6, 8, 10]
    assert ctl.budget_reached and ctl.current_total_rank() == 8


def test_a_controller_of_another_model_is_refused(tmp_path):
    """A controller cannot follow the model ``model_init`` makes, nor watch a model the Trainer
    does not train: said before any step, instead of a run that never allocates."""
    model, config = _model()
    controller = IncreLoRAController(model, config)
    with pytest.raises(ValueError, match="model_init"):
        IncreLoRATrainer(model_init=lambda: _model()[0], controller=controller,
                         args=_args(tmp_path, save_strategy="no"), train_dataset=TinyTask())
    trainer = Trainer(model_init=lambda: _model()[0], args=_args(tmp_path, save_strategy="no"),
                      train_dataset=TinyTask())
    IncreLoRACallback(controller).install(trainer)
    with pytest.raises(ValueError, match="IncreLoRACallback: the controller"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("plain", [False, True])
def test_load_best_model_at_end_restores_the_best_checkpoints_controller(tmp_path, plain):
    """``load_best_model_at_end`` loads the best checkpoint's weights (slot states included)
    into the model; the controller kept the last step's state (found by an audit: its
    allocation log and budget_reached described rounds the loaded model never had)."""
    from increlora_fast.integrations.trainer import increlora_optimizers, read_controller_state

    evaluations = []

    def first_is_best(_):  # the first evaluation (step 3, before any round) scores highest
        evaluations.append(None)
        return {"order": -len(evaluations)}

    model, config = _model()
    args = _args(tmp_path, eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                 metric_for_best_model="order", greater_is_better=True)
    args.save_steps = 3
    kwargs = dict(model=model, args=args, train_dataset=TinyTask(), eval_dataset=TinyTask(8),
                  compute_metrics=first_is_best)
    if plain:
        trainer = Trainer(optimizers=increlora_optimizers(model, lr=1e-2), **kwargs)
        controller = IncreLoRACallback(IncreLoRAController(model, config)).install(trainer).controller
    else:
        trainer = IncreLoRATrainer(**kwargs)
        controller = trainer.increlora_controller
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-3")
    saved = read_controller_state(trainer.state.best_model_checkpoint)
    assert not saved["budget_reached"] and saved["allocation_log"] == []
    assert controller.current_total_rank() == 4  # the best checkpoint's model
    assert controller.allocation_log == [] and not controller.budget_reached
    assert torch.equal(controller.ipt.cpu(), saved["ipt"])


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_an_optim_that_is_not_used_is_said(tmp_path, optim):
    """``TrainingArguments.optim`` named another optimizer than AdamW (sgd, adafactor, 8-bit
    ones...) and IncreLoRATrainer trained IncreLoRAAdamW without a word (found by an audit, as
    lr_scheduler_type before it)."""
    model, _ = _model()
    trainer = IncreLoRATrainer(model=model, train_dataset=TinyTask(), args=_args(
        tmp_path, save_strategy="no", optim=optim))
    said = _said_while_training(trainer, "TrainingArguments.optim")
    assert said == ([] if optim == "adamw_torch" else
                    ["IncreLoRATrainer: TrainingArguments.optim='sgd' is not used: the optimizer is "
                     "IncreLoRAAdamW (AdamW with per-slot schedules)"])
    assert isinstance(trainer.optimizer.optimizer, IncreLoRAAdamW)


def test_an_optimizer_cls_and_kwargs_that_is_not_used_is_said(tmp_path):
    """``optimizer_cls_and_kwargs=(torch.optim.SGD, {...})`` (a Trainer and SFTTrainer
    argument) was dropped without a word: IncreLoRATrainer trained IncreLoRAAdamW (found by an
    audit of the TRL integration)."""
    model, _ = _model()
    trainer = IncreLoRATrainer(model=model, train_dataset=TinyTask(),
                               args=_args(tmp_path, save_strategy="no"),
                               optimizer_cls_and_kwargs=(torch.optim.SGD, {"momentum": 0.9}))
    said = _said_while_training(trainer, "optimizer_cls_and_kwargs")
    assert said == ["IncreLoRATrainer: optimizer_cls_and_kwargs=(SGD, {'momentum': 0.9}) is not "
                    "used: the optimizer is IncreLoRAAdamW (AdamW with per-slot schedules); "
                    "pass optimizers=(optimizer, None) to train with another one"]
    assert isinstance(trainer.optimizer.optimizer, IncreLoRAAdamW)


@pytest.mark.parametrize("optim", ["lomo", "adalomo"])
def test_an_optim_that_updates_inside_backward_is_refused(tmp_path, optim):
    """``optim="lomo"``/``"adalomo"`` made the Trainer pass ``learning_rate`` to backward, and
    training failed at its first step with a TypeError from ``Tensor.backward``; it is now
    refused at construction with the reason."""
    model, _ = _model()
    with pytest.raises(ValueError, match=f"optim='{optim}' cannot be used"):
        IncreLoRATrainer(model=model, train_dataset=TinyTask(), args=_args(
            tmp_path, save_strategy="no", optim=optim))


@pytest.mark.parametrize("steps", [STEPS, 10])
def test_a_schedule_that_cannot_reach_the_budget_is_said(tmp_path, steps):
    """A run whose allocation rounds cannot reach the rank budget (too short for init_warmup,
    incre_interval and top_h) ended below target_rank without a word; the callback now warns at
    train begin. The helpers' schedule (rounds at 4, 6, 8, 10, one module each, from 4 to 8)
    reaches it in 12 steps, not in 10."""
    model, _ = _model()
    args = _args(tmp_path, save_strategy="no")
    args.max_steps = steps
    trainer = IncreLoRATrainer(model=model, train_dataset=TinyTask(), args=args)
    said = _said_while_training(trainer, "allocation round")
    ctl = trainer.increlora_controller
    if steps == STEPS:
        assert said == [] and ctl.budget_reached
    else:
        assert len(said) == 1 and "at most 7 of the budget's 8" in said[0]
        assert "steps 0-9" in said[0] and ctl.current_total_rank() == 7


def _first_step_grads(tmp_path, batch: int, accumulation: int, accepts_loss_kwargs):
    """The gradients IncreLoRATrainer's first optimizer step takes (task loss and penalty) of
    the helpers' BERT without dropout, 8 rows a step as ``batch`` x ``accumulation``."""
    from transformers import TrainerCallback

    torch.manual_seed(0)
    model, _ = tiny_increlora_bert(warmup_steps=2)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if accepts_loss_kwargs is not None:
        model.accepts_loss_kwargs = accepts_loss_kwargs
    seen = {}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not seen:
                seen.update({n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None})

    args = _args(tmp_path / f"{batch}x{accumulation}", save_strategy="no")
    args.max_steps, args.per_device_train_batch_size = 1, batch
    args.gradient_accumulation_steps = accumulation
    trainer = IncreLoRATrainer(model=model, train_dataset=TinyTask(), args=args,
                               callbacks=[Record()])
    trainer.train()
    return seen


def test_accepts_loss_kwargs_false_makes_accumulation_equal_one_batch(tmp_path):
    """README: under accumulation transformers trains BERT classification (which accepts loss
    kwargs and ignores num_items_in_batch) on k times its mean loss, so the penalty weighs 1/k
    as much; ``model.accepts_loss_kwargs = False`` gives the gradients of the unaccumulated
    batch. When transformers changes either behaviour this fails, and the README with it."""
    whole = _first_step_grads(tmp_path, 8, 1, None)
    fixed = _first_step_grads(tmp_path, 4, 2, False)
    default = _first_step_grads(tmp_path, 4, 2, None)
    assert whole.keys() == fixed.keys() == default.keys()
    for name, grad in whole.items():
        torch.testing.assert_close(fixed[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    head = "classifier.weight"  # no penalty on it: the task's gradient alone, doubled
    torch.testing.assert_close(default[head], 2 * whole[head], rtol=1e-4, atol=1e-7)


def test_only_the_processes_that_save_write_the_controller(tmp_path):
    """Every process wrote the controller file into ``checkpoint-<step>``, also those that save
    no checkpoint (``args.should_save`` False: not the main process), which made stray folders
    on nodes without a shared file system (found by an audit)."""
    import types

    model, _ = _model()
    callback = IncreLoRACallback(IncreLoRAController(model))
    state = types.SimpleNamespace(global_step=3)
    for saves in (False, True):
        args = types.SimpleNamespace(should_save=saves, output_dir=str(tmp_path))
        callback.on_save(args, state, None)
        assert (tmp_path / "checkpoint-3").exists() == saves


@pytest.mark.parametrize("plain", [False, True], ids=["increlora-trainer", "plain-trainer"])
def test_a_search_trials_checkpoints_hold_the_controller(tmp_path, monkeypatch, plain):
    """hyperparameter_search: the Trainer saves a trial's checkpoints under
    ``<output_dir>/run-<trial>/checkpoint-<step>``, but the controller went to
    ``<output_dir>/checkpoint-<step>``, a stray folder, so no checkpoint of the trial could be
    resumed (no controller file) and load_best_model_at_end found none (found by an audit).
    The trial is the one optuna would hand the Trainer (optuna is not needed: its number)."""
    import pickle
    import types

    import transformers.integrations as hf_integrations
    from transformers.trainer_utils import HPSearchBackend

    from increlora_fast.integrations.trainer import increlora_optimizers

    monkeypatch.setattr(hf_integrations, "hp_params", lambda trial: {})
    model, _ = _model()
    args = _args(tmp_path)
    if plain:
        trainer = Trainer(model=model, args=args, train_dataset=TinyTask(),
                          optimizers=increlora_optimizers(model, lr=1e-2))
        IncreLoRACallback(IncreLoRAController(model)).install(trainer)
    else:
        trainer = IncreLoRATrainer(model=model, args=args, train_dataset=TinyTask())
    trainer.hp_search_backend = HPSearchBackend.OPTUNA
    trainer.hp_space = lambda trial: {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(trial=types.SimpleNamespace(number=3, params={}))
    run = tmp_path / "run-3"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert (run / "checkpoint-6" / "increlora_controller.pt").is_file()
    assert not list(tmp_path.glob("checkpoint-*"))
    callback = next(c for c in trainer.callback_handler.callbacks
                    if isinstance(c, IncreLoRACallback))
    pickle.loads(pickle.dumps(callback))  # (Ray Tune pickles the Trainer with its callbacks)


def test_an_unpickled_trainer_saves_the_controller_into_its_trials_checkpoints(tmp_path):
    """Ray Tune's hyperparameter search runs each trial on an unpickled copy of the Trainer:
    its callback must save into that copy's trial folder, as the original's does."""
    import pickle
    import types

    from transformers.trainer_utils import HPSearchBackend

    model, _ = _model()
    trainer = IncreLoRATrainer(model=model, args=_args(tmp_path), train_dataset=TinyTask())
    # (accelerate's process-wide state stops pickling once any Trainer in the process trained)
    del trainer.accelerator, trainer.gather_function
    copy = pickle.loads(pickle.dumps(trainer))
    copy.hp_search_backend, copy._trial = HPSearchBackend.OPTUNA, types.SimpleNamespace(number=5)
    folder = copy.increlora_callback.checkpoint_folder(copy.args, copy.state)
    assert folder == str(tmp_path / "run-5" / "checkpoint-0")


def test_a_callback_or_trainer_given_something_else_than_a_controller_says_so(tmp_path):
    """``IncreLoRACallback(model)`` (the model where the controller belongs) was accepted and
    failed at train begin with ``'BertForSequenceClassification' object has no attribute
    'layers'`` (found by an audit); IncreLoRATrainer(controller=model) likewise."""
    model, _ = _model()
    for make in (lambda: IncreLoRACallback(model),
                 lambda: IncreLoRATrainer(model=model, args=_args(tmp_path),
                                          train_dataset=TinyTask(), controller=model)):
        with pytest.raises(TypeError) as error:
            make()
        message = str(error.value)
        assert "\n" not in message and "controller" in message
        assert "IncreLoRAController" in message and "BertForSequenceClassification" in message


def test_another_optimizer_keeps_the_trainers_schedule(tmp_path):
    """IncreLoRATrainer(optimizers=(torch AdamW, None)): the schedule of the Trainer's
    ``lr_scheduler_type`` and warmup is the only one such an optimizer has, but the trainer
    put a constant scheduler over it (IncreLoRAAdamW's, whose schedules live inside it), so the
    run trained at the base rate throughout, silently (found by an audit)."""
    model, _ = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    trainer = IncreLoRATrainer(model=model, args=_args(tmp_path, warmup_steps=3),
                               train_dataset=TinyTask(), optimizers=(optimizer, None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    # the Trainer's linear schedule: 3 warmup steps, then down to 0 at the last step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert not [w for w in caught if "warmup steps" in str(w.message)]


def test_the_penalty_joins_a_loss_on_another_device(tmp_path, monkeypatch):
    """A model split over GPUs (``device_map``) computes its loss on the last layers' device,
    while the orthogonal penalty lives on the first adapted layer's: adding the two failed
    with a device mismatch at the first step (found by the integrations audit). The penalty is
    moved to the loss's device. No second device here: a stand-in penalty reports another
    device and gives its value when moved to the loss's."""
    model, _ = _model()
    trainer = IncreLoRATrainer(model=model, args=_args(tmp_path), train_dataset=TinyTask())
    value = torch.tensor(0.25, requires_grad=True)
    moved_to = []

    class OnAnotherDevice:
        device = torch.device("cuda", 1)

        def to(self, device):
            moved_to.append(torch.device(device))
            return value

    monkeypatch.setattr(trainer.increlora_controller, "regularization_loss",
                        lambda: OnAnotherDevice())
    batch = [TinyTask()[i] for i in range(4)]
    inputs = {k: torch.stack([torch.as_tensor(b[k]) for b in batch]) for k in batch[0]}
    model.train()
    torch.manual_seed(0)  # (the same dropout masks in both forwards)
    loss = trainer.compute_loss(model, inputs)
    torch.manual_seed(0)
    with torch.no_grad():
        own = model(**inputs).loss
    assert moved_to == [own.device]
    assert loss.item() == pytest.approx(own.item() + 0.25, rel=1e-6)


def test_frozen_adapters_under_another_optimizer_are_said_at_train(tmp_path):
    """The Trainer's construction no longer warns about a model whose adapters are all frozen
    (an evaluation-only Trainer is legitimate), on the ground that train() refuses it; but only
    `create_optimizer` refuses, and it is not called when the Trainer is given an optimizer
    (``optimizers=(optimizer, None)``): such a run trained none of its adapters without a
    word. train() now says so there (refusing would stop a run that trains other parameters)."""
    model, _ = _model()
    from increlora_fast.model import increlora_layers
    for _, layer in increlora_layers(model):
        for kind in ("lora_A", "lora_B", "lora_lambda"):
            getattr(layer, kind).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params  # the head still trains
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # evaluation-only: nothing to say yet
        trainer = IncreLoRATrainer(model=model, args=_args(tmp_path),
                                   train_dataset=TinyTask(), optimizers=(optimizer, None))
    assert _said_while_training(trainer, "every adapter tensor")


def test_train_ending_in_a_score_window_leaves_no_score_tracking(tmp_path):
    """A run whose last step sets the layers to track the next one (a round was due at step 6)
    switches tracking off when ``train()`` ends: later passes (a second fine-tuning stage,
    gradients taken for analysis) pay no score, and exact-step mode's dense fp32 copy of every
    target weight is freed instead of held for the rest of the process."""
    model, _ = tiny_increlora_bert(warmup_steps=2, exact_step_score=True)
    trainer = IncreLoRATrainer(model=model, args=_args(tmp_path, max_steps=5, save_steps=100),
                               train_dataset=TinyTask())
    trainer.train()
    layers = trainer.increlora_controller.layers
    assert trainer.increlora_controller.is_tracked(5)  # the step that never came was tracked
    assert not any(layer.score_enabled or layer.score_grad is not None for layer in layers)
    batch = TinyTask()[0]
    out = model(input_ids=batch["input_ids"][None], labels=torch.tensor([batch["labels"]]))
    out.loss.backward()
    assert all(layer.score_grad is None and not layer.score_sum.any() for layer in layers)


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("total_step", [6, STEPS])
def test_a_total_step_before_max_steps_is_said(tmp_path, plain, total_step):
    """IncreLoRAConfig.total_step below the Trainer's max_steps: every rate of the per-slot
    AdamW reached 0 at total_step, so the later steps trained nothing and the slots grown in
    them never trained, without a word (a None total_step follows max_steps)."""
    from increlora_fast.integrations.trainer import increlora_optimizers

    model, _ = tiny_increlora_bert(warmup_steps=2, total_step=total_step)
    args = _args(tmp_path, save_strategy="no")
    if plain:
        trainer = Trainer(model=model, train_dataset=TinyTask(), args=args,
                          optimizers=increlora_optimizers(model, lr=1e-2))
        IncreLoRACallback(IncreLoRAController(model)).install(trainer)
    else:
        trainer = IncreLoRATrainer(model=model, train_dataset=TinyTask(), args=args)
    said = _said_while_training(trainer, "total_step")
    if total_step == STEPS:
        assert said == []
    else:
        assert len(said) == 1 and "total_step=6" in said[0] and f"max_steps={STEPS}" in said[0]
