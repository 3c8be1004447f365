"""Packing: the loss of a packed batch equals the per-conversation losses computed alone."""
import dataclasses
import statistics

import pytest
import torch

from workbench.models import TINY_MODEL, load_model, load_tokenizer
from workbench.packing import StepPlan, collate, pack, unpacked
from workbench.prompt import IGNORE, PromptBuilder
from workbench.loss import token_loss_sum

QUESTIONS = ["Who are you?", "What is 2+2?", "Tell me a long story about a dragon and a knight in a castle.",
             "你是谁？", "Name three colours.", "Why is the sky blue? Explain briefly.", "Hi"]
ANSWERS = ["I am Nova.", "4.", "Once upon a time a dragon met a knight; they became friends and lived in the castle.",
           "我是Nova，Alex的助手。", "Red, green and blue.", "Sunlight scatters off air molecules; blue scatters most.", "Hello!"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    builder = PromptBuilder(load_tokenizer("embedded"))
    model = load_model(TINY_MODEL)
    samples = [builder.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
               for q, a in zip(QUESTIONS, ANSWERS)]
    return builder, model, samples


def alone(model, builder, samples):
    total = n = 0.0
    for s in samples:
        total += token_loss_sum(model, collate([[s]], builder.tokenizer.pad_token_id)).item()
        n += s.n_trained
    return total / n


def test_packed_loss_equals_unpacked_loss(setup):
    builder, model, samples = setup
    rows = pack(samples, max_length=96)
    assert len(rows) < len(samples), "the test must actually pack several samples into a row"
    batch = collate(rows, builder.tokenizer.pad_token_id)
    packed = token_loss_sum(model, batch).item() / sum(s.n_trained for s in samples)
    assert packed == pytest.approx(alone(model, builder, samples), rel=1e-5, abs=1e-6)


def test_without_position_restarts_the_loss_differs(setup):
    """Control: the equality above holds because attention really stops at conversation borders."""
    builder, model, samples = setup
    batch = collate(pack(samples, max_length=96), builder.tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    batch["position_ids"] = torch.arange(width).expand_as(batch["input_ids"])
    leaked = token_loss_sum(model, batch).item() / sum(s.n_trained for s in samples)
    assert abs(leaked - alone(model, builder, samples)) > 1e-3


def test_padding_is_never_trained(setup):
    builder, _, samples = setup
    batch = collate(unpacked(samples), builder.tokenizer.pad_token_id)
    lengths = [len(s) for s in samples]
    for i, n in enumerate(lengths):
        assert (batch["labels"][i, n:] == IGNORE).all()
        assert batch["position_ids"][i, :n].tolist() == list(range(n))
    assert (batch["labels"] != IGNORE).sum().item() == sum(s.n_trained for s in samples)


def test_pack_respects_max_length_and_keeps_everything(setup):
    _, _, samples = setup
    rows = pack(samples, max_length=96)
    assert all(sum(len(s) for s in r) <= 96 for r in rows)
    assert sorted(id(s) for r in rows for s in r) == sorted(id(s) for s in samples)


def test_windowed_pack_keeps_rows_local(setup):
    _, _, samples = setup
    many = [dataclasses.replace(s) for _ in range(4) for s in samples]  # 28 distinct samples, long and short
    for window in (1, 2):
        rows = pack(many, max_length=96, window=window)
        assert all(sum(len(s) for s in r) <= 96 for r in rows)
        row_of = {id(s): r for r, row in enumerate(rows) for s in row}
        assert sorted(row_of) == sorted(id(s) for s in many), "every sample packed once"
        opened = 0
        for s in many:  # a sample joins one of the last `window` rows opened before it, or opens the next one
            r = row_of[id(s)]
            assert opened - window <= r <= opened
            opened = max(opened, r + 1)
    assert pack(many, max_length=96, window=None) == pack(many, max_length=96), "no window: first fit over every row"
    assert len(pack(many, max_length=96)) <= len(pack(many, max_length=96, window=2)) <= len(pack(many, max_length=96, window=1))


def test_step_plan_is_a_pure_function_of_seed_and_step():
    plan = StepPlan(n_rows=10, batch_size=2, accumulative_counts=1, world_size=1, seed=3, max_epochs=2)
    assert plan.total_steps == 10
    seen = [i for s in range(5) for i in plan.step_rows(s)]
    assert sorted(seen) == list(range(10)), "one epoch visits every row once"
    again = StepPlan(n_rows=10, batch_size=2, accumulative_counts=1, world_size=1, seed=3, max_epochs=2)
    assert [again.step_rows(s) for s in (7, 2)] == [plan.step_rows(7), plan.step_rows(2)]


def test_step_plan_splits_a_step_over_processes():
    one = StepPlan(n_rows=9, batch_size=4, accumulative_counts=1, world_size=1, seed=0, max_steps=5)
    two = StepPlan(n_rows=9, batch_size=2, accumulative_counts=1, world_size=2, seed=0, max_steps=5)
    for step in range(5):
        assert one.micro_batches(step, 0)[0] == two.micro_batches(step, 0)[0] + two.micro_batches(step, 1)[0]


def test_a_stratified_recipe_packs_the_same_samples_into_rows_of_mixed_sources(tiny_model):
    """The mixed recipe's data as training prepares it (`train.prepare_rows`): stratified, the same conversations as
    shuffled, every row within max_length, and the identity data's share of each row's trained tokens more even
    (a row holds a stretch of an even mixture, not whatever the shuffle put together)."""
    from workbench.config import load_recipe
    from workbench.train import prepare_rows

    cfg = load_recipe("smollm2_135m_lora_identity_mixed_cpu").replace(pretrained_model_name_or_path=tiny_model)
    builder = PromptBuilder(load_tokenizer(tiny_model))
    by_order = {order: prepare_rows(cfg.replace(mix_order=order), builder, is_main=False) for order in ("shuffle", "stratified")}
    (shuffled, _, rows_shuffled), (stratified, _, rows) = by_order["shuffle"], by_order["stratified"]
    assert sorted(s.where for s in shuffled) == sorted(s.where for s in stratified)
    assert all(sum(len(s) for s in r) <= cfg.max_length for r in rows)
    assert sum(len(r) for r in rows) == len(stratified)
    spread = [statistics.pstdev(identity_share(r) for r in rs) for rs in (rows, rows_shuffled)]
    assert spread[0] < spread[1], spread  # 0.09 against 0.14 at the recipe's seed; the long English answers keep some


def identity_share(row) -> float:
    """The share of a row's trained tokens that are identity data (neither everyday source's)."""
    return sum(s.n_trained for s in row if not (s.distill or s.unlikelihood)) / sum(s.n_trained for s in row)
