"""`finetune --device/--precision`: the resolvers (with fake hardware), the CLI's errors, and the
speed and memory fields of metrics.json, on a tiny random BERT on CPU."""
from __future__ import annotations

import functools
import json

import pytest
import torch

import finetune_helpers
from finetune_helpers import cli, tiny_files
from increlora_fast.training.device import (CPU_MEMORY_NOTE, Placement, peak_memory,
                                            resolve_device, resolve_precision, tokens_per_second)

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=64, dev_rows=24)


tiny_args = functools.partial(finetune_helpers.tiny_args, steps=4, save_steps=0)


@pytest.mark.parametrize("text, cuda, count, expected", [
    ("cpu", True, 2, CPU), ("auto", False, 0, CPU), ("AUTO", True, 1, GPU),
    ("cuda", True, 1, GPU), ("cuda:1", True, 2, torch.device("cuda", 1))])
def test_resolve_device_with_fake_hardware(text, cuda, count, expected):
    assert resolve_device(text, cuda_available=cuda, device_count=count) == expected


@pytest.mark.parametrize("text, cuda, count, message", [
    ("gpu", True, 1, "--device 'gpu' is invalid: use auto, cpu, cuda or cuda:N"),
    ("cuda:x", True, 1, "is invalid"),
    ("cuda", False, 0, "--device cuda: CUDA is not available here"),
    ("cuda:0", False, 0, "CUDA is not available here"),
    ("cuda:3", True, 2, "--device cuda:3: there is no CUDA device 3 (this machine has 2")])
def test_resolve_device_errors_name_the_option(text, cuda, count, message):
    with pytest.raises(ValueError) as info:
        resolve_device(text, cuda_available=cuda, device_count=count)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, device, bf16_ok, expected", [
    ("auto", CPU, False, "fp32"), ("auto", CPU, True, "fp32"), ("auto", GPU, True, "bf16"),
    ("auto", GPU, False, "fp32"), ("fp32", GPU, True, "fp32"), ("bf16", CPU, False, "bf16"),
    ("fp16", GPU, False, "fp16"), ("BF16", GPU, True, "bf16")])
def test_resolve_precision_with_fake_capability(text, device, bf16_ok, expected):
    assert resolve_precision(text, device, bf16_ok=bf16_ok) == expected


@pytest.mark.parametrize("text, device, bf16_ok, message", [
    ("fp16", CPU, False, "--precision fp16 needs a CUDA device"),
    ("bf16", GPU, False, "--precision bf16: cuda:0 has no native bfloat16"),
    ("fp8", GPU, True, "--precision 'fp8' is invalid")])
def test_resolve_precision_errors(text, device, bf16_ok, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("'", "'")):
        resolve_precision(text, device, bf16_ok=bf16_ok)


def test_tokens_per_second_and_cpu_peak_memory():
    assert tokens_per_second(1000, 4.0) == 250.0
    assert tokens_per_second(10, 0.0) is None
    assert peak_memory(CPU) == {"peak_device_memory_mb": None,
                                "peak_device_memory_kind": CPU_MEMORY_NOTE}


@pytest.mark.parametrize("extra, message", [
    (["--device", "gpu"], "--device 'gpu' is invalid"),
    (["--precision", "half"], "--precision 'half' is invalid"),
    (["--device", "cpu", "--precision", "fp16"], "--precision fp16 needs a CUDA device")])
def test_cli_rejects_bad_values_in_one_line(tiny, tmp_path, capsys, extra, message):
    assert cli(tiny_args(tiny, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("increlora-fast finetune: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "bad" / "metrics.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cli_cuda_without_a_gpu_is_a_clear_error(tiny, tmp_path, capsys):
    assert cli(tiny_args(tiny, tmp_path / "nogpu", "--device", "cuda:0")) == 2
    assert "--device cuda:0: CUDA is not available here" in capsys.readouterr().err


def test_cpu_run_records_device_tokens_per_second_and_memory(tiny, tmp_path, capsys):
    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.settings import RunSettings

    out = tmp_path / "cpu"
    device = "auto" if not torch.cuda.is_available() else "cpu"
    assert cli(tiny_args(tiny, out, "--device", device)) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["device"] == "cpu" and m["precision"] == "fp32"
    assert m["settings"]["device"] == device and m["settings"]["precision"] == "auto"
    # the non-padding tokens of exactly the 4 training batches
    _, _, _, batches = build_run(RunSettings(
        model=tiny["model"], task=None, train_file=tiny["train"], eval_file=tiny["dev"],
        batch_size=8, max_seq_len=16, max_steps=4))
    expected = sum(int(batches.train_batch(s)["attention_mask"].sum()) for s in range(4))
    assert m["train_tokens"] == expected
    assert m["tokens_per_second"] > 0
    assert m["tokens_per_second_warm"] is None  # no step after the first log point (step 4)
    # each step before the first log point timed alone; together they are the training time
    assert len(m["first_step_seconds"]) == 4 and all(t > 0 for t in m["first_step_seconds"])
    assert abs(sum(m["first_step_seconds"]) - m["train_seconds"]) <= 0.051
    # train_seconds is rounded to 0.1 s in metrics.json
    seconds = m["train_seconds"]
    assert expected / (seconds + 0.051) <= m["tokens_per_second"] <= \
        expected / max(seconds - 0.051, 1e-3)
    assert m["peak_device_memory_mb"] is None and m["peak_device_memory_kind"] == CPU_MEMORY_NOTE
    assert f"{m['tokens_per_second']:,.0f} training tokens/s on cpu (fp32)" in printed
    assert "peak device memory - (not measured on cpu" in printed


def test_bf16_autocast_on_cpu_trains(tiny, tmp_path):
    out = tmp_path / "bf16"
    assert cli(tiny_args(tiny, out, "--device", "cpu", "--precision", "bf16")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["precision"] == "bf16" and 0.0 <= m["eval_accuracy"] <= 1.0
    assert m["total_rank"] == 24


def test_fp16_scaler_passes_its_scale_to_the_controller(tiny, tmp_path, monkeypatch):
    """The loop's fp16 branch on CPU (the CLI allows fp16 only on CUDA): the controller is
    called with the GradScaler's scale of the step's backward and its overflow flag."""
    from increlora_fast.controller import IncreLoRAController
    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.loop import LoopState, train_loop
    from increlora_fast.training.settings import RunSettings

    seen, flags = [], []
    real_step = IncreLoRAController.step

    def spy(self, step, loss_scale=1.0, overflow=None):
        seen.append(float(loss_scale))  # a device tensor the scaler updates in place
        flags.append(overflow)
        return real_step(self, step, loss_scale=loss_scale, overflow=overflow)
    monkeypatch.setattr(IncreLoRAController, "step", spy)
    place = Placement(CPU, "fp16")
    s, _, run, batches = build_run(RunSettings(
        model=tiny["model"], task=None, train_file=tiny["train"], eval_file=tiny["dev"],
        batch_size=8, max_seq_len=16, max_steps=3), place)
    scales = []
    state = train_loop(run, batches, 3, s.grad_clip, LoopState(), progress=False,
                       on_step_end=lambda st: scales.append(float(place.loss_scale)),
                       placement=place)
    assert state.step == 3 and len(seen) == 3
    assert seen[0] == 65536.0  # GradScaler's initial scale
    # each step's controller call saw the scale its backward used (before scaler.update())
    assert seen[1:] == scales[:-1]
    assert all(isinstance(f, torch.Tensor) and f.dim() == 0 and float(f) == 0 for f in flags)


def test_a_checkpoint_keeps_the_fp16_loss_scale(tiny, tmp_path):
    """An fp16 run's GradScaler (scale and growth count) is saved with its checkpoint and
    restored on resume; a resumed run that started from the initial scale again would overflow
    and skip steps the uninterrupted run does not."""
    from increlora_fast.training.checkpoint import load_checkpoint, save_checkpoint
    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.loop import LoopState, train_loop
    from increlora_fast.training.settings import RunSettings

    settings = RunSettings(model=tiny["model"], task=None, train_file=tiny["train"],
                           eval_file=tiny["dev"], batch_size=8, max_seq_len=16, max_steps=4)
    place = Placement(CPU, "fp16")
    place.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30, growth_interval=3)
    s, _, run, batches = build_run(settings, place)
    with pytest.warns(RuntimeWarning, match="non-finite"):  # the first steps overflow
        state = train_loop(run, batches, 4, s.grad_clip, LoopState(), progress=False,
                           placement=place)
    saved = place.scaler.state_dict()
    assert saved["scale"] < 2.0 ** 30  # it backed off: not the initial state
    save_checkpoint(tmp_path / "ckpt", run, s, state, place.scaler)
    fresh = Placement(CPU, "fp16")
    _, _, run, _ = build_run(settings, fresh)
    assert load_checkpoint(tmp_path / "ckpt", run, fresh.scaler).step == 4
    assert fresh.scaler.state_dict() == saved


def _fake_run(calls: list, key):
    """A stand-in for `run_finetune` in a comparison: records ``key(settings)`` of each run
    and returns the metrics a comparison reads (every step graphed where
    `compare.uses_cuda_graphs` says so)."""
    from increlora_fast.training import compare

    def run(s, run_dir, progress=True, overwrite=False):
        calls.append(key(s))
        return {"eval_accuracy": 0.5, "seed": s.seed, "task": "files", "total_rank": 4,
                "trainable_params_active": 1, "trainable_params_padded": 2, "steps": 4,
                "train_examples": 64, "eval_examples": 24, "method_settings": {},
                "train_seconds": 1.0,
                "cuda_graphs_steps": 4 if compare.uses_cuda_graphs(s) else 0}
    return run


def test_compare_runs_every_peer_on_the_same_device_and_precision(tiny, tmp_path, monkeypatch):
    import dataclasses

    from increlora_fast.training import compare
    from increlora_fast.training.settings import RunSettings

    calls = []

    monkeypatch.setattr(compare, "run_finetune", _fake_run(
        calls, lambda s: (s.method, s.device, s.precision)))
    monkeypatch.setattr(compare, "format_table", lambda report: "table")
    base = RunSettings(model=tiny["model"], task=None, train_file=tiny["train"],
                       eval_file=tiny["dev"], device="cpu", precision="bf16")
    compare.compare_methods(base, ["increlora", "lora", "adalora"], [1e-3, 2e-3], 2,
                            str(tmp_path / "cmp"), progress=False, echo=lambda line: None)
    assert len(calls) == 3 * (2 + 1)
    assert {(d, p) for _, d, p in calls} == {("cpu", "bf16")}
    assert dataclasses.asdict(base)["device"] == "cpu"


def test_compare_pads_every_method_as_the_graphed_one(tiny, tmp_path, monkeypatch):
    """When ``--cuda-graphs auto`` graphs IncreLoRA (here: the choice made CUDA's), every
    method of the comparison pads to --max-seq-len; a padding given, or no graphed method,
    leaves each run its own."""
    from increlora_fast.training import compare
    from increlora_fast.training.settings import RunSettings

    base = RunSettings(model=tiny["model"], task=None, train_file=tiny["train"],
                       eval_file=tiny["dev"], device="cpu")
    said = []
    assert compare.with_shared_padding(base, ["increlora", "lora"], said.append) is base
    monkeypatch.setattr(compare, "uses_cuda_graphs", lambda s: s.method == "increlora")
    shared = compare.with_shared_padding(base, ["increlora", "lora"], said.append)
    assert shared.pad_to == "max_length" and "--pad-to max_length" in said[-1]
    assert compare.with_shared_padding(base, ["lora", "adalora"], said.append) is base
    given = RunSettings(**dict(base.to_dict(), pad_to="longest"))
    assert compare.with_shared_padding(given, ["increlora", "lora"], said.append) is given
    calls = []

    monkeypatch.setattr(compare, "run_finetune", _fake_run(calls, lambda s: (s.method,
                                                                          s.pad_to)))
    monkeypatch.setattr(compare, "_settings_text", lambda method, ms: "settings")
    report = compare.compare_methods(base, ["increlora", "lora"], [1e-3], 2,
                                     str(tmp_path / "cmp"), progress=False,
                                     echo=lambda line: None)
    assert calls and {pad for _, pad in calls} == {"max_length"}
    # which runs were graphed is kept (their time is not eager time), and said in the table
    assert report["methods"]["increlora"]["cuda_graphs_steps"] == [4, 4]
    assert report["methods"]["lora"]["cuda_graphs_steps"] == [0, 0]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "steps from CUDA graphs: increlora 4 / 4 of 4 per seed |" not in table
    assert "; steps from CUDA graphs: increlora 4 / 4 of 4 per seed\n" in table
    report["methods"]["increlora"]["cuda_graphs_steps"] = [None, 0]  # older runs: no count
    assert "CUDA graphs" not in compare.format_table(report)


def test_runs_without_matplotlib(tiny, tmp_path, monkeypatch):
    """A bare CUDA image may lack matplotlib: the run still writes everything but the PNG."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "noplot"
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert cli(tiny_args(tiny, out, "--device", "cpu")) == 0
    assert (out / "metrics.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.png"))
    assert (out / "allocation_log.jsonl").is_file()


def test_a_half_precision_checkpoint_trains_in_float32(tiny, tmp_path):
    """Checkpoints saved in fp16/bf16 (and a compact fp16 copy of the packaged model for
    gpu-check --assets) load as float32 master weights; autocast decides the compute dtype."""
    from transformers import AutoModel, AutoTokenizer

    from increlora_fast.training.finetune_run import build_run
    from increlora_fast.training.settings import RunSettings

    half = tmp_path / "bert16"
    AutoModel.from_pretrained(tiny["model"]).to(torch.bfloat16).save_pretrained(str(half))
    AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(str(half))
    _, _, run, _ = build_run(RunSettings(model=str(half), task=None, train_file=tiny["train"],
                                         eval_file=tiny["dev"], max_steps=2))
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    out = tmp_path / "run16"
    assert cli(tiny_args(tiny, out, "--model", str(half), "--precision", "bf16")) == 0
    assert json.loads((out / "metrics.json").read_text())["precision"] == "bf16"
