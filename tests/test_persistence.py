"""save_adapter / load_adapter: round trips, the config file, files that do not fit, atomic writes."""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import adapter_helpers
from adapter_helpers import fresh
from increlora_fast import (IncreLoRAConfig, create_optimizer, increlora_layers, inject_increlora,
                            load_adapter, load_config, rank_pattern, save_adapter)
from increlora_fast import persistence
from increlora_fast.controller import IncreLoRAController
from increlora_fast.layer import IncreLoRALinear

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def make_config(**kwargs) -> IncreLoRAConfig:
    values = dict(target_modules=["fc", "proj"], r_max=6, init_r=1, target_rank=3,
                  modules_to_save=["head"], reserve_lambda=0.05)
    values.update(kwargs)
    return IncreLoRAConfig(**values)


def trained(base: nn.Module, config: IncreLoRAConfig) -> nn.Module:
    """`adapter_helpers.trained` with an uneven rank pattern (0 to 2 extra ranks per module,
    each followed by a fresh reserve)."""
    def grow(i: int, layer: IncreLoRALinear) -> None:
        for _ in range(i % 3):
            layer.activate_reserve(config.incre_rank_num, step=10 * (i + 1))
            layer.add_reserve(config.incre_rank_num, step=10 * (i + 1))
    return adapter_helpers.trained(base, config, grow)


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.fixture
def saved(tmp_path, tiny_net):
    """(base model, config, trained model, directory holding its inference-layout adapter)."""
    config = make_config()
    model = trained(tiny_net, config)
    save_adapter(model, tmp_path / "adapter")
    return tiny_net, config, model, tmp_path / "adapter"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("training_state", [False, True], ids=["inference", "training"])
def test_round_trip_gives_identical_outputs(tmp_path, tiny_net, training_state, dtype):
    config = make_config()
    tiny_net.to(dtype)
    source = trained(tiny_net, config)
    save_adapter(source, tmp_path, training_state=training_state)
    target = fresh(tiny_net, config)
    x = torch.randn(3, 4, 12, dtype=dtype)
    assert not torch.allclose(target(x), source(x), atol=1e-2)

    assert load_adapter(target, tmp_path) is target
    assert torch.equal(target(x), source(x))
    assert rank_pattern(target) == rank_pattern(source)
    assert torch.equal(target.head.weight, source.head.weight)
    src_layers = dict(increlora_layers(source))
    for name, layer in increlora_layers(target):
        assert torch.equal(layer.slot_state, src_layers[name].slot_state)
    if training_state:
        assert_same_state(target, source.state_dict())


@pytest.mark.parametrize("training_state", [False, True], ids=["inference", "training"])
def test_adapter_saved_with_a_float16_lambda_still_loads(tmp_path, tiny_net, training_state):
    """Before lambda was kept in float32, adapter_dtype="base" on a float16 base saved a float16
    lambda: such a file loads, its lambda cast to float32."""
    config = make_config(adapter_dtype="base")
    tiny_net.half()
    source = trained(tiny_net, config)
    save_adapter(source, tmp_path, training_state=training_state)
    path = tmp_path / WEIGHTS
    with safe_open(str(path), "pt") as f:  # rewrite it as the old code wrote it
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    lambdas = [k for k in tensors if k.endswith(".lora_lambda")]
    assert lambdas and all(tensors[k].dtype == torch.float32 for k in lambdas)
    for key in lambdas:
        tensors[key] = tensors[key].half()
    meta["sha256"] = persistence.tensors_digest(tensors)
    save_file(tensors, str(path), metadata=meta)

    target = load_adapter(fresh(tiny_net, config), tmp_path)
    src_layers = dict(increlora_layers(source))
    for name, layer in increlora_layers(target):
        assert layer.lora_lambda.dtype == torch.float32
        assert layer.lora_A.dtype == torch.float16
        used = layer.used_rank
        torch.testing.assert_close(layer.lora_lambda[:used],
                                   src_layers[name].lora_lambda[:used].half().float(),
                                   rtol=0, atol=0)
        assert torch.equal(layer.lora_A[:used], src_layers[name].lora_A[:used])


def test_saved_file_sizes_follow_the_layout(tmp_path, tiny_net):
    source = trained(tiny_net, make_config())
    save_adapter(source, tmp_path / "inference")
    save_adapter(source, tmp_path / "training", training_state=True)
    with safe_open(str(tmp_path / "inference" / WEIGHTS), "pt") as f:
        for name, layer in increlora_layers(source):
            assert f.get_slice(f"{name}.lora_A").get_shape() == [layer.used_rank, 12 if
                                                                  name.endswith("fc") else 20]
            assert f"{name}.slot_active_step" not in f.keys()
    with safe_open(str(tmp_path / "training" / WEIGHTS), "pt") as f:
        for name, layer in increlora_layers(source):
            assert f.get_slice(f"{name}.lora_A").get_shape()[0] == layer.r_max
            assert torch.equal(f.get_tensor(f"{name}.slot_alloc_step"), layer.slot_alloc_step)


def test_adapter_config_json(saved):
    _, config, model, directory = saved
    data = json.loads((directory / CONFIG).read_text())
    pattern = {name: layer.active_rank for name, layer in increlora_layers(model)}
    assert len(set(pattern.values())) > 1
    assert data["rank_pattern"] == pattern
    for key, value in config.to_dict().items():
        assert data[key] == value, key
    assert data["training_state"] is False
    assert load_config(directory) == config


@pytest.mark.parametrize("change, message", [
    (dict(lora_alpha=8.0), r"lora_alpha \(file 16.0, model 8.0\)"),
    (dict(reserve_lambda=0.5), r"reserve_lambda \(file 0.05, model 0.5\)"),
    (dict(advance_learning=False), r"advance_learning \(file True, model False\)"),
    (dict(adapter_dtype="base"), r"adapter_dtype \(file 'auto', model 'base'\)"),
    (dict(r_max=7), r"r_max \(file 6, model 7\)"),
    (dict(lora_alpha=8.0, total_step=500), r"differs in lora_alpha \(file 16.0, model 8.0\)$"),
])
def test_another_adapter_config_is_rejected(saved, change, message):
    """The fields that change what the adapter computes (`config.ADAPTER_FIELDS`) must be
    equal; the error names only those."""
    base, _, _, directory = saved
    target = fresh(base, make_config(**change))
    before = state(target)
    with pytest.raises(ValueError, match=message):
        load_adapter(target, directory)
    assert_same_state(target, before)


# fields that steer training only: allocation, schedules, score, penalty, dropout
_TRAINING_ONLY = dict(target_rank=2, init_warmup=7, incre_interval=9, top_h=1, total_step=500,
                      warmup_steps=3, orth_reg_weight=0.3, beta1=0.5, score="triplet", seed=4,
                      lora_dropout=0.1, score_window=5, scale_preserving_growth=True)


def test_other_training_settings_load_an_inference_adapter_silently(saved):
    """An adapter loads into a model injected for another training plan (found by a review: it
    was refused unless every field was equal, so a user fine-tuning a trained adapter further
    with a longer schedule had to copy the old one): the outputs are the saved model's."""
    base, _, source, directory = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target = load_adapter(fresh(base, make_config(**_TRAINING_ONLY)), directory)
    x = torch.randn(4, 12)
    assert torch.equal(target.eval()(x), source.eval()(x))


def test_other_training_settings_of_a_training_state_are_named_in_a_warning(tmp_path, tiny_net):
    """A resume under other training settings loads, warned with each field that differs, and
    keeps training and growing under the model's config."""
    config = make_config()
    source = trained(tiny_net, config)
    save_adapter(source, tmp_path, training_state=True)
    other = make_config(**_TRAINING_ONLY)
    with pytest.warns(UserWarning, match=r"other training settings: .*init_warmup \(file 100, "
                      r"model 7\).*total_step \(file None, model 500\)") as caught:
        target = load_adapter(fresh(tiny_net, other), tmp_path)
    text = str(caught[0].message)
    assert all(f"{k} (file" in text for k in _TRAINING_ONLY) and "lora_alpha" not in text
    x = torch.randn(4, 12)
    assert torch.equal(target.eval()(x), source.eval()(x))
    before = rank_pattern(target)
    optimizer = create_optimizer(target.train(), other, lr=1e-2)
    controller = IncreLoRAController(target, other)
    for step in range(17):  # the model's plan: rounds after step 7, every 9 steps
        loss = target(torch.randn(8, 12)).square().mean() + controller.regularization_loss()
        loss.backward()
        controller.step(step)
        optimizer.step()
        optimizer.zero_grad()
    after = controller.rank_pattern()
    assert sum(after.values()) > sum(before.values()), (before, after)


def test_module_lists_in_another_order_are_the_same_config(tmp_path, tiny_net):
    """target_modules, modules_to_save and exclude_modules select modules as sets (peft's
    LoraConfig holds them as sets): the same names in another order (or repeated) load, as they
    adapt the same modules (found by an audit: refused as "config differs in target_modules");
    another name is still refused."""
    source = trained(tiny_net, make_config(target_modules=["fc", "proj"], modules_to_save=["head"],
                                           exclude_modules=["0.fc", "1.proj"]))
    save_adapter(source, tmp_path)
    same = make_config(target_modules=["proj", "fc", "proj"], modules_to_save=["head", "head"],
                       exclude_modules=["1.proj", "0.fc"])
    target = load_adapter(fresh(tiny_net, same), tmp_path)
    x = torch.randn(4, 12)
    assert torch.equal(target.eval()(x), source.eval()(x))
    with pytest.raises(ValueError, match=r"config differs in exclude_modules"):
        load_adapter(fresh(tiny_net, make_config(exclude_modules=["1.proj"])), tmp_path)


@pytest.mark.parametrize("training_state", [False, True], ids=["inference", "training"])
def test_other_shapes_are_rejected(tmp_path, tiny_net, make_tiny_net, training_state):
    config = make_config()
    save_adapter(trained(tiny_net, config), tmp_path, training_state=training_state)
    target = fresh(make_tiny_net(hidden=24), config)
    before = state(target)
    with pytest.raises(ValueError, match=r"does not fit.*shape"):
        load_adapter(target, tmp_path)
    assert_same_state(target, before)


def test_other_module_names_are_rejected(tmp_path, tiny_net, make_tiny_net):
    config = make_config()
    save_adapter(trained(make_tiny_net(depth=3), config), tmp_path)
    target = fresh(tiny_net, config)
    before = state(target)
    with pytest.raises(ValueError, match=r"unknown tensors.*blocks\.2\."):
        load_adapter(target, tmp_path)
    assert_same_state(target, before)

    save_adapter(trained(make_tiny_net(depth=1), config), tmp_path, overwrite=True)
    with pytest.raises(ValueError, match=r"missing tensors.*blocks\.1\."):
        load_adapter(target, tmp_path)
    assert_same_state(target, before)


def _header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = 8 + _header_length(path) // 3
    data[start:start + 6] = b"\xff\x00\xfe\x01\xfd\x02"
    path.write_bytes(bytes(data))


def _corrupt_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = 8 + _header_length(path)
    middle = start + (len(data) - start) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _not_ours(path: Path) -> None:
    save_file({"weight": torch.randn(4, 4)}, str(path))


@pytest.mark.parametrize("damage,message", [
    (_truncate, "truncated or corrupted"),
    (_corrupt_header, "truncated or corrupted"),
    (_corrupt_data, "corrupted"),
    (_random_bytes, "truncated or corrupted"),
    (_not_ours, "not an increlora_fast adapter"),
], ids=["truncated", "header", "data", "random", "foreign"])
def test_damaged_file_is_rejected(saved, damage, message):
    base, config, _, directory = saved
    damage(directory / WEIGHTS)
    target = fresh(base, config)
    before = state(target)
    with pytest.raises(ValueError, match=message) as err:
        load_adapter(target, directory)
    assert WEIGHTS in str(err.value)
    assert_same_state(target, before)


def test_missing_directory(tmp_path, tiny_net):
    target = fresh(tiny_net, make_config())
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        load_adapter(target, tmp_path / "nowhere")


def test_a_whole_model_folder_is_named_as_one(tmp_path):
    """A folder of a whole transformers model (save_pretrained; a Trainer's save_model or
    checkpoint) is named as one, with save_adapter (the message named only the missing file)."""
    from transformers import BertConfig, BertModel
    model = BertModel(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=16))
    model.save_pretrained(str(tmp_path / "saved"))
    injected = inject_increlora(model, make_config(target_modules=["query", "value"],
                                                   modules_to_save=None))
    with pytest.raises(FileNotFoundError, match="no adapter file") as err:
        load_adapter(injected, tmp_path / "saved")
    assert "holds a whole model (model.safetensors" in str(err.value)
    assert "save_adapter(model, folder)" in str(err.value)


def test_model_without_adapter(saved):
    """Loading into a model never injected names the adapter and how to inject it with the
    adapter's own config (found by an audit: the message named neither)."""
    base, _, _, directory = saved
    with pytest.raises(ValueError, match="inject_increlora") as err:
        load_adapter(copy.deepcopy(base), directory)
    assert str(directory / WEIGHTS) in str(err.value)
    assert f"load_config({str(directory)!r})" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="inject_increlora"):
        save_adapter(copy.deepcopy(base), directory)


def _files(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _crash(*args, **kwargs):
    raise OSError("simulated crash")


@pytest.mark.parametrize("target", ["os.replace", "serializer"])
def test_crash_during_write_keeps_previous_checkpoint(saved, monkeypatch, target):
    base, config, model, directory = saved
    previous = _files(directory)
    assert set(previous) == {WEIGHTS, CONFIG}
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            layer.lora_lambda.add_(1.0)
    if target == "os.replace":
        monkeypatch.setattr(persistence.os, "replace", _crash)
    else:
        monkeypatch.setattr(persistence, "safetensors_bytes", _crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_adapter(model, directory, overwrite=True)
    monkeypatch.undo()
    assert _files(directory) == previous
    target_model = fresh(base, config)
    load_adapter(target_model, directory)
    x = torch.randn(2, 12)
    assert not torch.allclose(target_model(x), model(x), atol=1e-3)


def test_crash_between_the_two_files_keeps_the_old_adapter_whole(saved, monkeypatch):
    """The new weights file is already in place when renaming the new JSON summary fails: the
    old weights file is put back, so the folder holds the old adapter, both files of it."""
    base, config, model, directory = saved
    previous = _files(directory)
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            layer.activate_reserve(1, step=99)
    real_replace = os.replace
    calls = []

    def fail_on_the_summary(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == CONFIG and calls.count(CONFIG) == 1:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(persistence.os, "replace", fail_on_the_summary)
    with pytest.raises(OSError, match="simulated crash"):
        save_adapter(model, directory, overwrite=True)
    monkeypatch.undo()
    assert calls[:2] == [WEIGHTS, CONFIG]  # the failure came after the weights were replaced
    assert _files(directory) == previous
    target = fresh(base, config)
    load_adapter(target, directory)
    assert rank_pattern(target) != rank_pattern(model)


def _save_during_the_first(monkeypatch, directory: Path, second: nn.Module, overwrite: bool,
                           after: str) -> tuple:
    """Run save_adapter(second, directory) in a thread right after the first save's first call
    of ``after`` (``"write"``: a staging file written, before any rename; ``"replace"``: the
    weights file renamed into place, before the summary), giving it up to 3 s before the first
    save goes on. Returns ([the second save's exception, or None once it has ended], its
    thread)."""
    import threading

    outcome: list = []

    def run() -> None:
        try:
            save_adapter(second, directory, overwrite=overwrite)
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 (kept for the assertions)
            outcome.append(err)

    thread = threading.Thread(target=run)
    module = persistence if after == "write" else persistence.os
    name = "_write_new_file" if after == "write" else "replace"
    real = getattr(module, name)

    def hooked(*args):
        real(*args)
        if not thread.is_alive() and not outcome:
            thread.start()
            thread.join(timeout=3)  # (with the folder locked, the second save waits instead)

    monkeypatch.setattr(module, name, hooked)
    return outcome, thread


def _two_models(tiny_net) -> tuple:
    config = make_config()
    first, second = trained(tiny_net, config), trained(copy.deepcopy(tiny_net), config)
    first.name_or_path, second.name_or_path = "first", "second"
    return first, second


def _saved_by(directory: Path) -> tuple:
    """(the base name in the weights file, the base name in the JSON summary)."""
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        weights = json.loads(f.metadata()["base"])["name_or_path"]
    summary = json.loads((directory / CONFIG).read_text())["base_model_name_or_path"]
    return weights, summary


def test_a_save_started_during_another_without_overwrite_is_refused(tmp_path, tiny_net,
                                                                     monkeypatch):
    """Two saves without ``overwrite`` into one empty folder at once: each checked the folder
    before either had written, so the second to finish replaced the other's adapter, which
    then was lost without a word despite ``overwrite=False``. Saves into one folder now take
    turns (a lock on the folder): the later one is refused, the earlier one's adapter stays."""
    first, second = _two_models(tiny_net)
    outcome, thread = _save_during_the_first(monkeypatch, tmp_path, second, False, "write")
    save_adapter(first, tmp_path)
    thread.join()
    monkeypatch.undo()
    assert isinstance(outcome[0], FileExistsError), outcome
    assert _saved_by(tmp_path) == ("first", "first")


def test_two_saves_at_once_leave_one_adapter_whole(tmp_path, tiny_net, monkeypatch):
    """With ``overwrite=True``, a save that ran between the other's two renames left the
    weights file of one adapter beside the JSON summary of the other."""
    first, second = _two_models(tiny_net)
    outcome, thread = _save_during_the_first(monkeypatch, tmp_path, second, True, "replace")
    save_adapter(first, tmp_path, overwrite=True)
    thread.join()
    monkeypatch.undo()
    assert outcome == [None]
    weights, summary = _saved_by(tmp_path)
    assert weights == summary


def test_a_folder_on_a_file_system_without_locks_is_written(tmp_path, tiny_net, monkeypatch):
    """Some file systems (FUSE mounts) answer flock with ENOLCK or EOPNOTSUPP: the adapter is
    written there all the same, only without taking turns with other writers."""
    import errno

    def no_locks(fd, operation):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(persistence.fcntl, "flock", no_locks)
    _check_saved_and_loaded(tmp_path, tiny_net, monkeypatch)


def _check_saved_and_loaded(directory: Path, tiny_net, monkeypatch) -> None:
    """A trained model saved into ``directory`` under the patches of ``monkeypatch``, which
    are then undone, loads into a fresh model that computes as it does."""
    model = trained(tiny_net, make_config())
    save_adapter(model, directory)
    monkeypatch.undo()
    target = load_adapter(fresh(tiny_net, make_config()), directory)
    x = torch.randn(3, 12)
    assert torch.equal(target(x), model(x))


def test_a_platform_without_flock_still_saves(tmp_path, tiny_net, monkeypatch):
    """Windows has no fcntl: persistence imported it unguarded, so the whole library failed to
    import there; without it the adapter is written, only unordered with other writers."""
    monkeypatch.setattr(persistence, "fcntl", None)
    _check_saved_and_loaded(tmp_path, tiny_net, monkeypatch)


def _rewrite_slot_state(path: Path, module: str, states: list) -> None:
    """Re-save the adapter with another slot_state for ``module`` and a matching checksum."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = f"{module}.slot_state"
    tensors[key] = torch.tensor(states, dtype=tensors[key].dtype)
    meta["sha256"] = persistence.tensors_digest(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("states,message", [
    ([2, 7, 0, 0, 0, 0], "unknown states"),
    ([1, 2, 0, 0, 0, 0], "not laid out"),
    ([2, 0, 1, 0, 0, 0], "not laid out"),
    ([1, 1, 0, 0, 0, 0], "at least one active"),
])
def test_impossible_slot_states_are_rejected(tmp_path, tiny_net, states, message):
    config = make_config()
    model = trained(tiny_net, config)
    save_adapter(model, tmp_path, training_state=True)
    module = next(iter(rank_pattern(model)))
    _rewrite_slot_state(tmp_path / WEIGHTS, module, states)
    target = fresh(tiny_net, config)
    before = state(target)
    with pytest.raises(ValueError, match=message):
        load_adapter(target, tmp_path)
    assert_same_state(target, before)


def test_loading_into_merged_layers_is_refused(saved):
    base, config, model, directory = saved
    target = fresh(base, config)
    next(iter(increlora_layers(target)))[1].merge()
    before = state(target)
    with pytest.raises(ValueError, match="merged"):
        load_adapter(target, directory)
    assert_same_state(target, before)


class NormHead(nn.Module):
    """A linear, then a head with BatchNorm (running statistics are buffers) and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.head = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


@pytest.mark.parametrize("training_state", [False, True], ids=["inference", "training"])
def test_buffers_of_modules_to_save_round_trip(tmp_path, training_state):
    """The modules to save keep their persistent buffers (found by an audit: a BatchNorm head's
    running statistics were not saved, so the loaded model's eval outputs differed by ~0.2)."""
    base = NormHead()
    config = make_config(target_modules=["fc"], modules_to_save=["head"])
    source = fresh(base, config)
    source.train()
    for _ in range(3):  # training moves the running statistics
        source(torch.randn(32, 8) * 3 + 1)
    save_adapter(source, tmp_path, training_state=training_state)
    target = load_adapter(fresh(base, config), tmp_path)
    assert torch.equal(target.head[0].running_mean, source.head[0].running_mean)
    assert torch.equal(target.head[0].num_batches_tracked, source.head[0].num_batches_tracked)
    source.eval(), target.eval()
    x = torch.randn(4, 8)
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("training_state", [False, True], ids=["inference", "training"])
def test_loading_into_a_grown_model_leaves_no_stale_slot_stamp(tmp_path, tiny_net, training_state):
    """A model grown at step 10 and more, given another adapter and a fresh optimizer, trains
    without the warning that the controller's and the optimizer's step counts differ (found by
    an audit: load_adapter kept the model's last slot stamp, so the first optimizer step
    warned that slots were stamped at step 30 while this is step 0; loading a state dict
    clears it)."""
    config = make_config(target_modules=["fc"])
    other = fresh(tiny_net, config)
    save_adapter(other, tmp_path, training_state=training_state)
    model = trained(tiny_net, config)  # its layers were stamped at steps 10 to 30
    assert any(layer.last_stamp is not None for _, layer in increlora_layers(model))
    load_adapter(model, tmp_path)
    optimizer = create_optimizer(model, config, lr=1e-2)
    model(torch.randn(4, 12)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()


def test_restart_schedules_leaves_no_stale_slot_stamp(tiny_net):
    """`IncreLoRALinear.restart_schedules` (a new run over a grown model, as the Trainer starts
    one; its sibling of the stamps load_adapter makes) clears the layer's last slot stamp too:
    the first step of the new run's optimizer warned that slots were stamped at step 30 while
    this is step 0 (found by the same audit)."""
    config = make_config(target_modules=["fc"])
    model = trained(tiny_net, config)
    for _, layer in increlora_layers(model):
        layer.restart_schedules()
    optimizer = create_optimizer(model, config, lr=1e-2)
    model(torch.randn(4, 12)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()


class SharedBufferHead(nn.Module):
    """A head whose two linears share one persistent buffer (registered in both)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)
        shift = torch.zeros(8)
        self.a.register_buffer("shift", shift)
        self.b.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(self.fc(x)) + self.a.shift)


@pytest.mark.parametrize("training_state", [False, True], ids=["inference", "training"])
def test_a_buffer_shared_by_two_modules_to_save_round_trips(tmp_path, training_state):
    """A persistent buffer registered under two names of the modules to save is saved under
    both (found by an audit: on a CPU model safetensors refused the two names sharing memory,
    a RuntimeError, while the same model on a GPU saved, as .cpu() made separate copies)."""
    torch.manual_seed(0)
    base = SharedBufferHead()
    config = make_config(target_modules=["fc"], modules_to_save=["a", "b"])
    source = fresh(base, config)
    source.a.shift.add_(1.5)  # as training would move it
    save_adapter(source, tmp_path, training_state=training_state)
    target = load_adapter(fresh(base, config), tmp_path)
    assert torch.equal(target.b.shift, source.b.shift)
    assert target.a.shift is target.b.shift
    x = torch.randn(4, 8)
    assert torch.equal(target(x), source(x))


def test_an_adapter_without_the_buffers_of_modules_to_save_loads_with_a_warning(tmp_path):
    base = NormHead()
    config = make_config(target_modules=["fc"], modules_to_save=["head"])
    source = fresh(base, config)
    save_adapter(source, tmp_path)
    path = tmp_path / WEIGHTS
    with safe_open(str(path), "pt") as f:  # rewrite it as the code before buffers wrote it
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if "running" not in k
                   and "num_batches" not in k}
    meta["sha256"] = persistence.tensors_digest(tensors)
    save_file(tensors, str(path), metadata=meta)
    with pytest.warns(UserWarning, match=r"holds no head\.0\.\w+ \(3 buffers"):
        load_adapter(fresh(base, config), tmp_path)


@pytest.mark.parametrize("training_state", [False, True], ids=["inference", "training"])
def test_modules_to_save_of_a_frozen_model_are_saved(tmp_path, tiny_net, training_state):
    """A model frozen after training (``model.requires_grad_(False)`` before inference) still
    saves its modules to save, and an adapter loads into a frozen model (found by an audit:
    the trained head was left out of the file without a word, and loading failed with
    'missing tensors')."""
    config = make_config()
    model = trained(tiny_net, config)
    model.requires_grad_(False)
    save_adapter(model, tmp_path, training_state=training_state)
    for target in (fresh(tiny_net, config), fresh(tiny_net, config).requires_grad_(False)):
        load_adapter(target, tmp_path)
        assert torch.equal(target.head.weight, model.head.weight)
        x = torch.randn(3, 12)
        assert torch.equal(target.eval()(x), model.eval()(x))


@pytest.mark.parametrize("training_state", [False, True], ids=["inference", "training"])
def test_a_parameter_unfrozen_by_hand_loads_into_a_fresh_model(tmp_path, tiny_net,
                                                               training_state):
    """A norm the user unfroze outside ``modules_to_save`` is trained and saved with the
    adapter, but loading it into a fresh model (where the norm is frozen again) failed with
    'unknown tensors', so the trained model could not be restored; it now loads into the
    parameter of its name."""
    config = make_config()
    model = trained(tiny_net, config)
    norm = model.blocks[1].norm.weight.requires_grad_(True)
    with torch.no_grad():
        norm.add_(0.5)
    save_adapter(model, tmp_path, training_state=training_state)
    target = load_adapter(fresh(tiny_net, config), tmp_path)
    assert torch.equal(target.blocks[1].norm.weight, norm)
    x = torch.randn(3, 12)
    assert torch.equal(target.eval()(x), model.eval()(x))


def test_a_parameter_unfrozen_by_hand_is_kept_by_a_save_after_loading(tmp_path, tiny_net):
    """A parameter saved as trained outside ``modules_to_save`` (a norm unfrozen by hand) loaded
    into a fresh model, where it is frozen, so saving that model again (to go on training, or in
    the other layout) left it out of the new file without a word, and the adapter loaded from
    that file ran with the base's norm. It loads as trainable, as it was saved."""
    config = make_config()
    model = trained(tiny_net, config)
    norm = model.blocks[1].norm.weight.requires_grad_(True)
    with torch.no_grad():
        norm.add_(0.5)
    save_adapter(model, tmp_path / "first", training_state=True)
    loaded = load_adapter(fresh(tiny_net, config), tmp_path / "first")
    assert loaded.blocks[1].norm.weight.requires_grad
    assert not loaded.blocks[0].norm.weight.requires_grad  # only what the file holds
    save_adapter(loaded, tmp_path / "second")
    target = load_adapter(fresh(tiny_net, config), tmp_path / "second")
    assert torch.equal(target.blocks[1].norm.weight, norm)
    x = torch.randn(3, 12)
    assert torch.equal(target.eval()(x), model.eval()(x))


def test_a_tied_module_to_save_of_a_frozen_model_is_saved(tmp_path):
    """As above for an lm_head to save tied to the input embedding, whose one parameter is
    named after the embedding."""
    config = IncreLoRAConfig(target_modules=["q_proj"], r_max=4, target_rank=2,
                             modules_to_save=["lm_head"])
    model = inject_increlora(adapter_helpers.tied_tiny_llama(), config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.requires_grad_(False)
    save_adapter(model, tmp_path)
    target = load_adapter(inject_increlora(adapter_helpers.tied_tiny_llama(),
                                           copy.deepcopy(config)), tmp_path)
    assert torch.equal(target.lm_head.weight, model.lm_head.weight)


def _rewrite_metadata(path: Path, **changes: str) -> None:
    """Rewrite the weights file at ``path`` with its metadata updated by ``changes``."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


def test_an_adapter_of_a_newer_format_version_is_refused(saved):
    base, config, _, directory = saved
    _rewrite_metadata(directory / WEIGHTS, format_version="2")
    target = fresh(base, config)
    before = state(target)
    with pytest.raises(ValueError, match="format version 2") as err:
        load_adapter(target, directory)
    assert WEIGHTS in str(err.value) and "\n" not in str(err.value)
    assert_same_state(target, before)
    with pytest.raises(ValueError, match="format version 2"):
        load_config(directory)


def _gpt2_classifier() -> nn.Module:
    """A tiny GPT-2 sequence classifier whose config has no pad token, as GPT-2's has none."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=32, bos_token_id=39,
        eos_token_id=39, num_labels=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    assert model.config.pad_token_id is None
    return model.eval()


def test_the_pad_token_travels_with_the_adapter(tmp_path):
    """finetune pads a decoder without a pad token with its EOS token and gives the model's
    config that id (the classifier reads each input's last token before it); a fresh base has
    none, so the loaded adapter must bring it, or padded batches cannot be scored (or are
    scored at the wrong token)."""
    base = _gpt2_classifier()
    config = IncreLoRAConfig(target_modules=["c_attn"], r_max=4, target_rank=2,
                             modules_to_save=["score"])
    model = inject_increlora(copy.deepcopy(base), config)
    model.config.pad_token_id = model.config.eos_token_id
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            layer.lora_A.normal_()
            layer.lora_B.normal_()
            layer.lora_lambda.normal_()
    lengths = torch.tensor([5, 9, 3, 7])
    ids = torch.randint(0, 39, (4, 9))
    ids[torch.arange(9)[None, :] >= lengths[:, None]] = model.config.pad_token_id
    mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
    expected = model(input_ids=ids, attention_mask=mask).logits
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / CONFIG).read_text())["pad_token_id"] == 39

    target = inject_increlora(copy.deepcopy(base), load_config(tmp_path / "adapter"))
    load_adapter(target, tmp_path / "adapter")
    assert target.config.pad_token_id == 39
    torch.testing.assert_close(target(input_ids=ids, attention_mask=mask).logits, expected,
                               rtol=0, atol=0)

    other = inject_increlora(copy.deepcopy(base), config)
    other.config.pad_token_id = 0
    with pytest.warns(UserWarning, match="pad_token_id 39.*pad_token_id 0"):
        load_adapter(other, tmp_path / "adapter")
    assert other.config.pad_token_id == 0


@pytest.mark.parametrize("change,field", [
    (lambda c: c.update(new_knob=1), "new_knob"),
    (lambda c: c.update(r_max=-1), "r_max"),
    (lambda c: c.update(lora_alpha="16"), "lora_alpha"),
    (lambda c: c.update(r=8, peft_type="LORA"), "peft_type"),
], ids=["unknown", "invalid", "wrong-type", "peft-fields"])
def test_a_saved_config_that_does_not_parse_names_the_file_and_field(saved, change, field):
    base, config, _, directory = saved
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        saved_config = json.loads(f.metadata()["config"])
    change(saved_config)
    _rewrite_metadata(directory / WEIGHTS, config=json.dumps(saved_config))
    target = fresh(base, config)
    before = state(target)
    for load in (lambda: load_config(directory), lambda: load_adapter(target, directory)):
        with pytest.raises(ValueError, match=field) as err:
            load()
        message = str(err.value)
        assert str(directory / WEIGHTS) in message and "\n" not in message
    assert_same_state(target, before)


@pytest.mark.parametrize("text, match", [("{not json", "config"),
                                         ("[1, 2]", "a JSON object is needed, not list")],
                         ids=["not-json", "not-an-object"])
def test_a_saved_config_that_is_not_a_json_object_names_the_file(saved, text, match):
    base, config, _, directory = saved
    _rewrite_metadata(directory / WEIGHTS, config=text)
    with pytest.raises(ValueError, match=match) as err:
        load_config(directory)
    assert str(directory / WEIGHTS) in str(err.value)


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_a_peft_adapter_is_named_as_one(tmp_path, tiny_net, safe_serialization):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(tiny_net), LoraConfig(target_modules=["fc"], r=2))
    peft_model.save_pretrained(str(tmp_path), safe_serialization=safe_serialization)
    target = fresh(tiny_net, make_config())
    before = state(target)
    for load in (lambda: load_config(tmp_path), lambda: load_adapter(target, tmp_path)):
        with pytest.raises((ValueError, FileNotFoundError),
                           match="peft LORA adapter.*PeftModel.from_pretrained") as err:
            load()
        assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    assert_same_state(target, before)


@pytest.mark.parametrize("field, value", [
    *(("pad_token_id", v) for v in ["{oops", '"7"', "-3", "true"]),
    *(("base", v) for v in ["{oops", "[]", '{"name_or_path": null}',
                            '{"fingerprint": {"digest": "0", "modules": {"fc": 1}}}'])])
def test_a_damaged_metadata_record_names_the_file(saved, field, value):
    """A damaged pad_token_id or base record (outside the tensor checksum) is one ValueError
    naming the file, before anything changes; the base's names check_base=False too."""
    base, config, _, directory = saved
    _rewrite_metadata(directory / WEIGHTS, **{field: value})
    target = fresh(base, config)
    before = state(target)
    match = "pad_token_id" if field == "pad_token_id" else "recorded base"
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(target, directory)
    assert str(directory / WEIGHTS) in str(err.value) and "\n" not in str(err.value)
    assert field != "base" or "check_base=False" in str(err.value)
    assert_same_state(target, before)


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compiled", "DataParallel"])
def test_a_wrapped_model_saves_and_loads_the_model_it_wraps(tmp_path, tiny_net, wrap):
    """``torch.compile(model)`` and a (Distributed)DataParallel wrapper prefix every module
    name (``_orig_mod.``, ``module.``): save_adapter wrote those names, which no unwrapped
    model loads (found by the integrations audit), and load_adapter into a wrapper found no
    layer of the adapter. Both work on the model the wrapper holds."""
    config = make_config()
    source = trained(tiny_net, config)
    save_adapter(wrap(source), tmp_path / "a")
    with safe_open(str(tmp_path / "a" / WEIGHTS), framework="pt") as f:
        names = list(f.keys())
    assert names and not [n for n in names if n.startswith(("_orig_mod.", "module."))], names
    target = fresh(tiny_net, config)
    load_adapter(target, tmp_path / "a")
    assert rank_pattern(target) == rank_pattern(source)
    again = fresh(tiny_net, config)
    assert load_adapter(wrap(again), tmp_path / "a") is not None
    assert rank_pattern(again) == rank_pattern(source)
    x = torch.randn(3, 4, 12)
    assert torch.equal(again(x), source(x))


def _adapter_files(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_an_overwrite_removes_old_adapter_files_the_new_adapter_lacks(tmp_path):
    """A .bin adapter overwritten by a safetensors one: the .bin goes, the other files stay."""
    (tmp_path / "notes.txt").write_bytes(b"mine")
    persistence.write_adapter_files(tmp_path, {"adapter_model.bin": b"old", CONFIG: b"{}"},
                                    overwrite=False)
    persistence.write_adapter_files(tmp_path, {WEIGHTS: b"new", CONFIG: b"{1}"}, overwrite=True)
    assert _adapter_files(tmp_path) == {WEIGHTS: b"new", CONFIG: b"{1}", "notes.txt": b"mine"}


def test_where_hard_links_fail_the_old_adapter_is_kept_by_a_copy(tmp_path, monkeypatch):
    """On a file system without hard links the old files are copied aside: a failure while
    renaming the new ones in still puts the old adapter back whole."""
    persistence.write_adapter_files(tmp_path, {WEIGHTS: b"old", CONFIG: b"{}"}, overwrite=False)

    def no_links(source, target):
        raise OSError(1, "Operation not permitted")

    renames = []

    def replace_then_fail(source, target):
        renames.append(Path(target).name)
        if len(renames) == 2:
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    real_replace = os.replace
    monkeypatch.setattr(persistence.os, "link", no_links)
    monkeypatch.setattr(persistence.os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="No space left"):
        persistence.write_adapter_files(tmp_path, {WEIGHTS: b"new", CONFIG: b"{1}"},
                                        overwrite=True)
    assert _adapter_files(tmp_path) == {WEIGHTS: b"old", CONFIG: b"{}"}
    monkeypatch.setattr(persistence.os, "replace", real_replace)
    persistence.write_adapter_files(tmp_path, {WEIGHTS: b"new", CONFIG: b"{1}"}, overwrite=True)
    assert _adapter_files(tmp_path) == {WEIGHTS: b"new", CONFIG: b"{1}"}


def test_a_lock_that_fails_for_another_reason_is_raised(tmp_path, monkeypatch):
    """Only the errors of a file system without locks let the save go on unordered; another
    failure of flock (here EIO) is raised, and nothing is written."""
    import errno

    def broken(fd, operation):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(persistence.fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"):
        persistence.write_adapter_files(tmp_path, {WEIGHTS: b"new"}, overwrite=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", ["other_folder", "other_file", "foreign_in_new"])
def test_a_staging_named_folder_holding_anything_else_is_not_ours(tmp_path, extra):
    staging = tmp_path / (persistence.STAGING_PREFIX + "x")
    (staging / "new").mkdir(parents=True)
    (staging / "old").mkdir()
    (staging / "new" / WEIGHTS).write_bytes(b"w")
    assert persistence.is_adapter_staging(staging)
    if extra == "other_folder":
        (staging / "data").mkdir()
    elif extra == "other_file":
        (staging / "new.txt").write_bytes(b"")
    else:
        (staging / "new" / "results.json").write_bytes(b"{}")
    assert not persistence.is_adapter_staging(staging)


def test_a_module_missing_from_the_recorded_base_is_named(tiny_net):
    model = fresh(tiny_net, make_config())
    current = persistence.base_fingerprint(model)
    recorded = copy.deepcopy(current)
    first = next(iter(recorded["modules"]))
    del recorded["modules"][first]
    assert persistence.base_difference(current, current) is None
    assert persistence.base_difference(recorded, current) == f"{first}: not in the adapter's base"
