"""A failed call leaves the model exactly as it was; the API refuses what would silently break
(issue 14 items 7 and 8)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

from increlora_fast import IncreLoRAConfig, IncreLoRAController, create_optimizer, inject_increlora
from increlora_fast.integrations import export_peft
from increlora_fast.integrations.trainer import IncreLoRATrainer, save_controller

from method_helpers import ParallelBranches, batch, branch_config, train_steps
from trainer_helpers import TinyTask, tiny_increlora_bert


def snapshot(model: nn.Module) -> dict:
    return {"tensors": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "modules": [(n, type(m)) for n, m in model.named_modules()]}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"] and after["grad"] == before["grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key


def test_inject_on_the_meta_device_fails_before_touching_anything():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="'0' has its weight on the meta device"):
        inject_increlora(model, IncreLoRAConfig(target_modules=["0", "2"], r_max=4))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [type(m) for m in model.modules()] == types and not hasattr(model, "increlora_config")


def test_inject_under_accelerates_init_empty_weights_is_refused():
    """accelerate's ``init_empty_weights`` moves every parameter made inside it to the meta
    device: injecting there into a loaded model left the adapters on meta beside real base
    weights and buffers, and the first forward failed deep in torch ("Tensor on device meta is
    not on the expected device cpu!"), found by an audit. It is refused, and nothing changes."""
    accelerate = pytest.importorskip("accelerate")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = snapshot(model)
    with accelerate.init_empty_weights(), pytest.raises(ValueError) as error:
        inject_increlora(model, IncreLoRAConfig(target_modules=["0", "2"], r_max=4))
    message = str(error.value)
    assert "\n" not in message and "meta" in message and "init_empty_weights" in message
    assert_unchanged(model, before)
    assert not hasattr(model, "increlora_config")
    inject_increlora(model, IncreLoRAConfig(target_modules=["0", "2"], r_max=4))
    assert model[0].lora_A.device == model[0].base_layer.weight.device


def test_inject_that_fails_while_wrapping_undoes_everything(monkeypatch):
    import increlora_fast.model as model_mod

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = snapshot(model)
    calls = {"n": 0}

    class SecondFails(model_mod.IncreLoRALinear):
        def __init__(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("out of memory")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(model_mod, "IncreLoRALinear", SecondFails)
    with pytest.raises(RuntimeError, match="out of memory"):
        inject_increlora(model, IncreLoRAConfig(target_modules=["0", "2"], r_max=4))
    assert_unchanged(model, before)
    assert not hasattr(model, "increlora_config")


def _trained(n: int = 3):
    torch.manual_seed(0)
    model = ParallelBranches(n)
    config = branch_config(modules_to_save=None)
    inject_increlora(model, config)
    opt = create_optimizer(model, config, lr=1e-2)
    ctl = IncreLoRAController(model, config)
    train_steps(model, opt, ctl, range(6))
    return model, ctl


@pytest.mark.parametrize("damage", ["names", "ipt", "missing", "generator"])
def test_controller_load_state_dict_checks_everything_first(damage):
    _, source = _trained()
    state = source.state_dict()
    _, target = _trained()
    target.ipt.fill_(7.0)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
              for k, v in target.state_dict().items()}
    if damage == "names":
        state["names"] = state["names"][:2]
    elif damage == "ipt":
        state["ipt"] = state["ipt"][:2]
    elif damage == "missing":
        del state["warned_nonfinite"]
    else:
        state["generator"] = torch.zeros(3, dtype=torch.float32)
    with pytest.raises(ValueError, match="controller state"):
        target.load_state_dict(state)
    after = target.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


def _bert(targets):
    return tiny_increlora_bert(targets)[0]


def _args(out):
    return TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_steps=2, logging_steps=100, report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True)


@pytest.mark.parametrize("damage,message", [
    ("not_a_dict", "controller state must be a dict, got list"),
    ("allocation_log", r"controller state allocation_log must be a list of dicts \(one per round\)"),
    ("log_entry", r"controller state allocation_log must be a list of dicts \(one per round\)"),
    ("log_module", r"controller state allocation_log must be a list of dicts \(one per round\)"),
    ("nonfinite_step", "controller state nonfinite_step must be an int >= -1"),
    ("nonfinite_bool", "controller state nonfinite_step must be an int >= -1"),
    ("budget_reached", "controller state budget_reached must be True or False"),
    ("warned_nonfinite", "controller state warned_nonfinite must be True or False"),
    ("round_pending", "controller state round_pending must be True or False"),
    ("next_step", "controller state next_step must be an int >= 0 or None"),
])
def test_controller_state_of_the_wrong_form_is_named(damage, message):
    _, source = _trained()
    state = source.state_dict()
    if damage == "not_a_dict":
        state = list(state.items())
    elif damage == "allocation_log":
        state["allocation_log"] = tuple(state["allocation_log"])
    elif damage == "log_entry":  # dict() of it raised a TypeError after the checks passed
        state["allocation_log"] = state["allocation_log"] + [["step", 4]]
    elif damage == "log_module":  # an unhashable module name failed after ipt/unc were set
        state["allocation_log"] = state["allocation_log"] + [{"step": 4, "module": ["fc"]}]
    elif damage == "nonfinite_step":
        state["nonfinite_step"] = -2
    elif damage == "nonfinite_bool":
        state["nonfinite_step"] = True
    elif damage == "next_step":
        state["next_step"] = "4"  # a later step() would fail comparing it
    else:  # bool("False") is True: allocation would end at once
        state[damage] = "False"
    _, target = _trained()
    with pytest.raises(ValueError, match=f"^{message}$"):
        target.load_state_dict(state)
    target.load_state_dict(source.state_dict())  # the intact state loads


def test_controller_state_after_numpy_step_indices_loads():
    """A loop counting its steps with numpy (``for step in np.arange(n)``) left a numpy integer
    as the state's next_step, which check_state_dict refuses: the controller's own state_dict
    could not be loaded back."""
    import numpy as np

    torch.manual_seed(0)
    model = ParallelBranches(3)
    config = branch_config(modules_to_save=None)
    inject_increlora(model, config)
    opt = create_optimizer(model, config, lr=1e-2)
    ctl = IncreLoRAController(model, config)
    for step in np.arange(3):
        x, y = batch(int(step))
        ((model(x) - y) ** 2).mean().backward()
        ctl.step(step)
        opt.step()
        opt.zero_grad()
    state = ctl.state_dict()
    _, target = _trained()
    target.load_state_dict(state)
    assert target.state_dict()["next_step"] == 3


def test_controller_on_a_model_without_adapters_says_to_inject():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="model has no IncreLoRA layers: call inject_increlora"):
        IncreLoRAController(model, IncreLoRAConfig(target_modules=["0"], r_max=4))


def test_trainer_resume_into_other_targets_changes_nothing(tmp_path):
    IncreLoRATrainer(model=_bert(["query", "key", "value"]), args=_args(tmp_path),
                     train_dataset=TinyTask(32)).train()
    other = _bert(["query", "value"])
    before = snapshot(other)
    trainer = IncreLoRATrainer(model=other, args=_args(tmp_path / "b"), train_dataset=TinyTask(32))
    with pytest.raises(ValueError, match="other modules"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert_unchanged(other, before)


def test_trainer_resume_with_a_damaged_controller_file_is_a_clear_error(tmp_path):
    IncreLoRATrainer(model=_bert(["query", "value"]), args=_args(tmp_path),
                     train_dataset=TinyTask(32)).train()
    path = tmp_path / "checkpoint-2" / "increlora_controller.pt"
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    again = _bert(["query", "value"])
    before = snapshot(again)
    trainer = IncreLoRATrainer(model=again, args=_args(tmp_path / "b"), train_dataset=TinyTask(32))
    with pytest.raises(ValueError, match="increlora_controller.pt is not readable"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert_unchanged(again, before)


def test_controller_file_flip_is_caught_by_its_checksum(tmp_path):
    from increlora_fast.integrations.trainer import read_controller_state

    _, ctl = _trained()
    save_controller(ctl, str(tmp_path))
    path = tmp_path / "increlora_controller.pt"
    data = bytearray(path.read_bytes())
    payload_at = data.find(b"ipt")  # inside the pickled payload bytes
    data[payload_at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="increlora_controller.pt (is corrupted|is not readable)"):
        read_controller_state(str(tmp_path))


def test_a_controller_file_without_a_checksum_loads_and_another_object_is_named(tmp_path):
    """A controller file written before the checksum (the state dict itself) still resumes;
    a torch file holding anything else is named as not a controller state."""
    from increlora_fast.integrations.trainer import read_controller_state

    _, ctl = _trained()
    path = tmp_path / "increlora_controller.pt"
    torch.save(ctl.state_dict(), path)
    assert read_controller_state(str(tmp_path))["names"] == ctl.names
    torch.save({"step": 3}, path)
    with pytest.raises(ValueError, match=r"increlora_controller\.pt is not an IncreLoRA "
                                         r"controller state$"):
        read_controller_state(str(tmp_path))


def _save_weights(model: nn.Module, directory, shards: int = 1) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = ("model.safetensors" if shards == 1
                else f"model-{i + 1:05d}-of-{shards:05d}.safetensors")
        part = keys[i::shards]
        save_file({k: tensors[k] for k in part}, str(directory / name))
        weight_map.update({k: name for k in part})
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 2])
def test_check_model_checkpoint_reads_whole_and_sharded_weights(tmp_path, shards):
    """The adapter shapes of the checkpoint's safetensors weights, sharded or not, are checked
    against the model's; a checkpoint without them is not checked."""
    from increlora_fast.integrations.trainer import check_model_checkpoint

    model, _ = _trained()
    check_model_checkpoint(model, str(tmp_path))  # no safetensors weights: nothing to check
    _save_weights(model, tmp_path, shards)
    check_model_checkpoint(model, str(tmp_path))
    other, _ = _trained()
    layer = other.branches[1]
    layer.lora_A = nn.Parameter(torch.zeros(layer.r_max + 1, layer.in_features))
    with pytest.raises(ValueError, match=r"branches\.1\.lora_A has shape \(6, 6\), the model "
                                         r"needs \(7, 6\); nothing was loaded"):
        check_model_checkpoint(other, str(tmp_path))


def test_check_model_checkpoint_names_an_unreadable_weights_file(tmp_path):
    from increlora_fast.integrations.trainer import check_model_checkpoint

    model, _ = _trained()
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors "
                                         r"file"):
        check_model_checkpoint(model, str(tmp_path))


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0, -1.0])
def test_create_optimizer_rejects_non_finite_or_non_positive_lr(lr):
    model, _ = _trained()
    with pytest.raises(ValueError, match="create_optimizer lr="):
        create_optimizer(model, lr=lr)


def test_create_optimizer_rejects_a_model_without_adapters():
    model = nn.Sequential(nn.Linear(4, 4))
    model.increlora_config = IncreLoRAConfig(target_modules=["0"], r_max=4)
    with pytest.raises(ValueError, match="holds no IncreLoRA layer"):
        create_optimizer(model, lr=1e-3)


def test_export_peft_validates_task_type(tmp_path):
    model, _ = _trained()
    with pytest.raises(ValueError, match="task_type='NOT_A_TASK' is invalid.*SEQ_CLS"):
        export_peft(model, tmp_path / "peft", task_type="NOT_A_TASK")
    assert not (tmp_path / "peft").exists()
    export_peft(model, tmp_path / "peft", task_type="SEQ_CLS")
