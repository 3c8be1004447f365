"""The training loss: next-token cross-entropy summed over the trained tokens of a batch.

Training (workbench/train.py) divides the sum by the trained tokens of the whole
optimizer step, so accumulation and several processes give the loss of one big
batch; the analysis (held-out loss, retention) uses the same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench import neftune
from workbench.fastpath import cpu as fastpath, cuda as fastpath_cuda
from workbench.packing import NEGATIVE
from workbench.prompt import IGNORE
from workbench.unlikelihood import IdentityTokens, unlikelihood_sum


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the trained tokens of a batch (float32).

    The output head (vocabulary x hidden) runs only at the positions whose next token
    is trained: system and user tokens need no logits, which saves a large share of
    the compute and memory of a chat fine-tune.
    """
    targets = batch["labels"][:, 1:]
    keep = trained_positions(batch)
    if fastpath_cuda.uses_liger_loss(model) and fastpath_cuda.can_call_decoder(model):
        return fastpath_cuda.fused_linear_loss_sum(model, batch, keep, targets[:, keep], IGNORE, attention_kwargs(model, batch))
    logits = forward_logits(model, batch, keep).float()
    return cross_entropy_sum(model, logits.reshape(-1, logits.shape[-1]), targets[:, keep].reshape(-1))


def trained_positions(batch: dict) -> torch.Tensor:
    """The positions whose next token is trained or marked for the unlikelihood term (the collator's `keep` where it
    computed it; a negative twin's tokens have no label but a mark)."""
    if "keep" in batch:
        return batch["keep"]
    used = batch["labels"][:, 1:] != IGNORE
    if "unlikelihood" in batch:
        used |= batch["unlikelihood"][:, 1:] > 0
    return used.any(0).nonzero().squeeze(1)


def cross_entropy_sum(model, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of flat logits [n, vocab] against targets [n] (the fused kernel where the fast path has it)."""
    if fastpath.uses_fused_loss(model):
        return fastpath.cross_entropy_sum(logits, targets, ignore_index=IGNORE)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def training_loss(model, batch: dict, cfg, peft_model=None,
                  identity: IdentityTokens | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy sum of a batch and the sum training descends: the cross-entropy plus
    `cfg.distill_weight` x the KL term, `cfg.unlikelihood_weight` x the unlikelihood term and `cfg.negative_weight`
    x the negative twins' term (`token_loss_terms`; `identity`: the tokens those terms push down, None when off)."""
    with neftune.noise_length(batch.get("noise_length")):  # a flat micro-batch: its rows' length, as if padded
        if cfg.distill_weight <= 0 and identity is None:
            ce = token_loss_sum(model, batch)
            return ce, ce
        ce, kl, ul, twins = token_loss_terms(model, batch, peft_model, cfg.distill_weight > 0, identity,
                                             getattr(cfg, "distill_opening_factor", 1.0))
    return ce, ce + cfg.distill_weight * kl + cfg.unlikelihood_weight * ul + cfg.negative_weight * twins


def token_loss_terms(model, batch: dict, peft_model=None, distill: bool = True, identity: IdentityTokens | None = None,
                     opening_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The summed cross-entropy (as `token_loss_sum`) and the sums of the three extra terms, from one forward
    of the tuned model: the KL(base || tuned) of the next-token distributions at the trained tokens marked
    `distill` (everyday rows; when `distill`), the unlikelihood of the identity's tokens at those marked
    `unlikelihood` (everyday rows and identity roles), and that of the negative twins' own tokens (the last
    two when `identity` gives the tokens, workbench/unlikelihood.py). The KL at a token of an answer's first
    sentence (the batch's `opening` marks) counts `opening_factor` times.

    The base is the same peft model with its adapter switched off (`disable_adapter()`): no second copy in
    memory, one extra forward without gradients. `peft_model`: the unwrapped peft model when `model` is a
    wrapper (DDP), so that the tuned forward still goes through the wrapper. Written here: TRL's GKD trainer computes a like term
    but needs its own trainer, data format and a separate teacher model.
    """
    keep = trained_positions(batch)
    logits = forward_logits(model, batch, keep).float()
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:][:, keep].reshape(-1)
    ce = cross_entropy_sum(model, flat, flat_targets)
    kl = ul = twins = torch.zeros((), device=ce.device)
    if distill and "distill" in batch:
        mask = batch["distill"][:, 1:][:, keep]
        tuned = logits[0, batch["distill_at"]] if "distill_at" in batch else logits[mask]  # flat: rows found on the host
        base = base_logits(model, batch, keep, mask, peft_model)
        kl = distill_kl(tuned, base, opening_weights(batch, keep, mask, opening_factor))
    if identity is not None and "unlikelihood" in batch:
        marks = batch["unlikelihood"][:, 1:][:, keep].reshape(-1)
        next_ids = batch["input_ids"][:, 1:][:, keep].reshape(-1)  # a negative twin's tokens (its labels are IGNORE)
        at = (batch["pushed_at"], batch["twin_at"]) if "pushed_at" in batch else None  # flat: found on the host
        ul, twins = unlikelihood_sum(flat, torch.where(marks == NEGATIVE, next_ids, flat_targets), marks, identity, at)
    return ce, kl, ul, twins


def distill_kl(tuned: torch.Tensor, base: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over positions of KL(base || tuned) of the next-token distributions ([n, vocab] logits each), each
    position weighted by `weights` [n] where given."""
    if weights is None:
        return F.kl_div(F.log_softmax(tuned, -1), F.log_softmax(base, -1), log_target=True, reduction="sum")
    per_token = F.kl_div(F.log_softmax(tuned, -1), F.log_softmax(base, -1), log_target=True, reduction="none").sum(-1)
    return (per_token * weights).sum()


def opening_weights(batch: dict, keep: torch.Tensor, mask: torch.Tensor, factor: float) -> torch.Tensor | None:
    """The KL weight of each distilled position, in the order of `logits[mask]`: `factor` in an answer's first
    sentence, 1 elsewhere (None when all are 1)."""
    if factor == 1.0 or "opening" not in batch:
        return None
    opening = batch["opening"][:, 1:][:, keep]
    return 1.0 + (factor - 1.0) * (opening[0, batch["distill_at"]] if "distill_at" in batch else opening[mask]).float()


def base_logits(model, batch: dict, keep: torch.Tensor, mask: torch.Tensor, peft_model=None) -> torch.Tensor:
    """The base model's logits (adapter off, no gradients) at the positions `keep` where `mask` [rows, len(keep)]
    is set, in the order of `logits[mask]`.

    Where no conversation attends to another (transformers' own models) and the batch is on the CPU, only the
    conversations holding such a position go through this forward (`conversations_holding`): the same logits for
    the share of the tokens they are (the recipe's everyday English rows are under half of each packed row, and
    this forward was about a third of a step). On a GPU the cut would need host synchronisation: the whole row,
    and on its flat micro-batch the head only at the distilled positions, which the host found (`distill_at`).
    """
    with torch.no_grad(), (peft_model or model).disable_adapter():
        if "distill_at" in batch:
            return forward_logits(model, batch, keep[batch["distill_at"]]).float()[0]
        if batch["input_ids"].device.type == "cpu" and fastpath.keeps_conversations_apart(model):
            sub = conversations_holding(batch, keep, mask)
            return forward_logits(model, sub, sub["keep"]).float()[0]
        return forward_logits(model, batch, keep).float()[mask]


def conversations_holding(batch: dict, keep: torch.Tensor, mask: torch.Tensor) -> dict:
    """One row of the conversations of `batch` that hold a position `keep[j]` of a row i with `mask[i, j]`, end to end
    in their order, and `keep`: those positions in it (ascending, so the logits come in the order of `logits[mask]`).

    A conversation starts where `position_ids` restart at 0 (padding starts a block of its own).
    """
    pos = batch["position_ids"].reshape(-1)
    rows, cols = mask.nonzero(as_tuple=True)
    wanted = rows * batch["position_ids"].shape[1] + keep[cols]  # flat positions, ascending (row-major)
    starts = (pos == 0).nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([pos.numel()])])
    chosen = torch.unique(torch.searchsorted(starts, wanted, right=True) - 1)
    lengths = ends[chosen] - starts[chosen]
    first = torch.repeat_interleave(starts[chosen], lengths)  # each kept token's conversation start
    offset = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    taken = first + offset  # flat positions of the kept conversations' tokens, ascending
    return {"input_ids": batch["input_ids"].reshape(-1)[taken][None], "position_ids": pos[taken][None],
            "keep": torch.searchsorted(taken, wanted)}


def forward_logits(model, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """Logits at positions `keep` (models without `logits_to_keep` compute all and are sliced)."""
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                  **attention_kwargs(model, batch))
    if getattr(model, "_wb_no_logits_to_keep", False):
        return model(**kwargs).logits[:, keep]
    try:
        return model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # remote-code models that predate logits_to_keep
        model._wb_no_logits_to_keep = True
        return model(**kwargs).logits[:, keep]


def attention_kwargs(model, batch: dict) -> dict:
    """The conversation boundaries the fast path's attention needs (none for the plain path)."""
    if fastpath_cuda.uses_varlen_attention(model) and "cu_seq_lens" in batch:
        return fastpath_cuda.flat_kwargs(batch)
    if fastpath.uses_packed_attention(model) or fastpath_cuda.uses_varlen_attention(model):
        return fastpath.packed_kwargs(batch["position_ids"])
    return {}
