"""Training data: read, validate, mix, encode and write conversation data sets.

Every supported file format becomes a list of `Sample`s: a conversation as
chat messages (system first when the record has one, then user and assistant
turns alternating) or, for pre-training, a plain text document.

Formats (`FORMATS`; `detect_format` picks one from the file extension and the
fields of the first record):

* xtuner: {"conversation": [{"system"?, "input", "output"}, ...]}, one element
  per turn. A record whose only turn has an empty "input" and no system is
  XTuner's pre-training form and becomes a text document.
* pairs: {"input", "output", "system"?}
* alpaca: {"instruction", "input"?, "output", "system"?}; a non-empty input is
  appended to the instruction after a blank line.
* messages: {"messages": [{"role", "content"}, ...]} (OpenAI) or ShareGPT's
  {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}.
* problem_solution: {"problem", "solution"} (the MATH data set).
* table: .csv / .tsv (UTF-8) or .xlsx with question and answer columns and an
  optional system column (names configurable). Completely empty rows are skipped.
* text: a .txt file, one document per block of lines separated by a blank
  line, or JSON records {"text": ...}.

JSON files may hold a list of records, a single record object, or one record
per line (JSON Lines, whatever the extension). Record numbers are 1-based: the
line for JSON Lines, the position in the list for JSON, the data row (header
excluded) for tables, the document for text files.

Every problem is a `DataError` naming the file, the record number and the
field. `read_records` raises the first one; `check_dataset` collects them all
and adds what encoding would do (truncated and dropped samples).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from workbench.config import Config, ConfigError, DataSource, load_config, resolve_path
from workbench.io import atomic_write_json, atomic_write_jsonl
from workbench.prompt import Encoded, PromptBuilder, builder_for

FORMATS = ("xtuner", "pairs", "alpaca", "messages", "problem_solution", "table", "text")
TABLE_SUFFIXES = (".csv", ".tsv", ".xlsx")
JSON_SUFFIXES = (".json", ".jsonl")
TEXT_SUFFIXES = (".txt",)
MAX_ERRORS_SHOWN = 20
MAX_DROPPED_SHOWN = 5
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
# First field found in the first record decides the format.
KEY_FORMATS = (("conversation", "xtuner"), ("messages", "messages"), ("conversations", "messages"),
               ("instruction", "alpaca"), ("problem", "problem_solution"), ("solution", "problem_solution"),
               ("input", "pairs"), ("output", "pairs"), ("question", "table"), ("answer", "table"), ("text", "text"))

Columns = tuple[str, str, str | None]  # question, answer, system column
DEFAULT_COLUMNS: Columns = ("question", "answer", "system")


@dataclass
class Sample:
    """One training example: a conversation, or a pre-training text document."""

    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]; empty for text
    text: str | None = None  # pre-training document (loss on every token); None for conversations
    source: str = ""  # file path, or "generated:identity"
    record: int = 0  # 1-based record number in its file


class DataError(ValueError):
    """A data problem, located by file, 1-based record number (0: the whole file) and field."""

    def __init__(self, path: str | os.PathLike, record: int, field: str | None, message: str):
        self.path, self.record, self.field, self.message = str(path), record, field, message
        where = [self.path] + ([f"record {record}"] if record else []) + ([f"field '{field}'"] if field else [])
        super().__init__(": ".join(where + [message]))

    def __reduce__(self):
        return DataError, (self.path, self.record, self.field, self.message)


class _Bad(Exception):
    """A record-level problem; the reader adds the file and record number."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """The format of a data file, from its extension and the fields of its first record."""
    path = Path(path)
    kind = _file_kind(path)
    if kind != "json":
        return kind
    errors: list[DataError] = []
    raw = _load_raw(path, kind, DEFAULT_COLUMNS, errors)
    return _format_from_records(path, raw, errors)


def read_records(path: str | os.PathLike, format: str = "auto", question_column: str = "question",
                 answer_column: str = "answer", system_column: str | None = "system") -> list[Sample]:
    """Read and validate a data file; raises the first `DataError` found."""
    samples, errors = _read(Path(path), format, (question_column, answer_column, system_column))
    if errors:
        raise errors[0]
    return samples


def _read(path: Path, format: str, columns: Columns) -> tuple[list[Sample], list[DataError]]:
    """All valid samples of a file and all errors found in it."""
    errors: list[DataError] = []
    try:
        if format != "auto" and format not in FORMATS:
            raise DataError(path, 0, None, f"unknown format {format!r}; use auto or one of {list(FORMATS)}")
        kind = _file_kind(path)
        raw = _load_raw(path, kind, columns, errors)
        fmt = _pick_format(path, kind, format, raw, errors)
    except DataError as e:
        return [], errors if e in errors else errors + [e]
    convert = _converter(fmt, columns)
    samples = []
    for number, rec in raw:
        try:
            content = convert(rec)
        except _Bad as bad:
            errors.append(DataError(path, number, bad.field, bad.message))
            continue
        samples.append(_sample(content, path, number))
    errors.sort(key=lambda e: e.record)
    return samples, errors


def _sample(content: list[dict] | str, path: Path, number: int) -> Sample:
    if isinstance(content, str):
        return Sample(messages=[], text=content, source=str(path), record=number)
    return Sample(messages=content, source=str(path), record=number)


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return "table"
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSON_SUFFIXES:
        return "json"
    known = ", ".join(JSON_SUFFIXES + TABLE_SUFFIXES + TEXT_SUFFIXES)
    raise DataError(path, 0, None, f"unknown file type {suffix or '(no extension)'!r}; use one of {known}")


def _pick_format(path: Path, kind: str, format: str, raw: list[tuple[int, Any]], errors: list[DataError]) -> str:
    """The requested format if the file type allows it (JSON files allow every format); auto: detect it."""
    if format == "auto":
        return _format_from_records(path, raw, errors) if kind == "json" else kind
    if kind in ("table", "text") and format != kind:
        raise DataError(path, 0, None, f"format {format!r} cannot read a {path.suffix} file; use format: {kind} (or auto)")
    return format


def _format_from_records(path: Path, raw: list[tuple[int, Any]], errors: list[DataError]) -> str:
    if not raw:
        raise errors[0] if errors else DataError(path, 0, None, "no records")
    number, first = raw[0]
    if isinstance(first, str):
        return "text"
    if isinstance(first, dict):
        for key, fmt in KEY_FORMATS:
            if key in first:
                return fmt
    fields = sorted(first) if isinstance(first, dict) else _kind(first)
    raise DataError(path, number, None, f"cannot tell the data format from this record ({fields}); "
                                        f"set format to one of {list(FORMATS)}")


def _load_raw(path: Path, kind: str, columns: Columns, errors: list[DataError]) -> list[tuple[int, Any]]:
    """(record number, raw record) pairs; unreadable JSON lines are added to `errors`."""
    if kind == "table":
        raw = _table_records(path, columns)
    elif kind == "text":
        raw = _text_documents(_decode(path))
    else:
        raw = _json_records(path, _decode(path), errors)
    if not raw and not errors:
        raise DataError(path, 0, None, "no records: the file holds no data")
    return raw


def _decode(path: Path) -> str:
    """The file as text; UTF-8 (with or without BOM) is required."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, 0, None, "file not found") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        hint = " It looks like GBK/GB18030 (common for files saved on Chinese Windows or by Excel)." if _is_gbk(data) else ""
        raise DataError(path, 0, None, f"not UTF-8 text: byte 0x{data[e.start]:02x} at line {line} cannot be decoded.{hint} "
                                       "Re-save the file as UTF-8 (Excel: 'CSV UTF-8'; text editors: save with encoding UTF-8).") from None
    if not text.strip():
        raise DataError(path, 0, None, "the file is empty")
    return text


def _is_gbk(data: bytes) -> bool:
    try:
        data.decode("gb18030")
    except UnicodeDecodeError:
        return False
    return True


def _json_records(path: Path, text: str, errors: list[DataError]) -> list[tuple[int, Any]]:
    """Records of a JSON list, a single JSON object, or JSON Lines."""
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        if path.suffix.lower() == ".jsonl" or _first_line_is_json(text):
            return _jsonl_records(path, text, errors)
        raise DataError(path, 0, None, f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if isinstance(top, list):
        return list(enumerate(top, 1))
    if isinstance(top, dict):
        return [(1, top)]
    raise DataError(path, 0, None, f"the top level must be a list of records (or one record object), got {_kind(top)}")


def _first_line_is_json(text: str) -> bool:
    first = next(line for line in text.split("\n") if line.strip())
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _jsonl_records(path: Path, text: str, errors: list[DataError]) -> list[tuple[int, Any]]:
    """One record per line; the record number is the line number. Blank lines are skipped."""
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append(DataError(path, number, None, f"not valid JSON: {e.msg} at column {e.colno}"))
    return records


def _table_records(path: Path, columns: Columns) -> list[tuple[int, dict]]:
    """Rows of a CSV/TSV/XLSX table as {column: text}, numbered from 1 after the header."""
    frame = _read_frame(path)
    frame.columns = [str(c).strip() for c in frame.columns]
    for column in columns[:2]:
        if column not in frame.columns:
            raise DataError(path, 0, column, f"column missing; the table's columns are {list(frame.columns)} "
                                             "(set question_column / answer_column to the right names)")
    rows = frame.to_dict("records")
    return [(i, row) for i, row in enumerate(rows, 1) if any(str(v).strip() for v in row.values())]


def _read_frame(path: Path):
    import pandas as pd

    if path.suffix.lower() == ".xlsx":
        if not path.exists():
            raise DataError(path, 0, None, "file not found")
        try:
            return pd.read_excel(path, dtype=str, keep_default_na=False)
        except Exception as e:  # noqa: BLE001 - openpyxl raises many types for broken files
            raise DataError(path, 0, None, f"cannot read the Excel file: {e}") from None
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        return pd.read_csv(io.StringIO(_decode(path)), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.ParserError as e:
        raise DataError(path, 0, None, f"not a valid table: {e}") from None


def _text_documents(text: str) -> list[tuple[int, str]]:
    """Plain-text documents: blocks of lines separated by at least one blank line."""
    blocks = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    return list(enumerate((b.strip() for b in blocks if b.strip()), 1))


# ---------------------------------------------------------------------------
# Converting raw records (each returns chat messages, or a text document)
# ---------------------------------------------------------------------------
def _converter(fmt: str, columns: Columns) -> Callable[[Any], list[dict] | str]:
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
            raise _Bad(where, f"each turn must be an object with input and output, got {_kind(turn)}")
        system = _optional(turn, "system", f"{where}.system")
        if i == 0 and system:
            first_system = system
            messages.append({"role": "system", "content": system})
        elif system and system != first_system:
            raise _Bad(f"{where}.system", "a system prompt is only allowed on the first turn")
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
            raise _Bad(None, "empty text")
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
                raise _Bad(role_field, "a system message is only allowed as the first message")
            if content.strip():
                messages.append({"role": "system", "content": content})
            continue
        expected = "assistant" if messages and messages[-1]["role"] == "user" else "user"
        if role != expected:
            raise _Bad(role_field, f"roles out of order: expected '{expected}', got '{role}' "
                                   "(after an optional system message, user and assistant must alternate)")
        if not content.strip():
            raise _Bad(content_field, "empty question" if role == "user" else "empty answer")
        messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "assistant":
        raise _Bad(f"{key}[{len(items) - 1}]", "the conversation must end with an assistant message")
    return messages


def _message(item: Any, where: str) -> tuple[str, str, str, str]:
    """(role, content, role field, content field) of one message in OpenAI or ShareGPT form."""
    if not isinstance(item, dict):
        raise _Bad(where, f"each message must be an object with role and content, got {_kind(item)}")
    role_key = "from" if "from" in item and "role" not in item else "role"
    content_key = "value" if "value" in item and "content" not in item else "content"
    role_field, content_field = f"{where}.{role_key}", f"{where}.{content_key}"
    role = _string(item, role_key, role_field)
    if role.lower() not in ROLES:
        raise _Bad(role_field, f"unknown role {role!r}; use system, user or assistant")
    return ROLES[role.lower()], _string(item, content_key, content_field), role_field, content_field


def _conversation(system: str | None, question: str, answer: str) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + _pair(question, answer)


def _pair(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _record(rec: Any) -> dict:
    if not isinstance(rec, dict):
        raise _Bad(None, f"a record must be a JSON object with named fields, got {_kind(rec)}")
    return rec


def _string(rec: dict, key: str, name: str) -> str:
    if key not in rec:
        raise _Bad(name, f"missing (this record has the fields {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, str):
        raise _Bad(name, f"must be a string, got {_kind(value)}")
    return value


def _required(rec: dict, key: str, name: str, what: str) -> str:
    """A field that must be a non-empty string; `what` names it in the error (question, answer, text)."""
    value = _string(rec, key, name)
    if not value.strip():
        raise _Bad(name, f"empty {what}")
    return value


def _optional(rec: dict, key: str, name: str) -> str | None:
    """An optional string field; missing, null or blank gives None."""
    if rec.get(key) is None:
        return None
    value = _string(rec, key, name)
    return value if value.strip() else None


def _list_field(rec: dict, key: str) -> list:
    if key not in rec:
        raise _Bad(key, f"missing (this record has the fields {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, list):
        raise _Bad(key, f"must be a list, got {_kind(value)}")
    if not value:
        raise _Bad(key, "empty list: the conversation has no turns")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), f"a number ({value!r})" if isinstance(value, (int, float)) else type(value).__name__)


# ---------------------------------------------------------------------------
# Sources and mixing
# ---------------------------------------------------------------------------
def load_source(src: DataSource, cfg: Config) -> list[Sample]:
    """The samples of one configured source: a file, or generated identity data."""
    if src.generate:
        return _generate(src, cfg)
    return read_records(resolve_path(src.path), src.format, src.question_column, src.answer_column, src.system_column)


def _generate(src: DataSource, cfg: Config) -> list[Sample]:
    from workbench import identity  # identity builds on this module

    if src.generate == "identity":
        return identity.generate_identity(cfg.assistant_name, cfg.owner_name, seed=cfg.seed)
    if src.generate == "identity_tutorial":
        return identity.generate_tutorial_identity(cfg.owner_name, n_repeat=src.n_repeat, assistant_name=cfg.assistant_name)
    raise ConfigError(f"generate: unknown generator {src.generate!r}; use identity or identity_tutorial")


def mix_sources(cfg: Config) -> list[Sample]:
    """All of cfg.datasets, each repeated or sized to its fraction, shuffled; the same for the same seed."""
    return _mix([load_source(src, cfg) for src in cfg.datasets], cfg)


def _mix(loaded: list[list[Sample]], cfg: Config) -> list[Sample]:
    counts = _target_counts(cfg.datasets, [len(samples) for samples in loaded])
    mixed: list[Sample] = []
    for i, (samples, count) in enumerate(zip(loaded, counts)):
        mixed += _take(samples, count, random.Random(f"{cfg.seed}:{i}"))
    random.Random(cfg.seed).shuffle(mixed)
    return mixed


def _target_counts(sources: list[DataSource], sizes: list[int]) -> list[int]:
    """How many samples each source contributes.

    Without fraction: repeat x size. With fraction f: f of the final mixture,
    so that the sources with fractions add sum(f) to the rest; when every
    source has a fraction the total is the sum of the sources' sizes and the
    fractions are normalised to add up to 1.
    """
    for i, (src, size) in enumerate(zip(sources, sizes)):
        if src.fraction is not None and size == 0:
            raise ConfigError(f"datasets[{i}].fraction: the source has no records, so it cannot make up a share")
    base = sum(_repeat_count(src.repeat, size) for src, size in zip(sources, sizes) if src.fraction is None)
    shares = sum(src.fraction for src in sources if src.fraction is not None)
    if base and shares >= 1:
        raise ConfigError(f"datasets: the fractions add up to {shares:g}, leaving no share for the sources without a "
                          "fraction; make the fractions add up to less than 1")
    total = base / (1 - shares) if base else sum(sizes) / shares if shares else 0
    return [_repeat_count(src.repeat, size) if src.fraction is None else max(1, round(src.fraction * total))
            for src, size in zip(sources, sizes)]


def _repeat_count(repeat: float, size: int) -> int:
    """Integer part of repeat: whole copies; fractional part: that share of the records once more."""
    whole = int(repeat)
    return whole * size + round((repeat - whole) * size)


def _take(samples: list[Sample], count: int, rng: random.Random) -> list[Sample]:
    """count samples: every sample as many whole times as fit, the remainder sampled without replacement."""
    if not samples:
        return []
    whole, rest = divmod(count, len(samples))
    return samples * whole + rng.sample(samples, rest)


# ---------------------------------------------------------------------------
# Encoding and checking
# ---------------------------------------------------------------------------
@dataclass
class DatasetReport:
    """What encoding a data set gives: sizes, truncation, drops, per-source counts and errors."""

    n_records: int = 0  # samples given to encode_samples (after mixing)
    n_samples: int = 0  # encoded samples kept for training
    n_truncated: int = 0  # kept samples longer than max_length, cut to it
    n_dropped: int = 0  # samples with nothing trainable left after truncation (not kept)
    n_tokens: int = 0  # tokens of the kept samples
    n_trained_tokens: int = 0  # of those, tokens with a loss
    max_len: int = 0  # longest kept sample in tokens (after truncation)
    per_source: dict[str, int] = dataclasses.field(default_factory=dict)  # samples given, by source
    errors: list[str] = dataclasses.field(default_factory=list)  # the first MAX_ERRORS_SHOWN errors
    n_errors: int = 0  # all errors, shown or not
    max_length: int | None = None
    dropped: list[str] = dataclasses.field(default_factory=list)  # where the first dropped samples came from

    @property
    def ok(self) -> bool:
        return not self.errors

    def add_error(self, error: Exception | str) -> None:
        self.n_errors += 1
        if len(self.errors) < MAX_ERRORS_SHOWN:
            self.errors.append(str(error))

    def __str__(self) -> str:
        share = 100 * self.n_trained_tokens / self.n_tokens if self.n_tokens else 0.0
        limit = f" (max_length {self.max_length})" if self.max_length else ""
        lines = [f"records: {self.n_records} read, {self.n_samples} kept for training, {self.n_dropped} dropped",
                 f"tokens: {self.n_tokens:,} in all, {self.n_trained_tokens:,} trained ({share:.0f}%)",
                 f"longest sample: {self.max_len} tokens{limit}"]
        if self.n_truncated:
            lines.append(f"truncated: {self.n_truncated} samples were longer than max_length and were cut")
        if self.n_dropped:
            lines.append(f"dropped: {self.n_dropped} samples had nothing left to train after truncation, "
                         f"e.g. {'; '.join(self.dropped)}")
        lines.append("per source: " + (", ".join(f"{k} {v}" for k, v in self.per_source.items()) or "none"))
        lines += self._error_lines()
        return "\n".join(lines)

    def _error_lines(self) -> list[str]:
        total = max(self.n_errors, len(self.errors))
        if not total:
            return ["errors: none"]
        lines = [f"errors: {total}"] + [f"  {e}" for e in self.errors]
        if total > len(self.errors):
            lines.append(f"  ... and {total - len(self.errors)} more")
        return lines


def encode_samples(samples: Iterable[Sample], builder: PromptBuilder, max_length: int,
                   loss_on: str = "all_turns") -> tuple[list[Encoded], DatasetReport]:
    """Encode samples for training; samples with no trained token left are dropped and counted."""
    report = DatasetReport(max_length=max_length)
    encoded: list[Encoded] = []
    cache: dict = {}
    for sample in samples:
        report.n_records += 1
        report.per_source[sample.source] = report.per_source.get(sample.source, 0) + 1
        enc = _encode_cached(sample, builder, max_length, loss_on, cache)
        if enc.n_trained == 0:
            report.n_dropped += 1
            if len(report.dropped) < MAX_DROPPED_SHOWN:
                report.dropped.append(f"{sample.source}: record {sample.record}")
            continue
        encoded.append(enc)
        _count(report, enc)
    return encoded, report


def _encode_cached(sample: Sample, builder: PromptBuilder, max_length: int, loss_on: str, cache: dict) -> Encoded:
    """Encode once per distinct sample (repeated data is common); each caller gets its own copy."""
    key = sample.text if sample.text is not None else tuple((m["role"], m["content"]) for m in sample.messages)
    if key not in cache:
        cache[key] = (builder.encode_text(sample.text, max_length) if sample.text is not None
                      else builder.encode(sample.messages, max_length, loss_on))
    enc = cache[key]
    return Encoded(list(enc.input_ids), list(enc.labels), enc.truncated)


def _count(report: DatasetReport, enc: Encoded) -> None:
    report.n_samples += 1
    report.n_truncated += enc.truncated
    report.n_tokens += len(enc)
    report.n_trained_tokens += enc.n_trained
    report.max_len = max(report.max_len, len(enc))


def check_dataset(path_or_config: str | os.PathLike | Config, tokenizer=None, max_length: int | None = None,
                  strict: bool = True) -> DatasetReport:
    """Read, validate and encode a data file or a config's data mixture; report every problem. Writes nothing.

    tokenizer: a tokenizer, a model name, or None for the config's model (the
    embedded model for a bare data file). max_length: None for the config's.
    strict: samples that would be dropped (nothing trainable after truncation)
    count as an error too, so `report.ok` is False.
    """
    cfg, samples, errors = _gather(path_or_config)
    builder = builder_for(cfg, _tokenizer(tokenizer, cfg))
    _, report = encode_samples(samples, builder, max_length or cfg.max_length, cfg.loss_on)
    for error in errors:
        report.add_error(error)
    if strict and report.n_dropped:
        report.add_error(f"{report.n_dropped} samples would be dropped: their prompt fills max_length={report.max_length}, "
                         f"so no answer token is left to train (e.g. {report.dropped[0]}); raise max_length or shorten them")
    return report


def _gather(path_or_config: str | os.PathLike | Config) -> tuple[Config, list[Sample], list[Exception]]:
    """The config, the samples it reads (mixed), and every error found on the way."""
    if not isinstance(path_or_config, Config) and Path(path_or_config).suffix.lower() not in (".yaml", ".yml"):
        samples, errors = _read(resolve_path(path_or_config), "auto", DEFAULT_COLUMNS)
        return Config(), samples, list(errors)
    cfg = path_or_config if isinstance(path_or_config, Config) else load_config(path_or_config)
    loaded, errors = [], []
    for src in cfg.datasets:
        if src.generate:
            loaded.append(_generate(src, cfg))
            continue
        samples, source_errors = _read(resolve_path(src.path), src.format,
                                       (src.question_column, src.answer_column, src.system_column))
        loaded.append(samples)
        errors += source_errors
    try:
        return cfg, _mix(loaded, cfg), errors
    except ConfigError as e:
        return cfg, [s for samples in loaded for s in samples], errors + [e]


def _tokenizer(tokenizer, cfg: Config):
    from workbench.models import load_tokenizer

    if tokenizer is None:
        return load_tokenizer(cfg.pretrained_model_name_or_path, cfg.trust_remote_code)
    if isinstance(tokenizer, str):
        return load_tokenizer(tokenizer, cfg.trust_remote_code)
    return tokenizer


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
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


def preview_table(samples: list[Sample], n: int = 10):
    """The first `n` samples as a table: system prompt, question, answer, turns (pandas DataFrame)."""
    import pandas as pd

    rows = []
    for s in samples[:n]:
        if s.text is not None:
            rows.append({"system": "", "question": "(pre-training text)", "answer": s.text[:200], "turns": 0})
            continue
        system = next((m["content"] for m in s.messages if m["role"] == "system"), "")
        users = [m["content"] for m in s.messages if m["role"] == "user"]
        answers = [m["content"] for m in s.messages if m["role"] == "assistant"]
        rows.append({"system": system, "question": users[0] if users else "", "answer": answers[0] if answers else "",
                     "turns": len(answers)})
    return pd.DataFrame(rows)


def split_heldout(samples: list[Sample], every: int = 7) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out): every `every`-th sample is held out, deterministically, for measuring retention."""
    held = [s for i, s in enumerate(samples) if i % every == every - 1]
    train = [s for i, s in enumerate(samples) if i % every != every - 1]
    return train, held
