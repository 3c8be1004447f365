"""Training speed-ups that keep the maths: per-conversation attention, fast LoRA dropout and forward, a fused loss.

Found by profiling one training step of the embedded model on a 2-core CPU
(`benchmarks/README.md`, "Where the time goes"). Each is switched on by
`train.build_model` and checked against the plain path by the tests
(`tests/test_fastpath.py`):

* **Packed attention** (`enable_packed_attention`). A packed row holds several
  conversations; transformers' SDPA path then builds a row x row block-diagonal
  mask and computes attention over the whole row, most of it masked away. The
  `workbench_packed_sdpa` attention runs causal SDPA once per conversation
  instead (the segment boundaries come from the restarting position_ids, passed
  as the standard `cu_seq_lens_q` keyword), so the work grows with the sum of
  the squared conversation lengths, not the squared row length, and no mask is
  built; on a CPU grouped key/value heads go to the kernel as they are. Same values
  as the masked path (to float rounding), same gradients.
  Without `cu_seq_lens_q` (generation, evaluation) it is exactly transformers' SDPA.

* **Fast LoRA dropout** (`use_fast_lora_dropout`, `workbench/fastpath/lora_dropout.py`).
  peft draws one Bernoulli number per input element for each LoRA layer's
  dropout; on a CPU that RNG took 13% of a step. `FastDropout` draws only the
  positions it drops (the gaps between them are geometric: about n * p random
  numbers, not n). Inside the lean forward it keeps x and the dropped positions
  for the backward, not the dropped copy (one x is shared by the q, k and v
  adapters); on a GPU it keeps x and a seed, and draws the mask again in the
  backward.

* **Lean LoRA forward** (`use_lean_lora_forward`). peft computes a LoRA layer
  as `base(x) + B(A(dropout(x))) * scaling`: the rank-r product is written
  out, scaled in a second pass and added in a third (and the backward repeats
  the scaling). The lean forward adds the scaled product into the base output
  in place, inside one `addmm_`. Same sum, fewer passes over the (tokens x out_features)
  activations. Only for the plain case (one active adapter, no DoRA or other
  variant, not merged, float base layer, one dtype, or float32 adapters under
  autocast to the base's half precision: a GPU's LoRA, computed in that half
  precision as autocast would, without peft's float32 copy of the input); anything
  else keeps peft's forward. On a GPU also for QLoRA's 4-bit base layers (`four_bit`):
  there peft copies the base output before adding to it and keeps a dropout mask and
  a dropped copy of x per adapter; the CPU's QLoRA keeps peft's forward.

* **Fused loss** (`cross_entropy_sum`, used by `loss.token_loss_sum` when
  `use_fused_loss` marked the model). torch's cross-entropy writes the
  log-softmax of the (tokens x vocabulary) logits, a zero gradient of the same
  size and the log-softmax gradient: three more such matrices per step. The fused
  loss keeps only each row's log-sum-exp, and its backward turns the logits,
  which nothing else needs any more, into the gradient in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.fastpath.lora_dropout import FastDropout, use_fast_lora_dropout  # noqa: F401 (part of the fast path)

PACKED_ATTENTION = "workbench_packed_sdpa"
VARLEN_ATTENTION = "workbench_varlen"  # the CUDA path's (workbench/fastpath/cuda.py)


# ---------------------------------------------------------------------------
# Packed attention
# ---------------------------------------------------------------------------
def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """Causal SDPA per conversation of a packed batch; transformers' SDPA when no boundaries are given.

    query: (batch, heads, length, head_dim); key, value: (batch, kv_heads, length, head_dim).
    cu_seq_lens_q: cumulative segment starts over the flattened batch (batch * length),
    as flash-attention's varlen API takes them. Returns (batch, length, heads, head_dim).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    grouped = groups > 1 and query.device.type == "cpu"  # the CPU's flash kernel takes grouped heads as they are
    if groups > 1 and not grouped:  # elsewhere enable_gqa may fall back to the math kernel (pre-Ampere GPUs)
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    rows = []
    for q, k, v, lengths in zip(query.split(1), key.split(1), value.split(1), _segment_lengths(cu_seq_lens_q, query)):
        # split, not slicing: its backward is one concatenation, where each slice's backward writes a zero tensor of
        # the whole row and adds it (SmolLM2-135M's heads, 50 conversations in 2,048 tokens: 127 ms a layer's forward
        # and backward with slices and repeated key/value heads, 26 ms with split and grouped heads; 4 in 518: 8.4, 6.7)
        rows.append(torch.cat([F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True,
                                                              scale=scaling, enable_gqa=grouped)
                               for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))],
                              dim=2))
    out = torch.cat(rows) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _segment_lengths(cu_seq_lens: torch.Tensor, query: torch.Tensor) -> list[list[int]]:
    """Each row's segment lengths, from the cumulative starts over the flattened batch (no segment crosses a row)."""
    length = query.shape[2]
    bounds = cu_seq_lens.tolist()
    rows: list[list[int]] = [[] for _ in range(query.shape[0])]
    for start, end in zip(bounds[:-1], bounds[1:]):
        row = start // length
        if (end - 1) // length != row:
            raise ValueError(f"a packed segment [{start}, {end}) crosses a row of {length} positions")
        rows[row].append(end - start)
    return rows


def register_packed_attention() -> None:
    """Make `workbench_packed_sdpa` a transformers attention implementation (with SDPA's mask for the fallback)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)


def enable_packed_attention(model) -> bool:
    """Switch a transformers model that uses SDPA to per-conversation attention; False where it cannot.

    Models with their own attention code (trust_remote_code) or another implementation
    (eager, flash-attention) keep theirs and the masked path.
    """
    base = _transformers_model(model)
    if base is None or getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    if not getattr(base, "_supports_attention_backend", False):
        return False
    register_packed_attention()
    base.set_attn_implementation(PACKED_ATTENTION)
    return True


def keeps_conversations_apart(model) -> bool:
    """True for transformers' own model classes: their masks follow the restarting position_ids of a packed row.

    A model with its own (remote) code builds its own causal mask over the whole row, so packed
    conversations would attend to each other: the trainer then puts one conversation in a row.
    """
    from transformers import PreTrainedModel

    models = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    return bool(models) and all(type(m).__module__.startswith("transformers.") for m in models)


def disable_packed_attention(model) -> None:
    """Back to SDPA (before a model is saved, so its config names a standard implementation)."""
    base = _transformers_model(model)
    if base is not None and getattr(base.config, "_attn_implementation", None) in (PACKED_ATTENTION, VARLEN_ATTENTION):
        base.set_attn_implementation("sdpa")


def uses_packed_attention(model) -> bool:
    base = _transformers_model(model)
    return base is not None and getattr(base.config, "_attn_implementation", None) == PACKED_ATTENTION


def packed_kwargs(position_ids: torch.Tensor) -> dict:
    """The segment boundaries of a packed batch (positions restart at 0 at every conversation and at the padding)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(1)
    end = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, end]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _transformers_model(model):
    """The innermost transformers PreTrainedModel of a (peft-wrapped, accelerate-wrapped) model, or None."""
    from transformers import PreTrainedModel

    seen = model
    for _ in range(6):
        if isinstance(seen, PreTrainedModel) and type(seen).__module__.startswith("transformers."):
            return seen
        nxt = getattr(seen, "module", None) or getattr(seen, "base_model", None)
        if nxt is None or nxt is seen:
            nxt = getattr(seen, "model", None)
        if nxt is None or nxt is seen:
            return None
        seen = nxt
    return None


# ---------------------------------------------------------------------------
# Lean LoRA forward
# ---------------------------------------------------------------------------
def lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """base(x) + scaling * B(A(dropout(x))), the last product added in place by one addmm_ (else peft's forward)."""
    adapters = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1 or adapters[0] in self.lora_variant \
            or adapters[0] not in self.lora_A:
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    four_bit = type(base) is not nn.Linear  # bitsandbytes' Linear4bit (use_lean_lora_forward(four_bit=True))
    if x.dtype != (base.compute_dtype if four_bit else base.weight.dtype) or base.weight.numel() == 0:  # 0: ZeRO-3 shard
        return type(self).forward(self, x, *args, **kwargs)
    if not a.dtype == b.dtype == x.dtype:
        if not _autocast_to(x):
            return type(self).forward(self, x, *args, **kwargs)
        # float32 adapters under autocast (a GPU's LoRA): computed in x's half precision, as autocast would, without
        # peft's float32 copy of x and the half copy autocast makes of it again for every adapter
        a, b = a.to(x.dtype), b.to(x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    # 2-D: adding in place to a view would cost autograd two copies. A 4-bit base's output is a new tensor (bitsandbytes'
    # matmul, in x's dtype), so peft's defensive copy of it before adding is not needed either.
    out = base(flat) if four_bit else F.linear(flat, base.weight, base.bias)
    drop = self.lora_dropout[name]
    xa = drop.linear(flat, a) if isinstance(drop, FastDropout) else F.linear(drop(flat), a)
    return out.addmm_(xa, b.t(), alpha=self.scaling[name]).view(*x.shape[:-1], out.shape[-1])


def _autocast_to(x: torch.Tensor) -> bool:
    """Autocast is on for x's device and casts to x's dtype."""
    kind = x.device.type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == x.dtype


def use_lean_lora_forward(model, four_bit: bool = False) -> int:
    """Give every plain peft LoRA Linear (float nn.Linear base; with four_bit, also QLoRA's bitsandbytes Linear4bit
    base: the GPU's way) the lean forward; the number changed."""
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear

    kinds = {(LoraLinear, nn.Linear)} | (_four_bit_kinds() if four_bit else set())
    changed = 0
    for module in model.modules():
        if (type(module), type(getattr(module, "base_layer", None))) in kinds \
                and not getattr(module, "fan_in_fan_out", False) \
                and not getattr(module, "lora_bias", {}).get(module.active_adapters[0], False):
            module.forward = types.MethodType(lean_lora_forward, module)
            changed += 1
    return changed


def _four_bit_kinds() -> set:
    """(peft's 4-bit LoRA layer, bitsandbytes' Linear4bit), where both are installed."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return set()
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as lora_bnb

    return {(lora_bnb.Linear4bit, bnb.nn.Linear4bit)} if hasattr(lora_bnb, "Linear4bit") else set()


def use_peft_lora_forward(model) -> None:
    """Undo use_lean_lora_forward (peft's own forward again)."""
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) is lean_lora_forward:
            del module.forward


# ---------------------------------------------------------------------------
# Fused loss
# ---------------------------------------------------------------------------
_FUSED_LOSS = "_wb_fused_loss"
_ROWS_PER_CHUNK = 16  # rows of logits per pass: a 16 x 49k float32 chunk stays in cache


def use_fused_loss(model) -> bool:
    """Mark a transformers model's loss for `cross_entropy_sum`; False where its logits are not the head's output.

    Models that transform the logits after the head and keep the result for their
    own backward (Gemma's soft-capping) must keep torch's loss: the fused backward
    overwrites the logits.
    """
    base = _transformers_model(model)
    if base is None:
        return False
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if getattr(config, "final_logit_softcapping", None):
        return False
    setattr(base, _FUSED_LOSS, True)
    return True


def stop_fused_loss(model) -> None:
    """Back to torch's cross-entropy (undo use_fused_loss)."""
    base = _transformers_model(model)
    if base is not None and hasattr(base, _FUSED_LOSS):
        delattr(base, _FUSED_LOSS)


def uses_fused_loss(model) -> bool:
    base = _transformers_model(model)
    return bool(getattr(base, _FUSED_LOSS, False))


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed cross-entropy of (N, V) float logits against (N,) targets; rows whose target is ignore_index count 0.

    Equal to `F.cross_entropy(logits, targets, ignore_index=..., reduction="sum")`,
    and so is its gradient, but the backward overwrites `logits` with it: call it
    only on logits that nothing else keeps for a backward.
    """
    return _CrossEntropySum.apply(logits, targets, ignore_index)


class _CrossEntropySum(torch.autograd.Function):
    """See cross_entropy_sum: saves the logits and each row's log-sum-exp; the backward reuses the logits' memory."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        valid = targets != ignore_index
        picked = targets.clamp(min=0)
        lse = _logsumexp_rows(logits)
        loss = ((lse - logits.gather(1, picked[:, None]).squeeze(1)) * valid).sum()
        ctx.save_for_backward(logits, picked, valid, lse)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, picked, valid, lse = ctx.saved_tensors
        scale = grad * valid.to(logits.dtype)
        for start in range(0, logits.shape[0], _ROWS_PER_CHUNK):  # softmax x grad, in place, a chunk at a time
            rows = slice(start, start + _ROWS_PER_CHUNK)
            logits[rows].sub_(lse[rows, None]).exp_().mul_(scale[rows, None])
        logits.scatter_add_(1, picked[:, None], -scale[:, None])
        return logits, None, None


def _logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of a 2-D tensor, a cache-sized chunk of rows at a time (no full-size temporary)."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    work = torch.empty((min(_ROWS_PER_CHUNK, x.shape[0]), x.shape[1]), dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], _ROWS_PER_CHUNK):
        chunk = x[start:start + _ROWS_PER_CHUNK]
        top = chunk.amax(1, keepdim=True).clamp_(min=torch.finfo(x.dtype).min)  # rows of -inf stay finite
        shifted = torch.sub(chunk, top, out=work[:chunk.shape[0]])
        out[start:start + chunk.shape[0]] = shifted.exp_().sum(1).log_().add_(top.squeeze(1))
    return out
