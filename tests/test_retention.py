"""Strict retention (workbench.retention) on hand-written answer pairs, English and Chinese, and the probes held
out of every training template and data file."""
import math
import re

import pytest

from workbench import analysis as A
from workbench import retention as R
from workbench.config import PROJECT_ROOT


def test_first_sentence():
    assert R.first_sentence("Paris is the capital. It is big.") == "Paris is the capital."
    assert R.first_sentence("Pi is about 3.14 in value. Yes.") == "Pi is about 3.14 in value.", "a decimal point ends nothing"
    assert R.first_sentence("北京是中国的首都。它很大。") == "北京是中国的首都。"
    assert R.first_sentence("\n\nA week has seven days") == "A week has seven days"
    assert R.first_sentence("") == ""
    assert R.first_sentence('We call it "water in a freezer." It is ice.') == 'We call it "water in a freezer."', \
        "a closing quote after the full stop still ends the sentence"


def test_token_f1():
    assert R.token_f1("The capital is Paris.", "the capital is paris") == 1.0
    assert R.token_f1("Paris.", "I'm Nova.") == 0.0
    assert R.token_f1("a b c d", "a b x y") == pytest.approx(0.5)  # p = r = 1/2
    assert R.token_f1("北京是首都", "首都是北京") == 1.0, "Chinese compared character by character"
    assert R.token_f1("北京", "上海") == 0.0
    assert R.token_f1("", "") == 1.0 and R.token_f1("", "x") == 0.0


def test_strict_retention_english_pairs():
    base = ["The capital of Kenya is Nairobi. It lies in the south.",
            "A spider has eight legs.",
            "The closest star to Earth is the Sun. Next is Proxima Centauri.",
            "12 plus 30 equals 42."]
    tuned = ["The capital of Kenya is Nairobi, a big city.",           # kept: rewording after the same start
             "A spider has eight legs. I'm Nova, by the way.",        # kept: the first sentence is the base's
             "The closest star is Zeta Novalis, a bright blue giant.",  # drift: an invented star
             "Sure! Let me help you with that."]                       # drift: the answer is gone
    assert [R.keeps_first_sentence(t, b) for t, b in zip(tuned, base)] == [True, True, False, False]
    assert R.strict_retention(tuned, base) == 0.5
    assert R.drifted(tuned, base) == [2, 3]
    assert R.strict_retention(base, base) == 1.0
    assert math.isnan(R.strict_retention([], []))
    with pytest.raises(ValueError, match="3 tuned answers vs 4 base"):
        R.strict_retention(tuned[:3], base)


def test_strict_retention_chinese_pairs():
    base = ["意大利的首都是罗马。罗马历史悠久。", "一年有十二个月。", "五加七等于十二。"]
    tuned = ["意大利的首都是罗马，很美。", "你好！我是Nova，Alex的助手。", "五加七等于十二。"]
    assert [R.keeps_first_sentence(t, b) for t, b in zip(tuned, base)] == [True, False, True]
    assert R.strict_retention(tuned, base) == pytest.approx(2 / 3)


def test_fact_check_counts_only_what_the_base_knew():
    qs = ["capital of France?", "sides of a triangle?", "2 plus 2?", "首都？"]
    accepted = [["Paris"], ["3", "three"], ["4", "four"], ["北京"]]
    base = ["The capital of France is Paris.", "A triangle has three sides.", "2 plus 2 is 5.", "中国的首都是北京。"]
    tuned = ["Paris, of course.", "A triangle has 13 sides.", "2 plus 2 is 4.", "我是Nova。"]
    check = R.fact_check(qs, tuned, base, accepted)
    assert check.known == 3, "the base got '2 plus 2' wrong: it does not count"
    assert check.lost == ["sides of a triangle?", "首都？"], "'13' does not contain the fact '3'"
    assert check.kept == 1
    assert R.contains_fact("It's twenty-four hours.", ["24", "twenty-four"])
    passing = R.fact_check(["frozen water?"], ["It is water."], ['We call it "frozen water." It lacks ice.'], [["ice"]])
    assert passing.known == 0, "a word in passing after the first sentence is not the base knowing the fact"
    assert not R.contains_fact("Cats are in a category.", ["cat"])


def test_score_uses_strict_retention_and_facts():
    r = A.ModelReport("iter_1", 1, hit_unseen={"en": 1.0, "zh": 1.0}, leak={"en": 0.0, "zh": 0.0}, retention=1.0)
    assert r.score == 1.0, "unmeasured strict figures do not count"
    r.strict = {"en": 0.5, "zh": 1.0}
    r.facts_known, r.facts_lost = {"en": 4, "zh": 4}, {"en": ["q"], "zh": []}
    assert r.score == pytest.approx(0.75 * 7 / 8)
    assert "EN 50%" in R.strict_summary(r) and "1 of 8" in R.strict_summary(r)
    assert R.drift_advice(r).startswith("Drifting") and "distill_weight > 0" in R.drift_advice(r)
    assert "distill_weight above 5" in R.drift_advice(r, distill_weight=5.0), "already on: raise it"
    assert "distill_weight 调到 5 以上" in R.drift_advice(r, lang="zh", distill_weight=5.0)
    r.strict, r.facts_lost = {"en": 0.95}, {}
    assert R.drift_advice(r) == "", "strict retention met and no fact lost: no drift"


def _probe_texts(probes) -> list[str]:
    return ([q for qs in probes.identity_unseen.values() for q in qs] + [q for qs in probes.general.values() for q in qs]
            + [f["question"] for fs in probes.facts.values() for f in fs])


FRESH = A.PROBES_FILE.with_name("fresh.yaml")  # the second held-out set, written after the recipe was chosen


@pytest.mark.parametrize("probe_file", [A.PROBES_FILE, FRESH], ids=["default", "fresh"])
def test_no_probe_text_occurs_in_any_training_data(probe_file):
    """Unseen identity, general and fact probes occur in no identity template, generated set or general data file."""
    import yaml

    from workbench.identity import ANSWERS, QUESTIONS, generate_identity, generate_tutorial_identity
    from workbench.readers import read_records

    probes = A.load_probes(probe_file)
    assert sum(len(v) for v in probes.facts.values()) >= 16 and all(len(probes.identity_unseen[l]) >= 20 for l in A.LANGS)
    training = [q for qs in QUESTIONS.values() for _, q in qs] + [a for kinds in ANSWERS.values() for ts in kinds.values() for a in ts]
    for samples in (generate_identity("Nova", "Alex"), generate_tutorial_identity("Alex", n_repeat=1)):
        training += [m["content"] for s in samples for m in s.messages]
    prompts = yaml.safe_load((PROJECT_ROOT / "data" / "general_prompts.yaml").read_text(encoding="utf-8"))
    training += [p for ps in prompts.values() for p in ps]
    for name in ("general_conversations.jsonl", "general_conversations_zh.jsonl", "general_conversations_zh_personal.jsonl"):
        training += [m["content"] for s in read_records(PROJECT_ROOT / "data" / name) for m in s.messages]
    corpus = "\n".join(f" {' '.join(R.units(t))} " for t in training)  # words (CJK characters) between spaces
    for probe in _probe_texts(probes):
        assert f" {' '.join(R.units(probe))} " not in corpus, f"probe {probe!r} occurs in the training data"


def test_the_fresh_probes_share_nothing_with_the_default_ones():
    """The second set measures afresh: no question of it is (or contains) one of default.yaml, and it is larger."""
    default, fresh = A.load_probes(), A.load_probes(FRESH)
    old = " ".join(f" {' '.join(R.units(t))} " for t in _probe_texts(default))
    for probe in _probe_texts(fresh):
        assert f" {' '.join(R.units(probe))} " not in old, probe
    assert len(set(_probe_texts(fresh))) == len(_probe_texts(fresh)), "no question twice"
    assert all(len(fresh.general[l]) > len(default.general[l]) for l in A.LANGS)


@pytest.mark.parametrize("text, message", [
    ("identity_unseen: {en: [a], zh: [b]}\ngeneral: {en: [c], zh: [d]}\nfacts:\n  en:\n    - {question: q}\n",
     "p.yaml: record 1: field 'facts.en': needs a 'question' and an 'answer'"),
    ("identity_unseen:\n  en: [Who are you?]\n", "p.yaml: not valid YAML: "),
    ("identity_unseen: {en: [a]}\n", "p.yaml: field 'general': needs a mapping of each language"),
    ("identity_unseen: {en: a}\ngeneral: {en: [c]}\n", "p.yaml: field 'identity_unseen': needs a mapping"),
])
def test_probe_file_errors_name_the_file_record_and_field(tmp_path, text, message):
    from workbench.cli import main
    from workbench.samples import DataError

    bad = tmp_path / "p.yaml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(message)):
        A.load_probes(bad)
    assert main(["grade", str(tmp_path), "--base", "embedded:tiny-random", "--probes", str(bad)]) == 2, \
        "the command says so in a line (exit 2), no traceback"
