"""The tokenizer of a GGUF file: byte-level BPE (GPT-2 style) or sentencepiece-style BPE (Llama 2 style).

llama.cpp knows a vocabulary by `tokenizer.ggml.model` (ggml docs/gguf.md):
- "gpt2": byte-level BPE (SmolLM2, Qwen2, Llama 3): tokens in the byte alphabet, merges, and a
  pre-tokenizer named by `tokenizer.ggml.pre`, recognised here by its splitting regex;
- "llama": sentencepiece BPE with byte fallback (Llama 2, InternLM2 converted by the workbench):
  tokens spelled with `▁` for spaces, `<0xNN>` byte tokens (type BYTE), scores by which llama.cpp
  merges (higher first), and `add_space_prefix` (the `▁` put in front of text).

The sentencepiece scores are rebuilt from the fast tokenizer's merges: the piece a merge produces
gets minus the merge's rank, so llama.cpp merges in the tokenizer's order (a `tokenizer.json`
keeps the merges, not sentencepiece's scores). The merges are written too (transformers' GGUF
loader reads them; llama.cpp ignores them for this vocabulary).
"""
from __future__ import annotations

import json
import re

import gguf

from workbench.convert import ConvertError

LLAMA_CPP_CONVERTER = "llama.cpp's convert_hf_to_gguf.py (https://github.com/ggml-org/llama.cpp)"
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class GGUFError(ConvertError):
    """The model cannot be exported to GGUF here; the message says why and what to use instead."""


def _backend(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _is_sentencepiece(data: dict) -> bool:
    """BPE with byte fallback whose spaces become `▁` (a normalizer Replace, or a Metaspace pre-tokenizer)."""
    model = data.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")], ensure_ascii=False)
    return "▁" in text


def _adds_space_prefix(data: dict) -> bool:
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")], ensure_ascii=False)
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (how text is split before BPE)."""
    data = _backend(tokenizer)
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFError(f"the tokenizer is {model.get('type')}, not BPE; use {LLAMA_CPP_CONVERTER}")
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's splitting regex: llama.cpp's pre-tokenizer "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM's and StarCoder's: digits one by one, then GPT-2's regex
    if kinds and kinds[0] == "Split":
        regex = parts[0].get("pattern", {}).get("Regex", "")
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2  # heavy: only for Split tokenizers

        if regex == QWEN2:
            return "qwen2"
        if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
            return "llama-bpe"
    raise GGUFError(f"the tokenizer's pre-tokenizer ({pre.get('type')}: {kinds}) is not one this exporter knows; use {LLAMA_CPP_CONVERTER}")


def tokenizer_kind(tokenizer) -> tuple[str, str | None]:
    """("llama", None) for a sentencepiece-style tokenizer, ("gpt2", pre-tokenizer name) for byte-level BPE; else GGUFError."""
    data = _backend(tokenizer)
    if _is_sentencepiece(data):
        return "llama", None
    return "gpt2", pre_tokenizer_name(tokenizer)


def _merges(data: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]


def vocab_tables(tokenizer, vocab_size: int, sentencepiece: bool = False) -> tuple[list[str], list[int], list[str], list[float]]:
    """(tokens by id, token types, merges, scores), padded to the model's vocab size."""
    TokenType = gguf.TokenType
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    data = _backend(tokenizer)
    merges = _merges(data)
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1), r)
    unk = data["model"].get("unk_token")
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            scores.append(-1e9)
            continue
        t = by_id[i]
        tokens.append(t)
        if i in added and not (sentencepiece and t == unk):
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif sentencepiece and t == unk:
            types.append(TokenType.UNKNOWN)
        elif sentencepiece and BYTE_PIECE.match(t):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
        scores.append(-float(rank[t]) if t in rank else 0.0)
    return tokens, [int(t) for t in types], merges, scores


def add_vocabulary(w, tokenizer, vocab_size: int) -> None:
    """Write the tokenizer's vocabulary and special ids into a GGUFWriter."""
    kind, pre = tokenizer_kind(tokenizer)
    tokens, types, merges, scores = vocab_tables(tokenizer, vocab_size, sentencepiece=kind == "llama")
    w.add_tokenizer_model(kind)
    if kind == "llama":
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
        w.add_add_space_prefix(_adds_space_prefix(_backend(tokenizer)))
    else:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("unk", tokenizer.unk_token_id),
                       ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
