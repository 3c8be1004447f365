"""Helpers of the tests that start real processes (tests/test_distributed.py, tests/test_deepspeed.py).

`run` starts a launcher in its own process group and kills the whole group if it hangs; `one_process_run`
trains the reference those tests compare with: one process, twice the batch, one thread as each launched
process has (OMP_NUM_THREADS=1).
"""
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from workbench.config import load_recipe
from workbench.io import read_jsonl
from workbench.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
RECIPE = "smollm2_135m_tiny_smoke"
# 4 steps of 2 micro-batches, checkpoints at 2 and 4, evaluation at 0, 2 and 4; dropout 0 for exact equality.
OPTIONS = ["max_steps=4", "save_steps=2", "evaluation_freq=2", "evaluation_max_new_tokens=4", "lora_dropout=0",
           "max_length=128", "accumulative_counts=2", "save_total_limit=-1"]


def run(cmd: list[str], timeout: int = 240) -> str:
    """Run a launcher in its own process group; kill the whole group if it hangs."""
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd} did not finish in {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{out[-5000:]}"
    return out


def metrics(work: Path) -> list[dict]:
    return read_jsonl(work / "metrics.jsonl")


def one_process_run(work: Path, **changes) -> Path:
    """OPTIONS in one process with batch_size 2 (what 2 processes of batch_size 1 train), on one thread."""
    cfg = load_recipe(RECIPE).replace(**{k: yaml.safe_load(v) for k, v in (o.split("=") for o in OPTIONS)},
                                      batch_size=2, **changes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1)
    try:
        train(cfg, work, progress=False)
    finally:
        torch.set_num_threads(threads)
    return work
