"""Batched generation for the server: one copy of the weights, one worker thread, many requests at once.

`Engine` owns the model and a single worker thread. Requests (token ids of a
prompt built by the workbench's `PromptBuilder`, plus their own sampling
settings) are queued by `submit`; the worker decodes all running requests
together, one token per step, in one left-padded batch with a shared KV cache:

- a new request joins at the next step: it is prefilled alone (so its first
  token is exactly what it would be alone), and its KV cache is left-padded and
  concatenated to the running batch's (or the batch's to its own);
- each row has its own position ids (real tokens only), so padding never shifts
  a token's position; padded cache columns are masked out;
- each row samples with its own temperature, top_p, penalties and seeded
  generator, stops at its own stop tokens, stop strings or token limit, and
  leaves the batch at once; columns that only padding still uses are dropped;
- text goes to each request's `emit` callback as it is generated ("text"
  events), then one "done" event with the finish reason and token counts.

Greedy replies equal `workbench.chat.answer`'s for the same prompt: the same
template, the same stop tokens, argmax on the same logits.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from workbench.decoding import last_logits_only

Emit = Callable[[tuple], None]


@dataclass
class Sampling:
    """How one request is generated (OpenAI's parameters; greedy when temperature is 0)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0   # transformers' (over prompt and reply); 1 = off
    frequency_penalty: float = 0.0    # OpenAI's (over the reply so far); 0 = off
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One request inside the engine."""

    prompt_ids: list[int]
    sampling: Sampling
    emit: Emit
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Stop generating for this request (its client went away); the worker drops it at the next step."""
        self.cancelled = True


class _Row:
    """A running request: its generated tokens, its text so far and its sampling state."""

    def __init__(self, job: Job, tokenizer, stop_ids: set[int], device):
        self.job, self.tok, self.stop_ids = job, tokenizer, stop_ids
        self.position = len(job.prompt_ids)          # position id of the next token fed
        self.generated: list[int] = []               # every sampled token (the count reported as usage)
        self.text_ids: list[int] = []                # those that make the text (not the stop token)
        self.emitted = 0                             # characters of the text already sent
        self.next_token: int | None = None
        s = job.sampling
        self.generator = None
        if s.temperature > 0:
            self.generator = torch.Generator(device=device)
            if s.seed is not None:
                self.generator.manual_seed(s.seed)
            else:
                self.generator.seed()  # a fresh random seed for this request only
        self.seen = torch.tensor(job.prompt_ids, dtype=torch.long, device=device) if s.repetition_penalty != 1.0 else None
        self.counts: dict[int, int] = {}

    # -- sampling --------------------------------------------------------------
    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's float32 logits (vocabulary,) with its own settings."""
        s = self.job.sampling
        if self.seen is not None:
            seen = torch.cat([self.seen, torch.tensor(self.generated, dtype=torch.long, device=logits.device)])
            score = logits.gather(0, seen)
            score = torch.where(score < 0, score * s.repetition_penalty, score / s.repetition_penalty)
            logits = logits.scatter(0, seen, score)
        if self.counts and (s.frequency_penalty or s.presence_penalty):
            ids = torch.tensor(list(self.counts), device=logits.device)
            n = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.index_put((ids,), -(s.frequency_penalty * n + s.presence_penalty), accumulate=True)
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits / s.temperature
        if s.top_p < 1.0:
            order, index = torch.sort(logits, descending=False)
            cum = order.softmax(-1).cumsum(-1)
            drop = cum <= (1 - s.top_p)
            drop[-1] = False  # keep at least the most likely token
            logits = logits.scatter(0, index[drop], float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    # -- text ------------------------------------------------------------------
    def accept(self, token: int) -> str | None:
        """Record a sampled token; emit the text that is final; the finish reason when the request is done."""
        self.generated.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        s = self.job.sampling
        if token in self.stop_ids:
            return self._finish("stop", self._text())
        self.text_ids.append(token)
        text = self._text()
        cut = _first_stop(text, s.stop)
        if cut is not None:
            return self._finish("stop", text[:cut])
        if len(self.generated) >= s.max_tokens:
            return self._finish("length", text)
        self._send(text[: _safe_end(text, s.stop)])
        self.next_token = token
        return None

    def _text(self) -> str:
        return self.tok.decode(self.text_ids, skip_special_tokens=True).lstrip()

    def _send(self, text: str) -> None:
        if len(text) > self.emitted:
            self.job.emit(("text", text[self.emitted:]))
            self.emitted = len(text)

    def _finish(self, reason: str, text: str) -> str:
        self._send(text.rstrip())
        self.job.emit(("done", reason, len(self.job.prompt_ids), len(self.generated)))
        return reason


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent now: not a half-decoded character, trailing space, or a possible stop string's start."""
    end = len(text.rstrip())
    if text[:end].endswith("\ufffd"):
        end = len(text[:end].rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k:end] == s[:k]:
                end -= k
                break
    return end


class Engine:
    """One model, one worker thread, all running requests decoded together (see the module docstring)."""

    def __init__(self, model, tokenizer, stop_token_ids: list[int], max_batch: int = 8, pad_token_id: int | None = None):
        self.model, self.tok = model.eval(), tokenizer
        self.stop_ids = set(stop_token_ids)
        self.max_batch = max_batch
        self.pad_id = pad_token_id if pad_token_id is not None else (tokenizer.pad_token_id or 0)
        self.device = next(model.parameters()).device
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.rows: list[_Row] = []
        self.cache = None          # the batch's DynamicCache, (rows, heads, columns, dim) per layer
        self.mask = None           # (rows, columns): 1 where a column holds a real token of that row
        self.steps = 0
        self.peak_batch = 0
        self.joinable = True       # False for caches that cannot be concatenated: then requests are queued, one at a time
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # the logits of the last position only, as `generate` asks for them (and the same numbers as `answer`)
        self._last_only = last_logits_only(model)

    # -- life cycle --------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="workbench-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish: running and queued requests end with the finish reason "cancelled"; the worker exits."""
        self._stop.set()
        self.jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], sampling: Sampling, emit: Emit) -> Job:
        """Queue a request; `emit` is called from the worker thread with ("text", str) and finally ("done", reason, n_prompt, n_completion)."""
        job = Job(list(prompt_ids), sampling, emit)
        if self._stop.is_set():
            emit(("done", "cancelled", len(job.prompt_ids), 0))
        else:
            self.jobs.put(job)
        return job

    def generate(self, prompt_ids: list[int], sampling: Sampling, timeout: float | None = None) -> tuple[str, str, int]:
        """(text, finish reason, completion tokens) for one request, blocking; for scripts and tests."""
        events: queue.Queue = queue.Queue()
        self.submit(prompt_ids, sampling, events.put)
        parts = []
        while True:
            ev = events.get(timeout=timeout)
            if ev[0] == "text":
                parts.append(ev[1])
            else:
                return "".join(parts), ev[1], ev[3]

    # -- the worker ------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._admit(block=not self.rows)
                    self._drop([r for r in self.rows if r.job.cancelled], "cancelled")
                    if self.rows:
                        self._step()
                except Exception as e:  # noqa: BLE001 - a failed step ends its requests, never the server
                    self._fail(e)
        self._drop(list(self.rows), "cancelled")
        while not self.jobs.empty():
            job = self.jobs.get_nowait()
            if job is not None:
                job.emit(("done", "cancelled", len(job.prompt_ids), 0))

    def _admit(self, block: bool) -> None:
        """Prefill queued requests (each alone) and add them to the batch, up to max_batch rows."""
        while len(self.rows) < (self.max_batch if self.joinable else 1) and not self._stop.is_set():
            try:
                job = self.jobs.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if job is None or job.cancelled:
                continue
            try:
                self._prefill(job)
            except Exception as e:  # noqa: BLE001 - this request fails, the running ones go on
                job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))

    def _prefill(self, job: Job) -> None:
        from transformers import DynamicCache

        row = _Row(job, self.tok, self.stop_ids, self.device)
        ids = torch.tensor([job.prompt_ids], device=self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True,
                         **self._last_only)
        self.joinable = self.joinable and _joinable(cache)
        if row.accept(row.pick(out.logits[0, -1].float())) is not None:
            return  # done after one token
        self._join(row, out.past_key_values, torch.ones_like(ids))

    def _join(self, row: _Row, cache, mask: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        for old, add in zip(self.cache.layers, cache.layers):
            old.keys, add_keys = _align(old.keys, add.keys)
            old.values, add_values = _align(old.values, add.values)
            old.keys = torch.cat([old.keys, add_keys])
            old.values = torch.cat([old.values, add_values])
        self.mask = torch.cat(list(_align(self.mask, mask, dim=1)))
        self.rows.append(row)
        self.peak_batch = max(self.peak_batch, len(self.rows))

    def _step(self) -> None:
        """One token for every running request."""
        n = len(self.rows)
        ids = torch.tensor([[r.next_token] for r in self.rows], device=self.device)
        pos = torch.tensor([[r.position] for r in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, torch.ones(n, 1, dtype=self.mask.dtype, device=self.device)], dim=1)
        width = self.mask.shape[1]
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                         cache_position=torch.tensor([width - 1], device=self.device), use_cache=True, **self._last_only)
        self.cache = out.past_key_values
        self.steps += 1
        self.peak_batch = max(self.peak_batch, n)
        logits = out.logits[:, -1].float()
        done = []
        for i, r in enumerate(self.rows):
            r.position += 1
            if r.job.cancelled or r.accept(r.pick(logits[i])) is not None:
                done.append(r)
        self._drop(done, None)

    def _drop(self, rows: list[_Row], reason: str | None) -> None:
        """Remove finished rows from the batch (telling the client `reason` when given) and trim all-padding columns."""
        if not rows:
            return
        for r in rows:
            if reason is not None:
                r.job.emit(("done", reason, len(r.job.prompt_ids), len(r.generated)))
        keep = [i for i, r in enumerate(self.rows) if r not in rows]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        first = int(self.mask.any(0).nonzero()[0])  # columns before it are padding in every remaining row
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def _fail(self, error: Exception) -> None:
        rows, self.rows, self.cache, self.mask = self.rows, [], None, None
        for r in rows:
            r.job.emit(("error", f"generation failed: {type(error).__name__}: {error}"))


@torch.inference_mode()
def cache_api_problem(model, prompt_ids: list[int]) -> str | None:
    """Why the engine cannot decode with this model (None when it can), found by a two-token probe at start.

    The engine keeps one transformers `DynamicCache` for the batch; a model with its own (remote)
    code that expects the old tuple caches fails there ("'DynamicCache' object is not
    subscriptable"). The server refuses such a model at start instead of answering HTTP 500.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    ids = torch.tensor([prompt_ids[:2] or [0]], device=next(model.parameters()).device)
    try:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids[:, :1], attention_mask=torch.ones_like(ids[:, :1]), past_key_values=cache, use_cache=True)
        nxt = out.past_key_values
        out = model(input_ids=ids[:, -1:], attention_mask=torch.ones(1, 2, dtype=ids.dtype, device=ids.device),
                    past_key_values=nxt, use_cache=True)
        ok = isinstance(out.past_key_values, Cache) and out.past_key_values.get_seq_length() == 2
    except Exception as e:  # noqa: BLE001 - any failure here is the answer
        return (f"{type(model).__name__} cannot decode with transformers' Cache API ({type(e).__name__}: {str(e)[:200]}), "
                "which the server's batched engine needs")
    if not ok:
        return f"{type(model).__name__} does not keep transformers' Cache API across steps, which the server's batched engine needs"
    return None


def _joinable(cache) -> bool:
    """Whether caches of this model can be padded and concatenated: plain full-attention layers only (not sliding windows)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _align(a: torch.Tensor, b: torch.Tensor, dim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad the shorter of two tensors with zeros along `dim` so that both are as long."""
    la, lb = a.shape[dim], b.shape[dim]
    if la == lb:
        return a, b
    short, extra = (a, lb - la) if la < lb else (b, la - lb)
    shape = list(short.shape)
    shape[dim] = extra
    padded = torch.cat([torch.zeros(shape, dtype=short.dtype, device=short.device), short], dim=dim)
    return (padded, b) if la < lb else (a, padded)
