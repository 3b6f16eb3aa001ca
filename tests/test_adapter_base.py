"""Issue 28 (2, 3): an adapter records the base it was trained on and refuses to load onto
another; a folder that holds an adapter is replaced only when asked, and then as a whole."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import adapter_helpers
from adapter_helpers import fresh
from increlora_fast import (IncreLoRAConfig, increlora_layers, inject_increlora, load_adapter,
                            rank_pattern, save_adapter)
from increlora_fast import persistence
from increlora_fast.integrations import export_peft
from increlora_fast.layer import IncreLoRALinear
from increlora_fast.persistence import base_difference, base_fingerprint

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
NAME = "org/tiny-net"


def make_config() -> IncreLoRAConfig:
    return IncreLoRAConfig(target_modules=["fc", "proj"], r_max=6, init_r=1, target_rank=3,
                           modules_to_save=["head"], reserve_lambda=0.05)


def named_base(make_tiny_net, seed: int) -> nn.Module:
    """A TinyNet drawn from ``seed``, named like a hub model: two seeds give two bases with
    the same name, config and shapes, as a random init of a pretrained model's config does."""
    torch.manual_seed(seed)
    base = make_tiny_net()
    base.name_or_path = NAME
    return base


def trained(base: nn.Module, config: IncreLoRAConfig) -> nn.Module:
    """`adapter_helpers.trained` with one module grown by a rank."""
    def grow(i: int, layer: IncreLoRALinear) -> None:
        if i == 1:
            layer.activate_reserve(1, step=10)
    return adapter_helpers.trained(base, config, grow)


def adapter_state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k or "slot_" in k
            or k.startswith("head.")}


def files(directory: Path) -> dict:
    """{name: bytes} of every entry; a leftover staging folder fails the read."""
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
def base(make_tiny_net) -> nn.Module:
    return named_base(make_tiny_net, seed=0)


@pytest.fixture
def other_base(make_tiny_net) -> nn.Module:
    return named_base(make_tiny_net, seed=1)


def test_the_adapter_records_its_base(tmp_path, base):
    model = trained(base, make_config())
    save_adapter(model, tmp_path)
    summary = json.loads((tmp_path / CONFIG).read_text())
    fingerprint = base_fingerprint(model)
    assert summary["base_model_name_or_path"] == NAME
    assert summary["base_model_fingerprint"] == fingerprint
    assert set(fingerprint["modules"]) == set(rank_pattern(model))
    assert fingerprint["modules"]["blocks.0.fc"].startswith("20x12:")
    assert len(fingerprint["modules"]["blocks.0.fc"]) == len("20x12:") + 3 * 8 * 4
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        recorded = json.loads(f.metadata()["base"])
    assert recorded == {"name_or_path": NAME, "fingerprint": fingerprint}


@pytest.mark.parametrize("training_state", [False, True], ids=["adapter", "checkpoint"])
def test_another_base_with_the_same_config_is_refused_in_one_line(tmp_path, base, other_base,
                                                                  training_state):
    """The fault probe's case: the right config and shapes, randomly initialised weights. A
    training checkpoint (resume) is refused the same way."""
    config = make_config()
    source = trained(base, config)
    save_adapter(source, tmp_path, training_state=training_state)
    target = fresh(other_base, config)
    before = adapter_state(target)
    with pytest.raises(persistence.BaseMismatchError) as err:
        load_adapter(target, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.count(repr(NAME)) == 2
    assert base_fingerprint(source)["digest"] in message
    assert base_fingerprint(target)["digest"] in message
    assert "first difference in blocks.0.fc: its weight values differ" in message
    assert "check_base=False" in message
    after = adapter_state(target)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_check_base_false_loads_onto_another_base(tmp_path, base, other_base):
    config = make_config()
    source = trained(base, config)
    save_adapter(source, tmp_path)
    target = load_adapter(fresh(other_base, config), tmp_path, check_base=False)
    assert rank_pattern(target) == rank_pattern(source)
    assert torch.equal(target.head.weight, source.head.weight)


def test_a_base_of_other_shapes_names_the_module(base, make_tiny_net):
    config = make_config()
    wide = fresh(make_tiny_net(hidden=24), config)
    difference = base_difference(base_fingerprint(fresh(base, config)), base_fingerprint(wide))
    assert difference == "blocks.0.fc: weight shape 20x12 in the adapter, 24x12 in the model"


@pytest.mark.parametrize("saved_dtype,loaded_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
], ids=["fp32-bf16", "fp32-fp16", "bf16-fp32", "fp16-bf16"])
def test_the_same_base_in_another_dtype_loads(tmp_path, base, saved_dtype, loaded_dtype,
                                              recwarn):
    config = make_config()
    source = trained(copy.deepcopy(base).to(saved_dtype), config)
    save_adapter(source, tmp_path)
    target = load_adapter(fresh(copy.deepcopy(base).to(loaded_dtype), config), tmp_path)
    assert rank_pattern(target) == rank_pattern(source)
    assert not [w for w in recwarn if "fingerprint" in str(w.message)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_base_on_another_device_loads(tmp_path, base):
    config = make_config()
    save_adapter(trained(base, config), tmp_path)
    target = fresh(base, config).to("cuda", torch.bfloat16)
    load_adapter(target, tmp_path)
    assert target.head.weight.is_cuda


def test_float16_double_rounding_is_within_the_tolerance(base):
    """1 + 2**-8 + 2**-12 rounds to bfloat16 1 + 2**-7, but through float16 (1 + 2**-8, a tie)
    to 1.0: one bfloat16 step apart, which still matches; a weight 2**-5 larger does not."""
    config = make_config()
    model = fresh(base, config)
    with torch.no_grad():
        model.blocks[0].fc.base_layer.weight.fill_(1 + 2 ** -8 + 2 ** -12)
    full = base_fingerprint(model)
    half = base_fingerprint(copy.deepcopy(model).half())
    assert full["digest"] != half["digest"]
    assert base_difference(full, half) is None
    with torch.no_grad():
        model.blocks[0].fc.base_layer.weight.mul_(1 + 2 ** -5)
    assert base_difference(full, base_fingerprint(model)) == \
        "blocks.0.fc: its weight values differ"


def test_an_adapter_saved_without_a_fingerprint_loads_with_a_warning(tmp_path, base,
                                                                    other_base):
    config = make_config()
    source = trained(base, config)
    save_adapter(source, tmp_path)
    path = tmp_path / WEIGHTS
    with safe_open(str(path), "pt") as f:  # rewrite it as the code before fingerprints wrote it
        meta = {k: v for k, v in f.metadata().items() if k != "base"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=meta)
    with pytest.warns(UserWarning, match="records no base model fingerprint"):
        target = load_adapter(fresh(other_base, config), tmp_path)
    assert rank_pattern(target) == rank_pattern(source)


def _rewrite_fingerprint_version(path: Path, version) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recorded = json.loads(meta["base"])
    recorded["fingerprint"]["version"] = version
    save_file(tensors, str(path), metadata=dict(meta, base=json.dumps(recorded)))


def test_a_fingerprint_of_a_newer_version_is_named_and_version_1_still_loads(tmp_path, base):
    """The fingerprint's version was written and never read: a newer increlora_fast's entries
    would be misread (refused, or compared by the shape alone). A version this library does
    not know is refused in one line naming the file and both ways out; version 1 loads."""
    config = make_config()
    save_adapter(trained(base, config), tmp_path)
    _rewrite_fingerprint_version(tmp_path / WEIGHTS, persistence.FINGERPRINT_VERSION + 1)
    with pytest.raises(ValueError, match=rf"{WEIGHTS}.*fingerprint version "
                       rf"{persistence.FINGERPRINT_VERSION + 1}.*upgrade increlora_fast.*"
                       "check_base=False"):
        load_adapter(fresh(base, config), tmp_path)
    load_adapter(fresh(base, config), tmp_path, check_base=False)
    _rewrite_fingerprint_version(tmp_path / WEIGHTS, 1)
    load_adapter(fresh(base, config), tmp_path)


class FakeLinear4bit(nn.Linear):
    """Stands in for bitsandbytes' Linear4bit (not installed here): a weight of packed bytes
    whose shape says nothing of the layer's."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.weight = nn.Parameter(torch.randint(0, 255, (n_in * n_out // 2, 1),
                                                 dtype=torch.uint8), requires_grad=False)


FakeLinear4bit.__module__ = "bitsandbytes.nn.modules"


def test_a_quantized_base_is_compared_by_shape_only(tmp_path, base):
    """A QLoRA adapter (saved on a 4-bit base) still loads onto its full-precision base. A
    packed weight of a layout the fingerprint cannot read (no quant_state) failed the save
    with an IndexError (sampled as a float matrix); it records the shape, with a warning."""
    config = make_config()
    quantized = copy.deepcopy(base)
    quantized.blocks[0].fc = FakeLinear4bit(12, 20)
    model = trained(quantized, config)
    assert dict(increlora_layers(model))["blocks.0.fc"].is_quantized
    with pytest.warns(RuntimeWarning, match="layout is not known"):
        fingerprint = base_fingerprint(model)
        save_adapter(model, tmp_path)
    assert fingerprint["modules"]["blocks.0.fc"] == "20x12:quantized"
    target = load_adapter(fresh(base, config), tmp_path)
    assert rank_pattern(target) == rank_pattern(model)


def test_a_conv1d_base_is_sampled_out_by_in(base):
    """transformers' Conv1D stores (in, out): its entry equals the same nn.Linear's."""
    from transformers.pytorch_utils import Conv1D

    config = make_config()
    linear = fresh(base, config)
    conv = copy.deepcopy(base)
    layer = Conv1D(20, 12)
    with torch.no_grad():
        layer.weight.copy_(base.blocks[0].fc.weight.t())
    conv.blocks[0].fc = layer
    assert base_fingerprint(inject_increlora(conv, config)) == base_fingerprint(linear)


def test_save_adapter_refuses_a_folder_holding_an_adapter(tmp_path, base):
    config = make_config()
    first, second = trained(base, config), trained(base, config)
    save_adapter(first, tmp_path)
    previous = files(tmp_path)
    with pytest.raises(FileExistsError, match=rf"{tmp_path} already holds an adapter .*"
                                              "overwrite=True"):
        save_adapter(second, tmp_path)
    assert files(tmp_path) == previous
    save_adapter(second, tmp_path, overwrite=True)
    target = load_adapter(fresh(base, config), tmp_path)
    assert torch.equal(target.head.weight, second.head.weight)


def test_export_peft_refuses_a_save_adapter_folder_and_overwrite_replaces_it(tmp_path, base):
    config = make_config()
    model = trained(base, config)
    save_adapter(model, tmp_path)
    previous = files(tmp_path)
    with pytest.raises(FileExistsError, match="already holds an adapter"):
        export_peft(model, tmp_path)
    assert files(tmp_path) == previous
    export_peft(model, tmp_path, overwrite=True)
    assert sorted(files(tmp_path)) == [CONFIG, WEIGHTS]
    assert json.loads((tmp_path / CONFIG).read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("failure", ["staging write", "rename"])
def test_a_failed_overwrite_keeps_the_old_adapter_whole(tmp_path, base, monkeypatch, failure):
    """export_peft over a save_adapter folder fails midway: while writing its second file, or
    after its weights file already replaced the old one. The old adapter is there, whole."""
    config = make_config()
    model = trained(base, config)
    save_adapter(model, tmp_path)
    previous = files(tmp_path)
    renamed = []
    if failure == "rename":
        real_replace = os.replace

        def fail_on_config(src, dst):
            if Path(dst) == tmp_path / CONFIG and Path(src).parent.name == "new":
                raise OSError("simulated crash")
            real_replace(src, dst)
            renamed.append((Path(src).parent.name, Path(dst).name))
        monkeypatch.setattr(persistence.os, "replace", fail_on_config)
    else:
        real_write = persistence._write_new_file

        def fail_on_config(path, data):
            if path.name == CONFIG:
                raise OSError("simulated crash")
            real_write(path, data)
        monkeypatch.setattr(persistence, "_write_new_file", fail_on_config)
    with pytest.raises(OSError, match="simulated crash"):
        export_peft(model, tmp_path, overwrite=True)
    monkeypatch.undo()
    if failure == "rename":  # the new weights were in place, then the old ones put back
        assert renamed == [("new", WEIGHTS), ("old", WEIGHTS)]
    assert files(tmp_path) == previous
    target = load_adapter(fresh(base, config), tmp_path)
    assert rank_pattern(target) == rank_pattern(model)


def test_overwrite_removes_an_old_peft_bin_adapter(tmp_path, base):
    """peft's older format (adapter_model.bin) also makes an adapter folder; replacing it
    removes it, so peft cannot pick the stale file."""
    (tmp_path / "adapter_model.bin").write_bytes(b"old peft weights")
    (tmp_path / "README.md").write_text("kept")
    model = trained(base, make_config())
    with pytest.raises(FileExistsError, match=r"adapter_model\.bin"):
        export_peft(model, tmp_path)
    export_peft(model, tmp_path, overwrite=True)
    assert sorted(files(tmp_path)) == ["README.md", CONFIG, WEIGHTS]


def test_a_failed_undo_keeps_the_old_files_and_says_where(tmp_path, base, monkeypatch):
    """Even putting the old files back fails (the disk went away): the staging folder holding
    them is kept and the error names it."""
    config = make_config()
    model = trained(base, config)
    save_adapter(model, tmp_path)
    previous = files(tmp_path)
    real_replace = os.replace

    def fail_after_the_weights(src, dst):
        if Path(dst).name == CONFIG or Path(src).parent.name == "old":
            raise OSError("simulated crash")
        real_replace(src, dst)
    monkeypatch.setattr(persistence.os, "replace", fail_after_the_weights)
    with pytest.raises(OSError, match="putting the old one back failed too") as err:
        save_adapter(model, tmp_path, overwrite=True)
    monkeypatch.undo()
    kept = Path(str(err.value).rsplit("its files are in ", 1)[1])
    assert kept.parent.parent == tmp_path and kept.parent.name.startswith(".adapter-staging-")
    assert files(kept) == previous


def test_merged_and_offloaded_weights_are_compared_by_shape_only(tmp_path, base):
    config = make_config()
    model = trained(base, config)
    dict(increlora_layers(model))["blocks.0.fc"].merge()
    assert base_fingerprint(model)["modules"]["blocks.0.fc"] == "20x12:merged"
    save_adapter(model, tmp_path)
    load_adapter(fresh(base, config), tmp_path)
    offloaded = fresh(base, config)
    offloaded.blocks[1].proj.base_layer.to("meta")
    assert base_fingerprint(offloaded)["modules"]["blocks.1.proj"] == "12x20:offloaded"
    assert base_difference(base_fingerprint(model), base_fingerprint(offloaded)) is None


def test_an_fsdp2_sharded_base_saves_without_a_collective(tmp_path, base):
    """FSDP2 shards the frozen base into DTensors (docs/distributed.md): their values are not
    read, so a save on one rank cannot wait for the others."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        config = make_config()
        model = trained(base, config)
        trainable = {p for p in model.parameters() if p.requires_grad}
        for block in model.blocks:
            fully_shard(block, ignored_params=trainable)
        fingerprint = base_fingerprint(model)
        assert fingerprint["modules"]["blocks.0.fc"] == "20x12:sharded"
        save_adapter(model, tmp_path / "adapter")
    finally:
        dist.destroy_process_group()
    target = load_adapter(fresh(base, config), tmp_path / "adapter")
    assert rank_pattern(target) == rank_pattern(model)


def test_resuming_a_finetune_checkpoint_onto_another_base_is_refused(tmp_path, capsys):
    """The model folder a run names was replaced by another initialisation of the same config
    between the checkpoint and the resume: the resume stops with the one-line message."""
    from finetune_helpers import cli, tiny_files, write_tiny_bert

    tiny = tiny_files(tmp_path / "tiny", train_rows=32, dev_rows=8)
    run = tmp_path / "run"
    assert cli(["--model", tiny["model"], "--train-file", tiny["train"], "--eval-file",
                tiny["dev"], "--batch-size", "8", "--max-seq-len", "16", "--no-progress",
                "--max-steps", "4", "--save-steps", "2", "--output-dir", str(run)]) == 0
    torch.manual_seed(99)
    write_tiny_bert(Path(tiny["model"]))
    capsys.readouterr()
    assert cli(["--resume", str(run / "checkpoint-2"), "--output-dir", str(tmp_path / "again"),
                "--no-progress"]) != 0
    err = capsys.readouterr().err.strip()
    assert "belongs to base" in err and "first difference in bert.encoder.layer.0." in err
    assert err.endswith("the model files changed since the checkpoint was written; resume with "
                        "the ones it was trained on")
    assert "\n" not in err
    assert not (tmp_path / "again" / "metrics.json").exists()


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_resuming_a_peft_checkpoint_onto_another_base_is_refused(tmp_path, capsys, method):
    """A LoRA or AdaLoRA checkpoint held only the trainable tensors: resumed after the model
    folder was replaced by another initialisation of the same config, it went on silently on
    the other base weights (IncreLoRA's checkpoints were checked by their base fingerprint)."""
    from finetune_helpers import cli, tiny_files, write_tiny_bert

    tiny = tiny_files(tmp_path / "tiny", train_rows=32, dev_rows=8)
    run = tmp_path / "run"
    assert cli(["--model", tiny["model"], "--train-file", tiny["train"], "--eval-file",
                tiny["dev"], "--batch-size", "8", "--max-seq-len", "16", "--no-progress",
                "--max-steps", "4", "--save-steps", "2", "--output-dir", str(run),
                "--method", method]) == 0
    capsys.readouterr()
    again = ["--resume", str(run / "checkpoint-2"), "--no-progress", "--output-dir"]
    assert cli(again + [str(tmp_path / "same")]) == 0  # the same files resume
    torch.manual_seed(99)
    write_tiny_bert(Path(tiny["model"]))
    capsys.readouterr()
    assert cli(again + [str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(run / "checkpoint-2") in err and tiny["model"] in err
    assert "bert.embeddings." in err and "the model files changed" in err
    assert not (tmp_path / "again" / "metrics.json").exists()


@pytest.mark.parametrize("training_state", [False, True], ids=["adapter", "checkpoint"])
def test_a_target_inside_a_module_to_save_is_saved_whole_and_loads_onto_its_base(
        tmp_path, base, other_base, training_state):
    """A module to save that holds linears the targets name (RoBERTa's ``classifier.dense``
    under targets ``["query", "value", "dense"]`` and ``modules_to_save=["classifier"]``): as in
    peft they get no adapter and train in full; the adapter carries their trained weights, and
    loads onto its own base (the other base weights are still compared)."""
    config = IncreLoRAConfig(target_modules=["fc", "proj"], r_max=6, init_r=1, target_rank=3,
                             modules_to_save=["head", "blocks.1"])
    source = trained(base, config)
    assert type(source.blocks[1].fc) is nn.Linear
    with torch.no_grad():  # what training the module to save does
        source.blocks[1].fc.weight.add_(torch.randn(20, 12) * 0.1)
    save_adapter(source, tmp_path, training_state=training_state)
    target = load_adapter(fresh(base, config), tmp_path)
    assert torch.equal(target.blocks[1].fc.weight, source.blocks[1].fc.weight)
    x = torch.randn(4, 12)
    assert torch.equal(target.eval()(x), source.eval()(x))
    with pytest.raises(persistence.BaseMismatchError, match="first difference in blocks.0.fc"):
        load_adapter(fresh(other_base, config), tmp_path)


@pytest.mark.parametrize("training_state", [False, True], ids=["adapter", "checkpoint"])
def test_an_adapted_layer_whose_base_weight_trains_loads_onto_its_base(tmp_path, base, other_base,
                                                                       training_state):
    """An adapted layer whose base weight trains too (unfrozen by hand; before 2026-12-07 also
    a target inside a module to save, which now gets no adapter) has that weight carried by the
    adapter: the fingerprint taken of the trained weight made the adapter refuse its own base
    (found by an audit). That weight is not compared; the others still are."""
    config = IncreLoRAConfig(target_modules=["fc", "proj"], r_max=6, init_r=1, target_rank=3,
                             modules_to_save=["head"])
    source = trained(base, config)
    weight = source.blocks[1].fc.base_layer.weight
    weight.requires_grad_(True)
    with torch.no_grad():  # what training it does
        weight.add_(torch.randn(20, 12) * 0.1)
    save_adapter(source, tmp_path, training_state=training_state)
    target = load_adapter(fresh(base, config), tmp_path)
    assert torch.equal(target.blocks[1].fc.base_layer.weight, weight)
    x = torch.randn(4, 12)
    assert torch.equal(target.eval()(x), source.eval()(x))
    with pytest.raises(persistence.BaseMismatchError, match="first difference in blocks.0.fc"):
        load_adapter(fresh(other_base, config), tmp_path)


def test_an_adapted_lm_head_tied_to_an_embedding_to_save_loads_onto_its_base(tmp_path):
    """As above for an adapted ``lm_head`` whose base weight is the input embedding, a module
    to save: the adapter carries that weight under the embedding's name."""
    config = IncreLoRAConfig(target_modules=["q_proj", "lm_head"], r_max=4, target_rank=2,
                             modules_to_save=["embed_tokens"])
    source = inject_increlora(adapter_helpers.tied_tiny_llama(), config)
    assert source.lm_head.base_layer.weight is source.model.embed_tokens.weight
    with torch.no_grad():  # what training the embedding does
        source.model.embed_tokens.weight.add_(0.5)
    save_adapter(source, tmp_path)
    target = load_adapter(inject_increlora(adapter_helpers.tied_tiny_llama(),
                                           copy.deepcopy(config)), tmp_path)
    assert torch.equal(target.lm_head.base_layer.weight, source.lm_head.base_layer.weight)


def test_an_unnamed_base_reads_as_english_in_the_refusal(tmp_path, make_tiny_net):
    """A model without ``name_or_path`` (a hand-built one) was named 'base an unnamed model'
    and 'this model an unnamed model'."""
    torch.manual_seed(0)
    source = trained(make_tiny_net(), make_config())
    save_adapter(source, tmp_path)
    torch.manual_seed(1)
    target = fresh(make_tiny_net(), make_config())
    with pytest.raises(persistence.BaseMismatchError) as err:
        load_adapter(target, tmp_path)
    message = str(err.value)
    assert "base an unnamed" not in message and "model an unnamed" not in message
    assert "belongs to an unnamed base (fingerprint" in message
    assert "not to this model (unnamed; fingerprint" in message
