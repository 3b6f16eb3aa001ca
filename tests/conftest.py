"""Shared fixtures: a seeded RNG per test, a tiny hand-written model, and the device the Triton
kernel tests run on.

Kernel tests (those taking the ``kernel_device`` fixture) draw fresh random inputs in every test
session: their seed mixes the session's seed, random unless ``INCRELORA_TEST_SEED`` gives it,
with the test's id. The header of the run prints the session's seed, and a failed kernel test
repeats it, so ``INCRELORA_TEST_SEED=N`` draws the same inputs again. Every other test starts
from the fixed seed 1234.

Kernel tests run the compiled kernels on a CUDA machine and, without one, the same kernels under
the Triton interpreter on CPU tensors. Triton decides at decoration time, so ``TRITON_INTERPRET``
is set here, before any test module imports ``increlora_fast.kernels``.
"""
from __future__ import annotations

import os
import random
import zlib

import pytest
import torch
from torch import nn

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if KERNEL_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


def _session_seed() -> int:
    text = os.environ.get("INCRELORA_TEST_SEED", "").strip()
    if not text:
        return random.SystemRandom().randrange(2 ** 31)
    try:
        return int(text)
    except ValueError:
        raise pytest.UsageError(f"INCRELORA_TEST_SEED={text!r} is invalid: use an integer")


SESSION_SEED = _session_seed()
# pytest-xdist's workers (``-n 2``, the README's test command) inherit the environment of the
# process that starts them, so every worker draws from the seed that process printed
os.environ["INCRELORA_TEST_SEED"] = str(SESSION_SEED)


def _share_the_cores_among_workers() -> None:
    """Under pytest-xdist, each worker gets its share of the cores (its torch threads, and
    OMP_NUM_THREADS for the processes its tests start): two workers of two threads each on the
    CI's 2 cores ran the suite in 1,136 s, of one thread each in 629 s."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores_among_workers()


def pytest_report_header(config) -> str:
    return (f"kernel tests draw fresh inputs from seed {SESSION_SEED} "
            f"(INCRELORA_TEST_SEED={SESSION_SEED} draws them again)")


def _draws_fresh_inputs(item) -> bool:
    return "kernel_device" in getattr(item, "fixturenames", ())


def test_seed(item) -> int:
    """The seed a test starts from (see the module docstring)."""
    if not _draws_fresh_inputs(item):
        return 1234
    return zlib.crc32(f"{SESSION_SEED}:{item.nodeid}".encode())


test_seed.__test__ = False  # a helper, not a test


@pytest.fixture(autouse=True)
def _seed(request) -> None:
    """Every test starts from a seeded RNG: kernel tests from a fresh seed each session, the
    others from a fixed one."""
    torch.manual_seed(test_seed(request.node))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed kernel test names the session seed that draws its inputs again."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _draws_fresh_inputs(item):
        report.sections.append(("random inputs", f"INCRELORA_TEST_SEED={SESSION_SEED} "
                                f"(this test's seed {test_seed(item)})"))


@pytest.fixture(autouse=True)
def _increlora_settings_follow_monkeypatch(monkeypatch):
    """The library reads its INCRELORA_* environment once and caches it
    (`functional.refresh_settings`); here every test starts from the current environment, and
    ``monkeypatch.setenv`` / ``delenv`` make it read the environment again."""
    from increlora_fast import functional
    real_set, real_del = monkeypatch.setenv, monkeypatch.delenv

    def setenv(name, value, prepend=None):
        real_set(name, value, prepend)
        functional.refresh_settings()

    def delenv(name, raising=True):
        real_del(name, raising)
        functional.refresh_settings()
    monkeypatch.setenv, monkeypatch.delenv = setenv, delenv
    functional.refresh_settings()


@pytest.fixture(autouse=True)
def _no_failed_kernel_check_outlives_its_test():
    """A test that forces a first-use check to fail leaves the variant on the torch path for the
    rest of the process (`functional._FAILED`, the path cache): later tests in the same process
    would measure the torch path (a single-process run of the suite failed a Triton launch and
    allocation count after tests/test_kernels_compile.py). Such results are forgotten after the
    test; passing ones are kept (checking again costs an interpreted check per test)."""
    yield
    from increlora_fast import functional
    if not all(functional.kernel_check_results().values()):
        functional.reset_kernel_checks()


@pytest.fixture
def kernel_device() -> str:
    """"cuda", or "cpu" with the kernels under the Triton interpreter (skips without triton;
    fails if the kernels were built before the interpreter was switched on); launch counts are
    reset."""
    pytest.importorskip("triton")
    from increlora_fast.kernels import reset_launch_counts
    from increlora_fast.kernels.utils import interpreter_active
    if KERNEL_DEVICE == "cpu" and not interpreter_active():
        raise RuntimeError("increlora_fast.kernels was imported before TRITON_INTERPRET=1 was set")
    reset_launch_counts()
    return KERNEL_DEVICE


@pytest.fixture
def whole_loop_tiles(monkeypatch):
    """Interpreted launch plans with 64-wide token and feature tiles (`linear.INTERPRETED_TILE`)
    for a test of whole training steps on the Triton path: the interpreter's cost is per program,
    so a tiny model's layers run about 4x faster than at the kernel tests' 16. No effect on a
    GPU, whose plans do not read it."""
    pytest.importorskip("triton")
    from increlora_fast.kernels import linear
    monkeypatch.setattr(linear, "INTERPRETED_TILE", 64)
    linear.clear_plan_cache()
    yield
    linear.clear_plan_cache()  # (monkeypatch puts 16 back after this)


class TinyBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width, bias=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.proj(torch.relu(self.fc(x))))


class TinyNet(nn.Module):
    """A hand-written model: nested linears with and without bias, a norm and a head."""

    def __init__(self, width: int = 12, hidden: int = 20, classes: int = 3, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(width, hidden) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.fixture
def tiny_net() -> TinyNet:
    return TinyNet()


@pytest.fixture
def make_tiny_net():
    """Build TinyNet variants (other widths or depths) inside a test."""
    return TinyNet
