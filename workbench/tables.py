"""Tables: CSV/TSV/XLSX files as rows of text, and which columns hold the question and the answer.

A table's rows become records {column: text}, numbered from 1 after the
header (completely empty rows are skipped but keep their number). The
question and answer columns are the ones a config names (`question_column`,
`answer_column`); when it names none, the one known pair of column names the
table has is used (`QA_COLUMNS`, case-insensitive), and the caller reports
which. A table with several known pairs, or none, is an error that lists its
columns. The system column is optional: used when the table has it.
"""
from __future__ import annotations

import io
from pathlib import Path

from workbench.formats import Columns
from workbench.samples import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".xlsx")
# Question/answer column names found in tutorials' spreadsheets, in the order they are tried.
QA_COLUMNS = (("q", "a"), ("question", "answer"), ("prompt", "response"), ("instruction", "output"), ("问题", "答案"))
WantedColumns = tuple[str | None, str | None, str | None]  # question, answer, system; None: detect (system: none)


def table_rows(path: Path, text: str | None = None) -> tuple[list[str], list[tuple[int, dict]]]:
    """The table's column names and its non-empty rows as (row number, {column: text}).

    text: the file's content, decoded, for CSV/TSV (None for XLSX, read from `path`).
    """
    frame = _read_frame(path, text)
    frame.columns = [str(c).strip() for c in frame.columns]
    rows = frame.to_dict("records")
    return list(frame.columns), [(i, row) for i, row in enumerate(rows, 1) if any(str(v).strip() for v in row.values())]


def _read_frame(path: Path, text: str | None):
    import pandas as pd  # heavy (about a second to import); only tables need it

    if text is None:
        if not path.exists():
            raise DataError(path, 0, None, "file not found")
        try:
            return pd.read_excel(path, dtype=str, keep_default_na=False)
        except Exception as e:  # noqa: BLE001 - openpyxl raises many types for broken files
            raise DataError(path, 0, None, f"cannot read the Excel file: {e}") from None
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.ParserError as e:
        raise DataError(path, 0, None, f"not a valid table: {e}") from None


def pick_columns(path: Path, available: list[str], wanted: WantedColumns, check_given: bool = True) -> tuple[Columns, str]:
    """(question, answer, system) columns to read, and a note saying which were used and how.

    Given columns win (check_given: they must exist); a missing name is detected from `QA_COLUMNS`.
    The system column is kept only when the table has it.
    """
    question, answer, system = wanted
    if check_given:
        for column in (question, answer):
            if column is not None and column not in available:
                raise DataError(path, 0, column, f"column missing; the table's columns are {available} "
                                                 "(set question_column / answer_column to the right names)")
    how = "given"
    if question is None or answer is None:
        question, answer = _detect_pair(path, available, question, answer)
        how = "detected"
    system = system if system in available else None
    note = f"question '{question}', answer '{answer}'" + (f", system '{system}'" if system else "") + f" ({how})"
    return (question, answer, system), note


def _detect_pair(path: Path, available: list[str], question: str | None, answer: str | None) -> tuple[str, str]:
    """The one known question/answer pair among the columns (a given side stays as it is)."""
    pairs: list[tuple[str, str]] = []
    for q_name, a_name in QA_COLUMNS:
        for q in [question] if question else _named(available, q_name):
            for a in [answer] if answer else _named(available, a_name):
                if (q, a) not in pairs and q != a:
                    pairs.append((q, a))
    if len(pairs) == 1:
        return pairs[0]
    known = ", ".join(f"{q}/{a}" for q, a in QA_COLUMNS)
    if not pairs:
        raise DataError(path, 0, None, f"no question and answer columns found; the table's columns are {available}. "
                                       f"Name them {known} (any case), or set question_column and answer_column")
    found = ", ".join(f"{q}/{a}" for q, a in pairs)
    raise DataError(path, 0, None, f"cannot tell the question and answer columns: the table has several known pairs "
                                   f"({found}); its columns are {available}. Set question_column and answer_column")


def _named(available: list[str], name: str) -> list[str]:
    return [c for c in available if c.casefold() == name.casefold()]
