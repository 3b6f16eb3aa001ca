"""The README's usage example runs as written, and its test command is what CI runs."""
import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_example_runs_and_grows_to_the_budget(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks()
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    controller = namespace["controller"]
    assert controller.budget_reached
    assert sum(controller.rank_pattern().values()) == controller.total_budget
    assert (tmp_path / "my_adapter" / "adapter_model.safetensors").is_file()


def test_readme_trainer_example_runs_and_grows_to_the_budget(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks()
    assert len(blocks) >= 2, "README has no Trainer example"
    namespace = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(blocks[1], "README.md", "exec"), namespace)
    # the README's own example warns of nothing (torch's 'pin_memory ... no accelerator is
    # found' fired on every CPU-only machine: the Trainer pins by default)
    assert not [str(w.message) for w in caught if "pin_memory" in str(w.message)]
    controller = namespace["trainer"].increlora_controller
    assert controller.budget_reached
    assert sum(controller.rank_pattern().values()) == 2 * 4


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "test-command" in ci
    block = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```\n<!-- /test-command -->",
                      README.read_text(), flags=re.S)
    assert block and "pytest" in block.group(1)


def test_every_option_the_readme_names_exists():
    """Each ``--option`` the README, the own-data recipe (docs/compare/own_data.md), the GPU
    session (docs/gpu_session.md) and docs/kernels.md tell a user to give is one of the commands
    they name: ``increlora-fast finetune|bench|memory|gpu-check``,
    ``compare_stats`` and the step_host / replay_host benchmarks (a renamed or dropped option
    fails here, not in a user's shell)."""
    import contextlib
    import io
    from increlora_fast.benchmarks.speed import replay_host, step_host
    from increlora_fast.cli.main import SUBCOMMANDS, main
    from increlora_fast.training import compare_stats

    mains = [lambda argv, name=name: main([name] + argv) for name in SUBCOMMANDS]
    mains += [compare_stats.main, step_host.main, replay_host.main]
    known = set()
    pytest_options = {"--dist"}  # the test command's, and the line after it
    for run in mains:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                run(["--help"])
            except SystemExit:
                pass
        known |= set(re.findall(r"--[a-z][a-z0-9-]+", out.getvalue()))
    docs = README.parent / "docs"
    text = "".join(path.read_text() for path in (
        README, docs / "compare" / "own_data.md", docs / "gpu_session.md", docs / "kernels.md"))
    named = set(re.findall(r"--[a-z][a-z0-9-]+", text))
    assert named and not named - known - pytest_options, sorted(named - known - pytest_options)


def test_the_readme_benchmark_commands_describe_themselves_in_whole_sentences():
    """``--help`` of the step_host / replay_host / compare_stats commands the README names opens
    with its module docstring's first paragraph, whole: step_host's read "Host work of a whole
    eager training step, measured without a GPU: the Triton launches are" (its first line)."""
    import contextlib
    import io
    from increlora_fast.benchmarks.speed import replay_host, step_host
    from increlora_fast.training import compare_stats

    for module in (step_host, replay_host, compare_stats):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                module.main(["--help"])
            except SystemExit:
                pass
        first = "".join(module.__doc__.split("\n\n")[0].split())  # argparse rewraps it
        assert first in "".join(out.getvalue().split()), (module.__name__, out.getvalue())


def test_the_readme_quotes_the_cpu_host_time_records():
    """The README's host-time ratios and counts are those of the records in bench/records: it
    kept quoting 0.89x / 0.81x, 41 Python calls, 148 launches and 524 ops after the records were
    measured again (0.99x / 0.93x, 43, 149, 538)."""
    import json

    def records(name):
        rows = json.loads((README.parent / "bench" / "records" / name).read_text())
        return {row["method"]: row for row in rows}

    readme = " ".join(README.read_text().split())
    layer = records("cpu_host_overhead_small.json")
    ours = layer["increlora-triton"]
    ratio = ours["median_us"] / layer["peft-lora"]["median_us"]
    assert f"{ratio:.2f}x peft LoRA's at {ours['shape']}" in readme
    assert f"{ours['python_calls_per_call']} Python calls per forward+backward" in readme
    assert f"{ours['launches_per_call']} launches" in readme
    step = records("cpu_step_host.json")
    ours, peft = step["increlora-triton"], step["peft-lora"]
    assert f"{ours['x_peft_lora']:.2f}x peft LoRA's host time" in readme
    assert f"with {ours['launches_per_step']} Triton launches" in readme
    assert (f"{ours['aten_ops_per_step']} other device ops against peft LoRA's "
            f"{peft['aten_ops_per_step']:,}") in readme


def test_the_readme_main_job_block_is_its_stored_metrics():
    """The main job's result block in the README quotes the metrics.json it names under
    results/main_job (it had shown a run of 2026-11-30 whose file was nowhere, with later
    runs' other figures only in prose)."""
    import json

    text = README.read_text()
    path = re.search(r"its `metrics.json` is `(results/main_job/[^`]+/metrics.json)`", text)
    assert path, "the README names no stored metrics.json of the main job"
    m = json.loads((README.parent / path.group(1)).read_text())
    block = text[path.end():].split("```text\n", 1)[1].split("```", 1)[0]
    assert f"eval_accuracy {m['eval_accuracy']:.3f}   eval_macro_f1 {m['eval_macro_f1']:.3f}" \
        in block
    assert f"steps {m['steps']}   train_seconds {m['train_seconds']}   " \
        f"total_seconds {m['total_seconds']}   total_rank {m['total_rank']}" in block
    assert f"trainable_params_active {m['trainable_params_active']:,}   " \
        f"trainable_params_padded {m['trainable_params_padded']:,}" in block
    assert m["settings"]["method"] == "increlora" and m["seed"] == 0


def test_the_readme_lists_what_target_modules_none_selects():
    """``target_modules=None`` is a union of common attention/FFN names, not peft's
    per-architecture default (BERT's query and value): the README said neither, so a user
    moving from peft adapted more modules than expected. It lists every default name, in one
    sentence beside the ``target_modules`` description."""
    from increlora_fast.config import DEFAULT_TARGET_MODULES
    readme = " ".join(README.read_text().split())
    start = readme.index("`target_modules=None` (the default)")
    sentence = readme[start:readme.index("DEFAULT_TARGET_MODULES", start)]
    assert "not peft's per-architecture default" in sentence
    assert set(re.findall(r"`([\w.]+)`", sentence)) - {"query", "value", "q_proj", "v_proj"} \
        <= set(DEFAULT_TARGET_MODULES) <= set(re.findall(r"`([\w.]+)`", sentence))
