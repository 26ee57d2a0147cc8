import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("DIFFGUIDE_TEST_THREADS", torch.get_num_threads())))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
