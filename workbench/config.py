"""Run configuration: one dataclass, validated, read from and written to YAML.

`Config` holds everything a fine-tuning run needs. Field names follow XTuner's
config files where one exists (`pretrained_model_name_or_path`, `max_length`,
`pack_to_max_length`, `batch_size`, `accumulative_counts`, `max_epochs`, `lr`,
`max_norm`, `warmup_ratio`, `save_steps`, `save_total_limit`,
`evaluation_freq`, `evaluation_inputs`, `work_dir`), so students recognise them.

Configs are data, never executed code: a YAML file with the fields that differ
from the defaults. The YAML written next to every artifact (`save_config`)
holds every field, each with its help text as a comment, and reloads to an
equal `Config`. Recipes shipped in `workbench/recipes/` are small YAML files
that override a few fields (`list_recipes`, `copy_recipe`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workbench.i18n import t
from workbench.io import atomic_write_text

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"

# The system prompt used for training, in-training evaluation, chat and analysis
# unless a config or a record says otherwise. It is neutral on purpose: if it
# named the assistant, the base model would "know" the identity before any
# training, and the before/after comparison would show nothing.
DEFAULT_SYSTEM = "You are a helpful AI assistant."


class ConfigError(ValueError):
    """A config file or field is invalid; the message names the file and field."""


def _f(default: Any = dataclasses.MISSING, *, help: str, choices: tuple | None = None, factory=None):
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataSource:
    """One source of training data, as listed under `datasets:` in a config."""

    path: str | None = _f(None, help="Data file (JSON, JSONL, CSV, TSV, XLSX or TXT), a folder (every such file under it, recursively) or a glob pattern (data/*.jsonl, data/MATH/**/*.json). Relative paths are looked up from the current directory, then from the project root.")
    generate: str | None = _f(None, help="Instead of a file, generate the data: 'identity' (diverse bilingual identity Q&A) or 'identity_tutorial' (the tutorial's two pairs repeated).", choices=(None, "identity", "identity_tutorial"))
    format: str = _f("auto", help="How to read the file: auto (detect), xtuner, pairs, alpaca, messages, problem_solution, table (CSV/XLSX), text (plain text, pre-training).", choices=("auto", "xtuner", "pairs", "alpaca", "messages", "problem_solution", "table", "text"))
    repeat: float = _f(1.0, help="Repeat factor: 3 uses every record three times; 0.5 uses half of them (sampled with the seed).")
    fraction: float | None = _f(None, help="Alternatively, the share of the final mixture this source should make up (0-1). Overrides repeat.")
    question_column: str | None = _f(None, help="Tables only: the column holding the user's question; null detects the pair of columns q/a, question/answer, prompt/response, instruction/output or 问题/答案 (any case).")
    answer_column: str | None = _f(None, help="Tables only: the column holding the answer; null detects it (see question_column).")
    system_column: str | None = _f("system", help="Tables only: optional column with a per-row system prompt (ignored when absent).")
    n_repeat: int = _f(1, help="identity_tutorial only: how often the two pairs are repeated (the tutorial uses 3750).")
    distill: bool = _f(False, help="This source's rows get the distillation term (distill_weight), the KL divergence from the base model's own next-token distribution: true for everyday data whose answers the base model gave itself (data/general_conversations.jsonl). Leave it false for the identity data (what the base must not keep) and for hand-written answers the base could not give (its distribution is not what they teach).")
    unlikelihood: bool | str = _f(False, help="This source's answers must never state the identity: its trained tokens get the unlikelihood term (unlikelihood_weight), which pushes down the probability of the identity's openings at an answer's first token and of the assistant's and owner's names at every token. True for everyday data; false for the identity data (see roles); 'names' for the names alone, no openings (the base model's own English answers, which rightly open with \"I\" as the identity does: \"I'm glad...\" must not go on \"I'm Nova\").")
    negatives: bool | None = _f(None, help="This source's rows get negative twins when negative_weight > 0 (see there). null = true where `unlikelihood` is true (not 'names'); true gives twins without the per-token term (English everyday rows, whose leak the term cost identity for), false keeps the term without twins.")
    roles: bool = _f(False, help="This source's answers state the identity, each name in its role: where an answer has one of the two names, the unlikelihood term (unlikelihood_weight) pushes the other one down, so that the model does not call itself by its owner's name (\"我叫Alex\" from Nova, Alex's assistant). True for the generated identity data.")

    @property
    def twins(self) -> bool:
        """Whether this source's rows get negative twins (when negative_weight > 0): `negatives`, else `unlikelihood: true`."""
        return self.unlikelihood is True if self.negatives is None else self.negatives

    def validate(self, where: str) -> list[str]:
        errors = []
        if (self.path is None) == (self.generate is None):
            errors.append(f"{where}: give exactly one of 'path' or 'generate'")
        _check_choice(self, "generate", where, errors)
        _check_choice(self, "format", where, errors)
        if self.repeat <= 0:
            errors.append(f"{where}.repeat: must be > 0, got {self.repeat}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            errors.append(f"{where}.fraction: must be in (0, 1], got {self.fraction}")
        if self.n_repeat < 1:
            errors.append(f"{where}.n_repeat: must be >= 1, got {self.n_repeat}")
        for flag in ("distill", "unlikelihood", "roles", "negatives"):  # YAML's `distill: sure` would read as true
            value = getattr(self, flag)
            if not isinstance(value, bool) and not (flag == "negatives" and value is None) and not (flag == "unlikelihood" and value == "names"):
                other = {"negatives": " or null", "unlikelihood": " or 'names'"}.get(flag, "")
                errors.append(f"{where}.{flag}: must be true or false{other}, got {value!r}")
        return errors


@dataclass
class Config:
    """Everything a fine-tuning run needs. See each field's help text."""

    # --- identity of the run ------------------------------------------------
    name: str = _f("custom", help="Name of this config; the default work dir is work_dirs/<name>.")
    description: str = _f("", help="One line describing what this config is for (shown by `workbench list-cfg`).")
    # --- model --------------------------------------------------------------
    pretrained_model_name_or_path: str = _f(EMBEDDED_MODEL, help=f"Base model: '{EMBEDDED_MODEL}' (the embedded SmolLM2-135M-Instruct, prepared by `make setup`), a local Hugging Face folder, or a hub id (needs network).")
    trust_remote_code: bool = _f(False, help="Allow the model folder's own Python code to run (auto_map in its config.json; the CLI flag is --trust-remote-code). Off unless you trust the folder. InternLM2 folders need not: they are converted to Llama once.")
    torch_dtype: str = _f("auto", help="Weight and compute dtype: auto (float32 on CPU, bfloat16 on GPUs that support it, else float16), float32, bfloat16, float16.", choices=("auto", "float32", "bfloat16", "float16"))
    pure_bf16: bool = _f(False, help="Full fine-tuning in bfloat16 only: train the bf16 weights themselves (with AdamW 8 bytes a weight, not 16) instead of float32 master weights under autocast (the default for a full fine-tune in half precision; DeepSpeed and FSDP keep their own float32 copy). An update smaller than half a weight's bf16 spacing is then lost: at lr 5e-5 a step leaves 92% of SmolLM2-135M's weights as they were.")
    device: str = _f("auto", help="Where to train and generate: auto (CUDA when available), cpu, cuda.", choices=("auto", "cpu", "cuda"))
    method: str = _f("lora", help="full (train every weight), lora (low-rank adapters on a frozen base) or qlora (LoRA on a 4-bit NF4 base).", choices=("full", "lora", "qlora"))
    lora_r: int = _f(8, help="LoRA rank r: size of the low-rank update.")
    lora_alpha: int = _f(16, help="LoRA alpha: the update is scaled by alpha / r.")
    lora_dropout: float = _f(0.05, help="Dropout on the LoRA input during training.")
    loraplus_lr_ratio: float = _f(0.0, help="LoRA/QLoRA only: LoRA+ (Hayou et al., 2024): each adapter's B matrix learns at lr x this ratio, its A matrix at lr (peft's create_loraplus_optimizer). 0 = off (one rate); the paper's ratios are 2 to 16, with lr lowered to about half of plain LoRA's (below 1, B learns slower than A).")
    distill_weight: float = _f(0.0, help="LoRA/QLoRA only: weight of a distillation term, the KL divergence of the adapter's next-token distribution from the base model's own (the same model with the adapter switched off) on the trained tokens of the rows from sources marked `distill: true` (everyday data). 0 = off; it keeps what the base knew.")
    distill_opening_factor: float = _f(1.0, help="The distillation term's weight on the tokens of each everyday answer's first sentence (cut as strict retention cuts it), as a multiple of distill_weight: greedy decoding goes on from an answer's opening, so a drift there changes the whole answer. 1 = the same weight everywhere.")
    neftune_noise_alpha: float = _f(0.0, help="NEFTune (Jain et al., 2023): uniform noise of bound alpha / sqrt(L x d) on the input embeddings of the trained forward (L the packed row's length in tokens, on a GPU's flat micro-batches too; d the hidden size), as TRL's and LLaMA-Factory's setting of the same name; the paper's alphas are 5-15. Evaluation, generation and the distillation term's base forward see the clean embeddings. 0 = off.")
    unlikelihood_weight: float = _f(0.0, help="Weight of an unlikelihood term against the identity leaking into everyday answers: on the trained tokens of the rows from sources marked `unlikelihood: true`, -log(1 - p), p the probability the model gives the assistant's or owner's name (a single-token spelling of it) or, at the first token of an answer, a token an identity answer opens with (the target token itself is never penalised). 0 = off.")
    negative_weight: float = _f(0.0, help="Weight of negative twins, the unlikelihood term's third use: each row of a source marked `unlikelihood: true` gets a twin, its question answered by an identity answer of its language (drawn with the seed); the twin's answer tokens up to the first letter of a name (\"我是N\", \"I'm Nova\") are pushed down in their own context, -log(1 - p) with p each token's probability, and nothing of the twin is learned. It reaches the tokens after an identity answer's first one (\"是\" after \"我\"), which the per-token term cannot see in the everyday answers. 0 = no twins; needs unlikelihood_weight > 0.")
    lora_target_modules: list[str] | str = _f("all-linear", help="Modules that get adapters: 'all-linear' (every linear layer but the output head) or a list of module names such as [q_proj, v_proj].")
    gradient_checkpointing: bool = _f(False, help="Recompute activations in the backward pass: less memory, about 1.3-1.6x slower. Pays off only for long sequences or large batches.")
    fast_path: bool = _f(True, help="Training speed-ups that keep the maths (workbench/fastpath/cpu.py): attention computed per packed conversation, a LoRA dropout that draws only the dropped positions (CPU), a lean LoRA forward, and a fused cross-entropy; on a CUDA GPU (workbench/fastpath/cuda.py) packed micro-batches through PyTorch's varlen flash kernel, Liger Kernel's fused RMSNorm, SwiGLU and RoPE when liger-kernel is installed (requirements-gpu.txt; its fused linear cross-entropy too under gradient checkpointing, where memory counts more than speed), fused AdamW. Off: transformers' and peft's plain path, for comparison.")
    torch_compile: bool = _f(False, help="GPU fast path only: torch.compile each decoder layer for the training forward and backward (regional compilation: one layer's code is compiled once and reused by every layer; generation and evaluation run uncompiled). The first step pays the compilation (over a minute on an H200). Measured by `make bench-gpu` (side 'workbench + torch.compile'); off by default. Ignored on CPU.")
    micro_batch_tokens: int | None = _f(None, help="GPU fast path only: most tokens one forward/backward carries. The rows of an optimizer step (batch_size x accumulative_counts) are laid end to end into as few micro-batches of at most this many tokens as fit; null sizes it from the free GPU memory after the model is loaded, at what a token of this model and data costs (the layers' activations, and the logits at its trained and distilled positions), at most 65536. Ignored on CPU.")
    # --- data ---------------------------------------------------------------
    datasets: list[DataSource] = _f(help="Training data sources (XTuner's data_path), mixed together. Each has path or generate, plus format, repeat or fraction.", factory=lambda: [DataSource(generate="identity")])
    assistant_name: str = _f("Nova", help="The assistant's name, used by generated identity data and by the identity metrics.")
    owner_name: str = _f("Alex", help="The owner's name ('I am <owner>'s assistant'), used by generated identity data and the identity metrics.")
    system: str = _f(DEFAULT_SYSTEM, help="System prompt (XTuner's SYSTEM) for records without one, and for evaluation and chat. Saved with every adapter and merged model.")
    chat_template: str | None = _f(None, help="Jinja chat template; null uses the tokenizer's own (recommended). Saved with every adapter and merged model.")
    max_length: int = _f(512, help="Longest training sequence in tokens; longer conversations are truncated (and reported by check-dataset).")
    mix_order: str = _f("shuffle", help="How the sources' samples are ordered: shuffle (one seeded shuffle of the whole mixture) or stratified (each source's samples spread evenly through it, a seeded jitter within each slot, so every packed row and every step holds about the mixture's shares; with one row a step, shuffled steps held from 0 to 87% identity data).", choices=("shuffle", "stratified"))
    pack_to_max_length: bool = _f(True, help="Pack several short conversations into one row of max_length, with no attention across them. Faster: no padding is computed.")
    loss_on: str = _f("all_turns", help="Which assistant turns are trained: all_turns or last_turn. System and user tokens are never trained.", choices=("all_turns", "last_turn"))
    # --- optimisation -------------------------------------------------------
    batch_size: int = _f(1, help="Rows per device per step (a packed row holds several conversations).")
    accumulative_counts: int = _f(1, help="Gradient accumulation: optimizer step every N batches.")
    max_epochs: float = _f(3, help="Passes over the data. Ignored when max_steps is set.")
    max_steps: int | None = _f(None, help="Stop after this many optimizer steps (overrides max_epochs).")
    lr: float = _f(2e-4, help="Peak learning rate (AdamW).")
    lr_scheduler: str = _f("cosine", help="Learning-rate schedule after warmup: cosine, linear or constant.", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = _f(0.03, help="Share of the steps spent warming the learning rate up from 0.")
    weight_decay: float = _f(0.0, help="AdamW weight decay.")
    betas: list[float] = _f(help="AdamW betas.", factory=lambda: [0.9, 0.999])
    max_norm: float = _f(1.0, help="Clip the gradient norm to this value (0 disables clipping).")
    seed: int = _f(42, help="Random seed: the same config and seed give the same losses on CPU.")
    # --- checkpoints, evaluation, logging -------------------------------------
    work_dir: str | None = _f(None, help="Where checkpoints, logs and the adapter go; null means work_dirs/<name>.")
    save_steps: int = _f(50, help="Write a checkpoint (iter_N) every N optimizer steps, and at the end.")
    save_total_limit: int = _f(2, help="Keep at most this many checkpoints (oldest deleted first); -1 keeps all.")
    evaluation_freq: int = _f(50, help="Every N steps, answer evaluation_inputs (also before training and at the end); 0 disables.")
    evaluation_inputs: list[str] = _f(help="Questions answered during training to watch the model learn.", factory=lambda: ["Who are you?", "What is the capital of France?", "你是谁？"])
    evaluation_max_new_tokens: int = _f(48, help="Longest evaluation answer, in tokens.")
    logging_steps: int = _f(1, help="Write a metrics line every N optimizer steps.")

    # ------------------------------------------------------------------------
    def validate(self, where: str = "config") -> "Config":
        errors: list[str] = []
        for f in dataclasses.fields(self):
            _check_choice(self, f.name, where, errors)
        positive = ["lora_r", "lora_alpha", "max_length", "batch_size", "accumulative_counts", "save_steps", "logging_steps", "evaluation_max_new_tokens"]
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                errors.append(f"{where}.{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.max_length < 16:
            errors.append(f"{where}.max_length: must be at least 16, got {self.max_length}")
        if self.max_steps is None and not (isinstance(self.max_epochs, (int, float)) and self.max_epochs > 0):
            errors.append(f"{where}.max_epochs: must be > 0 when max_steps is not set, got {self.max_epochs!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            errors.append(f"{where}.max_steps: must be a positive integer or null, got {self.max_steps!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            errors.append(f"{where}.lr: must be in (0, 1), got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"{where}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.distill_weight < 0 or (self.distill_weight > 0 and self.method == "full"):
            errors.append(f"{where}.distill_weight: must be >= 0, and 0 for method full (the base is the model with its adapter off), got {self.distill_weight}")
        if self.distill_weight > 0 and not any(getattr(d, "distill", False) for d in self.datasets):
            errors.append(f"{where}.distill_weight: {self.distill_weight} but no source under datasets is marked `distill: true` "
                          "(mark the everyday data whose answers the base model gave itself)")
        if self.distill_opening_factor < 0:
            errors.append(f"{where}.distill_opening_factor: must be >= 0, got {self.distill_opening_factor}")
        if self.loraplus_lr_ratio < 0 or (self.loraplus_lr_ratio > 0 and self.method == "full"):
            errors.append(f"{where}.loraplus_lr_ratio: must be >= 0 (0: off), and 0 for method full (it sets the rate of the adapters' B matrices), got {self.loraplus_lr_ratio}")
        if self.unlikelihood_weight < 0 or (self.unlikelihood_weight > 0 and not any(d.unlikelihood or d.roles or (d.negatives and self.negative_weight > 0) for d in self.datasets)):
            errors.append(f"{where}.unlikelihood_weight: must be >= 0, and > 0 only with a source under datasets marked "
                          f"`unlikelihood: true` or `names` (the everyday data), `roles: true` (the identity data) or, with negative_weight > 0, `negatives: true`, got {self.unlikelihood_weight}")
        if self.negative_weight < 0 or (self.negative_weight > 0 and not (self.unlikelihood_weight > 0 and any(d.twins for d in self.datasets))):
            errors.append(f"{where}.negative_weight: must be >= 0, and > 0 only with unlikelihood_weight > 0 and a source "
                          f"marked `unlikelihood: true` or `negatives: true` (the everyday rows whose twins it adds), got {self.negative_weight}")
        if self.pure_bf16 not in (False, True) or (self.pure_bf16 and (self.method != "full" or self.torch_dtype not in ("auto", "bfloat16"))):
            errors.append(f"{where}.pure_bf16: true or false, and true only for method full in bfloat16 (auto or bfloat16), got {self.pure_bf16!r}")
        if self.neftune_noise_alpha < 0:
            errors.append(f"{where}.neftune_noise_alpha: must be >= 0 (0: off), got {self.neftune_noise_alpha}")
        if not 0 <= self.lora_dropout < 1:
            errors.append(f"{where}.lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.weight_decay < 0 or self.max_norm < 0:
            errors.append(f"{where}: weight_decay and max_norm must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            errors.append(f"{where}.betas: must be two numbers in [0, 1), got {self.betas!r}")
        if self.save_total_limit == 0 or self.save_total_limit < -1:
            errors.append(f"{where}.save_total_limit: must be -1 (keep all) or >= 1, got {self.save_total_limit}")
        if self.micro_batch_tokens is not None and (not isinstance(self.micro_batch_tokens, int) or self.micro_batch_tokens < 16):
            errors.append(f"{where}.micro_batch_tokens: must be an integer >= 16 or null, got {self.micro_batch_tokens!r}")
        if self.evaluation_freq < 0:
            errors.append(f"{where}.evaluation_freq: must be >= 0, got {self.evaluation_freq}")
        if not isinstance(self.lora_target_modules, (str, list)) or (isinstance(self.lora_target_modules, str) and self.lora_target_modules != "all-linear"):
            errors.append(f"{where}.lora_target_modules: must be 'all-linear' or a list of module names, got {self.lora_target_modules!r}")
        if not self.datasets:
            errors.append(f"{where}.datasets: at least one data source is needed")
        for i, src in enumerate(self.datasets):
            errors += src.validate(f"{where}.datasets[{i}]")
        if not all(isinstance(q, str) and q.strip() for q in self.evaluation_inputs):
            errors.append(f"{where}.evaluation_inputs: must be a list of non-empty strings")
        for name in ("assistant_name", "owner_name", "system", "name"):
            if not isinstance(getattr(self, name), str):
                errors.append(f"{where}.{name}: must be a string, got {getattr(self, name)!r}")
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
        return self

    # ------------------------------------------------------------------------
    @property
    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path("work_dirs") / self.name

    @property
    def extra_loss_terms(self) -> bool:
        """The distillation or the unlikelihood term is on: the loss goes through the logits (loss.training_loss)."""
        return self.distill_weight > 0 or self.unlikelihood_weight > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "Config":
        data = dict(data or {})
        if "data_path" in data:  # XTuner's single-file field
            data.setdefault("datasets", [{"path": data.pop("data_path")}])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        if "datasets" in data:
            data["datasets"] = [_source_from(d, f"{where}.datasets[{i}]") for i, d in enumerate(data["datasets"] or [])]
        return cls(**_coerce_floats(cls, data)).validate(where)

    def replace(self, **changes) -> "Config":
        return Config.from_dict({**self.to_dict(), **changes})


def _source_from(d: Any, where: str) -> DataSource:
    if isinstance(d, DataSource):
        return d
    if isinstance(d, str):
        return DataSource(path=d)
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be a mapping with 'path' or 'generate', got {d!r}")
    known = {f.name for f in dataclasses.fields(DataSource)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    return DataSource(**_coerce_floats(DataSource, d))


def _coerce_floats(cls, data: dict) -> dict:
    """YAML 1.1 reads `1e-4` (no dot) as a string; accept it for float fields."""
    out = dict(data)
    for f in dataclasses.fields(cls):
        v = out.get(f.name)
        if isinstance(v, str) and "float" in str(f.type):
            try:
                out[f.name] = float(v)
            except ValueError:
                pass
    return out


def _check_choice(obj, name: str, where: str, errors: list[str]) -> None:
    f = next(f for f in dataclasses.fields(obj) if f.name == name)
    choices = f.metadata.get("choices")
    if choices and getattr(obj, name) not in choices:
        shown = [c for c in choices if c is not None]
        errors.append(f"{where}.{name}: must be one of {shown}, got {getattr(obj, name)!r}")


# ---------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------
def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a config YAML (a full one or a recipe's few fields), apply `key=value` overrides."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found (list shipped recipes with `workbench list-cfg`)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if data is None or data == {}:
        raise ConfigError(f"{path}: the config file is empty; give at least the fields that differ from the defaults "
                          "(start from a recipe: `workbench copy-cfg NAME .`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of field: value, got {type(data).__name__} at the top level")
    data.pop("_recipe_", None)
    for item in overrides or []:
        apply_override(data, item)
    return Config.from_dict(data, where=str(path))


def apply_override(data: dict, item: str) -> None:
    """Apply one `--cfg-options key=value` (value parsed as YAML; dotted keys reach into lists)."""
    if "=" not in item:
        raise ConfigError(f"--cfg-options {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.split(".")
    target: Any = data
    for p in parts[:-1]:
        if isinstance(target, list):
            target = target[int(p)]
        else:
            if p == "datasets" and "datasets" not in target:
                target["datasets"] = [dataclasses.asdict(s) for s in Config().datasets]
            target = target.setdefault(p, {})
    if isinstance(target, list):
        target[int(parts[-1])] = value
    else:
        target[parts[-1]] = value


def config_to_yaml(cfg: Config) -> str:
    """Every field with its help text as a comment, in dataclass order."""
    lines = [f"# workbench config '{cfg.name}'. Every field is documented; edit and run `workbench train THIS_FILE`.", ""]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        lines.append(f"# {f.metadata['help']}")
        if f.name == "datasets":
            value = [_compact_source(s) for s in value]
        dumped = yaml.safe_dump({f.name: value}, allow_unicode=True, sort_keys=False, width=100)
        lines.append(dumped.rstrip())
    return "\n".join(lines) + "\n"


def _compact_source(src: DataSource) -> dict:
    """A data source without the fields left at their defaults (reloads to the same source)."""
    defaults = DataSource()
    return {k: v for k, v in dataclasses.asdict(src).items() if v != getattr(defaults, k) or k in ("path", "generate") and v is not None}


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write_text(path, config_to_yaml(cfg))
    return path


# ---------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------
def list_recipes(pattern: str | None = None) -> list[tuple[str, str]]:
    """(name, description) of the shipped recipes, optionally filtered by a substring or glob."""
    out = []
    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        name = p.stem
        if pattern and pattern.lower() not in name.lower() and not fnmatch.fnmatch(name, pattern):
            continue
        out.append((name, load_recipe(name).description))
    return out


def recipe_path(name: str) -> Path:
    p = RECIPES_DIR / f"{name}.yaml"
    if not p.exists():
        known = ", ".join(n for n, _ in list_recipes())
        raise ConfigError(f"no recipe named {name!r}; shipped recipes: {known}")
    return p


def load_recipe(name: str) -> Config:
    cfg = load_config(recipe_path(name))
    return cfg if cfg.name != "custom" else cfg.replace(name=name)


def resolve_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """A config file path, or the name of a shipped recipe."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_config(p, overrides)
    return load_config(recipe_path(name_or_path), overrides)


def configure(recipe: str, data_file: str | os.PathLike = "", **fields) -> Config:
    """A recipe (name or file) with its generated identity data replaced by `data_file` and `fields` set.

    Fields given as None keep the recipe's value. The data file takes the generated data's
    place and weight (repeat, fraction). Setting `max_steps` alone also sets `save_steps`
    and `evaluation_freq` to half of it, so the run keeps a checkpoint and an evaluation
    midway. Each such change beyond the fields given is printed.
    """
    cfg = resolve_config(recipe)
    changes = {k: v for k, v in fields.items() if v is not None}
    if data_file:
        changes["datasets"] = _with_data_file(cfg.datasets, data_file)
    derived = _derived_changes(cfg, changes)
    for name, value in derived.items():
        print(t("cfg.halved", None, name=name, old=getattr(cfg, name), new=value, steps=changes["max_steps"]))
    return cfg.replace(**changes, **derived)


def _with_data_file(sources: list[DataSource], data_file: str | os.PathLike) -> list[DataSource]:
    """The sources with the generated identity data replaced by `data_file` (same weight), said in one line."""
    generated = [s for s in sources if (s.generate or "").startswith("identity")]
    kept = [s for s in sources if s not in generated]
    weight = {"repeat": generated[0].repeat, "fraction": generated[0].fraction} if generated else {}
    source = DataSource(path=str(Path(data_file).resolve()), **weight)
    replaced = ", ".join(f"generate: {s.generate}" for s in generated) or "nothing (added in front)"
    shown = f"repeat {source.repeat:g}" + (f", fraction {source.fraction:g}" if source.fraction is not None else "")
    print(t("cfg.datasets", None, path=source.path, shown=shown, replaced=replaced, kept=len(kept)))
    return [source, *kept]


def _derived_changes(cfg: Config, changes: dict) -> dict:
    """Fields not asked for that `configure` adapts to the ones asked for: only those whose value differs."""
    if not changes.get("max_steps"):
        return {}
    half = max(1, changes["max_steps"] // 2)
    return {name: half for name in ("save_steps", "evaluation_freq") if name not in changes and getattr(cfg, name) != half}


def copy_recipe(name: str, save_dir: str | os.PathLike) -> Path:
    """Write the full, commented config of a recipe to SAVE_DIR/<name>_copy.yaml (as `xtuner copy-cfg`)."""
    cfg = load_recipe(name)
    target = Path(save_dir) / f"{name}_copy.yaml"
    if target.exists():
        raise ConfigError(f"{target} already exists; not overwriting it (delete it or choose another folder)")
    return save_config(cfg, target)


def resolve_path(p: str | os.PathLike) -> Path:
    """A data or model path (or a glob pattern of data files): absolute, relative to the current directory, or to the project root."""
    p = Path(os.path.expanduser(str(p)))
    if p.is_absolute() or _found(p):
        return p
    alt = PROJECT_ROOT / p
    return alt if _found(alt) else p


def _found(p: Path) -> bool:
    """The path exists, or it is a glob pattern (data/*.jsonl) that matches something."""
    return p.exists() or any(c in str(p) for c in "*?[") and next(glob.iglob(str(p), recursive=True), None) is not None
