"""Exports that behave outside the workbench the way they did in training.

Every adapter, merged model and GGUF file carries what a plain client needs to
prompt the model exactly as training did:

- `template_with_default_system(builder)`: the chat template with the trained
  system prompt as its default. A client that sends no system message gets the
  token ids training used (not the template's own default, such as SmolLM2's
  "You are a helpful AI assistant named SmolLM, ..."); an explicit system
  message is still honoured. Generic over templates: a Jinja block in front
  inserts the system message when `messages[0]` is not one.
- `save_export_tokenizer(builder, folder)`: the tokenizer saved with that template
  (prompt.json keeps recording the builder itself).
- `export_generation_config(builder, model)`: generation stops on the end-of-turn token too.
- `portable_base_name(name)`: the base model recorded by a name that works
  elsewhere: the embedded model by its public id, the tiny test model by a
  local id (both registered in the hub cache, see `workbench.hubcache`), a
  user's own folder or hub id as written in the config (an InternLM2 folder by its converted
  Llama copy, which loads without remote code).
- `card_header(...)`: the YAML metadata block the Hub and other tools read.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from workbench.config import EMBEDDED_MODEL, resolve_path
from workbench.hubcache import EMBEDDED_HUB_ID, TINY_HUB_ID
from workbench.convert_models.internlm2 import is_internlm2
from workbench.models import EMBEDDED_DIR, TINY_DIR, TINY_MODEL, resolve_model_path
from workbench.prompt import PromptBuilder, strip_default_system, with_default_system  # noqa: F401 - re-exported

LICENSES = {EMBEDDED_HUB_ID: "apache-2.0"}  # SmolLM2 is published under Apache 2.0


# ---------------------------------------------------------------------------
# Chat template and generation config
# ---------------------------------------------------------------------------
def template_with_default_system(builder: PromptBuilder) -> str:
    """The builder's chat template, inserting `builder.system` when the conversation brings no system message."""
    return with_default_system(builder.chat_template, builder.system)


def save_export_tokenizer(builder: PromptBuilder, folder: str | os.PathLike) -> None:
    """Save the builder's tokenizer with the default-system template; the builder's tokenizer is left as it was."""
    tok = builder.tokenizer
    original = tok.chat_template
    tok.chat_template = template_with_default_system(builder)
    try:
        tok.save_pretrained(str(folder))
    finally:
        tok.chat_template = original


def stop_ids(builder: PromptBuilder, model_eos=None) -> list[int]:
    """The model's own EOS id(s) followed by the builder's stop tokens (EOS and end-of-turn), without repeats."""
    own = [] if model_eos is None else ([model_eos] if isinstance(model_eos, int) else list(model_eos))
    out: list[int] = []
    for t in [*own, *builder.stop_token_ids]:
        if t not in out:
            out.append(t)
    return out


def export_generation_config(builder: PromptBuilder, model=None):
    """The model's generation config (or a fresh one) stopping at the end-of-turn token, padding with the pad token."""
    from transformers import GenerationConfig  # heavy: imported when used, as everywhere in the workbench

    base = getattr(model, "generation_config", None) if model is not None else None
    gen = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    gen.eos_token_id = stop_ids(builder, gen.eos_token_id)
    if gen.pad_token_id is None:
        gen.pad_token_id = builder.tokenizer.pad_token_id
    if gen.bos_token_id is None and builder.tokenizer.bos_token_id is not None:
        gen.bos_token_id = builder.tokenizer.bos_token_id
    return gen


# ---------------------------------------------------------------------------
# The base model's name, and the model card
# ---------------------------------------------------------------------------
def portable_base_name(name: str) -> str:
    """How an export names its base: public or local ids for the workbench's models, anything else as given."""
    if name in (EMBEDDED_MODEL, "embedded", EMBEDDED_HUB_ID):
        return EMBEDDED_HUB_ID
    if name in (TINY_MODEL, TINY_HUB_ID):
        return TINY_HUB_ID
    p = resolve_path(name)
    if p.exists():
        if p.resolve() == EMBEDDED_DIR.resolve():
            return EMBEDDED_HUB_ID
        if p.resolve() == TINY_DIR.resolve():
            return TINY_HUB_ID
        if (p / "config.json").exists() and is_internlm2(p):
            return resolve_model_path(name)  # its converted Llama copy: plain transformers/peft load it without remote code
    return name


def card_header(base: str, library: str, method: str, license: str | None = None) -> list[str]:
    """YAML front matter of a model card (README.md) for an adapter (library 'peft') or a model ('transformers')."""
    base = portable_base_name(base)
    license = license or LICENSES.get(base)
    tags = ["workbench", method, "text-generation", "conversational"]
    if library == "peft":
        tags.insert(1, "peft")
    lines = ["---", f"library_name: {library}", f"base_model: {base}", "pipeline_tag: text-generation"]
    if license:
        lines.append(f"license: {license}")
    lines += ["tags:", *[f"- {t}" for t in tags], "---", ""]
    return lines


def read_card_header(readme: str | os.PathLike) -> dict:
    """The YAML front matter of a model card as a dict ({} when it has none)."""
    text = Path(readme).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text.split("---\n", 2)[1]) or {}
