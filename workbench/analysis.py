"""Overfitting, measured: does the assistant know who it is, and does it still know everything else?

For the base model and every checkpoint of a run, on editable bilingual probe
sets (`workbench/probes/default.yaml`):

- identity hit rate: share of answers to identity questions that state the
  configured identity (name AND owner, each in its role: "I'm Alex" from an
  assistant named Nova is a miss, see `workbench.judge`; an assistant with no name of its own,
  the camp's "我是{owner}的小助手", by the owner in the owner's role), separately for the training
  questions ("seen") and for differently phrased ones ("unseen"), per language;
- identity leak rate: share of answers to general questions that talk about the
  identity (mention the name or the owner);
- retention: how well the fine-tuned model still predicts the base model's own
  answers to the general questions (exp(-(NLL_tuned - NLL_base)), 1 = unchanged),
  the word overlap of the two models' answers, and the loss on held-out general
  conversations; and, strictly (`workbench.retention`), the share of general answers
  whose first sentence is still the base model's, and the short-answer facts (`facts`
  probes) the base model knew and the tuned one lost, per language;
- collapse: the number of distinct answers across all probes.

`analyze_run` evaluates a work dir checkpoint by checkpoint, recommends the one
with the best balance and writes a short diagnosis (analysis.json). Answers come
from the same prompt builder and generation function as chat. This module
computes only: tables and plots of its results are in `workbench.display`, and
the comparison of recipes (which trains them) is `workbench.comparison`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from workbench.chat import GenerationSettings, answer_batch
from workbench.checkpoint import checkpoint_step, list_checkpoints, load_trainable
from workbench.config import PROJECT_ROOT, Config, load_config, resolve_path
from workbench.i18n import t
from workbench.identity import identity_questions
from workbench.io import atomic_write_json, read_jsonl
from workbench.judge import hit_rate, leak_rate, mentions_identity, role_errors, states_identity  # noqa: F401 (the last two: still importable from here, where they were)
from workbench.loss import token_loss_sum
from workbench.models import build_unquantized, load_builder, load_model
from workbench.packing import collate
from workbench.readers import read_records
from workbench.retention import drift_advice, fact_check, strict_retention, strict_summary
from workbench.samples import DataError, Sample

PROBES_FILE = Path(__file__).resolve().parent / "probes" / "default.yaml"
HELDOUT_FILE = PROJECT_ROOT / "data" / "general_conversations_heldout.jsonl"
LANGS = ("en", "zh")
PROBE_BATCH = 256  # probes answered per generation batch: the default set (130) in one; in batches of 128 the 2 left
# over took 40 steps of their own (a tuned model's probes on 2 cores: 20-27 s against 18 s); finished rows leave the batch
# The recipe the diagnosis of an overfit identity-only run points to: it mixes general conversations in.
MIXED_RECIPE = "smollm2_135m_lora_identity_mixed_cpu"


# ---------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------
@dataclass
class Probes:
    """Questions per kind and language."""

    identity_seen: dict[str, list[str]]
    identity_unseen: dict[str, list[str]]
    general: dict[str, list[str]]
    facts: dict[str, list[dict]] = field(default_factory=dict)  # {"question": ..., "answer": [accepted short answers]}
    name: str = ""  # "" for the default probe file, else its file's stem: where a run's analysis of them is saved

    def items(self) -> list[tuple[str, str, str]]:
        """(kind, lang, question) for every probe, in a fixed order."""
        out = []
        for kind in ("identity_seen", "identity_unseen", "general"):
            for lang, questions in getattr(self, kind).items():
                out += [(kind, lang, q) for q in questions]
        for lang, facts in self.facts.items():
            out += [("fact", lang, f["question"]) for f in facts]
        return out


def load_probes(path: str | Path | None = None, seen_per_lang: int = 6) -> Probes:
    """The probe file's unseen identity and general questions, plus a spread of the training questions."""
    path = Path(path or PROBES_FILE)
    data = _probe_file(path)
    seen = {}
    for lang in LANGS:
        qs = identity_questions(lang)
        step = max(1, len(qs) // seen_per_lang)
        seen[lang] = qs[::step][:seen_per_lang]
    name = "" if path.resolve() == PROBES_FILE.resolve() else path.stem
    return Probes(seen, data["identity_unseen"], data["general"], _facts(data.get("facts") or {}, path), name)


def per_probes(stem: str, suffix: str, probes: Probes | None = None) -> str:
    """A file name for what was measured on these probes: STEM.SUFFIX for the default probes, STEM.NAME.SUFFIX for
    another probe file (NAME its stem), so that measuring a run on other probes never replaces what it had."""
    name = probes.name if probes is not None else ""
    return f"{stem}.{name}{suffix}" if name else f"{stem}{suffix}"


def analysis_file(work_dir: str | Path, probes: Probes | None = None) -> Path:
    """Where a run's analysis on these probes is saved: analysis.json, or analysis.NAME.json (`per_probes`)."""
    return Path(work_dir) / per_probes("analysis", ".json", probes)


def _probe_file(path: Path) -> dict:
    """The probe YAML, checked: `identity_unseen` and `general` map each language to a list of questions."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(path, 0, None, f"not valid YAML: {' '.join(str(e).split())}") from None
    for key in ("identity_unseen", "general"):
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, dict) or not all(isinstance(qs, list) and all(isinstance(q, str) and q.strip() for q in qs)
                                                  for qs in value.values()):
            raise DataError(path, 0, key, "needs a mapping of each language (en, zh) to a list of questions")
    return data


def _facts(data: dict, path) -> dict[str, list[dict]]:
    """The probe file's short-answer facts, checked: each has a question and one or more accepted answers."""
    out = {}
    for lang, facts in data.items():
        out[lang] = []
        for k, f in enumerate(facts):
            answers = f.get("answer") if isinstance(f, dict) else None
            if not isinstance(f, dict) or not f.get("question") or not answers:
                raise DataError(path, k + 1, f"facts.{lang}", "needs a 'question' and an 'answer' (a string or a list)")
            out[lang].append({"question": str(f["question"]), "answer": [str(a) for a in (answers if isinstance(answers, list) else [answers])]})
    return out


# ---------------------------------------------------------------------------
# Metric functions (pure, unit-tested on hand-made answers)
# ---------------------------------------------------------------------------
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
    strict: dict[str, float] = field(default_factory=dict)  # share of general answers keeping the base's first sentence
    facts_known: dict[str, int] = field(default_factory=dict)  # short-answer facts the base model got right
    facts_lost: dict[str, list[str]] = field(default_factory=dict)  # of those, the questions the model lost
    distinct: int = 0
    n_probes: int = 0
    answers: list[dict] = field(default_factory=list)

    def overall(self, metric: str) -> float:
        values = [v for v in getattr(self, metric).values() if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    @property
    def n_facts_lost(self) -> int:
        return sum(len(v) for v in self.facts_lost.values())

    @property
    def score(self) -> float:
        """Balance of learning and keeping: unseen identity hit (mean of the languages) x (1 - leak) x retention,
        x strict retention (mean of the languages) x share of known facts kept, where those are measured."""
        parts = [self.overall("hit_unseen"), 1 - self.overall("leak"), self.retention]
        if any(math.isnan(p) for p in parts):
            return float("nan")
        strict, known = self.overall("strict"), sum(self.facts_known.values())
        return (parts[0] * parts[1] * parts[2] * (1.0 if math.isnan(strict) else strict)
                * (1 - self.n_facts_lost / known if known else 1.0))


@torch.no_grad()
def answer_nll(model, builder, questions: list[str], answers: list[str]) -> float:
    """Mean per-token negative log-likelihood of `answers` to `questions` under `model`."""
    samples = [Sample([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in zip(questions, answers)]
    return _mean_loss(model, builder, samples)


@torch.no_grad()
def heldout_loss(model, builder, samples, max_length: int = 512) -> float:
    """Mean per-token loss on held-out conversations (the training loss, without training)."""
    return _mean_loss(model, builder, samples, max_length)


def _mean_loss(model, builder, samples, max_length: int = 512, batch: int = 8) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Sorted by length, so that a batch pads little (the sum does not depend on the order).
    encoded = sorted((builder.encode(s.messages, max_length) for s in samples if s.messages), key=lambda e: len(e.input_ids))
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
    items = probes.items()
    # One batch for all probes: on a CPU a step of 88 rows costs little more than one of 16.
    replies = answer_batch(model, builder, [q for _, _, q in items], GenerationSettings(max_new_tokens=max_new_tokens),
                           batch_size=PROBE_BATCH)
    rep = ModelReport(label, step, n_probes=len(items), distinct=distinct_answers(replies))
    rep.answers = [{"kind": k, "lang": l, "question": q, "answer": a} for (k, l, q), a in zip(items, replies)]
    score_identity(rep, name, owner)
    general = [r for r in rep.answers if r["kind"] == "general"]
    if base is not None:
        base_general = [r for r in base.answers if r["kind"] == "general"]
        rep.similarity = sum(answer_similarity(a["answer"], b["answer"]) for a, b in zip(general, base_general)) / len(general)
        nll = answer_nll(model, builder, [r["question"] for r in base_general], [r["answer"] for r in base_general])
        rep.retention = retention_from_nll(nll, base_nll)
        add_strict_measures(rep, base, probes)
    if heldout:
        rep.heldout_loss = heldout_loss(model, builder, heldout)
    return rep


def score_identity(rep: ModelReport, name: str, owner: str) -> ModelReport:
    """The report's identity hit (seen, unseen) and leak per language, from its answers, for these names: the only
    measures that depend on them (grading scores one base model's answers for each student's names)."""
    for lang in LANGS:
        pick = lambda kind: [r["answer"] for r in rep.answers if r["kind"] == kind and r["lang"] == lang]  # noqa: E731
        rep.hit_seen[lang] = hit_rate(pick("identity_seen"), name, owner)
        rep.hit_unseen[lang] = hit_rate(pick("identity_unseen"), name, owner)
        rep.leak[lang] = leak_rate(pick("general"), name, owner)
    return rep


def add_strict_measures(rep: ModelReport, base: ModelReport, probes: Probes) -> None:
    """First-sentence retention of the general answers and the fact check, per language (workbench.retention)."""
    pairs = list(zip(rep.answers, base.answers))
    for lang in LANGS:
        general = [(a["answer"], b["answer"]) for a, b in pairs if a["kind"] == "general" and a["lang"] == lang]
        rep.strict[lang] = strict_retention([t for t, _ in general], [b for _, b in general])
        facts = [(a, b) for a, b in pairs if a["kind"] == "fact" and a["lang"] == lang]
        if facts:
            accepted = [f["answer"] for f in probes.facts[lang]]
            check = fact_check([a["question"] for a, _ in facts], [a["answer"] for a, _ in facts],
                               [b["answer"] for _, b in facts], accepted)
            rep.facts_known[lang], rep.facts_lost[lang] = check.known, check.lost


# ---------------------------------------------------------------------------
# A run, checkpoint by checkpoint
# ---------------------------------------------------------------------------
@dataclass
class RunAnalysis:
    """The analysis of one run: a report for the base model (first) and each checkpoint, saved as analysis.json."""

    work_dir: str
    config: dict
    reports: list[ModelReport]
    best_step: int
    diagnosis: str
    train_seconds: float
    base_nll: float = float("nan")  # the base model's NLL of its own general answers (what retention is relative to)

    @property
    def base(self) -> ModelReport:
        return self.reports[0]

    @property
    def final(self) -> ModelReport:
        return self.reports[-1]

    def report_at(self, step: int) -> ModelReport:
        found = [r for r in self.reports if r.step == step]
        if not found:
            raise KeyError(f"{self.work_dir}: no report at step {step}; analyzed steps: {[r.step for r in self.reports]}")
        return found[0]

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "RunAnalysis":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data["reports"] = [ModelReport(**r) for r in data["reports"]]
        return cls(**data)


def load_heldout(path: str | Path | None = None, limit: int = 24) -> list[Sample]:
    """The first `limit` held-out general conversations (none when the file is missing)."""
    p = resolve_path(path) if path else HELDOUT_FILE
    return read_records(p)[:limit] if Path(p).exists() else []


def analyze_run(work_dir: str | Path, probes: Probes | None = None, steps: list[int] | None = None,
                heldout_path: str | Path | None = None, max_new_tokens: int = 40, heldout_limit: int = 24,
                progress: bool = True, reference: RunAnalysis | None = None) -> RunAnalysis:
    """Evaluate the base model and each checkpoint of a run; recommend one; save it (`analysis_file`: analysis.json
    for the default probes).

    `reference`: an analysis of another run on the same base model, probes and settings, whose
    base-model report is reused instead of evaluated again (what comparing recipes does).
    """
    work = Path(work_dir)
    cfg = load_config(work / "config.yaml")
    probes = probes or load_probes()
    heldout = load_heldout(heldout_path, heldout_limit)
    builder = load_builder(cfg)
    ckpts = [c for c in list_checkpoints(work) if steps is None or checkpoint_step(c) in steps]
    bar = tqdm(total=len(ckpts) + 1, desc=t("analysis.progress", None, name=cfg.name), unit="model", disable=not progress)
    if reference is not None and _same_base(reference, cfg, probes):
        base, base_nll = reference.base, reference.base_nll
    else:
        base, base_nll = _evaluate_base(cfg, builder, probes, heldout, max_new_tokens)
    bar.update()
    reports = [base]
    model = build_unquantized(cfg, device="cpu")  # a QLoRA run's adapter, on the full-precision base
    for ckpt in ckpts:
        load_trainable(model, ckpt)
        reports.append(evaluate_model(model, builder, probes, cfg.assistant_name, cfg.owner_name, ckpt.name,
                                      checkpoint_step(ckpt), base, base_nll, heldout, max_new_tokens))
        bar.update()
    bar.close()
    metrics = read_jsonl(work / "metrics.jsonl")
    best = recommend(reports)
    result = RunAnalysis(str(work), cfg.to_dict(), reports, best.step, diagnose(reports, cfg, best),
                         metrics[-1]["elapsed_s"] if metrics else float("nan"), base_nll)
    result.save(analysis_file(work, probes))
    return result


def _same_base(reference: RunAnalysis, cfg: Config, probes: Probes) -> bool:
    """The reference's base report answers the same probes, from the same base model, system prompt and names."""
    ref = reference.config
    same = all(ref.get(k) == getattr(cfg, k) for k in ("pretrained_model_name_or_path", "system", "assistant_name", "owner_name"))
    return same and not math.isnan(reference.base_nll) and [
        (a["kind"], a["lang"], a["question"]) for a in reference.base.answers] == probes.items()


def _evaluate_base(cfg: Config, builder, probes: Probes, heldout, max_new_tokens: int) -> tuple[ModelReport, float]:
    """The base model's report (retention 1 by definition) and its NLL of its own general answers."""
    base_model = load_model(cfg.pretrained_model_name_or_path, torch_dtype=cfg.torch_dtype, device=cfg.device,
                            trust_remote_code=cfg.trust_remote_code)
    base = evaluate_model(base_model, builder, probes, cfg.assistant_name, cfg.owner_name, "base", 0, heldout=heldout,
                          max_new_tokens=max_new_tokens)
    gen = [r for r in base.answers if r["kind"] == "general"]
    base_nll = answer_nll(base_model, builder, [r["question"] for r in gen], [r["answer"] for r in gen])
    base.retention, base.similarity = 1.0, 1.0
    add_strict_measures(base, base, probes)  # strict retention 1; the facts the base model knows
    return base, base_nll


def recommend(reports: list[ModelReport]) -> ModelReport:
    """The checkpoint with the best balance (score); the base model when no checkpoint is better."""
    tuned = [r for r in reports if r.step > 0 and not math.isnan(r.score)]
    return max(tuned, key=lambda r: r.score) if tuned else reports[0]


def diagnose(reports: list[ModelReport], cfg: Config, best: ModelReport, mixed_recipe: str = MIXED_RECIPE,
             lang: str = "en") -> str:
    """A few sentences a student can act on, in `lang` ("en"/"zh", workbench/i18n.py); an overfit identity-only
    run is pointed to `mixed_recipe`."""
    final = reports[-1]
    leaks = {probe: [mentions_identity(r["answer"], cfg.assistant_name, cfg.owner_name)
                     for r in final.answers if r["kind"] == "general" and r["lang"] == probe] for probe in LANGS}
    n_leaks, n_general = sum(sum(v) for v in leaks.values()), sum(len(v) for v in leaks.values())
    per_lang = ", ".join(f"{probe.upper()} {sum(v)}/{len(v)}" for probe, v in leaks.items() if v)
    hit = final.hit_unseen.get("en", float("nan"))
    lines = [t("diag.final", lang, label=final.label, hit_en=f"{hit:.0%}",
               hit_zh=f"{final.hit_unseen.get('zh', float('nan')):.0%}", n_leaks=n_leaks, n_general=n_general,
               per_lang=per_lang, distinct=final.distinct, n_probes=final.n_probes, retention=final.retention),
             strict_summary(final, lang)]
    mixed = any(not (s.generate or "").startswith("identity") for s in cfg.datasets)
    if final.overall("leak") >= 0.3 or final.distinct <= final.n_probes // 4:
        cure = t("diag.use", lang, label=best.label) if best is not final and best.step > 0 else t("diag.fewer_steps", lang)
        more = t("diag.more_general", lang) if mixed else t("diag.mixed_recipe", lang, recipe=mixed_recipe)
        lines.append(t("diag.overfit", lang, cure=cure, more=more))
    elif hit < 0.5:
        lines.append(t("diag.under", lang))
    elif drift_advice(final):
        lines.append(drift_advice(final, lang=lang, distill_weight=getattr(cfg, "distill_weight", 0.0)))
    else:
        lines.append(t("diag.healthy", lang))
    if best.step > 0:
        lines.append(t("diag.keep", lang, label=best.label, hit_en=f"{best.hit_unseen.get('en', 0):.0%}",
                       hit_zh=f"{best.hit_unseen.get('zh', 0):.0%}", leak=f"{best.overall('leak'):.0%}",
                       retention=best.retention))
    return ("" if lang == "zh" else " ").join(line for line in lines if line)  # Chinese sentences follow each other without a space


def diagnosis_in(run: RunAnalysis, lang: str = "en") -> str:
    """The run's diagnosis in `lang` ("en"/"zh"): `diagnose` again on the saved reports (no model is run). A report
    card's subject adds what it is to the config (`subject_kind`): not a config field."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return diagnose(run.reports, Config.from_dict({k: v for k, v in run.config.items() if k in fields}),
                    run.report_at(run.best_step), lang=lang)
