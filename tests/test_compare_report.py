"""The comparison report: one command remakes it from stored runs, and the run counts the docs
state are the run folders the repository holds."""
import json
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "results" / "compare" / "issue15" / "runs"
SCRIPT = REPO / "scripts" / "compare" / "run_issue15.sh"


def _write_run(root, task, variant, seed, value):
    run = root / task / variant / f"seed{seed}"
    run.mkdir(parents=True)
    losses = [1.0 - 0.01 * step for step in range(30)]
    (run / "metrics.json").write_text(json.dumps(dict(
        task=task, seed=seed, eval_accuracy=value, eval_macro_f1=value - 0.1,
        train_losses=losses, rank_pattern={"encoder.layer.0.attention.self.query": 2},
        method_settings={"init_r": 1})))
    if variant == "default":
        (run / "allocation_log.jsonl").write_text(json.dumps(
            {"step": 10, "module": "encoder.layer.0.attention.self.query", "new_rank": 2})
            + "\n")


def test_summary_makes_the_report_from_new_and_stored_runs(tmp_path):
    """2 methods x 3 seeds: `run_issue15.sh summary` stores the new runs' metrics under RESULTS
    and writes the paired tables (Markdown in SUMMARY, JSON in RESULTS/tables)."""
    root, results, summary = tmp_path / "runs", tmp_path / "results", tmp_path / "docs"
    for seed, base in enumerate((0.90, 0.92, 0.91)):
        _write_run(root, "trec6", "default", seed, base)
        _write_run(root, "trec6", "lora", seed, base - 0.01 * (seed + 1))
    env = dict(os.environ, ROOT=str(root), RESULTS=str(results), SUMMARY=str(summary),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")])))
    done = subprocess.run(["bash", str(SCRIPT), "summary"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert sorted(p.relative_to(results / "runs").as_posix()
                  for p in (results / "runs").rglob("metrics.json")) == [
        f"trec6/{v}/seed{s}/metrics.json" for v in ("default", "lora") for s in range(3)]
    table = (summary / "vs_default_eval_accuracy.md").read_text()
    assert "### trec6: eval_accuracy, paired on seeds against `default`" in table
    assert "| lora | 3 | 0.8900 | 0.9100 | -0.0200 | [-0.0448, +0.0048] | tie |" in table
    rows = json.loads((results / "tables" / "vs_default_eval_accuracy.json").read_text())
    assert [(r["variant"], r["seeds"], r["verdict"]) for r in rows] == [
        ("lora", [0, 1, 2], "tie")]
    assert (summary / "vs_default_eval_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "(table vs_adalora skipped: no runs of adalora)" in done.stderr
    assert "growth profile skipped" not in done.stderr, done.stderr
    assert set(json.loads((results / "tables" / "loss_around_growth.json").read_text())) == {
        "trec6"}
    assert (summary / "allocation_default.png").is_file()
    # the stored runs alone remake it: no ROOT folder needed
    (summary / "vs_default_eval_accuracy.md").unlink()
    env["ROOT"] = str(tmp_path / "absent")
    assert subprocess.run(["bash", str(SCRIPT), "summary"], env=env, capture_output=True,
                          timeout=600).returncode == 0
    assert (summary / "vs_default_eval_accuracy.md").read_text() == table


def _stated_counts(text):
    return [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) (?:paired )?runs\b", text)]


def test_the_docs_state_the_number_of_stored_runs():
    runs = len(list(RUNS.rglob("metrics.json")))
    folders = [p for p in RUNS.glob("*/*/seed*") if p.is_dir()]
    assert runs == len(folders) > 0  # every run folder holds its metrics
    report = (REPO / "docs" / "compare" / "issue15.md").read_text()
    heading = re.search(r"## What ran \((\d+) runs: (.*)\)", report)
    assert heading and int(heading.group(1)) == runs
    assert sum(int(n) for n in re.findall(r"(\d+) on (?:2026-)?12-0", heading.group(2))) == runs
    readme = (REPO / "README.md").read_text()
    accuracy = readme[readme.index("## Accuracy"):readme.index("\n## ", readme.index(
        "## Accuracy") + 1)]
    assert runs in _stated_counts(accuracy)
    assert all(n == runs for n in _stated_counts(accuracy) if n > 100)


def _summary(tmp_path, root):
    results, summary = tmp_path / "results", tmp_path / "docs"
    env = dict(os.environ, ROOT=str(root), RESULTS=str(results), SUMMARY=str(summary),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")])))
    return subprocess.run(["bash", str(SCRIPT), "summary"], env=env, capture_output=True,
                          text=True, timeout=600)


def test_summary_never_overwrites_a_stored_run_with_a_different_one(tmp_path):
    """A new run in ROOT at the path of a stored run with other metrics (a rerun on newer
    code under the old variant name) is refused, naming the file, and the stored run is kept;
    the same runs again (a second `summary`) copy over themselves without complaint."""
    root, stored = tmp_path / "runs", tmp_path / "results" / "runs"
    for seed in range(3):
        _write_run(root, "trec6", "default", seed, 0.90)
        _write_run(root, "trec6", "lora", seed, 0.89)
    assert _summary(tmp_path, root).returncode == 0
    again = _summary(tmp_path, root)
    assert again.returncode == 0, again.stderr
    kept = (stored / "trec6" / "lora" / "seed1" / "metrics.json").read_bytes()
    (root / "trec6" / "lora" / "seed1" / "metrics.json").write_text(json.dumps(dict(
        task="trec6", seed=1, eval_accuracy=0.95, eval_macro_f1=0.85)))
    done = _summary(tmp_path, root)
    assert done.returncode != 0
    assert "trec6/lora/seed1/metrics.json" in done.stderr
    assert (stored / "trec6" / "lora" / "seed1" / "metrics.json").read_bytes() == kept


def test_summary_stores_only_finished_runs(tmp_path):
    """A run that has written its allocation log but not (yet) its metrics.json (still
    saving, or stopped there) is not copied: the stored runs hold no folder without metrics."""
    root, stored = tmp_path / "runs", tmp_path / "results" / "runs"
    for seed in range(3):
        _write_run(root, "trec6", "default", seed, 0.90)
        _write_run(root, "trec6", "lora", seed, 0.89)
    _write_run(root, "trec6", "default", 3, 0.90)
    (root / "trec6" / "default" / "seed3" / "metrics.json").unlink()
    done = _summary(tmp_path, root)
    assert done.returncode == 0, done.stderr
    assert not (stored / "trec6" / "default" / "seed3").exists()
    assert len(list(stored.rglob("allocation_log.jsonl"))) == 3


def test_a_table_that_cannot_be_made_again_leaves_no_stale_copy(tmp_path):
    """A table whose remaking fails (here a run without a macro-F1) used to be skipped with a
    line among the others, summary ending with 0 and the previous table left in SUMMARY as if
    current: now its old outputs are removed and summary ends with an error naming it, the
    other tables made as before."""
    root, summary = tmp_path / "runs", tmp_path / "docs"
    for seed in range(3):
        _write_run(root, "trec6", "default", seed, 0.90)
        _write_run(root, "trec6", "lora", seed, 0.89)
    broken = root / "trec6" / "lora" / "seed1" / "metrics.json"
    broken.write_text(json.dumps(dict(json.loads(broken.read_text()), eval_macro_f1=None)))
    summary.mkdir()
    stale = summary / "vs_default_eval_macro_f1.md"
    stale.write_text("| lora | 3 | 0.7000 | 0.8000 | -0.1000 | [-0.2, -0.05] | worse |\n")
    done = _summary(tmp_path, root)
    assert done.returncode != 0
    assert "vs_default_eval_macro_f1" in done.stderr
    assert not stale.exists()
    assert not (summary / "vs_default_eval_macro_f1.png").exists()
    assert "| lora | 3 |" in (summary / "vs_default_eval_accuracy.md").read_text()
