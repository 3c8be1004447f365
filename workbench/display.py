"""Showing results in notebooks and terminals: tables, plots, samples with the trained tokens marked.

Beside `workbench.widgets` (the interactive controls), these helpers only turn
what other stages computed into something to look at; none of them trains or
evaluates anything.

- `show_sample`: an encoded sample with its trained tokens marked, as
  `[[...]]` brackets (terminal, `workbench log-dataset`), ANSI colour or HTML;
- `preview_table`: the first samples of a data set as a table;
- `metrics_table`, `answers_table`, `plot_run`: one run's analysis
  (`workbench.analysis.RunAnalysis`);
- `plot_comparison`, `compare_answers`, `show_comparison`: the recipe
  comparison (`workbench.comparison`), and `plot_training_losses`: the loss
  curves of the series' recipes.

pandas, matplotlib and IPython are imported inside the functions that use
them: they are heavy, and the CLI's `log-dataset` needs none of them.

The tables and plots of results take `lang` ("en"/"zh", workbench/i18n/):
headers, titles, axes and legends in that language; a Chinese plot falls back
to English labels, with one line saying so, where no CJK font is installed.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.i18n import localize_columns, plot_lang, t
from workbench.io import read_jsonl
from workbench.prompt import IGNORE, Encoded, PromptBuilder

if TYPE_CHECKING:  # annotations only: display never runs the analysis
    from workbench.analysis import RunAnalysis
    from workbench.samples import Sample

SAMPLE_STYLES = ("brackets", "ansi", "html")


# ---------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------
def show_sample(builder: PromptBuilder, enc: Encoded, style: str = "brackets") -> str:
    """The sample as text with the trained part marked: [[...]] (brackets), ANSI colour, or HTML (escaped)."""
    if style not in SAMPLE_STYLES:
        raise ValueError(f"show_sample: style must be one of {list(SAMPLE_STYLES)}, got {style!r}")
    pieces = [_mark(builder.tokenizer.decode(ids), trained, style) for ids, trained in _runs(enc)]
    body = "".join(pieces)
    return f'<pre style="white-space:pre-wrap">{body}</pre>' if style == "html" else body


def _runs(enc: Encoded) -> list[tuple[list[int], bool]]:
    """The token ids in runs of equal trained-ness: [(ids, trained), ...]."""
    runs: list[tuple[list[int], bool]] = []
    for tid, label in zip(enc.input_ids, enc.labels):
        trained = label != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(tid)
        else:
            runs.append(([tid], trained))
    return runs


def _mark(text: str, trained: bool, style: str) -> str:
    if style == "html":
        text = html.escape(text).replace("\n", "⏎<br>")
        return f'<span style="background:#c8f7c5">{text}</span>' if trained else f'<span style="color:#999">{text}</span>'
    if style == "ansi":
        return f"\x1b[1;32m{text}\x1b[0m" if trained else f"\x1b[2m{text}\x1b[0m"
    return f"[[{text}]]" if trained else text


def preview_table(samples: list[Sample], n: int = 10, lang: str = "en"):
    """The first `n` samples as a table: system prompt, question, answer, turns (pandas DataFrame, headers in `lang`)."""
    import pandas as pd  # heavy: only for display

    rows = []
    for s in samples[:n]:
        if s.text is not None:
            rows.append({"system": "", "question": t("ds.pretraining_text", lang), "answer": s.text[:200], "turns": 0})
            continue
        system = next((m["content"] for m in s.messages if m["role"] == "system"), "")
        users = [m["content"] for m in s.messages if m["role"] == "user"]
        answers = [m["content"] for m in s.messages if m["role"] == "assistant"]
        rows.append({"system": system, "question": users[0] if users else "", "answer": answers[0] if answers else "",
                     "turns": len(answers)})
    return localize_columns(pd.DataFrame(rows, columns=["system", "question", "answer", "turns"]), lang)


def recipes_table(lang: str = "en"):
    """The shipped recipes and what each is for (pandas DataFrame, headers and descriptions in `lang`: the YAML's
    description is the English, workbench/i18n/outputs.py's RECIPES_ZH the Chinese, where it has one)."""
    import pandas as pd  # heavy: only for display

    from workbench.config import list_recipes
    from workbench.i18n.outputs import RECIPES_ZH

    def described(name: str, description: str) -> str:
        return RECIPES_ZH.get(name, description) if lang == "zh" else description

    rows = [(name, described(name, d)) for name, d in list_recipes()]
    return localize_columns(pd.DataFrame(rows, columns=["recipe", "description"]), lang)


def evaluations_table(evaluations: list[dict], lang: str = "en"):
    """Training's evaluation answers: one row per question, one column per step (headers in `lang`)."""
    import pandas as pd  # heavy: only for display

    table = pd.DataFrame(evaluations, columns=["step", "question", "answer"]).pivot(index="question", columns="step",
                                                                                    values="answer")
    table.index.name, table.columns.name = t("col.question", lang), t("col.step", lang)
    return table


# ---------------------------------------------------------------------------
# One run's analysis
# ---------------------------------------------------------------------------
def metrics_table(run: RunAnalysis, lang: str = "en"):
    """One row per model (base and checkpoints)."""
    import pandas as pd  # heavy: only for display

    rows = []
    for r in run.reports:
        rows.append({"model": r.label, "step": r.step, "hit seen en": r.hit_seen.get("en"), "hit unseen en": r.hit_unseen.get("en"),
                     "hit seen zh": r.hit_seen.get("zh"), "hit unseen zh": r.hit_unseen.get("zh"), "leak en": r.leak.get("en"),
                     "leak zh": r.leak.get("zh"), "retention": r.retention, "similarity": r.similarity,
                     "strict en": r.strict.get("en"), "strict zh": r.strict.get("zh"),
                     "facts lost": f"{r.n_facts_lost}/{sum(r.facts_known.values())}", "held-out loss": r.heldout_loss, "distinct answers": f"{r.distinct}/{r.n_probes}"})
    return localize_columns(pd.DataFrame(rows), lang)


def answers_table(run: RunAnalysis, step: int | None = None, kinds: tuple = ("identity_unseen", "general")):
    """Before/after: the base model's and one checkpoint's answers side by side."""
    import pandas as pd  # heavy: only for display

    after = run.report_at(step) if step is not None else run.final
    rows = [{"kind": a["kind"], "lang": a["lang"], "question": a["question"], "base": b["answer"], after.label: a["answer"]}
            for a, b in zip(after.answers, run.base.answers) if a["kind"] in kinds]
    return pd.DataFrame(rows)


def plot_run(run: RunAnalysis, path: str | Path | None = None, lang: str = "en"):
    """Loss curves (training and held-out) and hit / leak / retention against step."""
    import matplotlib.pyplot as plt  # heavy: only for display

    lang = plot_lang(lang)
    metrics = read_jsonl(Path(run.work_dir) / "metrics.jsonl")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax1.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label=t("plot.training_loss", lang), alpha=0.8)
    held = [(r.step, r.heldout_loss) for r in run.reports if not math.isnan(r.heldout_loss)]
    if held:
        ax1.plot(*zip(*held), "o-", label=t("plot.heldout_loss", lang))
    ax1.set(xlabel=t("plot.step", lang), ylabel=t("plot.loss", lang), title=t("plot.run_loss_title", lang, name=run.config["name"]))
    ax1.legend()
    steps = [r.step for r in run.reports]
    for label, values, style in [
        (t("plot.hit_unseen_en", lang), [r.hit_unseen.get("en") for r in run.reports], "o-"),
        (t("plot.hit_unseen_zh", lang), [r.hit_unseen.get("zh") for r in run.reports], "o--"),
        (t("plot.hit_seen_en", lang), [r.hit_seen.get("en") for r in run.reports], "s:"),
        (t("plot.leak", lang), [r.overall("leak") for r in run.reports], "x-"),
        (t("plot.retention", lang), [r.retention for r in run.reports], "d-"),
        (t("plot.strict_en", lang), [r.strict.get("en", math.nan) for r in run.reports], "v-"),
    ]:
        ax2.plot(steps, values, style, label=label)
    ax2.axvline(run.best_step, color="grey", ls=":", lw=1)
    ax2.set(xlabel=t("plot.step_base", lang), ylim=(-0.05, 1.05), title=t("plot.run_title", lang))
    ax2.legend(fontsize=8)
    return _finish(fig, path)


# ---------------------------------------------------------------------------
# Recipe comparison
# ---------------------------------------------------------------------------
def plot_comparison(runs: list[RunAnalysis], path: str | Path | None = None, lang: str = "en"):
    """Unseen identity hit, leak (EN solid, ZH dashed) and retention per step, one colour per recipe; kept checkpoints ringed."""
    import matplotlib.pyplot as plt  # heavy: only for display

    lang = plot_lang(lang)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, run in enumerate(runs):
        color, name, steps = f"C{k}", run.config["name"], [r.step for r in run.reports]
        for probe_lang, style in (("en", "o-"), ("zh", "s--")):
            label = f"{name} {probe_lang.upper()}"
            axes[0].plot(steps, [r.hit_unseen[probe_lang] for r in run.reports], style, color=color, label=label)
            axes[1].plot(steps, [r.leak[probe_lang] for r in run.reports], style, color=color, label=label)
        axes[2].plot(steps, [r.retention for r in run.reports], "o-", color=color, label=name)
        kept = run.report_at(run.best_step) if run.best_step in steps else None
        if kept is not None and kept.step > 0:
            axes[2].plot([kept.step], [kept.retention], "o", ms=14, mfc="none", color=color)
    for ax, key in zip(axes, ["plot.cmp_hit", "plot.cmp_leak", "plot.cmp_retention"]):
        ax.set(title=t(key, lang), xlabel=t("plot.step_base_short", lang), ylim=(-0.05, 1.05))
        ax.legend(fontsize=7)
    return _finish(fig, path)


def compare_answers(runs: list[RunAnalysis], kinds: tuple = ("identity_unseen", "general"), lang: str = "en"):
    """The base model's answers beside each run's kept checkpoint's, one row per probe question."""
    import pandas as pd  # heavy: only for display

    kept = [(run.config["name"], run.report_at(run.best_step)) for run in runs]
    rows = []
    for k, base in enumerate(runs[0].base.answers):
        if base["kind"] in kinds:
            row = {"kind": base["kind"], "lang": base["lang"], "question": base["question"], "base": base["answer"]}
            row.update({f"{name} ({r.label})": r.answers[k]["answer"] for name, r in kept})
            rows.append(row)
    return localize_columns(pd.DataFrame(rows), lang)


def plot_training_losses(results: dict, path: str | Path | None = None, lang: str = "en"):
    """Training loss against step, one line per recipe ({label: TrainResult or None}; None is left out)."""
    import matplotlib.pyplot as plt  # heavy: only for display

    lang = plot_lang(lang)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for label, result in results.items():
        if result is not None:
            ax.plot([m["step"] for m in result.metrics], [m["loss"] for m in result.metrics], "-o", ms=2, label=label)
    ax.set(xlabel=t("plot.step", lang), ylabel=t("plot.training_loss", lang), title=t("plot.loss_per_recipe", lang))
    ax.legend(fontsize=8)
    return _finish(fig, path)


def show_comparison(compare_dir: str | Path):
    """The saved recipe comparison (table and plot) of `make compare`, or a note on how to make it."""
    from IPython.display import HTML, Image, display  # optional: notebooks only

    out = Path(compare_dir)
    if not (out / "comparison.csv").exists():
        return HTML(f"<i>No comparison in {html.escape(str(out))} yet: run <code>make compare</code> "
                    f"(trains the tutorial's and the mixed recipe, about 15 minutes on 2 cores).</i>")
    import pandas as pd  # heavy: only for display

    if (out / "comparison.png").exists():
        display(Image(filename=str(out / "comparison.png")))
    return pd.read_csv(out / "comparison.csv")


def _finish(fig, path: str | Path | None):
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig
