"""Chat on the tiny random model: greedy answers, stop tokens, streaming, the terminal loop, compare, loading."""
import copy
import io

import pytest
import torch

import workbench.chat as chat_mod
from workbench.chat import GenerationSettings, answer, chat_loop, compare, load_chat_model
from workbench.config import DEFAULT_SYSTEM, load_recipe
from workbench.convert import export_trained, merge
from workbench.models import TINY_MODEL, load_model, load_tokenizer
from workbench.prompt import PromptBuilder, builder_for

QUESTION = "Who are you?"
TRAINED_SYSTEM = "You are Nova, the assistant of Alex (chat test prompt)."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_MODEL)


@pytest.fixture(scope="module")
def builder(tok):
    return PromptBuilder(tok)


@pytest.fixture(scope="module")
def base():
    return load_model(TINY_MODEL, device="cpu")


@pytest.fixture(scope="module")
def cfg():
    return load_recipe("smollm2_135m_tiny_smoke").replace(system=TRAINED_SYSTEM)


@pytest.fixture(scope="module")
def tuned(cfg):
    """The tiny model with a LoRA adapter whose B matrices are random (so, unlike a fresh adapter, it changes the model)."""
    from peft import get_peft_model

    from workbench.models import lora_config

    model = get_peft_model(load_model(TINY_MODEL, device="cpu"), lora_config(cfg))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def adapter_dir(tuned, cfg, tmp_path_factory):
    """The tuned model saved the way training saves its adapter (with prompt.json holding TRAINED_SYSTEM)."""
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    return export_trained(tuned, builder_for(cfg, load_tokenizer(TINY_MODEL)), cfg, folder, fp32=True)


def greedy_ids(model, builder, question, n, history=None) -> list[int]:
    """Greedy decoding by hand (argmax of a full forward pass each step), stopping at the builder's stop tokens."""
    ids = builder.generation_prompt(question, history)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in builder.stop_token_ids:
                break
            out.append(nxt)
    return out


class ForceTokenAfter:
    """A forward hook that makes `token` the argmax of the last position from the k-th forward call on."""

    def __init__(self, model, token: int, k: int):
        self.token, self.k, self.calls = token, k, 0
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # what generate runs
        self.handle = inner.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls >= self.k:
            logits = output.logits
            logits[:, -1, self.token] = logits[:, -1].max() + 100.0
        return output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------
# answer
# ---------------------------------------------------------------------------
def test_greedy_answer_is_deterministic_and_is_the_argmax_chain(tuned, builder):
    settings = GenerationSettings(max_new_tokens=10)
    first = answer(tuned, builder, QUESTION, settings=settings)
    assert answer(tuned, builder, QUESTION, settings=settings) == first
    ids = greedy_ids(tuned, builder, QUESTION, 10)
    assert len(ids) == 10 and len(set(ids)) > 3, "the tuned tiny model says varied things, so the comparison means something"
    assert first == builder.tokenizer.decode(ids, skip_special_tokens=True).strip()
    history = [("Hi", "Hello!")]
    with_history = answer(tuned, builder, QUESTION, history, settings)
    assert with_history == builder.tokenizer.decode(greedy_ids(tuned, builder, QUESTION, 10, history), skip_special_tokens=True).strip()
    assert with_history != first, "the history is part of the prompt"


@pytest.fixture(scope="module")
def two_stop_builder(tok):
    """A builder whose EOS (<|endoftext|>) differs from the template's end-of-turn token (<|im_end|>).

    The model's generation_config only knows <|im_end|>, so halting at <|endoftext|> proves
    that `answer` passes the builder's stop tokens to generate.
    """
    t = copy.deepcopy(tok)
    t.eos_token = "<|endoftext|>"
    b = PromptBuilder(t)
    assert b.stop_token_ids == [t.convert_tokens_to_ids("<|endoftext|>"), t.convert_tokens_to_ids("<|im_end|>")]
    return b


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("stream", [False, True])
def test_answer_stops_at_each_stop_token(tuned, two_stop_builder, which, stream):
    b = two_stop_builder
    stop = b.stop_token_ids[which]
    free = greedy_ids(tuned, b, QUESTION, 3)
    assert len(free) == 3 and stop not in free, "the unforced model runs on"
    pieces = []
    with ForceTokenAfter(tuned, stop, k=4) as hook:
        text = answer(tuned, b, QUESTION, settings=GenerationSettings(max_new_tokens=50),
                      on_text=pieces.append if stream else None)
    assert hook.calls == 4, "generation halts right after the stop token, far before max_new_tokens"
    assert text and text == b.tokenizer.decode(free, skip_special_tokens=True).strip()
    if stream:
        assert "".join(pieces).strip() == text


def test_a_token_that_is_not_a_stop_token_does_not_halt(tuned, builder):
    endoftext = builder.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert endoftext not in builder.stop_token_ids  # the plain builder stops at <|im_end|> only
    with ForceTokenAfter(tuned, endoftext, k=2) as hook:
        answer(tuned, builder, QUESTION, settings=GenerationSettings(max_new_tokens=7))
    assert hook.calls == 7


def test_streamed_text_concatenates_to_the_answer(base, tuned, builder):
    for model in (base, tuned):
        settings = GenerationSettings(max_new_tokens=16)
        pieces = []
        streamed = answer(model, builder, QUESTION, settings=settings, on_text=pieces.append)
        assert all(isinstance(p, str) for p in pieces)
        assert "".join(pieces).strip() == streamed
        assert streamed == answer(model, builder, QUESTION, settings=settings)


def test_answer_restores_training_mode(tuned, builder):
    tuned.train()
    try:
        answer(tuned, builder, QUESTION, settings=GenerationSettings(max_new_tokens=2))
        assert tuned.training
    finally:
        tuned.eval()


# ---------------------------------------------------------------------------
# chat_loop
# ---------------------------------------------------------------------------
def test_chat_loop_keeps_history_and_resets(monkeypatch, base, builder):
    calls = []

    def fake_answer(model, b, question, history=None, settings=None, on_text=None):
        calls.append((question, list(history or [])))
        reply = f"reply {len(calls)}"
        on_text(reply)
        return reply

    monkeypatch.setattr(chat_mod, "answer", fake_answer)
    out = io.StringIO()
    history = chat_loop(base, builder, GenerationSettings(), stdin=io.StringIO("first\nsecond\n\nRESET\nthird\nEXIT\nnever\n"),
                        stdout=out)
    assert calls == [("first", []), ("second", [("first", "reply 1")]), ("third", [])]
    assert history == [("third", "reply 3")]
    text = out.getvalue()
    assert "(history cleared)" in text and "RESET" in text.splitlines()[0]
    assert text.count(">>> ") == 6  # one prompt per line read up to EXIT (the blank one included); "never" is not read
    assert "reply 1" in text and "reply 3" in text


def test_chat_loop_with_the_model_matches_answer(tuned, builder):
    settings = GenerationSettings(max_new_tokens=5)
    out = io.StringIO()
    history = chat_loop(tuned, builder, settings, stdin=io.StringIO("hello\nhow are you\nreset\nWho are you?\n"), stdout=out)
    assert len(history) == 1  # the lower-case reset counts; end of input quits
    assert history == [("Who are you?", answer(tuned, builder, "Who are you?", settings=settings))]
    first = answer(tuned, builder, "hello", settings=settings)
    second = answer(tuned, builder, "how are you", [("hello", first)], settings)
    assert first and second and first in out.getvalue() and second in out.getvalue()


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------
def test_compare_returns_one_row_per_prompt_and_one_column_per_model(base, tuned, builder):
    prompts = ["Who are you?", "What can you do?", "你是谁？"]
    settings = GenerationSettings(max_new_tokens=6)
    table = compare(prompts, {"base": (base, builder), "tuned": (tuned, builder)}, settings, progress=False)
    assert list(table.columns) == ["prompt", "base", "tuned"]
    assert len(table) == len(prompts) and list(table["prompt"]) == prompts
    for i, p in enumerate(prompts):
        assert table["base"][i] == answer(base, builder, p, settings=settings)
        assert table["tuned"][i] == answer(tuned, builder, p, settings=settings) != ""


# ---------------------------------------------------------------------------
# load_chat_model
# ---------------------------------------------------------------------------
def prompt_text(builder) -> str:
    return builder.tokenizer.decode(builder.generation_prompt(QUESTION))


@torch.no_grad()
def last_logits(model, builder):
    return model(input_ids=torch.tensor([builder.generation_prompt(QUESTION)])).logits[0, -1]


def test_load_chat_model_uses_the_adapters_prompt_and_weights(adapter_dir, tuned, base, builder):
    model, b = load_chat_model(TINY_MODEL, adapter=str(adapter_dir), device="cpu")
    assert b.system == TRAINED_SYSTEM and TRAINED_SYSTEM in prompt_text(b)
    assert b.chat_template == builder.chat_template and b.stop_token_ids == builder.stop_token_ids
    assert torch.allclose(last_logits(model, b), last_logits(tuned, b), atol=1e-5)
    assert (last_logits(model, b) - last_logits(base, b)).abs().max() > 1e-2

    _, overridden = load_chat_model(TINY_MODEL, adapter=str(adapter_dir), device="cpu", system="Be terse.")
    assert overridden.system == "Be terse."
    assert "Be terse." in prompt_text(overridden) and TRAINED_SYSTEM not in prompt_text(overridden)
    assert overridden.chat_template == b.chat_template

    _, plain = load_chat_model(TINY_MODEL, device="cpu")
    assert plain.system == DEFAULT_SYSTEM


def test_load_chat_model_reads_the_prompt_saved_with_a_merged_model(adapter_dir, tuned, tmp_path):
    merged = merge(TINY_MODEL, adapter_dir, tmp_path / "merged")
    model, b = load_chat_model(str(merged), device="cpu")
    assert b.system == TRAINED_SYSTEM
    assert torch.allclose(last_logits(model, b), last_logits(tuned, b), atol=1e-4)
