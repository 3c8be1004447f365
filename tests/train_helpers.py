"""Training-run helpers shared by the CPU and GPU tests: a run killed in the middle and resumed, its losses."""
from pathlib import Path

import pytest


class Stop(Exception):
    """Raised from a run's log hook: the process dying mid-run."""


def losses(work: Path) -> list[float]:
    from workbench.io import read_jsonl

    return [r["loss"] for r in read_jsonl(work / "metrics.jsonl")]


def train_interrupted_and_resumed(cfg, work: Path, stop_at: int, **train_kwargs) -> None:
    """Train `cfg` into `work`, die while step `stop_at` is logged (the step before it saved: checked), then resume."""
    from workbench.train import train

    def stop(rec):
        if rec["step"] == stop_at:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, work, on_log=stop, progress=False, **train_kwargs)
    assert (work / "last_checkpoint").read_text().strip() == f"iter_{stop_at - 1}"
    train(cfg, work, resume=True, progress=False, **train_kwargs)
