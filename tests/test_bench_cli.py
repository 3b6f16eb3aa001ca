"""`increlora-fast bench --quick` on a tiny grid, and the report arithmetic it prints.

No timing is asserted: only the output format, that every method is present, and that ratios
and target verdicts are computed from the records as documented.
"""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from increlora_fast.benchmarks.speed.layer_methods import LAYER_METHODS
from increlora_fast.benchmarks.speed.model_level import MODEL_METHODS
from increlora_fast.benchmarks.records import CSV_COLUMNS, REQUIRED
from increlora_fast.benchmarks.speed.tables import layer_rows, model_rows
from increlora_fast.benchmarks.speed.targets import cpu_model_verdicts, layer_verdicts
from increlora_fast.benchmarks.speed.timing import measure_interleaved

REPO = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--threads", "1", "--shapes", "24x40", "--tokens", "8,16", "--r-max", "8",
        "--warmup", "1", "--repeats", "2", "--interpreter-point", "16x24x16",
        "--models", "tiny-bert", "--batch-size", "2", "--seq-len", "8", "--model-steps", "9",
        "--model-warmup-steps", "1"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = {k: out / name for k, name in (("json", "out.json"), ("csv", "results.csv"),
                                           ("plot", "plot.png"), ("md", "RESULTS.md"))}
    paths["csv"].write_text("")  # an existing empty file still gets a header
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "increlora_fast.cli.main", "bench", *TINY,
           "--json", str(paths["json"]), "--csv", str(paths["csv"]), "--plot", str(paths["plot"]),
           "--results-md", str(paths["md"])]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(paths["json"].read_text()), paths


def test_records_have_the_contract_fields_and_every_method(quick_run):
    _, records, _ = quick_run
    for r in records:
        assert all(k in r for k in REQUIRED), r
        assert r["level"] in ("layer", "model")
        assert r["device_type"] == "cpu" and r["mode"] == "quick"
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["peak_mem_mb"] >= 0
        else:
            assert r["status"] == "skipped" and r["note"].startswith("skipped")
    layer = {r["method"] for r in records if r["level"] == "layer"}
    model = {r["method"] for r in records if r["level"] == "model"}
    assert layer == set(LAYER_METHODS)
    assert model == set(MODEL_METHODS)
    # 2 token counts x 3 phases x every method, plus the interpreter point (fwd+bwd).
    grid = [r for r in records if r["level"] == "layer" and not r["interpreter_point"]]
    assert len(grid) == 2 * 3 * len(LAYER_METHODS)
    plain = [r for r in grid if not LAYER_METHODS[r["method"]].needs_triton]
    assert all(r["status"] == "ok" for r in plain)


def test_triton_runs_only_under_the_interpreter_on_cpu(quick_run):
    pytest.importorskip("triton")
    _, records, _ = quick_run
    triton = [r for r in records
              if r["level"] == "layer" and LAYER_METHODS[r["method"]].needs_triton]
    at_point = [r for r in triton if r["interpreter_point"]]
    assert {r["method"] for r in at_point} == {m for m in LAYER_METHODS
                                               if LAYER_METHODS[m].needs_triton}
    assert all(r["status"] == "ok" and "interpreter" in r["note"] for r in at_point)
    assert all(r["status"] == "skipped" for r in triton if not r["interpreter_point"])
    ours = [r for r in records if r["level"] == "model" and r["method"] == "increlora-torch"][0]
    assert ours["alloc_steps"] + ours["round_steps"] + ours["final_steps"] == ours["repeats"] == 8
    assert ours["final_steps"] >= 1 and ours["round_steps"] >= 1 and ours["alloc_steps"] >= 1


def test_console_csv_plot_and_results_md(quick_run):
    stdout, records, paths = quick_run
    assert "LAYER LEVEL" in stdout and "MODEL LEVEL" in stdout
    for column in ("median_ms", "x_floor", "x_peft_lora", "peak_mem_mb", "steps_per_s"):
        assert column in stdout
    for method in list(LAYER_METHODS) + list(MODEL_METHODS):
        assert method in stdout
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert set(CSV_COLUMNS) <= set(rows[0])
    assert {r["method"] for r in rows} == {r["method"] for r in records}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    first = records[0]
    for text in (first["device"], first["torch"], first["date"], "item-7 targets",
                 "not measurable", "plot.png", "Layer level, fwd+bwd"):
        assert text in md
    for method in LAYER_METHODS:
        assert f"| {method} |" in md or f"`{method}`" in md


def _layer_record(method, median, shape="768x3072", tokens=16384, r_max=16, dtype="bf16",
                  device_type="cuda"):
    return dict(level="layer", method=method, shape=shape, tokens=tokens,
                r_max=None if method == "floor" else r_max, dtype=dtype, phase="fwd+bwd",
                device="gpu", device_type=device_type, date="d", status="ok", note="",
                median_ms=median, peak_mem_mb=1.0)


def test_ratios_and_layer_verdicts_follow_the_records():
    rng = random.Random(7)
    floor = rng.uniform(5, 10)
    times = {"floor": floor, "peft-lora": floor * rng.uniform(1.2, 1.4),
             "dense-increlora+score": floor * rng.uniform(2.5, 3.0),
             "increlora-triton": floor * rng.uniform(1.02, 1.08),
             "increlora-triton-fused": floor * rng.uniform(1.3, 1.4),
             "increlora-triton+score": floor * rng.uniform(1.6, 1.9),
             "increlora-triton-fused+score": floor * rng.uniform(1.95, 2.0)}
    records = [_layer_record(m, t) for m, t in times.items()]
    rows = {r["method"]: r for r in layer_rows(records)}
    assert rows["peft-lora"]["x_floor"] == pytest.approx(times["peft-lora"] / floor)
    assert rows["increlora-triton"]["x_peft_lora"] == pytest.approx(
        times["increlora-triton"] / times["peft-lora"])
    assert rows["floor"]["x_peft_lora"] is None
    verdicts = [v.status for v in layer_verdicts(records, "cuda")]
    # 1.0x-1.1x floor: met; faster than lora: met; best score-on 1.6-1.9x floor: missed;
    # its overhead (0.6-0.9) vs half the dense one (0.75-1.0) depends on the draw.
    ours_over = times["increlora-triton+score"] - floor
    half_dense = 0.5 * (times["dense-increlora+score"] - floor)
    assert verdicts == ["met", "met", "missed", "met" if ours_over <= half_dense else "missed"]
    assert [v.status for v in layer_verdicts(records, "cpu")] == ["not measurable"] * 4


def test_model_ratios_and_cpu_target():
    rng = random.Random(11)
    base = dict(level="model", shape="minilm-l6 b4x64", dtype="fp32", device="cpu",
                device_type="cpu", date="d", status="ok", peak_mem_mb=100.0)
    ada_mean, lora_mean = rng.uniform(800, 900), rng.uniform(700, 750)
    ours_mean = ada_mean * rng.choice([0.9, 1.1])
    records = [dict(base, method="increlora-torch", mean_ms=ours_mean, median_ms=ours_mean,
                    alloc_median_ms=ours_mean * 1.2, final_median_ms=ours_mean * 0.8),
               dict(base, method="peft-adalora", mean_ms=ada_mean, median_ms=ada_mean,
                    alloc_median_ms=ada_mean, final_median_ms=ada_mean),
               dict(base, method="peft-lora", mean_ms=lora_mean, median_ms=lora_mean)]
    rows = {r["method"]: r for r in model_rows(records)}
    assert rows["increlora-torch"]["x_peft_lora_mean"] == pytest.approx(ours_mean / lora_mean)
    assert rows["increlora-torch"]["x_peft_lora_final"] == pytest.approx(
        ours_mean * 0.8 / lora_mean)
    (verdict,) = cpu_model_verdicts(records)
    assert verdict.status == ("met" if ours_mean <= ada_mean else "missed")


def test_measure_interleaved_runs_setup_before_every_call():
    import torch

    calls = {"a": [], "b": []}

    def case(name):
        return (lambda: calls[name].append("run"), lambda: calls[name].append("setup"))
    result = measure_interleaved({"a": case("a"), "b": case("b")}, torch.device("cpu"),
                                 warmup=2, repeats=3)
    for name in calls:
        assert calls[name] == ["setup", "run"] * 5
        assert len(result[name].times_ms) == 3 and result[name].median_ms >= 0
    with pytest.raises(ValueError, match="repeats"):
        measure_interleaved({"a": case("a")}, torch.device("cpu"), warmup=1, repeats=0)


def test_bad_arguments_are_named():
    from increlora_fast.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--shapes", "768by3072"])
    assert info.value.code == 2
    assert main(["bench", "--report-only"]) == 2


@pytest.mark.parametrize("method", ["increlora-torch", "peft-adalora"])
def test_model_schedules_time_tracking_alone_and_rounds_apart(method):
    """Ours and AdaLoRA keep one rhythm in the compressed schedule: before the budget every
    step tracks, every second one also allocates (a round; AdaLoRA's mask to budget after
    tinit), so tracking alone is timed apart from rounds; ours reaches its budget in time to
    time steps after it."""
    import torch
    from increlora_fast.benchmarks.speed import model_level
    from increlora_fast.benchmarks.speed.plans import ModelPlan

    plan = ModelPlan(models=["tiny-bert"], batch_size=2, seq_len=8, steps=16, warmup_steps=2,
                     dtypes=["fp32"])
    run, batches = model_level.prepare_run(method, "tiny-bert", plan, torch.device("cpu"))
    phases = []
    for i in range(plan.steps):
        phases.append(run.phase(i))
        run.step(i, batches[i % len(batches)])
    every = model_level.ROUND_EVERY
    end = phases.index("final")
    assert set(phases[end:]) == {"final"}
    if method == "increlora-torch":
        first = 2
        assert plan.steps - end >= plan.steps // 4  # the budget is reached well before the end
    else:
        tinit = plan.steps // 8
        first = (tinit // every + 1) * every
        assert end == plan.steps - plan.steps // 4 + 1  # that step masks: a round
    assert [i for i in range(end) if phases[i] == "round"] == list(range(first, end, every))
    assert phases[:end].count("alloc") >= 2


def test_json_never_replaces_a_file_it_did_not_write(tmp_path, capsys, monkeypatch):
    """``bench --json PATH`` wrote over any file (notes, a model config), as `memory --json`
    did before it was fixed (found by an audit); now only earlier records are replaced, and
    another file is refused before anything is measured."""
    from increlora_fast.cli import bench
    from increlora_fast.cli.main import main

    stored = Path(__file__).resolve().parents[1] / "bench" / "records" / \
        "cpu_host_overhead_small.json"
    measured = json.loads(stored.read_text())
    calls = []

    def measure(*args, **kwargs):
        calls.append(1)
        return [dict(r) for r in measured], None
    monkeypatch.setattr(bench, "_measure", measure)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run = ["bench", "--levels", "host", "--csv", "", "--plot", "", "--json"]
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    assert main(run + [str(notes)]) != 0
    assert notes.read_text() == '{"mine": true}\n' and not calls
    assert "--json" in capsys.readouterr().err
    earlier = tmp_path / "records.json"
    earlier.write_text("[]")
    assert main(run + [str(earlier)]) == 0
    assert json.loads(earlier.read_text()) == measured


def test_report_only_gives_each_run_its_own_plot(tmp_path, monkeypatch):
    """Two runs of one device type and mode (two CPU quick runs, two gpu-checks on one GPU) in
    one RESULTS.md: each run section links a plot of its own records; before, both wrote and
    linked one file, so the earlier section showed the later run's times."""
    from increlora_fast.cli.main import main

    monkeypatch.chdir(tmp_path)
    paths = []
    for n, date in enumerate(("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z")):
        records = [dict(level="layer", method=m, shape="24x40", tokens=t, phase="fwd+bwd",
                        r_max=None if m == "floor" else 8, dtype="fp32", device="cpu-x",
                        device_type="cpu", mode="quick", date=date, git_commit="c",
                        torch="t", triton=None, status="ok", note="",
                        median_ms=(1.0 + n) * t * (2 if m == "peft-lora" else 1),
                        peak_mem_mb=1.0)
                   for m in ("floor", "peft-lora") for t in (8, 16)]
        path = tmp_path / f"run{n}.json"
        path.write_text(json.dumps(records))
        paths += ["--include-json", str(path)]
    md = tmp_path / "bench" / "RESULTS.md"
    assert main(["bench", "--report-only", *paths, "--results-md", str(md)]) == 0
    links = [line.split("](")[1].rstrip(")") for line in md.read_text().splitlines()
             if line.startswith("![layer fwd+bwd time vs tokens]")]
    assert len(links) == 2 and links[0] != links[1], links
    assert all((md.parent / link).is_file() for link in links)


def test_results_md_run_section_names_a_row_that_failed():
    """A record that failed (the graphed DeBERTa step of the H200 run of 2026-12-05) is listed
    under "Not measured in this run" with its reason, as a skipped one is; before, only
    skipped rows were, and the failed one left the run's model table without a word."""
    from increlora_fast.benchmarks.records import read_report
    from increlora_fast.benchmarks.report import results_markdown

    records, _ = read_report(str(REPO / "bench/records/h200_2026-12-05_gpu_check.json"))
    failed = [r for r in records if r.get("status") == "failed"]
    assert [(r["shape"], r["method"]) for r in failed] == [
        ("deberta-v3-base b16x256", "increlora-graphs")]
    md = results_markdown(records, {}, str(REPO / "bench/RESULTS.md"))
    listed = md.split("Not measured in this run:", 1)[1].split("\n\n")[1].splitlines()
    (line,) = [x for x in listed if "increlora-graphs" in x]
    assert "failed" in line and "deberta-v3-base" in line and "pin_memory" in line


def test_write_json_never_leaves_a_half_written_file(tmp_path):
    """Records are written whole or not at all: a record that cannot be written (here a set,
    which JSON has no form for) leaves the file that was there untouched; before, json.dump
    had already truncated it and written the records before the bad one."""
    from increlora_fast.benchmarks.records import read_json, write_json

    base = {k: "x" for k in REQUIRED}
    path = tmp_path / "records.json"
    write_json([dict(base, median_ms=1.0)], str(path))
    before = path.read_text()
    with pytest.raises(TypeError):
        write_json([dict(base, median_ms=2.0), dict(base, median_ms=3.0, extra={1, 2})],
                   str(path))
    assert path.read_text() == before
    assert [r["median_ms"] for r in read_json(str(path))] == [1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["records.json"]


def test_a_level_that_fails_keeps_the_records_of_the_levels_before_it(tmp_path, monkeypatch,
                                                                      capsys):
    """`bench --levels host,model` whose model level fails (an out-of-memory error minutes in):
    the host records already measured are written to --json and --csv and the command ends
    with an error naming the level; before, the error's traceback ended it with nothing
    written. RESULTS.md is not remade from a run cut short."""
    from increlora_fast.benchmarks.speed import model_level
    from increlora_fast.cli import bench
    from increlora_fast.cli.main import main

    stored = Path(__file__).resolve().parents[1] / "bench" / "records" / \
        "cpu_host_overhead_small.json"
    measured = json.loads(stored.read_text())
    monkeypatch.setattr(bench, "_host_level", lambda plan, env, log: [dict(r) for r in measured])

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(model_level, "run_model_level", out_of_memory)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out, csv, md = tmp_path / "records.json", tmp_path / "rows.csv", tmp_path / "RESULTS.md"
    code = main(["bench", "--quick", "--levels", "host,model", "--json", str(out), "--csv",
                 str(csv), "--plot", "", "--results-md", str(md)])
    err = capsys.readouterr().err
    assert code == 2
    assert (f"error: --levels model failed (RuntimeError: CUDA out of memory); the "
            f"{len(measured)} record(s) of the levels before it are kept (in {out}); no plot "
            "or RESULTS.md was written") in err
    assert [r["method"] for r in json.loads(out.read_text())] == [r["method"] for r in measured]
    assert len(csv.read_text().splitlines()) == len(measured) + 1
    assert not md.exists()
