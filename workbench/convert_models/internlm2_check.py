"""The check every InternLM2 conversion passes: the converted Llama against an independent reference forward.

`reference_logits` is InternLM2's forward pass written out here in plain torch from the model's
published description (no transformers, no remote code): RMSNorm, rotary embeddings
(rotate-half), grouped-query attention whose fused `wqkv` rows are laid out per key-value group
as [q_1 .. q_g, k, v], a SiLU-gated MLP `w2(silu(w1 x) * w3 x)`, the final norm and `output`.
It reads the ORIGINAL tensors; `check_conversion` runs the converted folder's weights through
transformers' `LlamaForCausalLM` on the same ids and refuses the conversion when the logits
differ by more than a float32 tolerance.

For a big model only the first `layers` layers are compared (both sides truncated the same way,
the final norm and output head applied): every layer is converted by the same code, so two
layers show a wrong split, name, norm or rotary setting as well as all of them would, in seconds
and about the embedding's memory.
"""
from __future__ import annotations

import math

import torch

from workbench.convert_models import ConversionError

TOLERANCE = 1e-4  # float32 forward of the same weights in two implementations: differences ~1e-6 of the logits' scale


class ConversionCheckError(ConversionError):
    """The converted model does not compute what the original weights compute."""


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_logits(tensors, config: dict, ids: list[int], layers: int) -> torch.Tensor:
    """Logits (positions x vocab) of InternLM2 on `ids`, float32, using the first `layers` layers.

    `tensors(name)` returns an original tensor by its InternLM2 name.
    """
    h = config["hidden_size"]
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    d, groups, eps = h // n_heads, n_heads // n_kv, config["rms_norm_eps"]
    t = len(ids)

    def w(name):
        return tensors(name).to(torch.float32)

    x = w("model.tok_embeddings.weight")[torch.tensor(ids)]
    inv_freq = 1.0 / (float(config.get("rope_theta", 10000)) ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    scaling = config.get("rope_scaling") or {}
    linear = float(scaling.get("factor", 1.0)) if scaling.get("type", scaling.get("rope_type")) == "linear" else 1.0
    # (dynamic NTK scaling changes nothing below max_position_embeddings, far beyond the check's positions)
    angles = torch.outer(torch.arange(t, dtype=torch.float32) / linear, inv_freq)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    causal = torch.full((t, t), float("-inf")).triu(1)
    for i in range(layers):
        p = f"model.layers.{i}."
        y = _rms_norm(x, w(p + "attention_norm.weight"), eps)
        qkv = y @ w(p + "attention.wqkv.weight").T
        if config.get("bias"):
            qkv = qkv + w(p + "attention.wqkv.bias")
        qkv = qkv.view(t, n_kv, groups + 2, d)  # per key-value group: `groups` query heads, then its key, then its value
        q = qkv[:, :, :groups].reshape(t, n_heads, d).transpose(0, 1)  # query head j uses key-value group j // groups
        k = qkv[:, :, groups].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = qkv[:, :, groups + 1].transpose(0, 1).repeat_interleave(groups, dim=0)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + causal, dim=-1)
        out = (att @ v).transpose(0, 1).reshape(t, h) @ w(p + "attention.wo.weight").T
        if config.get("bias"):
            out = out + w(p + "attention.wo.bias")
        x = x + out
        y = _rms_norm(x, w(p + "ffn_norm.weight"), eps)
        gate, up = y @ w(p + "feed_forward.w1.weight").T, y @ w(p + "feed_forward.w3.weight").T
        x = x + (torch.nn.functional.silu(gate) * up) @ w(p + "feed_forward.w2.weight").T
    x = _rms_norm(x, w("model.norm.weight"), eps)
    head = "model.tok_embeddings.weight" if config.get("tie_word_embeddings") else "output.weight"
    return x @ w(head).T


@torch.no_grad()
def converted_logits(llama_config: dict, tensors, ids: list[int], layers: int) -> torch.Tensor:
    """Logits of transformers' LlamaForCausalLM built from the converted tensors, truncated to `layers` layers."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**{**llama_config, "num_hidden_layers": layers, "torch_dtype": "float32"})
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    names = [n for n, _ in model.named_parameters()]
    state = {n: tensors(n).to(torch.float32) for n in names if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg)  # its buffers are not in the checkpoint: built on the CPU
    model.eval()
    return model(input_ids=torch.tensor([ids])).logits[0]


def check_conversion(source_tensors, source_config: dict, converted_tensors, llama_config: dict, ids: list[int],
                     layers: int = 2) -> dict:
    """Compare the converted model's logits with the reference forward; raise ConversionCheckError when they differ."""
    layers = min(layers, source_config["num_hidden_layers"])
    want = reference_logits(source_tensors, source_config, ids, layers)
    got = converted_logits(llama_config, converted_tensors, ids, layers)
    delta = (got - want).abs().max().item()
    scale = want.abs().max().item()
    if not delta <= TOLERANCE * max(1.0, scale):
        raise ConversionCheckError(
            f"the converted Llama model does not reproduce the original InternLM2 weights: max |logit difference| {delta:.3g} "
            f"over {len(ids)} positions and {layers} layers (logits up to {scale:.3g}); the conversion was not saved")
    same_argmax = bool((got.argmax(-1) == want.argmax(-1)).all())
    return {"layers": layers, "positions": len(ids), "max_abs_logit_diff": delta, "max_abs_logit": scale,
            "same_argmax": same_argmax}
