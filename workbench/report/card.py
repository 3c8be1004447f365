"""The report card: one self-contained HTML page (images inlined as data URIs) and a PNG, for one subject.

It shows the assistant's identity (seen/unseen questions, English/Chinese, roles), the leak into
everyday answers, retention (strict first-sentence and the similarity scores), the short-answer
facts, before/after examples of each kind of failure, the targets met or missed, the verdict and
the checkpoint to keep. The PNG is the card's summary figure (targets and bars), drawn with
matplotlib, so it needs no browser; the HTML embeds it.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

from workbench.analysis import ModelReport, RunAnalysis, mentions_identity, role_errors, states_identity
from workbench.io import atomic_write_bytes, atomic_write_text
from workbench.retention import STRICT_F1, drifted, strict_summary

# The targets of issue 23, on the held-out probes.
HIT_TARGET, STRICT_TARGET = 0.95, 0.9
EXAMPLES_PER_KIND = 2
_CJK_FONT_FILES = ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",)  # Debian's fonts-noto-cjk


@dataclass
class Target:
    label: str
    value: str
    met: bool


def kept_report(run: RunAnalysis) -> ModelReport:
    return run.report_at(run.best_step)


def names(run: RunAnalysis) -> tuple[str, str]:
    return run.config.get("assistant_name", "?"), run.config.get("owner_name", "?")


def role_mixups(r: ModelReport, name: str, owner: str) -> list[dict]:
    """Identity answers (seen or unseen) that name the assistant or the owner in the wrong role."""
    return [a for a in r.answers if a["kind"].startswith("identity") and role_errors(a["answer"], name, owner)]


def targets(run: RunAnalysis) -> list[Target]:
    """Unseen identity >= 0.95 per language with the roles right, no leak, strict English retention >= 0.9, no fact lost."""
    r, (name, owner) = kept_report(run), names(run)
    out = [Target(f"unseen identity {lang.upper()} >= {HIT_TARGET:.0%}", _pct(r.hit_unseen.get(lang)),
                  _ge(r.hit_unseen.get(lang), HIT_TARGET)) for lang in ("en", "zh")]
    mix = len(role_mixups(r, name, owner))
    out.append(Target("roles right (no owner/assistant mix-up)", f"{mix} mix-ups", mix == 0))
    out += [Target(f"leak {lang.upper()} = 0", _pct(r.leak.get(lang)), r.leak.get(lang) == 0) for lang in ("en", "zh")]
    out.append(Target(f"strict retention EN >= {STRICT_TARGET:.0%}", _pct(r.strict.get("en")),
                      _ge(r.strict.get("en"), STRICT_TARGET)))
    known = sum(r.facts_known.values())
    out.append(Target("no short-answer fact lost", f"{r.n_facts_lost} of {known} lost", r.n_facts_lost == 0))
    return out


def verdict(run: RunAnalysis) -> str:
    t = targets(run)
    missed = [x.label for x in t if not x.met]
    kept = kept_report(run)
    head = (f"Meets all {len(t)} targets." if not missed else f"Misses {len(missed)} of {len(t)} targets: {'; '.join(missed)}.")
    return f"{head} Keep: {kept.label}" + ("" if kept.step > 0 else " (no checkpoint beats the base model)") + "."


def failure_examples(run: RunAnalysis, per_kind: int = EXAMPLES_PER_KIND) -> dict[str, list[tuple[str, str, str]]]:
    """(question, base answer, tuned answer) for each kind of failure of the kept model (empty list: none)."""
    r, base, (name, owner) = kept_report(run), run.base, names(run)
    pairs = list(zip(base.answers, r.answers))
    pick = lambda pred: [(t["question"], b["answer"], t["answer"]) for b, t in pairs if pred(b, t)][:per_kind]  # noqa: E731
    general = [(b, t) for b, t in pairs if t["kind"] == "general"]
    drift = set(drifted([t["answer"] for _, t in general], [b["answer"] for b, _ in general]))
    drift_q = {general[i][1]["question"] for i in drift}
    lost = {q for qs in r.facts_lost.values() for q in qs}
    return {
        "identity not stated (unseen question)": pick(lambda b, t: t["kind"] == "identity_unseen"
                                                      and not states_identity(t["answer"], name, owner)),
        "roles mixed up": pick(lambda b, t: t["kind"].startswith("identity") and bool(role_errors(t["answer"], name, owner))),
        "identity leaked into an everyday answer": pick(lambda b, t: t["kind"] == "general"
                                                        and mentions_identity(t["answer"], name, owner)),
        f"first sentence drifted (token-F1 < {STRICT_F1})": pick(lambda b, t: t["kind"] == "general" and t["question"] in drift_q),
        "fact lost (the base model was right)": pick(lambda b, t: t["kind"] == "fact" and t["question"] in lost),
    }


# ---------------------------------------------------------------------------
# The summary figure (the PNG)
# ---------------------------------------------------------------------------
def summary_figure(run: RunAnalysis):
    """Targets (green met, red missed) and base vs kept bars per measure and language."""
    import matplotlib.pyplot as plt  # heavy: only for the card

    r, base, (name, owner) = kept_report(run), run.base, names(run)
    with plt.rc_context({"font.family": _font_family()}):  # names in Chinese render where a CJK font is installed
        fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1.5]})
        _draw_summary(run, r, base, name, owner, ax_t, ax_b)
        fig.tight_layout()
    return fig


def _font_family() -> list[str]:
    from matplotlib import font_manager

    for path in _CJK_FONT_FILES:  # installed after matplotlib cached its font list: add them by path
        if Path(path).exists() and path not in {f.fname for f in font_manager.fontManager.ttflist}:
            font_manager.fontManager.addfont(path)
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [f for f in ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei") if f in installed]


def _draw_summary(run: RunAnalysis, r: ModelReport, base: ModelReport, name: str, owner: str, ax_t, ax_b) -> None:
    ax_t.axis("off")
    ax_t.set_title(f"{name}, {owner}'s assistant: {r.label}", fontsize=12, loc="left")
    for k, t in enumerate(targets(run)):
        y = 0.92 - k * 0.11
        ax_t.text(0.0, y, "PASS" if t.met else "MISS", color="white", fontsize=9, weight="bold",
                  bbox={"facecolor": "#2e7d32" if t.met else "#c62828", "edgecolor": "none", "pad": 3}, transform=ax_t.transAxes)
        ax_t.text(0.16, y, f"{t.label}: {t.value}", fontsize=10, transform=ax_t.transAxes)
    measures = [("identity unseen", "hit_unseen"), ("identity seen", "hit_seen"), ("no leak", "leak"),
                ("strict retention", "strict")]
    labels, before, after = [], [], []
    for title, attr in measures:
        for lang in ("en", "zh"):
            flip = (lambda v: 1 - v) if attr == "leak" else (lambda v: v)
            labels.append(f"{title} {lang.upper()}")
            before.append(flip(getattr(base, attr).get(lang, math.nan)))
            after.append(flip(getattr(r, attr).get(lang, math.nan)))
    for title, value_b, value_a in [("similarity", base.similarity, r.similarity), ("retention (NLL)", base.retention, r.retention)]:
        labels.append(title)
        before.append(value_b)
        after.append(value_a)
    ys = range(len(labels))
    ax_b.barh([y + 0.2 for y in ys], before, height=0.38, color="#9e9e9e", label="base model")
    ax_b.barh([y - 0.2 for y in ys], after, height=0.38, color="#1565c0", label=r.label)
    ax_b.set_yticks(list(ys), labels, fontsize=9)
    ax_b.invert_yaxis()
    ax_b.set(xlim=(0, 1.02), title="before (grey) and after (blue); higher is better")
    ax_b.axvline(STRICT_TARGET, color="grey", ls=":", lw=1)
    ax_b.legend(fontsize=8, loc="lower right")


def figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt  # heavy: only for the card

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------
_CSS = """body{font-family:"DejaVu Sans","Noto Sans CJK SC",sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f2f2f2}.met{color:#2e7d32;font-weight:bold}.miss{color:#c62828;font-weight:bold}
.verdict{font-size:1.2em;padding:.6em;border-left:6px solid #1565c0;background:#eef4fb}img{max-width:100%}
.none{color:#2e7d32}"""


def render_html(run: RunAnalysis, png: bytes, extra_images: list[bytes] = ()) -> str:
    """The self-contained page: every image a data URI, no external file, script or font."""
    from workbench.display import metrics_table

    r, (name, owner) = kept_report(run), names(run)
    esc = html.escape
    cfg = run.config
    rows = "".join(f"<tr><td>{esc(t.label)}</td><td>{esc(t.value)}</td><td class='{'met' if t.met else 'miss'}'>"
                   f"{'met' if t.met else 'missed'}</td></tr>" for t in targets(run))
    table = metrics_table(run).to_html(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-", border=0)
    examples = []
    for kind, items in failure_examples(run).items():
        examples.append(f"<h3>{esc(kind)}</h3>")
        if not items:
            examples.append("<p class='none'>none</p>")
            continue
        examples.append("<table><tr><th>question</th><th>base model</th><th>" + esc(r.label) + "</th></tr>" + "".join(
            f"<tr><td>{esc(q)}</td><td>{esc(b)}</td><td>{esc(t)}</td></tr>" for q, b, t in items) + "</table>")
    images = "".join(f"<img alt='figure' src='{_data_uri(img)}'>" for img in [png, *extra_images])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Report card: {esc(name)}, {esc(owner)}'s assistant</title>
<style>{_CSS}</style></head><body>
<h1>Report card: {esc(name)}, {esc(owner)}'s assistant</h1>
<p>Subject: <code>{esc(run.work_dir)}</code> ({esc(str(cfg.get('subject_kind', 'run')))}; recipe {esc(str(cfg.get('name', '?')))};
base model <code>{esc(str(cfg.get('pretrained_model_name_or_path', '?')))}</code>). Probes: held-out questions the model never saw in training.</p>
<p class="verdict">{esc(verdict(run))}</p>
<h2>Targets</h2><table><tr><th>target</th><th>measured</th><th></th></tr>{rows}</table>
{images}
<h2>Every measure, per model</h2>{table}
<p>{esc(strict_summary(r))}</p>
<h2>Diagnosis</h2><p>{esc(run.diagnosis)}</p>
<h2>Before and after, for each kind of failure</h2>{''.join(examples)}
<p style="color:#777;font-size:12px">Strict retention: the first sentence of the tuned answer against the base model's
(token-F1 &ge; {STRICT_F1}; words for English, characters for Chinese). A fact counts only when the base model's answer
contains it.</p>
</body></html>
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def write_card(run: RunAnalysis, html_path: str | Path) -> tuple[Path, Path]:
    """Write the card's HTML and its PNG (same name, .png) atomically; the run's loss plot is added for a run."""
    html_path = Path(html_path)
    png = figure_png(summary_figure(run))
    extra = []
    if (Path(run.work_dir) / "metrics.jsonl").exists() and len(run.reports) > 1 and "subject_kind" not in run.config:
        from workbench.display import plot_run

        extra.append(figure_png(plot_run(run)))
    png_path = atomic_write_bytes(html_path.with_suffix(".png"), png)
    atomic_write_text(html_path, render_html(run, png, extra))
    return html_path, png_path


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0%}"


def _ge(v, target: float) -> bool:
    return v is not None and not math.isnan(v) and v >= target


def report_card(path: str | Path, base: str | None = None, out: str | Path | None = None, probes=None,
                max_new_tokens: int = 40, progress: bool = True) -> tuple[Path, Path]:
    """Evaluate a run, adapter or merged model (`workbench.report.subject`) and write its card (default PATH/report_card.html)."""
    from workbench.report.subject import analyze_subject

    run = analyze_subject(path, base, probes, max_new_tokens, progress)
    return write_card(run, out or Path(path) / "report_card.html")
