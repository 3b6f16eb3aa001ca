"""The README's usage example runs as written, and its test command is what CI runs."""
import re
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
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    controller = namespace["trainer"].increlora_controller
    assert controller.budget_reached
    assert sum(controller.rank_pattern().values()) == 2 * 4


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "test-command" in ci
    block = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```\n<!-- /test-command -->",
                      README.read_text(), flags=re.S)
    assert block and "pytest" in block.group(1)
