"""Strict retention: does the tuned model still say what the base model said, and still know what it knew?

Two measures a strict reader accepts, beside the similarity scores of `workbench.analysis`:

- first-sentence retention: the first sentence of the tuned answer against the base model's
  first sentence, token-F1 >= 0.5 (words for English, characters for Chinese), as a share
  of the everyday questions, per language. A whole-answer similarity hides a first sentence
  that turned into an invented fact; the first sentence is where the answer is.
- fact check: on questions with one short right answer (the probe file's `facts`), a fact
  counts only when the base model's first sentence states it ("known": a word in passing, as
  in "...frozen solid due to the absence of ice", is no answer), and is "lost" when the tuned
  answer no longer contains it anywhere.

Pure functions on strings (no model): the analysis calls them on the answers it generated.
The tokenisation and F1 are a dozen lines written here on purpose: a library (e.g.
`evaluate`'s SQuAD F1) drops CJK characters or needs a download of its metric script.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

STRICT_F1 = 0.5  # a first sentence is kept when its token-F1 with the base's is at least this
# A sentence ends at . ! ? followed by a space or the end (so "3.5" and "e.g." inside words stay), also
# when a closing quote or bracket follows the mark (`... "a freezer." It is`), at Chinese 。！？, or at a
# line break.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)]))(?=\s|$)|(?<=[。！？!?；;])|\n")


def units(text: str) -> list[str]:
    """Words for alphabetic text (lower-cased, digits kept), single characters for CJK."""
    return re.findall(r"[\u4e00-\u9fff]|[a-z0-9]+", text.lower())


def token_f1(a: str, b: str) -> float:
    """Token-overlap F1 (bag of `units`) of two texts, 0-1; two empty texts agree."""
    ua, ub = units(a), units(b)
    if not ua or not ub:
        return float(not ua and not ub)
    common = sum(min(ua.count(u), ub.count(u)) for u in set(ua))
    if common == 0:
        return 0.0
    p, r = common / len(ua), common / len(ub)
    return 2 * p * r / (p + r)


def first_sentence(text: str) -> str:
    """The first non-empty sentence of an answer (the whole answer when it has no sentence end)."""
    for part in _SENTENCE_END.split(text.strip()):
        if units(part):
            return part.strip()
    return text.strip()


def keeps_first_sentence(tuned: str, base: str, threshold: float = STRICT_F1) -> bool:
    """The tuned answer's first sentence is, token for token, mostly the base answer's (F1 >= threshold)."""
    return token_f1(first_sentence(tuned), first_sentence(base)) >= threshold


def strict_retention(tuned: list[str], base: list[str], threshold: float = STRICT_F1) -> float:
    """Share of answer pairs whose first sentences agree (nan for no pairs)."""
    if len(tuned) != len(base):
        raise ValueError(f"strict retention compares answer pairs: {len(tuned)} tuned answers vs {len(base)} base answers")
    if not tuned:
        return float("nan")
    return sum(keeps_first_sentence(t, b, threshold) for t, b in zip(tuned, base)) / len(tuned)


def contains_fact(answer: str, accepted: list[str]) -> bool:
    """The answer contains one of the accepted short answers (case-insensitive; whole words for alphanumerics)."""
    text = answer.lower()
    for a in accepted:
        a = str(a).lower().strip()
        if not a:
            continue
        if re.fullmatch(r"[a-z0-9 .'-]+", a):  # "7" must not match "17", "cat" not "category"
            if re.search(rf"(?<![a-z0-9]){re.escape(a)}(?![a-z0-9])", text):
                return True
        elif a in text:
            return True
    return False


@dataclass
class FactCheck:
    """Facts of one language: how many the base model knew, and which of those the tuned model lost."""

    known: int
    lost: list[str]  # the questions whose fact was lost

    @property
    def kept(self) -> int:
        return self.known - len(self.lost)


def fact_check(questions: list[str], tuned: list[str], base: list[str], accepted: list[list[str]]) -> FactCheck:
    """Only facts the base model got right count (its first sentence states them); a fact is lost when the tuned
    answer no longer contains it."""
    known = [(q, t, acc) for q, t, b, acc in zip(questions, tuned, base, accepted) if contains_fact(first_sentence(b), acc)]
    lost = [q for q, t, acc in known if not contains_fact(t, acc)]
    return FactCheck(len(known), lost)


def drifted(tuned: list[str], base: list[str], threshold: float = STRICT_F1) -> list[int]:
    """Indexes of the pairs whose first sentences disagree (for showing examples)."""
    return [i for i, (t, b) in enumerate(zip(tuned, base)) if not keeps_first_sentence(t, b, threshold)]


def strict_summary(report, lang: str = "en") -> str:
    """One sentence on a model report's strict measures (`strict`, `facts_known`, `facts_lost`), in `lang`; "" when unmeasured."""
    from workbench.i18n import t

    langs = [probe for probe, v in report.strict.items() if v == v]  # v == v: not nan
    if not langs:
        return ""
    parts = ", ".join(f"{probe.upper()} {report.strict[probe]:.0%}" for probe in langs)
    text = t("strict.summary", lang, f1=STRICT_F1, parts=parts)
    known = sum(report.facts_known.values())
    if known:
        lost = [q for qs in report.facts_lost.values() for q in qs]
        text += t("strict.facts", lang, lost=len(lost), known=known) + (f" ({'; '.join(lost[:3])})" if lost else "")
    return text + ("。" if lang == "zh" else ".")


def drift_advice(report, target: float = 0.9, lang: str = "en", distill_weight: float = 0.0) -> str:
    """A remedy when a model learned its identity but drifted from the base's everyday answers; "" otherwise.
    `distill_weight`: the run's, so that the remedy is to raise it when it is already on."""
    from workbench.i18n import t

    en = report.strict.get("en", float("nan"))
    lost = sum(len(v) for v in report.facts_lost.values())
    if not (en < target or lost):  # nan (unmeasured) and no fact lost: nothing to say
        return ""
    remedy = t("diag.distill_more", lang, weight=distill_weight) if distill_weight > 0 else t("diag.distill_on", lang)
    return t("diag.drift", lang, strict=f"{en:.0%}", lost=lost, remedy=remedy)
