"""XTuner's LoRA adapters of InternLM2, in the Llama layout the workbench loads InternLM2 in.

The workbench loads an InternLM2 folder as the Llama model it converts it to
(`workbench.convert_models.internlm2`), where an XTuner adapter (`xtuner convert pth_to_hf` of the
camp's QLoRA or LoRA run) names modules that are no longer there: the fused `attention.wqkv` became
`self_attn.q_proj`, `k_proj` and `v_proj`, `attention.wo` `self_attn.o_proj`, and `feed_forward.w1`,
`w3`, `w2` `mlp.gate_proj`, `up_proj`, `down_proj`. The conversion is exact: a LoRA update of wqkv is
B @ A, and its q, k and v rows are those rows of B times the same A, so each of q, k and v gets A and its
rows of B (split per key-value group as the weight is, `split_wqkv`). The other modules are renamed. The
converted adapter is written once into the conversion cache, keyed by the adapter's content; the original
folder is never changed. Written here: no library converts adapters between these layouts.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from workbench.convert_models.internlm2 import RENAMES, InternLM2Error, split_wqkv
from workbench.io import atomic_dir, atomic_write_json

WQKV = "attention.wqkv"
# An InternLM2 module's last name -> its Llama modules' last names (what peft's target_modules lists).
TARGETS = {"wqkv": ("q_proj", "k_proj", "v_proj"), "wo": ("o_proj",), "w1": ("gate_proj",), "w3": ("up_proj",),
           "w2": ("down_proj",)}
WEIGHTS = "adapter_model.safetensors"


def is_internlm2_adapter(folder: str | Path) -> bool:
    """The adapter's config targets InternLM2's own modules (wqkv, wo, w1, w2, w3)."""
    try:
        cfg = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):  # a regular expression over module names
        return any(re.search(rf"(?<![A-Za-z0-9_]){t}(?![A-Za-z0-9_])", targets) for t in TARGETS)
    return any(t.split(".")[-1] in TARGETS for t in targets)


def llama_adapter(folder: str | Path, heads: int, kv_heads: int, head_dim: int, cache_root: str | Path) -> Path:
    """The adapter in the Llama layout (converted once, cached by content); `heads` etc.: the model's attention."""
    folder = Path(folder)
    files = [folder / "adapter_config.json", folder / WEIGHTS]
    key = hashlib.sha256(b"".join(f.read_bytes() for f in files) + f"{heads},{kv_heads},{head_dim}".encode()).hexdigest()
    target = Path(cache_root) / f"internlm2-adapter-{key[:16]}"
    if (target / WEIGHTS).exists():
        return target
    with atomic_dir(target, overwrite=True) as tmp:
        convert_adapter(folder, tmp, heads, kv_heads, head_dim)
    return target


def convert_adapter(folder: Path, out: Path, heads: int, kv_heads: int, head_dim: int) -> None:
    """Write `folder`'s adapter (config and weights) into `out` with Llama module names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    converted = {}
    with safe_open(str(folder / WEIGHTS), framework="pt") as st:
        for name in st.keys():
            converted |= convert_lora_tensor(name, st.get_tensor(name), heads, kv_heads, head_dim, folder / WEIGHTS)
    save_file(converted, str(out / WEIGHTS), metadata={"format": "pt"})
    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = list(TARGETS)  # the pattern named InternLM2's modules: the Llama ones the weights now have
    cfg["target_modules"] = sorted({llama for t in targets for llama in TARGETS.get(t.split(".")[-1], (t,))})
    for pattern in ("rank_pattern", "alpha_pattern"):  # per-module ranks or alphas: keyed by module names too
        if cfg.get(pattern):
            raise InternLM2Error(f"{folder / 'adapter_config.json'}: field '{pattern}': per-module settings of an "
                                 "InternLM2 adapter are not converted; merge it with XTuner and use the merged model")
    atomic_write_json(out / "adapter_config.json", cfg)


def convert_lora_tensor(name: str, t, heads: int, kv_heads: int, head_dim: int, where: Path) -> dict:
    """The Llama tensors of one LoRA tensor of InternLM2 (three for wqkv; lora_A shared, lora_B split by rows)."""
    for module, llama in RENAMES.items():
        if f".{module}." in name:
            return {name.replace(f".{module}.", f".{llama}."): t}
    if f".{WQKV}." not in name:
        raise InternLM2Error(f"{where}: tensor {name!r} is not a LoRA tensor of an InternLM2 module this converter knows")
    if ".lora_A." in name:
        parts = {p: t.clone() for p in "qkv"}
    elif ".lora_B." in name:
        parts = dict(zip("qkv", split_wqkv(t, heads, kv_heads, head_dim)))
    else:
        raise InternLM2Error(f"{where}: tensor {name!r} of wqkv is neither lora_A nor lora_B")
    return {name.replace(f".{WQKV}.", f".self_attn.{p}_proj."): x for p, x in parts.items()}
