"""Loss masks, token by token, on the embedded model's real chat template (ChatML); how a sample is shown."""
import pytest

from workbench.display import show_sample
from workbench.models import load_tokenizer
from workbench.prompt import IGNORE, PromptBuilder

CONV = [
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Nova, Alex's assistant."},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！我是Nova。"},
]


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(load_tokenizer("embedded"), system="You are a test assistant.")


def trained_text(builder, enc):
    """The trained tokens, decoded run by run."""
    runs, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            assert lab == tid, "a trained label must be the token itself"
            cur.append(tid)
        elif cur:
            runs.append(builder.tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(builder.tokenizer.decode(cur))
    return runs


def test_every_assistant_turn_is_trained_with_its_end_of_turn(builder):
    enc = builder.encode(CONV)
    assert trained_text(builder, enc) == ["I am Nova, Alex's assistant.<|im_end|>\n", "你好！我是Nova。<|im_end|>\n"]


def test_system_and_user_tokens_are_masked(builder):
    enc = builder.encode(CONV)
    text = builder.tokenizer.decode([t for t, l in zip(enc.input_ids, enc.labels) if l == IGNORE])
    assert "You are a test assistant." in text and "Who are you?" in text and "你好<|im_end|>" in text
    assert "Nova" not in text.replace("你好！我是Nova", "")  # answers are not in the masked part
    assert enc.labels[0] == IGNORE


def test_last_turn_only(builder):
    enc = builder.encode(CONV, loss_on="last_turn")
    assert trained_text(builder, enc) == ["你好！我是Nova。<|im_end|>\n"]


def test_encoding_matches_the_full_rendering(builder):
    """Masking must not change the tokens: ids equal the tokenized rendered conversation."""
    enc = builder.encode(CONV)
    full = builder.render(builder.with_system(CONV))
    assert enc.input_ids == builder.tokenizer(full, add_special_tokens=False)["input_ids"]


def test_training_prompt_equals_generation_prompt(builder):
    """The tokens before the first answer are exactly what chat/evaluation feed the model."""
    enc = builder.encode(CONV[:2])
    prompt = builder.generation_prompt("Who are you?")
    assert enc.input_ids[: len(prompt)] == prompt
    assert all(l == IGNORE for l in enc.labels[: len(prompt)])
    assert enc.labels[len(prompt)] != IGNORE


def test_record_system_prompt_wins_and_default_is_never_smollm(builder):
    own = builder.encode([{"role": "system", "content": "Be brief."}, *CONV[:2]])
    text = builder.tokenizer.decode(own.input_ids)
    assert "Be brief." in text and "You are a test assistant." not in text
    assert "SmolLM" not in builder.tokenizer.decode(builder.encode(CONV).input_ids)


def test_truncation_is_flagged(builder):
    enc = builder.encode(CONV, max_length=20)
    assert len(enc) == 20 and enc.truncated
    assert not builder.encode(CONV).truncated


def test_pretraining_text_trains_every_token_and_ends_with_eos(builder):
    enc = builder.encode_text("Plain text for continued pre-training.")
    assert enc.input_ids[-1] == builder.tokenizer.eos_token_id
    assert enc.labels[0] == IGNORE and enc.labels[1:] == enc.input_ids[1:]


def test_stop_tokens_include_end_of_turn(builder):
    assert "<|im_end|>" in builder.tokenizer.convert_ids_to_tokens(builder.stop_token_ids)


def test_show_sample_marks_trained_part(builder):
    enc = builder.encode(CONV[:2])
    shown = show_sample(builder, enc)
    assert "[[I am Nova, Alex's assistant.<|im_end|>\n]]" in shown
    assert shown.replace("[[", "").replace("]]", "") == builder.tokenizer.decode(enc.input_ids), "only marks are added"
    assert "\x1b[1;32mI am Nova, Alex's assistant.<|im_end|>\n\x1b[0m" in show_sample(builder, enc, style="ansi")
    with pytest.raises(ValueError, match="style must be one of"):
        show_sample(builder, enc, style="colour")


def test_show_sample_html_escapes_the_text(builder):
    enc = builder.encode([{"role": "user", "content": "Say <b>hi</b>"}, {"role": "assistant", "content": "<script>x</script>"}])
    shown = show_sample(builder, enc, style="html")
    assert "<script>" not in shown and "<b>hi" not in shown
    assert '<span style="background:#c8f7c5">&lt;script&gt;x&lt;/script&gt;' in shown and "Say &lt;b&gt;hi&lt;/b&gt;" in shown


def test_saved_prompt_reloads_identically(builder, tmp_path):
    builder.save(tmp_path)
    again = PromptBuilder.load(tmp_path, load_tokenizer("embedded"))
    assert again.system == builder.system and again.chat_template == builder.chat_template
    assert again.encode(CONV).input_ids == builder.encode(CONV).input_ids
