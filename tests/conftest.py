import os
import sys

import pytest
import torch

# tests import the top-level modules (unifluid, vae, train, sample, data) from the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# 2-core CI machine: keep intra-op threads bounded and results repeatable
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
