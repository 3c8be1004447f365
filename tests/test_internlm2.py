"""InternLM2 (remote code on the hub) through the workbench: converted once into a Llama folder, then the whole workflow.

The folder is built by tests/internlm2_helpers.py in the hub's layout (fused `wqkv`, `w1/w3/w2`,
a sentencepiece tokenizer.model whose placeholder pieces tokenizer_config.json renames to the chat
tokens, `rope_scaling: null`, an `auto_map`). What is checked:
- the converted model, loaded by plain transformers, gives the logits of an independent reference
  forward of the ORIGINAL weights (all layers), and a wrong split of wqkv is refused by the check;
- the converted tokenizer gives sentencepiece's ids, the chat tokens keep their original ids, and
  no id reaches past the embedding;
- the cache: a second load converts nothing, an edited source converts again;
- LoRA and QLoRA: train -> pth_to_hf -> merge -> chat -> GGUF (round trip), and serve with the
  openai client, all with the CLI a student types.
"""
import json
import os
import random

import pytest
import torch

from internlm2_helpers import CHAT_TOKENS, SYSTEM, build_internlm2_folder, cache, source, training_lines  # noqa: F401 (fixtures)
from workbench.cli import main
from workbench.convert_models.internlm2 import READY_MARK, Tensors, converted_dir, is_internlm2, weight_files
from workbench.convert_models.internlm2_check import ConversionCheckError, check_conversion, reference_logits
from workbench.models import prepare_remote_code_folder, resolve_model_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def converted(source, cache):
    return prepare_remote_code_folder(source)


def conversation_ids(tokenizer) -> list[int]:
    msgs = [{"role": "user", "content": "Who are you? 你好"}, {"role": "assistant", "content": "I am a model, 我是助手."},
            {"role": "user", "content": "Tell me more about training 123."}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


# ---------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------
@torch.no_grad()
def test_converted_model_equals_reference_forward_of_the_original(source, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = json.loads((source / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()  # plain transformers, no remote code
    assert model.config.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    ids = conversation_ids(AutoTokenizer.from_pretrained(converted))
    got = model(input_ids=torch.tensor([ids])).logits[0]
    want = reference_logits(Tensors(weight_files(source)), src, ids, src["num_hidden_layers"])
    assert len(ids) > 30
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert want.abs().max().item() > 1.0  # the logits are not trivially small


def test_a_wrong_wqkv_split_is_refused(source, converted):
    """The check catches the classic mistake: wqkv read as [all q, all k, all v] instead of per key-value group."""
    src = json.loads((source / "config.json").read_text())
    llama = {k: v for k, v in json.loads((converted / "config.json").read_text()).items()
             if k not in ("transformers_version", "dtype", "architectures", "model_type")}
    original, good = Tensors(weight_files(source)), Tensors(sorted(converted.glob("*.safetensors")))
    n_q = src["hidden_size"]
    n_kv = src["num_key_value_heads"] * (src["hidden_size"] // src["num_attention_heads"])

    def naive(name):
        if ".self_attn." in name and name.split(".self_attn.")[1][0] in "qkv":
            layer = name.split(".self_attn.")[0] + ".attention.wqkv.weight"
            w = original(layer)
            parts = {"q": w[:n_q], "k": w[n_q:n_q + n_kv], "v": w[n_q + n_kv:]}
            return parts[name.split(".self_attn.")[1][0]]
        return good(name)

    ids = [1, 5, 9, 40, 77, 120, 300, 2]
    assert check_conversion(original, src, good, llama, ids)["same_argmax"] is not None
    with pytest.raises(ConversionCheckError, match="does not reproduce the original InternLM2 weights"):
        check_conversion(original, src, naive, llama, ids)


def test_config_provenance_card_and_default_system(source, converted):
    cfg = json.loads((converted / "config.json").read_text())
    src = json.loads((source / "config.json").read_text())
    assert cfg["workbench_converted_from"]["model_type"] == "internlm2"
    assert "per key-value group" in cfg["workbench_converted_from"]["layout"]
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": float(src["rope_theta"])}
    assert cfg["rms_norm_eps"] == src["rms_norm_eps"] and cfg["tie_word_embeddings"] is False
    assert "InternLM2" in (converted / "README.md").read_text()
    assert json.loads((converted / "prompt.json").read_text())["system"] == SYSTEM
    report = json.loads((converted / READY_MARK).read_text())
    assert report["logits"]["max_abs_logit_diff"] <= 1e-4 and report["tokenizer"]["chat_tokens"] == len(CHAT_TOKENS) + 3
    assert not any(converted.glob("*.py"))  # no remote code travels with it


def test_tokenizer_ids_equal_sentencepiece(source, converted):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(converted)
    rng = random.Random(1)
    texts = training_lines(60, seed=7) + ["  leading", "trailing  ", "a\n\nb", "🙂 ∮ Ω", "混合 text 和 中文 42"]
    texts += ["".join(rng.choice("abc 你好\n🙂.") for _ in range(20)) for _ in range(20)]
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    first_chat = sp.get_piece_size() - len(CHAT_TOKENS)
    assert [tok.convert_tokens_to_ids(t) for t in CHAT_TOKENS] == list(range(first_chat, first_chat + len(CHAT_TOKENS)))
    ids = conversation_ids(tok)
    assert max(ids) < json.loads((converted / "config.json").read_text())["vocab_size"] == len(tok)
    assert ids[:2] == [1, first_chat + CHAT_TOKENS.index("<|im_start|>")]
    assert tok.decode(sp.encode("Hello 你好 🙂")) == "Hello 你好 🙂"


def test_cache_and_loading_by_the_original_folder(source, converted, cache):
    assert is_internlm2(source) and not is_internlm2(converted)
    stamp = (converted / READY_MARK).stat().st_mtime_ns
    assert resolve_model_path(str(source)) == str(converted)  # what load_model / load_tokenizer / training use
    assert (converted / READY_MARK).stat().st_mtime_ns == stamp  # not converted again
    assert converted_dir(source, cache) == (converted, json.loads((converted / "config.json").read_text())["workbench_converted_from"]["fingerprint"])


@torch.no_grad()
def test_bf16_weights_with_biases_are_converted_exactly(tmp_path, cache):
    """bias: true puts biases on wqkv and wo (split like the weights); bf16 tensors keep their dtype and values."""
    from transformers import AutoModelForCausalLM

    src = build_internlm2_folder(tmp_path / "biased", bias=True, dtype=torch.bfloat16)
    out = prepare_remote_code_folder(src)
    cfg = json.loads((src / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.attention_bias and model.model.layers[0].self_attn.k_proj.bias is not None
    assert Tensors(sorted(out.glob("*.safetensors")))("model.layers.0.self_attn.q_proj.bias").dtype == torch.bfloat16
    ids = [1, 17, 300, 42, 5, 600, 2, 99]
    want = reference_logits(Tensors(weight_files(src)), cfg, ids, cfg["num_hidden_layers"])
    assert (model(input_ids=torch.tensor([ids])).logits[0] - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_linear_rope_scaling_is_converted_and_checked(tmp_path, cache):
    src = build_internlm2_folder(tmp_path / "linear", rope_scaling={"type": "linear", "factor": 4.0})
    out = prepare_remote_code_folder(src)  # the check compares with the reference, which scales positions by 1/4
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["factor"] == 4.0


def test_edited_source_is_converted_again_and_bad_input_refused(tmp_path, cache):
    src = build_internlm2_folder(tmp_path / "m", rope_scaling={"type": "dynamic", "factor": 2.0})
    first = prepare_remote_code_folder(src)
    assert json.loads((first / "config.json").read_text())["rope_parameters"]["rope_type"] == "dynamic"
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["prepare-model", str(src)]) == 2  # refused, clear message, no traceback
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["rope_scaling"] = None
    (src / "config.json").write_text(json.dumps(cfg))
    tok_cfg["added_tokens_decoder"]["99999"] = {"content": "<|extra|>", "special": True}
    (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    from workbench.convert_models import ConversionError

    with pytest.raises(ConversionError, match=r"tokenizer_config.json: added_tokens_decoder\['99999'\]"):
        prepare_remote_code_folder(src)
    del tok_cfg["added_tokens_decoder"]["99999"]
    (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    second = prepare_remote_code_folder(src)
    assert second != first and (second / READY_MARK).exists() and (first / READY_MARK).exists()
    for shard in src.glob("*.safetensors"):
        shard.rename(shard.with_suffix(".bin"))
    os.remove(src / "model.safetensors.index.json")
    with pytest.raises(ConversionError, match="pickle files, which the workbench never reads"):
        prepare_remote_code_folder(src)


# ---------------------------------------------------------------------------
# The workflow, as a student types it
# ---------------------------------------------------------------------------
def run_cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module", params=["lora", "qlora"])
def workflow(request, source, converted, tmp_path_factory):
    """copy-cfg -> train (a few steps) -> pth_to_hf -> merge, in a fresh folder, with the shipped InternLM2 recipe."""
    root = tmp_path_factory.mktemp(f"wf-{request.param}")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_cli("copy-cfg", "internlm2_chat_1_8b_qlora_identity_gpu", ".")
        cfg = root / "internlm2_chat_1_8b_qlora_identity_gpu_copy.yaml"
        text = cfg.read_text(encoding="utf-8")
        assert "pretrained_model_name_or_path: ./models/internlm2-chat-1_8b" in text
        cfg.write_text(text.replace("./models/internlm2-chat-1_8b", str(source)), encoding="utf-8")
        run_cli("train", cfg, "--cfg-options", f"method={request.param}", "max_steps=3", "save_steps=3", "evaluation_freq=3",
                "max_length=128", "accumulative_counts=1", "evaluation_max_new_tokens=4", "lr=1e-2", "device=cpu")
        work = root / "work_dirs" / "internlm2_chat_1_8b_qlora_identity_gpu"
        run_cli("convert", "pth_to_hf", cfg, work / "iter_3", root / "hf")
        run_cli("convert", "merge", source, root / "hf", root / "merged")
    finally:
        os.chdir(cwd)
    return {"root": root, "method": request.param, "adapter": root / "hf", "merged": root / "merged", "source": source}


def test_train_convert_merge_exports_are_llama(workflow):
    merged_cfg = json.loads((workflow["merged"] / "config.json").read_text())
    assert merged_cfg["model_type"] == "llama" and merged_cfg["workbench_converted_from"]["model_type"] == "internlm2"
    adapter_cfg = json.loads((workflow["adapter"] / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == resolve_model_path(str(workflow["source"]))  # the Llama copy: no remote code
    for folder in (workflow["adapter"], workflow["merged"]):
        card = (folder / "README.md").read_text()
        assert "converted by workbench into the standard Llama layout" in card and "per key-value group" in card
    losses = [json.loads(line)["loss"] for line in (workflow["root"] / "work_dirs" / "internlm2_chat_1_8b_qlora_identity_gpu" /
                                                     "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@torch.no_grad()
def test_chat_and_gguf_round_trip(workflow, tmp_path, capsys):
    from workbench.chat import GenerationSettings, answer, load_chat_model
    from workbench.gguf_export import export_gguf, verify_gguf

    model, builder = load_chat_model(str(workflow["merged"]), device="cpu")
    base, base_builder = load_chat_model(str(workflow["source"]), adapter=str(workflow["adapter"]), device="cpu")
    ids = torch.tensor([builder.generation_prompt("Who are you?")])
    assert builder.generation_prompt("Who are you?") == base_builder.generation_prompt("Who are you?")
    assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max().item() < 1e-4  # merged = base + adapter
    capsys.readouterr()
    run_cli("chat", workflow["merged"], "--prompt", "Who are you?", "--max-new-tokens", "6")
    said = capsys.readouterr().out
    assert answer(model, builder, "Who are you?", settings=GenerationSettings(max_new_tokens=6)) in said
    out = export_gguf(str(workflow["merged"]), tmp_path / "nova.gguf", "f16", progress=False)
    report = verify_gguf(out.path, str(workflow["merged"]), max_new_tokens=8)
    assert report["same greedy answers"] and report["template gives the training prompt ids"]
    assert report["max |logit difference| vs merged with the GGUF's rounding"] <= 1e-5
    import gguf

    fields = gguf.GGUFReader(str(out.path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert "Converted from InternLM2ForCausalLM" in fields["general.description"].contents()
    assert "<|im_end|>" in (tmp_path / "Modelfile").read_text()


def test_serve_answers_like_chat(workflow):
    if workflow["method"] != "lora":
        pytest.skip("served once, for the LoRA run")
    import openai

    from workbench.chat import GenerationSettings, answer, load_chat_model
    from workbench.serve import ServerProcess

    model, builder = load_chat_model(str(workflow["merged"]), device="cpu")
    expected = answer(model, builder, "Who are you?", settings=GenerationSettings(max_new_tokens=8))
    with ServerProcess(str(workflow["merged"]), "--threads", "1") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none")
        reply = client.chat.completions.create(model=server.name, temperature=0, max_tokens=8,
                                               messages=[{"role": "user", "content": "Who are you?"}])
    assert reply.choices[0].message.content == expected


# ---------------------------------------------------------------------------
# Honest handling of models the workbench does not control
# ---------------------------------------------------------------------------
@pytest.fixture
def too_small_vocab(converted, tmp_path):
    """The issue's failure: a tokenizer whose chat tokens have ids past the model's embedding rows."""
    import shutil

    folder = tmp_path / "mismatch"
    shutil.copytree(converted, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = cfg["vocab_size"] - len(CHAT_TOKENS)  # <|im_start|>, <|im_end|> now past the embedding
    (folder / "config.json").write_text(json.dumps(cfg))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"conversation": [{"input": "hi", "output": "hello"}]}] * 2))
    return folder, data


def test_check_dataset_and_train_refuse_ids_past_the_vocabulary(too_small_vocab, tmp_path, capsys):
    from workbench.config import load_recipe
    from workbench.samples import DataError
    from workbench.train import train

    folder, data = too_small_vocab
    assert main(["check-dataset", str(data), "--model", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "data.json: record 1: token ids" in out and "'<|im_start|>'" in out and "vocabulary size" in out
    assert "errors: 2" in out
    cfg = load_recipe("smollm2_135m_tiny_smoke").replace(pretrained_model_name_or_path=str(folder), max_steps=1,
                                                        datasets=[{"path": str(data)}])
    with pytest.raises(DataError, match=r"cannot be trained on this model, e\.g\. .*data\.json: record [12]: token ids"):
        train(cfg, work_dir=tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_packing_only_where_the_workbench_controls_attention(tmp_path, capsys):
    """A model class from outside transformers (as remote code is) trains one conversation a row, and says so."""
    from transformers import LlamaForCausalLM

    from workbench.config import load_recipe
    from workbench.fastpath.cpu import keeps_conversations_apart
    from workbench.models import load_model
    from workbench.train import Trainer

    class RemoteLlama(LlamaForCausalLM):  # its module is this test file, as a remote class's is transformers_modules.*
        pass

    cfg = load_recipe("smollm2_135m_tiny_smoke").replace(method="full", max_steps=1, pack_to_max_length=True, fast_path=False)
    own = load_model(cfg.pretrained_model_name_or_path, device="cpu", for_training=True)
    remote = RemoteLlama(own.config)
    assert keeps_conversations_apart(own) and not keeps_conversations_apart(remote)
    packed = Trainer(cfg, work_dir=tmp_path / "own", progress=False).setup(model=own)
    assert any(len(row) > 1 for row in packed.rows)
    capsys.readouterr()
    alone = Trainer(cfg, work_dir=tmp_path / "remote", progress=False).setup(model=remote)
    assert all(len(row) == 1 for row in alone.rows)
    assert sum(map(len, alone.rows)) == sum(map(len, packed.rows))
    assert "packing off: RemoteLlama runs its own (remote) attention code" in capsys.readouterr().out
    assert "packing off" in (tmp_path / "remote" / "dataset_report.txt").read_text()
    from workbench import i18n

    before = i18n.current_lang()
    i18n.set_lang("zh")  # a Chinese session reads it in Chinese, in the log and in the dataset report
    try:
        Trainer(cfg, work_dir=tmp_path / "remote_zh", progress=False).setup(model=remote)
    finally:
        i18n.set_lang(before)
    assert "已关闭 packing：RemoteLlama" in capsys.readouterr().out
    assert "已关闭 packing" in (tmp_path / "remote_zh" / "dataset_report.txt").read_text()


def test_serve_refuses_at_start_a_model_without_the_cache_api(monkeypatch):
    """A model whose own code wants the old tuple caches is refused before the server listens (never HTTP 500)."""
    from workbench.engine import cache_api_problem
    from workbench.models import TINY_MODEL, load_model, load_tokenizer
    from workbench.serve import ServeError, serve

    model = load_model(TINY_MODEL, device="cpu")
    ids = load_tokenizer(TINY_MODEL)("hello there")["input_ids"]
    assert cache_api_problem(model, ids) is None
    original = type(model).forward

    def tuple_cache_forward(self, *args, past_key_values=None, **kwargs):
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            past_key_values[0][0]  # what remote code of the transformers 4 era does with a cache
        return original(self, *args, past_key_values=past_key_values, **kwargs)

    monkeypatch.setattr(type(model), "forward", tuple_cache_forward)
    problem = cache_api_problem(model, ids)
    assert problem and "Cache API" in problem
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # off the main thread: serve() installs signal handlers only there
        failure = pool.submit(serve, TINY_MODEL, port=0, device="cpu").exception(timeout=120)
    assert isinstance(failure, ServeError) and "cannot decode with transformers' Cache API" in str(failure)


def test_gguf_refuses_an_unsupported_architecture_from_config_json_alone(tmp_path):
    from workbench.gguf_export import GGUFError, export_gguf

    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures": ["Gemma3ForCausalLM"]}))
    with pytest.raises(GGUFError, match=r"config.json: model_type 'gemma3' is not supported"):
        export_gguf(str(folder), tmp_path / "x.gguf")  # no weights there: refused before loading anything
    assert main(["convert", "gguf", str(folder), str(tmp_path / "x.gguf")]) == 2


def test_merge_and_chat_read_trust_remote_code_from_the_adapter(workflow, monkeypatch, tmp_path):
    import shutil

    import workbench.chat
    import workbench.convert
    from workbench.config import load_config, save_config

    adapter = tmp_path / "adapter"
    shutil.copytree(workflow["adapter"], adapter)
    save_config(load_config(adapter / "workbench_config.yaml").replace(trust_remote_code=True), adapter / "workbench_config.yaml")
    seen = []
    real = workbench.chat.load_model

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(workbench.chat, "load_model", spy)
    monkeypatch.setattr(workbench.convert, "load_model", spy)
    workbench.chat.load_chat_model(str(workflow["source"]), adapter=str(adapter), device="cpu")
    workbench.convert.merge(str(workflow["source"]), adapter, tmp_path / "merged", device="cpu")
    assert seen == [True, True]


def test_internlm2_5_style_dynamic_rope_goes_to_gguf(tmp_path, cache):
    """InternLM2.5 declares dynamic NTK rope scaling: the same below max_position_embeddings, the context the GGUF declares."""
    from workbench.gguf_export import export_gguf, verify_gguf

    src = build_internlm2_folder(tmp_path / "internlm2_5-tiny", rope_scaling={"type": "dynamic", "factor": 2.0})
    converted = prepare_remote_code_folder(src)
    out = export_gguf(str(src), tmp_path / "gguf" / "m.gguf", "f16", progress=False)  # the original folder, as a student names it
    report = verify_gguf(out.path, str(converted), max_new_tokens=6)
    assert report["same greedy answers"] and report["template gives the training prompt ids"]
    assert report["max |logit difference| vs merged with the GGUF's rounding"] <= 1e-5
