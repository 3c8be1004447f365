"""InternLM2 / InternLM2.5 hub folders, converted once into standard Llama folders.

On the hub, `internlm2-chat-1_8b` and `internlm2_5-7b-chat` are remote code that transformers 5
cannot run as shipped (einops, `rope_scaling: null`, uninitialised rotary buffers, the old cache
API, a wrong fast tokenizer). Their architecture is Llama's with other names, so the workbench
rewrites such a folder once into a Llama folder and trains, merges, serves and exports that:

- weights: `attention.wqkv` split per key-value group (rows [q_1 .. q_g, k, v] for each of the
  `num_key_value_heads` groups) into `q_proj`, `k_proj`, `v_proj`; `wo` -> `o_proj`;
  `feed_forward.w1/w3/w2` -> `mlp.gate_proj/up_proj/down_proj`; `attention_norm` ->
  `input_layernorm`, `ffn_norm` -> `post_attention_layernorm`; `tok_embeddings` ->
  `embed_tokens`, `output` -> `lm_head`; safetensors only (no pickle is read), shard by shard,
  in the source's dtype;
- config: the same sizes, `rope_theta`, `rms_norm_eps`, the tie flag, the attention bias, and
  `rope_scaling` (null, dynamic or linear) as `rope_parameters`; `workbench_converted_from` says
  where it came from and in which layout;
- tokenizer: `tokenizer.json` from `tokenizer.model` (workbench.convert_models.spm_tokenizer), the
  model's own chat template, and its default system prompt (the `meta_instruction` default of the
  remote `chat()`, read with `ast`, never executed) in `prompt.json` and as the template's default.

The result is checked before it is published (atomically, under the cache): token ids against
sentencepiece, logits against an independent reference forward of the original weights
(workbench.convert_models.internlm2_check). It is cached under `<cache>/internlm2-<name>-<key>/`,
the key a fingerprint of the source folder's files, so an edited source is converted again.
"""
from __future__ import annotations

import ast
import hashlib
import json
import time
from pathlib import Path

from workbench.convert_models import ConversionError
from workbench.io import atomic_dir, atomic_write_json, atomic_write_text

CONVERTER_VERSION = 1
LAYOUT = ("InternLM2 -> Llama: attention.wqkv split per key-value group ([q_1..q_g, k, v] rows per group) into "
          "q_proj/k_proj/v_proj; wo -> o_proj; feed_forward.w1/w3/w2 -> mlp.gate_proj/up_proj/down_proj; "
          "attention_norm/ffn_norm -> input_layernorm/post_attention_layernorm; tok_embeddings -> embed_tokens; output -> lm_head")
READY_MARK = "CONVERTED.json"
HASH_WHOLE = 64 << 20  # files up to 64 MiB are hashed whole; larger ones by size and their first and last 8 MiB
HASH_EDGE = 8 << 20


class InternLM2Error(ConversionError):
    """An InternLM2 folder cannot be converted; the message names the file and field."""


# ---------------------------------------------------------------------------
# Detecting and reading the source folder
# ---------------------------------------------------------------------------
def is_internlm2(folder: str | Path) -> bool:
    """True for a folder whose config.json says InternLM2 (`model_type` or `architectures`)."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") == "internlm2" or any(str(a).startswith("InternLM2") for a in archs)


def read_source_config(folder: Path) -> dict:
    path = folder / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(field), int) or cfg[field] <= 0:
            raise InternLM2Error(f"{path}: field {field!r} must be a positive integer (got {cfg.get(field)!r})")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    if cfg["hidden_size"] % cfg["num_attention_heads"] or cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise InternLM2Error(f"{path}: hidden_size must be a multiple of num_attention_heads, and that of num_key_value_heads")
    if cfg.get("hidden_act", "silu") != "silu":
        raise InternLM2Error(f"{path}: field 'hidden_act' is {cfg['hidden_act']!r}; only 'silu' (InternLM2's) is converted")
    if not (folder / "tokenizer.model").exists():
        raise InternLM2Error(f"{folder}: tokenizer.model is missing; copy the whole model folder from the hub")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    """The source's safetensors shards (the index's, or the single file); pickled .bin weights are refused."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InternLM2Error(f"{index}: field 'weight_map' is missing or empty")
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = (f" It has only {', '.join(bins[:3])}: pickle files, which the workbench never reads; download the "
                "safetensors files of the model instead") if bins else ""
        raise InternLM2Error(f"{folder}: no *.safetensors weights.{hint}")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise InternLM2Error(f"{folder}: weight file(s) {', '.join(missing)} named in model.safetensors.index.json are missing")
    return files


def default_system(folder: Path) -> str | None:
    """The remote `chat()`'s default `meta_instruction` in modeling_internlm2.py, read with `ast` (never run)."""
    path = folder / "modeling_internlm2.py"
    if not path.exists():
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "chat":
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults) + list(node.args.kw_defaults)
            for arg, default in zip(args, defaults):
                if arg.arg == "meta_instruction" and isinstance(default, ast.Constant) and isinstance(default.value, str):
                    return default.value
    return None


def fingerprint(folder: Path) -> str:
    """A key of the folder's files: names, sizes and contents (large files by their first and last 8 MiB).

    Safetensors files start with a header listing every tensor and its offsets, so the edges of a
    shard identify it; hashing all of a 15 GB model on every load would cost minutes.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    stats = (str(folder), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stats not in _FINGERPRINTS:  # once per process for unchanged files (a command resolves its base several times)
        _FINGERPRINTS[stats] = _hash_files(files)
    return _FINGERPRINTS[stats]


_FINGERPRINTS: dict[tuple, str] = {}


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256(f"workbench-internlm2-v{CONVERTER_VERSION}".encode())
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= HASH_WHOLE:
                h.update(f.read())
            else:
                h.update(f.read(HASH_EDGE))
                f.seek(size - HASH_EDGE)
                h.update(f.read())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Config and tensors
# ---------------------------------------------------------------------------
def rope_parameters(src: dict, path: Path) -> dict:
    theta = float(src.get("rope_theta", 10000))
    scaling = src.get("rope_scaling")
    if not scaling:  # null (the hub's 1.8B chat model) or {}
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type") or scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in ("dynamic", "linear") or not isinstance(scaling.get("factor"), (int, float)):
        raise InternLM2Error(f"{path}: field 'rope_scaling' is {scaling!r}; null, or type 'dynamic' / 'linear' with a factor, are converted")
    return {"rope_type": kind, "factor": float(scaling["factor"]), "rope_theta": theta}


def llama_config(src: dict, folder: Path, source_key: str) -> dict:
    """The keyword arguments of transformers' LlamaConfig for the converted model."""
    eos = src.get("eos_token_id", 2)
    return dict(
        vocab_size=src["vocab_size"], hidden_size=src["hidden_size"], intermediate_size=src["intermediate_size"],
        num_hidden_layers=src["num_hidden_layers"], num_attention_heads=src["num_attention_heads"],
        num_key_value_heads=src["num_key_value_heads"], head_dim=src["hidden_size"] // src["num_attention_heads"],
        hidden_act="silu", max_position_embeddings=src.get("max_position_embeddings", 2048),
        rms_norm_eps=float(src.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(src.get("tie_word_embeddings", False)),
        attention_bias=bool(src.get("bias", False)), mlp_bias=False, rope_parameters=rope_parameters(src, folder / "config.json"),
        bos_token_id=src.get("bos_token_id", 1), eos_token_id=eos, pad_token_id=src.get("pad_token_id", eos if isinstance(eos, int) else 2),
        torch_dtype=src.get("torch_dtype", "bfloat16"), architectures=["LlamaForCausalLM"],
        workbench_converted_from={"architecture": (src.get("architectures") or ["InternLM2ForCausalLM"])[0],
                                  "model_type": src.get("model_type", "internlm2"), "source": str(folder),
                                  "fingerprint": source_key, "layout": LAYOUT, "converter_version": CONVERTER_VERSION})


RENAMES = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
           "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight", "model.norm.weight": "model.norm.weight"}


def split_wqkv(t, n_heads: int, n_kv: int, head_dim: int):
    """(q, k, v) of a fused wqkv weight or bias whose rows are [q_1 .. q_g, k, v] per key-value group."""
    groups = n_heads // n_kv
    grouped = t.reshape(n_kv, groups + 2, head_dim, *t.shape[1:])
    q = grouped[:, :groups].reshape(n_heads * head_dim, *t.shape[1:])
    return q.contiguous(), grouped[:, groups].reshape(n_kv * head_dim, *t.shape[1:]).contiguous(), \
        grouped[:, groups + 1].reshape(n_kv * head_dim, *t.shape[1:]).contiguous()


def convert_tensor(name: str, t, src: dict, where: str) -> dict:
    """The Llama tensors for one InternLM2 tensor (three for wqkv, none for a cached rotary buffer)."""
    if name in TOP:
        return {TOP[name]: t}
    if name.endswith("rotary_emb.inv_freq"):
        return {}
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        prefix, module, leaf = ".".join(parts[:3]), ".".join(parts[3:-1]), parts[-1]
        if module == "attention.wqkv":
            d = src["hidden_size"] // src["num_attention_heads"]
            q, k, v = split_wqkv(t, src["num_attention_heads"], src["num_key_value_heads"], d)
            return {f"{prefix}.self_attn.{p}_proj.{leaf}": x for p, x in zip("qkv", (q, k, v))}
        if module in RENAMES:
            return {f"{prefix}.{RENAMES[module]}.{leaf}": t}
    raise InternLM2Error(f"{where}: tensor {name!r} is not part of the InternLM2 layout this converter knows")


class Tensors:
    """Tensors of a folder's safetensors files, read lazily by name."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.where = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                self.where |= {k: f for k in st.keys()}

    def __call__(self, name: str):
        from safetensors import safe_open

        if name not in self.where:
            raise KeyError(name)
        with safe_open(str(self.where[name]), framework="pt") as st:
            return st.get_tensor(name)


def convert_weights(files: list[Path], src: dict, out: Path) -> int:
    """Write the Llama tensors of each source shard into one shard each (+ index); returns the tensor count."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))] if len(files) > 1 else ["model.safetensors"]
    weight_map, total, count = {}, 0, 0
    bar = tqdm(total=len(files), desc="converting InternLM2 weights", unit="shard")
    for f, name in zip(files, names):
        shard = {}
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                shard |= convert_tensor(key, st.get_tensor(key), src, str(f))
        if src.get("tie_word_embeddings"):
            shard.pop("lm_head.weight", None)
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in shard}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        count += len(shard)
        del shard
        bar.update()
    bar.close()
    if len(files) > 1:
        atomic_write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return count


# ---------------------------------------------------------------------------
# The conversion, checked and cached
# ---------------------------------------------------------------------------
CHECK_CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you? 你是谁？"},
                      {"role": "assistant", "content": "I am an assistant. 我是助手。"}]


def converted_dir(folder: str | Path, cache_root: str | Path) -> tuple[Path, str]:
    """Where the conversion of `folder` is cached, and the source's fingerprint."""
    folder = Path(folder).resolve()
    key = fingerprint(folder)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in folder.name)[:60]
    return Path(cache_root) / f"internlm2-{slug}-{key[:12]}", key


def prepare_internlm2(folder: str | Path, cache_root: str | Path, force: bool = False, check_layers: int = 2) -> Path:
    """The converted Llama folder of an InternLM2 folder: converted and checked the first time, then read from the cache."""
    folder = Path(folder).resolve()
    src = read_source_config(folder)
    files = weight_files(folder)
    target, key = converted_dir(folder, cache_root)
    if (target / READY_MARK).exists() and not force:
        return target
    print(f"converting the InternLM2 folder {folder} into a standard Llama folder (once): {target}")
    t0 = time.time()
    with atomic_dir(target, overwrite=True) as tmp:
        report = _convert_into(folder, src, files, key, tmp, check_layers)
        report["seconds"] = round(time.time() - t0, 1)
        atomic_write_json(tmp / READY_MARK, report)
    print(f"converted in {report['seconds']:.0f} s: {report['tensors']} tensors; tokenizer ids equal sentencepiece's on "
          f"{report['tokenizer']['texts']} texts and a conversation; logits equal the reference forward of the original weights "
          f"(max |difference| {report['logits']['max_abs_logit_diff']:.2g} over {report['logits']['layers']} layers)")
    return target


def _convert_into(folder: Path, src: dict, files: list[Path], key: str, out: Path, check_layers: int) -> dict:
    from transformers import AutoTokenizer, LlamaConfig

    from workbench.convert_models.internlm2_check import check_conversion
    from workbench.convert_models.spm_tokenizer import check_tokenizer, convert_tokenizer
    from workbench.prompt import PromptBuilder, with_default_system

    n_tensors = convert_weights(files, src, out)
    llama = llama_config(src, folder, key)
    LlamaConfig(**llama).save_pretrained(out)
    tok = convert_tokenizer(folder, llama["max_position_embeddings"])
    system = default_system(folder)
    if system and tok.chat_template:
        tok.chat_template = with_default_system(tok.chat_template, system)
    tok.save_pretrained(out)
    _write_generation_config(folder, llama, out)
    tok = AutoTokenizer.from_pretrained(out)  # check what was written
    tokenizer_report = check_tokenizer(folder, tok)
    ids = (tok.apply_chat_template(CHECK_CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
           if tok.chat_template else tok("Who are you? 你是谁？")["input_ids"])[:24]
    logits_report = check_conversion(Tensors(files), src, Tensors(sorted(out.glob("*.safetensors"))), llama, ids, check_layers)
    if system:
        PromptBuilder(tok, system=system).save(out)
    atomic_write_text(out / "README.md", _card(folder, src, system))
    return {"source": str(folder), "fingerprint": key, "tensors": n_tensors, "tokenizer": tokenizer_report,
            "logits": logits_report, "layout": LAYOUT, "default_system": system}


def _write_generation_config(folder: Path, llama: dict, out: Path) -> None:
    """The source's generation_config.json (its stop ids), else one from the config's special ids."""
    path = folder / "generation_config.json"
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise InternLM2Error(f"{path}: not valid JSON ({e})") from None
    data = {k: v for k, v in data.items() if k != "transformers_version"} or {
        "bos_token_id": llama["bos_token_id"], "eos_token_id": llama["eos_token_id"], "pad_token_id": llama["pad_token_id"]}
    atomic_write_json(out / "generation_config.json", data)


def _card(folder: Path, src: dict, system: str | None) -> str:
    arch = (src.get("architectures") or ["InternLM2ForCausalLM"])[0]
    return (f"# {folder.name}, converted to Llama by workbench\n\n"
            f"Converted from the InternLM2 folder `{folder}` ({arch}, model_type `{src.get('model_type', 'internlm2')}`, "
            f"{src['num_hidden_layers']} layers, hidden size {src['hidden_size']}, vocabulary {src['vocab_size']}).\n\n"
            f"Layout: {LAYOUT}. The tokenizer is `tokenizer.json` from the sentencepiece `tokenizer.model` with the chat "
            "tokens of `tokenizer_config.json` at their original ids; the chat template is the model's own"
            + (", with its default system prompt (the remote `chat()`'s `meta_instruction`) as the default" if system else "")
            + ".\n\nLoads as an ordinary Llama model: no remote code, no `trust_remote_code`. The original model's licence applies.\n")
