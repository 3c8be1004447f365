"""The CUDA training fast path: packed micro-batches through a varlen flash kernel, Liger's fused kernels.

`workbench/fastpath/cpu.py` is the CPU's fast path (tuned on a 2-core CPU); this is the
GPU's, beside it. `models.with_fast_path` picks one by the device the model is on,
behind the one `fast_path` switch of the config. What a GPU step needs differs from
a CPU step: a GPU step is bound by kernel launches and host synchronisations unless
it carries tens of thousands of tokens in few kernels, so:

* **Varlen flash attention** (`enable_varlen_attention`). A micro-batch is one flat
  row: every conversation of every packed row laid end to end, no padding
  (`packing.collate_flat`), with the conversation boundaries (`cu_seq_lens`) and the
  longest conversation computed on the host while the batch is built. One call of
  PyTorch's own varlen flash kernel (`torch.nn.attention.varlen.varlen_attn`, torch >=
  2.10; `varlen_kernel.py` beside this) per layer attends within each conversation,
  causally; no mask is built (the implementation has no mask function, so transformers
  skips mask creation), no
  Python loop over conversations, no `.item()` or `.tolist()` inside the forward or
  backward. Without boundaries (generation) it is transformers' SDPA, and evaluation
  switches the model to SDPA for its masks (`standard_attention`).

* **Liger Kernel** (`use_liger`, optional: `requirements-gpu.txt`). Triton kernels of
  a maintained library instead of hand-written ones: RMSNorm and the SwiGLU MLP patched
  on this model's modules only (the library's own `apply_liger_kernel_to_*` also
  replaces the classes globally, which would break CPU models built later in the same
  process), RoPE through a wrapper that uses Liger's kernel for CUDA tensors and the
  model's own function otherwise, and the fused linear cross-entropy
  (`fused_linear_loss_sum`) that never materialises the (tokens x vocabulary) logits,
  used only with gradient checkpointing: it saves memory, and on an H200 cost 1.4x the
  step time (logits at the trained positions only are what the loss computes otherwise;
  that run's decoder, called directly, ran outside accelerate's autocast: LoRA took peft's
  float32 path. The training loop now puts the whole loss under autocast; unmeasured).
  LoRA layers inside the patched MLP keep working: Liger's SwiGLU forward calls the
  module's (peft-wrapped) projections.

* **Token budget** (`micro_batch_tokens`, `workbench/fastpath/token_budget.py`). The rows of an
  optimizer step are grouped into flat micro-batches of at most that many tokens (null:
  sized from the free GPU memory after the model is built), so a step runs as few
  forwards as memory allows whatever `batch_size` says; the loss is still divided by the
  trained tokens of the whole step, so the maths is the step's, not the micro-batch's.

* **torch.compile, opt-in** (`torch_compile`, `compile_decoder_layers`). Each decoder
  layer's training forward is compiled (regional compilation: the layers share one
  code object, so it is compiled once, with dynamic shapes, and reused); calls without
  varlen boundaries (generation, evaluation) run the layer uncompiled. Kept off by
  default until `make bench-gpu` shows it faster (its side "workbench + torch.compile").
  CUDA graphs are not used: every micro-batch has its own length and boundaries, and a
  graph per shape would be captured for one use.

Fused AdamW on CUDA is chosen in `optimizer.adamw`; gradient checkpointing stays
the config's choice (off by default: it pays only when the budget would otherwise fall
below one row of max_length, and `token_budget.budget_tokens` says so).
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from contextlib import contextmanager

import torch

from workbench.fastpath import varlen_kernel
from workbench.fastpath.cpu import VARLEN_ATTENTION, _transformers_model

LIGER_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "smollm3")  # standard RMSNorm + SwiGLU (silu) MLPs
_LIGER_FLAG = "_wb_liger_loss"


# ---------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------
def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


# ---------------------------------------------------------------------------
# Varlen attention
# ---------------------------------------------------------------------------
def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, kernel=None, **kwargs):
    """Causal attention within each conversation of a packed batch, one kernel call for all of them.

    query: (batch, heads, length, head_dim); key, value: (batch, kv_heads, length, head_dim);
    cu_seq_lens_q: int32 conversation starts over the flattened batch plus the end, on
    the device (the training batch is one flat row); max_length_q: the longest
    conversation (a host int). Returns (batch, length, heads, head_dim).
    Without boundaries (generation, evaluation) this is transformers' SDPA. `kernel`: `varlen_kernel.attention_call()`,
    resolved when the attention is switched on (inside torch.compile a call through its cache would be traced again).
    """
    if cu_seq_lens_q is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, length = query.shape[0], query.shape[2]
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = (kernel or varlen_kernel.attention_call())(q, k, v, cu_seq_lens_q, int(max_length_q), scaling)  # tokens, heads, dim
    return out.view(batch, length, out.shape[1], out.shape[2]).to(query.dtype), None


def enable_varlen_attention(model) -> bool:
    """Switch a transformers model (SDPA, standard attention interface) to `workbench_varlen`; False where it cannot.

    Registered without a mask function: transformers then builds no mask at all.
    """
    from transformers import AttentionInterface

    base = _transformers_model(model)
    if base is None or getattr(base.config, "_attn_implementation", None) != "sdpa" \
            or not getattr(base, "_supports_attention_backend", False) or not varlen_kernel.available() \
            or not (compute_dtype(model) in (torch.bfloat16, torch.float16) or _is_4bit(base)):  # the kernel's dtypes
        return False
    AttentionInterface.register(VARLEN_ATTENTION, functools.partial(varlen_attention, kernel=varlen_kernel.attention_call()))
    base.set_attn_implementation(VARLEN_ATTENTION)
    if _grouped_heads(base.config):
        varlen_kernel.kernel_takes_gqa(next(base.parameters()).device)  # found here once, never inside a forward
    return True


def _grouped_heads(config) -> bool:
    heads = getattr(config, "num_attention_heads", None)
    return heads is not None and getattr(config, "num_key_value_heads", heads) != heads


def _is_4bit(base) -> bool:
    """QLoRA: a 4-bit base computing in half precision; under float16 its norms are float32 (peft's k-bit preparation,
    models.build_model) and the varlen kernel gets its inputs cast to half precision."""
    quant = getattr(base.config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else (quant or {})
    return bool(quant.get("load_in_4bit")) and str(quant.get("bnb_4bit_compute_dtype", "")).endswith(("bfloat16", "float16"))


def set_compute_dtype(model, dtype: torch.dtype) -> None:
    """The precision the model computes in, where it is not its weights' (float32 master weights under autocast)."""
    (_causal_lm(model) or model)._wb_compute_dtype = dtype


def compute_dtype(model) -> torch.dtype:
    """What `set_compute_dtype` said, else the dtype of the model's first floating-point weight."""
    lm = _causal_lm(model) if isinstance(model, torch.nn.Module) else None  # through peft's and DDP's wrappers
    given = getattr(lm or model, "_wb_compute_dtype", None)
    return given or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def uses_varlen_attention(model) -> bool:
    base = _transformers_model(model)
    return base is not None and getattr(base.config, "_attn_implementation", None) == VARLEN_ATTENTION


@contextmanager
def standard_attention(model):
    """SDPA (with transformers' masks) for the time of a generation, then varlen again."""
    base = _transformers_model(model)
    if base is None or not uses_varlen_attention(model):
        yield model
        return
    base.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        base.set_attn_implementation(VARLEN_ATTENTION)


def flat_kwargs(batch: dict) -> dict:
    """The varlen keywords of a flat batch made by `packing.collate_flat` (boundaries already on the device)."""
    cu = batch["cu_seq_lens"]
    longest = batch["max_length"]
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


# ---------------------------------------------------------------------------
# Liger Kernel
# ---------------------------------------------------------------------------
def use_liger(model, fused_loss: bool = True) -> list[str]:
    """Liger's RMSNorm, SwiGLU, RoPE and (fused_loss) fused linear cross-entropy on this model; what was applied.

    The fused loss saves the logits' memory, not time: on an H200 (Qwen2.5-1.5B shape, 16k
    tokens a step) it made a step 1.4x slower for 2.2 GB less peak memory, so the fast path
    asks for it only where memory is what counts (gradient checkpointing on, `models.with_fast_path`).
    """
    base = _transformers_model(model)
    if base is None or not liger_available() or getattr(base.config, "model_type", None) not in LIGER_MODEL_TYPES \
            or getattr(base.config, "hidden_act", "silu") not in ("silu", "swish"):
        return []
    from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module, _patch_swiglu_module
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    applied = []
    norms = [m for name, m in base.named_modules() if type(m).__name__.endswith("RMSNorm")]
    for norm in norms:
        _patch_rms_norm_module(norm, eps=getattr(norm, "variance_epsilon", 1e-6))
    if norms:
        applied.append("rms_norm")
    mlps = [m for name, m in base.named_modules() if name.endswith(".mlp") and all(
        hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj"))]
    for mlp in mlps:
        _patch_swiglu_module(mlp, LigerSwiGLUMLP)
    if mlps:
        applied.append("swiglu")
    if _patch_rope(type(base).__module__):
        applied.append("rope")
    if fused_loss and set_liger_loss(model, True):
        applied.append("fused_linear_cross_entropy")
    base._wb_liger = tuple(applied)
    return applied


def describe(model) -> str:
    """What the GPU fast path runs on this model, in a few words for the training log."""
    liger = [k for k in liger_applied(model) if k != "fused_linear_cross_entropy"]
    liger += ["fused_linear_cross_entropy"] if uses_liger_loss(model) else []
    return ", ".join(["varlen flash attention"] + ([f"Liger ({', '.join(liger)})"] if liger else [])
                     + (["torch.compile"] if uses_compiled_layers(model) else []))


def liger_applied(model) -> tuple[str, ...]:
    """What `use_liger` applied to this model (() if it did not run or found nothing to patch)."""
    base = _transformers_model(model)
    return getattr(base, "_wb_liger", ())


def _causal_lm(model):
    """The transformers model with the output head inside a (peft-, accelerate-wrapped) model, or None.

    (`fastpath._transformers_model` may stop at the decoder: peft forwards `base_model` to the
    causal LM, whose `base_model` is its decoder.)
    """
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and type(module).__module__.startswith("transformers.") \
                and module.get_output_embeddings() is not None:
            return module
    return None


def _patch_rope(module_name: str) -> bool:
    """The modeling module's `apply_rotary_pos_emb` -> Liger's for CUDA tensors, the original otherwise."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    mod = sys.modules.get(module_name)
    original = getattr(mod, "apply_rotary_pos_emb", None)
    if original is None:
        return False
    if getattr(original, "_wb_liger", False):
        return True

    # Process-wide, so it dispatches by device: a CPU model built later keeps the model's own RoPE.
    @functools.wraps(original)
    def rope(q, k, cos, sin, *args, **kwargs):
        if q.is_cuda and not args and set(kwargs) <= {"unsqueeze_dim", "position_ids"}:
            return liger_rotary_pos_emb(q, k, cos, sin, **kwargs)
        return original(q, k, cos, sin, *args, **kwargs)

    rope._wb_liger = True
    mod.apply_rotary_pos_emb = rope
    return True


def _head_is_plain(base) -> bool:
    """The output head is a plain float Linear (no LoRA on it, no bias, no logit soft-capping)."""
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return type(head) is torch.nn.Linear and head.bias is None and not getattr(config, "final_logit_softcapping", None)


def set_liger_loss(model, on: bool) -> bool:
    """The loss through Liger's fused linear cross-entropy (on) or through logits at the trained positions (off);
    whether it is now on (never for a head that is not a plain Linear)."""
    lm = _causal_lm(model)
    if lm is None:
        return False
    if on and _head_is_plain(lm):
        setattr(lm, _LIGER_FLAG, True)
    elif hasattr(lm, _LIGER_FLAG):
        delattr(lm, _LIGER_FLAG)
    return uses_liger_loss(model)


def uses_liger_loss(model) -> bool:
    lm = _causal_lm(model) if isinstance(model, torch.nn.Module) else None
    return bool(getattr(lm, _LIGER_FLAG, False))


def can_fuse_loss(model) -> bool:
    """Liger is applied to this model and its head is a plain Linear: `set_liger_loss(model, True)` would take."""
    lm = _causal_lm(model)
    return bool(liger_applied(model)) and lm is not None and _head_is_plain(lm)


def _fused_linear_cross_entropy():
    """Liger's fused linear cross-entropy (a seam: the CPU tests put a reference in its place)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy


def fused_linear_loss_sum(model, batch: dict, keep: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                          extra: dict) -> torch.Tensor:
    """Summed cross-entropy of the head over the hidden states at `keep`, by Liger's fused kernel (no logits kept).

    The decoder is called directly (the head is a plain Linear with no adapter); the
    model must not be wrapped by DDP or DeepSpeed (see `can_call_decoder`).
    """
    lm = _causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     **extra).last_hidden_state
    hidden = hidden[:, keep].reshape(-1, hidden.shape[-1])
    head = lm.get_output_embeddings()
    return _fused_linear_cross_entropy()(hidden.to(head.weight.dtype), head.weight, targets.reshape(-1),
                                         ignore_index=ignore_index, reduction="sum").float()


def can_call_decoder(model) -> bool:
    """No DDP / DeepSpeed / FSDP wrapper whose forward must run (their hooks synchronise gradients)."""
    return not hasattr(model, "module")


# ---------------------------------------------------------------------------
# torch.compile of the decoder layers
# ---------------------------------------------------------------------------
_COMPILED = "_wb_compiled_forward"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers (the `layers` ModuleList of the transformers decoder), [] where there is none."""
    lm = _causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix, None) if lm is not None else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def compile_decoder_layers(model, backend: str = "inductor") -> int:
    """torch.compile every decoder layer's forward on the varlen training path; the number of layers changed.

    A layer's forward is swapped for a dispatcher: calls that carry varlen boundaries
    (`cu_seq_lens_q`, training micro-batches) go to `torch.compile(layer.forward,
    dynamic=True)`, the others (generation with a KV cache, evaluation) to the layer's
    own forward, so that no generation shape is ever compiled. Dynamo compiles the
    shared code once and guards on the layer's structure, not its identity, so the
    other layers reuse it. `backend` "aot_eager" checks the plumbing without a compiler.
    """
    changed = 0
    for layer in decoder_layers(model):
        if _COMPILED in vars(layer):
            continue
        original = layer.forward
        compiled = torch.compile(original, backend=backend, dynamic=True)

        def forward(*args, _original=original, _compiled=compiled, **kwargs):
            return (_compiled if kwargs.get("cu_seq_lens_q") is not None else _original)(*args, **kwargs)

        layer.forward = forward
        setattr(layer, _COMPILED, compiled)
        changed += 1
    return changed


def uses_compiled_layers(model) -> bool:
    return any(_COMPILED in vars(layer) for layer in decoder_layers(model))
