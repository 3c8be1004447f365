"""Shared test fixtures."""
import pytest
import torch

from workbench.models import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (SmolLM2-135M-Instruct, ChatML template); loads in about a second."""
    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny random model's name, its folder created first when missing (a fresh clone or WORKBENCH_CACHE).

    prepare_tiny_model seeds the global RNG to draw its weights: forked here, so that creating it in the middle
    of a test run changes no later draw.
    """
    from workbench.models import TINY_MODEL, prepare_tiny_model

    with torch.random.fork_rng(devices=[]):
        prepare_tiny_model()
    return TINY_MODEL


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for tiny-model tests: on a small shared CPU, two contending threads make them many times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
