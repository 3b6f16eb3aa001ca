"""gpu-check part ``graphs`` (`gpu_check.graphs`): a tiny BERT trained eagerly and with its step
replayed from graphs must agree in fp32, bf16 and fp16. On CPU the graphs are
`graph_emulator.EmulatedGraph` (captured aten ops and launches replayed on the captured tensors);
without a graph factory the part records each precision as skipped, never with numbers."""
from __future__ import annotations

from typing import List

import pytest
import torch

from graph_emulator import EmulatedGraph, EmulatedPool, kernels_loaded_before_capture
from increlora_fast.benchmarks.gpu_check import graphs
from increlora_fast.benchmarks.gpu_check.markdown import PART_TITLES, graphs_section
from increlora_fast.benchmarks.gpu_check.parts import PARTS
from increlora_fast.benchmarks.gpu_check.plan import dry_run_plan
from increlora_fast.training.cuda_graphs import WARMUP_STEPS

CPU = torch.device("cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_replayed_tiny_bert_agrees_with_the_eager_run(precision):
    made: List[EmulatedGraph] = []
    pool = EmulatedPool()  # one memory pool for the run's graphs, as CUDAGraphPool on a GPU

    def factory() -> EmulatedGraph:
        made.append(pool())
        return made[-1]
    r = graphs.graph_agreement(CPU, precision, graph_factory=factory)
    assert r["status"] == "ok" and r["ok"] is True and r["note"] is None, r
    assert r["ranks_equal"] and r["total_rank"] == r["total_rank_graphed"] > 6  # ranks grew
    assert r["rounds"] == r["rounds_graphed"] == 3  # eager rounds inside the run
    # each replayed step replays the two graphs of its halves, each capture makes two
    assert r["replays"] >= 4 and 2 * r["replays"] == sum(g.replays for g in made)
    assert 2 * r["captures"] + 1 == len(made) >= 5  # the probe, then two graphs per capture
    # the run starts untracked: the tracked state's kernels were preloaded after step 0, so
    # only the two warm-up steps ran eagerly
    assert r["steps"] - r["replays"] - r["captures"] == WARMUP_STEPS
    assert pool.poisoned > 0  # replays overwrote what later graphs allocated
    # the emulator replays the very ops of the capture: bit for bit
    assert r["max_param_diff"] == 0.0 and r["max_loss_diff"] == 0.0
    assert r["final_loss"] == r["final_loss_graphed"]
    if precision == "fp16":
        assert r["overflows"] == r["overflows_graphed"] >= 1
        assert r["overflows_replayed"] >= 1  # a replayed step overflowed and was skipped
        assert r["loss_scale"] == r["loss_scale_graphed"]
    else:
        assert "loss_scale" not in r


@pytest.mark.slow  # about 70 s: every adapted layer's kernels under the Triton interpreter
@pytest.mark.usefixtures("whole_loop_tiles")
def test_replayed_fp16_steps_agree_on_the_triton_path(monkeypatch):
    """The path a GPU takes (Triton kernels, the penalty's included, here under the
    interpreter): fp16 replays, an overflowing one included, agree bit for bit, and no kernel
    is first launched inside a capture (CUDA refuses that)."""
    pytest.importorskip("triton")
    from increlora_fast.kernels.launches import launch_counts, reset_launch_counts
    from increlora_fast.kernels.utils import interpreter_active
    if not interpreter_active():
        pytest.skip("the Triton path on CPU needs the interpreter")
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    reset_launch_counts()
    with kernels_loaded_before_capture():
        r = graphs.graph_agreement(CPU, "fp16", graph_factory=EmulatedPool())
    assert launch_counts().get("_score_tiles_kernel", 0) > 0  # the Triton path was taken
    assert launch_counts().get("_orth_penalty_bwd_kernel", 0) > 0  # the penalty's kernels too
    assert r["ok"] is True and r["replays"] >= 4 and r["overflows_replayed"] >= 1, r
    # no eager step but the warm-up: the tracked state's Triton kernels (the score's) were
    # loaded by the preload, before that state's first capture
    assert r["steps"] - r["replays"] - r["captures"] == WARMUP_STEPS
    assert r["max_param_diff"] == 0.0 and r["max_loss_diff"] == 0.0


class _ReplayDoesNothing(EmulatedGraph):
    """A graph whose replays run nothing (a capture that recorded the wrong stream)."""

    def replay(self) -> None:
        if self._skip_next_replay:
            self._skip_next_replay = False
            return
        self.replays += 1


def test_replays_that_do_nothing_fail_the_check():
    r = graphs.graph_agreement(CPU, "fp32", graph_factory=_ReplayDoesNothing)
    assert r["replays"] >= 4 and r["ok"] is False and r["status"] == "failed"
    assert r["max_param_diff"] > 1e-5 and "parameters differ by" in r["note"]


def test_a_perturbed_graphed_run_fails_in_fp16(monkeypatch):
    """A graphed run whose losses are off by a few thousandths: beyond the fp16 tolerance."""
    real = graphs.train_tiny

    def perturbed(device, precision, steps, cuda_graphs, graph_factory=None):
        out = real(device, precision, steps, cuda_graphs, graph_factory)
        if cuda_graphs:
            out["losses"] = out["losses"] + 5e-3
        return out
    monkeypatch.setattr(graphs, "train_tiny", perturbed)
    r = graphs.graph_agreement(CPU, "fp16", graph_factory=EmulatedGraph)
    assert r["ok"] is False and "losses differ by 0.005" in r["note"]
    assert r["max_loss_diff"] == pytest.approx(5e-3, rel=1e-3) and r["max_param_diff"] == 0.0


def test_without_cuda_every_precision_is_skipped_with_its_reason():
    logged: List[str] = []
    part = graphs.check_graphs(CPU, dry_run_plan(), {}, logged.append)
    assert part["error"] is None
    assert [r["precision"] for r in part["records"]] == ["fp32", "bf16", "fp16"]
    for r in part["records"]:
        assert r["status"] == "skipped" and r["note"].startswith("skipped: needs CUDA")
        assert r["ok"] is None and r["max_param_diff"] is None and r["replays"] is None
        assert r["device_type"] == "cpu"
    assert part["fallback"]["status"] == "skipped" and part["fallback"]["check"] == "fallback"
    assert len(logged) == 4 and all("needs CUDA" in line for line in logged)


def test_a_precision_that_raises_or_disagrees_fails_the_part(monkeypatch):
    real = graphs.graph_agreement

    def agreement(device, precision, steps, graph_factory=None):
        if precision == "bf16":
            raise RuntimeError("capture failed")
        return real(device, precision, steps, graph_factory)
    monkeypatch.setattr(graphs, "graph_agreement", agreement)
    part = graphs.check_graphs(CPU, dry_run_plan(), {}, lambda line: None,
                               graph_factory=_ReplayDoesNothing, precisions=("bf16", "fp32"))
    bf16, fp32 = part["records"]
    assert bf16["status"] == "failed" and bf16["ok"] is False
    assert bf16["note"] == "RuntimeError: capture failed"
    assert fp32["status"] == "failed" and fp32["replays"] >= 4  # still ran after bf16 raised
    assert part["error"].startswith("bf16: RuntimeError: capture failed; fp32: ")
    assert "parameters differ by" in part["error"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="precision 'fp8' is invalid"):
        graphs.graph_agreement(CPU, "fp8", graph_factory=EmulatedGraph)
    with pytest.raises(ValueError, match="steps=3 is too few"):
        graphs.graph_agreement(CPU, "fp32", steps=3, graph_factory=EmulatedGraph)


def test_the_part_runs_second_and_has_a_table():
    assert PARTS[:2] == ("kernels", "graphs")
    assert list(PART_TITLES) == list(PARTS)
    assert [t[:3] for t in PART_TITLES.values()] == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]
    part = {"records": [graphs.skipped(CPU, "fp32", 16, "skipped: needs CUDA"),
                        dict(graphs.skipped(CPU, "fp16", 16, ""), status="ok", ok=True,
                             note=None, replays=4, captures=2, ranks_equal=True,
                             max_param_diff=0.0,
                             max_loss_diff=0.0, tol=1e-3, loss_scale=65536.0,
                             loss_scale_graphed=65536.0, overflows=5, overflows_replayed=1)]}
    text = "\n".join(graphs_section(part))
    assert text.startswith("1 of 2 precisions ran, 0 disagreed")
    assert "| fp32 | skipped | 16 | - | - | - | - | - | - | - | - | - | - | skipped: needs " \
        "CUDA |" in text
    assert "| fp16 | ok | 16 | 4 | 2 | True | 0 | 0 | 0.001 | 65,536 | 65,536 | 5 | 1 | - |" \
        in text


def test_a_model_that_cannot_be_captured_falls_back_and_equals_the_eager_run():
    """The graphs part's fallback check under the emulator: the host read in the head refuses
    the capture, the run warns, steps eagerly (dropout on) and equals the eager run exactly."""
    record = graphs.fallback_agreement(CPU, graph_factory=EmulatedPool())
    assert record["status"] == "ok" and record["ok"] is True, record
    assert record["replays"] == 0 and record["captures"] == 0
    assert record["max_param_diff"] == 0 and record["max_loss_diff"] == 0
    assert "fell back" in record["note"] and "host read" in record["note"]
    lines = graphs_section({"records": [graphs.skipped(CPU, "fp32", 16, "skipped: x")],
                            "fallback": record})
    assert any("cannot be captured" in line and "**ok**" in line for line in lines)
    skipped = graphs.fallback_agreement(CPU)
    assert skipped["status"] == "skipped" and "needs CUDA" in skipped["note"]


def test_a_skipped_fallback_check_says_why_without_numbers():
    """On CPU the fallback check is skipped: its line says so and why, with no replay count or
    differences (it printed "None replays")."""
    skipped = graphs.fallback_agreement(CPU)
    lines = graphs_section({"records": [graphs.skipped(CPU, "fp32", 16, "skipped: x")],
                            "fallback": skipped})
    (line,) = [line for line in lines if "cannot be captured" in line]
    assert "**skipped**" in line and "needs CUDA" in line, line
    assert "None" not in line and "replays" not in line, line


def test_a_part_that_ran_nothing_is_skipped_and_does_not_fail_the_check(tmp_path, monkeypatch):
    """On CPU the graphs part runs none of its checks: its status says so (with why) instead of
    "ok", and the check still passes, naming the skipped part; a part that ran stays "ok"."""
    import sys

    from increlora_fast.benchmarks.gpu_check.markdown import gpu_check_markdown, results_section
    from increlora_fast.benchmarks.gpu_check.parts import run_gpu_check

    fake = type(sys)("fake_checks")
    fake.run_kernel_checks = lambda device, quick, log: [dict(op="fwd", dtype="fp32", ok=True)]
    monkeypatch.setitem(sys.modules, "increlora_fast.kernels.checks", fake)
    report = run_gpu_check(tmp_path, CPU, True, parts=("kernels", "graphs"), log=lambda s: None)
    part = report["parts"]["graphs"]
    assert part["status"] == "skipped" and part["error"] is None, part
    assert "needs CUDA (the steps replay CUDA graphs)" in part["note"]
    assert "a capture that fails there" in part["note"]
    assert report["parts"]["kernels"]["status"] == "ok"
    assert report["status"] == "ok" and report["failed_parts"] == []
    assert report["skipped_parts"] == ["graphs"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.splitlines()[0].endswith(": PASSED (skipped: graphs)"), md.splitlines()[0]
    assert f"{PART_TITLES['graphs']}: skipped" in md and f"{PART_TITLES['kernels']}: ok" in md
    assert f"Skipped: {part['note']}" in md
    # a report written before parts could be skipped still renders, in gpu_check.md and RESULTS.md
    old = dict(report, parts={"kernels": report["parts"]["kernels"]})
    del old["skipped_parts"]
    assert gpu_check_markdown(old).splitlines()[0].endswith(": PASSED")
    assert any("**ok**" in line for line in results_section(old))
