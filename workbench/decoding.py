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


@torch.inference_mode()
def greedy_batch(model, prompts: list[list[int]], stop_ids: list[int], pad_id: int, max_new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids, the stop token included when one ends it)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, pad_id, device)
    width = ids.shape[1]
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    last_only = last_logits_only(model)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True,
                   cache_position=torch.arange(width, device=device), **last_only).logits
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    rows = torch.arange(len(prompts), device=device)   # which prompt each batch row answers
    position = position[:, -1:]
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


def last_logits_only(model) -> dict:
    """Ask for the last position's logits only, where the model's forward takes `logits_to_keep` (as generate does)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
