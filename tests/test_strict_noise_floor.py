"""scripts/strict_noise_floor.py: the perturbations that size the strict measure's noise keep what they claim to keep.

The random update has the trained update's Frobenius norm (times the factor) in every module; the permuted one
has the trained update's singular values; zeroing B gives back the base model's outputs.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from test_fastpath import tiny_lora  # the tiny model with LoRA whose B matrices are drawn non-zero

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "strict_noise_floor.py"


@pytest.fixture(scope="module")
def noise():
    spec = importlib.util.spec_from_file_location("strict_noise_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def trained_lora(tiny_model):
    """The tiny model with LoRA (plain peft forward), B drawn non-zero as if trained (test_fastpath's model)."""
    return tiny_lora(fast=False).eval()


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_random_update_has_the_trained_norm(noise, trained_lora, factor):
    mods = noise.lora_modules(trained_lora)
    assert mods, "the tiny model has LoRA modules"
    trained = noise.snapshot(mods)
    noise.set_random(mods, trained, factor, seed=0)
    for m, (a, b, norm) in zip(mods, trained):
        assert torch.allclose(noise.update(m).norm(), norm * factor, rtol=1e-4)
        assert not torch.allclose(m.lora_B["default"].weight, b), "a new direction, not the trained one"
    first = [noise.update(m).clone() for m in mods]
    noise.set_random(mods, trained, factor, seed=0)
    assert all(torch.equal(u, noise.update(m)) for u, m in zip(first, mods)), "the same seed draws the same update"


def test_permuted_update_keeps_the_singular_values(noise, trained_lora):
    mods = noise.lora_modules(trained_lora)
    trained = noise.snapshot(mods)
    noise.set_permuted(mods, trained, seed=3)
    for m, (a, b, _) in zip(mods, trained):
        want = torch.linalg.svdvals(b @ a * m.scaling["default"])
        assert torch.allclose(torch.linalg.svdvals(noise.update(m)), want, rtol=1e-4, atol=1e-7)


def test_zero_update_is_the_base_model(noise, trained_lora):
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        tuned = trained_lora(input_ids=ids).logits
        noise.set_zero(noise.lora_modules(trained_lora))
        zeroed = trained_lora(input_ids=ids).logits
        with trained_lora.disable_adapter():
            base = trained_lora(input_ids=ids).logits
    assert not torch.allclose(tuned, base)
    assert torch.allclose(zeroed, base, atol=1e-6)
