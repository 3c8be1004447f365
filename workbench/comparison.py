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

The notebook series does the same inside one run folder: notebook 02 configures
a baseline recipe beside the main one (`configure_baseline`, saved under
RUN/baseline/), 03 trains both, 06 puts base, baseline and fine-tuned side by
side (`series_models`), and 07 analyzes both (`analyze_runs`, one base-model
evaluation for all) into one table per checkpoint (`checkpoint_table`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from workbench.analysis import MIXED_RECIPE, ModelReport, Probes, RunAnalysis, analyze_run, load_probes
from workbench.checkpoint import LAST_POINTER
from workbench.config import Config, configure, load_config, resolve_config, save_config
from workbench.display import plot_comparison, plot_run
from workbench.i18n import t
from workbench.io import atomic_write_text
from workbench.retention import strict_summary
from workbench.train import train

# The tutorial's recipe, then the cure: what `workbench compare` compares when no recipe is named.
TUTORIAL_RECIPE = "smollm2_135m_lora_identity_tutorial"
DEFAULT_RECIPES: tuple[str, ...] = (TUTORIAL_RECIPE, MIXED_RECIPE)
# What a baseline shares with the main run, so that both are measured on the same footing.
SHARED_FIELDS = ("pretrained_model_name_or_path", "torch_dtype", "trust_remote_code", "system", "assistant_name",
                 "owner_name", "evaluation_inputs", "device", "seed")
BASELINE_DIR = "baseline"  # inside a series' run folder: config.yaml and work/ of the baseline recipe


def compare_recipes(recipes: tuple[str, ...] | list[str] | None = None, out_dir: str | Path = "outputs/compare",
                    overrides: list[str] | None = None, probes_path: str | None = None, progress: bool = True,
                    max_new_tokens: int = 40, heldout_limit: int = 24):
    """Train (or reuse) each recipe (default: DEFAULT_RECIPES), analyze it, write one comparison table and plot.

    `overrides` (key=value) apply to every recipe; `max_new_tokens` and `heldout_limit` go to `analyze_run`.
    Returns (table, runs): the comparison as a DataFrame (the base model first) and each recipe's RunAnalysis.
    """
    out = Path(out_dir)
    works = []
    for name in recipes or DEFAULT_RECIPES:
        cfg = resolve_config(name, overrides)
        works.append(train_or_reuse(cfg, out / cfg.name, progress))
    runs = analyze_runs(works, load_probes(probes_path), max_new_tokens, heldout_limit, progress)
    table = comparison_table(runs)
    atomic_write_text(out / "comparison.md", markdown_table(table))
    atomic_write_text(out / "comparison.csv", table.to_csv(index=False))
    plot_comparison(runs, out / "comparison.png")
    for run in runs:
        plot_run(run, Path(run.work_dir) / "analysis.png")
    return table, runs


def train_or_reuse(cfg: Config, work: Path, progress: bool = True) -> Path:
    """Train `cfg` into `work` unless a finished run is there (an interrupted one is resumed); return `work`."""
    if not (work / "adapter").exists():
        t0 = time.time()
        train(cfg, work, resume=(work / LAST_POINTER).exists() or None, progress=progress)
        print(t("cmp.trained", None, name=cfg.name, seconds=time.time() - t0))
    return work


def analyze_runs(work_dirs: list[str | Path], probes: Probes | None = None, max_new_tokens: int = 40,
                 heldout_limit: int = 24, progress: bool = True) -> list[RunAnalysis]:
    """`analyze_run` on each existing work dir, evaluating a shared base model only once; missing ones are skipped."""
    probes = probes or load_probes()
    runs: list[RunAnalysis] = []
    for work in work_dirs:
        if not (Path(work) / "config.yaml").exists():
            print(t("cmp.no_run", None, work=work))
            continue
        runs.append(analyze_run(work, probes, max_new_tokens=max_new_tokens, heldout_limit=heldout_limit,
                                progress=progress, reference=runs[0] if runs else None))
    return runs


# ---------------------------------------------------------------------------
# A baseline recipe inside the notebook series
# ---------------------------------------------------------------------------
def configure_baseline(recipe: str, main: Config, max_steps: int | None = None) -> Config | None:
    """The baseline recipe (name or file) on the main run's base model, names and system prompt; None for ""."""
    if not recipe:
        print(t("cmp.no_baseline_recipe", None))
        return None
    cfg = resolve_config(recipe)
    shared = {k: getattr(main, k) for k in SHARED_FIELDS if getattr(cfg, k) != getattr(main, k)}
    return configure(recipe, max_steps=max_steps, **shared)  # max_steps also halves save_steps, as in notebook 02


def save_baseline(cfg: Config | None, run_dir: str | Path) -> Path | None:
    """Write the baseline's config to RUN/baseline/config.yaml (remove a stale one when there is no baseline)."""
    path = Path(run_dir) / BASELINE_DIR / "config.yaml"
    if cfg is None:
        path.unlink(missing_ok=True)
        return None
    return save_config(cfg, path)


def train_baseline(run_dir: str | Path, resume: bool = False, progress: bool = True):
    """Train the baseline notebook 02 configured (RUN/baseline/work); None when there is none."""
    folder = Path(run_dir) / BASELINE_DIR
    if not (folder / "config.yaml").exists():
        print(t("cmp.no_baseline", None, folder=folder))
        return None
    cfg = load_config(folder / "config.yaml")
    t0 = time.time()
    result = train(cfg, folder / "work", resume=resume or None, progress=progress)
    print(t("cmp.baseline_done", None, name=cfg.name, steps=cfg.max_steps, seconds=time.time() - t0))
    return result


def series_models(run_dir: str | Path, merged_dir: str = "merged", lang: str | None = None) -> dict[str, tuple]:
    """(model, builder) per label (in `lang`; None: the session's): the base model, the baseline recipe (its adapter on
    the base) and the merged model."""
    from workbench.chat import load_chat_model  # loads models: only when asked

    run = Path(run_dir)
    cfg = load_config(run / merged_dir / "workbench_config.yaml")
    models = {t("model.base", lang): load_chat_model(cfg.pretrained_model_name_or_path, system=cfg.system)}
    baseline = run / BASELINE_DIR / "work" / "adapter"
    if baseline.exists():
        name = load_config(run / BASELINE_DIR / "config.yaml").name
        models[t("model.baseline", lang, name=name)] = load_chat_model(cfg.pretrained_model_name_or_path, adapter=str(baseline))
    models[t("model.tuned", lang, name=cfg.name)] = load_chat_model(str(run / merged_dir))
    return models


def series_work_dirs(run_dir: str | Path, work_dir: str = "work") -> list[Path]:
    """The main run's work dir, then the baseline's (analyze_runs skips it when there is none)."""
    return [Path(run_dir) / work_dir, Path(run_dir) / BASELINE_DIR / "work"]


def checkpoint_table(runs: list[RunAnalysis], lang: str = "en"):
    """Every analyzed model of every run, one row each (the base model once, first), with the kept checkpoint marked;
    headers and marks in `lang` ("en"/"zh")."""
    import pandas as pd  # heavy: only for the table

    from workbench.i18n import localize_columns, t

    rows = [{**_row(t("table.base_model", lang), runs[0].base, train_seconds=0), "keep": ""}]
    for run in runs:
        rows += [{**_row(run.config["name"], r, _seconds(run.train_seconds)),
                  "keep": t("table.keep", lang) if r.step == run.best_step else ""} for r in run.reports[1:]]
    table = pd.DataFrame(rows).drop(columns=["train time (s)"])
    return localize_columns(table.rename(columns={"steps": "step"}), lang)


def verdict(runs: list[RunAnalysis], lang: str = "en") -> str:
    """Which checkpoint of which recipe to keep, how the recipes compare there, then each run's diagnosis (in `lang`)."""
    from workbench.analysis import diagnosis_in
    from workbench.i18n import t

    best = max(runs, key=lambda run: _score(run.report_at(run.best_step)))
    lines = []
    for run in runs:
        r = run.report_at(run.best_step)
        lines.append(t("verdict.best", lang, name=run.config["name"], label=r.label, hit_en=f"{r.hit_unseen['en']:.0%}",
                       hit_zh=f"{r.hit_unseen['zh']:.0%}", leak_en=f"{r.leak['en']:.0%}", leak_zh=f"{r.leak['zh']:.0%}",
                       retention=r.retention) + ("" if lang == "zh" else " ") + strict_summary(r, lang))
    lines.append(t("verdict.keep", lang, name=best.config["name"], label=best.report_at(best.best_step).label))
    lines += [f"\n{run.config['name']}: {run.diagnosis if lang == 'en' else diagnosis_in(run, lang)}" for run in runs]
    return "\n".join(lines)


def _score(r: ModelReport) -> float:
    return -1.0 if math.isnan(r.score) else r.score


def comparison_table(runs: list[RunAnalysis]):
    """One row per recipe (its final checkpoint), after a row for the base model (pandas DataFrame)."""
    import pandas as pd  # heavy: only for the table

    rows = [_row(t("table.base_model", "en"), runs[0].base, train_seconds=0)]
    rows[0].update({"retention": 1.0, "similarity": 1.0})
    rows += [_row(run.config["name"], run.final, _seconds(run.train_seconds)) for run in runs]
    return pd.DataFrame(rows)


def _row(recipe: str, r: ModelReport, train_seconds) -> dict:
    return {"recipe": recipe, "steps": r.step, "hit seen EN": r.hit_seen["en"], "hit unseen EN": r.hit_unseen["en"],
            "hit seen ZH": r.hit_seen["zh"], "hit unseen ZH": r.hit_unseen["zh"], "leak EN": r.leak["en"],
            "leak ZH": r.leak["zh"], "retention": r.retention, "similarity": r.similarity,
            "strict EN": r.strict.get("en"), "strict ZH": r.strict.get("zh"),
            "facts lost": f"{r.n_facts_lost}/{sum(r.facts_known.values())}", "held-out loss": r.heldout_loss, "distinct answers": f"{r.distinct}/{r.n_probes}",
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
