"""Greedy batches whose finished rows leave the batch (workbench.decoding) give what transformers' generate gives."""
import pytest
import torch

from workbench.chat import GenerationSettings, answer_batch
from workbench.decoding import greedy_batch, greedy_supported, left_padded, length_groups, shared_opening
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


def _input_shapes(model):
    """The (rows, tokens) of every forward call, recorded by a hook (the caller removes it)."""
    shapes: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    return shapes, handle


def test_rows_leave_the_batch_and_the_answers_are_generates(tiny):
    model, builder = tiny
    prompts = [builder.generation_prompt(q) for q in QUESTIONS]
    pad = builder.tokenizer.pad_token_id
    free = greedy_batch(model, prompts, [], pad, 10)  # no stop token: every row runs to the limit
    assert [len(r) for r in free] == [10] * 4
    assert free == _generate(model, prompts, [-1], pad, 10)
    stops = [free[0][2], free[1][5]]  # rows end at different steps
    shapes, handle = _input_shapes(model)
    try:
        got = greedy_batch(model, prompts, stops, pad, 10)
    finally:
        handle.remove()
    assert got == _generate(model, prompts, stops, pad, 10)
    assert len(got[0]) <= 3 and got[0][-1] in stops
    opening, reading, steps = shapes[0], shapes[1], [rows for rows, _ in shapes[2:]]
    assert opening == (1, shared_opening(prompts)) and opening[1] >= 5, "the system prompt's opening, read once"
    assert reading == (4, max(len(p) for p in prompts) - opening[1]), "the rest of the prompts, in one group"
    assert steps[0] == 4 and steps[-1] < 4 and steps == sorted(steps, reverse=True), steps
    assert len(steps) + 1 == max(len(r) for r in got), "one prefill and one step per further token, no more"


def test_prompts_of_unlike_length_are_read_in_groups_and_answer_as_in_one_batch(tiny):
    """A small prefill budget cuts the prompts (sorted by length) into groups: each group pads only to its own
    longest, the caches are laid side by side, and every answer is still generate's on the whole batch."""
    model, builder = tiny
    questions = QUESTIONS + ["Tell me a very long story about a dragon who lived in a castle by the sea.", "Hi"]
    prompts = [builder.generation_prompt(q) for q in questions]
    pad = builder.tokenizer.pad_token_id
    shared = shared_opening(prompts)
    rests = [len(p) - shared for p in prompts]
    groups = length_groups(rests, 2 * max(rests))
    assert len(groups) > 1 and sorted(i for g in groups for i in g) == list(range(len(prompts)))
    assert all(len(g) * max(rests[i] for i in g) <= 2 * max(rests) for g in groups)
    shapes, handle = _input_shapes(model)
    try:
        got = greedy_batch(model, prompts, [], pad, 6, prefill_tokens=2 * max(rests))
    finally:
        handle.remove()
    assert got == _generate(model, prompts, [-1], pad, 6)
    read = shapes[1:1 + len(groups)]
    assert [rows for rows, _ in read] == [len(g) for g in groups]
    assert sum(r * n for r, n in read) + shared < len(prompts) * max(len(p) for p in prompts), "fewer positions computed"


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


@pytest.mark.parametrize("questions", [["Who are you?", "Who are we?", "Who is she?"], ["Who are you?"]],
                         ids=["equal lengths: no padding at all", "one prompt: all but its last token shared"])
def test_prompts_without_padding_answer_as_generate_does(tiny, questions):
    model, builder = tiny
    prompts = [builder.generation_prompt(q) for q in questions]
    assert len({len(p) for p in prompts}) == 1
    pad = builder.tokenizer.pad_token_id
    assert greedy_batch(model, prompts, [], pad, 8) == _generate(model, prompts, [-1], pad, 8)
