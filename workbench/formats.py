"""One converter per data format: a raw record becomes chat messages or a text document.

The readers (`workbench.readers`) turn a file into raw records; this module
checks each record against its format and converts it. Formats (`FORMATS`):

* xtuner: {"conversation": [{"system"?, "input", "output"}, ...]}, one element
  per turn. A record whose only turn has an empty "input" and no system is
  XTuner's pre-training form and becomes a text document.
* pairs: {"input", "output", "system"?}
* alpaca: {"instruction", "input"?, "output", "system"?}; a non-empty input is
  appended to the instruction after a blank line.
* messages: {"messages": [{"role", "content"}, ...]} (OpenAI) or ShareGPT's
  {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}.
* problem_solution: {"problem", "solution"} (the MATH data set).
* table: a row {column: text} with a question, an answer and an optional
  system column (`Columns`).
* text: a plain-text document, or a record {"text": ...}.

A problem is a `RecordError` naming the field; the reader adds the file and
the record number.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

FORMATS = ("xtuner", "pairs", "alpaca", "messages", "problem_solution", "table", "text")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
# First field found in the first record decides the format.
KEY_FORMATS = (("conversation", "xtuner"), ("messages", "messages"), ("conversations", "messages"),
               ("instruction", "alpaca"), ("problem", "problem_solution"), ("solution", "problem_solution"),
               ("input", "pairs"), ("output", "pairs"), ("question", "table"), ("answer", "table"), ("text", "text"))

Columns = tuple[str, str, str | None]  # question, answer, system column


class RecordError(Exception):
    """A record-level problem; the reader adds the file and record number."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def format_of(record: Any) -> str | None:
    """The format a record's fields point to (`KEY_FORMATS`), or None."""
    if isinstance(record, str):
        return "text"
    if isinstance(record, dict):
        for key, fmt in KEY_FORMATS:
            if key in record:
                return fmt
    return None


def converter(fmt: str, columns: Columns) -> Callable[[Any], list[dict] | str]:
    """The function that converts one raw record of `fmt` (table rows: with these columns)."""
    if fmt == "table":
        return functools.partial(_from_table, columns=columns)
    return {"xtuner": _from_xtuner, "pairs": _from_pairs, "alpaca": _from_alpaca, "messages": _from_messages,
            "problem_solution": _from_problem_solution, "text": _from_text}[fmt]


def _from_xtuner(rec: Any) -> list[dict] | str:
    turns = _list_field(_record(rec), "conversation")
    if _is_pretraining(turns):
        return turns[0]["output"]
    first_system = None
    messages: list[dict] = []
    for i, turn in enumerate(turns):
        where = f"conversation[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"each turn must be an object with input and output, got {kind_of(turn)}")
        system = _optional(turn, "system", f"{where}.system")
        if i == 0 and system:
            first_system = system
            messages.append({"role": "system", "content": system})
        elif system and system != first_system:
            raise RecordError(f"{where}.system", "a system prompt is only allowed on the first turn")
        messages += _pair(_required(turn, "input", f"{where}.input", "question"),
                          _required(turn, "output", f"{where}.output", "answer"))
    return messages


def _is_pretraining(turns: list) -> bool:
    """XTuner's pre-training form: one turn, empty input, no system, a non-empty output."""
    if len(turns) != 1 or not isinstance(turns[0], dict):
        return False
    turn = turns[0]
    output = turn.get("output")
    return turn.get("input") == "" and not turn.get("system") and isinstance(output, str) and bool(output.strip())


def _from_pairs(rec: Any) -> list[dict]:
    rec = _record(rec)
    return _conversation(_optional(rec, "system", "system"), _required(rec, "input", "input", "question"),
                         _required(rec, "output", "output", "answer"))


def _from_alpaca(rec: Any) -> list[dict]:
    rec = _record(rec)
    question = _required(rec, "instruction", "instruction", "question")
    extra = _optional(rec, "input", "input")
    if extra:
        question = f"{question}\n\n{extra}"
    return _conversation(_optional(rec, "system", "system"), question, _required(rec, "output", "output", "answer"))


def _from_problem_solution(rec: Any) -> list[dict]:
    rec = _record(rec)
    return _conversation(None, _required(rec, "problem", "problem", "question"),
                         _required(rec, "solution", "solution", "answer"))


def _from_table(rec: Any, columns: Columns) -> list[dict]:
    rec = _record(rec)
    question_column, answer_column, system_column = columns
    system = _optional(rec, system_column, system_column) if system_column else None
    return _conversation(system, _required(rec, question_column, question_column, "question"),
                         _required(rec, answer_column, answer_column, "answer"))


def _from_text(rec: Any) -> str:
    if isinstance(rec, str):
        if not rec.strip():
            raise RecordError(None, "empty text")
        return rec
    return _required(_record(rec), "text", "text", "text")


def _from_messages(rec: Any) -> list[dict]:
    """OpenAI messages or ShareGPT conversations, checked for order: [system], user, assistant, user, ..., assistant."""
    rec = _record(rec)
    key = "conversations" if "conversations" in rec and "messages" not in rec else "messages"
    items = _list_field(rec, key)
    messages: list[dict] = []
    for i, item in enumerate(items):
        role, content, role_field, content_field = _message(item, f"{key}[{i}]")
        if role == "system":
            if i != 0:
                raise RecordError(role_field, "a system message is only allowed as the first message")
            if content.strip():
                messages.append({"role": "system", "content": content})
            continue
        expected = "assistant" if messages and messages[-1]["role"] == "user" else "user"
        if role != expected:
            raise RecordError(role_field, f"roles out of order: expected '{expected}', got '{role}' "
                                   "(after an optional system message, user and assistant must alternate)")
        if not content.strip():
            raise RecordError(content_field, "empty question" if role == "user" else "empty answer")
        messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "assistant":
        raise RecordError(f"{key}[{len(items) - 1}]", "the conversation must end with an assistant message")
    return messages


def _message(item: Any, where: str) -> tuple[str, str, str, str]:
    """(role, content, role field, content field) of one message in OpenAI or ShareGPT form."""
    if not isinstance(item, dict):
        raise RecordError(where, f"each message must be an object with role and content, got {kind_of(item)}")
    role_key = "from" if "from" in item and "role" not in item else "role"
    content_key = "value" if "value" in item and "content" not in item else "content"
    role_field, content_field = f"{where}.{role_key}", f"{where}.{content_key}"
    role = _string(item, role_key, role_field)
    if role.lower() not in ROLES:
        raise RecordError(role_field, f"unknown role {role!r}; use system, user or assistant")
    return ROLES[role.lower()], _string(item, content_key, content_field), role_field, content_field


def _conversation(system: str | None, question: str, answer: str) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + _pair(question, answer)


def _pair(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _record(rec: Any) -> dict:
    if not isinstance(rec, dict):
        raise RecordError(None, f"a record must be a JSON object with named fields, got {kind_of(rec)}")
    return rec


def _string(rec: dict, key: str, name: str) -> str:
    if key not in rec:
        raise RecordError(name, f"missing (this record has the fields {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, str):
        raise RecordError(name, f"must be a string, got {kind_of(value)}")
    return value


def _required(rec: dict, key: str, name: str, what: str) -> str:
    """A field that must be a non-empty string; `what` names it in the error (question, answer, text)."""
    value = _string(rec, key, name)
    if not value.strip():
        raise RecordError(name, f"empty {what}")
    return value


def _optional(rec: dict, key: str, name: str) -> str | None:
    """An optional string field; missing, null or blank gives None."""
    if rec.get(key) is None:
        return None
    value = _string(rec, key, name)
    return value if value.strip() else None


def _list_field(rec: dict, key: str) -> list:
    if key not in rec:
        raise RecordError(key, f"missing (this record has the fields {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, list):
        raise RecordError(key, f"must be a list, got {kind_of(value)}")
    if not value:
        raise RecordError(key, "empty list: the conversation has no turns")
    return value


def kind_of(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), f"a number ({value!r})" if isinstance(value, (int, float)) else type(value).__name__)
