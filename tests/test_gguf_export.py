"""GGUF export, verified without llama.cpp: transformers' GGUF loader reads the file back.

Tolerances (logits of the file loaded back against the merged float32 model):
- Against the merged model with every weight rounded the way the file stores it (float16, or
  Q8_0 quantised and dequantised by the gguf package): max |delta| <= 1e-5. Same weights, same
  float32 arithmetic: this is where a wrong name, a missing permutation or a wrong tie would show.
- Against the merged model itself: the rounding's own effect, bounded to first order by
  (layers + 2) * u * max|logit|, where u is the storage's relative error per weight:
  float16's unit roundoff 2^-11, and for Q8_0 half a quantisation step of a block,
  (max|block| / 127) / 2, i.e. 1/254 of the block's largest weight. Each of the layers + 2
  rounded matrices on the path perturbs the activations by at most about u of their size.
"""
import json

import gguf
import numpy as np
import pytest
import torch

from export_helpers import SYSTEM, make_adapter
from workbench.cli import main
from workbench.convert import merge
from workbench.gguf_export import (GGUFError, export_gguf, gguf_chat_template, load_gguf_model, parsed_once,
                                   render_with_pieces, role_pieces, rounded_like_gguf, verify_gguf)
from workbench.models import TINY_MODEL, load_tokenizer
from workbench.portable import template_with_default_system
from workbench.prompt import PromptBuilder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["Who are you?", "What is the capital of France?", "Write a haiku about the sea.", "你好，你是谁？"]
UNIT = {"f16": 2.0 ** -11, "q8_0": 1.0 / 254}


def rounding_bound(model, logits: torch.Tensor, outtype: str) -> float:
    return (model.config.num_hidden_layers + 2) * UNIT[outtype] * logits.abs().max().item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    adapter, _, builder = make_adapter(TINY_MODEL, root / "adapter")
    merged = merge(TINY_MODEL, adapter, root / "merged")
    f16 = export_gguf(str(merged), root / "f16" / "nova.gguf", "f16", progress=False)
    q8 = export_gguf(str(merged), root / "q8" / "nova.gguf", "q8_0", progress=False)
    return {"root": root, "adapter": adapter, "merged": merged, "builder": builder, "f16": f16, "q8_0": q8}


@pytest.fixture(scope="module")
def reference(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny["merged"], dtype=torch.float32).eval()


def prompt_ids(builder, question):
    return torch.tensor([builder.generation_prompt(question)])


@torch.no_grad()
def logit_deltas(loaded, reference, builder, outtype):
    rounded = rounded_like_gguf(reference, outtype)
    to_rounded = to_merged = bound = 0.0
    for q in QUESTIONS:
        ids = prompt_ids(builder, q)
        got, exp = loaded(input_ids=ids).logits, reference(input_ids=ids).logits
        to_rounded = max(to_rounded, (got - rounded(input_ids=ids).logits).abs().max().item())
        to_merged = max(to_merged, (got - exp).abs().max().item())
        bound = max(bound, rounding_bound(reference, exp, outtype))
    return to_rounded, to_merged, bound


@torch.no_grad()
def greedy(model, ids, n=12):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=2)[0, ids.shape[1]:].tolist()


# ---------------------------------------------------------------------------
# Round trips on the tiny model
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gguf_loaded_by_transformers_gives_the_merged_logits(tiny, reference, outtype):
    loaded = load_gguf_model(tiny[outtype].path)
    to_rounded, to_merged, bound = logit_deltas(loaded, reference, tiny["builder"], outtype)
    assert to_rounded <= 1e-5, "the file holds exactly the merged weights, rounded"
    assert 0 < to_merged <= bound
    assert loaded.config.tie_word_embeddings and loaded.config.num_key_value_heads == reference.config.num_key_value_heads


def test_f16_greedy_answers_are_identical(tiny, reference):
    loaded = load_gguf_model(tiny["f16"].path)
    for q in QUESTIONS:
        ids = prompt_ids(tiny["builder"], q)
        assert greedy(loaded, ids) == greedy(reference, ids), q


def test_q8_0_is_smaller_and_stores_matrices_in_blocks(tiny):
    types, data_bytes = {}, {}
    for kind in ("f16", "q8_0"):
        for t in gguf.GGUFReader(str(tiny[kind].path)).tensors:
            types.setdefault(kind, {})[t.name] = t.tensor_type.name
            data_bytes[kind] = data_bytes.get(kind, 0) + int(t.n_bytes)
    assert types["f16"]["blk.0.attn_q.weight"] == "F16" and types["f16"]["blk.0.attn_norm.weight"] == "F32"
    assert types["q8_0"]["blk.0.attn_q.weight"] == "Q8_0" and types["q8_0"]["token_embd.weight"] == "Q8_0"
    assert types["q8_0"]["output_norm.weight"] == "F32"
    assert "output.weight" not in types["f16"], "a tied head is not written"
    # 34 bytes per 32 weights instead of 64 (the vocabulary in the metadata is the same in both files)
    assert data_bytes["q8_0"] < 0.56 * data_bytes["f16"] and tiny["q8_0"].size_bytes < tiny["f16"].size_bytes


def test_gguf_metadata_carries_tokenizer_template_and_end_of_turn(tiny):
    builder = tiny["builder"]
    tok = builder.tokenizer
    r = gguf.GGUFReader(str(tiny["f16"].path))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.name") == "nova_test"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 49152 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert all(tokens[i] == t for t, i in list(tok.get_vocab().items())[:2000])
    assert len(field("tokenizer.ggml.merges")) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    assert field("tokenizer.ggml.token_type")[:3] == [3, 3, 3] and field("tokenizer.ggml.token_type")[1000] == 1
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert field("tokenizer.ggml.eot_token_id") == im_end and field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_token_id and field("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert not field("tokenizer.ggml.add_bos_token")
    assert field("llama.rope.dimension_count") == 16 and field("llama.attention.head_count_kv") == 2

    template = gguf_chat_template(tiny["f16"].path)
    assert template == template_with_default_system(builder)
    user = [{"role": "user", "content": "Who are you?"}]
    text = tok.apply_chat_template(user, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert tok(text, add_special_tokens=False)["input_ids"] == builder.generation_prompt("Who are you?")
    assert SYSTEM in text


def test_tokenizer_read_from_the_gguf_encodes_like_training(tiny):
    """transformers' own GGUF tokenizer: the same ids for the chat prompt and for text."""
    from transformers import AutoTokenizer

    p = tiny["f16"].path
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    builder = tiny["builder"]
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == builder.generation_prompt(q), q
    text = "Numbers 12345, code `x += 1`, émigré 😀\n\n  spaces"
    assert tok(text, add_special_tokens=False)["input_ids"] == builder.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_adapter_merged_on_the_fly_writes_the_same_tensors(tiny):
    out = export_gguf(TINY_MODEL, tiny["root"] / "fly" / "nova.gguf", "f16", adapter=tiny["adapter"], progress=False)
    a = {t.name: bytes(t.data) for t in gguf.GGUFReader(str(out.path)).tensors}
    b = {t.name: bytes(t.data) for t in gguf.GGUFReader(str(tiny["f16"].path)).tensors}
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert gguf_chat_template(out.path) == gguf_chat_template(tiny["f16"].path)


def test_modelfile_reproduces_the_training_prompt(tiny):
    builder = tiny["builder"]
    text = (tiny["f16"].path.parent / "Modelfile").read_text()
    assert "FROM ./nova.gguf" in text and f'SYSTEM """{SYSTEM}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    pieces = role_pieces(builder)
    for p in ("<|im_start|>system\\n", "<|im_start|>user\\n", "<|im_end|>\\n", "<|im_start|>assistant\\n"):
        assert '{{ "' + p + '" }}' in text
    conversations = [
        [{"role": "user", "content": "Q"}],
        [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
        [{"role": "system", "content": "Other"}, {"role": "user", "content": "Q"}],
    ]
    for conv in conversations:
        # Ollama puts SYSTEM first when a request has no system message.
        msgs = builder.with_system(conv)
        assert render_with_pieces(pieces, msgs) == builder.render(msgs, add_generation_prompt=True)


def test_verify_gguf_reports_the_checks(tiny):
    report = verify_gguf(tiny["f16"].path, str(tiny["merged"]), questions=("Who are you?",), max_new_tokens=4)
    assert report["outtype"] == "f16" and report["template gives the training prompt ids"] is True
    assert report["max |logit difference| vs merged with the GGUF's rounding"] <= 1e-5
    assert report["same greedy answers"] is True


def test_the_file_is_parsed_once_while_transformers_loads_it(tiny, monkeypatch):
    parses = []
    real = gguf.GGUFReader

    class Counted(real):
        def __init__(self, path, mode="r"):
            parses.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    load_gguf_model(tiny["f16"].path)
    assert len(parses) >= 2, "transformers parses the file more than once on its own"
    parses.clear()
    with parsed_once(tiny["f16"].path) as header:
        loaded = load_gguf_model(tiny["f16"].path)
        assert gguf.GGUFReader(str(tiny["f16"].path)) is header
        assert gguf.GGUFReader(str(tiny["q8_0"].path)) is not header  # another file: parsed as usual
    assert parses == [str(tiny["f16"].path), str(tiny["q8_0"].path)]
    assert gguf.GGUFReader is Counted and gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not \
        gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2), "both restored on the way out"
    ids = prompt_ids(tiny["builder"], "Who are you?")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, load_gguf_model(tiny["f16"].path)(input_ids=ids).logits)


# ---------------------------------------------------------------------------
# Qwen2, and the architectures that are refused
# ---------------------------------------------------------------------------
def save_tiny(model, folder):
    model.save_pretrained(folder)
    load_tokenizer(TINY_MODEL).save_pretrained(folder)
    return folder


def test_qwen2_round_trip(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = load_tokenizer(TINY_MODEL)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)  # Qwen2's q/k/v biases start at zero: make them count
    folder = save_tiny(model, tmp_path / "qwen2")
    out = export_gguf(str(folder), tmp_path / "q.gguf", "f16", progress=False)
    r = gguf.GGUFReader(str(out.path))
    names = {t.name for t in r.tensors}
    assert r.fields["general.architecture"].contents() == "qwen2"
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"} <= names
    loaded = load_gguf_model(out.path)
    builder = PromptBuilder(load_tokenizer(str(folder)))
    to_rounded, to_merged, bound = logit_deltas(loaded, model, builder, "f16")
    assert to_rounded <= 1e-5 and to_merged <= bound


def test_other_architectures_are_refused_naming_llama_cpps_converter(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(TINY_MODEL)
    folder = save_tiny(GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)), tmp_path / "gpt2")
    with pytest.raises(GGUFError, match="convert_hf_to_gguf.py") as err:
        export_gguf(str(folder), tmp_path / "g.gguf")
    assert "'gpt2'" in str(err.value) and "llama" in str(err.value)
    assert main(["convert", "gguf", str(folder), str(tmp_path / "g.gguf")]) == 2
    assert "convert_hf_to_gguf.py" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*Modelfile")) and not list(tmp_path.glob(".*tmp*"))


def test_bad_outputs_are_refused_and_nothing_is_overwritten(tiny, tmp_path):
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    with pytest.raises(GGUFError, match="exists"):
        export_gguf(str(tiny["merged"]), taken)
    assert taken.read_bytes() == b"mine"
    with pytest.raises(GGUFError, match="outtype"):
        export_gguf(str(tiny["merged"]), tmp_path / "x.gguf", "q4_0")
    with pytest.raises(GGUFError, match="adapter folder"):
        export_gguf(str(tiny["adapter"]), tmp_path / "y.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


# ---------------------------------------------------------------------------
# The embedded model, end to end
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_tensor_layout_matches_the_llama_cpp_file_the_embedded_model_came_from():
    """The embedded HF weights are the shipped llama.cpp GGUF dequantised: our tensors, permutation included, equal its tensors."""
    from workbench.gguf_export import gguf_tensors
    from workbench.models import find_gguf, load_model

    shipped = {t.name: t for t in gguf.GGUFReader(str(find_gguf())).tensors}
    model = load_model("embedded", torch_dtype="float32", device="cpu")
    ours = {name: a for name, _, a in gguf_tensors(model, "llama")}
    assert ours.keys() == shipped.keys()
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.29.attn_q.weight", "token_embd.weight"):
        t = shipped[name]
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[name].shape)
        assert np.abs(theirs - ours[name]).max() <= 1e-6 * np.abs(theirs).max(), name
    # Without the permutation the q projection would not match: the test can tell.
    t = shipped["blk.0.attn_q.weight"]
    hf_layout = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.abs(gguf.quants.dequantize(t.data, t.tensor_type).reshape(hf_layout.shape) - hf_layout).max() > 1e-2


@pytest.mark.slow
def test_embedded_merged_model_to_gguf_and_back(tmp_path):
    import time

    from workbench.chat import GenerationSettings, answer
    from transformers import AutoModelForCausalLM

    adapter, _, builder = make_adapter("embedded", tmp_path / "adapter", scale=0.01)
    merged = merge("embedded", adapter, tmp_path / "merged")
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    settings = GenerationSettings(max_new_tokens=24)
    expected = [answer(reference, builder, q, settings=settings) for q in QUESTIONS]
    for outtype in ("f16", "q8_0"):
        t0 = time.time()
        out = export_gguf(str(merged), tmp_path / outtype / "nova.gguf", outtype, progress=False)
        print(f"\n{outtype}: {out.size_bytes / 1e6:.1f} MB in {time.time() - t0:.1f} s")
        loaded = load_gguf_model(out.path)
        to_rounded, to_merged, bound = logit_deltas(loaded, reference, builder, outtype)
        print(f"{outtype}: max |delta| vs rounded {to_rounded:.2e}, vs merged {to_merged:.4f} (bound {bound:.3f})")
        assert to_rounded <= 1e-4 and to_merged <= bound
        if outtype == "f16":
            assert [answer(loaded, builder, q, settings=settings) for q in QUESTIONS] == expected
        ids = builder.generation_prompt("Who are you?")
        text = builder.tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False,
                                                     chat_template=gguf_chat_template(out.path), add_generation_prompt=True)
        assert builder.tokenizer(text, add_special_tokens=False)["input_ids"] == ids


def test_llama_cpp_runs_the_file_like_transformers(tiny):
    """Optional (skipped unless llama-cpp-python is installed): real llama.cpp reads the file as transformers does.

    Its tokenizer gives the training ids for the rendered prompt, its chat formatter (the template inside the
    file) renders the training prompt, and its logits for the prompt equal transformers' logits of the same file
    to float16 arithmetic (llama.cpp computes with the float16 weights; 1e-2 on logits of this size).
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    builder = tiny["builder"]
    path = tiny["f16"].path
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=1)
    ids = builder.generation_prompt("Who are you?")
    text = builder.tokenizer.decode(ids)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    fmt = Jinja2ChatFormatter(gguf_chat_template(path), eos_token="<|im_end|>", bos_token="<|im_start|>")
    assert fmt(messages=[{"role": "user", "content": "Who are you?"}]).prompt == text
    llm.eval(ids)
    ours = torch.tensor(np.array(llm.scores[len(ids) - 1]))
    with torch.no_grad():
        theirs = load_gguf_model(path)(input_ids=torch.tensor([ids])).logits[0, -1]
    assert (ours - theirs).abs().max().item() <= 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_computes_what_transformers_computes(arch, tmp_path):
    """Optional: tiny llama / qwen2 models whose attention matters (large q/k weights, qwen2's biases, an untied head):
    llama.cpp's logits at every position equal the Hugging Face model's to float16 arithmetic."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    tok = load_tokenizer(TINY_MODEL)
    cfg = config_class(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = model_class(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ("q_proj" in name or "k_proj" in name):
                p.normal_(0.0, 0.3)  # sharp attention: a wrong rotary layout would show
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    out = export_gguf(str(save_tiny(model, tmp_path / arch)), tmp_path / f"{arch}.gguf", "f16", progress=False)
    ids = PromptBuilder(load_tokenizer(TINY_MODEL)).generation_prompt("Who are you, and what is the capital of France? Tell me more.")
    llm = llama_cpp.Llama(model_path=str(out.path), n_ctx=512, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0]
    spread = (expected - expected.mean(0)).abs().max().item()
    assert (got - expected).abs().max().item() <= 0.02 * spread, "measured: 5e-3 (llama), 2e-3 (qwen2) against a spread of 1.0 / 0.4"


@pytest.mark.slow
def test_llama_cpp_answers_like_the_workbench_on_the_embedded_model(tmp_path):
    """Optional: llama.cpp's own chat completion (the template inside the file, no system message sent) answers the
    embedded merged model's questions exactly as `workbench chat` does, f16; its logits are within the f16 bound."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from workbench.chat import GenerationSettings, answer
    from transformers import AutoModelForCausalLM

    adapter, _, builder = make_adapter("embedded", tmp_path / "adapter", scale=0.01)
    merged = merge("embedded", adapter, tmp_path / "merged")
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    out = export_gguf(str(merged), tmp_path / "nova.gguf", "f16", progress=False)
    llm = llama_cpp.Llama(model_path=str(out.path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    for q in QUESTIONS[:3]:
        ids = builder.generation_prompt(q)
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([ids])).logits[0, -1]
        got = torch.tensor(np.array(llm.scores[len(ids) - 1]))
        assert (got - expected).abs().max().item() <= rounding_bound(reference, expected, "f16")
        reply = llm.create_chat_completion([{"role": "user", "content": q}], max_tokens=24, temperature=0)
        assert reply["choices"][0]["message"]["content"].strip() == answer(reference, builder, q, settings=GenerationSettings(max_new_tokens=24))


def test_llama_cpp_python_runs_the_file(tiny):
    """Optional: only where llama-cpp-python is installed (not in requirements.txt: it compiles llama.cpp, ~20 min on 2 cores)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tiny["f16"].path), n_ctx=256, verbose=False)
    ids = tiny["builder"].generation_prompt("Who are you?")
    assert llm.tokenize(tiny["builder"].tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
    out = llm.create_chat_completion([{"role": "user", "content": "Who are you?"}], max_tokens=8, temperature=0)
    assert isinstance(out["choices"][0]["message"]["content"], str)
