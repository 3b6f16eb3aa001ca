"""Benchmark audit: each test names a bug that made a reported number wrong or unfair."""
from __future__ import annotations

import pytest
import torch

from cli_helpers import one_error_line


def test_adalora_step_that_finalizes_the_budget_is_a_round_not_a_final_step():
    """peft's ``update_and_allocate(total_step - tfinal)`` updates the sensitivity and masks to
    the final budget (``force_mask``), the work of a round; it was labelled ``final``, so a
    round's time went into AdaLoRA's final-phase median (one of the three timed final steps of
    the quick plan)."""
    from increlora_fast.benchmarks.speed import model_level
    from increlora_fast.benchmarks.speed.plans import ModelPlan

    plan = ModelPlan(models=["tiny-bert"], batch_size=2, seq_len=8, steps=12, warmup_steps=2,
                     dtypes=["fp32"])
    run, _ = model_level.prepare_run("peft-adalora", "tiny-bert", plan, torch.device("cpu"))
    s = run.sched
    boundary = s["total_step"] - s["tfinal"]
    allocator = run.model.base_model.rankallocator
    calls = []

    def spy(model, step, force_mask=False):
        calls.append((step, force_mask))
        return None, None
    allocator.update_and_allocate = spy
    run.model.base_model.update_and_allocate(boundary)
    assert calls and calls[0] == (boundary, True)  # peft masks to the budget at this step
    assert run.phase(boundary) == "round"
    assert run.phase(boundary + 1) == "final"


def test_results_md_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    """``--results-md PATH`` wrote over any file: ``--results-md bench/NOTES.md`` replaced the
    hand-written notes (the very file ``--notes`` reads). Now only an earlier RESULTS.md is
    replaced; another file is refused, in one line, before anything is written."""
    from pathlib import Path

    from increlora_fast.cli.main import main

    stored = Path(__file__).resolve().parents[1] / "bench" / "records" / \
        "cpu_host_overhead_small.json"
    notes = tmp_path / "NOTES.md"
    notes.write_text("my notes\n")
    argv = ["bench", "--report-only", "--include-json", str(stored), "--plot", ""]
    assert main(argv + ["--notes", str(notes), "--results-md", str(notes)]) == 2
    assert notes.read_text() == "my notes\n"
    err = one_error_line(capsys)
    assert "--results-md" in err
    md = tmp_path / "RESULTS.md"
    assert main(argv + ["--notes", str(notes), "--results-md", str(md)]) == 0
    assert main(argv + ["--results-md", str(md)]) == 0  # its own earlier output is replaced
    assert md.read_text().startswith("# Benchmark results\n") and "my notes" not in md.read_text()


def test_csv_appends_only_to_a_csv_of_the_same_columns(tmp_path, capsys, monkeypatch):
    """``--csv PATH`` appended rows to any file (notes, a README, a CSV of other columns, whose
    rows then sat under the wrong headings). Now an existing non-empty file must begin with the
    records' header; another is refused in one line before anything is measured."""
    from increlora_fast.benchmarks.speed import host_overhead
    from increlora_fast.cli.main import main

    def never(plan):
        raise AssertionError("measured before the --csv check")
    monkeypatch.setattr(host_overhead, "measure", never)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for text in ("my notes\n", "date,median_ms\n2026,1.0\n"):
        notes = tmp_path / "notes.csv"
        notes.write_text(text)
        assert main(["bench", "--levels", "host", "--plot", "", "--csv", str(notes)]) == 2
        assert notes.read_text() == text
        err = one_error_line(capsys)
        assert f"--csv {notes}" in err


def test_layer_methods_of_one_point_are_timed_in_one_interleaved_set_on_cuda(monkeypatch):
    """On CUDA the Triton methods were timed in a second `measure_interleaved` after the plain
    ones (floor, peft-lora), so ``x_floor``/``x_peft_lora`` of ours divided times taken at
    different moments, not interleaved as the layer level says. Now every method of a point is
    timed in one set; only the interpreter (CPU) keeps the Triton methods apart."""
    from increlora_fast.benchmarks.speed import layer_level
    from increlora_fast.benchmarks.speed.layer_methods import LAYER_METHODS
    from increlora_fast.benchmarks.speed.plans import LayerPlan
    from increlora_fast.benchmarks.speed.timing import Measurement

    calls = []

    def fake(methods, *args):
        calls.append(list(methods))
        return {m: Measurement([1.0], 0.0, "k", triton_launches=3) for m in methods}
    monkeypatch.setattr(layer_level, "measure_layer", fake)
    monkeypatch.setattr(layer_level, "triton_status", lambda device: (True, ""))
    plan = LayerPlan(shapes=[(8, 8)], tokens=[8], r_max=[4], dtypes=["fp32"],
                     phases=["fwd+bwd"], warmup=0, repeats=1)
    methods = list(LAYER_METHODS)
    records = layer_level.run_layer_level(plan, methods, torch.device("cuda"), {}, lambda _: None)
    assert [sorted(c) for c in calls if c] == [sorted(methods)]
    assert all(r["status"] == "ok" for r in records)


def test_report_only_honours_plot_off(tmp_path, monkeypatch):
    """``--plot ''`` (documented as off) was ignored by ``--report-only``: the plot of every
    included run was still written under ./bench/plots, over any file of that name."""
    from pathlib import Path

    from increlora_fast.cli.main import main

    monkeypatch.chdir(tmp_path)
    stored = Path(__file__).resolve().parents[1] / "bench" / "records" / "cpu_layer.json"
    md = tmp_path / "RESULTS.md"
    assert main(["bench", "--report-only", "--include-json", str(stored), "--plot", "",
                 "--results-md", str(md)]) == 0
    assert not (tmp_path / "bench").exists()
    assert "![layer fwd+bwd time vs tokens]" not in md.read_text()


def test_report_only_refuses_a_plot_path_it_would_ignore(tmp_path, capsys):
    """``--report-only --plot PATH`` accepted the path and wrote nothing there (it names the
    measured run's plot, and a report-only run measures none): now one error line."""
    from pathlib import Path

    from increlora_fast.cli.main import main

    stored = Path(__file__).resolve().parents[1] / "bench" / "records" / "cpu_layer.json"
    assert main(["bench", "--report-only", "--include-json", str(stored), "--plot",
                 str(tmp_path / "p.png"), "--results-md", str(tmp_path / "R.md")]) == 2
    err = one_error_line(capsys)
    assert "--plot" in err and not (tmp_path / "R.md").exists()


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 96,
         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def _refuse_measuring(monkeypatch) -> None:
    """Make the bench command's measuring (`bench._measure`) fail the test: the options a test
    gives must be refused before anything is measured."""
    from increlora_fast.cli import bench

    def never(*args, **kwargs):
        raise AssertionError("measured")
    monkeypatch.setattr(bench, "_measure", never)


def _llama_spec(tmp_path):
    import json

    from increlora_fast.benchmarks.memory.breakdown import build_spec

    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA))
    return build_spec(str(path), "auto", "fp32")


def test_memory_breakdown_measures_a_step_of_ours_that_tracks_the_score(tmp_path):
    """The memory breakdown measured IncreLoRA on steps that track no score (its config's
    first round is at step 10**6, and only the score window before a round tracks), while peft
    AdaLoRA's measured step updates its sensitivity: ours' activations and total left out the
    exact score's backward work of the allocation phase. Now every measured step of ours
    tracks (and still runs no round), and in exact-step mode the dense buffers it then holds
    are counted once, in the exact-step total."""
    import dataclasses

    from increlora_fast.benchmarks.memory.breakdown import (SCORE_DENSE, TOTAL, TOTAL_DENSE,
                                                            method_rows)
    from increlora_fast.benchmarks.memory.compared_methods import AdapterSetting, methods_for

    spec = _llama_spec(tmp_path)
    setting = AdapterSetting(target_modules=("q_proj", "v_proj", "down_proj"), r_max=6,
                             init_r=1, target_rank=2)
    method = methods_for(setting)[0]
    controller = method.build(spec.build(torch.device("cpu")), setting).runner.run.controller
    assert all(controller.is_tracked(i) and not controller.allocation_due(i) for i in range(3))
    per_pass, exact = ({r["component"]: r["bytes"]
                        for r in method_rows(method, spec, s, 2, 24, torch.device("cpu"))}
                       for s in (setting, dataclasses.replace(setting, exact_step_score=True)))
    assert exact[TOTAL_DENSE] == exact[TOTAL] + exact[SCORE_DENSE]
    # the dense buffers a tracked step holds are in the exact-step total only, not twice
    assert exact[TOTAL] - per_pass[TOTAL] < exact[SCORE_DENSE]


@pytest.mark.parametrize("steps, warmup", [(3, 2), (5, 0)])
def test_model_step_counts_the_model_level_refuses_are_refused_before_measuring(
        steps, warmup, capsys, monkeypatch):
    """The CLI let ``--model-warmup-steps`` run from 0 to ``--model-steps - 1``, but the model
    level needs at least one untimed step (its peak memory is taken there) and two timed ones:
    such a run measured the whole layer level first, then failed and wrote nothing."""
    from increlora_fast.benchmarks.speed import layer_level
    from increlora_fast.cli.main import main

    def never(*args, **kwargs):
        raise AssertionError("the layer level ran before the model options were checked")
    monkeypatch.setattr(layer_level, "run_layer_level", never)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["bench", "--quick", "--csv", "", "--plot", "", "--model-steps", str(steps),
                 "--model-warmup-steps", str(warmup)]) == 2
    err = one_error_line(capsys)
    assert "--model-warmup-steps" in err


@pytest.mark.parametrize("argv, option", [
    (["--report-only", "--include-json", "RECORDS", "--threads", "4"], "--threads"),
    (["--report-only", "--include-json", "RECORDS", "--quick"], "--quick"),
    (["--levels", "host", "--shapes", "8x8"], "--shapes"),
    (["--levels", "host", "--model-steps", "9"], "--model-steps"),
    (["--levels", "layer", "--host-repeats", "5"], "--host-repeats"),
    (["--levels", "host", "--device", "cuda"], "--device"),
])
def test_options_the_run_would_ignore_are_refused(argv, option, tmp_path, capsys, monkeypatch):
    """Measuring options were accepted and silently ignored where the run does not measure
    what they set (a ``--report-only`` run measures nothing; ``--shapes`` with ``--levels
    host``; ``--host-repeats`` without the host level): the records then looked as if they had
    been taken with them. Now each is one error line."""
    from pathlib import Path

    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    stored = Path(__file__).resolve().parents[1] / "bench" / "records" / "cpu_layer.json"
    argv = [str(stored) if a == "RECORDS" else a for a in argv]
    assert main(["bench", "--csv", "", "--plot", "", "--results-md", str(tmp_path / "R.md"),
                 *argv]) == 2
    err = one_error_line(capsys)
    assert option in err
    assert not (tmp_path / "R.md").exists()


def test_a_layer_method_that_failed_is_named_in_the_report(monkeypatch):
    """gpu-check's layer part kept no record of a method that raised (the model part records
    it as ``failed``), so the run's section of RESULTS.md showed its layer table without the
    method and without a word under "Not measured in this run"."""
    from increlora_fast.benchmarks.gpu_check import parts
    from increlora_fast.benchmarks.gpu_check.plan import dry_run_plan
    from increlora_fast.benchmarks.report import skipped_summary
    from increlora_fast.benchmarks.speed import layer_level

    def fake_level(plan, methods, device, env, log):
        if "peft-lora" in methods:
            raise RuntimeError("peft broke")
        return [dict(env, level="layer", method=m, status="ok", note="") for m in methods]
    monkeypatch.setattr(layer_level, "run_layer_level", fake_level)
    monkeypatch.setattr(parts, "_host_records", lambda *a: [])
    monkeypatch.setattr(parts, "_dy_pass_records", lambda *a: ([], []))
    monkeypatch.setattr(parts, "_on_first_model", lambda *a: [])
    env = {"device": "cpu-x", "date": "d", "git_commit": "c", "torch": "t", "triton": None}
    result = parts.check_layer(torch.device("cpu"), dry_run_plan(), env, lambda line: None)
    failed = [r for r in result["records"] if r["status"] == "failed"]
    assert [r["method"] for r in failed] == ["peft-lora"]
    (line,) = [x for x in skipped_summary(result["records"]) if "peft-lora" in x]
    assert "peft broke" in line


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_peers_hold_their_adapters_in_the_dtype_ours_does(dtype):
    """At the bf16 layer rows peft LoRA and AdaLoRA were built with
    ``autocast_adapter_dtype=False`` (bf16 adapters) while ours holds float32 adapters on a
    16-bit base (its default, as peft's): the rows compared adapters of two dtypes. Now the
    peers keep peft's default, the dtype ours has."""
    from increlora_fast.benchmarks.speed.layer_methods import LAYER_METHODS

    def adapter_dtypes(method):
        case = LAYER_METHODS[method].build(16, 24, 4, dtype, torch.device("cpu"))
        return {p.dtype for n, p in case.module.named_parameters()
                if p.requires_grad and "lora" in n}
    ours = adapter_dtypes("increlora-torch")
    assert adapter_dtypes("peft-lora") == ours
    assert adapter_dtypes("peft-adalora") == ours


def test_host_time_of_a_triton_method_that_launched_nothing_is_refused(monkeypatch):
    """The host-time records of ``increlora-triton`` counted its launches but never required
    any: a call that took the torch path (CPU without the interpreter; on a GPU, a variant
    that failed its first-use check; here the method built on the torch backend) was recorded
    as the Triton path's host time, with 0 launches. Now such a measurement is refused, naming
    the method."""
    import dataclasses

    from increlora_fast.benchmarks.speed.host_overhead import HostPlan, measure_on_device
    from increlora_fast.benchmarks.speed.layer_methods import LAYER_METHODS

    monkeypatch.setitem(LAYER_METHODS, "increlora-triton", dataclasses.replace(
        LAYER_METHODS["increlora-torch"], name="increlora-triton", needs_triton=True))
    with pytest.raises(RuntimeError, match="increlora-triton launched no Triton kernel"):
        measure_on_device(HostPlan(16, 24, 8, 4, 1, 2), ["floor", "increlora-triton"],
                          torch.device("cpu"), {})


def test_plot_never_replaces_a_file_that_is_not_a_png(tmp_path, capsys, monkeypatch):
    """``--plot PATH`` wrote the figure over any file (``--plot README.md``): now an existing
    file must be a PNG (an earlier plot); another is refused in one line before measuring."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    notes = tmp_path / "README.md"
    notes.write_text("mine\n")
    assert main(["bench", "--quick", "--csv", "", "--plot", str(notes)]) == 2
    assert notes.read_text() == "mine\n"
    err = one_error_line(capsys)
    assert f"--plot {notes}" in err


def test_no_timed_run_carries_the_memory_probe():
    """With ``warmup=0`` the peak memory was taken on the first timed run: on CPU that run went
    through the per-op ``TorchDispatchMode`` of the probe (on CUDA after an ``empty_cache``),
    and its time went into the median (with one repeat, it was the median). Now the peak is
    taken on one untimed run after the timed ones, and no timed run is probed."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from increlora_fast.benchmarks.speed.timing import measure_interleaved

    probed = []
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def run():
        probed.append(_get_current_dispatch_mode() is not None)
        lin(x)
    result = measure_interleaved({"a": (run, None)}, torch.device("cpu"), warmup=0, repeats=2)
    assert len(result["a"].times_ms) == 2
    assert probed[:2] == [False, False] and probed[2:] == [True]
    assert result["a"].peak_mem_mb > 0


def test_model_settings_beside_the_numbers_are_those_of_each_model():
    """A run of several model plans (gpu-check: MiniLM at r_max 8 and batch 32x64, DeBERTa and
    Llama at r_max 16, the 4-bit Llama at 12 steps) showed one settings block: the run
    settings of the first model row and, per method, the settings of its last row, so the
    DeBERTa rows read as measured at MiniLM's r_max 8. Now each model has its own block."""
    from pathlib import Path

    from increlora_fast.benchmarks.records import read_report
    from increlora_fast.benchmarks.report import results_markdown

    repo = Path(__file__).resolve().parents[1]
    records, _ = read_report(str(repo / "bench/records/h200_2026-12-05_gpu_check.json"))
    md = results_markdown(records, {}, str(repo / "bench/RESULTS.md"))
    blocks = {}
    for block in md.split("Settings, beside the numbers")[1:]:
        head, *lines = block.split("\n\n")[0].splitlines()
        blocks[head] = lines
    expected = {}
    for r in records:
        if r.get("level") == "model" and r.get("status") == "ok":
            expected.setdefault(r["shape"], {})[r["method"]] = (r["settings"],
                                                                r["run_settings"])
    assert len(blocks) == len(expected)
    for shape, methods in expected.items():
        (head,) = [h for h in blocks if f"`{shape}`" in h]
        run_settings = {rs for _, rs in methods.values()}
        assert len(run_settings) == 1 and run_settings.pop() in head
        for method, (settings, _) in methods.items():
            assert f"- `{method}`: {settings}" in blocks[head]


@pytest.mark.parametrize("launches", [0, 3])
def test_a_triton_model_row_that_launched_nothing_is_failed(monkeypatch, launches):
    """``increlora-triton``'s model rows never checked that its steps launched Triton kernels:
    a run whose first-use checks failed on the GPU took the torch path and was timed as the
    Triton path. Its timed steps' launches are now counted, and none makes the row failed."""
    from types import SimpleNamespace

    from increlora_fast.benchmarks.speed import model_level
    from increlora_fast.benchmarks.speed.plans import ModelPlan
    from increlora_fast.kernels import count_launch

    class Run:
        settings = ""
        runner = SimpleNamespace(graphed=None)

        def phase(self, i):
            return "alloc"

        def step(self, i, batch):
            for _ in range(launches):
                count_launch("_fake_kernel")

    monkeypatch.setattr(model_level, "prepare_run", lambda *a: (Run(), [{}]))
    monkeypatch.setattr(model_level, "triton_status", lambda device: (True, "interpreter"))
    plan = ModelPlan(models=["tiny-bert"], batch_size=1, seq_len=4, steps=5, warmup_steps=1,
                     dtypes=["fp32"])
    (record,) = model_level.run_model_level(plan, ["increlora-triton"], torch.device("cpu"),
                                            {}, log=lambda line: None, interpreter=True)
    assert record["triton_launches"] == 4 * launches
    assert record["status"] == ("failed" if launches == 0 else "ok")
    assert ("launched no Triton kernel" in record["note"]) == (launches == 0)


def test_a_triton_layer_row_that_launched_nothing_is_failed(monkeypatch):
    """As the model level: a Triton method whose timed runs launched no Triton kernel (its
    first-use check failed and it took the torch path) is failed, not timed as Triton; the
    launches are counted by `measure_interleaved` itself."""
    from increlora_fast.benchmarks.speed import layer_level
    from increlora_fast.benchmarks.speed.timing import measure_interleaved
    from increlora_fast.kernels import count_launch

    def case(launches):
        return (lambda: [count_launch("_fake_kernel") for _ in range(launches)], None)
    measured = measure_interleaved({"none": case(0), "two": case(2)}, torch.device("cpu"), 1, 3)
    assert (measured["none"].triton_launches, measured["two"].triton_launches) == (0, 6)

    monkeypatch.setattr(layer_level, "measure_layer", lambda methods, *a: {
        m: measured["two" if m == "floor" else "none"] for m in methods})
    monkeypatch.setattr(layer_level, "triton_status", lambda device: (True, ""))
    plan = layer_level.LayerPlan(shapes=[(8, 8)], tokens=[8], r_max=[4], dtypes=["fp32"],
                                 phases=["fwd+bwd"], warmup=0, repeats=1)
    records = layer_level.run_layer_level(plan, ["floor", "increlora-triton"],
                                          torch.device("cuda"), {}, lambda _: None)
    status = {r["method"]: (r["status"], r["note"]) for r in records}
    assert status["floor"][0] == "ok"  # (not a Triton method: its launches are not asked for)
    assert status["increlora-triton"][0] == "failed"
    assert "launched no Triton kernel" in status["increlora-triton"][1]



def test_notes_without_results_md_are_refused(tmp_path, capsys, monkeypatch):
    """``--notes PATH`` only goes under the tables of RESULTS.md; without ``--results-md`` (or
    ``--report-only``, which writes it) no RESULTS.md is written, so the notes were read and
    dropped after a full measuring run. Now one error line names it before anything runs."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    notes = tmp_path / "NOTES.md"
    notes.write_text("my notes\n")
    assert main(["bench", "--levels", "host", "--csv", "", "--plot", "",
                 "--notes", str(notes)]) == 2
    err = one_error_line(capsys)
    assert f"--notes {notes}" in err and "--results-md" in err
    assert notes.read_text() == "my notes\n"


def test_include_json_without_results_md_is_refused(tmp_path, capsys, monkeypatch):
    """``--include-json PATH`` records go into RESULTS.md only; a measuring run without
    ``--results-md`` read them and left them out of everything it wrote (console, --json,
    --csv, its plot), after the whole run. Now one error line names it before anything runs."""
    from pathlib import Path

    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    stored = Path(__file__).resolve().parents[1] / "bench" / "records" / "cpu_layer.json"
    assert main(["bench", "--levels", "host", "--csv", "", "--plot", "",
                 "--include-json", str(stored)]) == 2
    err = one_error_line(capsys)
    assert f"--include-json {stored}" in err and "--results-md" in err


def test_report_only_refuses_a_json_path_it_would_fill_with_nothing(tmp_path, capsys):
    """``--json PATH`` writes the records of the run being measured; with ``--report-only``
    (which measures nothing) it wrote ``[]`` there, an empty record file that reads as a run
    that measured nothing. Now it is one error line and nothing is written."""
    from pathlib import Path

    from increlora_fast.cli.main import main

    stored = Path(__file__).resolve().parents[1] / "bench" / "records" / "cpu_layer.json"
    out = tmp_path / "records.json"
    assert main(["bench", "--report-only", "--include-json", str(stored), "--plot", "",
                 "--results-md", str(tmp_path / "R.md"), "--json", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"--json {out}" in err and "--report-only" in err
    assert not out.exists() and not (tmp_path / "R.md").exists()


@pytest.mark.parametrize("levels", ["host", "model"])
def test_plot_path_without_the_layer_level_is_refused(levels, tmp_path, capsys, monkeypatch):
    """``--plot PATH`` is the layer level's time-vs-tokens plot; a run without that level
    (``--levels host`` or ``model``) accepted it and drew nothing, without a word. Now it is
    one error line before anything is measured."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    plot = tmp_path / "plot.png"
    assert main(["bench", "--quick", "--levels", levels, "--csv", "", "--plot", str(plot)]) == 2
    err = one_error_line(capsys)
    assert f"--plot {plot}" in err and "--levels" in err


def test_interpreter_point_on_cuda_is_refused(tmp_path, capsys, monkeypatch):
    """``--interpreter-point`` is the one point where the Triton methods run under the
    interpreter on a device without CUDA; on a CUDA device no such point is measured, and the
    option was accepted and ignored. Now it is one error line before anything is measured."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert main(["bench", "--levels", "layer", "--csv", "", "--plot", "",
                 "--interpreter-point", "8x8x8"]) == 2
    err = one_error_line(capsys)
    assert "--interpreter-point" in err and "cuda" in err


def test_x_peft_lora_final_is_blank_for_a_run_whose_final_phase_was_not_timed():
    """``x_peft_lora_final`` (a method's step after its rank budget is fixed against peft
    LoRA's step) fell back to the method's median over all its timed steps when none of them
    was in the final phase (a run too short to reach it), so allocation-phase steps were shown
    under the final label. Now such a row shows no ratio; methods without phases (every step
    alike: floor, peft LoRA) keep their median; the legend says what the column is."""
    from increlora_fast.benchmarks.report import LEGEND
    from increlora_fast.benchmarks.speed.tables import model_rows

    def record(method, median, **phases):
        return dict(level="model", status="ok", method=method, shape="tiny b1x8", dtype="fp32",
                    median_ms=median, mean_ms=median, peak_mem_mb=1.0, **phases)

    rows = {row["method"]: row for row in model_rows([
        record("peft-lora", 2.0), record("floor", 1.0),
        record("increlora-torch", 3.0, alloc_median_ms=3.0, final_median_ms=None),
        record("increlora-triton", 2.5, alloc_median_ms=3.0, final_median_ms=1.0)])}
    assert rows["increlora-torch"]["x_peft_lora_final"] is None
    assert rows["increlora-triton"]["x_peft_lora_final"] == 0.5
    assert rows["floor"]["x_peft_lora_final"] == 0.5
    assert rows["peft-lora"]["x_peft_lora_final"] == 1.0
    assert "`x_peft_lora_final`" in LEGEND and "`x_peft_lora_mean`" in LEGEND


@pytest.mark.parametrize("option", ["--dtypes", "--model-dtypes"])
def test_a_bad_dtype_names_its_option_and_the_help_lists_the_dtypes(option, capsys,
                                                                    monkeypatch):
    """A bad ``--dtypes`` or ``--model-dtypes`` entry was refused as ``dtype 'fp8' is invalid``
    without saying which of the two options held it, and ``--model-dtypes``' help listed fp32
    and bf16 where fp16 (autocast) is accepted too."""
    import argparse

    from increlora_fast.benchmarks.speed.plans import DTYPES
    from increlora_fast.cli import bench
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["bench", "--quick", "--csv", "", "--plot", "", option, "fp32,fp8"]) == 2
    err = one_error_line(capsys)
    assert f"{option} entry 'fp8' is invalid" in err
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    dest = option[2:].replace("-", "_")
    text = next(a.help for a in parser._actions if a.dest == dest)
    assert all(name in text for name in DTYPES), text


@pytest.mark.parametrize("option, value", [("--levels", "host,host"),
                                           ("--methods", "floor,floor"),
                                           ("--models", "tiny-bert,tiny-bert"),
                                           ("--shapes", "64x64,64X64"),
                                           ("--tokens", "64,128,64"),
                                           ("--r-max", "8,8")])
def test_a_name_given_twice_is_refused(option, value, capsys, monkeypatch):
    """``--levels host,host`` measured the level twice and ``--methods floor,floor`` wrote the
    method's rows twice (into --json, --csv and the tables, as if two measurements agreed);
    so did a grid value given twice (``--tokens 64,128,64``). Now a repeated name or value is
    one error line before anything is measured."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    levels = [] if option == "--levels" else ["--levels", "layer,model"]
    assert main(["bench", "--quick", "--csv", "", "--plot", "", *levels, option, value]) == 2
    err = one_error_line(capsys)
    assert option in err and "twice" in err


def test_plot_path_with_one_token_count_is_refused(tmp_path, capsys, monkeypatch):
    """``--plot PATH`` draws layer time against the token count, a line per method over the
    counts of ``--tokens``; with a single count there is no line, and the run measured
    everything, drew nothing and said nothing. Now it is one error line before measuring."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    plot = tmp_path / "plot.png"
    assert main(["bench", "--quick", "--levels", "layer", "--csv", "", "--tokens", "128",
                 "--plot", str(plot)]) == 2
    err = one_error_line(capsys)
    assert f"--plot {plot}" in err and "--tokens" in err


def test_device_help_states_the_host_levels_default():
    """``--device``'s help gave the default as cpu with --quick, else cuda; `bench._device`
    also takes cpu for ``--levels host`` alone (it measures on the CPU), which the help left
    out, so a reader expected a GPU run."""
    import argparse

    from increlora_fast.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    text = next(a.help for a in parser._actions if a.dest == "device")
    assert "--levels host" in text, text
    args = parser.parse_args(["--levels", "host"])
    assert bench._device(args).type == "cpu"


def test_plot_path_without_the_fwd_bwd_phase_is_refused(tmp_path, capsys, monkeypatch):
    """``--plot PATH`` draws the fwd+bwd layer time against the token count; with ``--phases``
    leaving fwd+bwd out the run measured everything, wrote no plot and said nothing. Now it is
    one error line naming --plot and --phases before measuring."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    plot = tmp_path / "plot.png"
    assert main(["bench", "--quick", "--levels", "layer", "--csv", "", "--tokens", "8,16",
                 "--phases", "fwd,bwd", "--plot", str(plot)]) == 2
    err = one_error_line(capsys)
    assert f"--plot {plot}" in err and "--phases" in err
    assert "fwd+bwd" in err and not plot.exists()


def test_interpreter_point_is_measured_only_for_triton_methods(tmp_path, capsys, monkeypatch):
    """On CPU the interpreter point is where the Triton methods run under the interpreter.
    With ``--methods`` naming no Triton method it was still measured: extra fwd+bwd rows at a
    shape, token count and phase the run did not ask for (``--phases fwd`` included), and
    ``--interpreter-point`` was accepted and only set those rows. Now no such point is
    measured, and the option is one error line."""
    from increlora_fast.benchmarks.speed import layer_level
    from increlora_fast.benchmarks.speed.timing import measure_interleaved
    from increlora_fast.cli.main import main

    from increlora_fast.kernels import count_launch

    measured = measure_interleaved({"m": (lambda: count_launch("_fake_kernel"), None)},
                                   torch.device("cpu"), 0, 1)["m"]
    monkeypatch.setattr(layer_level, "measure_layer", lambda methods, *a: {
        m: measured for m in methods})
    monkeypatch.setattr(layer_level, "triton_status", lambda device: (True, ""))
    plan = layer_level.LayerPlan(shapes=[(8, 8)], tokens=[8], r_max=[4], dtypes=["fp32"],
                                 phases=["fwd"], warmup=0, repeats=1)
    records = layer_level.run_layer_level(plan, ["floor", "increlora-torch"],
                                          torch.device("cpu"), {}, lambda _: None)
    assert {(r["shape"], r["phase"], r["interpreter_point"]) for r in records} == \
        {("8x8", "fwd", False)}
    records = layer_level.run_layer_level(plan, ["floor", "increlora-triton"],
                                          torch.device("cpu"), {}, lambda _: None)
    assert any(r["interpreter_point"] and r["method"] == "increlora-triton"
               and r["status"] == "ok" for r in records)

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["bench", "--quick", "--levels", "layer", "--csv", "", "--plot", "",
                 "--methods", "floor,increlora-torch", "--interpreter-point", "8x8x8"]) == 2
    err = one_error_line(capsys)
    assert "--interpreter-point" in err and "--methods" in err


@pytest.mark.parametrize("first, second", [("--json", "--results-md"), ("--json", "--csv"),
                                           ("--plot", "--results-md")])
def test_two_outputs_to_one_file_are_refused(first, second, tmp_path, capsys, monkeypatch):
    """Two output options naming one file were both accepted; after the whole run the later
    write replaced (or, for --csv, appended to) the earlier one, so the records asked for with
    --json were lost. Now it is one error line naming both options before measuring."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "out.png"
    argv = {"--csv": "", "--plot": "", first: str(out)}
    argv[second] = str(tmp_path / "." / "out.png")  # the same file, spelled differently
    assert main(["bench", "--quick", "--levels", "layer", "--tokens", "8,16",
                 *[a for kv in argv.items() for a in kv]]) == 2
    err = one_error_line(capsys)
    assert first in err and second in err and not out.exists()


@pytest.mark.parametrize("content", ["[1]", '[{"a": 1}]', '{"a": 1}'])
def test_include_json_that_is_not_records_names_the_option(content, tmp_path, capsys):
    """``--include-json`` of a JSON list whose entries are not objects crashed with a
    TypeError traceback, and a file of other JSON failed with a line naming neither the option
    nor (for records lacking fields) the file. Now each is one line naming both."""
    from increlora_fast.cli.main import main

    bad = tmp_path / "other.json"
    bad.write_text(content)
    assert main(["bench", "--report-only", "--include-json", str(bad), "--plot", "",
                 "--results-md", str(tmp_path / "R.md")]) == 2
    err = one_error_line(capsys)
    assert f"--include-json {bad}" in err
    assert not (tmp_path / "R.md").exists()


def test_cuda_device_without_cuda_under_quick_does_not_advise_quick(capsys, monkeypatch):
    """``--quick --device cuda`` on a machine without CUDA was told "the full mode is meant
    for a GPU (use --quick, ...)", advice the command line already followed. Under --quick it
    now says CUDA is not available and to leave --device out (or give cpu)."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["bench", "--quick", "--device", "cuda", "--csv", "", "--plot", ""]) == 2
    err = one_error_line(capsys)
    assert "--device cuda" in err and "CUDA is not available" in err
    assert "use --quick" not in err and "full mode" not in err


@pytest.mark.parametrize("argv, option, value", [(["--repeats", "0"], "--repeats", "0"),
                                                 (["--warmup", "-1"], "--warmup", "-1")])
def test_a_bad_warmup_or_repeats_names_only_that_option(argv, option, value, capsys,
                                                        monkeypatch):
    """``--repeats 0`` failed with "--warmup=1 must be >= 0 and --repeats=0 >= 1", which also
    blamed the valid default warmup; each now names only the bad option and its range."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["bench", "--quick", "--levels", "layer", "--csv", "", "--plot", "",
                 *argv]) == 2
    err = one_error_line(capsys)
    other = "--warmup" if option == "--repeats" else "--repeats"
    assert f"{option} {value} is invalid" in err and other not in err


@pytest.mark.parametrize("option, value", [("--dtypes", "fp32,fp32"), ("--phases", "fwd,fwd"),
                                           ("--model-dtypes", "fp32,fp32")])
def test_a_dtype_or_phase_given_twice_is_refused(option, value, capsys, monkeypatch):
    """As for --tokens and --methods: ``--dtypes fp32,fp32``, ``--phases fwd,fwd`` and
    ``--model-dtypes fp32,fp32`` measured every row twice (into --json, --csv and the tables,
    as if two measurements agreed). Now each is one error line before measuring."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["bench", "--quick", "--csv", "", "--plot", "", option, value]) == 2
    err = one_error_line(capsys)
    assert option in err and "twice" in err


def test_model_seq_len_beyond_the_position_table_is_refused(capsys, monkeypatch):
    """``--seq-len`` longer than a BERT preset's position table (512) ran every earlier level
    and then crashed in the model level with a RuntimeError traceback ("The expanded size of
    the tensor (4096) must match the existing size (512)"). Now it is one error line before
    measuring; the table's own length still measures."""
    from increlora_fast.benchmarks.speed.model_presets import MODEL_PRESETS
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    limit = MODEL_PRESETS["tiny-bert"].build().config.max_position_embeddings
    argv = ["bench", "--quick", "--levels", "model", "--models", "tiny-bert", "--csv", "",
            "--plot", "", "--seq-len"]
    assert main(argv + [str(limit + 1)]) == 2
    err = one_error_line(capsys)
    assert f"--seq-len {limit + 1}" in err and str(limit) in err
    with pytest.raises(AssertionError, match="measured"):
        main(argv + [str(limit)])


def test_plot_path_that_is_not_a_png_is_refused(tmp_path, capsys, monkeypatch):
    """``--plot x.svg`` wrote an SVG (matplotlib goes by the suffix), which the next run with
    the same ``--plot`` refused to replace as "not a PNG plot", its own output. A --plot
    path not ending in .png is now one error line before measuring."""
    from increlora_fast.cli.main import main

    _refuse_measuring(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    plot = tmp_path / "plot.svg"
    assert main(["bench", "--quick", "--levels", "layer", "--csv", "", "--tokens", "8,16",
                 "--plot", str(plot)]) == 2
    err = one_error_line(capsys)
    assert f"--plot {plot}" in err and ".png" in err
    with pytest.raises(AssertionError, match="measured"):
        main(["bench", "--quick", "--levels", "layer", "--csv", "", "--tokens", "8,16",
              "--plot", str(tmp_path / "plot.PNG")])


@pytest.mark.parametrize("command", ["bench", "memory"])
def test_a_cuda_index_beyond_the_gpus_is_refused(command, capsys, monkeypatch):
    """``--device cuda:3`` on a machine with one GPU passed the checks (CUDA is available) and
    the run then failed at its first tensor with a CUDA "invalid device ordinal" traceback.
    Now it is one error line naming --device and the GPU count, before anything is built."""
    from increlora_fast.benchmarks.memory import breakdown
    from increlora_fast.cli import bench
    from increlora_fast.cli.main import main

    def never(*args, **kwargs):
        raise AssertionError("started")
    monkeypatch.setattr(bench, "_measure", never)
    monkeypatch.setattr(breakdown, "build_spec", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = ["bench", "--levels", "layer", "--csv", "", "--plot", ""] if command == "bench" \
        else ["memory", "--model", "all-MiniLM-L6-v2", "--no-progress"]
    assert main(argv + ["--device", "cuda:3"]) == 2
    err = one_error_line(capsys)
    assert "--device cuda:3" in err and "1 GPU" in err
