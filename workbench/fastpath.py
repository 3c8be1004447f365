"""Training speed-ups that keep the maths: attention per packed conversation, and a faster LoRA dropout.

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
  built. Same values as the masked path (to float rounding), same gradients.
  Without `cu_seq_lens_q` (generation, evaluation) it is exactly transformers' SDPA.

* **Fast LoRA dropout** (`use_fast_lora_dropout`). peft draws one Bernoulli
  number per input element for each LoRA layer's dropout; on a CPU that RNG
  took 13% of a step. `FastDropout` draws one 64-bit random word per four
  elements and compares 15-bit lanes with the threshold: the same inverted
  dropout (each element kept independently, kept values scaled by 1/(1-p)),
  with p rounded to a multiple of 1/32768 (0.05 -> 0.04999). 3-4x faster on
  CPU, and like torch's own dropout it keeps a one-byte mask for the backward.
  On GPUs torch's fused dropout is already fast and is kept.

* **Lean LoRA forward** (`use_lean_lora_forward`). peft computes a LoRA layer
  as `base(x) + B(A(dropout(x))) * scaling`: the rank-r product is written
  out, scaled in a second pass and added in a third (and the backward repeats
  the scaling). The lean forward adds the scaled product into the base output
  inside one `addmm`. Same sum, fewer passes over the (tokens x out_features)
  activations. Only for the plain case (one active adapter, no DoRA or other
  variant, not merged, float base layer, one dtype); anything else keeps
  peft's forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "workbench_packed_sdpa"
_LANE_BITS = 15
_LANES = 1 << _LANE_BITS


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
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    length = query.shape[2]
    rows: list[list[torch.Tensor]] = [[] for _ in range(query.shape[0])]
    bounds = cu_seq_lens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        row, s = divmod(start, length)
        e = s + end - start
        rows[row].append(F.scaled_dot_product_attention(
            query[row:row + 1, :, s:e], key[row:row + 1, :, s:e], value[row:row + 1, :, s:e],
            dropout_p=dropout, is_causal=True, scale=scaling))
    out = torch.cat([torch.cat(parts, dim=2) for parts in rows], dim=0)
    return out.transpose(1, 2).contiguous(), None


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


def disable_packed_attention(model) -> None:
    """Back to SDPA (before a model is saved, so its config names a standard implementation)."""
    base = _transformers_model(model)
    if base is not None and getattr(base.config, "_attn_implementation", None) == PACKED_ATTENTION:
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
# Fast LoRA dropout
# ---------------------------------------------------------------------------
class FastDropout(nn.Module):
    """Inverted dropout with 15-bit random lanes, four per 64-bit random word (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * _LANES)
        self.scale = 1.0 / (1.0 - self.threshold / _LANES)

    @property
    def effective_p(self) -> float:
        return self.threshold / _LANES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()  # [0, 2^63): 63 random bits each
        lanes = words.view(torch.int16)[:n].view(x.shape).bitwise_and_(_LANES - 1)
        return _KeepAndScale.apply(x, lanes >= self.threshold, self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p} (effective {self.effective_p:.5f})"


class _KeepAndScale(torch.autograd.Function):
    """x where keep, times scale, else 0; saves only the boolean mask for the backward (1 byte per element)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None, None


def use_fast_lora_dropout(model) -> int:
    """Replace the nn.Dropout of every LoRA layer by FastDropout with the same p; the number replaced."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is nn.Dropout and drop.p > 0:
                drops[name] = FastDropout(drop.p)
                replaced += 1
    return replaced


# ---------------------------------------------------------------------------
# Lean LoRA forward
# ---------------------------------------------------------------------------
def lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """base(x) + scaling * B(A(dropout(x))), the last product added inside one addmm (peft's forward otherwise)."""
    adapters = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1 or adapters[0] in self.lora_variant \
            or adapters[0] not in self.lora_A:
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    if not (x.dtype == a.dtype == b.dtype == base.weight.dtype) or base.weight.numel() == 0:  # 0: a ZeRO-3 shard
        return type(self).forward(self, x, *args, **kwargs)
    out = F.linear(x, base.weight, base.bias)
    xa = F.linear(self.lora_dropout[name](x), a)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t(), alpha=self.scaling[name])
    return flat.view(out.shape)


def use_lean_lora_forward(model) -> int:
    """Give every plain peft LoRA Linear (float nn.Linear base) the lean forward; the number changed."""
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is nn.Linear and not module.fan_in_fan_out \
                and not getattr(module, "lora_bias", {}).get(module.active_adapters[0], False):
            module.forward = types.MethodType(lean_lora_forward, module)
            changed += 1
    return changed


def use_peft_lora_forward(model) -> None:
    """Undo use_lean_lora_forward (peft's own forward again)."""
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) is lean_lora_forward:
            del module.forward
