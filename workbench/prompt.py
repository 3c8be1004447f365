"""The one prompt builder: conversations to token ids and labels, from the chat template.

Training, the in-training evaluation, chat and the analysis all build their
prompts here, so the model is asked questions exactly the way it was trained.
The builder's settings (chat template and system prompt) are saved next to
every adapter and merged model (`prompt.json`) and read back by `load`.
(`workbench.display.show_sample` shows an encoded sample with its trained part marked.)

Loss masking: every assistant turn (or only the last, with
loss_on="last_turn") is trained, including the template's end-of-turn token;
system and user tokens get the label -100. The spans are found by rendering the
conversation with the tokenizer's own chat template, turn by turn, so any
template that renders a prefix of a conversation as a prefix of the whole
works (ChatML, Llama 3, InternLM2, Qwen, ...).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from workbench.config import DEFAULT_SYSTEM
from workbench.io import atomic_write_json

IGNORE = -100
PROMPT_FILE = "prompt.json"

# Used only when a tokenizer has no chat template at all (a base, non-chat model).
FALLBACK_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


_BEGIN = "{#- workbench: the trained system prompt is the default -#}"
_END = "{#- workbench: end of default #}"  # no trailing "-": the template after it keeps its leading whitespace


def with_default_system(template: str, system: str) -> str:
    """`template` inserting `system` when the conversation brings no system message (an explicit one still wins).

    Generic over templates: a Jinja block in front adds the system message when `messages[0]` is not one.
    """
    literal = json.dumps(system, ensure_ascii=False)  # a valid Jinja (and minja) string literal
    block = (f"{_BEGIN}{{%- if not (messages and messages[0]['role'] == 'system') -%}}"
             f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}"
             f"{{%- endif -%}}{_END}")
    return block + strip_default_system(template)


def strip_default_system(template: str) -> str:
    """A template without the block `with_default_system` put in front (so it is never added twice)."""
    if template.startswith(_BEGIN) and _END in template:
        return template.split(_END, 1)[1]
    return template


class TemplateError(ValueError):
    """The chat template cannot be used to mask a conversation."""


@dataclass
class Encoded:
    """One encoded training sample."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # longer than max_length and cut
    distill: bool = False  # an everyday sample: its trained tokens get the distillation term (Config.distill_weight)
    unlikelihood: bool | str = False  # an everyday sample that must not state the identity (Config.unlikelihood_weight); "names": only the names
    roles: bool = False  # an identity sample: where it has one name, the term pushes the other down
    negative: bool = False  # a negative twin: its labels mark the tokens the term pushes down; no cross-entropy
    opening: frozenset[int] = frozenset()  # a distill sample's label indices in each answer's first sentence

    @property
    def trained_labels(self) -> list[int]:
        """The labels the cross-entropy learns: none for a negative twin."""
        return [IGNORE] * len(self.labels) if self.negative else self.labels

    @property
    def n_trained(self) -> int:
        return 0 if self.negative else sum(1 for x in self.labels if x != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PromptBuilder:
    """Builds prompts and training samples with one tokenizer and chat template."""

    tokenizer: object
    system: str | None = DEFAULT_SYSTEM  # None: no system turn of its own (the template's default, if any, applies)
    chat_template: str | None = None
    _stop_ids: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.chat_template:
            self.tokenizer.chat_template = self.chat_template
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = FALLBACK_CHATML
        self.chat_template = self.tokenizer.chat_template
        self._stop_ids = self._find_stop_ids()

    # -- conversations -------------------------------------------------------
    def with_system(self, messages: list[dict]) -> list[dict]:
        """The messages with the builder's system prompt in front, unless they bring their own or it has none."""
        if self.system is None or (messages and messages[0]["role"] == "system"):
            return list(messages)
        return [{"role": "system", "content": self.system}, *messages]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, messages: list[dict], max_length: int | None = None, loss_on: str = "all_turns") -> Encoded:
        """Token ids and labels for one conversation (system prompt added when missing)."""
        messages = self.with_system(messages)
        text, spans = self._trained_spans(messages, loss_on)
        ids, trained = self._tokenize_with_spans(text, spans)
        labels = [t if keep else IGNORE for t, keep in zip(ids, trained)]
        return _finish(ids, labels, max_length)

    def encode_text(self, text: str, max_length: int | None = None) -> Encoded:
        """A pre-training document: loss on every token, ending with the EOS token."""
        tok = self.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
        ids = [*ids, tok.eos_token_id]
        return _finish(ids, list(ids), max_length)

    def generation_prompt(self, question: str | list[dict], history: list[tuple[str, str]] | None = None) -> list[int]:
        """Token ids that ask the model to answer `question` after `history` (pairs of user, assistant)."""
        if isinstance(question, str):
            messages = []
            for user, assistant in history or []:
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            messages.append({"role": "user", "content": question})
        else:
            messages = question
        text = self.render(self.with_system(messages), add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS and the template's end-of-turn token: generation stops at either."""
        return list(self._stop_ids)

    # -- saving ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"system": self.system, "chat_template": self.chat_template, "stop_token_ids": self.stop_token_ids,
                "stop_tokens": self.tokenizer.convert_ids_to_tokens(self.stop_token_ids)}

    def save(self, folder: str | Path) -> Path:
        """Write prompt.json (system prompt, chat template, stop tokens) into `folder`."""
        return atomic_write_json(Path(folder) / PROMPT_FILE, self.to_dict())

    @classmethod
    def load(cls, folder: str | Path, tokenizer) -> "PromptBuilder":
        data = json.loads((Path(folder) / PROMPT_FILE).read_text(encoding="utf-8"))
        return cls(tokenizer, system=data["system"], chat_template=data["chat_template"])

    # -- internals -----------------------------------------------------------------
    def _trained_spans(self, messages: list[dict], loss_on: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of the trained assistant turns."""
        full = self.render(messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if loss_on == "last_turn":
            turns = turns[-1:]
        spans = []
        for i in turns:
            prefix = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise TemplateError("the chat template does not render a conversation's beginning as a prefix of the whole, "
                                    "so the assistant turns cannot be located; set chat_template in the config to a template that does")
            spans.append((len(prefix), len(upto)))
        return full, spans

    def _tokenize_with_spans(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        tok = self.tokenizer
        if getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            trained = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
            return ids, trained
        # Slow tokenizers have no offsets: tokenize piece by piece at the span borders.
        ids, trained, pos = [], [], 0
        for s, e in spans + [(len(text), len(text))]:
            for piece, flag in ((text[pos:s], False), (text[s:e], True)):
                if piece:
                    piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
                    ids += piece_ids
                    trained += [flag] * len(piece_ids)
            pos = e
        return ids, trained

    def _find_stop_ids(self) -> list[int]:
        tok = self.tokenizer
        stops = [tok.eos_token_id] if tok.eos_token_id is not None else []
        probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
        try:
            prefix = self.render(probe, add_generation_prompt=True)
            full = self.render(probe + [{"role": "assistant", "content": "ANSWER"}])
        except Exception:  # noqa: BLE001 - templates that reject a system turn
            return stops
        tail = full[len(prefix):].split("ANSWER", 1)[-1]
        if tail.strip():
            tail_ids = tok(tail.lstrip(" "), add_special_tokens=False)["input_ids"]
            if tail_ids and tail_ids[0] not in stops and tok.convert_ids_to_tokens(tail_ids[0]) in tok.all_special_tokens + list(getattr(tok, "added_tokens_encoder", {})):
                stops.append(tail_ids[0])
        return stops


def _finish(ids: list[int], labels: list[int], max_length: int | None) -> Encoded:
    labels = list(labels)
    if labels:
        labels[0] = IGNORE  # never predicted unpacked; keeps packed rows free of cross-sample targets
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(list(ids), labels, truncated)


def builder_for(cfg, tokenizer) -> PromptBuilder:
    """The prompt builder a config asks for."""
    return PromptBuilder(tokenizer, system=cfg.system, chat_template=cfg.chat_template)
