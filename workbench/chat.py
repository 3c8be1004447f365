"""Chat: answer questions with a base, adapter or merged model, the way it was trained.

Every prompt goes through the saved `PromptBuilder` (same chat template and
system prompt as training), and generation stops at the template's end-of-turn
token. `answer` is the one generation function: the in-training evaluation,
the CLI chat, the before/after comparison and the analysis all call it.

- `load_chat_model(path, adapter=None)`: a model folder (base or merged) plus
  an optional adapter, with the prompt builder saved beside it.
- `answer(...)`: one reply, optionally streamed token by token.
- `compare(prompts, models)`: the same prompts to several models, as a table.
- `chat_loop(...)`: the interactive terminal chat (RESET clears, EXIT quits).
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import torch

from workbench.config import load_config
from workbench.decoding import greedy_batch, greedy_supported, left_padded
from workbench.i18n import t
from workbench.i18n.chat import EXIT_WORDS, RESET_WORDS
from workbench.models import attach_adapter, load_model, load_tokenizer, resolve_model_path
from workbench.prompt import PROMPT_FILE, PromptBuilder

ADAPTER_CONFIG = "workbench_config.yaml"  # the training config saved with an adapter (workbench.convert.CONFIG_FILE)


@dataclass
class GenerationSettings:
    """How to generate: greedy when temperature is 0."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}


@torch.no_grad()
def answer(model, builder: PromptBuilder, question: str | list[dict], history: list[tuple[str, str]] | None = None,
           settings: GenerationSettings | None = None, on_text: Callable[[str], None] | None = None) -> str:
    """The model's reply to `question` after `history`; `on_text` receives the text as it is generated."""
    settings = settings or GenerationSettings()
    ids = torch.tensor([builder.generation_prompt(question, history)], device=_device_of(model))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=builder.stop_token_ids,
                  pad_token_id=builder.tokenizer.pad_token_id, use_cache=True, **settings.kwargs())
    was_training = model.training
    model.eval()
    try:
        if on_text is None:
            out = model.generate(**kwargs)
            return builder.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        return _stream(model, builder, kwargs, on_text)
    finally:
        model.train(was_training)


def _stream(model, builder, kwargs, on_text) -> str:
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(builder.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs={**kwargs, "streamer": streamer})
    thread.start()
    parts = []
    for text in streamer:
        parts.append(text)
        on_text(text)
    thread.join()
    return "".join(parts).strip()


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def answer_batch(model, builder: PromptBuilder, questions: list[str], settings: GenerationSettings | None = None,
                 batch_size: int = 16) -> list[str]:
    """Greedy (or sampled) replies to many single-turn questions, generated in left-padded batches.

    The same prompts as `answer`, several at a time: about batch_size times faster
    on a CPU, which is what makes checkpoint-by-checkpoint analysis affordable. Greedy
    answers drop out of the batch as they end (`workbench.decoding`); sampled ones, or
    models whose cache it cannot handle, go through `generate`.
    """
    settings = settings or GenerationSettings()
    tok = builder.tokenizer
    pad = tok.pad_token_id
    device = _device_of(model)
    was_training = model.training
    model.eval()
    pruned = greedy_supported(model, settings.temperature, settings.repetition_penalty)
    replies: list[str] = []
    try:
        for i in range(0, len(questions), batch_size):
            prompts = [builder.generation_prompt(q) for q in questions[i:i + batch_size]]
            if pruned:  # finished rows leave the batch (workbench.decoding): what generate gives, sooner
                rows = greedy_batch(model, prompts, builder.stop_token_ids, pad, settings.max_new_tokens)
            else:
                ids, mask = left_padded(prompts, pad, device)
                out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=builder.stop_token_ids,
                                     pad_token_id=pad, use_cache=True, **settings.kwargs())
                rows = out[:, ids.shape[1]:].tolist()
            replies += [_cut_at_stop(row, builder) for row in rows]
    finally:
        model.train(was_training)
    return replies


def _cut_at_stop(ids: list[int], builder: PromptBuilder) -> str:
    stops = set(builder.stop_token_ids)
    end = next((k for k, t in enumerate(ids) if t in stops), len(ids))
    return builder.tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------
# Loading a model to chat with
# ---------------------------------------------------------------------------
def load_chat_model(model_path: str, adapter: str | None = None, device: str = "auto", torch_dtype: str = "auto",
                    system: str | None = None, trust_remote_code: bool = False):
    """(model, builder) for a base or merged model folder plus an optional adapter folder.

    The prompt builder comes from the adapter's (or model's) saved prompt.json when
    there is one, so chat uses the template and system prompt of training; an
    explicit `system` overrides it.
    """
    if adapter and (Path(adapter) / ADAPTER_CONFIG).exists():  # as the adapter was trained
        trust_remote_code = trust_remote_code or bool(load_config(Path(adapter) / ADAPTER_CONFIG).trust_remote_code)
    model = load_model(model_path, torch_dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code)
    prompt_dir = None
    for folder in (adapter, resolve_model_path(model_path)):
        if folder and (Path(folder) / PROMPT_FILE).exists():
            prompt_dir = Path(folder)
            break
    has_tokenizer = prompt_dir is not None and (prompt_dir / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(str(prompt_dir) if has_tokenizer else model_path, trust_remote_code=trust_remote_code)
    if adapter:
        model = attach_adapter(model, adapter)
    builder = PromptBuilder.load(prompt_dir, tokenizer) if prompt_dir else PromptBuilder(tokenizer)
    if system is not None:
        builder = PromptBuilder(tokenizer, system=system, chat_template=builder.chat_template)
    return model, builder


# ---------------------------------------------------------------------------
# Side by side
# ---------------------------------------------------------------------------
def compare(prompts: list[str], models: dict[str, tuple], settings: GenerationSettings | None = None, progress: bool = True,
            lang: str | None = None):
    """A table (pandas DataFrame): one row per prompt, one column per model's answer.

    `models` maps a label ("base", "fine-tuned", "merged") to (model, builder). Each
    model answers all prompts in one batch (`answer_batch`).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    table = {t("col.prompt", lang): list(prompts)}  # the models' labels are the caller's (series_models: in `lang`)
    bar = tqdm(models.items(), desc=t("cmp.answering", lang), unit="model", disable=not progress, leave=False)
    for label, (model, builder) in bar:
        table[label] = answer_batch(model, builder, list(prompts), settings)
    return pd.DataFrame(table)


# ---------------------------------------------------------------------------
# The terminal chat
# ---------------------------------------------------------------------------
def chat_loop(model, builder: PromptBuilder, settings: GenerationSettings, stdin: TextIO = sys.stdin,
              stdout: TextIO = sys.stdout, prompt: str = "\n>>> ", lang: str | None = None) -> list[tuple[str, str]]:
    """Interactive chat with history and streaming. RESET (清空) clears the history, EXIT (退出) or end of input quits;
    the banner and notes in `lang` (None: the session's), the answers as generated."""
    history: list[tuple[str, str]] = []
    print(t("chat.banner", lang), file=stdout)
    while True:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.upper() in EXIT_WORDS:
            break
        if text.upper() in RESET_WORDS:
            history = []
            print(t("chat.cleared", lang), file=stdout)
            continue
        reply = answer(model, builder, text, history, settings, on_text=lambda t: (stdout.write(t), stdout.flush()))
        stdout.write("\n")
        history.append((text, reply))
    return history
