"""The optimizer: AdamW over the trainable weights, one learning rate or LoRA+'s two.

`adamw(cfg, model)` is what training steps with. With `loraplus_lr_ratio` > 0 the
weights are grouped as in LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank
Adaptation of Large Models"): each adapter's B matrix (and any trainable vector)
learns at `lr x loraplus_lr_ratio`, its A matrix at `lr`. The grouping is peft's own
(`peft.optimizers.create_loraplus_optimizer`), not written here.

AdamW's fused kernel (one kernel, not 4 ops per tensor, the same maths) is used on a
CPU, and on CUDA where every trainable weight is a float there.
"""
from __future__ import annotations

import torch


def adamw(cfg, model) -> torch.optim.Optimizer:
    """AdamW with the config's rate, betas and weight decay; LoRA+'s groups when `cfg.loraplus_lr_ratio` > 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(betas=tuple(cfg.betas), **({"fused": True} if can_fuse(params) else {}))
    if getattr(cfg, "loraplus_lr_ratio", 0) > 0:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(peft_model_of(model), torch.optim.AdamW, lr=cfg.lr,
                                         loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                         loraplus_weight_decay=cfg.weight_decay, **kwargs)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def can_fuse(params: list[torch.Tensor]) -> bool:
    """All on the CPU, or all floating-point on CUDA (a QLoRA base keeps no trainable integer weight, but check)."""
    return all(p.device.type == "cpu" for p in params) or all(p.is_cuda and p.is_floating_point() for p in params)


def peft_model_of(model):
    """The peft model under a wrapper (DDP's `.module`), for peft's grouping by module type."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "peft_config"):
        raise ValueError("loraplus_lr_ratio needs a LoRA/QLoRA model (peft); this one has no adapter")
    return inner


def group_rates(optimizer: torch.optim.Optimizer) -> list[tuple[int, float]]:
    """(number of tensors, learning rate) of each non-empty parameter group (peft's LoRA+ grouping leaves some empty)."""
    return [(len(g["params"]), g["lr"]) for g in optimizer.param_groups if g["params"]]
