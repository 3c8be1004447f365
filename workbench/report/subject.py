"""What a report card is about: a training run, an adapter folder or a merged model folder, evaluated.

A run (work dir) is analysed checkpoint by checkpoint (`workbench.analysis.analyze_run`, reusing a
saved analysis of the same probes that has the strict measures: analysis.json, or analysis.NAME.json
for another probe file, so that grading with other probes leaves the run's own analysis as it was).
An adapter or a merged model is one model: its
answers to the held-out probes are set beside the base model's, with the prompt builder and the
assistant's and owner's names from the artifact's saved files (prompt.json, workbench_config.yaml).
For an adapter the base is the same model with the adapter switched off (no second copy).

An artifact that workbench did not export (XTuner's `pth_to_hf` or `merge`, peft's own `save_pretrained`: a
camp's homework) has no saved config: the teacher gives what it does not say (`Given`: the owner's name, the
assistant's if it has one, the system prompt) and the base model (`--base`, or the adapter's own
`base_model_name_or_path`). Such a model is asked without a system prompt unless one is given, as XTuner trains
the camp's data (a default the chat template itself adds, as SmolLM2's and Qwen's do, stays).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from workbench import i18n
from workbench.analysis import (Probes, RunAnalysis, add_strict_measures, analysis_file, answer_nll, diagnose,
                                evaluate_model, load_probes, score_identity)
from workbench.convert import CONFIG_FILE
from workbench.models import ModelError, pickled_weights

KINDS = ("run", "adapter", "merged")


class SubjectError(ModelError):
    """A folder that is not a run, an adapter or a merged model, or one that cannot be evaluated; says why.

    Made by `refused(reason, ...)`: the message is the English text of i18n's `subject.<reason>`, and
    `in_lang(lang)` gives the same in the grade page's language (the path, names and library details as they are).
    """

    def __init__(self, message: str, reason: str | None = None, fields: dict | None = None):
        super().__init__(message)
        self.reason, self.fields = reason, fields or {}

    def in_lang(self, lang: str | None) -> str:
        return i18n.t(f"subject.{self.reason}", lang, **self.fields) if self.reason else str(self)


def refused(reason: str, **fields) -> SubjectError:
    """The SubjectError of `reason` (i18n key `subject.<reason>`), its message in English."""
    return SubjectError(i18n.t(f"subject.{reason}", "en", **fields), reason, fields)


def detect(path: str | Path) -> str:
    """"run", "adapter" or "merged"; a clear error for anything else."""
    p = Path(path)
    if not p.is_dir():
        raise refused("not_folder", path=p)
    if (p / "adapter_config.json").exists():
        return "adapter"
    if (p / "config.json").exists():
        return "merged"
    if (p / "config.yaml").exists() and any(any(p.glob(g)) for g in ("analysis.json", "analysis.*.json", "iter_*")):
        return "run"
    names = sorted(x.name for x in p.iterdir())[:6]
    if any(p.glob("*.pth")):  # an XTuner work dir: its checkpoints are pickles (DeepSpeed folders or files)
        raise refused("xtuner_work_dir", path=p)
    raise refused("unknown_folder", path=p, names=", ".join(names)) if names else refused("empty_folder", path=p)


@dataclass(frozen=True)
class Given:
    """What the teacher says about a submission (None: not said). Names override the saved config's; an artifact
    without one needs at least the owner. assistant_name "": the assistant has no name of its own ("我是张三的小助手").
    system: the system prompt to ask with (None: the saved one, or for an artifact without one no system turn)."""

    assistant_name: str | None = None
    owner_name: str | None = None
    system: str | None = None


def saved_config(folder: Path, kind: str = "adapter", base: str | None = None, given: Given = Given()):
    """The config an adapter or merged model is judged by: the training config saved with it (workbench_config.yaml),
    or, for one exported by another tool, one made of what the teacher gives; the given names win either way."""
    from workbench.config import Config, load_config

    p = folder / CONFIG_FILE
    names = {k: v for k, v in (("assistant_name", given.assistant_name), ("owner_name", given.owner_name)) if v is not None}
    if p.exists():
        return load_config(p).replace(**names)
    if not (given.owner_name or "").strip():
        raise refused("no_owner", path=folder, config=CONFIG_FILE)
    base = base or (_adapter_base(folder) if kind == "adapter" else None)
    if not base:
        raise refused("no_base", path=folder, config=CONFIG_FILE)
    return Config(name=folder.name, pretrained_model_name_or_path=base, **{"assistant_name": "", **names})


def _adapter_base(folder: Path) -> str | None:
    """The base model an adapter's own adapter_config.json names (None when it names none or cannot be read)."""
    try:
        return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path") or None
    except (OSError, ValueError, AttributeError):
        return None


def analyze_subject(path: str | Path, base: str | None = None, probes: Probes | None = None, max_new_tokens: int = 40,
                    progress: bool = True, base_cache: dict | None = None, given: Given = Given()) -> RunAnalysis:
    """The analysis a report card shows: a run's checkpoints, or one adapter / merged model beside its base.

    `base`: the base model (default: the one named in the artifact's config). `base_cache`: a dict
    shared across calls (grading a folder) so that the base model's answers are computed once per
    base model, system prompt and names. `given`: names and system prompt the teacher gives (`Given`).
    """
    p = Path(path)
    kind = detect(p)
    probes = probes or load_probes()
    if kind == "run":
        return _analyze_run(p, probes, max_new_tokens, progress)
    cfg = saved_config(p, kind, base, given)
    base_name = base or cfg.pretrained_model_name_or_path
    model, builder, base_model = _load(p, kind, base_name, cfg)
    builder = _asked_with(builder, p, given)
    # The base's answers depend on the model and the prompt, not on the names: one evaluation for a class whose
    # students each named their own assistant; its identity measures are scored again for each one's names.
    key = (base_name, builder.system, builder.chat_template, max_new_tokens, tuple(probes.items()))
    cache = base_cache if base_cache is not None else {}
    if key not in cache:
        cache[key] = _evaluate_base(base_model, builder, probes, cfg, max_new_tokens)
    cached, base_nll = cache[key]
    base_report = score_identity(dataclasses.replace(cached, hit_seen={}, hit_unseen={}, leak={}), cfg.assistant_name,
                                 cfg.owner_name)
    tuned = evaluate_model(model, builder, probes, cfg.assistant_name, cfg.owner_name, p.name, 1, base_report, base_nll,
                           max_new_tokens=max_new_tokens)
    config = {**cfg.to_dict(), "pretrained_model_name_or_path": base_name, "subject_kind": kind}
    reports = [base_report, tuned]
    return RunAnalysis(str(p), config, reports, tuned.step, diagnose(reports, cfg, tuned), math.nan, base_nll)


def _analyze_run(p: Path, probes: Probes, max_new_tokens: int, progress: bool) -> RunAnalysis:
    """A run's saved analysis where it answers these probes, else its checkpoints analysed; a run whose config,
    checkpoints or saved analysis cannot be read is refused with the reason (`cannot_load_run`)."""
    from safetensors import SafetensorError

    from workbench.analysis import analyze_run

    try:
        saved = analysis_file(p, probes)
        if saved.exists():
            run = RunAnalysis.load(saved)
            same = [(a["kind"], a["lang"], a["question"]) for a in run.base.answers] == probes.items()
            if same and run.base.strict:
                return run
        return analyze_run(p, probes, max_new_tokens=max_new_tokens, progress=progress)
    except SubjectError:
        raise
    except (ModelError, SafetensorError, OSError, ValueError, KeyError, TypeError) as e:  # ConfigError, CheckpointError too
        raise refused("cannot_load_run", path=p, detail=_detail(e)) from None


def _load(p: Path, kind: str, base_name: str, cfg):
    """(model, builder, base model): for an adapter the base is the same model with the adapter disabled."""
    from safetensors import SafetensorError

    from workbench.chat import load_chat_model
    from workbench.models import load_model

    if kind == "adapter" and pickled_weights(p):
        raise refused("pickled_adapter", path=p / "adapter_model.bin")
    try:
        if kind == "adapter":
            model, builder = load_chat_model(base_name, adapter=str(p), device="cpu", torch_dtype="float32")
            return model, builder, _AdapterOff(model)
        model, builder = load_chat_model(str(p), device="cpu", torch_dtype="float32")
        return model, builder, load_model(base_name, torch_dtype="float32", device="cpu")
    except ModelError as e:  # the loader's own refusal (the tokenizer, remote code, ...): its text as the detail
        raise refused(f"cannot_load_{kind}", path=p, detail=_detail(e, with_type=False)) from None
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # a corrupt weights or config file
        raise refused(f"cannot_load_{kind}", path=p, detail=_detail(e)) from None


def _detail(e: Exception, with_type: bool = True) -> str:
    """A library's error in one line (its lines joined: a ConfigError lists each field on its own), at most 300
    characters, its type first unless the message is the workbench's own."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300]
    return f"{type(e).__name__}: {text}" if with_type else text


def _asked_with(builder, folder: Path, given: Given):
    """The prompt builder the probes are asked with: the saved one of a workbench export (with the given system prompt
    if one is given); for another tool's export the given system prompt or none, and without the default system prompt
    the workbench's conversion of the base put into the template (InternLM2's): XTuner trains the camp's data with none."""
    from workbench.prompt import PROMPT_FILE, PromptBuilder, strip_default_system

    if (folder / PROMPT_FILE).exists():
        return builder if given.system is None else PromptBuilder(builder.tokenizer, system=given.system,
                                                                  chat_template=builder.chat_template)
    return PromptBuilder(builder.tokenizer, system=given.system, chat_template=strip_default_system(builder.chat_template))


class _AdapterOff:
    """Marks "the adapter model, with its adapter switched off" as the base model."""

    def __init__(self, model):
        self.model = model


def _evaluate_base(base_model, builder, probes: Probes, cfg, max_new_tokens: int):
    if isinstance(base_model, _AdapterOff):
        with base_model.model.disable_adapter():
            return _base_report(base_model.model, builder, probes, cfg, max_new_tokens)
    return _base_report(base_model, builder, probes, cfg, max_new_tokens)


def _base_report(model, builder, probes: Probes, cfg, max_new_tokens: int):
    base = evaluate_model(model, builder, probes, cfg.assistant_name, cfg.owner_name, "base", 0,
                          max_new_tokens=max_new_tokens)
    gen = [r for r in base.answers if r["kind"] == "general"]
    base_nll = answer_nll(model, builder, [r["question"] for r in gen], [r["answer"] for r in gen])
    base.retention, base.similarity = 1.0, 1.0
    add_strict_measures(base, base, probes)
    return base, base_nll
