import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# benchmark helpers some tests check (the benchmarks are not part of the installed package)
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("DIFFGUIDE_TEST_THREADS", torch.get_num_threads())))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
