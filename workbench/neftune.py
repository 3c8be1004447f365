"""NEFTune: uniform noise on the input embeddings of the trained forward (Jain et al., 2023, "NEFTune: Noisy
Embeddings Improve Instruction Finetuning").

Each embedding of a row gets noise drawn uniformly from [-m, m], m = alpha / sqrt(L x d), with L the row's length
in tokens and d the hidden size: as TRL's and LLaMA-Factory's `neftune_noise_alpha` (a packed row counts as one
sequence there too). The paper's alphas are 5 to 15. The GPU fast path lays a micro-batch's packed rows end to end
in one flat row of up to 64k tokens; there L is still the longest packed row (`noise_length`, which the training
loss sets from the flat batch), what the same rows padded into one micro-batch would have, so that alpha means
the same on a GPU as on a CPU and does not shrink with the token budget (TRL's padding-free batches count the
whole flat row: sqrt(64k / 2k), 5.7 times less noise a token there).

Written here rather than taken from transformers (`integrations.neftune.neftune_post_forward_hook`): that hook
adds noise to every forward of a module in training mode, and the distillation term's base forward
(`workbench.loss.base_logits`) runs in training mode too; its target must be the base model's distribution on
the clean input. Here the noise goes only into forwards that record gradients, the one the loss descends:
evaluation, generation and the base forward run without gradients and see the clean embeddings. The noise is
drawn from torch's seeded generator of the embedding's device, which checkpoints save: resume stays exact.
"""
from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager

import torch
from torch import nn

_LENGTH: contextvars.ContextVar[int | None] = contextvars.ContextVar("neftune_length", default=None)


def attach(model: nn.Module, alpha: float):
    """Add NEFTune noise of `alpha` to `model`'s input embeddings in its trained forwards, in place of any noise
    attached before (a model trained twice is not noised twice); a handle whose `remove()` takes it off (None
    when alpha is 0: nothing attached, and any earlier noise taken off)."""
    if alpha < 0:
        raise ValueError(f"neftune_noise_alpha must be >= 0, got {alpha}")
    if alpha == 0 and not hasattr(getattr(model, "module", model), "get_input_embeddings"):
        return None  # nothing to attach, and nothing attached before: such a model never had the noise
    embeddings = input_embeddings(model)
    if getattr(embeddings, "_wb_neftune", None) is not None:
        embeddings._wb_neftune.remove()
    embeddings._wb_neftune = embeddings.register_forward_hook(noise_hook(alpha)) if alpha > 0 else None
    return embeddings._wb_neftune


def input_embeddings(model: nn.Module) -> nn.Module:
    """The input embedding module of a (peft-wrapped, accelerate-wrapped) causal LM."""
    inner = getattr(model, "module", model)  # DDP
    return inner.get_input_embeddings()


def noise_hook(alpha: float):
    """A forward hook adding the noise to an embedding module's output [rows, L, d] in forwards that record gradients."""
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not (module.training and torch.is_grad_enabled()):
            return output
        length = _LENGTH.get() or output.shape[-2]
        return output + torch.empty_like(output).uniform_(-1.0, 1.0) * magnitude(alpha, length, output.shape[-1])
    return hook


@contextmanager
def noise_length(length: int | None):
    """L for the noise of the forwards inside (None: the embedding output's own length): a flat micro-batch's longest
    packed row."""
    token = _LENGTH.set(length)
    try:
        yield
    finally:
        _LENGTH.reset(token)


def magnitude(alpha: float, length: int, hidden: int) -> float:
    """The noise's bound m = alpha / sqrt(L x d)."""
    return alpha / math.sqrt(length * hidden)
