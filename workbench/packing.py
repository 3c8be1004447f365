"""Packing, batching and the data order of a run.

`pack` puts several encoded conversations into rows of at most max_length
tokens. `collate` turns rows into a batch whose `position_ids` restart at 0 for
every conversation; with no attention mask, transformers builds a
block-diagonal causal mask from those restarts, so no token attends across
conversations (and right-padding is a separate, untrained block). The loss of a
packed batch therefore equals the token-weighted mean of the conversations'
losses computed alone (tests/test_packing.py proves it).

`StepPlan` fixes which rows every optimizer step trains, as a pure function of
the seed and the step number: epochs are seeded permutations laid end to end,
and step s takes the next `rows_per_step` rows. Resuming at step s or splitting
a step over N processes therefore sees exactly the same data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.prompt import IGNORE, Encoded

ROLES = 3  # the unlikelihood mark of an identity sample's trained tokens (the role contrast, workbench/unlikelihood.py)
NEGATIVE = 4  # the unlikelihood mark of a negative twin's answer tokens (pushed down themselves; no cross-entropy)

Row = list  # a row is a list of Encoded samples laid end to end
STRATIFIED_WINDOW = 2  # a stratified mixture's sample joins one of the last 2 rows opened (tests/test_packing.py)


def pack(samples: list[Encoded], max_length: int, window: int | None = None) -> list[Row]:
    """First-fit packing in the given order (which is already shuffled by the seed). With a window, a sample goes
    only into one of the last `window` rows opened, so a row holds samples from one stretch of the order (as a
    stratified mixture laid them out) and no late short sample fills an early row's gap."""
    rows: list[Row] = []
    room: list[int] = []
    for s in samples:
        first = max(0, len(rows) - window) if window else 0
        for i, free in enumerate(room[first:], start=first):
            if len(s) <= free:
                rows[i].append(s)
                room[i] -= len(s)
                break
        else:
            rows.append([s])
            room.append(max_length - len(s))
    return rows


def pack_rows(samples: list[Encoded], cfg) -> list[Row]:
    """A config's rows: packed to max_length (within a window of STRATIFIED_WINDOW rows for a stratified mixture,
    so each row keeps about the mixture's shares), or one sample per row."""
    if not cfg.pack_to_max_length:
        return unpacked(samples)
    return pack(samples, cfg.max_length, STRATIFIED_WINDOW if cfg.mix_order == "stratified" else None)


def unpacked(samples: list[Encoded]) -> list[Row]:
    return [[s] for s in samples]


def row_length(row: Row) -> int:
    return sum(len(s) for s in row)


def row_trained_tokens(row: Row) -> int:
    return sum(s.n_trained for s in row)


def logit_shares(rows: list[Row]) -> tuple[float, float]:
    """(kept, distilled): the shares of the rows' tokens whose positions the loss takes logits at (a trained token or
    one marked for the unlikelihood term, as `collate_flat`'s `keep`) and, of all tokens, those the distillation also
    compares with the base's logits. What a micro-batch's loss costs in memory grows with them
    (token_budget.budget_tokens)."""
    tokens = sum(row_length(r) for r in rows)
    labelled = [(len(s.labels) - s.labels.count(IGNORE), s.distill) for r in rows for s in r]
    kept = sum(n for n, _ in labelled)
    return kept / max(tokens, 1), sum(n for n, distill in labelled if distill) / max(tokens, 1)


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, labels and position_ids (restarting per sample), right-padded to the longest row."""
    width = max(row_length(r) for r in rows)
    ids, labels, pos, distill, unlikely, opening = [], [], [], [], [], []
    for row in rows:
        r_ids, r_lab, r_pos, r_dist, r_ul, r_open = [], [], [], [], [], []
        for s in row:
            r_ids += s.input_ids
            r_lab += s.trained_labels
            r_pos += list(range(len(s)))
            r_dist += distill_marks(s)
            r_ul += unlikelihood_marks(s)
            r_open += opening_marks(s)
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_lab + [IGNORE] * pad)
        pos.append(r_pos + list(range(pad)))
        distill.append(r_dist + [False] * pad)
        unlikely.append(r_ul + [0] * pad)
        opening.append(r_open + [False] * pad)
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}
    return _with_marks(batch, distill, unlikely, opening)


def distill_marks(s: Encoded) -> list[bool]:
    """Per label: pulled toward the base model's distribution (a trained token of an everyday sample)."""
    return [s.distill and x != IGNORE for x in s.labels]


def opening_marks(s: Encoded) -> list[bool]:
    """Per label: in the first sentence of an answer of an everyday sample (Config.distill_opening_factor)."""
    return [i in s.opening for i in range(len(s.labels))] if s.opening else [False] * len(s.labels)


def unlikelihood_marks(s: Encoded) -> list[int]:
    """Per label of a sample that must not state the identity: 2 at the first trained token of each answer,
    1 at its other trained tokens (1 at every trained token where only the names are pushed down, `unlikelihood:
    names`), 0 elsewhere; of an identity sample marked `roles`: 3 at its trained tokens
    (workbench/unlikelihood.py: ROLES); of a negative twin: NEGATIVE at its answer tokens; 0 everywhere in other samples."""
    if s.roles or s.negative:
        return [0 if x == IGNORE else ROLES if s.roles else NEGATIVE for x in s.labels]
    if not s.unlikelihood:
        return [0] * len(s.labels)
    first = 1 if s.unlikelihood == "names" else 2  # the mark of an answer's first token (2: the openings as well)
    return [0 if x == IGNORE else first if i == 0 or s.labels[i - 1] == IGNORE else 1 for i, x in enumerate(s.labels)]


def _with_marks(batch: dict, distill: list, unlikely: list, opening: list) -> dict:
    """Adds the masks of the extra loss terms, only when some label is marked (int8 for the unlikelihood marks)."""
    if any(map(any, distill)):  # labels whose token is pulled toward the base model's distribution (everyday rows)
        batch["distill"] = torch.tensor(distill)
    if any(map(any, opening)):  # those of them in an answer's first sentence
        batch["opening"] = torch.tensor(opening)
    if any(map(any, unlikely)):  # labels whose context must not lead to the identity (everyday rows) or to a mixed-up role
        batch["unlikelihood"] = torch.tensor(unlikely, dtype=torch.int8)
    return batch


def collate_flat(rows: list[Row]) -> dict:
    """Every conversation of `rows` end to end in one row of batch 1, no padding (the GPU fast path's micro-batch).

    Besides input_ids, labels and position_ids it carries what the varlen kernel and
    the loss need, computed here on the host so that the forward never waits for the
    GPU: `cu_seq_lens` (int32 starts of the conversations plus the end), `max_length`
    (the longest conversation, an int), `keep` (the positions whose next token is
    trained, for the output head), `noise_length` (the longest row: NEFTune's L,
    as if the rows were padded into one micro-batch) and, where the extra loss terms
    have marks, where among `keep` they apply (`loss_indices`).
    """
    samples = [s for row in rows for s in row]
    ids, labels, pos, starts, distill, unlikely, opening = [], [], [], [0], [], [], []
    for s in samples:
        ids += s.input_ids
        labels += s.trained_labels
        pos += range(len(s))
        starts.append(starts[-1] + len(s))
        distill += distill_marks(s)
        unlikely += unlikelihood_marks(s)
        opening += opening_marks(s)
    label_t = torch.tensor([labels])
    keep = ((label_t[0, 1:] != IGNORE) | (torch.tensor(unlikely[1:]) > 0)).nonzero().squeeze(1)  # negatives have no label
    batch = {"input_ids": torch.tensor([ids]), "labels": label_t, "position_ids": torch.tensor([pos]),
             "cu_seq_lens": torch.tensor(starts, dtype=torch.int32), "keep": keep,
             "max_length": max(len(s) for s in samples), "noise_length": max(row_length(r) for r in rows)}
    return loss_indices(_with_marks(batch, [distill], [unlikely], [opening]))  # as in collate, in flat order


def loss_indices(batch: dict) -> dict:
    """A flat batch (on the host) with the rows of its kept positions (indices into `keep`) that each extra loss term
    takes: `distill_at` (distilled), `pushed_at` (unlikelihood marks 1-3: identity tokens pushed down) and `twin_at` (a
    negative twin's own tokens). On a GPU, selecting them by their marks there (a boolean index) would wait for the GPU."""
    keep = batch["keep"]
    if "distill" in batch:
        batch["distill_at"] = batch["distill"][0, 1:][keep].nonzero().squeeze(1)
    if "unlikelihood" in batch:
        batch["pushed_at"], batch["twin_at"] = unlikelihood_rows(batch["unlikelihood"][0, 1:][keep])
    return batch


def unlikelihood_rows(marks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the indices of the marks 1-3: identity tokens pushed down, those of NEGATIVE: a twin's own tokens)."""
    return ((marks > 0) & (marks != NEGATIVE)).nonzero().squeeze(1), (marks == NEGATIVE).nonzero().squeeze(1)


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device` (pinned and copied without blocking on CUDA); other values as they are."""
    cuda = torch.device(device).type == "cuda"
    return {k: (v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device))
            if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class StepPlan:
    """Which rows each optimizer step uses, for any number of processes."""

    n_rows: int
    batch_size: int  # rows per process per micro-batch
    accumulative_counts: int
    world_size: int
    seed: int
    max_steps: int | None = None
    max_epochs: float = 1.0

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.accumulative_counts * self.world_size

    @property
    def total_steps(self) -> int:
        if self.max_steps:
            return self.max_steps
        return max(1, math.ceil(self.max_epochs * self.n_rows / self.rows_per_step))

    def epoch_at(self, step: int) -> float:
        return step * self.rows_per_step / self.n_rows

    def step_rows(self, step: int) -> list[int]:
        """The row indices of optimizer step `step` (0-based), for all processes together."""
        start = step * self.rows_per_step
        out = []
        for pos in range(start, start + self.rows_per_step):
            epoch, offset = divmod(pos, self.n_rows)
            out.append(self._permutation(epoch)[offset])
        return out

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This process's micro-batches of step `step`: accumulation slice a, then rank r."""
        rows = self.step_rows(step)
        out = []
        for a in range(self.accumulative_counts):
            start = (a * self.world_size + rank) * self.batch_size
            out.append(rows[start:start + self.batch_size])
        return out

    def _permutation(self, epoch: int) -> list[int]:
        cache = self.__dict__.setdefault("_perm_cache", {})
        if epoch not in cache:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            if len(cache) > 3:
                cache.pop(next(iter(cache)))
            cache[epoch] = torch.randperm(self.n_rows, generator=g).tolist()
        return cache[epoch]
