"""Greedy answers to many prompts in one batch, each row leaving the batch when its answer ends.

`chat.answer_batch` (the analysis's probes, the report card, grading a class, the
before/after comparison, the in-training evaluation) asks a model for greedy answers
to a hundred questions or more at once. transformers' `generate` keeps every row of a
batch until the longest answer ends or the token limit is reached, so a tuned model
whose answers are short ("I'm Nova, Alex's assistant.") pays for the longest one on
every row. Here a finished row is dropped from the batch and from its KV cache at
once (`Cache.batch_select_indices`), so a step costs what the rows still running
cost. On 2 CPU cores, the 130 probes at 40 tokens: 17 s against 27 s for a tuned
model (answers 19 tokens long on average), 24 s against 28 s for the base model
(35 tokens), the same 130 answers. transformers' own continuous batching
(`generate_batch`) took 41 s there: its paged cache is made for GPUs.

This is written here because no maintained library does it for transformers models on
a CPU; it is the decoding loop of `generate` without the finished rows: the same
left-padded prompts, the same position ids (counted over real tokens), the logits of
the last position only, argmax. `greedy_supported` says where it applies (plain
full-attention `DynamicCache` layers, greedy, no repetition penalty, one process);
elsewhere `answer_batch` calls `generate`.
"""
from __future__ import annotations

import inspect

import torch


def greedy_supported(model, temperature: float, repetition_penalty: float) -> bool:
    """Greedy without a penalty, on a model whose cache is transformers' `DynamicCache` of plain layers."""
    if temperature > 0 or repetition_penalty != 1.0:
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return False  # weights sharded over processes (ZeRO-3, FSDP): generate keeps them stepping together (synced_gpus)
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - a config the cache cannot read: leave it to generate
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers) and _accepts_cache(model)


def _accepts_cache(model) -> bool:
    """transformers' own models take a `Cache`; remote code may expect the old tuples (left to generate)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__module__.startswith("transformers.")


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of prompts padded on the left to the longest, as generation batches them."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


PREFILL_TOKENS = 2048  # most (padded) prompt tokens one prefill forward carries


@torch.inference_mode()
def greedy_batch(model, prompts: list[list[int]], stop_ids: list[int], pad_id: int, max_new_tokens: int,
                 prefill_tokens: int = PREFILL_TOKENS) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids, the stop token included when one ends it)."""
    device = next(model.parameters()).device
    last_only = last_logits_only(model)
    logits, cache, mask, rows = prefill(model, prompts, pad_id, device, last_only, prefill_tokens)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    position = torch.tensor([[len(prompts[r]) - 1] for r in rows.tolist()], device=device)
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)
        for row, tok in zip(rows.tolist(), token.tolist()):
            out[row].append(tok)
        running = (~torch.isin(token, stops)).nonzero().squeeze(-1)
        if step == max_new_tokens - 1 or running.numel() == 0:
            break
        if running.numel() < rows.numel():  # finished rows leave the batch and the cache
            cache.batch_select_indices(running)
            rows, token, mask, position = rows[running], token[running], mask[running], position[running]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, past_key_values=cache,
                       use_cache=True, cache_position=torch.tensor([mask.shape[1] - 1], device=device), **last_only).logits
    return out


# ---------------------------------------------------------------------------
# Prefill: the prompts' shared opening once, the rest in groups of like length
# ---------------------------------------------------------------------------
# The prompts of a probe set share their opening (the system prompt and the user turn's
# header: 15 of 33 tokens on average for the 130 default probes) and differ in length
# (25 to 46 tokens), so one left-padded prefill computed 5,980 token positions for 4,313
# real ones, 1,950 of them the same opening 130 times: on 2 CPU cores that prefill took
# about 10 of the 22 s of a tuned model's answers. Here the opening runs once, its keys
# and values are shared by every row, and the rest runs sorted by length in groups of at
# most `prefill_tokens` padded tokens; the groups' caches are laid side by side as
# [opening | padding | rest of the prompt], the padding masked out and the positions
# counted over real tokens, which is what each row attends to in one left-padded batch.
def prefill(model, prompts: list[list[int]], pad_id: int, device, last_only: dict,
            prefill_tokens: int = PREFILL_TOKENS):
    """(last-position logits, KV cache, attention mask, prompt index of each row) after reading every prompt."""
    from transformers import DynamicCache

    shared = shared_opening(prompts)
    opening = _forward_opening(model, prompts[0][:shared], device) if shared else None
    groups = length_groups([len(p) - shared for p in prompts], prefill_tokens)
    width = max(len(p) for p in prompts)
    logits, layers, masks = [], [], []
    for group in groups:
        rests = [prompts[i][shared:] for i in group]
        ids, rest_mask = left_padded(rests, pad_id, device)
        cache = DynamicCache(config=model.config)
        if opening is not None:
            for i, layer in enumerate(opening.layers):
                cache.update(layer.keys.expand(len(group), -1, -1, -1), layer.values.expand(len(group), -1, -1, -1), i)
        mask = torch.cat([rest_mask.new_ones(len(group), shared), rest_mask], dim=1)
        position = shared + (rest_mask.cumsum(-1) - 1).clamp(min=0)
        logits.append(model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                            use_cache=True, cache_position=torch.arange(shared, mask.shape[1], device=device),
                            **last_only).logits[:, -1:])
        gap = width - mask.shape[1]  # padding between the opening and the rest, up to the longest prompt
        layers.append([(_widen(layer.keys, shared, gap), _widen(layer.values, shared, gap)) for layer in cache.layers])
        masks.append(_widen(mask, shared, gap))
    cache = DynamicCache(config=model.config)
    for i in range(len(layers[0])):
        cache.update(torch.cat([g[i][0] for g in layers]), torch.cat([g[i][1] for g in layers]), i)
    rows = torch.tensor([i for group in groups for i in group], device=device)
    return torch.cat(logits), cache, torch.cat(masks), rows


def shared_opening(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one token of its own."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for k in range(max(n, 0)):
        if any(p[k] != first[k] for p in prompts):
            return k
    return max(n, 0)


def length_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices sorted by length, cut into groups whose padded size (rows x longest) stays within `budget`
    (a group holds at least one row)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _forward_opening(model, opening: list[int], device):
    """The KV cache of the prompts' shared opening, read once (one row)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([opening], device=device), past_key_values=cache, use_cache=True,
          **last_logits_only(model))
    return cache


def _widen(t: torch.Tensor, shared: int, gap: int) -> torch.Tensor:
    """Insert `gap` zero positions after the first `shared` ones (dim -2 of keys and values, -1 of a mask)."""
    if gap == 0:
        return t
    dim = -1 if t.dim() == 2 else -2
    shape = list(t.shape)
    shape[dim] = gap
    return torch.cat([t.narrow(dim, 0, shared), t.new_zeros(shape), t.narrow(dim, shared, t.shape[dim] - shared)], dim=dim)


def last_logits_only(model) -> dict:
    """Ask for the last position's logits only, where the model's forward takes `logits_to_keep` (as generate does)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
