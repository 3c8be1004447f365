"""The general conversation data (data/general_conversations.jsonl) and the script that makes it.

Fast: the shipped file is only read, and the end-to-end run of the script uses
the tiny random model with a few tokens per answer.
"""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from workbench.readers import read_records
from workbench.identity import QUESTIONS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_general_data.py"
DATA = ROOT / "data" / "general_conversations.jsonl"
PROMPTS = ROOT / "data" / "general_prompts.yaml"
CJK = re.compile(r"[\u4e00-\u9fff]")
IDENTITY_QUESTION = re.compile(
    r"\bwho (are|made|created|built|trained) you\b|\byour (name|owner|creator|maker)\b|\byourself\b|\bare you\b|"
    r"你是谁|你叫|你的名字|你是.{0,6}(助手|机器人|模型)|谁(创造|开发|训练)了你|你的主人|自我介绍", re.IGNORECASE)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_general_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def samples():
    return read_records(DATA, format="xtuner")


def pairs(samples):
    return [(s.messages[0]["content"], s.messages[1]["content"]) for s in samples]


# ---------------------------------------------------------------------------
# The prompt list
# ---------------------------------------------------------------------------
def test_prompt_file_has_both_groups_and_no_identity_questions(script):
    raw = yaml.safe_load(PROMPTS.read_text(encoding="utf-8"))
    assert set(raw) == {"en", "zh"}
    assert len(raw["en"]) >= 80 and len(raw["zh"]) >= 40
    prompts = script.load_prompts(PROMPTS)  # raises on duplicates and empty prompts
    assert len(prompts) == len(raw["en"]) + len(raw["zh"])
    assert all(CJK.search(p) for lang, p in prompts if lang == "zh")
    assert not any(CJK.search(p) for lang, p in prompts if lang == "en")
    assert all(len(p) <= 100 for _, p in prompts)
    identity = {q.lower().strip("?？.。! ") for items in QUESTIONS.values() for _, q in items}
    for _, p in prompts:
        assert p.lower().strip("?？.。! ") not in identity, p
        assert not IDENTITY_QUESTION.search(p), p


def test_load_prompts_rejects_duplicates_and_other_groups(script, tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("en: ['Hi there?']\nzh: ['Hi there?']\n", encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate"):
        script.load_prompts(dup)
    other = tmp_path / "other.yaml"
    other.write_text("fr: ['Bonjour ?']\n", encoding="utf-8")
    with pytest.raises(ValueError, match="groups"):
        script.load_prompts(other)
    assert script.limit_prompts([("en", "a"), ("en", "b"), ("zh", "c"), ("zh", "d")], 1) == [("en", "a"), ("zh", "c")]


# ---------------------------------------------------------------------------
# The shipped data
# ---------------------------------------------------------------------------
def test_shipped_data_is_xtuner_without_system(samples):
    assert len(samples) >= 60
    for s in samples:
        assert [m["role"] for m in s.messages] == ["user", "assistant"]
        assert s.messages[1]["content"].strip() == s.messages[1]["content"] != ""
    text = DATA.read_text(encoding="utf-8")
    assert CJK.search(text), "Chinese must be written as is (ensure_ascii=False), not as \\u escapes"
    for line in text.splitlines():
        record = json.loads(line)
        assert list(record) == ["conversation"]
        assert len(record["conversation"]) == 1
        assert set(record["conversation"][0]) == {"input", "output"}  # no system field


def test_shipped_data_has_both_languages_and_known_unique_prompts(samples, script):
    prompts = [p for p, _ in pairs(samples)]
    assert len(set(prompts)) == len(prompts)
    known = {p for _, p in script.load_prompts(PROMPTS)}
    assert set(prompts) <= known
    zh = [p for p in prompts if CJK.search(p)]
    # The 135M model's Chinese is mostly garbage, so few Chinese prompts survive the script's checks (2 of 45 in
    # the shipped file); both languages must still be present.
    assert len(zh) >= 1 and len(prompts) - len(zh) >= 60


def test_shipped_answers_have_no_identity_talk(samples, script):
    for prompt, answer in pairs(samples):
        assert not re.search(r"smol\s*lm|hugging\s*face", answer, re.IGNORECASE), (prompt, answer)
        assert not script.IDENTITY_PATTERNS.search(answer), (prompt, answer)


def test_shipped_answers_pass_the_scripts_checks(samples, script):
    """Every kept answer would be kept unchanged by the script's checks (no loops, right language, ends cleanly)."""
    for prompt, answer in pairs(samples):
        lang = "zh" if CJK.search(prompt) else "en"
        verdict = script.check_answer(lang, prompt, answer, finished=True)
        assert verdict.text == answer, (prompt, verdict.reason, verdict.detail)


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------
def test_check_answer_drops_bad_answers(script):
    check = script.check_answer
    assert check("en", "Why is the sky blue?", "  \n ", True).reason == "empty"
    assert check("en", "What is 2+2?", "I'm SmolLM, a model by Hugging Face. 2+2=4.", True).reason == "identity"
    assert check("en", "What is 2+2?", "As SmolLM2 I say 4.", True).reason == "identity"
    assert check("en", "Hi?", "The cat sat.\nThe cat sat.\nThe cat sat.\n", True).reason == "repetition"
    assert check("en", "Hi?", "lessness" * 20, True).reason == "repetition"
    looping = "it is a good day and " * 4
    assert check("en", "Hi?", looping, True).reason == "repetition"
    assert check("zh", "为什么天空是蓝色的？", "The sky is blue because of Rayleigh scattering.", True).reason == "language"
    assert check("zh", "把“我爱学习”翻译成英文。", "I love learning.", True).text == "I love learning."
    assert check("en", "Why is the sky blue?", "因为瑞利散射，天空看起来是蓝色的。", True).reason == "language"
    assert check("en", "Hi?", "Hello \ufffd there.", True).reason == "garbled"
    good = "The sky looks blue because air scatters blue light more than red light."
    assert check("en", "Why is the sky blue?", good, True).text == good


def test_truncated_answers_are_trimmed_to_the_last_sentence(script):
    check = script.check_answer
    text = "Water boils at 100 degrees. At high altitude it boils at a lower temperature because the air"
    verdict = check("en", "When does water boil?", text, finished=False)
    assert verdict.trimmed and verdict.text == "Water boils at 100 degrees. At high altitude it boils at a lower temperature because the air"[:27]
    assert check("en", "When does water boil?", text, finished=True).text == text  # ended by itself: kept as is
    rambling = "Water boils. Then a long clause about boiling water that goes on and on without ever reaching the end of it"
    assert check("en", "When does water boil?", rambling, finished=False).reason == "truncated"  # too little left
    assert check("en", "When does water boil?", "Water boils when it is hot and", finished=False).reason == "truncated"
    zh = "彩虹是阳光经过水滴折射形成的。雨后天空中常常可以看到彩虹，因为空气中"
    assert check("zh", "彩虹是怎么形成的？", zh, finished=True).text == zh
    assert check("zh", "彩虹是怎么形成的？", zh, finished=False).reason == "truncated"  # Chinese is never trimmed
    assert script.trim_to_sentence(zh) == "彩虹是阳光经过水滴折射形成的。"


def test_trim_to_sentence_respects_lists_numbers_and_code(script):
    trim = script.trim_to_sentence
    assert trim("Tips:\n1. Sleep early.\n2. Drink water\n3. Eat") == "Tips:\n1. Sleep early.\n2. Drink water"
    assert trim("Pi is 3.14 and e is 2.71. The golden ratio is about 1.6") == "Pi is 3.14 and e is 2.71."
    assert trim("Use it, e.g. daily. Then") == "Use it, e.g. daily."
    assert trim("Here it is.\n```python\nprint('hi.')\nx = 1") == "Here it is."
    assert trim("He said \"Stop.\" Then he") == "He said \"Stop.\""
    assert trim("no sentence end at all") == ""


# ---------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------
def test_script_end_to_end_on_tiny_model(script, tmp_path, capsys):
    out = tmp_path / "general.jsonl"
    summary = script.main(["--model", "embedded:tiny-random", "--limit", "3", "--max-new-tokens", "8",
                           "--out", str(out), "--quiet"])
    assert summary.n_prompts == 6  # 3 per language
    assert summary.n_kept + summary.n_dropped == summary.n_prompts
    assert sum(summary.dropped.values()) == summary.n_dropped
    assert {lang: c["prompts"] for lang, c in summary.per_lang.items()} == {"en": 3, "zh": 3}
    assert sum(c["kept"] for c in summary.per_lang.values()) == summary.n_kept
    assert out.exists()
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == summary.n_kept
    assert all(list(r) == ["conversation"] and set(r["conversation"][0]) == {"input", "output"} for r in lines)
    if lines:
        assert len(read_records(out, format="xtuner")) == summary.n_kept
    printed = capsys.readouterr().out
    assert f"prompts: {summary.n_prompts}" in printed and "dropped:" in printed

    # An existing output is never overwritten without --overwrite (checked before any model is loaded).
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="already exists"):
        script.main(["--model", "embedded:tiny-random", "--limit", "1", "--out", str(out), "--quiet"])
    assert out.read_bytes() == before


def test_split_heldout_holds_out_every_nth_sample(script):
    train, held = script.split_heldout(list(range(15)), every=7)
    assert held == [6, 13] and train == [i for i in range(15) if i not in (6, 13)]
    assert script.split_heldout(list(range(15)), every=7) == (train, held)
