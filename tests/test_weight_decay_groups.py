"""Weight decay spares biases and normalization weights, as the Hugging Face Trainer and the
authors' trainer do: `create_optimizer` gives them a group of their own without decay (the
adapters keep it), finetune's peers follow the same rule, and an optimizer state saved with the
former single group of non-adapter parameters still loads."""
from __future__ import annotations

import pytest
import torch

from increlora_fast import create_optimizer
from increlora_fast.model import increlora_layers
from increlora_fast.optimizer import no_decay_parameters
from trainer_helpers import tiny_increlora_bert


def _model():
    model, config = tiny_increlora_bert(warmup_steps=0)
    # an encoder LayerNorm trained too: its weight and bias take no decay
    for p in model.bert.encoder.layer[0].output.LayerNorm.parameters():
        p.requires_grad_(True)
    return model, config


def _names(model, params) -> set:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_groups_follow_the_hugging_face_trainers_rule():
    from transformers import Trainer
    model, config = _model()
    optimizer = create_optimizer(model, config, lr=1e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["increlora", "other", "other_no_decay"]
    assert [groups[k]["weight_decay"] for k in groups] == [0.1, 0.1, 0.0]
    adapters = {id(getattr(layer, kind)) for _, layer in increlora_layers(model)
                for kind in ("lora_A", "lora_B", "lora_lambda")}
    assert {id(p) for p in groups["increlora"]["params"]} == adapters
    other = _names(model, groups["other"]["params"])
    no_decay = _names(model, groups["other_no_decay"]["params"])
    assert other == {"classifier.weight"}
    assert no_decay == {"classifier.bias", "bert.encoder.layer.0.output.LayerNorm.weight",
                        "bert.encoder.layer.0.output.LayerNorm.bias"}
    # the Trainer's own decision on the same names (transformers' rule, not ours)
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    assert other <= decayed and not no_decay & decayed


def test_a_step_decays_the_classifier_weight_but_no_bias_or_norm():
    model, config = _model()
    optimizer = create_optimizer(model, config, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: only weight decay moves a parameter
    after = dict(model.named_parameters())
    factor = 1 - 0.1 * 0.5
    torch.testing.assert_close(after["classifier.weight"].detach(),
                               before["classifier.weight"] * factor)
    for name in ("classifier.bias", "bert.encoder.layer.0.output.LayerNorm.weight",
                 "bert.encoder.layer.0.output.LayerNorm.bias"):
        assert torch.equal(after[name].detach(), before[name]), name


def _old_format(state: dict, optimizer, dense) -> dict:
    """``state`` as optimizers saved it before 2026-12-06: one group "other" of the non-adapter
    parameters, in the model's order."""
    groups = state["param_groups"]
    index = {id(p): i for g, saved in zip(optimizer.param_groups, groups)
             for p, i in zip(g["params"], saved["params"])}
    other = dict(groups[1], params=[index[id(p)] for p in dense], weight_decay=0.1)
    other.pop("name")
    return dict(state, param_groups=[groups[0], dict(other, name="other")])


def test_a_state_saved_with_one_group_of_other_parameters_loads_split():
    model, config = _model()
    optimizer = create_optimizer(model, config, lr=1e-3, weight_decay=0.1)
    ids = torch.randint(0, 50, (2, 6))
    model(input_ids=ids).logits.square().sum().backward()
    optimizer.step()
    dense = [p for p in model.parameters() if p.requires_grad and
             all(p is not getattr(layer, k) for _, layer in increlora_layers(model)
                 for k in ("lora_A", "lora_B", "lora_lambda"))]
    old = _old_format(optimizer.state_dict(), optimizer, dense)
    fresh = create_optimizer(model, config, lr=1e-3, weight_decay=0.1)
    fresh.load_state_dict(old)
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.1, 0.1, 0.0]
    assert fresh.global_step == optimizer.global_step
    for p in dense:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh.state[p][key], optimizer.state[p][key])
    # an optimizer not made by create_optimizer cannot tell the old order: one clear error
    del fresh._dense_order
    with pytest.raises(ValueError, match="groups \\['increlora', 'other'\\].*2026-12-06"):
        fresh.load_state_dict(old)


def test_no_decay_parameters_matches_norm_names_and_layernorm_modules():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 3)
            self.ln = torch.nn.LayerNorm(3)      # by type
            self.final_norm = torch.nn.Linear(3, 3)  # "_norm." by name
            self.normalizer = torch.nn.Linear(3, 3, bias=False)  # not a norm name
    model = Tiny()
    names = _names(model, [p for p in model.parameters() if id(p) in no_decay_parameters(model)])
    assert names == {"proj.bias", "ln.weight", "ln.bias", "final_norm.weight",
                     "final_norm.bias"}
    # a parametrized LayerNorm weight lives below the LayerNorm, as the Trainer's rule sees it
    torch.nn.utils.parametrize.register_parametrization(model.ln, "weight", torch.nn.Identity())
    from transformers import Trainer
    names = _names(model, [p for p in model.parameters() if id(p) in no_decay_parameters(model)])
    assert "ln.parametrizations.weight.original" in names
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    assert not names & decayed
    assert decayed == {n for n, _ in model.named_parameters()} - names


@pytest.mark.parametrize("method", ["lora", "adalora", "increlora"])
def test_finetunes_methods_all_spare_biases_and_norms(tmp_path, method):
    """The comparisons stay fair: every method of `finetune` decays the same kind of
    parameters (its own adapters and the classifier's weight), none a bias or a norm."""
    from finetune_helpers import tiny_files
    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.settings import RunSettings
    tiny = tiny_files(tmp_path, train_rows=16, dev_rows=8)
    _, _, run, _ = build_run(RunSettings(
        model=tiny["model"], task=None, train_file=tiny["train"], eval_file=tiny["dev"],
        batch_size=4, max_seq_len=16, max_steps=4, method=method, weight_decay=0.1))
    decayed, spared = set(), set()
    for group in run.optimizer.param_groups:
        (decayed if group["weight_decay"] == 0.1 else spared).update(
            _names(run.model, group["params"]))
        assert group["weight_decay"] in (0.1, 0.0)
    assert decayed and spared and not decayed & spared
    assert all("bias" in n or "norm" in n.lower() for n in spared), spared
    assert not any("bias" in n or "norm" in n.lower() for n in decayed), decayed
    assert any("classifier" in n and n.endswith("weight") for n in decayed)


def test_a_peers_checkpoint_with_one_group_is_refused_before_anything_is_restored(tmp_path):
    """A LoRA run's checkpoint from before the split (its AdamW had one group) would load its
    moments into the wrong parameters: refused with one line, the run left as it was."""
    from finetune_helpers import tiny_files
    from increlora_fast.training.checkpoint import load_checkpoint, save_checkpoint
    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.loop import LoopState
    from increlora_fast.training.settings import RunSettings
    tiny = tiny_files(tmp_path, train_rows=16, dev_rows=8)
    settings = RunSettings(model=tiny["model"], task=None, train_file=tiny["train"],
                           eval_file=tiny["dev"], batch_size=4, max_seq_len=16, max_steps=4,
                           method="lora", weight_decay=0.1)
    _, _, old, _ = build_run(settings)
    old.optimizer = torch.optim.AdamW([p for p in old.model.parameters() if p.requires_grad],
                                      lr=1e-3, weight_decay=0.1)
    with torch.no_grad():
        for p in old.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    folder = save_checkpoint(tmp_path / "checkpoint-0", old, settings, LoopState())
    _, _, new, _ = build_run(settings)
    before = {n: p.detach().clone() for n, p in new.model.named_parameters()}
    with pytest.raises(ValueError, match="1 parameter groups.*lora run's optimizer 2.*"
                                         "resume it with the release that wrote it"):
        load_checkpoint(folder, new)
    assert all(torch.equal(p, before[n]) for n, p in new.model.named_parameters())


def _to_former_groups(checkpoint, optimizer, model) -> None:
    """Rewrite the Trainer checkpoint's ``optimizer.pt`` and ``scheduler.pt`` as the previous
    release wrote them: the groups ["increlora", "other"] (every non-adapter parameter in
    "other", in the model's order, numbered in that order) and a LambdaLR over two groups."""
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    saved = {id(p): i for g, sg in zip(optimizer.param_groups, state["param_groups"])
             for p, i in zip(g["params"], sg["params"])}
    adapter = state["param_groups"][0]
    dense = [p for p in model.parameters() if id(p) in saved and
             id(p) not in {id(q) for q in optimizer.param_groups[0]["params"]}]
    order = adapter["params"] + [saved[id(p)] for p in dense]
    renumber = {old: new for new, old in enumerate(order)}
    other = dict(state["param_groups"][1], weight_decay=0.1,
                 params=[renumber[saved[id(p)]] for p in dense])
    state = {"state": {renumber[i]: v for i, v in state["state"].items()},
             "param_groups": [dict(adapter, params=[renumber[i] for i in adapter["params"]]),
                              other],
             "global_step": state["global_step"]}
    torch.save(state, checkpoint / "optimizer.pt")
    scheduler = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        scheduler[key] = scheduler[key][:2]
    torch.save(scheduler, checkpoint / "scheduler.pt")


def test_a_trainer_checkpoint_of_the_former_groups_resumes_exactly(tmp_path):
    """`IncreLoRATrainer` resumed from a checkpoint of the previous release: its optimizer state
    loads split (`_regrouped`), and so must its scheduler's (one constant factor per group;
    torch's LambdaLR zips its base rates with the groups strictly and failed at the first step
    after the resume). The run then ends where an uninterrupted one does."""
    from transformers import TrainingArguments
    from increlora_fast.integrations.trainer import IncreLoRATrainer
    from trainer_helpers import TinyTask

    def trainer(out):
        model, _ = _model()
        args = TrainingArguments(output_dir=str(out), max_steps=8, per_device_train_batch_size=8,
                                 learning_rate=1e-2, weight_decay=0.1, save_steps=4,
                                 logging_steps=100, report_to=[], use_cpu=True, seed=0,
                                 disable_tqdm=True)
        return IncreLoRATrainer(model=model, args=args, train_dataset=TinyTask()), model

    full, model = trainer(tmp_path / "a")
    full.train()
    assert [g["name"] for g in full.optimizer.optimizer.param_groups] == \
        ["increlora", "other", "other_no_decay"]
    _to_former_groups(tmp_path / "a" / "checkpoint-4", full.optimizer.optimizer, model)
    resumed, resumed_model = trainer(tmp_path / "a")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert [g["weight_decay"] for g in resumed.optimizer.optimizer.param_groups] == \
        [0.1, 0.1, 0.0]
    state = resumed_model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_still_takes_a_state_of_the_former_groups(how):
    """A copy of an optimizer made by create_optimizer (``copy.deepcopy((model, optimizer))``
    or a pickle of both) knows the non-adapter parameters' former order as the original does:
    it loads a state saved with one group "other" onto its own parameters."""
    import copy
    import io
    model, config = _model()
    optimizer = create_optimizer(model, config, lr=1e-3, weight_decay=0.1)
    model(input_ids=torch.randint(0, 50, (2, 6))).logits.square().sum().backward()
    optimizer.step()
    old = _old_format(optimizer.state_dict(), optimizer, optimizer._dense_order)
    if how == "deepcopy":
        model2, copied = copy.deepcopy((model, optimizer))
    else:
        buffer = io.BytesIO()
        torch.save((model, optimizer), buffer)
        buffer.seek(0)
        model2, copied = torch.load(buffer, weights_only=False)
    copied.load_state_dict(old)
    names = {id(p): n for n, p in model2.named_parameters()}
    originals = {n: p for n, p in model.named_parameters()}
    for p in copied._dense_order:
        assert p is dict(model2.named_parameters())[names[id(p)]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(copied.state[p][key], optimizer.state[originals[names[id(p)]]][key])
