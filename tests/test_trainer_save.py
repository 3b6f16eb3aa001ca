"""What a Trainer's ``save_model()`` and checkpoints leave for `load_adapter`."""
import pytest
import torch
from transformers import Trainer, TrainingArguments

from increlora_fast import load_adapter, save_adapter
from increlora_fast.controller import IncreLoRAController
from increlora_fast.integrations.trainer import (IncreLoRACallback, IncreLoRATrainer,
                                                 increlora_optimizers)
from trainer_helpers import TinyTask, tiny_increlora_bert


def _args(out, **kw):
    settings = dict(max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
                    save_steps=6, logging_steps=100, report_to=[], use_cpu=True, seed=0,
                    disable_tqdm=True)
    return TrainingArguments(output_dir=str(out), **dict(settings, **kw))


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.stack([TinyTask()[i]["input_ids"] for i in range(4)])).logits


def _reloaded_logits(folder) -> torch.Tensor:
    """The logits of a newly built and injected model (the same base) after
    ``load_adapter(folder)``."""
    fresh, _ = tiny_increlora_bert()
    return _logits(load_adapter(fresh, folder))


def _trainer(tmp_path, plain: bool):
    """An `IncreLoRATrainer`, or with ``plain`` a Trainer with the installed callback, of a
    tiny BERT writing into ``tmp_path``."""
    model, config = tiny_increlora_bert()
    if plain:
        trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=TinyTask(),
                          optimizers=increlora_optimizers(model, lr=1e-2))
        IncreLoRACallback(IncreLoRAController(model, config)).install(trainer)
        return trainer
    return IncreLoRATrainer(model=model, args=_args(tmp_path), train_dataset=TinyTask())


def _trained(tmp_path, plain: bool):
    trainer = _trainer(tmp_path, plain)
    trainer.train()
    return trainer


def test_save_model_writes_the_adapter_beside_the_whole_model(tmp_path):
    """``trainer.save_model(dir)`` wrote only the whole model (``save_pretrained``), so
    ``load_adapter(dir)`` was refused; a peft user expects an adapter there (found by an
    audit). Its adapter gives the trained model's outputs in a newly injected model, and the
    whole model is still there for ``resume_from_checkpoint``."""
    trainer = _trained(tmp_path, plain=False)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").is_file()
    trained = _logits(trainer.model)
    assert not torch.equal(_logits(tiny_increlora_bert()[0]), trained)  # training changed them
    assert torch.equal(_reloaded_logits(tmp_path / "final"), trained)
    assert torch.equal(_reloaded_logits(tmp_path / "checkpoint-6"), trained)


def test_save_model_again_replaces_its_own_adapter(tmp_path):
    """A second ``save_model`` into the same folder (or a rerun's checkpoint of the same step)
    replaces the adapter the first one wrote, as it replaces the whole model."""
    trainer = _trained(tmp_path, plain=False)
    trainer.save_model(str(tmp_path / "final"))
    with torch.no_grad():
        trainer.model.classifier.bias.add_(1.0)
    trainer.save_model(str(tmp_path / "final"))
    assert torch.equal(_reloaded_logits(tmp_path / "final"), _logits(trainer.model))


def test_save_model_never_replaces_an_adapter_it_did_not_write(tmp_path):
    """A folder holding the user's own adapter (``save_adapter``) is refused before anything is
    written into it: the save would replace a file it did not write."""
    trainer = _trained(tmp_path, plain=False)
    own = tmp_path / "own"
    save_adapter(tiny_increlora_bert()[0], own)
    before = {p.name: p.read_bytes() for p in own.iterdir()}
    with pytest.raises(FileExistsError, match="save_adapter"):
        trainer.save_model(str(own))
    assert {p.name: p.read_bytes() for p in own.iterdir()} == before


def test_a_plain_trainers_checkpoints_hold_the_adapter(tmp_path):
    """Under a plain Trainer the callback writes the adapter into each checkpoint it saves the
    controller into (``on_save``)."""
    trainer = _trained(tmp_path, plain=True)
    assert torch.equal(_reloaded_logits(tmp_path / "checkpoint-6"), _logits(trainer.model))


@pytest.mark.parametrize("sharding", [None, "fsdp", "deepspeed"])
def test_the_callback_writes_no_adapter_from_a_sharded_model(tmp_path, sharding):
    """Under FSDP or DeepSpeed the model's tensors are this process's shards: the callback
    writes the controller into the checkpoint, and the adapter only without them."""
    import types

    model, config = tiny_increlora_bert()
    callback = IncreLoRACallback(IncreLoRAController(model, config))
    args = types.SimpleNamespace(should_save=True, output_dir=str(tmp_path), fsdp=None,
                                 deepspeed=None)
    if sharding:
        setattr(args, sharding, "full_shard" if sharding == "fsdp" else "ds.json")
    callback.on_save(args, types.SimpleNamespace(global_step=3), None, model=model)
    assert (tmp_path / "checkpoint-3" / "increlora_controller.pt").is_file()
    assert (tmp_path / "checkpoint-3" / "adapter_model.safetensors").is_file() == (not sharding)


@pytest.mark.parametrize("plain", [False, True])
def test_load_best_model_at_end_reads_a_sharded_checkpoint_holding_the_adapter(tmp_path, plain):
    """A checkpoint whose whole model ``save_pretrained`` shards (above its max_shard_size,
    50GB in transformers 5, 5GB in 4.x) and which now holds the adapter too: the Trainer's
    ``_load_best_model`` took the adapter file for a single-file model and failed to open
    ``pytorch_model.bin`` instead of reading the shards."""
    model, config = tiny_increlora_bert()
    save_pretrained = model.save_pretrained
    model.save_pretrained = lambda *a, **kw: save_pretrained(*a, max_shard_size="20KB", **kw)
    if plain:
        trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=TinyTask(),
                          optimizers=increlora_optimizers(model, lr=1e-2))
        IncreLoRACallback(IncreLoRAController(model, config)).install(trainer)
    else:
        trainer = IncreLoRATrainer(model=model, args=_args(tmp_path), train_dataset=TinyTask())
    trainer.train()
    best = tmp_path / "checkpoint-6"
    assert (best / "model.safetensors.index.json").is_file()
    assert (best / "adapter_model.safetensors").is_file()
    saved = _logits(trainer.model)
    with torch.no_grad():
        trainer.model.classifier.bias.add_(1.0)
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    trainer.state.best_model_checkpoint = str(best)
    trainer._load_best_model()
    assert torch.equal(_logits(trainer.model), saved)


@pytest.mark.parametrize("plain", [False, True])
def test_a_checkpoint_push_never_replaces_an_adapter_it_did_not_write(tmp_path, plain):
    """With ``push_to_hub`` the Trainer copies each checkpoint's model files, peft's adapter
    names included, into ``output_dir`` before pushing: since checkpoints hold the adapter, a
    user's own adapter there (``save_adapter`` into the output folder of an earlier run) was
    replaced. The push is refused before the copy."""
    trainer = _trained(tmp_path, plain=plain)
    save_adapter(tiny_increlora_bert()[0], tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    trainer.push_in_progress = None  # (what push_to_hub=True's repo set-up leaves, offline here)
    with pytest.raises(FileExistsError, match="save_adapter"):
        trainer._push_from_checkpoint(str(tmp_path / "checkpoint-6"))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("plain", [False, True])
def test_an_adapter_in_the_output_folder_is_said_before_training(tmp_path, plain):
    """An adapter the Trainer did not write in ``output_dir`` was found only after training
    (``save_model()`` refused then, a checkpoint push at its first checkpoint): it is warned
    of at train begin, and refused there with ``push_to_hub``."""
    import types
    import warnings

    save_adapter(tiny_increlora_bert()[0], tmp_path)
    args = types.SimpleNamespace(should_save=True, output_dir=str(tmp_path), push_to_hub=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        IncreLoRACallback.check_output_dir_adapter(args)
    assert [w for w in caught if "save_adapter" in str(w.message)]
    args.push_to_hub = True
    with pytest.raises(FileExistsError, match="output_dir"):
        IncreLoRACallback.check_output_dir_adapter(args)
    # and a run reaches the check before its first step
    trainer = _trainer(tmp_path, plain)
    with pytest.warns(UserWarning, match="holds an adapter the Trainer did not write"):
        trainer.train()
