"""`increlora-fast bench --levels host`: the CPU host-overhead benchmark with the Triton launches
stubbed, at tiny sizes. No timing is asserted: every row is present with a positive time, ours
counts its launches, the report shows the table, and bad input is named in one line."""
from __future__ import annotations

import json

import pytest

from increlora_fast.benchmarks.speed.host_overhead import METHODS, OURS, host_rows
from increlora_fast.benchmarks.records import REQUIRED
from increlora_fast.cli.main import main

TINY = ["--levels", "host", "--host-point", "24x40x4", "--host-r-max", "8", "--host-warmup", "1",
        "--host-repeats", "3", "--csv", ""]


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("host")
    paths = {"json": out / "host.json", "md": out / "RESULTS.md"}
    code = main(["bench", *TINY, "--json", str(paths["json"]), "--results-md", str(paths["md"])])
    assert code == 0
    return json.loads(paths["json"].read_text()), paths["md"].read_text()


def test_every_method_has_a_positive_time_and_ours_counts_launches(host_run):
    records, _ = host_run
    assert [r["method"] for r in records] == list(METHODS)
    for r in records:
        assert all(k in r for k in REQUIRED), r
        assert r["level"] == "host" and r["status"] == "ok" and r["threads"] == 1
        assert r["median_us"] > 0 and r["median_ms"] > 0 and r["repeats"] == 3
        assert r["shape"] == "24x40" and r["tokens"] == 4
        assert r["python"] and r["torch"] and r["triton"] and r["date"]
    launches = {r["method"]: r["launches_per_call"] for r in records}
    assert all(launches[m] > 0 for m in OURS)
    assert launches["increlora-triton+score"] > launches["increlora-triton"]
    assert all(launches[m] == 0 for m in METHODS if m not in OURS)
    calls = {r["method"]: r["python_calls_per_call"] for r in records}
    assert calls["increlora-triton"] > calls["floor"] > 0


# Python calls of one fwd+bwd of ours beyond the plain nn.Linear's (`floor`: the module call
# and torch's backward entry, which every row pays): 23 untracked and 25 tracked when this was
# written (2 launches forward, 2 or 3 backward), 77 and 84 before the hot path was cut; 25 and
# 27, the bounds themselves, since 2026-12-07 (the base-operand test in its own helper, the
# Triton op looked up in module globals): a call more on the layer path fails here on purpose.
EXTRA_PYTHON_CALLS = {"increlora-triton": 25, "increlora-triton+score": 27}


def test_python_calls_per_call_stay_bounded(host_run):
    """The host work of a layer call is mostly Python calls: counted (deterministic, unlike a
    time), ours stay within a fixed margin over the frozen nn.Linear's, and the launches per
    call do not grow to pay for it."""
    records, _ = host_run
    rows = {r["method"]: r for r in records}
    floor = rows["floor"]["python_calls_per_call"]
    for method, bound in EXTRA_PYTHON_CALLS.items():
        extra = rows[method]["python_calls_per_call"] - floor
        assert 0 < extra <= bound, (method, extra, bound)
    assert rows["increlora-triton"]["launches_per_call"] == 4
    assert rows["increlora-triton+score"]["launches_per_call"] == 5


def test_results_md_has_the_host_table(host_run):
    _, md = host_run
    assert "### Host overhead per layer call (Triton launches stubbed)" in md
    for method in METHODS:
        assert f"| {method} |" in md
    assert "item-7 targets" not in md  # nothing of a layer or model run to judge


def test_host_rows_arithmetic():
    base = dict(level="host", status="ok", shape="8x8", tokens=2)
    records = [dict(base, method="aten-compute", median_us=10.0),
               dict(base, method="floor", median_us=20.0),
               dict(base, method="peft-lora", median_us=40.0),
               dict(base, method="increlora-triton", median_us=50.0)]
    rows = {r["method"]: r for r in host_rows(records)}
    assert rows["increlora-triton"]["minus_compute_us"] == 40.0
    assert rows["increlora-triton"]["x_floor"] == 2.5
    assert rows["increlora-triton"]["x_peft_lora"] == 1.25
    assert rows["aten-compute"]["x_peft_lora"] is None
    assert rows["floor"]["x_floor"] == 1.0


def test_stub_is_restored(kernel_device):
    """No kernel module holds its own reference to the launch function (the stub of
    `utils.launch` reaches them all), and the stub is undone after the block."""
    import importlib
    import pkgutil

    from increlora_fast import kernels
    from increlora_fast.benchmarks.speed.host_overhead import stubbed_launches
    from increlora_fast.kernels import utils

    real = utils.launch
    modules = [importlib.import_module(f"{kernels.__name__}.{info.name}")
               for info in pkgutil.iter_modules(kernels.__path__)]
    assert [m.__name__ for m in modules if m is not utils and
            getattr(m, "launch", None) is real] == []
    with stubbed_launches():
        assert utils.launch is not real
    assert utils.launch is real


@pytest.mark.parametrize("argv,option", [
    (["--levels", "host", "--host-repeats", "0"], "--host-repeats"),
    (["--levels", "host", "--host-r-max", "200"], "--host-r-max"),
    (["--levels", "hosts"], "--levels"),
])
def test_bad_host_options_are_named_in_one_line(argv, option, capsys):
    assert main(["bench", *argv, "--csv", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err


def test_bad_host_point_is_refused():
    with pytest.raises(SystemExit) as info:
        main(["bench", "--levels", "host", "--host-point", "24x40"])
    assert info.value.code == 2


@pytest.mark.parametrize("name, bad, match", [
    ("replay_host", dict(warmup=3), "warmup=3 must be >= 4"),
    ("step_host", dict(repeats=0), "repeats=0 must be >= 1"),
])
def test_host_point_benchmarks_refuse_bad_input_and_never_replace_a_record(
        name, bad, match, tmp_path, capsys):
    import importlib
    module = importlib.import_module(f"increlora_fast.benchmarks.speed.{name}")
    existing = tmp_path / "r.json"
    existing.write_text("mine")
    assert module.main(["--json", str(existing)]) == 2
    assert existing.read_text() == "mine"
    assert "--json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="preset 'nope' is unknown"):
        module.measure("nope")
    with pytest.raises(ValueError, match=match):
        module.measure(**bad)


def test_replay_host_times_only_replayed_steps(tmp_path):
    from increlora_fast.benchmarks.speed import replay_host
    out = tmp_path / "r.json"
    assert replay_host.main(["--json", str(out), "--batch", "2", "--seq-len", "8",
                             "--repeats", "3"]) == 0
    (record,) = json.loads(out.read_text())
    assert record["repeats"] == 3 and record["median_us"] > 0
    assert record["device_ops_per_step"] == 7  # 3 inputs, 2 step fills, loss and tokens out


def test_step_host_times_eager_steps_on_the_paths_a_gpu_takes(tmp_path):
    """Whole eager steps with the launches stubbed (a fresh process with the interpreter):
    ours runs every adapted linear, the orthogonal penalty and the optimizer on their Triton
    kernels (4 launches per linear's fwd+bwd, 2 for the penalty, one optimizer launch per
    parameter group once its plan is kept), the peers none."""
    from increlora_fast.benchmarks.speed import step_host
    from increlora_fast.benchmarks.speed.model_presets import MODEL_PRESETS
    out = tmp_path / "s.json"
    assert step_host.main(["--json", str(out), "--model", "tiny-bert", "--repeats", "2"]) == 0
    records = {r["method"]: r for r in json.loads(out.read_text())}
    assert list(records) == list(step_host.METHODS)
    n = MODEL_PRESETS["tiny-bert"].n_targets
    ours = records["increlora-triton"]
    # the optimizer: one launch per parameter group, over the adapter tensors, over the
    # pooler's and the classifier's weights, and over their biases (without weight decay; no
    # longer 3 per linear and 4); the orthogonal penalty: one forward, one backward
    assert ours["launches_per_step"] == 4 * n + 3 + 2
    assert records["floor"]["launches_per_step"] == records["peft-lora"]["launches_per_step"] == 0
    assert all(r["median_us"] > 0 and r["aten_ops_per_step"] > 0 and r["repeats"] == 2
               and r["python_calls_per_step"] > 0 for r in records.values())
    assert records["peft-lora"]["x_peft_lora"] == 1.0
    # the device ops ours issues besides its Triton launches: fewer than peft LoRA's
    assert ours["aten_ops_per_step"] < records["peft-lora"]["aten_ops_per_step"]


def test_results_md_says_how_a_gpu_run_measured_its_host_time(tmp_path):
    """The host records of a gpu-check ran on the device with the kernels running (their
    note says so); the run section must not call them a CPU measurement with the launches
    stubbed, while a CPU host run keeps that legend."""
    from pathlib import Path

    from increlora_fast.benchmarks.records import read_report
    from increlora_fast.benchmarks.report import results_markdown

    path = Path(__file__).resolve().parent.parent / "bench/records/h200_2026-12-05_gpu_check.json"
    records, report = read_report(str(path))
    host = [r for r in records if r["level"] == "host"]
    assert host and all(r["device_type"] == "cuda" and "kernels run" in r["note"] for r in host)
    md = results_markdown(records, {}, str(tmp_path / "RESULTS.md"), gpu_checks=[report])
    start = md.index("## CUDA: NVIDIA H200 (gpu-check mode")
    section = md[start:md.index("\n## ", start + 1)]
    assert "| increlora-triton | 1349.0 |" in section
    assert "stubbed" not in section and "on CPU with one torch thread" not in section
    assert host[0]["note"] in section
    cpu = [dict(r, device_type="cpu", device="cpu-x", note="") for r in host]
    cpu_md = results_markdown(cpu, {}, str(tmp_path / "RESULTS.md"))
    assert "### Host overhead per layer call (Triton launches stubbed)" in cpu_md
