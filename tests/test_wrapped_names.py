"""The names of the IncreLoRA layers (`increlora_layers`: the controller's names, allocation log
and state, ``rank_pattern``, the saved adapter's keys) are the plain model's, whatever wraps the
model (``torch.compile``, (Distributed)DataParallel) or its blocks."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from adapter_helpers import fresh
from increlora_fast import IncreLoRAConfig, increlora_layers
from increlora_fast.controller import IncreLoRAController

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

