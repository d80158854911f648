"""Benchmark session setup: the guard's options and summary, one-thread CPU timing, and the Triton
mode (Triton's interpreter without CUDA, switched on before any benchmark imports a kernel, as in
tests/conftest.py)."""

import sys
from pathlib import Path

import pytest
import torch

from orz_fast.kernels import use_interpreter

if not torch.cuda.is_available():
    use_interpreter()

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--update-baseline",
        action="store_true",
        default=False,
        help="rewrite benchmarks/results/baselines/<name>.<hardware>.json with this run's ratios "
        "instead of failing on a drop of more than 15%%",
    )


def pytest_configure(config):
    harness.UPDATE_BASELINE = config.getoption("--update-baseline")


def pytest_terminal_summary(terminalreporter):
    """Every guarded ratio of the session against its baseline, shown whether or not output is captured."""
    if not harness.GUARD_RESULTS:
        return
    hardware = harness.GUARD_RESULTS[0].hardware
    terminalreporter.section(f"benchmark ratios vs baseline ({hardware}, allowed drop 15%)")
    for result in harness.GUARD_RESULTS:
        for line in result.lines():
            terminalreporter.write_line(line)


@pytest.fixture
def one_cpu_thread():
    """On CPU, time with one intra-op thread: on a shared machine, waits at the thread barrier of an
    oversubscribed pool swamp small ops, and the figures are ratios taken side by side anyway."""
    if torch.cuda.is_available():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
