import os
import signal

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


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """Accelerate keeps one state per process and refuses another precision in it: every test starts
    (and leaves) it fresh, as a new process would (mixed_precision auto differs between CPUs)."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    reset()
    yield
    reset()


@pytest.fixture
def acc():
    """A CPU Accelerator in the fresh state every test starts with."""
    from accelerate import Accelerator
    return Accelerator(cpu=True)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Shards of the bundled real digits (train / test split), written once per test module."""
    from beit.data.sample_sets import build_sample_shards
    out = tmp_path_factory.mktemp("digits")
    build_sample_shards(out, "digits")
    return out


@pytest.fixture
def terminal_signals():
    """This process and the commands it starts get Ctrl-C as in a terminal: a test suite started as a script's
    background job (``cmd &``) has SIGINT ignored, which Python and the stop handlers keep, and children inherit."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    """A BEiT pretrained and fine-tuned on the bundled digits, exported to timm, Hugging Face and ONNX (paths and
    its final.json; tests/predict_testutil.py), built once per test session."""
    from predict_testutil import build_digits_model
    return build_digits_model(tmp_path_factory.mktemp("digits_model"))
