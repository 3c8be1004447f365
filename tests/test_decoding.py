"""Greedy batches whose finished rows leave the batch (workbench.decoding) give what transformers' generate gives."""
import pytest
import torch

from workbench.chat import GenerationSettings, answer_batch
from workbench.decoding import greedy_batch, greedy_supported, left_padded
from workbench.models import load_model
from workbench.prompt import PromptBuilder

QUESTIONS = ["Who are you?", "What is 2+2? Answer briefly please, in one short sentence.", "你好", "Name a colour."]


@pytest.fixture(scope="module")
def tiny(tiny_model, tokenizer):
    """The tiny random model with its weights spread out (its own generator): as drawn, it answers every prompt
    with one repeated newline, and no row would end before another."""
    model = load_model(tiny_model).eval()
    draw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=draw) * 0.2)
    return model, PromptBuilder(tokenizer)


def _generate(model, prompts, stops, pad, max_new):
    """transformers' generate on the same left-padded batch: each row cut after its first stop token."""
    ids, mask = left_padded(prompts, pad, "cpu")
    width = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=stops, pad_token_id=pad, do_sample=False,
                         max_new_tokens=max_new)
    rows = []
    for row in out[:, width:].tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:end])
    return rows


def _batch_sizes(model):
    """The batch size of every forward call, recorded by a hook (the caller removes it)."""
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    return sizes, handle


def test_rows_leave_the_batch_and_the_answers_are_generates(tiny):
    model, builder = tiny
    prompts = [builder.generation_prompt(q) for q in QUESTIONS]
    pad = builder.tokenizer.pad_token_id
    free = greedy_batch(model, prompts, [], pad, 10)  # no stop token: every row runs to the limit
    assert [len(r) for r in free] == [10] * 4
    assert free == _generate(model, prompts, [-1], pad, 10)
    stops = [free[0][2], free[1][5]]  # rows end at different steps
    sizes, handle = _batch_sizes(model)
    try:
        got = greedy_batch(model, prompts, stops, pad, 10)
    finally:
        handle.remove()
    assert got == _generate(model, prompts, stops, pad, 10)
    assert len(got[0]) <= 3 and got[0][-1] in stops
    assert sizes[0] == 4 and sizes[-1] < 4 and sizes == sorted(sizes, reverse=True), sizes
    assert len(sizes) == max(len(r) for r in got), "one prefill and one step per further token, no more"


def test_answer_batch_takes_the_pruned_path_only_where_it_applies(tiny, monkeypatch):
    model, builder = tiny
    assert greedy_supported(model, 0.0, 1.0)
    assert not greedy_supported(model, 0.7, 1.0) and not greedy_supported(model, 0.0, 1.2)
    with monkeypatch.context() as mp:  # several processes: generate keeps sharded weights stepping together
        mp.setattr(torch.distributed, "is_initialized", lambda: True)
        mp.setattr(torch.distributed, "get_world_size", lambda *a: 2)
        assert not greedy_supported(model, 0.0, 1.0)
    settings = GenerationSettings(max_new_tokens=8)
    pruned = answer_batch(model, builder, QUESTIONS, settings, batch_size=3)
    import workbench.chat as chat

    monkeypatch.setattr(chat, "greedy_supported", lambda *a: False)  # the generate path, on the same batches
    assert answer_batch(model, builder, QUESTIONS, settings, batch_size=3) == pruned


def test_a_peft_model_with_its_adapter_unmerged(tiny, tokenizer):
    import copy

    from peft import LoraConfig, get_peft_model

    base, builder = tiny
    with torch.random.fork_rng(devices=[]):  # the test's own draw of the adapter, no change to the global RNG
        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(copy.deepcopy(base), config).eval()
    assert greedy_supported(model, 0.0, 1.0)
    prompts = [builder.generation_prompt(q) for q in QUESTIONS]
    pad = tokenizer.pad_token_id
    got = greedy_batch(model, prompts, [], pad, 6)
    assert got == _generate(model, prompts, [-1], pad, 6)
    with model.disable_adapter():
        assert got != greedy_batch(model, prompts, [], pad, 6), "the adapter changes the answers"
