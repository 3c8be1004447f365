"""A full fine-tune in half precision keeps float32 master weights under autocast (`models.master_weights`).

A bf16 weight cannot take an update smaller than half its spacing, and AdamW's updates are about the learning rate
(5e-5 in the full recipe): trained as bf16 weights, most of them never move. On this CPU the same holds as on a
GPU (the rounding is the dtype's); bfloat16 is chosen explicitly here, as `auto` picks it on a GPU.
"""
import pytest
import torch

from workbench.fastpath import cuda as fastpath_cuda, token_budget
from workbench.config import ConfigError, load_recipe
from workbench.estimate import estimate
from workbench.train import Trainer

LR = 5e-5  # the full recipe's


@pytest.fixture()
def cfg(tiny_model):
    return load_recipe("smollm2_135m_tiny_smoke").replace(method="full", lr=LR, max_steps=3, evaluation_freq=0,
                                                          max_length=64, save_steps=1000, seed=5)


def trained(cfg, tmp_path, name: str) -> tuple[Trainer, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A trainer after `cfg.max_steps` steps, with the weights (float32) before and after."""
    with torch.random.fork_rng(devices=[]):
        trainer = Trainer(cfg, tmp_path / name, progress=False).setup()
        before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
    return trainer, before, {n: p.detach().float() for n, p in trainer.model.named_parameters()}


def moved_share(before: dict, after: dict) -> float:
    """The share of weight elements the run changed (the embeddings' rows of unseen tokens excluded: no gradient)."""
    moved = total = 0
    for name, b in before.items():
        if "embed" in name:
            continue
        moved += int((after[name] != b).sum())
        total += b.numel()
    return moved / total


def update(before: dict, after: dict) -> torch.Tensor:
    return torch.cat([(after[n] - before[n]).flatten() for n in before if "embed" not in n])


def test_a_bf16_full_fine_tune_keeps_float32_weights_and_computes_in_bf16(cfg, tmp_path, monkeypatch):
    import workbench.train as train_module

    seen = []
    real = train_module.training_loss

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_loss", recording)
    trainer, _, _ = trained(cfg.replace(torch_dtype="bfloat16", max_steps=1), tmp_path, "master")
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert trainer.accelerator.mixed_precision == "bf16"
    assert seen and all(seen), "the whole loss (also where it calls the decoder directly) runs under autocast"


def test_master_weights_take_the_updates_a_pure_bf16_run_loses(cfg, tmp_path):
    """The float32 run's update is what the master-weight run makes (bf16 compute: close, not equal); trained as bf16
    weights, many weights do not move at all and the update points elsewhere. On the tiny random model (weights of
    std 0.02): every weight moved with master weights (cosine 0.998 with the float32 update), 56% in pure bf16 (cosine
    0.74); the embedded model's larger weights lose more (92% cannot take a step of 5e-5)."""
    _, b32, a32 = trained(cfg.replace(torch_dtype="float32"), tmp_path, "fp32")
    _, bm, am = trained(cfg.replace(torch_dtype="bfloat16"), tmp_path, "master")
    pure, bp, ap = trained(cfg.replace(torch_dtype="bfloat16", pure_bf16=True), tmp_path, "pure")
    assert {p.dtype for p in pure.model.parameters()} == {torch.bfloat16} and pure.accelerator.mixed_precision == "no"
    reference = update(b32, a32)
    cosine = lambda u: float(torch.nn.functional.cosine_similarity(u, reference, dim=0))  # noqa: E731
    assert moved_share(bm, am) > 0.99 and cosine(update(bm, am)) > 0.98
    assert moved_share(bp, ap) < 0.7 and cosine(update(bp, ap)) < 0.85


def test_pure_bf16_is_for_a_full_fine_tune_in_bf16(cfg):
    cfg.replace(pure_bf16=True).validate()
    with pytest.raises(ConfigError, match="pure_bf16"):
        cfg.replace(pure_bf16=True, method="lora").validate()
    with pytest.raises(ConfigError, match="pure_bf16"):
        cfg.replace(pure_bf16=True, torch_dtype="float16").validate()


def test_the_estimate_counts_master_weights(cfg):
    """Per weight: float32 weights 4 + gradient 4 + AdamW's moments 8 + autocast's bf16 copy 2; pure bf16: 2 + 6."""
    master = estimate(cfg.replace(device="cpu", torch_dtype="bfloat16"), gflops=100.0)
    pure = estimate(cfg.replace(device="cpu", torch_dtype="bfloat16", pure_bf16=True), gflops=100.0)
    n = master.total_params
    assert master.weight_dtype == "float32, autocast bfloat16" and pure.weight_dtype == "bfloat16"
    assert (master.weights_gb, master.optimizer_gb) == pytest.approx((4 * n / 1e9, 14 * n / 1e9))
    assert (pure.weights_gb, pure.optimizer_gb) == pytest.approx((2 * n / 1e9, 6 * n / 1e9))


def test_the_token_budget_counts_the_autocast_copy(cfg, tmp_path):
    """GPU budget: float32 weights computing in bf16 hold a gradient and two moments in float32 and a bf16 copy."""
    with torch.random.fork_rng(devices=[]):
        trainer = Trainer(cfg.replace(torch_dtype="bfloat16"), tmp_path / "w", progress=False).setup()
    model = trainer.model
    n = sum(p.numel() for p in model.parameters())
    assert token_budget.optimizer_bytes(model) == 12 * n
    fastpath_cuda.set_compute_dtype(model, torch.bfloat16)  # what the GPU's fast path says of such a model
    assert fastpath_cuda.compute_dtype(model) == torch.bfloat16
    assert token_budget.optimizer_bytes(model) == 14 * n


def test_the_varlen_switch_follows_the_compute_dtype_not_the_float32_weights(cfg, monkeypatch):
    """On a GPU the fast path is told the run computes in bf16 (`models.with_fast_path`); float32 weights alone would
    keep transformers' masked attention (the kernel takes half precision only)."""
    from workbench.fastpath import varlen_kernel
    from workbench.models import build_model

    monkeypatch.setattr(varlen_kernel, "available", lambda: True)
    monkeypatch.setattr(varlen_kernel, "attention_call", lambda: None)
    for told, expected in ((None, False), (torch.bfloat16, True)):
        with torch.random.fork_rng(devices=[]):
            model = build_model(cfg.replace(torch_dtype="float32", fast_path=False), torch.device("cpu"))
        if told is not None:
            fastpath_cuda.set_compute_dtype(model, told)
        assert fastpath_cuda.enable_varlen_attention(model) is expected


def test_pure_bf16_is_refused_where_auto_means_float16(cfg, monkeypatch):
    """torch_dtype auto on a GPU without bfloat16 (a T4) computes in float16: its weights cannot be trained directly."""
    from workbench import distributed

    monkeypatch.setattr(distributed, "pick_dtype", lambda name, device: torch.float16)
    with pytest.raises(ConfigError, match="no bfloat16"):
        distributed.make_accelerator(cfg.replace(pure_bf16=True))
