"""A sentencepiece `tokenizer.model` as a fast tokenizer (`tokenizer.json`), checked against sentencepiece.

Hub folders such as InternLM2's ship a sentencepiece model whose last pieces are placeholders
(`[UNUSED_TOKEN_145]`, ...) and rename them in `tokenizer_config.json`'s `added_tokens_decoder`
to the chat tokens (`<|im_start|>`, `<|im_end|>`, ...) at the SAME ids. transformers 5 builds
such tokenizers from remote code wrongly (new ids past the embedding, no `▁` prefix, no byte
fallback). Here the placeholder pieces are renamed inside the sentencepiece model first, so
transformers' own Llama converter (`LlamaConverter`: the `▁` prefix, byte fallback, the Llama
decoder) gives every chat token its original id.

Written here (not in transformers): `SpmBpeConverter.tokenizer` rebuilds the BPE model, because
`SpmConverter.tokenizer` in transformers 5.23 passes the scores where `SentencePieceExtractor.extract`
now expects a model class (AttributeError); the merges are generated with transformers'
`generate_merges`, ordered by the pieces' scores as sentencepiece merges them.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

from workbench.convert_models import ConversionError

CHECK_TEXTS = [
    "Hello world", "Who are you? I am an assistant.", "  two leading spaces and  double  spaces ",
    "line one\nline two\n\nindented\n    code()", "你好，你是谁？我是一个助手。", "数字 12345 and 3.14159",
    "emoji 🙂🚀 and rare ℤ ∮ ☃ characters", "MiXeD CaSe, punctuation!?;:", "tab\tseparated\tvalues", "",
]


class TokenizerConversionError(ConversionError):
    """The sentencepiece tokenizer cannot be converted, or the converted one does not give its ids."""


def read_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise TokenizerConversionError(f"{path}: not a sentencepiece model ({e})") from None
    return proto


def added_tokens(tokenizer_config: Path, n_pieces: int) -> dict[int, dict]:
    """`added_tokens_decoder` of tokenizer_config.json: id -> {content, special}; ids must be pieces of the model."""
    if not tokenizer_config.exists():
        return {}
    data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    out = {}
    for key, entry in (data.get("added_tokens_decoder") or {}).items():
        if not (key.isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise TokenizerConversionError(f"{tokenizer_config}: added_tokens_decoder[{key!r}]: expected an id and an object with 'content'")
        if int(key) >= n_pieces:
            raise TokenizerConversionError(f"{tokenizer_config}: added_tokens_decoder[{key!r}] ({entry['content']!r}): id beyond the "
                                           f"{n_pieces} pieces of tokenizer.model; only renamed pieces are supported")
        out[int(key)] = {"content": entry["content"], "special": bool(entry.get("special", True))}
    return out


def renamed_proto(proto, renames: dict[int, dict]):
    """A copy of the sentencepiece model with the added tokens' pieces renamed (CONTROL if special, else USER_DEFINED)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    out = pb.ModelProto()
    out.CopyFrom(proto)
    kind = pb.ModelProto.SentencePiece
    for i, entry in renames.items():
        piece = out.pieces[i]
        if piece.piece != entry["content"]:
            piece.piece = entry["content"]
        if piece.type != kind.UNKNOWN:
            piece.type = kind.CONTROL if entry["special"] else kind.USER_DEFINED
    return out


def _spm_bpe_converter():
    from tokenizers import AddedToken, Tokenizer, normalizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import LlamaConverter
    from transformers.tokenization_utils_base import generate_merges

    class SpmBpeConverter(LlamaConverter):
        """transformers' Llama converter with the BPE model rebuilt (see the module docstring)."""

        def tokenizer(self, proto):
            if proto.trainer_spec.model_type != 2:
                return super().tokenizer(proto)
            scores = self.vocab(proto)
            vocab = {piece: i for i, (piece, _) in enumerate(scores)}
            specials = [(i, p.piece, p.type == 3) for i, p in enumerate(proto.pieces) if p.type in (3, 4)]
            merges = generate_merges(vocab, scores, skip_tokens={p for _, p, _ in specials})
            tok = Tokenizer(BPE(vocab, merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                                byte_fallback=bool(proto.trainer_spec.byte_fallback), dropout=None))
            tok.add_tokens([AddedToken(p, normalized=False, special=s) for _, p, s in sorted(specials)])
            return tok

        def normalizer(self, proto):
            spec, steps = proto.normalizer_spec, []
            if spec.precompiled_charsmap:
                steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
            if spec.remove_extra_whitespaces:
                from tokenizers import Regex

                steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
            base = super().normalizer(proto)
            return normalizers.Sequence(steps + [base]) if steps else base

    return SpmBpeConverter


def convert_tokenizer(folder: Path, model_max_length: int | None = None):
    """The fast tokenizer (a transformers `PreTrainedTokenizerFast`) of a folder's tokenizer.model + tokenizer_config.json."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    proto = read_proto(folder / "tokenizer.model")
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    renames = added_tokens(cfg_path, len(proto.pieces))
    proto = renamed_proto(proto, renames)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.model"
        path.write_bytes(proto.SerializeToString())
        shim = SimpleNamespace(vocab_file=str(path), legacy=True, add_prefix_space=proto.normalizer_spec.add_dummy_prefix,
                               convert_ids_to_tokens=lambda i: proto.pieces[i].piece)
        backend = _spm_bpe_converter()(shim).converted()

    def token(name, default):
        value = tok_cfg.get(name, default)
        return value.get("content") if isinstance(value, dict) else value

    bos, eos, unk = token("bos_token", "<s>"), token("eos_token", "</s>"), token("unk_token", "<unk>")
    single = ([f"{bos}:0"] if tok_cfg.get("add_bos_token", True) else []) + ["$A:0"] + ([f"{eos}:0"] if tok_cfg.get("add_eos_token") else [])
    pair = single + [s.replace(":0", ":1").replace("$A", "$B") for s in single]
    used = {s.split(":")[0] for s in single if not s.startswith("$")}
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=[(t, backend.token_to_id(t)) for t in sorted(used)])
    extra = [e["content"] for e in renames.values() if e["special"] and e["content"] not in (bos, eos, unk)]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=token("pad_token", eos),
        additional_special_tokens=extra, chat_template=tok_cfg.get("chat_template"), clean_up_tokenization_spaces=False,
        model_max_length=model_max_length or tok_cfg.get("model_max_length", 4096))


def check_tokenizer(folder: Path, tokenizer, texts: list[str] = CHECK_TEXTS) -> dict:
    """Token ids of the converted tokenizer against sentencepiece on the original tokenizer.model.

    Plain texts must give sentencepiece's ids exactly; each renamed chat token must keep its
    original id, also inside a rendered conversation (the text between special tokens encoded
    by sentencepiece piece by piece, as the slow tokenizers do). Raises on any difference.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    renames = added_tokens(folder / "tokenizer_config.json", sp.get_piece_size())
    for text in texts:
        got, want = tokenizer(text, add_special_tokens=False)["input_ids"], sp.encode(text)
        if got != want:
            raise TokenizerConversionError(f"the converted tokenizer of {folder} gives other ids than sentencepiece for {text!r}: "
                                           f"{got[:20]} against {want[:20]}")
    specials = {e["content"]: i for i, e in renames.items()}
    for content, i in specials.items():
        if tokenizer.convert_tokens_to_ids(content) != i:
            raise TokenizerConversionError(f"{folder}: the chat token {content!r} has id {tokenizer.convert_tokens_to_ids(content)} "
                                           f"after conversion, {i} in tokenizer_config.json")
    n_chat = 0
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, who are you?"},
                    {"role": "assistant", "content": "I am  a model.\nOK"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        want = _encode_like_slow(sp, text, specials)
        if got != want:
            raise TokenizerConversionError(f"{folder}: a rendered conversation tokenizes differently from sentencepiece: "
                                           f"{got[:30]} against {want[:30]}")
        n_chat = len(got)
    return {"texts": len(texts), "chat_tokens": len(specials), "conversation_tokens": n_chat, "vocab": sp.get_piece_size()}


def _encode_like_slow(sp, text: str, specials: dict[str, int]) -> list[int]:
    """Split at special tokens, encode the pieces between them with sentencepiece (the slow tokenizers' behaviour)."""
    import re

    if not specials:
        return sp.encode(text)
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids = []
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids += sp.encode(part)
    return ids
