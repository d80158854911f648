import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


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
