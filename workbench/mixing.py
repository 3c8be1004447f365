"""Mixing: a config's data sources, each read or generated, repeated or sized to a share, shuffled or stratified.

A source (`DataSource` under `datasets:`) is a file, folder or glob pattern
(`workbench.readers`) or generated identity data (`workbench.identity`).
`repeat` uses every record that many times (a fraction of a copy is sampled
without replacement); `fraction` makes the source that share of the final
mixture. The mixture is shuffled with the config's seed (`mix_order: shuffle`),
or each source is spread evenly through it (`stratified`); the same config
gives the same samples in the same order.
"""
from __future__ import annotations

import random

from workbench import identity
from workbench.config import Config, ConfigError, DataSource, resolve_path
from workbench.readers import Reading, read_source
from workbench.samples import Sample
from workbench.unlikelihood import with_negatives


def load_source(src: DataSource, cfg: Config) -> list[Sample]:
    """The samples of one configured source: a file, folder or pattern, or generated identity data."""
    reading = read_configured(src, cfg)
    if reading.errors:
        raise reading.errors[0]
    for sample in reading.samples:  # the source says whether its rows get the distillation and unlikelihood terms
        sample.distill, sample.unlikelihood, sample.roles, sample.negatives = src.distill, src.unlikelihood, src.roles, src.twins
    return reading.samples


def read_configured(src: DataSource, cfg: Config) -> Reading:
    """Every valid sample of one configured source and every error in it (generated data has none)."""
    if src.generate:
        return Reading(samples=_generate(src, cfg))
    return read_source(resolve_path(src.path), src.format, src.question_column, src.answer_column, src.system_column)


def _generate(src: DataSource, cfg: Config) -> list[Sample]:
    if src.generate == "identity":
        return identity.generate_identity(cfg.assistant_name, cfg.owner_name, seed=cfg.seed)
    if src.generate == "identity_tutorial":
        return identity.generate_tutorial_identity(cfg.owner_name, n_repeat=src.n_repeat, assistant_name=cfg.assistant_name)
    raise ConfigError(f"generate: unknown generator {src.generate!r}; use identity or identity_tutorial")


def mix_sources(cfg: Config) -> list[Sample]:
    """All of cfg.datasets, each repeated or sized to its fraction, shuffled; the same for the same seed."""
    return mix([load_source(src, cfg) for src in cfg.datasets], cfg)


def mix(loaded: list[list[Sample]], cfg: Config) -> list[Sample]:
    """The samples of each of cfg.datasets (in order), repeated or sized to its fraction, shuffled or stratified."""
    counts = _target_counts(cfg.datasets, [len(samples) for samples in loaded])
    taken = [_take(samples, count, random.Random(f"{cfg.seed}:{i}")) for i, (samples, count) in enumerate(zip(loaded, counts))]
    if cfg.mix_order == "stratified":
        mixed = stratified(taken, cfg.seed)
    else:
        mixed = [s for part in taken for s in part]
        random.Random(cfg.seed).shuffle(mixed)
    if cfg.negative_weight > 0:  # after the shuffle: the other rows keep their order
        mixed = with_negatives(mixed, cfg.assistant_name, cfg.owner_name, cfg.seed)
    return mixed


def stratified(parts: list[list[Sample]], seed: int) -> list[Sample]:
    """The parts' samples merged so that each part is spread evenly: part p's k-th sample (after a seeded shuffle of
    the part) sits at (k + u) / len(p) of the way through, u uniform in [0, 1) (jittered stratified sampling), so any
    stretch of the result holds about each part's share. Written here: no library orders a mixture this way."""
    keyed = []
    for i, part in enumerate(parts):
        rng = random.Random(f"{seed}:{i}:stratified")
        order = rng.sample(part, len(part))
        keyed += [((k + rng.random()) / len(order), i, k, s) for k, s in enumerate(order)]
    return [s for *_, s in sorted(keyed, key=lambda x: x[:3])]


def _target_counts(sources: list[DataSource], sizes: list[int]) -> list[int]:
    """How many samples each source contributes.

    Without fraction: repeat x size. With fraction f: f of the final mixture,
    so that the sources with fractions add sum(f) to the rest; when every
    source has a fraction the total is the sum of the sources' sizes and the
    fractions are normalised to add up to 1.
    """
    for i, (src, size) in enumerate(zip(sources, sizes)):
        if src.fraction is not None and size == 0:
            raise ConfigError(f"datasets[{i}].fraction: the source has no records, so it cannot make up a share")
    base = sum(_repeat_count(src.repeat, size) for src, size in zip(sources, sizes) if src.fraction is None)
    shares = sum(src.fraction for src in sources if src.fraction is not None)
    if base and shares >= 1:
        raise ConfigError(f"datasets: the fractions add up to {shares:g}, leaving no share for the sources without a "
                          "fraction; make the fractions add up to less than 1")
    total = base / (1 - shares) if base else sum(sizes) / shares if shares else 0
    return [_repeat_count(src.repeat, size) if src.fraction is None else max(1, round(src.fraction * total))
            for src, size in zip(sources, sizes)]


def _repeat_count(repeat: float, size: int) -> int:
    """Integer part of repeat: whole copies; fractional part: that share of the records once more."""
    whole = int(repeat)
    return whole * size + round((repeat - whole) * size)


def _take(samples: list[Sample], count: int, rng: random.Random) -> list[Sample]:
    """count samples: every sample as many whole times as fit, the remainder sampled without replacement."""
    if not samples:
        return []
    whole, rest = divmod(count, len(samples))
    return samples * whole + rng.sample(samples, rest)
