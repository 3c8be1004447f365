"""The unlikelihood term: keeps the identity out of everyday answers (Config.unlikelihood_weight).

Cross-entropy on everyday rows only raises the probability of their own answers. A small model
that reads identity answers opening with "I'm Nova" or "我是Nova" several times per epoch still
opens many everyday answers the same way, above all in the language with less everyday data.
Unlikelihood training (Welleck et al., 2019, "Neural Text Generation with Unlikelihood
Training") adds, at chosen positions, -log(1 - p) with p the probability the model gives to
tokens it must not produce there. Here the tokens come from the run's own identity:

* at the first token of an everyday answer: every token an identity answer opens with (the
  first answer token of each generated identity pair, both languages) and the names;
* at the other trained tokens of an everyday answer: the assistant's and owner's names, where a
  single token spells one (" Nova", "Alex"): a name split into common pieces ("N", "ova") is not
  penalised mid-answer, which would penalise those pieces in every word.

A source marked `unlikelihood: names` gets the names alone, at every token, first included: the
base model's own English answers open with "I" as the identity does, and pushing "I" down there
cost the English identity (measured); the names alone still stop "I'm glad... I'm Nova" in them.

On an identity answer (a source marked `roles: true`) the term has a third use, the role contrast:
where the answer has the first token of one name, the first tokens of the other name are pushed down
("我叫Alex" from Nova, Alex's assistant, is the 135M model's usual mix-up; "N" of "Nova" is pushed
down where the answer has "Alex"). Nothing else in an identity answer is penalised.

Negative twins (Config.negative_weight) reach further, after He and Glass (2020, "Negative
Training for Neural Dialogue Response Generation"): each marked everyday row gets a twin, its
question answered by an identity answer of its language; the tokens of that answer up to the first
piece of a name ("我", "是", "N" of "我是Nova") are pushed down in their own context (-log(1 - p),
p the token's probability), and nothing of the twin is learned. The per-token term only sees the
everyday answers' own contexts, where the model has not yet said "我"; the twin also pushes down
"是" after "我" and "N" after "我是", the steps a leak is made of. Pieces that spelling makes
certain in any context ("ova" after "N", the second byte of a character split in two) are left
alone: pushing them down unlearns the name or the character itself.

The target token itself is never penalised, so an everyday answer that rightly opens with "I"
keeps its cross-entropy gradient. The term reads the logits the cross-entropy already has: no
extra forward. Written here because no maintained library ships it for a causal-LM trainer (TRL
has no unlikelihood loss); it is a few tensor operations.
"""
from __future__ import annotations

import dataclasses
import functools
import random
import re
from dataclasses import dataclass

import torch

from workbench import identity
from workbench.packing import ROLES, unlikelihood_rows
from workbench.prompt import IGNORE, PromptBuilder
from workbench.samples import Sample

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True)
class IdentityTokens:
    """The token ids the term pushes down: `names` everywhere in an everyday answer, `openings` (which include
    the names) at its first token; `assistant` and `owner`: the first tokens of each name's spellings (with and
    without a leading space), rivals of each other in an identity answer."""

    names: tuple[int, ...]
    openings: tuple[int, ...]
    assistant: tuple[int, ...] = ()
    owner: tuple[int, ...] = ()


def identity_tokens(builder: PromptBuilder, assistant_name: str, owner_name: str) -> IdentityTokens:
    """The penalised tokens of a run: single-token spellings of both names, and the identity answers' first tokens."""
    tok = builder.tokenizer
    names, firsts = set(), {}
    for who in (assistant_name, owner_name):
        for spelling in (who, " " + who):
            ids = tok.encode(spelling, add_special_tokens=False)
            firsts.setdefault(who, set()).add(ids[0])
            if len(ids) == 1:
                names.add(ids[0])
    assistant, owner = firsts[assistant_name], firsts[owner_name]
    shared = assistant & owner  # names that open with the same token cannot be told apart by it
    openings = set(names)
    for lang in identity.LANGUAGES:
        for question, answer in identity.identity_pairs(assistant_name, owner_name, lang):
            enc = builder.encode([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
            openings.add(next(x for x in enc.labels if x != IGNORE))
    return IdentityTokens(tuple(sorted(names)), tuple(sorted(openings)),
                          tuple(sorted(assistant - shared)), tuple(sorted(owner - shared)))


def unlikelihood_sum(logits: torch.Tensor, targets: torch.Tensor, marks: torch.Tensor, tokens: IdentityTokens,
                     at: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the marked positions of -log(1 - p), p the probability of the penalised tokens there:
    (the everyday and role positions' sum, the negative twins' sum), weighted apart in training
    (unlikelihood_weight, negative_weight).

    logits: [n, vocab] (float32), targets: [n] (the next tokens), marks: [n] with 2 at the first
    token of an everyday answer, 1 at its other trained tokens, ROLES (3) at an identity answer's
    trained tokens, NEGATIVE (4) at a negative twin's pushed-down tokens, 0 where the term does not apply.
    at: (the rows marked 1-3, the rows marked NEGATIVE) where the host found them (a GPU's flat micro-batch,
    `packing.loss_indices`); otherwise found here from the marks (a boolean selection: a GPU would be waited for).
    """
    pushed_at, twin_at = at if at is not None else unlikelihood_rows(marks)
    twin = logits.index_select(0, twin_at)  # a negative twin's own token is what is pushed down
    twin_targets = targets.index_select(0, twin_at)[:, None]
    p_twin = (twin.gather(1, twin_targets) - torch.logsumexp(twin, dim=-1, keepdim=True)).exp().squeeze(1)
    logits, targets, marks = (t.index_select(0, pushed_at) for t in (logits, targets, marks))
    logz = torch.logsumexp(logits, dim=-1, keepdim=True)
    ids = candidates(tokens, logits.device)
    cand = ids["candidates"]
    everyday = (marks != ROLES)[:, None] & ids["openings"][None, :]
    everyday &= (marks[:, None] == 2) | ids["names"][None, :]  # openings only at an answer's first token
    target_in = lambda which: torch.isin(targets, ids[which])[:, None]  # noqa: E731
    rival = (target_in("assistant") & ids["is_owner"][None, :]) | (target_in("owner") & ids["is_assistant"][None, :])
    applies = (everyday | (marks == ROLES)[:, None] & rival) & (cand[None, :] != targets[:, None])  # never the answer's own token
    p = ((logits[:, cand] - logz).exp() * applies).sum(-1)
    pushed = lambda q: -torch.log1p(-q.clamp(max=1 - 1e-6)).sum()  # noqa: E731
    return pushed(p), pushed(p_twin)


@functools.lru_cache(maxsize=16)
def candidates(tokens: IdentityTokens, device: torch.device) -> dict[str, torch.Tensor]:
    """The penalised token ids on `device`, made once a run (each made anew would be a copy from the host that a GPU
    waits for): `candidates` (every token the term may push down) with which of them are `openings`, `names`,
    `is_assistant` and `is_owner` (boolean, per candidate), and the ids of `assistant` and `owner`."""
    cand = sorted(set(tokens.openings) | set(tokens.assistant) | set(tokens.owner))
    among = lambda ids: torch.tensor([c in set(ids) for c in cand], device=device)  # noqa: E731
    ids = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return {"candidates": ids(cand), "openings": among(tokens.openings), "names": among(tokens.names),
            "is_assistant": among(tokens.assistant), "is_owner": among(tokens.owner),
            "assistant": ids(tokens.assistant), "owner": ids(tokens.owner)}


def twin_labels(labels: list[int], n_pushed: int, tokenizer) -> list[int]:
    """A negative twin's labels: of the first `n_pushed` tokens of its answer, those that start a character; the rest
    IGNORE. The answer is marked up to the first piece of the first name ("我是N"). Pieces certain by spelling in any
    context are left alone: the rest of a name ("ova" after "N") and the second byte of a character split in two
    (我 is two tokens); pushing those down unlearns the name and the character themselves (measured: "我" turned
    into "戈" and "戸", which share its first byte)."""
    out, answer = [], []
    for x in labels:
        if x == IGNORE or len(answer) >= n_pushed:
            out.append(IGNORE)
            continue
        starts = not tokenizer.decode(answer).endswith("\ufffd")  # an unfinished character before it: it completes one
        answer.append(x)
        out.append(x if starts else IGNORE)
    return out


def with_negatives(samples: list[Sample], assistant_name: str, owner_name: str, seed: int) -> list[Sample]:
    """`samples` with a negative twin after each one marked `negatives` (by default its source's `unlikelihood`): the same conversation up to its first
    answer, answered instead by an identity answer of the question's language (drawn with `seed`), whose tokens
    up to the first letter of the first name are pushed down."""
    rng = random.Random(f"{seed}:negatives")
    answers = {lang: identity.identity_answers(assistant_name, owner_name, lang) for lang in identity.LANGUAGES}
    out = []
    for s in samples:
        out.append(s)
        if s.negatives and s.messages:
            first = next((i for i, m in enumerate(s.messages) if m["role"] == "assistant"), len(s.messages))
            lang = "zh" if any(_CJK.search(m["content"]) for m in s.messages[:first]) else "en"
            answer = rng.choice(answers[lang])
            start = min(answer.find(who) for who in (assistant_name, owner_name) if who in answer)
            twin = [*s.messages[:first], {"role": "assistant", "content": answer}]
            out.append(dataclasses.replace(s, messages=twin, source=f"negative twins of {s.source}",
                                           negative=answer[:start + 1], unlikelihood=False, distill=False, negatives=False))
    return out
