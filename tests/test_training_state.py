"""Everything a resume needs is verified, and the data is part of a run's identity (issue 14
items 2, 3 and the broken-file cases of item 7)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from finetune_helpers import cli, sentiment_rows, tiny_files, write_csv


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A finished 4-step IncreLoRA run that kept checkpoint-2."""
    root = tmp_path_factory.mktemp("state")
    tiny = tiny_files(root)
    out = root / "run"
    assert cli(["--model", tiny["model"], "--train-file", tiny["train"], "--eval-file",
                tiny["dev"], "--batch-size", "8", "--max-seq-len", "16", "--output-dir",
                str(out), "--no-progress", "--max-steps", "4", "--save-steps", "2"]) == 0
    tiny["ckpt"] = out / "checkpoint-2"
    return tiny


def _copy(run: dict, tmp_path: Path) -> Path:
    ckpt = tmp_path / "copy" / "checkpoint-2"
    shutil.copytree(run["ckpt"], ckpt)
    return ckpt


def _resume(ckpt: Path, tmp_path: Path, capsys) -> tuple:
    capsys.readouterr()
    code = cli(["--resume", str(ckpt), "--output-dir", str(tmp_path / "resumed"),
                "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def test_an_intact_checkpoint_resumes(run, tmp_path, capsys):
    code, err = _resume(_copy(run, tmp_path), tmp_path, capsys)
    assert code == 0 and not err


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_trainer_state_is_a_clear_error(run, tmp_path, capsys, damage):
    ckpt = _copy(run, tmp_path)
    path = ckpt / "trainer_state.pt"
    data = bytearray(path.read_bytes())
    if damage == "flip":  # one bit inside the optimizer state, as in the review
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    code, err = _resume(ckpt, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "trainer_state.pt" in err[0], err
    assert ("corrupted" in err[0]) or ("not readable" in err[0])
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()


def test_a_trainer_state_of_a_newer_version_is_a_clear_error(run, tmp_path, capsys):
    import torch

    ckpt = _copy(run, tmp_path)
    path = ckpt / "trainer_state.pt"
    envelope = torch.load(path, weights_only=True)
    envelope["version"] += 1
    torch.save(envelope, path)
    code, err = _resume(ckpt, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "trainer_state.pt" in err[0], err
    assert f"version {envelope['version']}" in err[0]
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("name", ["settings.json", "adapter_model.safetensors",
                                  "adapter_config.json"])
def test_every_part_of_the_checkpoint_is_checksummed(run, tmp_path, capsys, name):
    ckpt = _copy(run, tmp_path)
    path = ckpt / name
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    code, err = _resume(ckpt, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and name in err[0] and "corrupted" in err[0], err


def test_a_missing_part_is_named(run, tmp_path, capsys):
    ckpt = _copy(run, tmp_path)
    (ckpt / "adapter_config.json").unlink()
    code, err = _resume(ckpt, tmp_path, capsys)
    assert code == 2 and "missing adapter_config.json" in err[0]


def test_a_broken_settings_file_names_it(run, tmp_path):
    from increlora_fast.training import checkpoint as ckpt_mod

    ckpt = _copy(run, tmp_path)
    path = ckpt / "settings.json"
    path.write_text(path.read_text()[:25])
    with pytest.raises(ValueError, match="settings.json"):
        ckpt_mod.read_checkpoint_settings(ckpt)


def test_changed_data_is_refused_on_resume(run, tmp_path, capsys):
    ckpt = _copy(run, tmp_path)
    settings = json.loads((ckpt / "settings.json").read_text())
    assert Path(settings["train_file"]).is_absolute() and len(settings["train_file_sha256"]) == 64
    train = Path(settings["train_file"])
    original = train.read_bytes()
    try:
        rows = sentiment_rows(96, seed=0)
        for r in rows:
            r["label"] = "pos" if r["label"] == "neg" else "neg"
        write_csv(train, rows)
        code, err = _resume(ckpt, tmp_path, capsys)
    finally:
        train.write_bytes(original)
    assert code == 2 and str(train) in err[0] and "changed" in err[0]


def test_resume_from_another_working_directory(run, tmp_path, capsys, monkeypatch):
    """The run was started with a relative data path; it resumes from elsewhere."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(run["train"], work / "data" / "good.csv")
    monkeypatch.chdir(work)
    assert cli(["--model", run["model"], "--train-file", "data/good.csv", "--batch-size", "8",
                "--max-seq-len", "16", "--output-dir", "out", "--no-progress", "--max-steps",
                "4", "--save-steps", "2"]) == 0
    monkeypatch.chdir(tmp_path)
    code, err = _resume(work / "out" / "checkpoint-2", tmp_path, capsys)
    assert code == 0 and not err


def test_resume_of_a_run_given_a_relative_model_folder_from_another_working_directory(
        run, tmp_path, capsys, monkeypatch):
    """The data paths were stored absolute, ``--model`` as given: a run started with
    ``--model bert`` in its folder could not be resumed from anywhere else (``bert`` was looked
    up as a hub id, or another folder of that name was loaded)."""
    work = tmp_path / "work"
    shutil.copytree(run["model"], work / "bert")
    monkeypatch.chdir(work)
    assert cli(["--model", "bert", "--train-file", run["train"], "--batch-size", "8",
                "--max-seq-len", "16", "--output-dir", "out", "--no-progress", "--max-steps",
                "4", "--save-steps", "2"]) == 0
    monkeypatch.chdir(tmp_path)
    code, err = _resume(work / "out" / "checkpoint-2", tmp_path, capsys)
    assert code == 0 and not err
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["model"] == \
        str(work / "bert")
    monkeypatch.chdir(work)  # giving --model as the run did is no conflict
    capsys.readouterr()
    assert cli(["--resume", "out/checkpoint-2", "--model", "bert", "--output-dir",
                str(tmp_path / "again"), "--no-progress"]) == 0, capsys.readouterr().err


def test_compare_reruns_instead_of_reusing_results_from_other_data(run, tmp_path, capsys):
    """A finished run of an earlier comparison on other data is never reused; it is trained
    again in its place only with --overwrite, and refused otherwise (it was replaced unasked:
    an earlier comparison's results lost)."""
    train = tmp_path / "train.csv"
    write_csv(train, sentiment_rows(96, seed=0))
    out = tmp_path / "cmp"
    argv = ["--model", run["model"], "--train-file", str(train), "--eval-file", run["dev"],
            "--batch-size", "8", "--max-seq-len", "16", "--output-dir", str(out),
            "--no-progress", "--max-steps", "2", "--compare", "--methods", "lora",
            "--seeds", "1", "--lrs", "0.001"]
    assert cli(argv) == 0
    first = json.loads((out / "lora" / "lr0.001" / "seed0" / "metrics.json").read_text())
    write_csv(train, sentiment_rows(96, seed=5))  # other contents, same path
    capsys.readouterr()
    assert cli(argv) == 2
    assert "on other data" in capsys.readouterr().err
    kept = json.loads((out / "lora" / "lr0.001" / "seed0" / "metrics.json").read_text())
    assert kept == first
    assert cli(argv + ["--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "reusing" not in printed and "other data" in printed
    again = json.loads((out / "lora" / "lr0.001" / "seed0" / "metrics.json").read_text())
    assert again["settings"]["train_file_sha256"] != first["settings"]["train_file_sha256"]


def test_checkpoint_write_failure_leaves_no_partial_folder(run, tmp_path, monkeypatch):
    import increlora_fast.persistence as persistence
    from increlora_fast.training.checkpoint import (CheckpointWriteError, load_checkpoint,
                                                    save_checkpoint)
    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.checkpoint import read_checkpoint_settings

    s, _, method_run, _ = build_run(read_checkpoint_settings(run["ckpt"]))
    state = load_checkpoint(run["ckpt"], method_run)
    target = tmp_path / "checkpoint-2"
    save_checkpoint(target, method_run, s, state)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def full(fd):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(persistence.os, "fsync", full)
    with pytest.raises(CheckpointWriteError, match="no space left on the device"):
        save_checkpoint(target, method_run, s, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def _checkpoint_again(run, tmp_path, patches):
    """``run``'s checkpoint-2 loaded and written again into ``tmp_path`` with ``patches``
    ({(module, name): value}) in place while writing; (settings, its method run, the folder)."""
    from increlora_fast.training.checkpoint import (load_checkpoint, read_checkpoint_settings,
                                                    save_checkpoint)
    from increlora_fast.training.finetune_run import build_run

    s, _, method_run, _ = build_run(read_checkpoint_settings(run["ckpt"]))
    state = load_checkpoint(run["ckpt"], method_run)
    target = tmp_path / "checkpoint-2"
    with pytest.MonkeyPatch.context() as m:
        for (module, name), value in patches.items():
            m.setattr(module, name, value)
        save_checkpoint(target, method_run, s, state)
    return s, method_run, target


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_machine_without_one(run, tmp_path):
    """A GPU run's trainer state holds CUDA tensors (the optimizer's moments); here their
    storages are tagged cuda:0 as a GPU run's are. Loading needs no GPU: the state is read onto
    the CPU and the optimizer puts each tensor on its parameter's device."""
    import torch
    import torch.serialization
    from increlora_fast.training.checkpoint import load_checkpoint, read_checkpoint_settings
    from increlora_fast.training.finetune_run import build_run

    _, written, target = _checkpoint_again(
        run, tmp_path, {(torch.serialization, "location_tag"): lambda storage: "cuda:0"})
    _, _, fresh, _ = build_run(read_checkpoint_settings(target))
    assert load_checkpoint(target, fresh).step == 2
    want, got = written.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert want.keys() == got.keys() and want
    for index, tensors in want.items():
        for key, value in tensors.items():
            assert torch.equal(got[index][key], value) and got[index][key].device == value.device


def test_a_checkpoint_keeps_the_gpus_rng_states(run, tmp_path, monkeypatch):
    """Dropout on a GPU draws from the GPU's generator: a checkpoint of a run that used CUDA
    keeps every GPU's RNG state and a resume on a GPU machine sets them again, so it continues
    exactly (CUDA's calls are stood in for here)."""
    import torch
    from increlora_fast.training.checkpoint import load_checkpoint, read_checkpoint_settings
    from increlora_fast.training.finetune_run import build_run

    gpu_states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    _, _, target = _checkpoint_again(run, tmp_path, {
        (torch.cuda, "is_initialized"): lambda: True,
        (torch.cuda, "get_rng_state_all"): lambda: [s.clone() for s in gpu_states]})
    _, _, fresh, _ = build_run(read_checkpoint_settings(target))
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    load_checkpoint(target, fresh)
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, gpu_states))


def test_a_trainer_state_that_is_not_an_envelope_is_named(run, tmp_path, capsys):
    """A readable torch file of another form (a trainer state of an increlora-fast without
    checksums, or another program's) is named as such, not read further."""
    import torch

    ckpt = _copy(run, tmp_path)
    torch.save({"step": 2}, ckpt / "trainer_state.pt")
    code, err = _resume(ckpt, tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert "trainer_state.pt is not an increlora-fast trainer state with checksums" in err[0]


@pytest.mark.parametrize("text,why", [("{not json", "Expecting property name"),
                                      ("[1, 2]", "a JSON object is needed, not list")],
                         ids=["not-json", "not-an-object"])
def test_a_settings_file_that_matches_its_checksum_but_does_not_parse_is_named(run, tmp_path,
                                                                              text, why):
    """A settings file written otherwise (by hand, with the checksum in trainer_state.pt
    brought up to date) that is not a JSON object: one ValueError naming the file, not an
    AttributeError from inside RunSettings.from_dict."""
    import torch

    from increlora_fast.data.files import file_sha256
    from increlora_fast.training import checkpoint as ckpt_mod

    ckpt = _copy(run, tmp_path)
    path = ckpt / "settings.json"
    path.write_text(text)
    envelope = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    envelope["files"]["settings.json"] = file_sha256(path)
    torch.save(envelope, ckpt / "trainer_state.pt")
    with pytest.raises(ValueError, match=rf"settings\.json is not a valid settings file: {why}"):
        ckpt_mod.read_checkpoint_settings(ckpt)


def test_a_resume_whose_data_file_is_gone_names_it(run, tmp_path, capsys):
    ckpt = _copy(run, tmp_path)
    train = Path(run["train"])
    moved = train.with_name(train.name + ".moved")
    train.rename(moved)
    try:
        code, err = _resume(ckpt, tmp_path, capsys)
    finally:
        moved.rename(train)
    assert code == 2 and len(err) == 1, err
    assert f"data file {train} (the --train-file stored in" in err[0] and "does not exist" in err[0]
    assert not (tmp_path / "resumed").exists() or not any((tmp_path / "resumed").iterdir())


def test_a_resume_whose_settings_hold_no_data_checksum_is_refused(run, tmp_path, capsys):
    """Settings without the training file's checksum (written before they were kept) cannot
    prove the data is the same: the resume is refused, saying so."""
    import torch

    from increlora_fast.data.files import file_sha256

    ckpt = _copy(run, tmp_path)
    path = ckpt / "settings.json"
    settings = json.loads(path.read_text())
    settings["train_file_sha256"] = None
    path.write_text(json.dumps(settings))
    envelope = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    envelope["files"]["settings.json"] = file_sha256(path)
    torch.save(envelope, ckpt / "trainer_state.pt")
    code, err = _resume(ckpt, tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert f"stores no checksum of the data file {run['train']}" in err[0]
    assert "start a new run" in err[0]


def test_a_checkpoint_written_over_the_leftovers_of_a_killed_save(run, tmp_path):
    """A save killed earlier left ``checkpoint-2.tmp`` (half written) and the set-aside copy of
    an older checkpoint-2 beside a complete one: the next save of that step removes both and
    leaves one checkpoint that resumes."""
    from increlora_fast.training.checkpoint import (REPLACED_SUFFIX, load_checkpoint,
                                                    read_checkpoint_settings, save_checkpoint)
    from increlora_fast.training.finetune_run import build_run

    s, _, method_run, _ = build_run(read_checkpoint_settings(run["ckpt"]))
    state = load_checkpoint(run["ckpt"], method_run)
    target = tmp_path / "checkpoint-2"
    save_checkpoint(target, method_run, s, state)
    half = tmp_path / "checkpoint-2.tmp"
    half.mkdir()
    (half / "settings.json").write_text("{")
    aside = tmp_path / f".checkpoint-2{REPLACED_SUFFIX}"
    shutil.copytree(target, aside)
    save_checkpoint(target, method_run, s, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert read_checkpoint_settings(target).max_steps == s.max_steps


def test_a_checkpoint_trained_on_labels_read_otherwise_is_named_on_resume(tmp_path, capsys,
                                                                           monkeypatch):
    """Label spellings became one label (true / True, composed and decomposed accents): a
    checkpoint of a file that mixes them was trained on more classes than the data now reads
    as, and its resume failed on the head's shape without saying why. The checkpoint records
    its class names, and a resume onto others is refused naming both."""
    from increlora_fast.training import checkpoint
    tiny = tiny_files(tmp_path)
    out = tmp_path / "run"
    real = checkpoint._label_names
    monkeypatch.setattr(checkpoint, "_label_names",  # as the checkpoint's release read them
                        lambda model: real(model) + ["True"])
    assert cli(["--model", tiny["model"], "--train-file", tiny["train"], "--eval-file",
                tiny["dev"], "--batch-size", "8", "--max-seq-len", "16", "--output-dir",
                str(out), "--no-progress", "--max-steps", "4", "--save-steps", "2"]) == 0
    monkeypatch.setattr(checkpoint, "_label_names", real)
    code, err = _resume(out / "checkpoint-2", tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert "was trained on the labels" in err[0] and "'True'" in err[0], err
