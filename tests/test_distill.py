"""The distillation term (Config.distill_weight): KL of the adapter's next-token distribution from the base
model's own (the same model with the adapter off) on everyday rows only, on a tiny random model."""
import dataclasses

import pytest
import torch

from workbench.config import ConfigError, load_recipe
from workbench.loss import token_loss_sum, token_loss_terms
from workbench.models import TINY_MODEL, load_model, load_tokenizer
from workbench.packing import collate, pack
from workbench.prompt import PromptBuilder


@pytest.fixture(scope="module")
def setup():
    from peft import LoraConfig, get_peft_model

    builder = PromptBuilder(load_tokenizer(TINY_MODEL))
    gen = torch.Generator().manual_seed(0)  # a local generator: no global RNG side effect
    model = get_peft_model(load_model(TINY_MODEL, torch_dtype="float32", device="cpu"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    everyday = dataclasses.replace(builder.encode([{"role": "user", "content": "What is 2+2?"},
                                                   {"role": "assistant", "content": "2+2 is 4."}]), distill=True)
    identity = builder.encode([{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I'm Nova."}])
    return builder, model, everyday, identity, gen


def _batch(builder, *samples):
    return collate(pack(list(samples), max_length=256), builder.tokenizer.pad_token_id)


def test_collate_marks_the_trained_tokens_of_everyday_samples(setup):
    builder, _, everyday, identity, _ = setup
    batch = _batch(builder, identity, everyday)
    assert int(batch["distill"].sum()) == everyday.n_trained, "only the everyday sample's trained tokens"
    assert "distill" not in _batch(builder, identity), "identity rows alone: no distillation"


def test_kl_is_zero_for_an_untrained_adapter_and_grows_with_it(setup):
    builder, model, everyday, identity, gen = setup
    batch = _batch(builder, identity, everyday)
    ce, kl, *_ = token_loss_terms(model, batch)
    assert ce.item() == pytest.approx(token_loss_sum(model, batch).item(), rel=1e-5), "the same cross-entropy"
    assert kl.item() == pytest.approx(0.0, abs=1e-6), "LoRA's B starts at zero: the adapter is the base"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    ce2, kl2, *_ = token_loss_terms(model, batch)
    assert kl2.item() > 1e-3
    kl2.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all("lora" in n for n, p in model.named_parameters() if p.grad is not None), "only the adapter learns"
    assert token_loss_sum(model, batch).item() == pytest.approx(ce2.item(), rel=1e-5), "the adapter is on again afterwards"
    model.zero_grad()


def test_config_checks_distill_weight():
    from workbench.config import DataSource

    cfg = load_recipe("smollm2_135m_tiny_smoke")
    cfg = cfg.replace(datasets=[*cfg.datasets, DataSource(path="data/general_conversations.jsonl", distill=True)])
    assert cfg.distill_weight == 0.0 and cfg.replace(distill_weight=0.5).validate().distill_weight == 0.5
    with pytest.raises(ConfigError, match="distill_weight"):
        cfg.replace(distill_weight=0.5, method="full").validate()
    with pytest.raises(ConfigError, match="distill_weight"):
        cfg.replace(distill_weight=-1.0).validate()


def test_training_with_the_distillation_term(tmp_path):
    """A tiny mixed run trains with distill_weight on; the logged loss stays the cross-entropy (finite)."""
    import math

    from workbench.config import DataSource
    from workbench.train import train

    cfg = load_recipe("smollm2_135m_tiny_smoke")
    cfg = cfg.replace(max_steps=2, save_steps=2, evaluation_freq=0, distill_weight=1.0,
                      datasets=[*cfg.datasets, DataSource(path="data/general_conversations_zh.jsonl", fraction=0.3, distill=True)])
    result = train(cfg, tmp_path / "work", progress=False)
    assert len(result.metrics) == 2 and all(math.isfinite(m["loss"]) for m in result.metrics)


def test_a_source_can_opt_out_of_the_distillation_term():
    """Only the rows of sources marked `distill: true` (the base model's own everyday answers) get the term: not
    the identity data (generated or from a file, as `configure` puts it), not hand-written answers."""
    from workbench.config import DataSource
    from workbench.encoding import encode_samples
    from workbench.mixing import mix_sources

    cfg = load_recipe("smollm2_135m_tiny_smoke")
    sources = [DataSource(generate="identity", repeat=0.1), DataSource(path="data/general_conversations.jsonl", repeat=0.2,
                                                                      distill=True),
               DataSource(path="data/general_conversations_zh.jsonl", repeat=0.2)]
    samples = mix_sources(cfg.replace(datasets=sources))
    encoded, _ = encode_samples(samples, PromptBuilder(load_tokenizer(TINY_MODEL)), max_length=256)
    by_source = {}
    for s, e in zip(samples, encoded):
        by_source.setdefault(s.source, set()).add(e.distill)
    assert by_source == {"generated:identity": {False}, "data/general_conversations.jsonl": {True},
                         "data/general_conversations_zh.jsonl": {False}}
    assert cfg.replace(datasets=sources).validate().datasets[1].distill is True
    with pytest.raises(ConfigError, match="distill: true"):
        cfg.replace(datasets=sources[::2], distill_weight=1.0).validate()


def test_the_identity_data_as_a_file_stays_out_of_the_term(tmp_path):
    """The notebooks' and XTuner's way: identity data written to a file and put in the recipe's place."""
    from workbench.config import configure
    from workbench.identity import generate_identity
    from workbench.samples import write_dataset

    write_dataset(generate_identity("Nova", "Alex"), tmp_path / "identity.json")
    cfg = configure("smollm2_135m_lora_identity_mixed_cpu", tmp_path / "identity.json")
    assert cfg.distill_weight > 0 and [d.distill for d in cfg.datasets] == [False, True, False]


@pytest.mark.parametrize("packed_attention", [False, True], ids=["masked", "packed"])
def test_the_base_forward_runs_only_the_everyday_conversations(setup, packed_attention):
    """The base model's logits at the distilled positions are the same whether the whole batch or only the
    conversations that hold them go through the forward (rows of several conversations, padding, two rows)."""
    from workbench.fastpath import cpu as fastpath
    from workbench.loss import conversations_holding, forward_logits, trained_positions

    builder, model, everyday, identity, _ = setup
    other = dataclasses.replace(builder.encode([{"role": "user", "content": "Name a colour."},
                                                {"role": "assistant", "content": "Blue, like the sea."}]), distill=True)
    rows = pack([identity, everyday, identity, other, identity], max_length=3 * len(identity.input_ids))
    batch = collate(rows, builder.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] >= 2 and (batch["input_ids"] == builder.tokenizer.pad_token_id).any()
    keep = trained_positions(batch)
    mask = batch["distill"][:, 1:][:, keep]
    sub = conversations_holding(batch, keep, mask)
    assert sub["input_ids"].shape[1] == len(everyday.input_ids) + len(other.input_ids), "the two everyday conversations"
    if packed_attention:
        assert fastpath.enable_packed_attention(model)
    try:
        with torch.no_grad(), model.disable_adapter():
            whole = forward_logits(model, batch, keep)[mask]
            cut = forward_logits(model, sub, sub["keep"])[0]
    finally:
        fastpath.disable_packed_attention(model)
    assert whole.shape == cut.shape and whole.shape[0] == everyday.n_trained + other.n_trained
    torch.testing.assert_close(cut, whole, rtol=1e-4, atol=1e-4)


def test_the_first_sentence_of_each_answer_is_marked(setup):
    from workbench.encoding import answer_openings, encode_samples
    from workbench.samples import Sample

    builder = setup[0]
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 is 4. It is even."},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6! Also even."}]
    enc = builder.encode(messages)
    marked = sorted(answer_openings(enc.labels, builder.tokenizer))
    assert builder.tokenizer.decode([enc.labels[i] for i in marked]) == "2+2 is 4.It is 6!", "each answer's first sentence"
    assert all(enc.labels[i] != -100 for i in marked)
    sample = Sample(messages, distill=True)
    (encoded,), _ = encode_samples([sample], builder, 256)
    assert encoded.opening == frozenset(marked), "encoding marks them on everyday samples"
    (plain,), _ = encode_samples([Sample(messages)], builder, 256)
    assert plain.opening == frozenset() and "opening" not in _batch(builder, plain)


def test_the_opening_factor_weights_the_kl_of_first_sentences(setup):
    from workbench.encoding import answer_openings

    builder, model, _, identity, _ = setup
    enc = builder.encode([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 is 4. It is even, and so is 6."}])
    everyday = dataclasses.replace(enc, distill=True, opening=answer_openings(enc.labels, builder.tokenizer))
    batch = _batch(builder, identity, everyday)
    assert 0 < int(batch["opening"].sum()) < int(batch["distill"].sum()) and not (batch["opening"] & ~batch["distill"]).any()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.5)
    kl = {f: token_loss_terms(model, batch, opening_factor=f)[1].item() for f in (0.0, 1.0, 2.0, 3.0)}
    assert kl[1.0] == token_loss_terms(model, batch)[1].item(), "factor 1 is the plain term"
    assert kl[3.0] - kl[2.0] == pytest.approx(kl[2.0] - kl[1.0], rel=1e-4), "linear in the factor"
    assert 0 < kl[0.0] < kl[1.0], "factor 0: the other sentences' KL only"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
