import os

import numpy as np
import pytest
import torch

# Two cores: keep intra-op threads small so tests are steady and subprocesses don't oversubscribe.
torch.set_num_threads(2)
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
