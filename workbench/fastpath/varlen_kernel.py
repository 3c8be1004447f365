"""PyTorch's varlen flash kernel (`torch.nn.attention.varlen.varlen_attn`), whatever the torch version.

The GPU fast path (`workbench/fastpath/cuda.py`) attends every conversation of a packed
micro-batch in one call of this kernel per layer. Its signature moved between torch
versions (2.10: `is_causal`; 2.11: `window_size`; 2.13: `enable_gqa`), and grouped-query
models (Qwen2.5, InternLM2, SmolLM2: fewer key/value heads than query heads) must reach
it without their key/value heads repeated, or the backward keeps 6x the keys and values
of Qwen2.5-1.5B (2.8 GB at 16k tokens, by their sizes). Written here, small and version-aware, because
the kernel is PyTorch's own: nothing to install, and no maintained wrapper covers these
versions.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect

import torch


def available() -> bool:
    """torch ships the varlen flash kernel (torch >= 2.10) and a CUDA GPU that runs it is visible: PyTorch's flash
    kernels need an Ampere GPU or newer (compute capability 8.0: A100, A10, L4, H100), so a T4 or a V100 keeps
    transformers' masked attention, as does a GPU this torch build's kernel refuses (`kernel_runs`)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return False
    if not torch.version.hip and torch.cuda.get_device_capability()[0] < 8:
        return False
    return kernel_runs(torch.device("cuda", torch.cuda.current_device()))


_RUNS: dict[str, bool] = {}  # device -> the kernel ran a small forward and backward there


def kernel_runs(device) -> bool:
    """Whether varlen_attn runs on `device`: a small causal forward and backward in bfloat16, tried once per device
    at set-up. The flash kernel refuses a GPU its build has no code for at the first call; found here, the fast path
    keeps transformers' attention instead of failing in the first training step."""
    key = str(torch.device(device))
    if key not in _RUNS:
        _RUNS[key] = _runs(torch.device(device))
    return _RUNS[key]


def _runs(device: torch.device) -> bool:
    from torch.nn.attention.varlen import varlen_attn

    values = torch.linspace(-1, 1, 16 * 2 * 64, device=device).reshape(16, 2, 64)  # no random numbers drawn
    q, k, v = (values.to(torch.bfloat16).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 7, 16], dtype=torch.int32, device=device)
    try:
        varlen_attn(q, k, v, cu, cu, 9, 9, **signature()[0]).float().sum().backward()
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


@functools.lru_cache(maxsize=1)
def attention_call():
    """varlen_attn with causal masking and GQA, whatever the torch version spells them.

    torch 2.10 takes `is_causal=True`; from 2.11 it is `window_size=(-1, 0)`. Grouped
    key/value heads go to the kernel as they are: torch 2.13 asks for `enable_gqa=True`
    (only a check of the head counts: its flash kernel attends groups itself), older
    versions have no such flag and pass them straight on where `kernel_takes_gqa` found
    the kernel accepting them; elsewhere the heads are repeated (correct, and it keeps
    6x the keys and values of Qwen2.5-1.5B for the backward: 2.8 GB at 16k tokens, by their sizes).
    """
    from torch.nn.attention.varlen import varlen_attn

    causal, flag = signature()

    def call(q, k, v, cu, longest, scale):
        half = half_dtype(q.dtype)  # QLoRA's float32 norms give float32 q/k/v: attend in bf16, as SDPA under autocast
        q, k, v = q.to(half), k.to(half), v.to(half)
        if q.shape[1] != k.shape[1]:
            if flag:
                return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, enable_gqa=True, **causal)
            if not _NATIVE_GQA.get(str(q.device), False):
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **causal)

    return call


def signature() -> tuple[dict, bool]:
    """(the causal keyword of this torch's varlen_attn, whether it has `enable_gqa`)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return ({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}), "enable_gqa" in params


_NATIVE_GQA: dict[str, bool] = {}  # device -> the varlen kernel attends grouped key/value heads without a flag


def kernel_takes_gqa(device) -> bool:
    """Whether varlen_attn on `device` attends grouped key/value heads as they are (with `enable_gqa` where this
    torch has it). Without the flag this is found once per device, outside any training forward: a small
    causal forward and backward with 2 key/value heads for 4 query heads against the same with the heads
    repeated; a backend that refuses them (or differs) keeps the repetition."""
    if signature()[1]:
        return True
    key = str(torch.device(device))
    if key not in _NATIVE_GQA:
        _NATIVE_GQA[key] = _native_gqa_matches(torch.device(device))
    return _NATIVE_GQA[key]


def _native_gqa_matches(device: torch.device) -> bool:
    from torch.nn.attention.varlen import varlen_attn

    causal = signature()[0]
    draw = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(24, heads, 64, generator=draw, device=device).to(torch.bfloat16) for heads in (4, 2, 2))
    cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=device)

    def attend(repeat: bool):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        kk, vv = (t.repeat_interleave(2, dim=1) if repeat else t for t in leaves[1:])
        out = varlen_attn(leaves[0], kk, vv, cu, cu, 14, 14, **causal)
        out.float().square().sum().backward()
        return [out] + [t.grad for t in leaves]

    try:
        native = attend(repeat=False)
    except (RuntimeError, ValueError, NotImplementedError):  # a backend without grouped heads
        return False
    return all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2) for a, b in zip(native, attend(repeat=True)))


def half_dtype(dtype: torch.dtype) -> torch.dtype:
    """The half precision the kernel attends in: the tensors' own, autocast's, else bfloat16."""
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.bfloat16
