"""Audit of `gpu-check`'s paths that only a GPU run takes, exercised on CPU with fakes: the
main job's warnings kept, a finetune that exits, the report written when its Markdown fails."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

from increlora_fast.benchmarks.gpu_check import parts as gpu_check
from increlora_fast.benchmarks.gpu_check.markdown import finetune_section
from increlora_fast.benchmarks.gpu_check.plan import dry_run_plan

CPU = torch.device("cpu")


def _fake_finetune(warn: str = "", exit_code=None):
    """A stand-in for `cli.main.main`: writes the run's metrics.json, warns ``warn`` (as
    `precompile_kernels` does when a build failed) or exits as argparse does."""
    def main(argv):
        if exit_code is not None:
            print("increlora-fast finetune: error: argument --pad-to: invalid choice",
                  file=sys.stderr)
            raise SystemExit(exit_code)
        out = argv[argv.index("--output-dir") + 1]
        if warn:
            warnings.warn(warn, RuntimeWarning)
        import pathlib
        pathlib.Path(out).mkdir(parents=True, exist_ok=True)
        lora = "lora" in argv
        (pathlib.Path(out) / "metrics.json").write_text(json.dumps({
            "method": "lora" if lora else "increlora", "eval_accuracy": 0.8, "steps": 4,
            "device": "cpu", "precision": "fp32", "tokens_per_second": 10.0}))
        return 0
    return main


def test_the_main_jobs_warnings_are_kept_in_the_report(tmp_path, monkeypatch):
    """`precompile_kernels` says only in a warning that builds failed (docs/gpu_session.md asks
    to copy it into bench/NOTES.md); the finetune's stderr is captured, so the check must keep
    its warnings in the run's record, its log and the Markdown."""
    from increlora_fast.cli import main as cli_main

    warn = "precompile_kernels: 1 of 9 calls failed (their kernels are built by the first step)"
    monkeypatch.setattr(cli_main, "main", _fake_finetune(warn))
    lines = []
    result = gpu_check.check_finetune(CPU, dry_run_plan(), {}, lines.append, tmp_path)
    ran = [r for r in result["runs"] if r["status"] == "ok"]
    assert ran, result
    for run in ran:
        assert any("1 of 9 calls failed" in w for w in run["metrics"]["warnings"]), run
    assert any("1 of 9 calls failed" in line for line in lines)
    table = "\n".join(finetune_section(result))
    assert "1 of 9 calls failed" in table


def test_a_finetune_that_exits_fails_its_run_and_the_others_still_go(tmp_path, monkeypatch):
    """argparse exits (SystemExit, not an Exception) on a value the finetune refuses: that run
    fails with the message, and the check goes on with the other runs and parts."""
    from increlora_fast.cli import main as cli_main

    monkeypatch.setattr(cli_main, "main", _fake_finetune(exit_code=2))
    result = gpu_check.check_finetune(CPU, dry_run_plan(), {}, lambda line: None, tmp_path)
    ran = [r for r in result["runs"] if r["status"] != "skipped"]
    assert ran and all(r["status"] == "failed" for r in ran), result["runs"]
    assert "exited 2" in ran[0]["note"] and "invalid choice" in ran[0]["note"]


def test_the_json_report_is_written_and_the_parts_go_on_when_the_markdown_fails(
        tmp_path, monkeypatch):
    """Each part's end writes gpu_check.json and gpu_check.md: a Markdown that cannot be made
    (a record nobody rendered before) must neither keep the JSON from being written nor stop
    the parts after it; the Markdown then says why it is missing."""
    from increlora_fast.benchmarks.gpu_check import markdown

    def broken(report):
        raise TypeError("unsupported format string passed to NoneType.__format__")
    monkeypatch.setattr(markdown, "gpu_check_markdown", broken)
    ran = []
    monkeypatch.setattr(gpu_check, "check_model", lambda *a: ran.append("model") or
                        {"records": []})
    monkeypatch.setattr(gpu_check, "check_qlora", lambda *a: ran.append("qlora") or
                        {"records": []})
    report = gpu_check.run_gpu_check(tmp_path, CPU, True, parts=("model", "qlora"),
                                     log=lambda line: None)
    assert ran == ["model", "qlora"] and report["status"] == "ok"
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["status"] == "ok" and set(saved["parts"]) == {"model", "qlora"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "unsupported format string" in md and "gpu_check.json" in md


def test_parts_run_once_each_in_the_checks_order():
    """``--parts`` names a subset: given twice a part would run (and cost device time) twice,
    and given out of order the less important part would run first."""
    import argparse

    from increlora_fast.cli import gpu_check as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--parts", "layer,model,layer,kernels"])
    assert args.parts == ("kernels", "model", "layer")


def test_the_layer_part_on_cuda_measures_each_point_alone(monkeypatch):
    """The layer part's CUDA path (never taken on CPU): each (shape, tokens) point measured on
    its own, so a point that fails loses only its rows; the host time per call measured on the
    device, and the dy pass at every point of the plan."""
    from increlora_fast.benchmarks.speed import (dy_pass, host_overhead, layer_level,
                                                 optimizer_host, penalty_time)
    from increlora_fast.benchmarks.gpu_check.plan import full_plan

    cuda = torch.device("cuda", 0)
    seen = []

    def level(point, methods, device, env, log):
        shape, tokens = point.shapes[0], point.tokens[0]
        seen.append((shape, tokens, tuple(methods)))
        if shape == (4096, 11008) and tokens == 16384 and len(methods) > 1:
            raise RuntimeError("out of memory")
        if shape == (4096, 11008) and tokens == 16384 and methods == ["peft-lora"]:
            raise RuntimeError("out of memory")
        return [dict(method=m, status="ok", note="", shape=f"{shape[0]}x{shape[1]}",
                     tokens=tokens) for m in methods]
    monkeypatch.setattr(layer_level, "run_layer_level", level)
    monkeypatch.setattr(host_overhead, "measure_on_device",
                        lambda plan, methods, device, env: [
                            dict(method=m, median_us=1.0, launches_per_call=0)
                            for m in methods])
    monkeypatch.setattr(host_overhead, "measure",
                        lambda *a, **k: pytest.fail("the CPU host measurement ran on CUDA"))
    dy_points = []
    monkeypatch.setattr(dy_pass, "measure_dy_pass",
                        lambda k, n, tokens, r, dtype, device, env: dy_points.append(
                            (k, n, tokens)) or dict(shape=f"{k}x{n}", r_max=r, ours_ms=1.0,
                                                    cublas_ms=1.0, x_cublas=1.0, score_ms=1.0,
                                                    gemm_dw_ms=1.0, x_gemm_score=1.0))
    for module, name in ((optimizer_host, "measure_optimizer_host"),
                         (penalty_time, "measure_penalty_time")):
        monkeypatch.setattr(module, name, lambda *a: [])
    plan = full_plan()
    result = gpu_check.check_layer(cuda, plan, {}, lambda line: None)
    points = [(s, t) for s in plan.layer.shapes for t in plan.layer.tokens]
    assert [(s, t) for s, t, m in seen if len(m) > 1] == points  # each point alone
    # only the failed method's rows are lost: it keeps one failed record naming its error
    assert len(result["records"]) == 6 * len(points)
    failed = [r for r in result["records"] if r["status"] == "failed"]
    assert [r["method"] for r in failed] == ["peft-lora"] and "out of memory" in failed[0]["note"]
    assert "layer 4096x11008 tokens=16384 peft-lora: RuntimeError: out of memory" \
        in result["error"]
    assert [r["method"] for r in result["host_records"]] == list(gpu_check.LAYER_METHODS_CHECKED)
    assert dy_points == plan.dy_pass


@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-llama"])
def test_the_model_parts_graphed_step_replays_under_the_emulator(monkeypatch, preset):
    """``increlora-graphs`` of the model part (CUDA only) with the CPU graph emulator standing
    in for CUDA graphs, at the model part's compressed schedule and under its bf16 autocast:
    the step captures and replays, no preset falls back, and the timed record is made. (Llama
    keeps a KV cache in training, begun with ``torch.tensor([])`` on the device: no bytes to
    copy, and the H200 captured llama-7b-2l on 2026-12-05; DeBERTa is left out: transformers
    after 5.17 makes a host scalar with ``torch.tensor`` in its forward, which the emulator,
    all on CPU, cannot tell from a copy to the device.)"""
    from graph_emulator import EmulatedPool

    from increlora_fast.benchmarks.speed import model_level
    from increlora_fast.benchmarks.speed.plans import ModelPlan
    from increlora_fast.training import step_runner

    pools = []
    monkeypatch.setattr(step_runner, "CUDAGraphPool", lambda: pools.append(EmulatedPool())
                        or pools[-1])
    monkeypatch.setattr(model_level, "graphs_status", lambda device: (True, ""))
    monkeypatch.setattr(model_level, "method_env",  # the torch path: the interpreter is slow
                        lambda method: {"INCRELORA_BACKEND": "torch",
                                        "INCRELORA_FUSED_LINEAR": "0"})
    plan = ModelPlan(models=[preset], batch_size=2, seq_len=8, steps=10, warmup_steps=2,
                     dtypes=["bf16"], r_max=8, init_r=1, target_rank=2)
    got = model_level.measure_models(["increlora-graphs"], preset, plan, "bf16", CPU)
    record = got["increlora-graphs"]
    assert "graphs_fallback" not in record, record
    assert pools and sum(g.replays for g in pools[0].graphs) > 0
    assert record["final_steps"] >= 1 and record["final_median_ms"] is not None


class _Cut(BaseException):
    """The run's timeout killing the process in the middle of a part."""


def test_a_check_cut_inside_a_long_part_keeps_what_that_part_finished(tmp_path, monkeypatch):
    """The model part (three presets, about three minutes on the H200) and the main job (four
    fine-tunes) are the long parts: a run cut by its timeout inside one keeps, in
    gpu_check.json and gpu_check.md, the presets and fine-tunes that part had finished."""
    from increlora_fast.benchmarks.speed import model_level

    def level(plan, methods, device, env, log, interpreter):
        if plan.models[0] == "tiny-llama":
            raise _Cut()
        return [dict(method=m, status="ok", note="", level="model", device_type="cpu",
                     shape=f"{plan.models[0]} b2x8", dtype="bf16-autocast", median_ms=1.0,
                     mean_ms=1.0, peak_mem_mb=1.0) for m in methods]
    monkeypatch.setattr(model_level, "run_model_level", level)
    with pytest.raises(_Cut):
        gpu_check.run_gpu_check(tmp_path / "model", CPU, True, parts=("model",),
                                log=lambda line: None)
    saved = json.loads((tmp_path / "model" / "gpu_check.json").read_text())
    part = saved["parts"]["model"]
    assert part["status"] == "running"
    assert {r["shape"] for r in part["records"]} == {"tiny-bert b2x8", "tiny-deberta b2x8"}
    assert "tiny-deberta" in (tmp_path / "model" / "gpu_check.md").read_text()

    done = []

    def once(device, plan, extra, out_dir):
        if done:
            raise _Cut()
        done.append(extra)
        return {"method": "increlora", "eval_accuracy": 0.8, "steps": 4, "device": "cpu",
                "precision": "fp32", "tokens_per_second": 10.0}
    monkeypatch.setattr(gpu_check, "_finetune_once", once)
    with pytest.raises(_Cut):
        gpu_check.run_gpu_check(tmp_path / "finetune", CPU, True, parts=("finetune",),
                                log=lambda line: None)
    part = json.loads((tmp_path / "finetune" / "gpu_check.json").read_text())["parts"]["finetune"]
    assert part["status"] == "running"
    assert [r["name"] for r in part["runs"] if r["status"] == "ok"] == ["graphs-off-padded"]


def test_a_cuda_error_raised_after_a_part_fails_that_part_not_the_check(tmp_path, monkeypatch):
    """CUDA reports a kernel's fault at the next synchronizing call: the check's
    ``torch.cuda.empty_cache()`` after a part. Raised there, it stopped the check with the
    report left "running" (read as a timeout); it must fail that part, let the next parts try,
    and end the report as failed."""
    calls = []

    def empty_cache():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(gpu_check, "environment_info", lambda device, dry_run: {})
    ran = []
    monkeypatch.setattr(gpu_check, "check_model", lambda *a: ran.append("model") or
                        {"records": []})
    monkeypatch.setattr(gpu_check, "check_qlora", lambda *a: ran.append("qlora") or
                        {"records": []})
    report = gpu_check.run_gpu_check(tmp_path, torch.device("cuda", 0), True,
                                     parts=("model", "qlora"), log=lambda line: None)
    assert ran == ["model", "qlora"]
    assert report["status"] == "failed" and report["failed_parts"] == ["model"]
    assert "illegal memory access" in report["parts"]["model"]["error"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["status"] == "failed"


def test_the_penalty_kernels_falling_back_keep_the_stacked_paths_time(monkeypatch):
    """When the penalty kernels' first-use check fails on the GPU, the penalty takes its torch
    path, so the ``kernels`` way launched no kernel: the measurement raised and both rows were
    lost, the stacked path's time with them. The kernels' row is now recorded as failed,
    untimed, the stacked one still timed, and the report names the failure."""
    import contextlib

    from increlora_fast import functional
    from increlora_fast.benchmarks.gpu_check.markdown import layer_section
    from increlora_fast.benchmarks.gpu_check.plan import dry_run_plan
    from increlora_fast.benchmarks.speed import penalty_time

    @contextlib.contextmanager
    def torch_path_only(kernels):  # what a failed first-use check leaves: the torch path
        with penalty_time.replaced(functional, "penalty_on_triton", lambda lora_A: False):
            yield
    monkeypatch.setattr(penalty_time, "penalty_path", torch_path_only)
    model_plan = dry_run_plan().models[0]
    kernels, stacked = penalty_time.measure_penalty_time(
        model_plan.models[0], model_plan, torch.device("cpu"), {}, repeats=2)
    assert (kernels["method"], kernels["status"]) == ("kernels", "failed")
    assert "launched 0 Triton kernels" in kernels["note"] and "median_us" not in kernels
    assert stacked["status"] == "ok" and stacked["median_us"] > 0
    md = "\n".join(layer_section({"penalty_time_records": [kernels, stacked]}))
    assert "- kernels failed: the kernels way launched 0 Triton kernels" in md


def test_a_dy_pass_ratio_of_none_is_logged_not_raised(monkeypatch):
    """A dy-pass record whose ratio is None (a cuBLAS time of 0) made its log line raise a
    TypeError outside the point's try, which ended the whole layer part."""
    from increlora_fast.benchmarks.gpu_check import parts
    from increlora_fast.benchmarks.gpu_check.plan import dry_run_plan
    from increlora_fast.benchmarks.speed import dy_pass

    record = dict(shape="8x16", r_max=4, ours_ms=0.5, cublas_ms=0.0, x_cublas=None,
                  score_ms=0.1, gemm_dw_ms=0.0, x_gemm_score=None)
    monkeypatch.setattr(dy_pass, "measure_dy_pass", lambda *a: dict(record))
    lines = []
    records, errors = parts._dy_pass_records(torch.device("cpu"), dry_run_plan(), {},
                                             lines.append)
    assert records and not errors and all("n/a" in line for line in lines)


def test_methods_measured_alone_after_the_interleaved_set_failed_are_flagged():
    """When a point's interleaved set raises, `measure_isolated` measures each method on its
    own: their times are taken at different moments, so their ratios (``x_floor``,
    ``x_peft_lora``) lose the round-robin's fairness. The rows looked like any other. Now each
    such record says so and the tables mark its method, with a line saying what it means."""
    from increlora_fast.benchmarks.gpu_check.markdown import layer_section, model_section
    from increlora_fast.benchmarks.speed.tables import ALONE_MARK, layer_rows, model_rows

    def layer(method, ms):
        return dict(level="layer", status="ok", method=method, shape="8x8", tokens=8,
                    r_max=None if method == "floor" else 4, dtype="bf16", phase="fwd+bwd",
                    median_ms=ms, peak_mem_mb=1.0, note="")

    def model(method, ms):
        return dict(level="model", status="ok", method=method, shape="tiny b1x8",
                    dtype="fp32", median_ms=ms, mean_ms=ms, peak_mem_mb=1.0)

    for make, rows, section in ((layer, layer_rows, layer_section),
                                (model, model_rows, model_section)):
        def measure(methods):
            if len(methods) > 1:
                raise RuntimeError("the set failed")
            return [make(methods[0], 2.0 if methods[0] == "peft-lora" else 1.0)]
        found, failed = gpu_check.measure_isolated(measure, ["floor", "peft-lora"], "x",
                                                   lambda line: None)
        assert not failed and all(r["measured_alone"] for r in found)
        assert sorted(row["method"] for row in rows(found)) == \
            ["floor" + ALONE_MARK, "peft-lora" + ALONE_MARK]
        text = "\n".join(section({"records": found}))
        assert ALONE_MARK.strip() in text and "interleaved" in text
        together, _ = gpu_check.measure_isolated(
            lambda methods: [make(m, 1.0) for m in methods], ["floor", "peft-lora"], "x",
            lambda line: None)
        assert not any(r.get("measured_alone") for r in together)
        assert ALONE_MARK.strip() not in "\n".join(section({"records": together}))
