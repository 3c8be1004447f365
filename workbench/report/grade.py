"""Grading a class: every submission (adapter, merged model or run) in a folder, one sortable table.

Each entry of the folder is a submission. Each is evaluated on the same held-out probes
(`workbench.report.subject`), gets a report card (`workbench.report.card`) under OUT/cards/, and one
row in OUT/grades.csv and OUT/grades.html. A submission that cannot be evaluated (a corrupt adapter,
a folder that is no model, a missing config) gets a row that says what is wrong; grading goes on.
A roster (CSV: submission, owner, assistant) names each student's assistant for homework exported by
another tool (XTuner), which carries no names; a student in the roster with no submission gets a row too.
The HTML table sorts by a click on a column header (a few lines of vanilla JavaScript, no CDN).
"""
from __future__ import annotations

import csv
import html
import math
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from workbench import i18n
from workbench.analysis import Probes, load_probes
from workbench.i18n.report import GRADE_COLUMNS_ZH
from workbench.io import atomic_write_text
from workbench.report.card import interval, kept_report, names, role_mixups, targets, verdict, write_card
from workbench.report.subject import Given, SubjectError, analyze_subject
from workbench.samples import DataError

# The rate columns and the probes each counts (kind, language): the page shows each rate with its count.
RATE_PROBES = {"hit unseen EN": ("identity_unseen", "en"), "hit unseen ZH": ("identity_unseen", "zh"),
               "leak EN": ("general", "en"), "leak ZH": ("general", "zh"),
               "strict EN": ("general", "en"), "strict ZH": ("general", "zh")}
COLUMNS = ["submission", "status", "kind", "assistant", "owner", "kept", "hit unseen EN", "hit unseen ZH",
           "role mix-ups", "leak EN", "leak ZH", "strict EN", "strict ZH", "similarity", "facts lost", "targets met",
           "verdict", "card"]


def submissions(folder: Path, out: Path) -> list[Path]:
    """The folder's entries, sorted, without hidden ones and the grading output itself."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith((".", "_")) and p.resolve() != out.resolve())


def grade_folder(folder: str | Path, base: str | None = None, out: str | Path | None = None, probes: Probes | None = None,
                 max_new_tokens: int = 40, progress: bool = True, lang: str = "en", given: Given = Given(),
                 roster: str | Path | None = None):
    """Grade every submission in `folder`; write OUT/grades.csv, OUT/grades.html and a card each (pandas DataFrame).
    The cards, statuses, kinds and verdicts are in `lang`; grades.html's headers too (grades.csv keeps the English
    column names; an error's own text, naming the file and field, is as raised).
    `given`: names and system prompt for every submission; `roster`: a CSV naming each one's (`read_roster`)."""
    import pandas as pd  # heavy: only for the table

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of submissions")
    out = Path(out) if out else folder / "_grades"
    probes = probes or load_probes()
    named = read_roster(roster) if roster else {}
    cache: dict = {}
    rows = []
    subs = submissions(folder, out)
    for sub in tqdm(subs, desc=i18n.t("grade.progress", lang), unit="submission", disable=not progress):
        rows.append(grade_one(sub, base, out, probes, max_new_tokens, cache, lang, _given_for(sub.name, named, given)))
    rows += [missing_row(name, named[name], roster, folder, lang) for name in named if name not in {s.name for s in subs}]
    table = pd.DataFrame(rows, columns=COLUMNS)
    atomic_write_text(out / "grades.csv", table.to_csv(index=False))
    atomic_write_text(out / "grades.html", sortable_html(table, i18n.t("grade.title", lang, folder=folder), lang,
                                                         probe_counts(probes)))
    return table


def read_roster(path: str | Path) -> dict[str, Given]:
    """A roster CSV (UTF-8, a spreadsheet's "CSV UTF-8" export): a header with `submission` (the folder's name) and
    `owner`, optionally `assistant` (empty: the saved config's, or for another tool's export no name of its own);
    a clear error naming the file, the record (a student's line, 1 for the first under the header) and the field."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header, lines = [h.strip() for h in reader.fieldnames or []], list(reader)
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such roster file") from None
    except UnicodeDecodeError as e:
        raise DataError(p, 0, None, f"not UTF-8 text ({e.reason} at byte {e.start}); save the roster as 'CSV UTF-8'") from None
    missing = [c for c in ("submission", "owner") if c not in header]
    if missing or not lines:
        raise DataError(p, 0, None, "a roster needs a header with the columns submission and owner (and optionally "
                        f"assistant), and a line per student; {'its header lacks ' + ', '.join(missing) if missing else 'it has no student'}")
    roster: dict[str, Given] = {}
    for n, line in enumerate(lines, start=1):
        entry = {k.strip(): (v or "").strip() for k, v in line.items() if k}
        for field in ("submission", "owner"):
            if not entry.get(field):
                raise DataError(p, n, field, "is empty")
        if entry["submission"] in roster:
            raise DataError(p, n, "submission", f"{entry['submission']!r} is listed twice")
        roster[entry["submission"]] = Given(assistant_name=entry.get("assistant") or None, owner_name=entry["owner"])
    return roster


def _given_for(name: str, roster: dict[str, Given], given: Given) -> Given:
    """The roster's names for this submission where it lists them, the command line's otherwise; the system prompt given."""
    listed = roster.get(name)
    if listed is None:
        return given
    return replace(listed, system=given.system,
                   assistant_name=given.assistant_name if listed.assistant_name is None else listed.assistant_name)


def missing_row(name: str, listed: Given, roster, folder: Path, lang: str = "en") -> dict:
    """The row of a student in the roster whose submission is not in the folder."""
    row = {c: "" for c in COLUMNS} | {"submission": name, "assistant": listed.assistant_name or "", "owner": listed.owner_name}
    row["status"] = i18n.t("grade.missing", lang, roster=Path(roster).name, folder=folder)
    return row


def grade_one(sub: Path, base: str | None, out: Path, probes: Probes, max_new_tokens: int, cache: dict,
              lang: str = "en", given: Given = Given()) -> dict:
    """One row; every failure becomes the row's status. Catching Exception is deliberate here: one broken
    homework must not stop the grading of the class (KeyboardInterrupt still stops it)."""
    row = {c: "" for c in COLUMNS}
    row["submission"] = sub.name
    try:
        with converted_for_its_row(sub):
            run = analyze_subject(sub, base, probes, max_new_tokens, progress=False, base_cache=cache, given=given)
        card, _ = write_card(run, out / "cards" / f"{sub.name}.html", lang)
    except Exception as e:  # noqa: BLE001 - see the docstring
        text = e.in_lang(lang) if isinstance(e, SubjectError) else str(e)
        error = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
        row["status"] = i18n.t("grade.error", lang, error=error)
        return row
    r, (name, owner), t = kept_report(run), names(run), targets(run)
    kind = run.config.get("subject_kind", "run")
    row.update({"status": i18n.t("grade.ok", lang), "kind": i18n.t(f"grade.kind_{kind}", lang), "assistant": name,
                "owner": owner, "kept": r.label, "hit unseen EN": r.hit_unseen.get("en"), "hit unseen ZH": r.hit_unseen.get("zh"),
                "role mix-ups": len(role_mixups(r, name, owner)), "leak EN": r.leak.get("en"), "leak ZH": r.leak.get("zh"),
                "strict EN": r.strict.get("en"), "strict ZH": r.strict.get("zh"), "similarity": r.similarity,
                "facts lost": r.n_facts_lost, "targets met": f"{sum(x.met for x in t)}/{len(t)}", "verdict": verdict(run, lang),
                "card": str(card.relative_to(out))})
    return row


@contextmanager
def converted_for_its_row(sub: Path):
    """A merged InternLM2 submission is evaluated through its conversion, a second copy of its weights (3.6 GB for
    the camp's 1.8B model) in the conversion cache. The copy made for grading is removed once the submission's row
    is done, so that a class of merged homework leaves no copy per student; one that was there before stays."""
    from workbench.convert_models.internlm2 import converted_dir, is_internlm2
    from workbench.models import converted_root

    target = converted_dir(sub, converted_root())[0] if sub.is_dir() and is_internlm2(sub) else None
    made_here = target is not None and not target.exists()
    try:
        yield
    finally:
        if made_here:
            shutil.rmtree(target, ignore_errors=True)


_SORT_JS = """
// Click a header to sort by that column (numbers as numbers), again to reverse.
document.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
  const dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
  const key = r => { const t = r.cells[col].dataset.v ?? r.cells[col].textContent; const n = parseFloat(t);
                     return isNaN(n) ? t.toLowerCase() : n; };
  rows.sort((a, b) => { const x = key(a), y = key(b);
    return (typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1)) * dir; });
  rows.forEach(r => body.appendChild(r));
}));
"""


def probe_counts(probes: Probes) -> dict[str, int]:
    """How many probes each rate column counts: the same for every submission, all answer the same probes."""
    items = probes.items()
    return {c: sum(1 for kind, lang, _ in items if (kind, lang) == key) for c, key in RATE_PROBES.items()}


def _rate_cell(v: float, n: int | None, lang: str) -> str:
    """A rate as the page shows it, with the count it stands for where the column has probes ("0.92 (24/26)", on
    one line; its 95% interval on hover), sorted by the rate itself."""
    if math.isnan(v):
        return "<td data-v=''>-</td>"
    if not n:
        return f"<td class='rate' data-v='{v}'>{v:.2f}</td>"
    lo, hi = interval(round(v * n), n)
    tip = i18n.t("grade.interval", lang, lo=f"{lo:.2f}", hi=f"{hi:.2f}")
    count = i18n.t("grade.count", lang, k=round(v * n), n=n)
    return f"<td class='rate' data-v='{v}' title='{html.escape(tip)}'>{v:.2f}{html.escape(count)}</td>"


def sortable_html(table, title: str, lang: str = "en", counts: dict[str, int] | None = None) -> str:
    """The table as a page whose columns sort on a click; the card column links each report card (headers in `lang`);
    `counts`: the probes behind each rate column (`probe_counts`), shown beside the rate."""
    esc = html.escape
    header = (lambda c: GRADE_COLUMNS_ZH.get(c, c)) if lang == "zh" else (lambda c: c)
    head = "".join(f"<th title='{esc(i18n.t('grade.sort', lang))}'>{esc(header(c))}</th>" for c in table.columns)
    body = []
    for _, row in table.iterrows():
        cells = []
        for c in table.columns:
            v = row[c]
            if c == "card" and v:
                cells.append(f"<td><a href='{esc(str(v))}'>{esc(i18n.t('grade.card_link', lang))}</a></td>")
            elif c == "verdict":  # the longest text: wide enough that a row stays a few lines high
                cells.append(f"<td class='verdict'>{esc(str(v))}</td>")
            elif isinstance(v, float):
                cells.append(_rate_cell(v, (counts or {}).get(c), lang))
            else:
                cells.append(f"<td>{esc(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"""<!DOCTYPE html>
<html lang="{'zh-CN' if lang == 'zh' else 'en'}"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:"DejaVu Sans","Noto Sans CJK SC",sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}}th{{background:#f2f2f2;cursor:pointer}}
td.rate{{white-space:nowrap}}td.verdict{{min-width:32em}}</style></head><body>
<h1>{esc(title)}</h1><p>{esc(i18n.t('grade.summary', lang, n=len(table)))}</p>
<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
<script>{_SORT_JS}</script></body></html>
"""
