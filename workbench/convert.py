"""Convert and merge: training checkpoints to Hugging Face adapters, adapters into base models.

- `pth_to_hf(config, checkpoint, save_dir)` (XTuner's `convert pth_to_hf`):
  a checkpoint's trainable weights become a standalone PEFT adapter folder
  (adapter_config.json, safetensors in fp16 unless fp32, the tokenizer with
  its chat template, prompt.json, the workbench config and a model card), or a
  full model folder for method `full`. No optimizer state is copied.
- `merge(base, adapter, save_dir)` (XTuner's `convert merge`): the adapter is
  merged into the *unquantised* base (a QLoRA adapter too: the base is reloaded
  in full precision first), and the result is written as a plain model folder
  that `AutoModelForCausalLM.from_pretrained` loads without peft.
- `verify_merge(base, adapter, merged)`: merged = base + adapter, by logits and answers.

The models are built by workbench/models.py (`build_unquantized` rebuilds a
checkpoint's model on a full-precision base) and a checkpoint's weights are read
by workbench/checkpoint.py; the trainer calls `export_trained` at the end of a run.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from workbench.fastpath import cpu as fastpath
from workbench.chat import ADAPTER_CONFIG, answer, load_chat_model
from workbench.checkpoint import TRAINABLE, load_trainable
from workbench.config import Config, load_config, save_config
from workbench.i18n import t
from workbench.io import atomic_dir, folder_is_nonempty
from workbench.models import (AdapterError, attach_adapter, build_unquantized, check_adapter_folder, converted_from, load_builder,
                              load_model, load_tokenizer)
from workbench.portable import export_generation_config, portable_base_name, save_export_tokenizer
from workbench.prompt import PROMPT_FILE, PromptBuilder

CONFIG_FILE = ADAPTER_CONFIG


class ConvertError(ValueError):
    """A checkpoint, adapter or target folder cannot be used; the message says why."""


# ---------------------------------------------------------------------------
# Export (end of training and pth_to_hf)
# ---------------------------------------------------------------------------
def export_trained(model, builder: PromptBuilder, cfg: Config, save_dir: str | os.PathLike, fp32: bool = False,
                   max_shard_size: str = "2GB", overwrite: bool = True) -> Path:
    """Write the trained model as an HF adapter (lora/qlora) or a full model folder (full)."""
    dtype = torch.float32 if fp32 else torch.float16
    with atomic_dir(save_dir, overwrite=overwrite) as tmp:
        if cfg.method == "full":
            fastpath.disable_packed_attention(model)  # the saved config names a standard attention
            state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
            model.generation_config = export_generation_config(builder, model)
            model.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size, safe_serialization=True)
        else:
            _save_adapter(model, tmp, dtype, base=portable_base_name(cfg.pretrained_model_name_or_path))
            export_generation_config(builder, model).save_pretrained(tmp)
        save_export_tokenizer(builder, tmp)  # the chat template defaults to the trained system prompt
        builder.save(tmp)
        save_config(cfg, tmp / CONFIG_FILE)
        _write_card(tmp, cfg, kind="full model" if cfg.method == "full" else "LoRA adapter", dtype=dtype)
    return Path(save_dir)


def _save_adapter(model, folder: Path, dtype: torch.dtype, base: str) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_cfg = model.peft_config["default"]
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in get_peft_model_state_dict(model).items()}
    peft_cfg.base_model_name_or_path = base  # after reading the state: peft would look a hub id up online
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_cfg.save_pretrained(str(folder))


def _write_card(folder: Path, cfg: Config, kind: str, dtype: torch.dtype, note: str = "") -> None:
    from workbench.portable import card_header

    lines = card_header(cfg.pretrained_model_name_or_path, "peft" if kind == "LoRA adapter" else "transformers", cfg.method) + [
        f"# {cfg.name}: {kind}",
        "",
        f"Made with workbench from base model `{cfg.pretrained_model_name_or_path}` (method: {cfg.method}"
        + (f", LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}, targets={cfg.lora_target_modules}" if cfg.method != "full" else "") + ").",
        f"Weights stored as {str(dtype).replace('torch.', '')}.",
        f"Identity taught: **{cfg.assistant_name}**, the assistant of **{cfg.owner_name}**.",
        "",
        f"System prompt used in training (use the same when chatting): `{cfg.system}`",
        "The chat template is saved with the tokenizer, with this system prompt as its default (used when a client sends none);",
        "generation_config.json stops at the end-of-turn token; `prompt.json` holds the system prompt and stop tokens.",
        "The full training config is in `workbench_config.yaml`.",
    ]
    origin = converted_from(cfg.pretrained_model_name_or_path)
    if origin:
        lines += ["", f"The base came from {origin.get('architecture', 'InternLM2')} (model_type `{origin.get('model_type')}`, "
                  f"`{origin.get('source')}`), converted by workbench into the standard Llama layout: {origin.get('layout')}. "
                  "This is an ordinary Llama artifact: no remote code is needed to load it."]
    if note:
        lines += ["", note]
    lines += ["", "Chat with it: `workbench chat BASE --adapter THIS_FOLDER`" if kind == "LoRA adapter"
              else "Chat with it: `workbench chat THIS_FOLDER`"]
    (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def pth_to_hf(config: str | os.PathLike | Config, checkpoint: str | os.PathLike, save_dir: str | os.PathLike,
              fp32: bool = False, max_shard_size: str = "2GB") -> Path:
    """A training checkpoint (iter_N) to a standalone HF adapter or model folder."""
    cfg = config if isinstance(config, Config) else load_config(config)
    ckpt = Path(checkpoint)
    if not (ckpt / TRAINABLE).exists():
        raise ConvertError(f"{ckpt} is not a workbench checkpoint (no {TRAINABLE}); pick an iter_N folder of a work dir")
    _require_empty(save_dir)
    # The adapter's weights do not depend on how the base is stored: a QLoRA run's adapter is built on the plain base.
    model = build_unquantized(cfg)
    load_trainable(model, ckpt)
    builder = load_builder(cfg)
    out = export_trained(model, builder, cfg, save_dir, fp32=fp32, max_shard_size=max_shard_size, overwrite=False)
    print(t("conv.wrote", None, out=out, ckpt=ckpt))
    return out


# ---------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------
def merge(base: str, adapter: str | os.PathLike, save_dir: str | os.PathLike, max_shard_size: str = "2GB",
          device: str = "auto", torch_dtype: str = "auto", trust_remote_code: bool = False) -> Path:
    """Merge an adapter into the full-precision base and save a plain model folder."""
    try:
        folder = check_adapter_folder(adapter)
    except AdapterError as e:
        raise ConvertError(str(e)) from None
    _require_empty(save_dir)
    cfg = _adapter_config(folder)
    trust_remote_code = trust_remote_code or bool(cfg is not None and cfg.trust_remote_code)  # as the adapter was trained
    if cfg is not None and cfg.method == "qlora":
        print(t("conv.qlora", None))
    model = load_model(base, torch_dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code)
    try:
        merged = attach_adapter(model, folder).merge_and_unload()
    except AdapterError as e:
        raise ConvertError(str(e)) from None
    tokenizer = load_tokenizer(str(folder) if (folder / "tokenizer_config.json").exists() else base, trust_remote_code)
    builder = PromptBuilder.load(folder, tokenizer) if (folder / PROMPT_FILE).exists() else PromptBuilder(tokenizer)
    merged.generation_config = export_generation_config(builder, merged)
    with atomic_dir(save_dir) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        save_export_tokenizer(builder, tmp)  # the chat template defaults to the trained system prompt
        for name in (PROMPT_FILE, CONFIG_FILE):
            if (folder / name).exists():
                shutil.copy2(folder / name, tmp / name)
        if cfg is not None:
            _write_card(tmp, cfg, kind="merged model", dtype=next(merged.parameters()).dtype,
                        note=f"Merged from adapter `{folder}` into base `{base}` (unquantised).")
    print(t("conv.merged", None, folder=save_dir))
    return Path(save_dir)


def _adapter_config(folder: Path) -> Config | None:
    p = folder / CONFIG_FILE
    return load_config(p) if p.exists() else None


def _require_empty(save_dir: str | os.PathLike) -> None:
    if folder_is_nonempty(save_dir):
        raise ConvertError(f"{save_dir} exists and is not empty; choose a new folder (nothing was overwritten)")


def list_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(relative name, size in bytes) of every file in a folder, for showing what was written."""
    root = Path(folder)
    return [(str(p.relative_to(root)), p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()]


def adapter_info(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / "adapter_config.json").read_text())


@torch.no_grad()
def verify_merge(base: str, adapter: str | os.PathLike, merged: str | os.PathLike, question: str = "Who are you?") -> dict:
    """Compare a merged model with base + adapter: max logit difference and greedy answers."""
    peft_model, builder = load_chat_model(base, adapter=str(adapter))
    plain, _ = load_chat_model(str(merged))
    ids = torch.tensor([builder.generation_prompt(question)])
    diff = (peft_model(ids).logits - plain(ids).logits).abs().max().item()
    a_peft, a_merged = answer(peft_model, builder, question), answer(plain, builder, question)
    return {"question": question, "max |logit difference|": diff, "base + adapter answers": a_peft,
            "merged answers": a_merged, "same answer": a_peft == a_merged}
