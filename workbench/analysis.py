"""Overfitting, measured: does the assistant know who it is, and does it still know everything else?

For the base model and every checkpoint of a run, on editable bilingual probe
sets (`workbench/probes/default.yaml`):

- identity hit rate: share of answers to identity questions that state the
  configured identity (name AND owner), separately for the training questions
  ("seen") and for differently phrased ones ("unseen"), per language;
- identity leak rate: share of answers to general questions that talk about the
  identity (mention the name or the owner);
- retention: how well the fine-tuned model still predicts the base model's own
  answers to the general questions (exp(-(NLL_tuned - NLL_base)), 1 = unchanged),
  the word overlap of the two models' answers, and the loss on held-out general
  conversations;
- collapse: the number of distinct answers across all probes.

`analyze_run` evaluates a work dir checkpoint by checkpoint, recommends the one
with the best balance and writes a short diagnosis; `compare_recipes` trains and
analyzes several recipes and writes one comparison table. Answers come from the
same prompt builder and generation function as chat.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from workbench.config import PROJECT_ROOT, Config, load_config, resolve_config, resolve_path
from workbench.io import atomic_write_json, atomic_write_text, read_jsonl

PROBES_FILE = Path(__file__).resolve().parent / "probes" / "default.yaml"
HELDOUT_FILE = PROJECT_ROOT / "data" / "general_conversations_heldout.jsonl"
LANGS = ("en", "zh")


# ---------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------
@dataclass
class Probes:
    """Questions per kind and language."""

    identity_seen: dict[str, list[str]]
    identity_unseen: dict[str, list[str]]
    general: dict[str, list[str]]

    def items(self) -> list[tuple[str, str, str]]:
        """(kind, lang, question) for every probe, in a fixed order."""
        out = []
        for kind in ("identity_seen", "identity_unseen", "general"):
            for lang, questions in getattr(self, kind).items():
                out += [(kind, lang, q) for q in questions]
        return out


def load_probes(path: str | Path | None = None, seen_per_lang: int = 6) -> Probes:
    """The probe file's unseen identity and general questions, plus a spread of the training questions."""
    from workbench.identity import identity_questions

    data = yaml.safe_load(Path(path or PROBES_FILE).read_text(encoding="utf-8"))
    seen = {}
    for lang in LANGS:
        qs = identity_questions(lang)
        step = max(1, len(qs) // seen_per_lang)
        seen[lang] = qs[::step][:seen_per_lang]
    return Probes(seen, data["identity_unseen"], data["general"])


# ---------------------------------------------------------------------------
# Metric functions (pure, unit-tested on hand-made answers)
# ---------------------------------------------------------------------------
def _has(text: str, word: str) -> bool:
    return bool(word) and word.lower() in text.lower()


def states_identity(answer: str, name: str, owner: str) -> bool:
    """The answer states the configured identity: it names the assistant and its owner."""
    return _has(answer, name) and _has(answer, owner)


def mentions_identity(answer: str, name: str, owner: str) -> bool:
    """The answer talks about the identity at all (its name or its owner)."""
    return _has(answer, name) or _has(answer, owner)


def hit_rate(answers: list[str], name: str, owner: str) -> float:
    return _share(answers, lambda a: states_identity(a, name, owner))


def leak_rate(answers: list[str], name: str, owner: str) -> float:
    return _share(answers, lambda a: mentions_identity(a, name, owner))


def _share(items: list, pred) -> float:
    return sum(1 for x in items if pred(x)) / len(items) if items else float("nan")


def normalize(answer: str) -> str:
    return re.sub(r"[\W_]+", " ", answer.lower()).strip()


def distinct_answers(answers: list[str]) -> int:
    """How many different answers (ignoring case, punctuation and spacing); 1 means total collapse."""
    return len({normalize(a) for a in answers})


def _units(text: str) -> list[str]:
    """Words for alphabetic text, single characters for CJK."""
    return re.findall(r"[\u4e00-\u9fff]|[a-z0-9]+", text.lower())


def answer_similarity(a: str, b: str) -> float:
    """Word (or CJK character) overlap F1 between two answers, 0-1."""
    ua, ub = _units(a), _units(b)
    if not ua and not ub:
        return 1.0
    if not ua or not ub:
        return 0.0
    common = sum(min(ua.count(u), ub.count(u)) for u in set(ua))
    if common == 0:
        return 0.0
    p, r = common / len(ua), common / len(ub)
    return 2 * p * r / (p + r)


def retention_from_nll(nll_tuned: float, nll_base: float) -> float:
    """exp(-(NLL_tuned - NLL_base)) capped at 1: 1 = the base's answers are as likely as before."""
    return min(1.0, math.exp(-(nll_tuned - nll_base)))


# ---------------------------------------------------------------------------
# Evaluating one model
# ---------------------------------------------------------------------------
@dataclass
class ModelReport:
    """Metrics of one model (the base, or a checkpoint at `step`)."""

    label: str
    step: int
    hit_seen: dict[str, float] = field(default_factory=dict)
    hit_unseen: dict[str, float] = field(default_factory=dict)
    leak: dict[str, float] = field(default_factory=dict)
    retention: float = float("nan")        # likelihood of the base's general answers, relative to the base
    similarity: float = float("nan")       # word overlap with the base's general answers
    heldout_loss: float = float("nan")     # loss on held-out general conversations
    distinct: int = 0
    n_probes: int = 0
    answers: list[dict] = field(default_factory=list)

    def overall(self, metric: str) -> float:
        values = [v for v in getattr(self, metric).values() if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    @property
    def score(self) -> float:
        """Balance of learning and keeping: unseen English hit x (1 - leak) x retention."""
        parts = [self.hit_unseen.get("en", 0.0), 1 - self.overall("leak"), self.retention]
        return float("nan") if any(math.isnan(p) for p in parts) else parts[0] * parts[1] * parts[2]


@torch.no_grad()
def answer_nll(model, builder, questions: list[str], answers: list[str]) -> float:
    """Mean per-token negative log-likelihood of `answers` to `questions` under `model`."""
    from workbench.data import Sample
    from workbench.loss import token_loss_sum
    from workbench.packing import collate

    samples = [Sample([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in zip(questions, answers)]
    return _mean_loss(model, builder, samples, collate, token_loss_sum)


@torch.no_grad()
def heldout_loss(model, builder, samples, max_length: int = 512) -> float:
    """Mean per-token loss on held-out conversations (the training loss, without training)."""
    from workbench.loss import token_loss_sum
    from workbench.packing import collate

    return _mean_loss(model, builder, samples, collate, token_loss_sum, max_length)


def _mean_loss(model, builder, samples, collate, token_loss_sum, max_length: int = 512, batch: int = 8) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [builder.encode(s.messages, max_length) for s in samples if s.messages]
    total = n = 0.0
    for i in range(0, len(encoded), batch):
        b = collate([[e] for e in encoded[i:i + batch]], builder.tokenizer.pad_token_id)
        total += token_loss_sum(model, {k: v.to(device) for k, v in b.items()}).item()
        n += sum(e.n_trained for e in encoded[i:i + batch])
    model.train(was_training)
    return total / max(n, 1)


def evaluate_model(model, builder, probes: Probes, name: str, owner: str, label: str, step: int = 0,
                   base: ModelReport | None = None, base_nll: float | None = None, heldout=None,
                   max_new_tokens: int = 40) -> ModelReport:
    """Answer every probe and compute the metrics (retention needs the base model's report)."""
    from workbench.chat import GenerationSettings, answer_batch

    items = probes.items()
    replies = answer_batch(model, builder, [q for _, _, q in items], GenerationSettings(max_new_tokens=max_new_tokens))
    rep = ModelReport(label, step, n_probes=len(items), distinct=distinct_answers(replies))
    rep.answers = [{"kind": k, "lang": l, "question": q, "answer": a} for (k, l, q), a in zip(items, replies)]
    for lang in LANGS:
        pick = lambda kind: [r["answer"] for r in rep.answers if r["kind"] == kind and r["lang"] == lang]  # noqa: E731
        rep.hit_seen[lang] = hit_rate(pick("identity_seen"), name, owner)
        rep.hit_unseen[lang] = hit_rate(pick("identity_unseen"), name, owner)
        rep.leak[lang] = leak_rate(pick("general"), name, owner)
    general = [r for r in rep.answers if r["kind"] == "general"]
    if base is not None:
        base_general = [r for r in base.answers if r["kind"] == "general"]
        rep.similarity = sum(answer_similarity(a["answer"], b["answer"]) for a, b in zip(general, base_general)) / len(general)
        nll = answer_nll(model, builder, [r["question"] for r in base_general], [r["answer"] for r in base_general])
        rep.retention = retention_from_nll(nll, base_nll)
    if heldout:
        rep.heldout_loss = heldout_loss(model, builder, heldout)
    return rep


# ---------------------------------------------------------------------------
# A run, checkpoint by checkpoint
# ---------------------------------------------------------------------------
@dataclass
class RunAnalysis:
    work_dir: str
    config: dict
    reports: list[ModelReport]
    best_step: int
    diagnosis: str
    train_seconds: float

    @property
    def base(self) -> ModelReport:
        return self.reports[0]

    @property
    def final(self) -> ModelReport:
        return self.reports[-1]

    def report_at(self, step: int) -> ModelReport:
        return next(r for r in self.reports if r.step == step)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "RunAnalysis":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data["reports"] = [ModelReport(**r) for r in data["reports"]]
        return cls(**data)


def load_heldout(path: str | Path | None = None, limit: int = 24):
    from workbench.data import read_records

    p = resolve_path(path) if path else HELDOUT_FILE
    return read_records(p)[:limit] if Path(p).exists() else []


def analyze_run(work_dir: str | Path, probes: Probes | None = None, steps: list[int] | None = None,
                heldout_path: str | Path | None = None, max_new_tokens: int = 40, heldout_limit: int = 24,
                progress: bool = True) -> RunAnalysis:
    """Evaluate the base model and each checkpoint of a run; recommend one; save analysis.json."""
    from tqdm.auto import tqdm

    from workbench.checkpoint import checkpoint_step, list_checkpoints, load_trainable
    from workbench.models import build_unquantized, load_builder, load_model

    work = Path(work_dir)
    cfg = load_config(work / "config.yaml")
    probes = probes or load_probes()
    heldout = load_heldout(heldout_path, heldout_limit)
    builder = load_builder(cfg)
    ckpts = [c for c in list_checkpoints(work) if steps is None or checkpoint_step(c) in steps]
    bar = tqdm(total=len(ckpts) + 1, desc=f"analyzing {cfg.name}", unit="model", disable=not progress)
    base_model = load_model(cfg.pretrained_model_name_or_path, torch_dtype=cfg.torch_dtype, device=cfg.device,
                            trust_remote_code=cfg.trust_remote_code)
    base = evaluate_model(base_model, builder, probes, cfg.assistant_name, cfg.owner_name, "base", 0, heldout=heldout,
                          max_new_tokens=max_new_tokens)
    gen = [r for r in base.answers if r["kind"] == "general"]
    base_nll = answer_nll(base_model, builder, [r["question"] for r in gen], [r["answer"] for r in gen])
    base.retention, base.similarity = 1.0, 1.0
    del base_model
    bar.update()
    reports = [base]
    model = build_unquantized(cfg)
    for ckpt in ckpts:
        load_trainable(model, ckpt)
        reports.append(evaluate_model(model, builder, probes, cfg.assistant_name, cfg.owner_name, ckpt.name,
                                      checkpoint_step(ckpt), base, base_nll, heldout, max_new_tokens))
        bar.update()
    bar.close()
    metrics = read_jsonl(work / "metrics.jsonl")
    best = recommend(reports)
    result = RunAnalysis(str(work), cfg.to_dict(), reports, best.step, diagnose(reports, cfg, best),
                         metrics[-1]["elapsed_s"] if metrics else float("nan"))
    result.save(work / "analysis.json")
    return result


def recommend(reports: list[ModelReport]) -> ModelReport:
    """The checkpoint with the best balance (score); the base model when no checkpoint is better."""
    tuned = [r for r in reports if r.step > 0 and not math.isnan(r.score)]
    return max(tuned, key=lambda r: r.score) if tuned else reports[0]


def diagnose(reports: list[ModelReport], cfg: Config, best: ModelReport) -> str:
    """A few sentences a student can act on."""
    final = reports[-1]
    leaks = {lang: [mentions_identity(r["answer"], cfg.assistant_name, cfg.owner_name)
                    for r in final.answers if r["kind"] == "general" and r["lang"] == lang] for lang in LANGS}
    n_leaks, n_general = sum(sum(v) for v in leaks.values()), sum(len(v) for v in leaks.values())
    per_lang = ", ".join(f"{lang.upper()} {sum(v)}/{len(v)}" for lang, v in leaks.items() if v)
    hit = final.hit_unseen.get("en", float("nan"))
    lines = [f"Final checkpoint ({final.label}): states the identity on {hit:.0%} of unseen English identity questions "
             f"({final.hit_unseen.get('zh', float('nan')):.0%} in Chinese); answers {n_leaks} of {n_general} general "
             f"questions with its identity ({per_lang}); {final.distinct} distinct answers to {final.n_probes} probes; "
             f"retention {final.retention:.2f}."]
    mixed = any(not (s.generate or "").startswith("identity") for s in cfg.datasets)
    if final.overall("leak") >= 0.3 or final.distinct <= final.n_probes // 4:
        cure = f"use {best.label}" if best is not final and best.step > 0 else "train fewer steps"
        more = ("mix in more general conversations in the leaking language" if mixed else
                "or the mixed recipe (smollm2_135m_lora_identity_mixed_cpu), which mixes general conversations into training")
        lines.append(f"Overfit: the identity has leaked into everyday answers. Remedy: {cure}, {more}.")
    elif hit < 0.5:
        lines.append("Under-trained: the identity is not learned yet on unseen questions. Train longer or raise lr.")
    else:
        lines.append("Healthy: the identity is learned and general answers are kept.")
    if best.step > 0:
        lines.append(f"Best balance: {best.label} (unseen EN hit {best.hit_unseen.get('en', 0):.0%}, "
                     f"leak {best.overall('leak'):.0%}, retention {best.retention:.2f}).")
    return " ".join(lines)


# ---------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------
def metrics_table(run: RunAnalysis):
    """One row per model (base and checkpoints)."""
    import pandas as pd

    rows = []
    for r in run.reports:
        rows.append({"model": r.label, "step": r.step, "hit seen en": r.hit_seen.get("en"), "hit unseen en": r.hit_unseen.get("en"),
                     "hit seen zh": r.hit_seen.get("zh"), "hit unseen zh": r.hit_unseen.get("zh"), "leak en": r.leak.get("en"),
                     "leak zh": r.leak.get("zh"), "retention": r.retention, "similarity": r.similarity,
                     "held-out loss": r.heldout_loss, "distinct answers": f"{r.distinct}/{r.n_probes}"})
    return pd.DataFrame(rows)


def answers_table(run: RunAnalysis, step: int | None = None, kinds: tuple = ("identity_unseen", "general")):
    """Before/after: the base model's and one checkpoint's answers side by side."""
    import pandas as pd

    after = run.report_at(step) if step is not None else run.final
    rows = [{"kind": a["kind"], "lang": a["lang"], "question": a["question"], "base": b["answer"], after.label: a["answer"]}
            for a, b in zip(after.answers, run.base.answers) if a["kind"] in kinds]
    return pd.DataFrame(rows)


def plot_run(run: RunAnalysis, path: str | Path | None = None):
    """Loss curves (training and held-out) and hit / leak / retention against step."""
    import matplotlib.pyplot as plt

    metrics = read_jsonl(Path(run.work_dir) / "metrics.jsonl")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax1.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="training loss", alpha=0.8)
    held = [(r.step, r.heldout_loss) for r in run.reports if not math.isnan(r.heldout_loss)]
    if held:
        ax1.plot(*zip(*held), "o-", label="held-out general loss")
    ax1.set(xlabel="step", ylabel="loss", title=f"{run.config['name']}: loss")
    ax1.legend()
    steps = [r.step for r in run.reports]
    for label, values, style in [
        ("identity hit, unseen EN", [r.hit_unseen.get("en") for r in run.reports], "o-"),
        ("identity hit, unseen ZH", [r.hit_unseen.get("zh") for r in run.reports], "o--"),
        ("identity hit, seen EN", [r.hit_seen.get("en") for r in run.reports], "s:"),
        ("leak (general questions)", [r.overall("leak") for r in run.reports], "x-"),
        ("retention", [r.retention for r in run.reports], "d-"),
    ]:
        ax2.plot(steps, values, style, label=label)
    ax2.axvline(run.best_step, color="grey", ls=":", lw=1)
    ax2.set(xlabel="step (0 = base model)", ylim=(-0.05, 1.05), title="identity learned vs. everything else kept")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


# ---------------------------------------------------------------------------
# Recipe comparison
# ---------------------------------------------------------------------------
COMPARE_RECIPES = ("smollm2_135m_lora_identity_tutorial", "smollm2_135m_lora_identity_mixed_cpu")


def compare_recipes(recipes: tuple[str, ...] = COMPARE_RECIPES, out_dir: str | Path = "outputs/compare",
                    overrides: list[str] | None = None, probes_path: str | None = None, progress: bool = True):
    """Train (or reuse) each recipe, analyze it, and write one comparison table and plot."""
    from workbench.checkpoint import LAST_POINTER
    from workbench.train import train

    out = Path(out_dir)
    probes = load_probes(probes_path)
    runs = []
    for name in recipes:
        cfg = resolve_config(name, overrides)
        work = out / cfg.name
        done = (work / "adapter").exists()
        if not done:
            t0 = time.time()
            train(cfg, work, resume=(work / LAST_POINTER).exists() or None, progress=progress)
            print(f"{cfg.name}: trained in {time.time() - t0:.0f} s")
        runs.append(analyze_run(work, probes, progress=progress))
    table = comparison_table(runs)
    atomic_write_text(out / "comparison.md", markdown_table(table))
    table.to_csv(out / "comparison.csv.tmp", index=False)
    Path(out / "comparison.csv.tmp").replace(out / "comparison.csv")
    plot_comparison(runs, out / "comparison.png")
    for run in runs:
        plot_run(run, Path(run.work_dir) / "analysis.png")
    return table, runs


def show_comparison(compare_dir: str | Path):
    """The saved recipe comparison (table and plot) of `make compare`, or a note on how to make it."""
    from IPython.display import HTML, Image, display

    out = Path(compare_dir)
    if not (out / "comparison.csv").exists():
        return HTML(f"<i>No comparison in {out} yet: run <code>make compare</code> "
                    f"(trains the tutorial's and the mixed recipe, about 15 minutes on 2 cores).</i>")
    import pandas as pd

    if (out / "comparison.png").exists():
        display(Image(filename=str(out / "comparison.png")))
    return pd.read_csv(out / "comparison.csv")


def markdown_table(df) -> str:
    """A DataFrame as a GitHub markdown table, numbers with two decimals."""
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def comparison_table(runs: list[RunAnalysis]):
    import pandas as pd

    rows = []
    for run in runs:
        f = run.final
        rows.append({"recipe": run.config["name"], "steps": f.step, "hit seen EN": f.hit_seen["en"], "hit unseen EN": f.hit_unseen["en"],
                     "hit seen ZH": f.hit_seen["zh"], "hit unseen ZH": f.hit_unseen["zh"], "leak EN": f.leak["en"], "leak ZH": f.leak["zh"],
                     "retention": f.retention, "similarity": f.similarity, "held-out loss": f.heldout_loss,
                     "distinct answers": f"{f.distinct}/{f.n_probes}", "train time (s)": round(run.train_seconds)})
    base = runs[0].base
    rows.insert(0, {"recipe": "base model (no training)", "steps": 0, "hit seen EN": base.hit_seen["en"], "hit unseen EN": base.hit_unseen["en"],
                    "hit seen ZH": base.hit_seen["zh"], "hit unseen ZH": base.hit_unseen["zh"], "leak EN": base.leak["en"],
                    "leak ZH": base.leak["zh"], "retention": 1.0, "similarity": 1.0, "held-out loss": base.heldout_loss,
                    "distinct answers": f"{base.distinct}/{base.n_probes}", "train time (s)": 0})
    return pd.DataFrame(rows)


def plot_comparison(runs: list[RunAnalysis], path: str | Path | None = None):
    """Unseen identity hit, leak and retention per step, one line per recipe."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for run in runs:
        steps = [r.step for r in run.reports]
        axes[0].plot(steps, [r.hit_unseen["en"] for r in run.reports], "o-", label=run.config["name"])
        axes[1].plot(steps, [r.overall("leak") for r in run.reports], "o-", label=run.config["name"])
        axes[2].plot(steps, [r.retention for r in run.reports], "o-", label=run.config["name"])
    for ax, title in zip(axes, ["identity hit rate, unseen EN questions", "leak rate on general questions", "retention of general answers"]):
        ax.set(title=title, xlabel="step (0 = base)", ylim=(-0.05, 1.05))
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig

