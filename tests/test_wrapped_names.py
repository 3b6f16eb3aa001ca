"""The names of the IncreLoRA layers (`increlora_layers`: the controller's names, allocation log
and state, ``rank_pattern``, the saved adapter's keys) are the plain model's, whatever wraps the
model (``torch.compile``, (Distributed)DataParallel) or its blocks."""
from __future__ import annotations

import contextlib
import copy
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from adapter_helpers import fresh, old_style_adapter, trained
from increlora_fast import (IncreLoRAConfig, increlora_layers, inject_increlora, load_adapter,
                            save_adapter)
from increlora_fast.controller import IncreLoRAController
from increlora_fast.persistence import tensors_digest

PLAIN = ["blocks.0.fc", "blocks.0.proj", "blocks.1.fc", "blocks.1.proj"]


def make_config(**kwargs) -> IncreLoRAConfig:
    values = dict(target_modules=["fc", "proj"], r_max=6, init_r=1, target_rank=3,
                  modules_to_save=["head"], total_step=20)
    values.update(kwargs)
    return IncreLoRAConfig(**values)


@contextlib.contextmanager
def one_process_group(tmp_path):
    """A gloo process group of this process alone, for DistributedDataParallel."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["compile", "DataParallel", "DistributedDataParallel"])
def test_a_controller_over_a_wrapped_model_names_the_models_layers(tiny_net, tmp_path, wrap):
    """A controller built over ``torch.compile(model)`` (or a (Distributed)DataParallel wrapper,
    with its config) named the layers ``_orig_mod.blocks.0.fc`` (``module.blocks.0.fc``): its
    allocation log and rank pattern disagreed with the saved adapter's, and its state, saved
    into every checkpoint, did not load into the controller of the same run resumed without
    the wrapper (nor the other way). They are the model's own names."""
    config = make_config()
    model = fresh(tiny_net, config)
    with one_process_group(tmp_path) if wrap == "DistributedDataParallel" else \
            contextlib.nullcontext():
        wrapper = {"compile": torch.compile, "DataParallel": nn.DataParallel,
                   "DistributedDataParallel": nn.parallel.DistributedDataParallel}[wrap](model)
        assert [n for n, _ in increlora_layers(wrapper)] == PLAIN
        wrapped, plain = IncreLoRAController(wrapper, config), IncreLoRAController(model, config)
    assert wrapped.names == PLAIN and list(wrapped.rank_pattern()) == PLAIN
    plain.load_state_dict(wrapped.state_dict())
    wrapped.load_state_dict(plain.state_dict())


def checkpointed_blocks(model: nn.Module) -> None:
    """torch's activation checkpointing around each block (``_checkpoint_wrapped_module``)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import \
        apply_activation_checkpointing
    apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == "TinyBlock")


def checkpointed_head(model: nn.Module) -> None:
    """torch's ``checkpoint_wrapper`` around the module to save."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    model.head = checkpoint_wrapper(model.head)


def compiled_block(model: nn.Module) -> None:
    """One block ``torch.compile``d in place of itself (``_orig_mod``)."""
    model.blocks[0] = torch.compile(model.blocks[0])


def adapter_tensors(model: nn.Module) -> dict:
    """Every layer's slot tensors and the modules to save's state, by the plain model's
    names."""
    out = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    out.update({f"blocks.0.norm.{k}": v for k, v in model.blocks[0].norm.state_dict().items()})
    for name, layer in increlora_layers(model):
        for key in ("lora_A", "lora_B", "lora_lambda", "slot_state", "slot_alloc_step",
                    "slot_active_step"):
            out[f"{name}.{key}"] = getattr(layer, key)
    return out


def saved(directory) -> tuple:
    """(metadata, tensors) of the adapter file in ``directory``."""
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _grown_source(tiny_net):
    """A config with the head and a norm to save, and a model under it whose layers grew
    different ranks and whose norm holds other values than a fresh one's."""
    config = make_config(modules_to_save=["head", "blocks.0.norm"])
    source = trained(tiny_net, config, lambda i, layer: [
        (layer.activate_reserve(1, step=i + 1), layer.add_reserve(1, step=i + 1))
        for _ in range(i % 3)])
    with torch.no_grad():
        source.blocks[0].norm.weight.normal_()
    return config, source


@pytest.mark.parametrize("wrap", [checkpointed_blocks, checkpointed_head, compiled_block])
def test_an_adapter_saved_under_wrapped_blocks_is_the_plain_models(tiny_net, tmp_path, wrap):
    """Blocks wrapped by torch's activation checkpointing (``checkpoint_wrapper``,
    ``apply_activation_checkpointing``) or compiled one by one put their wrapper's part
    (``_checkpoint_wrapped_module``, ``_orig_mod``) in the names of the layers and of the
    modules to save: save_adapter wrote them into the file, which the plain model then refused
    ("unknown tensors"), and the plain model's adapter did not load into the wrapped one. The
    names are the plain model's, those of the wrapped model's state dict under checkpointing,
    and a module to save is found by them (a frozen ``blocks.0.norm`` was left out); either
    adapter loads into the other model with identical tensors."""
    config, source = _grown_source(tiny_net)
    wrapped = fresh(tiny_net, config)
    wrapped.load_state_dict(source.state_dict())
    wrap(wrapped)
    for model in (source, wrapped):  # frozen for inference: the modules to save are still saved
        model.requires_grad_(False)
    assert [n for n, _ in increlora_layers(wrapped)] == PLAIN
    if wrap is not compiled_block:  # (compiled blocks keep _orig_mod in their state dict)
        assert {f"{n}.lora_A" for n in PLAIN} <= set(wrapped.state_dict())
    save_adapter(source, tmp_path / "plain", training_state=True)
    save_adapter(wrapped, tmp_path / "wrapped", training_state=True)
    (meta, tensors), (plain_meta, plain_tensors) = saved(tmp_path / "wrapped"), \
        saved(tmp_path / "plain")
    assert meta == plain_meta and set(tensors) == set(plain_tensors)
    assert all(torch.equal(tensors[k], v) for k, v in plain_tensors.items())
    assert (tmp_path / "wrapped" / "adapter_config.json").read_bytes() == \
        (tmp_path / "plain" / "adapter_config.json").read_bytes()
    expected = adapter_tensors(source)
    plain_target, wrapped_target = fresh(tiny_net, config), fresh(tiny_net, config)
    wrap(wrapped_target)
    load_adapter(plain_target, tmp_path / "wrapped")
    load_adapter(wrapped_target, tmp_path / "plain")
    for target in (plain_target, wrapped_target):
        got = adapter_tensors(target)
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.parametrize("wrap", [checkpointed_blocks, checkpointed_head, compiled_block])
def test_export_peft_under_wrapped_blocks_is_the_plain_models(tiny_net, tmp_path, wrap):
    """export_peft found the modules to save (and those peft wraps) by the raw module names: a
    module to save inside a checkpointed or compiled block (``blocks.0.norm``) was exported
    without its tensors, which peft then looks for. The export of the wrapped model is the
    plain model's."""
    from increlora_fast.integrations.peft_export import export_peft
    config = make_config(modules_to_save=["head", "blocks.0.norm"])
    source = trained(tiny_net, config, lambda i, layer: None)
    with torch.no_grad():
        source.blocks[0].norm.weight.normal_()
    wrapped = fresh(tiny_net, config)
    wrapped.load_state_dict(source.state_dict())
    wrap(wrapped)
    export_peft(source, tmp_path / "plain")
    export_peft(wrapped, tmp_path / "wrapped")
    (_, tensors), (_, plain_tensors) = saved(tmp_path / "wrapped"), saved(tmp_path / "plain")
    assert "base_model.model.blocks.0.norm.weight" in plain_tensors
    assert set(tensors) == set(plain_tensors)
    assert all(torch.equal(tensors[k], v) for k, v in plain_tensors.items())
    assert (tmp_path / "wrapped" / "adapter_config.json").read_bytes() == \
        (tmp_path / "plain" / "adapter_config.json").read_bytes()


@pytest.mark.parametrize("wrap", [checkpointed_blocks, compiled_block])
@pytest.mark.parametrize("fields", [
    dict(target_modules=["0.fc", "1.proj"]),
    dict(target_modules=r"blocks\.[01]\.(fc|proj)", exclude_modules=r"blocks\.1\.fc"),
    dict(target_modules=["fc", "proj"], exclude_modules=["0.proj"]),
    dict(target_modules="all-linear", modules_to_save=["head", "blocks.1.norm"]),
], ids=["suffixes", "regexes", "excluded", "to_save"])
def test_a_config_selects_the_plain_models_modules_under_wrapped_blocks(tiny_net, wrap, fields):
    """inject_increlora into a model whose blocks were already checkpointed or compiled matched
    ``target_modules``, ``exclude_modules`` and ``modules_to_save`` against names holding the
    wrapper's part (``blocks.0._checkpoint_wrapped_module.fc``): a dotted suffix or a regex
    across it matched nothing (or something else), so the config saved with the adapter
    selected other modules in the plain model, or injection refused it. It selects the same
    modules as in the plain model, and trains the same parameters."""
    from increlora_fast.model import plain_name
    config = make_config(**fields)
    plain = fresh(tiny_net, config)
    wrapped = copy.deepcopy(tiny_net)
    wrap(wrapped)
    inject_increlora(wrapped, config)
    assert [n for n, _ in increlora_layers(wrapped)] == [n for n, _ in increlora_layers(plain)]
    assert {plain_name(n) for n, p in wrapped.named_parameters() if p.requires_grad} == \
        {n for n, p in plain.named_parameters() if p.requires_grad}


def test_fsdp1_without_orig_params_flattening_the_adapters_is_refused(tiny_net, tmp_path):
    """FSDP1's default ``use_orig_params=False``, its base linears in units of their own (FSDP
    refuses a unit of frozen and trainable parameters there), flattens the adapter tensors into
    the root's FlatParameter and leaves plain tensor views in their place, which carry no
    ``_fsdp_flattened`` mark: the controller was built on them without a word (whole only on one
    rank, stale after every pass) and create_optimizer failed with torch's "can't optimize a
    non-leaf Tensor". Both are refused in one line naming FSDP1."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from increlora_fast import create_optimizer

    config = make_config()
    model = inject_increlora(tiny_net, config)
    with one_process_group(tmp_path):
        FullyShardedDataParallel(model, device_id=torch.device("cpu"),
                                 auto_wrap_policy=ModuleWrapPolicy({nn.Linear, nn.LayerNorm}))
        for make in (lambda: IncreLoRAController(model, config),
                     lambda: create_optimizer(model, config)):
            with pytest.raises(ValueError) as error:
                make()
            message = str(error.value)
            assert "FSDP1" in message and "'blocks.0.fc'" in message and "\n" not in message, \
                message


OLD_STYLE = {  # how yesterday's code named the layers of PLAIN under wrappers
    "DistributedDataParallel": lambda n: "module." + n,
    "compile": lambda n: "_orig_mod." + n,
    "DDP over compile": lambda n: "module._orig_mod." + n,
    "compile over DDP": lambda n: "_orig_mod.module." + n,
    "checkpointed blocks": lambda n: n.replace(".fc", "._checkpoint_wrapped_module.fc")
    .replace(".proj", "._checkpoint_wrapped_module.proj"),
    "FSDP1 units": lambda n: "_fsdp_wrapped_module." + n.replace(
        "blocks.0.", "blocks.0._fsdp_wrapped_module."),
}


@pytest.mark.parametrize("old", list(OLD_STYLE))
def test_a_controller_state_saved_under_the_old_wrapped_names_loads(tiny_net, old):
    """A controller state (in every finetune and Trainer checkpoint) saved before the layers
    were named by the plain model's names holds the wrapped names (``module.blocks.0.fc``,
    ``blocks.0._checkpoint_wrapped_module.fc``): it was refused as "for other modules". It
    loads where its names are the model's once the wrapper parts are dropped, its allocation
    log under the model's names; other names are still refused."""
    config = make_config()
    controller = IncreLoRAController(fresh(tiny_net, config), config)
    rename = OLD_STYLE[old]
    state = controller.state_dict()
    state["names"] = [rename(n) for n in PLAIN]
    state["allocation_log"] = [{"step": 3, "module": rename("blocks.1.fc"), "new_rank": 2}]
    controller.load_state_dict(state)
    assert controller.names == PLAIN
    assert [e["module"] for e in controller.allocation_log] == ["blocks.1.fc"]
    for names in ([rename(n) for n in reversed(PLAIN)], ["model." + n for n in PLAIN],
                  [rename(n) for n in PLAIN[:3]] + ["module.blocks.1.other"], list(range(4))):
        with pytest.raises(ValueError, match="controller state is for other modules"):
            controller.load_state_dict(dict(state, names=names))


ADAPTER_OLD_STYLE = {  # how older code named the modules of a saved adapter (`old_style_adapter`)
    "compile": lambda n: "_orig_mod." + n,
    "DataParallel": lambda n: "module." + n,
    "checkpointed blocks": lambda n: re.sub(r"^(blocks\.\d+)\.",
                                            r"\1._checkpoint_wrapped_module.", n),
    "checkpointed head": lambda n: re.sub(r"^head\.", "head._checkpoint_wrapped_module.", n),
    "compiled block": lambda n: re.sub(r"^blocks\.0\.", "blocks.0._orig_mod.", n),
    "FSDP1 units": lambda n: "_fsdp_wrapped_module." + re.sub(
        r"^(blocks\.\d+|head)\.", r"\1._fsdp_wrapped_module.", n),
}


@pytest.mark.parametrize("training_state", [False, True], ids=["inference", "training_state"])
@pytest.mark.parametrize("old", list(ADAPTER_OLD_STYLE))
def test_an_adapter_saved_under_the_old_wrapped_names_loads(tiny_net, tmp_path, old,
                                                           training_state):
    """An adapter saved before the layers were named by the plain model's names, from a
    compiled model, a DataParallel wrapper given to inject_increlora, or a model with
    checkpointed or compiled blocks, holds the wrapped names (``_orig_mod.blocks.0.fc.lora_A``,
    ``modules_to_save.head._checkpoint_wrapped_module.weight``) in its tensor keys and base
    fingerprint: load_adapter refused it ("unknown tensors"), though the controller state saved
    beside it in a checkpoint now loads. It loads where its names are the model's once the
    wrapper parts are dropped (as a controller state's do), into the plain model and into a
    wrapped one, as the plain file does; other names are still refused."""
    config, source = _grown_source(tiny_net)
    save_adapter(source, tmp_path / "plain", training_state=training_state)
    shutil.copytree(tmp_path / "plain", tmp_path / "old")
    old_style_adapter(tmp_path / "old", ADAPTER_OLD_STYLE[old])
    assert set(saved(tmp_path / "old")[1]) != set(saved(tmp_path / "plain")[1])
    expected = fresh(tiny_net, config)  # (the slots an inference file lacks keep its values)
    plain_target, wrapped_target = copy.deepcopy(expected), copy.deepcopy(expected)
    load_adapter(expected, tmp_path / "plain")
    checkpointed_blocks(wrapped_target)
    load_adapter(plain_target, tmp_path / "old")
    load_adapter(nn.DataParallel(wrapped_target), tmp_path / "old")
    want = adapter_tensors(expected)
    assert torch.equal(want["blocks.0.norm.weight"], source.blocks[0].norm.weight)
    for target in (plain_target, wrapped_target):
        got = adapter_tensors(target)
        assert set(got) == set(want)
        assert [k for k, v in want.items() if not torch.equal(got[k], v)] == []
    for foreign in (lambda n: "model." + n, lambda n: ADAPTER_OLD_STYLE[old](n).replace(
            "blocks.1.", "blocks.1.other.")):
        shutil.rmtree(tmp_path / "foreign", ignore_errors=True)
        shutil.copytree(tmp_path / "plain", tmp_path / "foreign")
        old_style_adapter(tmp_path / "foreign", foreign)
        with pytest.raises(ValueError, match="unknown tensors"):
            load_adapter(fresh(tiny_net, config), tmp_path / "foreign")
    # a tensor under its old and its plain name: which one to load is not known
    (meta, tensors), (_, plain) = saved(tmp_path / "old"), saved(tmp_path / "plain")
    twice = next(k for k in plain if k not in tensors)
    tensors[twice] = plain[twice]
    (tmp_path / "old" / "adapter_model.safetensors").write_bytes(safetensors_bytes(
        tensors, metadata=dict(meta, sha256=tensors_digest(tensors))))
    with pytest.raises(ValueError, match="unknown tensors"):
        load_adapter(fresh(tiny_net, config), tmp_path / "old")
