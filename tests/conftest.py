"""Shared test fixtures."""
import pytest

from workbench.models import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (SmolLM2-135M-Instruct, ChatML template); loads in about a second."""
    return load_tokenizer("embedded")
