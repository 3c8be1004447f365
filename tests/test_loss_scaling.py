"""float16's loss scaling in the training loop: a skipped step leaves the schedule; the scale resumes with the run.

accelerate scales the loss of a float16 run on a GPU (a T4 or V100 computes in float16: LoRA, QLoRA, and a full
fine-tune's float32 master weights) with torch's GradScaler. Here a CPU GradScaler is put into the accelerator as
accelerate puts CUDA's (its backward and the prepared optimizer use it); the clipping sees the scaled gradients here,
which accelerate unscales first on a GPU.
"""
import math

import pytest
import torch

import workbench.train as train_module
from workbench.checkpoint import read_state
from workbench.config import load_recipe
from workbench.io import read_jsonl
from train_helpers import losses, train_interrupted_and_resumed


@pytest.fixture()
def scaled(monkeypatch):
    """Every run's accelerator gets a CPU loss scaler starting at `init[0]`."""
    init = [2.0 ** 16]
    make = train_module.make_accelerator

    def with_scaler(cfg):
        acc = make(cfg)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=init[0])
        return acc

    monkeypatch.setattr(train_module, "make_accelerator", with_scaler)
    return init


@pytest.fixture()
def cfg(tiny_model):
    return load_recipe("smollm2_135m_tiny_smoke").replace(max_steps=4, save_steps=2, evaluation_freq=0, max_length=64,
                                                          save_total_limit=-1, warmup_ratio=0.0)


def test_a_step_the_scaler_skips_leaves_the_schedule(cfg, scaled, tmp_path):
    """A scale near float32's largest overflows the first steps: they change no weight and no learning rate."""
    scaled[0] = 2.0 ** 126
    with torch.random.fork_rng(devices=[]):
        trainer = train_module.Trainer(cfg, tmp_path / "w", progress=False).setup()
        trainer.train()
    scale = trainer.accelerator.scaler.get_scale()
    skipped = round(math.log2(2.0 ** 126 / scale))  # each overflow halves the scale; no growth within 2000 steps
    assert 1 <= skipped < cfg.max_steps
    assert trainer.scheduler.last_epoch == cfg.max_steps - skipped
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "w" / "metrics.jsonl")]
    assert lrs[:skipped] == [cfg.lr] * skipped and lrs[skipped] < cfg.lr  # logged after the step: moving from the first taken


def test_the_loss_scale_resumes_with_the_run(cfg, scaled, tmp_path):
    """Interrupted after step 3 and resumed from iter_2: the scaler's growth count and the losses of a straight run."""
    with torch.random.fork_rng(devices=[]):
        train_module.train(cfg, tmp_path / "straight", progress=False)
        train_interrupted_and_resumed(cfg, tmp_path / "resumed", stop_at=3)
    states = [read_state(tmp_path / run / "iter_4")["grad_scaler"] for run in ("straight", "resumed")]
    assert states[0] == states[1] and states[0]["_growth_tracker"] == 4  # a fresh scaler at the resume: 2
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)


def test_the_skip_check_reads_the_scale_once_a_step(cfg, scaled, tmp_path, monkeypatch):
    """Reading the scale is a host synchronisation on a GPU: the training loop's check reads it once a step (the
    scale before a step is the one read after the last), and once more at the start."""
    import sys

    from workbench.distributed import Distributed

    reads = []
    real = torch.amp.GradScaler.get_scale

    def counted(self):
        reads.append(sys._getframe(1).f_code is Distributed.step.__code__)
        return real(self)

    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", counted)
    with torch.random.fork_rng(devices=[]):
        train_module.train(cfg, tmp_path / "w", progress=False)
    assert sum(reads) == cfg.max_steps + 1
