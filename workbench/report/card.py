"""The report card: one self-contained HTML page (images inlined as data URIs) and a PNG, for one subject.

It shows the assistant's identity (seen/unseen questions, English/Chinese, roles), the leak into
everyday answers, retention (strict first-sentence and the similarity scores), the short-answer
facts, before/after examples of each kind of failure, the targets met or missed, the verdict and
the checkpoint to keep. The PNG is the card's summary figure (targets and bars), drawn with
matplotlib, so it needs no browser; the HTML embeds it. Every word of the card is in `lang` ("en"/"zh",
workbench/i18n/report.py); the model's answers and the questions stay exactly as they are.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

from workbench.analysis import ModelReport, RunAnalysis, diagnosis_in, per_probes
from workbench.i18n import check_lang, plot_lang, t
from workbench.io import atomic_write_bytes, atomic_write_text
from workbench.judge import mentions_identity, role_errors, states_identity
from workbench.retention import STRICT_F1, drifted, strict_summary

# The targets of issue 23, on the held-out probes.
HIT_TARGET, STRICT_TARGET = 0.95, 0.9
EXAMPLES_PER_KIND = 2
_CJK_FONT_FILES = tuple(f"/usr/share/fonts/opentype/noto/NotoSansCJK-{w}.ttc" for w in ("Regular", "Bold"))  # Debian's fonts-noto-cjk (bold: the PASS/MISS tags)


@dataclass
class Target:
    label: str
    value: str
    met: bool
    near: bool = False  # missed, but within the probes' noise: the rate's 95% interval reaches the target


def interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% for z = 1.96) of a rate of k in n: how far the true rate may be from k/n when n
    probes measure it (on 26 probes 23 gives 0.71-0.96, which contains the 0.9 target). Written here: five lines
    of arithmetic, where scipy or statsmodels would be a new dependency of the whole stack for one formula."""
    if n <= 0:
        return math.nan, math.nan
    p, zz = k / n, z * z
    centre, half = (p + zz / (2 * n)) / (1 + zz / n), z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n)) / (1 + zz / n)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def kept_report(run: RunAnalysis) -> ModelReport:
    return run.report_at(run.best_step)


def names(run: RunAnalysis) -> tuple[str, str]:
    return run.config.get("assistant_name", "?"), run.config.get("owner_name", "?")


def who(name: str, owner: str, lang: str = "en") -> str:
    """"Nova, Alex's assistant"; for an assistant without a name of its own, "Alex's assistant (no name of its own)"."""
    return t("card.who", lang, name=name, owner=owner) if name.strip() else t("card.who_owner", lang, owner=owner)


def role_mixups(r: ModelReport, name: str, owner: str) -> list[dict]:
    """Identity answers (seen or unseen) that name the assistant or the owner in the wrong role."""
    return [a for a in r.answers if a["kind"].startswith("identity") and role_errors(a["answer"], name, owner)]


def targets(run: RunAnalysis, lang: str = "en") -> list[Target]:
    """Unseen identity >= 0.95 per language with the roles right, no leak, strict English retention >= 0.9, no fact lost."""
    r, (name, owner) = kept_report(run), names(run)
    out = [_rate_target(t("card.t_unseen", lang, probe=probe.upper(), target=f"{HIT_TARGET:.0%}"), r,
                        r.hit_unseen.get(probe), "identity_unseen", probe, HIT_TARGET, lang) for probe in ("en", "zh")]
    mix = len(role_mixups(r, name, owner))
    out.append(Target(t("card.t_roles", lang), t("card.mixups", lang, n=mix), mix == 0))
    out += [Target(t("card.t_leak", lang, probe=probe.upper()), _pct_of(r, r.leak.get(probe), "general", probe, lang),
                   r.leak.get(probe) == 0) for probe in ("en", "zh")]
    out.append(_rate_target(t("card.t_strict", lang, target=f"{STRICT_TARGET:.0%}"), r, r.strict.get("en"), "general", "en",
                            STRICT_TARGET, lang))
    known = sum(r.facts_known.values())
    out.append(Target(t("card.t_facts", lang), t("card.lost_of", lang, lost=r.n_facts_lost, known=known), r.n_facts_lost == 0))
    return out


def _rate_target(label: str, r: ModelReport, v, kind: str, probe: str, target: float, lang: str) -> Target:
    """A target on a rate (at least `target`), with its count and interval; `near` where missed inside the noise."""
    n = _n_probes(r, kind, probe)
    met = _ge(v, target)
    near = not met and bool(n) and _ge(v, 0.0) and interval(round(v * n), n)[1] >= target  # _ge(v, 0): measured
    return Target(label, _pct_of(r, v, kind, probe, lang), met, near)


def verdict(run: RunAnalysis, lang: str = "en") -> str:
    found = targets(run, lang)
    missed = [x.label for x in found if not x.met]
    near = [x.label for x in found if x.near]
    kept = kept_report(run)
    sep = "；" if lang == "zh" else "; "
    head = (t("card.meets_all", lang, n=len(found)) if not missed
            else t("card.misses", lang, missed=len(missed), n=len(found), which=sep.join(missed)))
    if near:
        head += t("card.near", lang, which=sep.join(near))
    return (head + t("card.keep", lang, label=kept.label) + ("" if kept.step > 0 else t("card.no_better", lang))
            + t("card.end", lang))


def failure_examples(run: RunAnalysis, per_kind: int = EXAMPLES_PER_KIND, lang: str = "en") -> dict[str, list[tuple[str, str, str]]]:
    """(question, base answer, tuned answer) for each kind of failure of the kept model (empty list: none)."""
    r, base, (name, owner) = kept_report(run), run.base, names(run)
    pairs = list(zip(base.answers, r.answers))
    pick = lambda pred: [(a["question"], b["answer"], a["answer"]) for b, a in pairs if pred(b, a)][:per_kind]  # noqa: E731
    general = [(b, a) for b, a in pairs if a["kind"] == "general"]
    drift = set(drifted([a["answer"] for _, a in general], [b["answer"] for b, _ in general]))
    drift_q = {general[i][1]["question"] for i in drift}
    lost = {q for qs in r.facts_lost.values() for q in qs}
    return {
        t("card.f_unstated", lang): pick(lambda b, a: a["kind"] == "identity_unseen"
                                         and not states_identity(a["answer"], name, owner)),
        t("card.f_roles", lang): pick(lambda b, a: a["kind"].startswith("identity") and bool(role_errors(a["answer"], name, owner))),
        t("card.f_leak", lang): pick(lambda b, a: a["kind"] == "general" and mentions_identity(a["answer"], name, owner)),
        t("card.f_drift", lang, f1=STRICT_F1): pick(lambda b, a: a["kind"] == "general" and a["question"] in drift_q),
        t("card.f_fact", lang): pick(lambda b, a: a["kind"] == "fact" and a["question"] in lost),
    }


# ---------------------------------------------------------------------------
# The summary figure (the PNG)
# ---------------------------------------------------------------------------
def summary_figure(run: RunAnalysis, lang: str = "en"):
    """Targets (green met, red missed) and base vs kept bars per measure and language."""
    import matplotlib.pyplot as plt  # heavy: only for the card

    lang = plot_lang(lang)  # English labels, with one line saying so, where no CJK font is installed
    r, base, (name, owner) = kept_report(run), run.base, names(run)
    with plt.rc_context({"font.family": _font_family()}):  # names in Chinese render where a CJK font is installed
        fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1.5]})
        _draw_summary(run, r, base, name, owner, ax_t, ax_b, lang)
        fig.tight_layout()
    return fig


def _font_family() -> list[str]:
    from matplotlib import font_manager

    for path in _CJK_FONT_FILES:  # installed after matplotlib cached its font list: add them by path
        if Path(path).exists() and path not in {f.fname for f in font_manager.fontManager.ttflist}:
            font_manager.fontManager.addfont(path)
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [f for f in ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei") if f in installed]


def _draw_summary(run: RunAnalysis, r: ModelReport, base: ModelReport, name: str, owner: str, ax_t, ax_b,
                  lang: str = "en") -> None:
    ax_t.axis("off")
    ax_t.set_title(t("card.fig_title", lang, who=who(name, owner, lang), label=r.label), fontsize=12, loc="left")
    for k, target in enumerate(targets(run, lang)):
        y = 0.92 - k * 0.11
        ax_t.text(0.0, y, t("card.pass" if target.met else "card.miss", lang), color="white", fontsize=9, weight="bold",
                  bbox={"facecolor": "#2e7d32" if target.met else "#c62828", "edgecolor": "none", "pad": 3},
                  transform=ax_t.transAxes)
        ax_t.text(0.16, y, f"{target.label}: {target.value}", fontsize=10, transform=ax_t.transAxes)
    measures = [(t("card.m_unseen", lang), "hit_unseen"), (t("card.m_seen", lang), "hit_seen"),
                (t("card.m_no_leak", lang), "leak"), (t("card.m_strict", lang), "strict")]
    labels, before, after = [], [], []
    for title, attr in measures:
        for probe in ("en", "zh"):  # the probes' languages (not `lang`, the card's)
            flip = (lambda v: 1 - v) if attr == "leak" else (lambda v: v)
            labels.append(f"{title} {probe.upper()}")
            before.append(flip(getattr(base, attr).get(probe, math.nan)))
            after.append(flip(getattr(r, attr).get(probe, math.nan)))
    for title, value_b, value_a in [(t("card.m_similarity", lang), base.similarity, r.similarity),
                                    (t("card.m_retention", lang), base.retention, r.retention)]:
        labels.append(title)
        before.append(value_b)
        after.append(value_a)
    ys = range(len(labels))
    ax_b.barh([y + 0.2 for y in ys], before, height=0.38, color="#9e9e9e", label=t("card.base_model", lang))
    ax_b.barh([y - 0.2 for y in ys], after, height=0.38, color="#1565c0", label=r.label)
    ax_b.set_yticks(list(ys), labels, fontsize=9)
    ax_b.invert_yaxis()
    ax_b.set(xlim=(0, 1.02), title=t("card.bars_title", lang))
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


def render_html(run: RunAnalysis, png: bytes, extra_images: list[bytes] = (), lang: str = "en") -> str:
    """The self-contained page in `lang`: every image a data URI, no external file, script or font."""
    from workbench.display import metrics_table

    r, (name, owner) = kept_report(run), names(run)
    esc = html.escape
    cfg = run.config
    rows = "".join(f"<tr><td>{esc(x.label)}</td><td>{esc(x.value)}</td><td class='{'met' if x.met else 'miss'}'>"
                   f"{t('card.met' if x.met else 'card.missed', lang)}</td></tr>" for x in targets(run, lang))
    table = metrics_table(run, lang).to_html(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-", border=0)
    examples = []
    for kind, items in failure_examples(run, lang=lang).items():
        examples.append(f"<h3>{esc(kind)}</h3>")
        if not items:
            examples.append(f"<p class='none'>{t('card.none', lang)}</p>")
            continue
        examples.append(f"<table><tr><th>{t('card.question', lang)}</th><th>{t('card.base_model', lang)}</th><th>"
                        + esc(r.label) + "</th></tr>" + "".join(
            f"<tr><td>{esc(q)}</td><td>{esc(b)}</td><td>{esc(a)}</td></tr>" for q, b, a in items) + "</table>")
    images = "".join(f"<img alt='figure' src='{_data_uri(img)}'>" for img in [png, *extra_images])
    title = esc(t("card.title", lang, who=who(name, owner, lang)))
    subject = t("card.subject", lang, path=esc(run.work_dir), kind=esc(str(cfg.get("subject_kind", "run"))),
                recipe=esc(str(cfg.get("name", "?"))), base=esc(str(cfg.get("pretrained_model_name_or_path", "?"))))
    return f"""<!DOCTYPE html>
<html lang="{'zh-CN' if lang == 'zh' else 'en'}"><head><meta charset="utf-8"><title>{title}</title>
<style>{_CSS}</style></head><body>
<h1>{title}</h1>
<p>{subject}</p>
<p class="verdict">{esc(verdict(run, lang))}</p>
<h2>{t('card.targets', lang)}</h2><table><tr><th>{t('card.target', lang)}</th><th>{t('card.measured', lang)}</th><th></th></tr>{rows}</table>
{images}
<h2>{t('card.every_measure', lang)}</h2>{table}
<p>{esc(strict_summary(r, lang))}</p>
<h2>{t('card.diagnosis', lang)}</h2><p>{esc(run.diagnosis if lang == 'en' else diagnosis_in(run, lang))}</p>
<h2>{t('card.examples', lang)}</h2>{''.join(examples)}
<p style="color:#777;font-size:12px">{t('card.footnote', lang, f1=STRICT_F1)}</p>
</body></html>
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def write_card(run: RunAnalysis, html_path: str | Path, lang: str = "en") -> tuple[Path, Path]:
    """Write the card's HTML and its PNG (same name, .png) in `lang`, atomically; the run's loss plot is added for a run."""
    html_path, lang = Path(html_path), check_lang(lang)
    png = figure_png(summary_figure(run, lang))
    extra = []
    if (Path(run.work_dir) / "metrics.jsonl").exists() and len(run.reports) > 1 and "subject_kind" not in run.config:
        from workbench.display import plot_run

        extra.append(figure_png(plot_run(run, lang=lang)))
    png_path = atomic_write_bytes(html_path.with_suffix(".png"), png)
    atomic_write_text(html_path, render_html(run, png, extra, lang))
    return html_path, png_path


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0%}"


def _n_probes(r: ModelReport, kind: str, lang_of_probes: str) -> int:
    return sum(1 for a in r.answers if a["kind"] == kind and a["lang"] == lang_of_probes)


def _pct_of(r: ModelReport, v, kind: str, lang_of_probes: str, lang: str = "en") -> str:
    """A rate with the count it stands for and its 95% interval, "92% (24 of 26; 95% interval 76%-98%)": on 26 probes
    one answer moves a rate by 4 points, and the targets are missed or met by one or two (the count is the rate times
    the probes of that kind and language)."""
    n, text = _n_probes(r, kind, lang_of_probes), _pct(v)
    if not n or text == "-":
        return text
    lo, hi = interval(round(v * n), n)
    return text + t("card.count_interval", lang, k=round(v * n), n=n, lo=f"{lo:.0%}", hi=f"{hi:.0%}")


def _ge(v, target: float) -> bool:
    return v is not None and not math.isnan(v) and v >= target


def report_card(path: str | Path, base: str | None = None, out: str | Path | None = None, probes=None,
                max_new_tokens: int = 40, progress: bool = True, lang: str = "en", given=None) -> tuple[Path, Path]:
    """Evaluate a run, adapter or merged model (`workbench.report.subject`) and write its card in `lang` (default
    PATH/report_card.html; PATH/report_card.NAME.html for another probe file, as its analysis.NAME.json). `given`: names
    and system prompt the artifact does not carry (`subject.Given`)."""
    from workbench.report.subject import Given, analyze_subject

    run = analyze_subject(path, base, probes, max_new_tokens, progress, given=given or Given())
    return write_card(run, out or Path(path) / per_probes("report_card", ".html", probes), lang)
