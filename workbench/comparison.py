"""Recipes compared: train each one on the same base model, analyze it, write one table and plot.

`compare_recipes` is what `workbench compare` and `make compare` run. Unlike
`workbench.analysis`, which only evaluates checkpoints that exist, it trains:
each recipe into OUT/<name>/ (a finished run is reused, an interrupted one
resumed), then analyzes it and writes OUT/comparison.md, comparison.csv and
comparison.png, and each run's analysis.png.

`DEFAULT_RECIPES` is the pair the README's table shows: the camp tutorial's
recipe (two identity pairs, repeated) against the cure (diverse identity
questions mixed with general conversations). Pass other recipe names or config
files to compare those instead.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from workbench.analysis import MIXED_RECIPE, ModelReport, RunAnalysis, analyze_run, load_probes
from workbench.checkpoint import LAST_POINTER
from workbench.config import resolve_config
from workbench.display import plot_comparison, plot_run
from workbench.io import atomic_write_text
from workbench.train import train

# The tutorial's recipe, then the cure: what `workbench compare` compares when no recipe is named.
DEFAULT_RECIPES: tuple[str, ...] = ("smollm2_135m_lora_identity_tutorial", MIXED_RECIPE)


def compare_recipes(recipes: tuple[str, ...] | list[str] | None = None, out_dir: str | Path = "outputs/compare",
                    overrides: list[str] | None = None, probes_path: str | None = None, progress: bool = True,
                    max_new_tokens: int = 40, heldout_limit: int = 24):
    """Train (or reuse) each recipe (default: DEFAULT_RECIPES), analyze it, write one comparison table and plot.

    `overrides` (key=value) apply to every recipe; `max_new_tokens` and `heldout_limit` go to `analyze_run`.
    Returns (table, runs): the comparison as a DataFrame (the base model first) and each recipe's RunAnalysis.
    """
    out = Path(out_dir)
    probes = load_probes(probes_path)
    runs = []
    for name in recipes or DEFAULT_RECIPES:
        cfg = resolve_config(name, overrides)
        work = out / cfg.name
        if not (work / "adapter").exists():
            t0 = time.time()
            train(cfg, work, resume=(work / LAST_POINTER).exists() or None, progress=progress)
            print(f"{cfg.name}: trained in {time.time() - t0:.0f} s")
        runs.append(analyze_run(work, probes, max_new_tokens=max_new_tokens, heldout_limit=heldout_limit, progress=progress))
    table = comparison_table(runs)
    atomic_write_text(out / "comparison.md", markdown_table(table))
    atomic_write_text(out / "comparison.csv", table.to_csv(index=False))
    plot_comparison(runs, out / "comparison.png")
    for run in runs:
        plot_run(run, Path(run.work_dir) / "analysis.png")
    return table, runs


def comparison_table(runs: list[RunAnalysis]):
    """One row per recipe (its final checkpoint), after a row for the base model (pandas DataFrame)."""
    import pandas as pd  # heavy: only for the table

    rows = [_row("base model (no training)", runs[0].base, train_seconds=0)]
    rows[0].update({"retention": 1.0, "similarity": 1.0})
    rows += [_row(run.config["name"], run.final, _seconds(run.train_seconds)) for run in runs]
    return pd.DataFrame(rows)


def _row(recipe: str, r: ModelReport, train_seconds) -> dict:
    return {"recipe": recipe, "steps": r.step, "hit seen EN": r.hit_seen["en"], "hit unseen EN": r.hit_unseen["en"],
            "hit seen ZH": r.hit_seen["zh"], "hit unseen ZH": r.hit_unseen["zh"], "leak EN": r.leak["en"],
            "leak ZH": r.leak["zh"], "retention": r.retention, "similarity": r.similarity,
            "held-out loss": r.heldout_loss, "distinct answers": f"{r.distinct}/{r.n_probes}",
            "train time (s)": train_seconds}


def _seconds(s: float):
    return s if math.isnan(s) else round(s)  # nan: the run's metrics log was empty


def markdown_table(df) -> str:
    """A DataFrame as a GitHub markdown table, numbers with two decimals."""
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
