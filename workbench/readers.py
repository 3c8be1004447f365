"""Reading data: a file, a folder of files or a glob pattern becomes a list of `Sample`s.

A source is one data file, a folder (every supported file under it, in
sorted order, recursively: the MATH data set is folders of folders with one
JSON object per problem), or a glob pattern (`data/*.jsonl`,
`data/MATH/**/*.json`). Hidden files and folders, Excel lock files (`~$...`)
and files of other types under a folder or pattern are skipped.

Each file is read by its type: JSON files may hold a list of records, a
single record object, or one record per line (JSON Lines, whatever the
extension); .csv/.tsv/.xlsx tables (`workbench.tables`); .txt plain text, one
document per block of lines separated by a blank line. `detect_format` picks
the format of the records from the extension and the fields of the first
record; `workbench.formats` converts each record. Record numbers are 1-based
and counted per file: the line for JSON Lines, the position in the list for
JSON, the data row (header excluded) for tables, the document for text files.

Every problem is a `DataError` naming the file, the record number and the
field. `read_records` raises the first one; `read_source` returns them all
with the samples, the files read and the table columns used.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.formats import FORMATS, RecordError, converter, format_of, kind_of
from workbench.samples import DataError, Sample
from workbench.tables import TABLE_SUFFIXES, WantedColumns, pick_columns, table_rows

JSON_SUFFIXES = (".json", ".jsonl")
TEXT_SUFFIXES = (".txt",)
SUFFIXES = JSON_SUFFIXES + TABLE_SUFFIXES + TEXT_SUFFIXES
GLOB_CHARS = "*?["


@dataclass
class Reading:
    """What reading one source gave."""

    source: str = ""  # the file, folder or pattern read ("" for generated data)
    samples: list[Sample] = dataclasses.field(default_factory=list)  # every valid record
    errors: list[DataError] = dataclasses.field(default_factory=list)  # every problem, in file and record order
    files: list[str] = dataclasses.field(default_factory=list)  # the data files read
    skipped: list[str] = dataclasses.field(default_factory=list)  # files under a folder/pattern of other types
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # table file -> the columns used


def read_records(path: str | os.PathLike, format: str = "auto", question_column: str | None = None,
                 answer_column: str | None = None, system_column: str | None = "system") -> list[Sample]:
    """Read and validate a data file, folder or glob pattern; raises the first `DataError` found.

    Tables: question_column / answer_column None detects them from the common names (q/a, question/answer, ...).
    """
    reading = read_source(path, format, question_column, answer_column, system_column)
    if reading.errors:
        raise reading.errors[0]
    return reading.samples


def read_source(path: str | os.PathLike, format: str = "auto", question_column: str | None = None,
                answer_column: str | None = None, system_column: str | None = "system") -> Reading:
    """Every valid sample of a file, folder or glob pattern, and every error found in it."""
    reading = Reading(source=str(path))
    try:
        if format != "auto" and format not in FORMATS:
            raise DataError(path, 0, None, f"unknown format {format!r}; use auto or one of {list(FORMATS)}")
        files, reading.skipped = data_files(Path(path))
    except DataError as e:
        reading.errors.append(e)
        return reading
    for file in files:
        reading.files.append(str(file))
        _read_file(file, str(path), format, (question_column, answer_column, system_column), reading)
    return reading


def data_files(path: Path) -> tuple[list[Path], list[str]]:
    """(data files, skipped files) of a source: the file itself, the files under a folder, or a pattern's matches."""
    if path.is_dir():
        found, what = _walk(path), "under this folder"
    elif not path.exists() and any(c in str(path) for c in GLOB_CHARS):
        found, what = _glob(path), "match this pattern"
    elif not path.exists() and not path.suffix:
        raise DataError(path, 0, None, "no such file or folder")
    else:
        return [path], []
    files = [f for f in found if f.suffix.lower() in SUFFIXES]
    if not files:
        others = f"; it has only {', '.join(sorted({f.suffix or f.name for f in found}))}" if found else ""
        raise DataError(path, 0, None, f"no data files {what} ({', '.join(SUFFIXES)}){others}")
    return files, [str(f) for f in found if f.suffix.lower() not in SUFFIXES]


def _walk(folder: Path) -> list[Path]:
    """Files under a folder, recursively, sorted; hidden files and folders and Excel lock files left out."""
    return sorted((p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder))),
                  key=lambda p: p.parts)


def _glob(pattern: Path) -> list[Path]:
    """Files matching a pattern (`**` spans folders); a matching folder contributes the files under it."""
    files: list[Path] = []
    for match in sorted(glob.glob(str(pattern), recursive=True)):
        p = Path(match)
        files += _walk(p) if p.is_dir() else [p] if p.is_file() and not _hidden(Path(p.name)) else []
    return sorted(set(files), key=lambda p: p.parts)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts) or relative.name.startswith("~$")


def detect_format(path: str | os.PathLike) -> str:
    """The format of a data file, from its extension and the fields of its first record."""
    path = Path(path)
    kind = _file_kind(path)
    if kind != "json":
        return kind
    errors: list[DataError] = []
    return _format_from_records(path, _json_records(path, _decode(path), errors), errors)


def _read_file(path: Path, source: str, format: str, wanted: WantedColumns, reading: Reading) -> None:
    """Add the samples and errors of one file to `reading`."""
    errors: list[DataError] = []
    try:
        kind = _file_kind(path)
        raw, available = _load_raw(path, kind, errors)
        fmt = _pick_format(path, kind, format, raw, errors)
        columns = _columns(path, kind, fmt, raw, available, wanted, reading)
    except DataError as e:
        reading.errors += errors if e in errors else errors + [e]
        return
    convert = converter(fmt, columns)
    for number, rec in raw:
        try:
            content = convert(rec)
        except RecordError as bad:
            errors.append(DataError(path, number, bad.field, bad.message))
            continue
        text, messages = (content, []) if isinstance(content, str) else (None, content)
        reading.samples.append(Sample(messages=messages, text=text, source=source, record=number, file=str(path)))
    reading.errors += sorted(errors, key=lambda e: e.record)


def _columns(path: Path, kind: str, fmt: str, raw: list[tuple[int, Any]], available: list[str],
             wanted: WantedColumns, reading: Reading):
    """The question/answer/system columns for table records (given, or detected), noted in `reading`."""
    if fmt != "table":
        return wanted
    if kind == "table":
        columns, note = pick_columns(path, available, wanted)
    else:  # JSON records in table form: columns from the first record's fields, when they tell
        first = raw[0][1] if raw else {}
        try:
            columns, note = pick_columns(path, [str(k) for k in first] if isinstance(first, dict) else [], wanted,
                                         check_given=False)
        except DataError:  # they do not: each record missing a field will say so
            return wanted[0] or "question", wanted[1] or "answer", wanted[2]
    reading.columns[str(path)] = note
    return columns


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return "table"
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSON_SUFFIXES:
        return "json"
    raise DataError(path, 0, None, f"unknown file type {suffix or '(no extension)'!r}; use one of {', '.join(SUFFIXES)}")


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
    fmt = format_of(first)
    if fmt:
        return fmt
    fields = sorted(first) if isinstance(first, dict) else kind_of(first)
    raise DataError(path, number, None, f"cannot tell the data format from this record ({fields}); "
                                        f"set format to one of {list(FORMATS)}")


def _load_raw(path: Path, kind: str, errors: list[DataError]) -> tuple[list[tuple[int, Any]], list[str]]:
    """(record number, raw record) pairs and, for tables, the column names; unreadable JSON lines go to `errors`."""
    available: list[str] = []
    if kind == "table":
        available, raw = table_rows(path, None if path.suffix.lower() == ".xlsx" else _decode(path))
    elif kind == "text":
        raw = _text_documents(_decode(path))
    else:
        raw = _json_records(path, _decode(path), errors)
    if not raw and not errors:
        raise DataError(path, 0, None, "no records: the file holds no data")
    return raw, available


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
        top = _parse_json(text)
    except json.JSONDecodeError as e:
        if path.suffix.lower() == ".jsonl" or _first_line_is_json(text):
            return _jsonl_records(path, text, errors)
        raise DataError(path, 0, None, f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except _TooDeep as deep:
        if path.suffix.lower() == ".jsonl" or _first_line_is_json(text):
            return _jsonl_records(path, text, errors)
        raise DataError(path, deep.record, None, deep.message(with_line=True)) from None
    if isinstance(top, list):
        return list(enumerate(top, 1))
    if isinstance(top, dict):
        return [(1, top)]
    raise DataError(path, 0, None, f"the top level must be a list of records (or one record object), got {kind_of(top)}")


def _first_line_is_json(text: str) -> bool:
    first = next(line for line in text.split("\n") if line.strip())
    try:
        return isinstance(_parse_json(first), dict)
    except (json.JSONDecodeError, _TooDeep):
        return False


def _jsonl_records(path: Path, text: str, errors: list[DataError]) -> list[tuple[int, Any]]:
    """One record per line; the record number is the line number. Blank lines are skipped."""
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((number, _parse_json(line)))
        except json.JSONDecodeError as e:
            errors.append(DataError(path, number, None, f"not valid JSON: {e.msg} at column {e.colno}"))
        except _TooDeep as deep:
            errors.append(DataError(path, number, None, deep.message(with_line=False)))
    return records


class _TooDeep(Exception):
    """JSON nested too deeply for Python's parser; where: the record (its place in a top-level list) and the line."""

    def __init__(self, record: int, line: int, depth: int):
        super().__init__(f"nested too deeply: {depth} levels of lists/objects")
        self.record, self.line = record, line

    def message(self, with_line: bool) -> str:
        return f"{self}{f' at line {self.line}' if with_line else ''} (a data record nests a few levels at most)"


def _parse_json(text: str) -> Any:
    """json.loads; a nest too deep for it (a RecursionError near 1000 levels) becomes `_TooDeep`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _TooDeep(*_deepest(text)) from None


_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{},\n]')


def _deepest(text: str) -> tuple[int, int, int]:
    """(record, line, depth) of the first deepest point of a JSON text; strings are skipped whole."""
    depth = deepest = 0
    record, line, at = 1, 1, (1, 1)
    top_list = text.lstrip().startswith("[")
    for token in _JSON_TOKENS.finditer(text):
        t = token.group()
        if t == "[" or t == "{":
            depth += 1
            if depth > deepest:
                deepest, at = depth, (record if top_list else 1, line)
        elif t == "]" or t == "}":
            depth -= 1
        elif t == ",":
            record += depth == 1
        else:
            line += t.count("\n")
    return at[0], at[1], deepest


def _text_documents(text: str) -> list[tuple[int, str]]:
    """Plain-text documents: blocks of lines separated by at least one blank line."""
    blocks = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    return list(enumerate((b.strip() for b in blocks if b.strip()), 1))
