"""NEFTune (workbench/neftune.py): noise of the right bound on the trained forward only, on the tiny random model."""
import pytest
import torch

from workbench import neftune
from workbench.config import ConfigError, load_recipe
from workbench.loss import base_logits, trained_positions
from workbench.models import build_model

ALPHA = 5.0


@pytest.fixture()
def model(tiny_model):
    cfg = load_recipe("smollm2_135m_tiny_smoke").replace(lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):  # LoRA's A is drawn from the global generator: seeded here, restored after
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
    model.train()
    return model


def ids_of(model, rows=2, length=24):
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))


def embeddings(model, ids, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return model.get_input_embeddings()(ids).detach()


def test_the_noise_is_uniform_within_alpha_over_sqrt_length_times_hidden(model):
    ids = ids_of(model)
    clean = embeddings(model, ids, grad=True)
    handle = neftune.attach(model, ALPHA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        noise = embeddings(model, ids, grad=True) - clean
    handle.remove()
    bound = ALPHA / (ids.shape[1] * model.config.hidden_size) ** 0.5
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().mean() == pytest.approx(bound / 2, rel=0.05)  # |U(-m, m)| has mean m / 2
    assert noise.mean().abs() < bound / 20
    assert torch.equal(embeddings(model, ids, grad=True), clean), "remove() takes the noise off"


def test_no_noise_without_gradients_or_in_eval_mode(model):
    ids = ids_of(model)
    clean = embeddings(model, ids, grad=True)
    neftune.attach(model, ALPHA)
    assert torch.equal(embeddings(model, ids, grad=False), clean), "generation and the base forward run without gradients"
    model.eval()
    assert torch.equal(embeddings(model, ids, grad=True), clean)


def test_the_distillation_target_is_the_base_on_clean_embeddings(model):
    """The KL term's base forward (adapter off, no gradients) gives the same logits with NEFTune attached."""
    ids = ids_of(model, rows=1)
    batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None], "labels": ids}
    keep = trained_positions(batch)
    mask = torch.ones(1, len(keep), dtype=torch.bool)
    clean = base_logits(model, batch, keep, mask)
    neftune.attach(model, ALPHA)
    assert torch.equal(base_logits(model, batch, keep, mask), clean)


def test_attaching_again_replaces_the_noise(model):
    """A model set up for training twice (Trainer.setup on a given model) gets one noise, not two."""
    ids = ids_of(model)
    clean = embeddings(model, ids, grad=True)
    neftune.attach(model, ALPHA)
    neftune.attach(model, ALPHA)
    noise = embeddings(model, ids, grad=True) - clean
    assert noise.abs().max() <= ALPHA / (ids.shape[1] * model.config.hidden_size) ** 0.5 * (1 + 1e-5)
    assert neftune.attach(model, 0.0) is None
    assert torch.equal(embeddings(model, ids, grad=True), clean), "alpha 0 takes earlier noise off"


def test_alpha_zero_attaches_nothing_and_a_negative_alpha_is_refused(model, tiny_model):
    assert neftune.attach(model, 0.0) is None
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        load_recipe("smollm2_135m_tiny_smoke").replace(neftune_noise_alpha=-1.0)


def test_a_flat_micro_batch_gets_the_noise_of_its_rows_padded(model):
    """The GPU fast path's flat micro-batch (its rows end to end in one row) is noised as the same rows padded into one
    micro-batch, L the longest row: alpha means the same on either path, whatever the token budget."""
    from types import SimpleNamespace

    from workbench.loss import training_loss
    from workbench.packing import collate, collate_flat, row_length
    from workbench.prompt import Encoded

    def sample(n: int, seed: int) -> Encoded:
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        return Encoded(input_ids=ids, labels=[-100] * (n // 2) + ids[n // 2:])

    rows = [[sample(20, 1), sample(9, 2)], [sample(17, 3)], [sample(25, 4), sample(5, 5)]]
    longest = max(row_length(r) for r in rows)
    cfg = SimpleNamespace(distill_weight=0.0)
    noises = {}
    layout = {"padded": collate(rows, pad_id=0), "flat": collate_flat(rows)}
    assert layout["flat"]["noise_length"] == longest and layout["flat"]["input_ids"].shape[1] == 76 > longest
    neftune.attach(model, ALPHA)
    for name, batch in layout.items():
        clean = embeddings(model, batch["input_ids"], grad=False)
        seen = model.get_input_embeddings().register_forward_hook(
            lambda module, args, output, name=name, clean=clean: noises.__setitem__(name, (output - clean).detach()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            training_loss(model, batch, cfg)
        seen.remove()
    bound = ALPHA / (longest * model.config.hidden_size) ** 0.5
    for name, noise in noises.items():
        assert noise.abs().max() <= bound * (1 + 1e-5), name
        assert noise.abs().mean() == pytest.approx(bound / 2, rel=0.05), name
