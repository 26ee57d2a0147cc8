import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# benchmark helpers some tests check (the benchmarks are not part of the installed package)
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist each worker takes one thread (the workers already share the cores).
_default_threads = 1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else torch.get_num_threads()
torch.set_num_threads(int(os.environ.get("DIFFGUIDE_TEST_THREADS", _default_threads)))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
