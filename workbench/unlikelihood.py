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

The target token itself is never penalised, so an everyday answer that rightly opens with "I"
keeps its cross-entropy gradient. The term reads the logits the cross-entropy already has: no
extra forward. Written here because no maintained library ships it for a causal-LM trainer (TRL
has no unlikelihood loss); it is a few tensor operations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench import identity
from workbench.prompt import IGNORE, PromptBuilder


@dataclass(frozen=True)
class IdentityTokens:
    """The token ids the term pushes down: `names` everywhere in an everyday answer, `openings` (which include
    the names) at its first token."""

    names: tuple[int, ...]
    openings: tuple[int, ...]


def identity_tokens(builder: PromptBuilder, assistant_name: str, owner_name: str) -> IdentityTokens:
    """The penalised tokens of a run: single-token spellings of both names, and the identity answers' first tokens."""
    tok = builder.tokenizer
    names = set()
    for who in (assistant_name, owner_name):
        for spelling in (who, " " + who):
            ids = tok.encode(spelling, add_special_tokens=False)
            if len(ids) == 1:
                names.add(ids[0])
    openings = set(names)
    for lang in identity.LANGUAGES:
        for question, answer in identity.identity_pairs(assistant_name, owner_name, lang):
            enc = builder.encode([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
            openings.add(next(x for x in enc.labels if x != IGNORE))
    return IdentityTokens(tuple(sorted(names)), tuple(sorted(openings)))


def unlikelihood_sum(logits: torch.Tensor, targets: torch.Tensor, marks: torch.Tensor,
                     tokens: IdentityTokens) -> torch.Tensor:
    """Sum over the marked positions of -log(1 - p), p the probability of the penalised tokens there.

    logits: [n, vocab] (float32), targets: [n] (the next tokens), marks: [n] with 2 at the first
    token of an answer, 1 at its other trained tokens, 0 where the term does not apply.
    """
    chosen = marks > 0
    logits, targets, marks = logits[chosen], targets[chosen], marks[chosen]
    cand = torch.tensor(tokens.openings, device=logits.device)
    is_name = torch.isin(cand, torch.tensor(tokens.names, dtype=cand.dtype, device=logits.device))
    applies = (marks[:, None] == 2) | is_name[None, :]  # openings only at an answer's first token
    applies &= cand[None, :] != targets[:, None]  # never the token the answer really has there
    logp = logits[:, cand] - torch.logsumexp(logits, dim=-1, keepdim=True)
    p = (logp.exp() * applies).sum(-1).clamp(max=1 - 1e-6)
    return -torch.log1p(-p).sum()
