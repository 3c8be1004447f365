"""GGUF export: a merged model (or base + adapter) to one file for llama.cpp, Ollama and LM Studio.

`export_gguf(model, out, outtype="f16"|"q8_0", adapter=None)` writes the model
with the `gguf` package's GGUFWriter, and an Ollama `Modelfile` beside it. The
tensor mapping is written here from the package's tables
(`gguf.get_tensor_name_map`, `gguf.MODEL_ARCH_NAMES`) and llama.cpp's format
documentation (ggml docs/gguf.md):

- Hugging Face names map to GGUF names (`model.layers.3.self_attn.q_proj.weight`
  -> `blk.3.attn_q.weight`); a tied output head is not written (the reader ties it).
- llama only: llama.cpp applies rotary embeddings to interleaved pairs, Hugging
  Face to the two halves of each head, so the q and k projections' rows are
  permuted per head (what llama.cpp's convert_hf_to_gguf.py does and
  transformers' GGUF loader undoes). Qwen2 uses the halves convention in
  llama.cpp too: no permutation, and its q/k/v biases are written as they are.
- f16: matrices float16, norms and biases float32 (llama.cpp's choice);
  q8_0: matrices in blocks of 32 int8 with one float16 scale each.

The metadata carries the tokenizer (workbench.gguf_vocab: byte-level BPE, or
sentencepiece-style BPE with byte fallback as llama.cpp's "llama" vocabulary), the chat template with the trained system prompt as its
default (`workbench.portable`), and the end-of-turn id, so the file prompts the
model the way training did. Architectures other than llama and qwen2 are
refused; llama.cpp's own convert_hf_to_gguf.py covers them.

`verify_gguf` checks a written file without llama.cpp: loaded back by
transformers it must give the merged model's logits, greedy answers and
prompt ids.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.chat import GenerationSettings, answer
from workbench.config import load_config
from workbench.convert import CONFIG_FILE
from workbench.gguf_vocab import LLAMA_CPP_CONVERTER, GGUFError, add_vocabulary, tokenizer_kind
from workbench.io import atomic_write_text
from workbench.models import attach_adapter, check_adapter_folder, load_model, load_tokenizer, resolve_model_path
from workbench.portable import LICENSES, portable_base_name, stop_ids, template_with_default_system
from workbench.prompt import PROMPT_FILE, PromptBuilder

OUTTYPES = ("f16", "q8_0")
ARCHITECTURES = ("llama", "qwen2")
MODELFILE = "Modelfile"

@dataclass
class GGUFResult:
    path: Path
    modelfile: Path
    outtype: str
    seconds: float
    n_tensors: int
    size_bytes: int

    def summary(self, lang: str = "en") -> str:
        """One line: the weights' format, the file's size and the export's time, in `lang`."""
        from workbench.i18n import t

        return t("gguf.written", lang, outtype=self.outtype, mb=self.size_bytes / 1e6, seconds=self.seconds)


# ---------------------------------------------------------------------------
# The model and its prompt
# ---------------------------------------------------------------------------
def load_for_export(model: str, adapter: str | os.PathLike | None = None):
    """(float32 model on the CPU, prompt builder, model card name): a merged folder, or a base with an adapter merged in."""

    if adapter is None and (Path(model) / "adapter_config.json").exists():
        raise GGUFError(f"{model} is an adapter folder: give its base model and `--adapter {model}`, or merge it first")
    prompt_dir = Path(check_adapter_folder(adapter)) if adapter else Path(resolve_model_path(model))
    check_config_file(model)  # before minutes of loading
    net = load_model(model, torch_dtype="float32", device="cpu")
    if adapter:
        net = attach_adapter(net, adapter).merge_and_unload()
    tok_dir = prompt_dir if (prompt_dir / "tokenizer_config.json").exists() else Path(resolve_model_path(model))
    tokenizer = load_tokenizer(str(tok_dir))
    builder = PromptBuilder.load(prompt_dir, tokenizer) if (prompt_dir / PROMPT_FILE).exists() else PromptBuilder(tokenizer)
    name = prompt_dir.name
    if (prompt_dir / CONFIG_FILE).exists():
        name = load_config(prompt_dir / CONFIG_FILE).name
    return net.eval(), builder, name


def check_config_file(model: str) -> None:
    """Refuse an architecture this exporter does not write from config.json alone, before any weight is loaded."""
    path = Path(resolve_model_path(model)) / "config.json"
    if not path.exists():
        return  # a hub id: checked on the loaded config
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except ValueError as e:
        raise GGUFError(f"{path}: not valid JSON ({e})") from None
    if model_type not in ARCHITECTURES:
        raise GGUFError(f"{path}: model_type {model_type!r} is not supported by `workbench convert gguf` (only "
                        f"{', '.join(ARCHITECTURES)}); use {LLAMA_CPP_CONVERTER} on the merged folder")


def check_supported(config) -> str:
    """The GGUF architecture name for a transformers config, or GGUFError naming llama.cpp's converter."""
    arch = config.model_type
    if arch not in ARCHITECTURES:
        raise GGUFError(f"architecture {arch!r} is not supported by `workbench convert gguf` (only {', '.join(ARCHITECTURES)}); "
                        f"use {LLAMA_CPP_CONVERTER} on the merged folder")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    # Dynamic NTK scaling (InternLM2.5) changes nothing up to max_position_embeddings, the context the file declares.
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "dynamic", None):
        raise GGUFError(f"rope scaling {rope.get('rope_type')!r} is not written by this exporter; use {LLAMA_CPP_CONVERTER}")
    if arch == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise GGUFError(f"a llama model with attention or MLP biases is not written by this exporter; use {LLAMA_CPP_CONVERTER}")
    if arch == "qwen2" and getattr(config, "use_sliding_window", False):
        raise GGUFError(f"Qwen2 with sliding-window attention is not written by this exporter; use {LLAMA_CPP_CONVERTER}")
    return arch


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------
def permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from the halves rotary layout (HF) to interleaved pairs (llama.cpp), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(name: str, array: np.ndarray, outtype: str):
    """GGML type a tensor is stored in: float32 for vectors, float16 or Q8_0 for matrices (Q8_0 needs rows of 32k)."""
    Q = gguf.GGMLQuantizationType
    if array.ndim < 2:
        return Q.F32
    if outtype == "q8_0" and array.shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16


def gguf_tensors(model, arch: str):
    """(gguf name, hf name, float32 array) for every tensor to write, in the order of the state dict."""
    cfg = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = []
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise GGUFError(f"no GGUF name for tensor {hf_name!r} of this {arch} model; use {LLAMA_CPP_CONVERTER}")
        w = t.detach().to("cpu", torch.float32).numpy()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            w = permute_for_llama_cpp(w, cfg.num_attention_heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            w = permute_for_llama_cpp(w, cfg.num_key_value_heads)
        out.append((gname, hf_name, w))
    return out


def encode_tensor(array: np.ndarray, qtype):
    """The bytes GGUFWriter stores for `array` in `qtype` (a float array for F32/F16, uint8 blocks for Q8_0)."""
    return gguf.quants.quantize(np.ascontiguousarray(array), qtype)


def rounded_like_gguf(model, outtype: str):
    """A copy of `model` with each weight rounded as the GGUF stores it (for telling rounding from mapping errors)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            a = p.detach().float().numpy()
            q = tensor_type(name, a, outtype)
            back = gguf.quants.dequantize(encode_tensor(a, q), q).reshape(a.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(back)))
    return twin


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------
def add_model_metadata(w, config, arch: str, name: str, base: str | None) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_type("model")
    w.add_name(name)
    license = LICENSES.get(portable_base_name(base)) if base else None
    if license:
        w.add_license(license)
    origin = getattr(config, "workbench_converted_from", None)
    if isinstance(origin, dict):  # e.g. InternLM2, converted by the workbench: say where the weights came from
        w.add_description(f"Converted from {origin.get('architecture')} ({origin.get('model_type')}) to the Llama layout by workbench: "
                          f"{origin.get('layout')}")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if head_dim != config.hidden_size // config.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(config.vocab_size)


def add_tokenizer_metadata(w, builder: PromptBuilder, vocab_size: int) -> None:
    tok = builder.tokenizer
    add_vocabulary(w, tok, vocab_size)
    eot = end_of_turn_id(builder)
    if eot is not None:
        w.add_eot_token_id(eot)
    template = template_with_default_system(builder)
    # A template that writes the BOS itself (InternLM2's `{{ bos_token }}`) must not get a second one from llama.cpp.
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)) and "bos_token" not in template)
    w.add_add_eos_token(False)
    w.add_chat_template(template)


def end_of_turn_id(builder: PromptBuilder) -> int | None:
    """The template's end-of-turn token (the last stop token; EOS itself when the template ends turns with EOS)."""
    stops = builder.stop_token_ids
    return stops[-1] if stops else None


# ---------------------------------------------------------------------------
# Ollama Modelfile
# ---------------------------------------------------------------------------
_MARK = "\x00{}\x00"


def role_pieces(builder: PromptBuilder) -> dict[str, tuple[str, str]]:
    """The text before and after each role's content, and the generation prompt, read off the chat template.

    Only templates that wrap each message on its own (ChatML, Llama 3, Qwen, ...) reduce to
    such pieces; `check_pieces` proves that they reproduce the template.
    """
    r = builder.render
    m = [_MARK.format(k) for k in range(4)]
    conv = [{"role": "system", "content": m[0]}, {"role": "user", "content": m[1]},
            {"role": "assistant", "content": m[2]}, {"role": "user", "content": m[3]}]
    full = r(conv, add_generation_prompt=True)
    cut = [full.split(x, 1) for x in m]
    between = [cut[0][0]] + [full.split(m[k], 1)[1].split(m[k + 1], 1)[0] for k in range(3)] + [cut[3][1]]
    after = [r(conv[: k + 1]).split(m[k], 1)[1] for k in range(3)]  # what closes message k
    pieces = {"system": (between[0], after[0]), "user": (between[1][len(after[0]):], after[1]),
              "assistant": (between[2][len(after[1]):], after[2]), "generation": (between[4][len(after[1]):], "")}
    return pieces


def render_with_pieces(pieces: dict, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """A conversation rendered from the pieces, the way the Modelfile's TEMPLATE renders it."""
    out = []
    for i, msg in enumerate(messages):
        pre, post = pieces[msg["role"]]
        last = i == len(messages) - 1
        out.append(pre + msg["content"] + ("" if last and msg["role"] == "assistant" else post))
    if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
        out.append(pieces["generation"][0])
    return "".join(out)


def check_pieces(builder: PromptBuilder, pieces: dict) -> None:
    """Raise GGUFError unless the pieces render conversations exactly as the chat template (with a system message)."""
    convs = [[{"role": "user", "content": "Who are you?"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And you?"}]]
    for c in convs:
        msgs = builder.with_system(c)
        if render_with_pieces(pieces, msgs) != builder.render(msgs, add_generation_prompt=True):
            raise GGUFError("this chat template does not wrap each message on its own, so no Ollama TEMPLATE reproduces it; "
                            "the GGUF itself carries the template (tokenizer.chat_template)")


def _go(text: str) -> str:
    """A Go template action printing `text` literally (a JSON string is a valid Go string literal)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(pieces: dict) -> str:
    """Ollama's TEMPLATE (Go text/template over .Messages) reproducing the training prompt."""
    (s0, s1), (u0, u1), (a0, a1), (g0, _) = pieces["system"], pieces["user"], pieces["assistant"], pieces["generation"]
    return ("{{- range $i, $_ := .Messages }}\n"
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            f'{{{{- if eq .Role "system" }}}}{_go(s0)}{{{{ .Content }}}}{_go(s1)}\n'
            f'{{{{- else if eq .Role "user" }}}}{_go(u0)}{{{{ .Content }}}}{_go(u1)}\n'
            f'{{{{- else if eq .Role "assistant" }}}}{_go(a0)}{{{{ .Content }}}}{{{{ if not $last }}}}{_go(a1)}{{{{ end }}}}\n'
            "{{- end }}\n"
            f'{{{{- if and $last (ne .Role "assistant") }}}}{_go(g0)}{{{{ end }}}}\n'
            "{{- end }}")


def modelfile_text(gguf_name: str, builder: PromptBuilder, eos_ids: list[int]) -> str:
    """An Ollama Modelfile: FROM the file, TEMPLATE and SYSTEM of training, stop at end-of-turn and EOS."""
    pieces = role_pieces(builder)
    check_pieces(builder, pieces)
    tok = builder.tokenizer
    stops = [tok.convert_ids_to_tokens(i) for i in eos_ids]
    lines = [f"# Ollama: ollama create NAME -f {MODELFILE}   (then: ollama run NAME)",
             f"FROM ./{gguf_name}", "", f'TEMPLATE """{go_template(pieces)}"""', "",
             f'SYSTEM """{builder.system}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    lines += ["# greedy, as `workbench chat` answers by default", "PARAMETER temperature 0", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------
def export_gguf(model: str, out: str | os.PathLike, outtype: str = "f16", adapter: str | os.PathLike | None = None,
                progress: bool = True) -> GGUFResult:
    """Write OUT.gguf (and a Modelfile beside it) from a merged model folder, or `model` + `adapter` merged on the fly."""
    if outtype not in OUTTYPES:
        raise GGUFError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise GGUFError(f"{out}: the output file must end in .gguf")
    if out.exists():
        raise GGUFError(f"{out} exists; choose a new file name (nothing was overwritten)")
    t0 = time.time()
    net, builder, name = load_for_export(model, adapter)
    arch = check_supported(net.config)
    modelfile = modelfile_text(out.name, builder, stop_ids(builder, net.generation_config.eos_token_id))
    tensors = gguf_tensors(net, arch)
    tokenizer_kind(builder.tokenizer)  # refuse an unknown tokenizer before writing anything

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(str(tmp), arch)
        add_model_metadata(w, net.config, arch, name, model if adapter else _base_of(model))
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        if outtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer_metadata(w, builder, net.config.vocab_size)
        for gname, _, a in tqdm(tensors, desc=f"GGUF {outtype}", unit="tensor", disable=not progress, leave=False):
            q = tensor_type(gname, a, outtype)
            w.add_tensor(gname, encode_tensor(a, q), raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    mf = atomic_write_text(out.parent / MODELFILE, modelfile) if not (out.parent / MODELFILE).exists() else None
    if mf is None:
        mf = atomic_write_text(out.with_suffix(".Modelfile"), modelfile)
    return GGUFResult(out, Path(mf), outtype, time.time() - t0, len(tensors), out.stat().st_size)


def _base_of(model: str) -> str | None:
    """The base a merged folder was made from (its workbench config), for the license."""
    p = Path(resolve_model_path(model)) / CONFIG_FILE
    if p.exists():
        return load_config(p).pretrained_model_name_or_path
    return model


# ---------------------------------------------------------------------------
# Verification without llama.cpp
# ---------------------------------------------------------------------------
def load_gguf_model(path: str | os.PathLike):
    """The GGUF loaded back by plain transformers (dequantised to float32)."""
    from transformers import AutoModelForCausalLM  # heavy: imported when used, as everywhere in the workbench

    p = Path(path)
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()


@contextmanager
def parsed_once(path: str | os.PathLike):
    """Within it, every `gguf.GGUFReader` of `path` is one parse (yielded), and gguf's tensor-name maps are built once.

    transformers' GGUF loader parses the file three times (config, weights, tokenizer), each
    parse a numpy view per vocabulary entry (4.4 s for the embedded model's 49k tokens on 2
    cores), and builds gguf's `TensorNameMap` again for every tensor (6.7 s in all): 24 of
    notebook 05's 37-s check. The readers are only read from, so one serves every caller.
    """
    real_reader, real_map, key, parsed = gguf.GGUFReader, gguf.get_tensor_name_map, os.path.realpath(path), {}

    def reader(file, mode="r"):
        if mode != "r" or os.path.realpath(file) != key:
            return real_reader(file, mode)
        if key not in parsed:
            parsed[key] = real_reader(file, mode)
        return parsed[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield reader(path)
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def gguf_chat_template(path: str | os.PathLike) -> str:
    """tokenizer.chat_template of a GGUF file, read with GGUFReader."""
    return gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()


@torch.no_grad()
def verify_gguf(path: str | os.PathLike, model: str, adapter: str | None = None,
                questions: tuple[str, ...] = ("Who are you?", "What is the capital of France?"),
                max_new_tokens: int = 24) -> dict:
    """A written GGUF against the merged model: max |logit difference|, greedy answers, prompt ids."""
    reference, builder, _ = load_for_export(model, adapter)
    with parsed_once(path) as header:
        loaded = load_gguf_model(path)
        template_ok = _template_matches(path, builder, questions[0], header)
    outtype = "q8_0" if "Q8_0" in {t.tensor_type.name for t in header.tensors} else "f16"
    rounded = rounded_like_gguf(reference, outtype)
    diff = rounding = 0.0
    for q in questions:
        ids = torch.tensor([builder.generation_prompt(q)])
        got = loaded(input_ids=ids).logits
        diff = max(diff, (got - reference(input_ids=ids).logits).abs().max().item())
        rounding = max(rounding, (got - rounded(input_ids=ids).logits).abs().max().item())
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    answers = [(q, answer(reference, builder, q, settings=settings), answer(loaded, builder, q, settings=settings)) for q in questions]
    return {"outtype": outtype, "max |logit difference| vs merged": diff,
            "max |logit difference| vs merged with the GGUF's rounding": rounding,
            "same greedy answers": all(a == b for _, a, b in answers), "answers (merged, gguf)": answers,
            "template gives the training prompt ids": template_ok}


def _template_matches(path, builder: PromptBuilder, question: str, header) -> bool:
    from transformers import AutoTokenizer  # heavy: imported when used

    p = Path(path)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    if bytes(header.fields["tokenizer.ggml.model"].contents(), "utf-8") == b"llama":
        # llama.cpp puts the space prefix in front of every text fragment after a special token (llama-vocab.cpp,
        # `is_prev_special`); transformers' GGUF reader only in front of the first: read the file as llama.cpp does.
        from tokenizers import pre_tokenizers

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    msgs = [{"role": "user", "content": question}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids) == builder.generation_prompt(question)
