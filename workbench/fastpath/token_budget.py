"""The token budget of a GPU micro-batch: how many tokens one forward and backward of the fast path carries.

On a GPU the rows of an optimizer step are laid end to end into flat micro-batches
(`packing.collate_flat`) of at most `micro_batch_tokens` tokens; null sizes them from
the free GPU memory after the model is built (`run_budget`, said once by the training
loop), at what a token costs at the peak of a step (`token_bytes`), in two parts:

* what the decoder's layers keep for the backward, which grows with layers x hidden
  size (measured on an H200), or, under gradient checkpointing, their inputs and one
  layer's recomputation; more for float32 master weights under autocast, whose
  residual stream stays float32;
* what its logits cost the loss, which grows with the vocabulary and with the share of
  the data's positions the loss takes logits at (trained, marked for the unlikelihood
  term) and compares with the base at (distilled): `packing.logit_shares` of the run's
  rows. Measured on the loss itself (tests/test_gpu_budget.py). Liger's fused linear
  cross-entropy never holds the logits: none then.

Gradient checkpointing is switched on only when not even one row of max_length fits
without it; the training loop then turns Liger's fused loss on where it applies.
"""
from __future__ import annotations

import torch

from workbench.fastpath.cuda import can_fuse_loss, compute_dtype, uses_liger_loss
from workbench.packing import logit_shares

# The logits are counted apart from the layers because they grow with the vocabulary and the data, not with layers x
# hidden size: at a smaller model's shape (Qwen2.5-0.5B: 4.6x the vocabulary per layer and hidden unit of 1.5B's) or
# under gradient checkpointing they are most of a token's cost.
# The loss's part, per position the loss takes logits at and vocabulary entry, at the peak of the step (measured on a
# CPU with a bfloat16 model, this loss on a flat micro-batch as a GPU runs it: tests/test_gpu_budget.py): the bf16
# logits' float32 copy, its log-softmax and their gradients, 12 bytes; where the distillation compares with the base
# (its logits, both log-softmaxes, the KL's terms and gradients), 24 bytes more (the two within 7% of the measured
# peak of micro-batches with few, some and all of their positions distilled). Liger's fused linear cross-entropy
# keeps a chunk of logits at a time (about 6 x hidden bytes a position): counted as none.
LOGIT_BYTES = 12
DISTILL_LOGIT_BYTES = 24
# The layers' part, per token, layer and hidden unit at the compute dtype. Measured on an H200 (2026-12-04):
# Qwen2.5-1.5B's shape (28 layers, hidden 1536, vocabulary 151,936), LoRA all-linear, bf16, 16k tokens in one
# micro-batch, the loss through logits at 65.5% of the positions (`make bench-gpu`'s data): 52 floats all told, of
# which the logits were 12 x 151,936 x 0.655 bytes a token, 13.8 floats.
CUDA_ACTIVATION_FLOATS = 52
MEASURED_KEPT_SHARE = 0.655  # packing.logit_shares of that data (the mixed recipe, the embedded tokenizer)
CUDA_LAYER_FLOATS = round(CUDA_ACTIVATION_FLOATS - LOGIT_BYTES * 151936 * MEASURED_KEPT_SHARE / (28 * 1536 * 2))  # 38
CHECKPOINTED_FLOATS = 8  # under gradient checkpointing: layer inputs plus one layer's recomputation (7B QLoRA, fused loss: 5.5)
# Float32 master weights computing under autocast (a full fine-tune in half precision, `models.master_weights`) keep
# more for the backward than pure half precision: the residual stream and the norms' outputs stay float32 (the
# embeddings and norm weights are), only the matrix products' inputs are cast. Measured on this CPU with saved-tensor
# hooks (full fine-tuning, bfloat16): SmolLM2-135M's layer shape, 44.4 bytes a token, layer and hidden unit in pure
# bfloat16 and 55.0 with float32 weights under bfloat16 autocast; the tiny test model's, 42.0 and 53.5
# (tests/test_gpu_budget.py). 12 bytes more, added to the layers' part. Under gradient checkpointing the layers' kept
# inputs are float32: 2 bytes more each, and one layer's recomputation 12.
MASTER_EXTRA_BYTES = 12
MAX_BUDGET_TOKENS = 65536


def run_budget(model, cfg, device: torch.device, rows: list, wrapped: bool = False) -> tuple[int, bool]:
    """`budget_tokens` for a run: its config's max_length, micro_batch_tokens, gradient checkpointing and loss terms,
    and its rows' shares of positions with logits (`packing.logit_shares`). `wrapped`: the model trains inside a
    wrapper (DDP, DeepSpeed, FSDP), whose forward the fused loss cannot go around (`fastpath_cuda.can_call_decoder`)."""
    kept, distilled = logit_shares(rows)
    extra_terms = cfg.extra_loss_terms or wrapped  # the loss goes through the logits whatever Liger offers
    return budget_tokens(model, cfg.max_length, device, cfg.micro_batch_tokens, cfg.gradient_checkpointing,
                         (kept, distilled if cfg.distill_weight > 0 else 0.0), extra_terms)


def budget_tokens(model, max_length: int, device: torch.device, requested: int | None,
                  checkpointing: bool = False, shares: tuple[float, float] = (1.0, 0.0),
                  extra_terms: bool = False) -> tuple[int, bool]:
    """(tokens a flat micro-batch may hold, whether gradient checkpointing is needed for one row to fit).

    `requested` (the config's micro_batch_tokens) is taken as it is (at least one row).
    Otherwise the free GPU memory decides, at what a token costs (`token_bytes`): what the
    layers keep for the backward plus its logits' share of the loss (`shares`:
    `packing.logit_shares` of the run's rows; none where the loss is Liger's fused kernel,
    which gradient checkpointing switches on where Liger is applied and no distillation or
    unlikelihood term (`extra_terms`) needs the logits). 80% of the memory left free once the
    gradients and the optimizer's moments are there (`optimizer_bytes`) is used, the rest left
    to the allocator. Checkpointing is asked for only when not even one row of max_length
    fits without it.
    """
    if requested:
        return max(int(requested), max_length), False
    if device.type != "cuda":
        return max_length, False
    pending = optimizer_bytes(model)
    fused = not extra_terms and (uses_liger_loss(model) or checkpointing and can_fuse_loss(model))
    fits = _tokens_that_fit(device, token_bytes(model, checkpointing, shares, fused), pending)
    if fits < max_length and not checkpointing:
        fused = not extra_terms and (uses_liger_loss(model) or can_fuse_loss(model))
        fits = _tokens_that_fit(device, token_bytes(model, True, shares, fused), pending)
        return max(max_length, min(MAX_BUDGET_TOKENS, fits)), True
    return max(max_length, min(MAX_BUDGET_TOKENS, fits)), False


def optimizer_bytes(model) -> int:
    """What the trained weights will hold once training starts and does not hold yet: a gradient and AdamW's two
    moments each, at the weight's dtype (the fused AdamW's), and a float32 weight computing in half precision its
    autocast copy, kept for the backward. Small for LoRA; for full fine-tuning three times the weights and more (a 7B
    model: 46 GB that free memory still shows before the first step in pure bf16, 107 GB with float32 master weights)."""
    half = 2 if compute_dtype(model).itemsize == 2 else 0
    return sum(p.numel() * (3 * p.element_size() + (half if p.dtype == torch.float32 else 0))
               for p in model.parameters() if p.requires_grad)


def token_bytes(model, checkpointing: bool, shares: tuple[float, float], fused_loss: bool) -> float:
    """The GPU memory a token of a micro-batch costs at the peak of its backward: the layers' share (layers x hidden
    x CUDA_LAYER_FLOATS, or CHECKPOINTED_FLOATS, at the compute dtype) plus, unless the loss is fused, its logits'
    (vocabulary x (LOGIT_BYTES x kept share + DISTILL_LOGIT_BYTES x distilled share)). Without checkpointing never
    below the CUDA_ACTIVATION_FLOATS measured all told: the 7B shape's LoRA runs on the H200 came to 43-49 of them
    (micro-batch sizes inferred from the budget then), with logits a smaller share than 1.5B's."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    dtype_bytes = compute_dtype(model).itemsize  # float32 master weights: autocast's half precision
    return config_token_bytes(cfg, dtype_bytes, checkpointing, shares, fused_loss, master=_has_master_weights(model))


def config_token_bytes(cfg, dtype_bytes: int, checkpointing: bool, shares: tuple[float, float],
                       fused_loss: bool, master: bool = False) -> float:
    """`token_bytes` from a model's config (text part) and its compute dtype's bytes, before the model is built;
    `master`: float32 weights computing in that half precision under autocast (MASTER_EXTRA_BYTES)."""
    layers, hidden = getattr(cfg, "num_hidden_layers", 24), getattr(cfg, "hidden_size", 2048)
    per_float = layers * hidden * dtype_bytes
    kept, distilled = shares
    logits = 0.0 if fused_loss else getattr(cfg, "vocab_size", 32000) * (LOGIT_BYTES * kept + DISTILL_LOGIT_BYTES * distilled)
    if checkpointing:
        extra = (2 * layers + MASTER_EXTRA_BYTES) * hidden if master else 0
        return CHECKPOINTED_FLOATS * per_float + extra + logits
    extra = MASTER_EXTRA_BYTES * layers * hidden if master else 0
    return max(CUDA_ACTIVATION_FLOATS * per_float, CUDA_LAYER_FLOATS * per_float + logits) + extra


def _has_master_weights(model) -> bool:
    """The model's weights are float32 (its first, the embeddings, whose output starts the residual stream; LoRA's
    float32 adapters on a half-precision base are not) and it computes in half precision (`set_compute_dtype`)."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return first is not None and first.dtype == torch.float32 and compute_dtype(model).itemsize == 2


def _tokens_that_fit(device: torch.device, per_token: float, pending: int = 0) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(0.8 * max(free - pending, 0) / per_token)


def group_by_budget(rows_lengths: list[int], budget: int) -> list[list[int]]:
    """Split a step's rows (in order) into groups whose lengths add up to at most `budget` (a longer row alone)."""
    groups: list[list[int]] = []
    used = budget + 1
    for i, n in enumerate(rows_lengths):
        if used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups
