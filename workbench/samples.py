"""Training samples: the one type every reader produces, its error, and the writers.

A `Sample` is a conversation as chat messages (system first when the record
has one, then user and assistant turns alternating) or, for pre-training, a
plain text document. `DataError` locates a data problem by file, 1-based
record number and field. The writers turn samples into XTuner's
`conversation` records or OpenAI's `messages` records and write them
atomically (`write_dataset`).

This module is a leaf: it imports nothing from the package but `workbench.io`,
so the readers, the identity generator and the mixing code can all build on it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from workbench.io import atomic_write_json, atomic_write_jsonl


@dataclass
class Sample:
    """One training example: a conversation, or a pre-training text document."""

    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]; empty for text
    text: str | None = None  # pre-training document (loss on every token); None for conversations
    source: str = ""  # the configured source: a file path, a folder, a glob pattern, or "generated:identity"
    record: int = 0  # 1-based record number in its file
    file: str = ""  # the data file the record is in ("" for generated data); equals source for a file source
    distill: bool = False  # gets the distillation term (Config.distill_weight): its source is marked `distill: true`
    unlikelihood: bool | str = False  # gets the unlikelihood term (Config.unlikelihood_weight): its source's `unlikelihood` (true or "names")
    negatives: bool = False  # gets a negative twin (Config.negative_weight): its source's `negatives` (default: `unlikelihood`)
    negative: str = ""  # a negative twin (Config.negative_weight): the start of its answer whose tokens are pushed down; never learned
    roles: bool = False  # gets the term's role contrast (one name pushes the other down): its source is marked `roles: true`

    @property
    def where(self) -> str:
        """The file (or source) and record number, as errors name them: 'data/x.json: record 3'."""
        return f"{self.file or self.source}: record {self.record}"


class DataError(ValueError):
    """A data problem, located by file, 1-based record number (0: the whole file) and field."""

    def __init__(self, path: str | os.PathLike, record: int, field: str | None, message: str):
        self.path, self.record, self.field, self.message = str(path), record, field, message
        where = [self.path] + ([f"record {record}"] if record else []) + ([f"field '{field}'"] if field else [])
        super().__init__(": ".join(where + [message]))

    def __reduce__(self):
        return DataError, (self.path, self.record, self.field, self.message)


def to_xtuner_json(samples: Iterable[Sample]) -> list[dict]:
    """Samples in XTuner's form: {"conversation": [{"system"?, "input", "output"}, ...]}.

    Text documents use XTuner's pre-training form (one turn with an empty input).
    """
    return [_xtuner_record(s) for s in samples]


def _xtuner_record(sample: Sample) -> dict:
    if sample.text is not None:
        return {"conversation": [{"input": "", "output": sample.text}]}
    messages = sample.messages
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    turns = [{"input": u["content"], "output": a["content"]} for u, a in zip(rest[::2], rest[1::2])]
    if system is not None and turns:
        turns[0] = {"system": system, **turns[0]}
    return {"conversation": turns}


def to_messages_json(samples: Iterable[Sample]) -> list[dict]:
    """Samples in OpenAI's form {"messages": [...]}; text documents as {"text": ...}."""
    return [{"text": s.text} if s.text is not None else {"messages": list(s.messages)} for s in samples]


def write_dataset(samples_or_records: Iterable[Sample | dict], path: str | os.PathLike) -> Path:
    """Write atomically in UTF-8: .jsonl one record per line, .json an indented list. Samples become XTuner records."""
    path = Path(path)
    records = [_xtuner_record(r) if isinstance(r, Sample) else r for r in samples_or_records]
    if path.suffix.lower() == ".jsonl":
        return atomic_write_jsonl(path, records)
    if path.suffix.lower() == ".json":
        return atomic_write_json(path, records, indent=4)
    raise ValueError(f"{path}: write data as .json or .jsonl, not {path.suffix or 'no extension'!r}")
