"""Encoding: samples become token rows for training, with a report of what that gives.

`encode_samples` encodes each sample with the prompt builder (loss on the
assistant turns, or on every token of a text document), truncates to
`max_length` and drops samples with nothing left to train. Its
`DatasetReport` counts records, files, tokens, truncated and dropped samples,
per source, with the table columns used and the errors found.
`check_dataset` reads a data file, folder, pattern or a config's whole
mixture, encodes it and reports every problem, writing nothing
(`workbench check-dataset`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from workbench.config import RECIPES_DIR, Config, ConfigError, resolve_config, resolve_path
from workbench.i18n import t
from workbench.mixing import mix, read_configured
from workbench.prompt import IGNORE, Encoded, PromptBuilder, builder_for
from workbench.readers import Reading, read_source
from workbench.retention import first_sentence
from workbench.samples import Sample
from workbench.unlikelihood import twin_labels

MAX_ERRORS_SHOWN = 20
MAX_DROPPED_SHOWN = 5


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
    n_files: int = 0  # data files read (a file source counts one)
    files: dict[str, int] = dataclasses.field(default_factory=dict)  # data files per folder or glob source
    skipped: list[str] = dataclasses.field(default_factory=list)  # files of other types under a folder or pattern
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # table file -> the columns used

    @property
    def ok(self) -> bool:
        return not self.errors

    def add_error(self, error: Exception | str) -> None:
        self.n_errors += 1
        if len(self.errors) < MAX_ERRORS_SHOWN:
            self.errors.append(str(error))

    def add_readings(self, readings: list[Reading]) -> None:
        """Count files, skipped files and table columns from what the readers saw (files whose records all failed too)."""
        self.n_files, self.files, self.skipped, self.columns = 0, {}, [], {}
        for reading in readings:
            if not reading.source:  # generated data
                continue
            self.n_files += len(reading.files)
            if reading.files != [reading.source]:
                self.files[reading.source] = len(reading.files)
            self.skipped += reading.skipped
            self.columns.update(reading.columns)

    def __str__(self) -> str:
        return self.text("en")

    def text(self, lang: str | None = None) -> str:
        """The report in `lang` ("en"/"zh"; None: the session's, workbench.i18n.set_lang); errors stay as raised."""
        share = 100 * self.n_trained_tokens / self.n_tokens if self.n_tokens else 0.0
        limit = t("ds.limit", lang, n=self.max_length) if self.max_length else ""
        lines = [t("ds.records", lang, n=self.n_records, kept=self.n_samples, dropped=self.n_dropped)]
        lines += self._file_lines(lang)
        lines += [t("ds.tokens", lang, n=self.n_tokens, trained=self.n_trained_tokens, share=share),
                  t("ds.longest", lang, n=self.max_len, limit=limit)]
        if self.n_truncated:
            lines.append(t("ds.truncated", lang, n=self.n_truncated))
        if self.n_dropped:
            lines.append(t("ds.dropped", lang, n=self.n_dropped, where="; ".join(self.dropped)))
        parts = ", ".join(f"{k} {v}" for k, v in self.per_source.items()) or t("ds.none", lang)
        lines.append(t("ds.per_source", lang, parts=parts))
        lines += self._column_lines(lang)
        lines += self._error_lines(lang)
        return "\n".join(lines)

    def _file_lines(self, lang: str | None) -> list[str]:
        """A files line when a source is a folder or pattern (a report of file sources stays as it was)."""
        if not self.files and not self.skipped:
            return []
        parts = ", ".join(t("ds.n_files", lang, source=k, n=v) for k, v in self.files.items())
        line = t("ds.files", lang, n=self.n_files, parts=parts)
        if self.skipped:
            n = len(self.skipped)
            line += t("ds.skipped" if n > 1 else "ds.skipped_one", lang, n=n, first=self.skipped[0])
        return [line]

    def _column_lines(self, lang: str | None) -> list[str]:
        """Which table columns were read, one line per choice (a folder of like tables gives one line)."""
        by_choice: dict[str, list[str]] = {}
        for file, note in self.columns.items():
            by_choice.setdefault(note, []).append(file)
        return [t("ds.columns", lang, note=note,
                  where=files[0] if len(files) == 1 else t("ds.files_eg", lang, n=len(files), first=files[0]))
                for note, files in by_choice.items()]

    def _error_lines(self, lang: str | None) -> list[str]:
        total = max(self.n_errors, len(self.errors))
        if not total:
            return [t("ds.errors_none", lang)]
        lines = [t("ds.errors", lang, n=total)] + [f"  {e}" for e in self.errors]
        if total > len(self.errors):
            lines.append(t("ds.more", lang, n=total - len(self.errors)))
        return lines


def encode_samples(samples: Iterable[Sample], builder: PromptBuilder, max_length: int,
                   loss_on: str = "all_turns", vocab_size: int | None = None) -> tuple[list[Encoded], DatasetReport]:
    """Encode samples for training; samples with no trained token left are dropped and counted.

    vocab_size: the model's embedding rows; a sample with a token id at or above it is an error
    naming the record (the tokenizer does not fit the model; training would fail on it).
    """
    report = DatasetReport(max_length=max_length)
    encoded: list[Encoded] = []
    cache: dict = {}
    files: dict[str, set[str]] = {}
    for sample in samples:
        report.n_records += 1
        report.per_source[sample.source] = report.per_source.get(sample.source, 0) + 1
        if sample.file:
            files.setdefault(sample.source, set()).add(sample.file)
        enc = _encode_cached(sample, builder, max_length, loss_on, cache)
        if vocab_size is not None and enc.input_ids and max(enc.input_ids) >= vocab_size:
            report.add_error(_out_of_vocab(sample, enc, builder, vocab_size))
            continue
        if not enc.n_trained and not (enc.negative and enc.labels.count(IGNORE) < len(enc.labels)):  # nothing to learn or push down
            report.n_dropped += 1
            if len(report.dropped) < MAX_DROPPED_SHOWN:
                report.dropped.append(sample.where)
            continue
        encoded.append(enc)
        _count(report, enc)
    report.n_files = sum(len(f) for f in files.values())
    report.files = {source: len(f) for source, f in files.items() if f != {source}}
    return encoded, report


def _out_of_vocab(sample: Sample, enc: Encoded, builder: PromptBuilder, vocab_size: int) -> str:
    bad = sorted({t for t in enc.input_ids if t >= vocab_size})
    pieces = builder.tokenizer.convert_ids_to_tokens(bad[:3])
    return (f"{sample.where}: token id{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:3]))} ({', '.join(map(repr, pieces))}) "
            f"at or above the model's vocabulary size {vocab_size}: the tokenizer does not fit the model's embedding")


def _encode_cached(sample: Sample, builder: PromptBuilder, max_length: int, loss_on: str, cache: dict) -> Encoded:
    """Encode once per distinct sample (repeated data is common); each caller gets its own copy."""
    key = sample.text if sample.text is not None else tuple((m["role"], m["content"]) for m in sample.messages)
    if key not in cache:
        cache[key] = (builder.encode_text(sample.text, max_length) if sample.text is not None
                      else builder.encode(sample.messages, max_length, loss_on))
    enc = cache[key]
    if sample.distill and ("opening", key) not in cache:
        cache["opening", key] = answer_openings(enc.labels, builder.tokenizer)
    labels = (twin_labels(enc.labels, len(builder.tokenizer.encode(sample.negative, add_special_tokens=False)), builder.tokenizer)
              if sample.negative else list(enc.labels))
    return Encoded(list(enc.input_ids), labels, enc.truncated, distill=sample.distill,
                   unlikelihood=sample.unlikelihood, roles=sample.roles, negative=bool(sample.negative),
                   opening=cache["opening", key] if sample.distill else frozenset())


def answer_openings(labels: list[int], tokenizer) -> frozenset[int]:
    """The label indices of each answer's first sentence, cut as the strict retention measure cuts it
    (`retention.first_sentence`): what greedy decoding of an answer goes on from (Config.distill_opening_factor)."""
    out: set[int] = set()
    for start, end in answer_spans(labels):
        out.update(range(start, start + opening_length(labels[start:end], tokenizer)))
    return frozenset(out)


def answer_spans(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of trained labels: one per assistant answer."""
    spans, start = [], None
    for i, x in enumerate([*labels, IGNORE]):
        if x != IGNORE and start is None:
            start = i
        elif x == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def opening_length(tokens: list[int], tokenizer) -> int:
    """The fewest leading `tokens` whose text holds the answer's first sentence (at least one; a bisection, since
    a longer prefix decodes to a longer text)."""
    def text(n: int) -> str:
        return tokenizer.decode(tokens[:n], skip_special_tokens=True).strip()

    full = text(len(tokens))
    sentence = first_sentence(full)
    end = full.find(sentence) + len(sentence)
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(text(mid)) >= end else (mid + 1, hi)
    return lo


def _count(report: DatasetReport, enc: Encoded) -> None:
    report.n_samples += 1
    report.n_truncated += enc.truncated
    report.n_tokens += len(enc)
    report.n_trained_tokens += enc.n_trained
    report.max_len = max(report.max_len, len(enc))


def check_dataset(path_or_config: str | os.PathLike | Config, tokenizer=None, max_length: int | None = None,
                  strict: bool = True, vocab_size: int | None = None) -> DatasetReport:
    """Read, validate and encode a data file, folder, pattern or a config's data mixture; report every problem.

    Writes nothing. tokenizer: a tokenizer, a model name, or None for the
    config's model (the embedded model for bare data). max_length: None for
    the config's. strict: samples that would be dropped (nothing trainable
    after truncation) count as an error too, so `report.ok` is False. vocab_size: the model's
    (default: read from the model's config when the tokenizer is given by name or comes from the
    config); token ids at or above it are errors naming the record.
    """
    cfg, samples, errors, readings = _gather(path_or_config)
    builder = builder_for(cfg, _tokenizer(tokenizer, cfg))
    if vocab_size is None and not (tokenizer is not None and not isinstance(tokenizer, str)):
        from workbench.models import model_vocab_size  # models imports torch; reading data does not need it

        vocab_size = model_vocab_size(tokenizer or cfg.pretrained_model_name_or_path, cfg.trust_remote_code)
    _, report = encode_samples(samples, builder, max_length or cfg.max_length, cfg.loss_on, vocab_size)
    report.add_readings(readings)
    for error in errors:
        report.add_error(error)
    if strict and report.n_dropped:
        report.add_error(f"{report.n_dropped} samples would be dropped: their prompt fills max_length={report.max_length}, "
                         f"so no answer token is left to train (e.g. {report.dropped[0]}); raise max_length or shorten them")
    return report


def _gather(path_or_config: str | os.PathLike | Config) -> tuple[Config, list[Sample], list[Exception], list[Reading]]:
    """The config, the samples it reads (mixed), every error found on the way, and what each source's reading gave."""
    if not isinstance(path_or_config, Config) and not _names_config(path_or_config):
        reading = read_source(resolve_path(path_or_config))
        return Config(), reading.samples, list(reading.errors), [reading]
    cfg = path_or_config if isinstance(path_or_config, Config) else resolve_config(str(path_or_config))
    readings = [read_configured(src, cfg) for src in cfg.datasets]
    errors: list[Exception] = [e for r in readings for e in r.errors]
    loaded = [r.samples for r in readings]
    try:
        return cfg, mix(loaded, cfg), errors, readings
    except ConfigError as e:
        return cfg, [s for samples in loaded for s in samples], errors + [e], readings


def _names_config(path: str | os.PathLike) -> bool:
    """A config YAML, or the name of a shipped recipe that is no data file or folder here."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        return True
    return not p.suffix and not resolve_path(p).exists() and (RECIPES_DIR / f"{p}.yaml").exists()


def _tokenizer(tokenizer, cfg: Config):
    from workbench.models import load_tokenizer  # models imports torch; reading and checking data does not need it

    if tokenizer is None:
        return load_tokenizer(cfg.pretrained_model_name_or_path, cfg.trust_remote_code)
    if isinstance(tokenizer, str):
        return load_tokenizer(tokenizer, cfg.trust_remote_code)
    return tokenizer
