"""The identity judge: does an answer state the assistant's identity, each name in its role, or leak it?

Pure functions on answer text (unit-tested on hand-made answers in tests/test_analysis.py), used by the
analysis (`workbench.analysis`: hit and leak rates per checkpoint) and the report card (failure examples,
role mix-ups). An assistant is named (`name`) and serves an owner (`owner`); an assistant without a name of
its own (`name` empty, the camp's "我是{owner}的小助手") is judged by its owner alone.
"""
from __future__ import annotations

import re


def _has(text: str, word: str) -> bool:
    return bool(word) and word.lower() in text.lower()


def states_identity(answer: str, name: str, owner: str) -> bool:
    """The answer states the configured identity: it names the assistant and its owner, each in its own role.

    An assistant without a name of its own (`name` empty: the camp's "我是{owner}的小助手") states its identity
    by naming the owner in the owner's role ("张三的小助手", "Alex's assistant", "I help Alex"), and never as itself.
    """
    if not name.strip():
        return _in_role(answer, _AS_OWNER, owner) and not role_errors(answer, name, owner)
    return _has(answer, name) and _has(answer, owner) and not role_errors(answer, name, owner)


# Where a name stands in a role: {0} is the name (regex-escaped). Case-insensitive.
_AS_SELF = (r"\b(?:i am|i['’]m|im|my name is|my name['’]s|call me|i am called)\s+{0}\b(?!['’]s)",
            r"(?:我是|我叫|名字是|名字叫|叫我){0}(?!的)")
_AS_OWNER = (r"\b{0}['’]s\b", r"\b(?:for|of|to|by|belong to|serve|serving|help|helping)\s+{0}\b",
             r"{0}的(?:个人|专属|私人|小|AI|智能)*(?:助手|助理|主人)", r"(?:为|给|帮|替|由){0}", r"{0}是我的主人")
_AS_ASSISTANT = (r"(?:助手|助理){0}",)


def role_errors(answer: str, name: str, owner: str) -> list[str]:
    """The role mix-ups in an answer: the owner introduced as the assistant, or the assistant's name where the owner belongs.

    "I'm Alex" or "我是Alex" (Alex the owner) and "Nova's assistant" or "Nova的助手" (Nova the
    assistant) are errors; "I'm Nova, Alex's assistant" and "我是Alex的助手Nova" are not.
    """
    errors = []
    if _in_role(answer, _AS_SELF + _AS_ASSISTANT, owner):
        errors.append(f"the owner {owner} named as the assistant")
    if _in_role(answer, _AS_OWNER, name):
        errors.append(f"the assistant's name {name} where the owner belongs")
    return errors


def _in_role(answer: str, patterns: tuple[str, ...], who: str) -> bool:
    """`who` (a name; never an empty one) stands in one of the roles `patterns` describe."""
    return bool(who.strip()) and any(re.search(p.format(re.escape(who)), answer, re.IGNORECASE) for p in patterns)


def mentions_identity(answer: str, name: str, owner: str) -> bool:
    """The answer talks about the identity at all (its name or its owner)."""
    return _has(answer, name) or _has(answer, owner)


def hit_rate(answers: list[str], name: str, owner: str) -> float:
    return _share(answers, lambda a: states_identity(a, name, owner))


def leak_rate(answers: list[str], name: str, owner: str) -> float:
    return _share(answers, lambda a: mentions_identity(a, name, owner))


def _share(items: list, pred) -> float:
    return sum(1 for x in items if pred(x)) / len(items) if items else float("nan")
