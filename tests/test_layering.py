"""The package's imports point one way: the kernels know only tensors (they import nothing else
of the package), the core (the modules at the package's top level: config, layer, model,
controller, optimizer, persistence, ...) imports nothing from the CLI, the benchmarks, the
training loop or the integrations that sit on top of it, and no two modules import each other,
directly or round a circle. Read from the source (every import statement, those inside
functions and under ``TYPE_CHECKING`` included), so nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import increlora_fast

PACKAGE = Path(increlora_fast.__file__).parent
UPPER = ("cli", "benchmarks", "integrations", "training", "data")


def _module_names() -> Dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("increlora_fast",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _imports(name: str) -> Set[str]:
    """The package's modules that module ``name`` imports (a package counts as its
    ``__init__``; ``from package import module`` as the module)."""
    path = MODULES[name]
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module
                                                                   else []))
                    if node.level else node.module)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name
                     and not name.startswith(t + "."))  # a module's own package runs first
    return found


IMPORTS = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] == "kernels":
        return "kernels"
    if parts[1] in UPPER:
        return parts[1]
    if parts[1] == "__main__":  # `python -m increlora_fast`: the CLI's entry
        return "cli"
    return "core"


def test_the_kernels_import_nothing_of_the_package_but_kernels():
    wrong = sorted(f"{m} -> {t}" for m in MODULES if _layer(m) == "kernels"
                   for t in IMPORTS[m] if _layer(t) != "kernels")
    assert not wrong, wrong


def test_the_core_imports_nothing_from_the_layers_above_it():
    wrong = sorted(f"{m} -> {t}" for m in MODULES if _layer(m) == "core"
                   for t in IMPORTS[m] if _layer(t) in UPPER)
    assert not wrong, wrong


def test_no_module_imports_itself_round_a_circle():
    circles: List[List[str]] = []
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(IMPORTS[name]):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name)
    assert not circles, circles


def test_the_reader_sees_relative_imports_inside_functions():
    # the check itself: the lazy relative imports of a known module are found
    assert "increlora_fast.training.step_runner" in IMPORTS[
        "increlora_fast.benchmarks.gpu_check.graphs"]
    assert _layer("increlora_fast.persistence") == "core"


def test_the_package_and_its_tensor_free_modules_start_without_torch():
    """``import increlora_fast`` imports its public names on first use, so the comparison
    statistics (a shell script starts them once per table) and ``increlora-fast --help`` start
    without torch and transformers (about 5 s each on CI's machine, 0.1 s without); every public
    name still resolves, to the object its module defines."""
    import subprocess
    import sys
    code = ("import sys, increlora_fast.training.compare_stats, increlora_fast.cli.main; "
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0 and done.stdout.split() == ["[]"], done.stderr
    import importlib
    for name in increlora_fast.__all__:
        module = importlib.import_module(f"increlora_fast.{increlora_fast._EXPORTS[name]}")
        assert getattr(increlora_fast, name) is getattr(module, name)
    assert set(increlora_fast.__all__) == set(increlora_fast._EXPORTS) <= set(dir(increlora_fast))
    try:
        increlora_fast.no_such_name
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("an unknown name resolved")


def test_the_package_gives_its_submodules_as_attributes():
    """README names functions by their module under the package (``increlora_fast.pooling.
    apply_pooling(model, "mean")``, ``increlora_fast.device_scalar``), as export_peft's warning
    does: after ``import increlora_fast`` those resolved (the eager ``__init__`` imported them),
    and the lazy one must give a submodule on first use too, still without importing torch."""
    import subprocess
    import sys
    code = ("import sys, increlora_fast; print('torch' in sys.modules); "
            "print(increlora_fast.pooling.apply_pooling.__module__, "
            "increlora_fast.device_scalar.__name__, increlora_fast.model.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "increlora_fast.pooling",
                                   "increlora_fast.device_scalar", "increlora_fast.model"]
