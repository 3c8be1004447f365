"""The optimizer: one rate, or LoRA+'s (each adapter's B matrix at lr x loraplus_lr_ratio), on the tiny random model."""
import pytest
import torch

from workbench.config import ConfigError, load_recipe
from workbench.models import build_model
from workbench.optimizer import adamw, group_rates


@pytest.fixture()
def cfg(tiny_model):
    return load_recipe("smollm2_135m_tiny_smoke").replace(lora_dropout=0.0, seed=3)


def lora_weights(model, which: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and which in n}


def one_step(cfg) -> tuple[dict, dict, torch.optim.Optimizer]:
    """The LoRA weights' change after one AdamW step on a random batch (the same model and batch for any cfg)."""
    with torch.random.fork_rng(devices=[]):  # LoRA's A is drawn from the global generator: seeded here, restored after
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
    optimizer = adamw(cfg, model)
    before_a, before_b = lora_weights(model, "lora_A"), lora_weights(model, "lora_B")
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after_a, after_b = lora_weights(model, "lora_A"), lora_weights(model, "lora_B")
    return ({n: after_a[n] - before_a[n] for n in before_a}, {n: after_b[n] - before_b[n] for n in before_b}, optimizer)


def test_one_rate_by_default(cfg):
    _, _, optimizer = one_step(cfg)
    assert [lr for _, lr in group_rates(optimizer)] == [cfg.lr]


@pytest.mark.parametrize("ratio", [4.0, 0.5])
def test_loraplus_moves_b_at_ratio_times_the_rate(cfg, ratio):
    """Adam's first step moves each weight by about its rate (m / sqrt(v) = g / |g|): B by lr x ratio. A's gradient is
    0 at the start (B is 0), so A stays where it was."""
    d_a, d_b, optimizer = one_step(cfg.replace(loraplus_lr_ratio=ratio))
    n_b = len(d_b)
    assert sorted(group_rates(optimizer)) == sorted([(len(d_a), cfg.lr), (n_b, ratio * cfg.lr)])
    largest = max(d.abs().max().item() for d in d_b.values())
    assert largest == pytest.approx(ratio * cfg.lr, rel=1e-3)
    assert all(d.abs().max().item() == 0 for d in d_a.values())
    _, d_b_plain, _ = one_step(cfg)
    assert max(d.abs().max().item() for d in d_b_plain.values()) == pytest.approx(cfg.lr, rel=1e-3)


@pytest.mark.parametrize("changes", [dict(loraplus_lr_ratio=-1.0),
                                     dict(loraplus_lr_ratio=4.0, method="full")])
def test_refused_ratios(cfg, changes):
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        cfg.replace(**changes)
