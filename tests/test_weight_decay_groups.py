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
