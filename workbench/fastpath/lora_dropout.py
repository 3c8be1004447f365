"""LoRA dropout that keeps the layer's input, not a dropped copy of it, for the backward.

peft computes a LoRA layer's rank-r side as `lora_A(dropout(x))`. torch's dropout keeps
its mask for the backward and `lora_A` keeps the dropped copy: two more tensors of x's
size for every adapter that reads x (q, k and v each read the same x), where without
dropout all of them keep the one x. `FastDropout` replaces peft's `nn.Dropout` (same p,
the same inverted dropout: each element dropped independently with probability p,
the rest scaled by 1/(1-p)) and, inside the fast path's lean LoRA forward
(`fastpath.lean_lora_forward`), computes `dropout(x) @ A.T` keeping only x and:

* **on a CPU, the dropped positions** (`_DroppedLinear`). There torch's dropout RNG
  took 13% of a step: `dropped` draws only the positions it drops (the gaps between
  them are geometric: about n * p random numbers, not n).
* **on a GPU, a seed** (`_SeededDroppedLinear`). The dropped positions would need host
  synchronisations to draw; instead the mask is drawn from a generator seeded with an
  integer taken from torch's CPU generator (no synchronisation), and drawn again from
  that seed in the backward. For Qwen2.5-1.5B with LoRA on every linear layer torch's
  dropout keeps 3 bytes (a bf16 copy and a bool mask) for each of 18,176 inputs per
  token and layer: 24.5 GB at 16k tokens, by their sizes; the seed keeps only the 4
  distinct inputs (13,568 bf16 values a token and layer, about 12 GB less), for two
  more mask draws per adapter.

Inside torch.compile (the GPU's `torch_compile` setting) both ways would split each compiled
decoder layer into pieces: the seed is read from a tensor and the generator is seeded in
Python, the dropped positions are counted on the host, and Dynamo stops its graph at each
(50 graph breaks in the forward of a two-layer model with LoRA on every linear layer).
There the layer gets torch's own dropout, which the compiler traces and fuses; what
its backward keeps is then the compiler's choice: Inductor (on this CPU, the tiny model,
dropout 0.1 against 0) kept 1.56 bytes more per adapter input element, a mask, which at
Qwen2.5-1.5B's 18,176 elements a token and layer costs back about the 12 GB at 16k
tokens that the seed saves (9 floats a token, layer and hidden unit). The GPU's token
budget (workbench/fastpath/token_budget.py) still covers it: its 52 floats all told were measured
(2026-12-04) with torch's dropout, which kept a mask and a dropped copy.

Written here because neither peft nor a fused-kernel library (Liger, Unsloth's LoRA
kernels are written for dropout 0) offers a LoRA dropout that keeps no mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_GAP_HEADROOM = 8.0  # FastDropout draws the expected number of gaps plus this many standard deviations


class FastDropout(nn.Module):
    """Inverted dropout, each element dropped independently with probability p (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        self.scale = 1.0 / (1.0 - p)

    @property
    def _active(self) -> bool:
        return self.training and self.p > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._active:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, True)
        return _DropAt.apply(x, self.dropped(x.numel()), self.scale)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, seeded: bool | None = None) -> torch.Tensor:
        """`F.linear(self(x), weight)`, keeping x, not a dropped copy of it, for the backward: with the dropped
        positions on a CPU, with a seed elsewhere (`seeded`: which way, None: by the device)."""
        if not self._active:
            return F.linear(x, weight)
        if torch.compiler.is_compiling():  # inside torch.compile (config torch_compile): see the module docstring
            return F.linear(F.dropout(x, self.p, True), weight)
        if seeded if seeded is not None else x.device.type != "cpu":
            return _SeededDroppedLinear.apply(x, weight, self.p, draw_seed())
        return _DroppedLinear.apply(x, weight, self.dropped(x.numel()), self.scale)

    def dropped(self, n: int) -> torch.Tensor:
        """Sorted flat indices of the dropped elements among n, each dropped independently with probability p.

        The gaps between consecutive dropped positions of a Bernoulli(p) sequence are
        independent Geometric(p) draws, floor(log(1 - U) / log(1 - p)) + 1 with U
        uniform on [0, 1): about n * p random numbers instead of n, from torch's
        seeded generator.
        """
        log_keep = math.log1p(-self.p)
        parts, last = [], -1
        while True:
            expected = (n - 1 - last) * self.p
            draws = max(16, int(expected + _GAP_HEADROOM * math.sqrt(expected) + 16))  # rarely too few: then loop
            gaps = torch.rand(draws, dtype=torch.float64).neg_().log1p_().div_(log_keep).floor_().add_(1)
            positions = gaps.cumsum_(0).add_(last).to(torch.int64)
            if int(positions[-1]) >= n:
                parts.append(positions[:int(torch.searchsorted(positions, n))])
                return torch.cat(parts) if len(parts) > 1 else parts[0]
            parts.append(positions)
            last = int(positions[-1])

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _DropAt(torch.autograd.Function):
    """x times scale, zero at the given flat indices; the backward does the same to the gradient."""

    @staticmethod
    def forward(ctx, x, dropped, scale):
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return _scaled_and_zeroed(x, dropped, scale)

    @staticmethod
    def backward(ctx, grad):
        (dropped,) = ctx.saved_tensors
        return _scaled_and_zeroed(grad, dropped, ctx.scale), None, None


def _scaled_and_zeroed(x: torch.Tensor, flat_zero: torch.Tensor, scale: float) -> torch.Tensor:
    """A contiguous copy of x times scale, zero at the flat (row-major) indices."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if scale == 1.0:
        out.copy_(x)
    else:
        torch.mul(x, scale, out=out)
    out.view(-1)[flat_zero] = 0
    return out


class _DroppedLinear(torch.autograd.Function):
    """dropout(x) @ weight.T, keeping x and the dropped indices for the backward instead of a dropped copy of x.

    The scale 1/(1-p) is applied to the small (rank-r) side of each product. The
    dropped copy is made again in the backward, for the weight gradient only.
    """

    @staticmethod
    def forward(ctx, x, weight, dropped, scale):
        ctx.save_for_backward(x, weight, dropped)
        ctx.scale = scale
        return _scaled_and_zeroed(x, dropped, 1.0) @ (weight.t() * scale)

    @staticmethod
    def backward(ctx, grad):
        x, weight, dropped = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
            grad_x.view(-1)[dropped] = 0
        if ctx.needs_input_grad[1]:
            kept = _scaled_and_zeroed(x, dropped, 1.0).reshape(-1, x.shape[-1])
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ kept
        return grad_x, grad_w, None, None


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
# The GPU's way: the mask drawn again from a seed
# ---------------------------------------------------------------------------
_GENERATORS: dict[str, torch.Generator] = {}


def draw_seed() -> int:
    """A seed for one dropout mask, from torch's CPU generator (reproducible with torch.manual_seed, restored by
    activation checkpointing's recomputation and by resume, and no GPU synchronisation)."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))


def seeded_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """A keep-mask (1 kept, 0 dropped) of `like`'s shape, dtype and device: the same for the same seed."""
    key = str(like.device)
    if key not in _GENERATORS:
        _GENERATORS[key] = torch.Generator(device=like.device)
    generator = _GENERATORS[key].manual_seed(seed)
    return torch.empty_like(like, memory_format=torch.contiguous_format).bernoulli_(1.0 - p, generator=generator)


class _SeededDroppedLinear(torch.autograd.Function):
    """dropout(x) @ weight.T, keeping x and the mask's seed for the backward, where the mask is drawn again.

    The scale 1/(1-p) is applied to the rank-r side of each product, as in `_DroppedLinear`.
    """

    @staticmethod
    def forward(ctx, x, weight, p, seed):
        ctx.save_for_backward(x, weight if ctx.needs_input_grad[0] else None)  # the weight only for x's gradient
        ctx.p, ctx.seed = p, seed
        return (x * seeded_mask(x, p, seed)) @ (weight.t() / (1.0 - p))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        keep = seeded_mask(x, ctx.p, ctx.seed)
        grad = grad / (1.0 - ctx.p)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).mul_(keep)
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ keep.mul_(x).reshape(-1, x.shape[-1])
        return grad_x, grad_w, None, None
