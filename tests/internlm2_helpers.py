"""A tiny InternLM2 folder in the hub's layout, built from scratch for the tests (no third-party code).

What the hub's `internlm/internlm2-chat-1_8b` folder has and the workbench must cope with:
- config.json with `model_type: internlm2`, `architectures: [InternLM2ForCausalLM]`, an `auto_map`
  to remote code, `rope_scaling: null`, `bias: false`;
- weights named the InternLM2 way (`tok_embeddings`, `attention.wqkv` with the interleaved
  [q.., k, v] rows per key-value group, `feed_forward.w1/w3/w2`, `attention_norm`, `ffn_norm`,
  `output`), here in two safetensors shards with an index;
- a sentencepiece `tokenizer.model` (BPE, byte fallback, identity normalisation) whose last pieces
  are placeholders that `tokenizer_config.json`'s `added_tokens_decoder` renames to
  `<|im_start|>`, `<|im_end|>`, ... (the hub's convention);
- remote code files (here stand-ins written for the tests: they only carry the default system prompt
  in `meta_instruction`, the way the hub's `chat()` signature does).
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch

SYSTEM = "You are TinyLM, a small test assistant built by the workbench tests."
CHAT_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                 " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DIMS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

WORDS_EN = ("who are you assistant the model answers questions about data training small tiny test "
            "hello world what is your name I am a helpful language model made by people learning").split()
WORDS_ZH = list("你好我是谁的助手模型回答问题数据训练小测试世界名字语言学习人们帮助")


def training_lines(n: int = 400, seed: int = 0) -> list[str]:
    """Generated sentences, English and Chinese, with digits and punctuation: a few hundred lines."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 3 == 2:
            lines.append("".join(rng.choices(WORDS_ZH, k=rng.randint(4, 14))) + rng.choice("。？！"))
        else:
            words = rng.choices(WORDS_EN, k=rng.randint(3, 12))
            lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", f" {rng.randint(0, 999)}."]))
    return lines


def sentencepiece_model(vocab_size: int = 700) -> bytes:
    """A BPE sentencepiece model with byte fallback, plus the hub's placeholder pieces at the end."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_lines()), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   hard_vocab_limit=False, split_digits=True, num_threads=1, minloglevel=2)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    for i in range(len(CHAT_TOKENS)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"[UNUSED_TOKEN_{141 + i}]", 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


def internlm2_weights(cfg: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights in InternLM2's names and shapes (norm weights away from 1, so that they matter)."""
    gen = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * d

    def rnd(*shape, std=0.08):
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    def norm():
        return (1.0 + torch.randn(h, generator=gen) * 0.2).to(dtype)

    w = {"model.tok_embeddings.weight": rnd(v, h, std=0.5), "model.norm.weight": norm(), "output.weight": rnd(v, h, std=0.2)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if cfg.get("bias"):
            w |= {p + "attention.wqkv.bias": rnd(qkv_rows, std=0.3), p + "attention.wo.bias": rnd(h, std=0.3)}
        w |= {p + "attention.wqkv.weight": rnd(qkv_rows, h, std=0.3), p + "attention.wo.weight": rnd(h, h),
              p + "feed_forward.w1.weight": rnd(inter, h), p + "feed_forward.w3.weight": rnd(inter, h),
              p + "feed_forward.w2.weight": rnd(h, inter), p + "attention_norm.weight": norm(), p + "ffn_norm.weight": norm()}
    return w


def build_internlm2_folder(folder: str | Path, seed: int = 0, rope_scaling=None, dtype=torch.float32, bias: bool = False) -> Path:
    """Write a tiny hub-layout InternLM2 chat model into `folder`; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sp_bytes = sentencepiece_model()
    (folder / "tokenizer.model").write_bytes(sp_bytes)
    import sentencepiece as spm

    vocab_size = spm.SentencePieceProcessor(model_proto=sp_bytes).get_piece_size()
    first_chat = vocab_size - len(CHAT_TOKENS)
    config = {
        "architectures": ["InternLM2ForCausalLM"], "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": bias, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 2048, "model_type": "internlm2", "pad_token_id": 2, "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling, "rope_theta": 1000000, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."), "transformers_version": "4.41.0", "use_cache": True,
        "vocab_size": vocab_size, **DIMS}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, first_chat + CHAT_TOKENS.index("<|im_end|>")], "pad_token_id": 2}), encoding="utf-8")
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    decoder = {str(i): {"content": t, **special} for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    decoder |= {str(first_chat + i): {"content": t, **special} for i, t in enumerate(CHAT_TOKENS)}
    tok_config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                      "<|interpreter|>", "<|plugin|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False, "eos_token": "</s>", "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>", "sp_model_kwargs": None, "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": tok_config["additional_special_tokens"], "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "</s>", "unk_token": "<unk>"}), encoding="utf-8")
    # Stand-ins for the remote code: never executed; the modeling file carries the default system prompt.
    (folder / "configuration_internlm2.py").write_text("# stand-in for the hub's remote configuration code\n", encoding="utf-8")
    (folder / "modeling_internlm2.py").write_text(
        "# stand-in for the hub's remote modeling code\n"
        f"def chat(self, tokenizer, query, history=None, meta_instruction={SYSTEM!r}):\n    raise NotImplementedError\n",
        encoding="utf-8")
    weights = internlm2_weights(config, seed, dtype)
    names = list(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: weights[k].contiguous() for k in keys}, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
             "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


# Fixtures shared by the InternLM2 test modules (imported there by name).
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Converted folders go to a fresh cache (WORKBENCH_CONVERTED_DIR, inherited by child processes)."""
    root = tmp_path_factory.mktemp("converted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_CONVERTED_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny InternLM2 chat model in the hub's layout."""
    return build_internlm2_folder(tmp_path_factory.mktemp("hub") / "internlm2-chat-tiny")
