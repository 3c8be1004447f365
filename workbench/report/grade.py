"""Grading a class: every submission (adapter, merged model or run) in a folder, one sortable table.

Each entry of the folder is a submission. Each is evaluated on the same held-out probes
(`workbench.report.subject`), gets a report card (`workbench.report.card`) under OUT/cards/, and one
row in OUT/grades.csv and OUT/grades.html. A submission that cannot be evaluated (a corrupt adapter,
a folder that is no model, a missing config) gets a row that says what is wrong; grading goes on.
The HTML table sorts by a click on a column header (a few lines of vanilla JavaScript, no CDN).
"""
from __future__ import annotations

import html
import math
from pathlib import Path

from tqdm.auto import tqdm

from workbench import i18n
from workbench.analysis import Probes, load_probes
from workbench.i18n.report import GRADE_COLUMNS_ZH
from workbench.io import atomic_write_text
from workbench.report.card import kept_report, names, role_mixups, targets, verdict, write_card
from workbench.report.subject import analyze_subject

COLUMNS = ["submission", "status", "kind", "assistant", "owner", "kept", "hit unseen EN", "hit unseen ZH",
           "role mix-ups", "leak EN", "leak ZH", "strict EN", "strict ZH", "similarity", "facts lost", "targets met",
           "verdict", "card"]


def submissions(folder: Path, out: Path) -> list[Path]:
    """The folder's entries, sorted, without hidden ones and the grading output itself."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith((".", "_")) and p.resolve() != out.resolve())


def grade_folder(folder: str | Path, base: str | None = None, out: str | Path | None = None, probes: Probes | None = None,
                 max_new_tokens: int = 40, progress: bool = True, lang: str = "en"):
    """Grade every submission in `folder`; write OUT/grades.csv, OUT/grades.html and a card each (pandas DataFrame).
    The cards and the verdicts are in `lang`; grades.html's headers too (grades.csv keeps the English column names)."""
    import pandas as pd  # heavy: only for the table

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of submissions")
    out = Path(out) if out else folder / "_grades"
    probes = probes or load_probes()
    cache: dict = {}
    rows = []
    for sub in tqdm(submissions(folder, out), desc=i18n.t("grade.progress", lang), unit="submission", disable=not progress):
        rows.append(grade_one(sub, base, out, probes, max_new_tokens, cache, lang))
    table = pd.DataFrame(rows, columns=COLUMNS)
    atomic_write_text(out / "grades.csv", table.to_csv(index=False))
    atomic_write_text(out / "grades.html", sortable_html(table, i18n.t("grade.title", lang, folder=folder), lang))
    return table


def grade_one(sub: Path, base: str | None, out: Path, probes: Probes, max_new_tokens: int, cache: dict,
              lang: str = "en") -> dict:
    """One row; every failure becomes the row's status. Catching Exception is deliberate here: one broken
    homework must not stop the grading of the class (KeyboardInterrupt still stops it)."""
    row = {c: "" for c in COLUMNS}
    row["submission"] = sub.name
    try:
        run = analyze_subject(sub, base, probes, max_new_tokens, progress=False, base_cache=cache)
        card, _ = write_card(run, out / "cards" / f"{sub.name}.html", lang)
    except Exception as e:  # noqa: BLE001 - see the docstring
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return row
    r, (name, owner), t = kept_report(run), names(run), targets(run)
    row.update({"status": "ok", "kind": run.config.get("subject_kind", "run"), "assistant": name, "owner": owner,
                "kept": r.label, "hit unseen EN": r.hit_unseen.get("en"), "hit unseen ZH": r.hit_unseen.get("zh"),
                "role mix-ups": len(role_mixups(r, name, owner)), "leak EN": r.leak.get("en"), "leak ZH": r.leak.get("zh"),
                "strict EN": r.strict.get("en"), "strict ZH": r.strict.get("zh"), "similarity": r.similarity,
                "facts lost": r.n_facts_lost, "targets met": f"{sum(x.met for x in t)}/{len(t)}", "verdict": verdict(run, lang),
                "card": str(card.relative_to(out))})
    return row


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


def sortable_html(table, title: str, lang: str = "en") -> str:
    """The table as a page whose columns sort on a click; the card column links each report card (headers in `lang`)."""
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
            elif isinstance(v, float):
                cells.append(f"<td data-v='{'' if math.isnan(v) else v}'>{'-' if math.isnan(v) else f'{v:.2f}'}</td>")
            else:
                cells.append(f"<td>{esc(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"""<!DOCTYPE html>
<html lang="{'zh-CN' if lang == 'zh' else 'en'}"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:"DejaVu Sans","Noto Sans CJK SC",sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}}th{{background:#f2f2f2;cursor:pointer}}</style></head><body>
<h1>{esc(title)}</h1><p>{esc(i18n.t('grade.summary', lang, n=len(table)))}</p>
<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
<script>{_SORT_JS}</script></body></html>
"""
