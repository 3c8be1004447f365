"""Checkpoints hold no pickle: a planted one is refused and runs nothing; a corrupt state is a clear error.

One tiny LoRA run (2 steps, a checkpoint after each) is copied for each test; the
tests then plant or damage files of iter_1 and resume from it through the CLI,
as a user would, and in-process through `train`.
"""
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from planted import RunsCode
from workbench.checkpoint import (OPTIMIZER, SCHEDULER, CheckpointError, checkpoint_step, last_checkpoint,
                                  list_checkpoints, read_state_file, rng_state, set_rng_state, write_state_file)
from workbench.cli import main
from workbench.config import load_recipe, save_config
from workbench.io import read_jsonl
from workbench.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = load_recipe("smollm2_135m_tiny_smoke").replace(max_steps=2, save_steps=1, evaluation_freq=0, max_length=64,
                                                         save_total_limit=-1)
    train(cfg, folder / "work", progress=False)
    save_config(cfg, folder / "config.yaml")
    return folder


@pytest.fixture()
def work(run_dir, tmp_path):
    """A copy of the run, its pointer set back to iter_1 (resuming trains step 2 again)."""
    shutil.copy(run_dir / "config.yaml", tmp_path / "config.yaml")
    w = shutil.copytree(run_dir / "work", tmp_path / "work")
    (w / "last_checkpoint").write_text("iter_1\n")
    return w


def resume_cli(work: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["train", str(work.parent / "config.yaml"), "--work-dir", str(work), "--resume"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_a_resumed_checkpoint_continues_the_run(work, run_dir, capsys):
    rc, err = resume_cli(work, capsys)
    assert rc == 0, err
    assert [r["loss"] for r in read_jsonl(work / "metrics.jsonl")] == pytest.approx(
        [r["loss"] for r in read_jsonl(run_dir / "work" / "metrics.jsonl")], rel=1e-5)


@pytest.mark.parametrize("planted", ["optimizer.pt", "rng_0.pt"])
def test_a_planted_pickle_is_refused_and_runs_nothing(work, tmp_path, capsys, planted):
    marker = tmp_path / "code_ran"
    payload = pickle.dumps(RunsCode(marker))
    pickle.loads(payload).close()  # the payload is real: unpickling it runs code
    assert marker.exists()
    marker.unlink()
    ckpt = work / "iter_1"
    if planted == "optimizer.pt":
        (ckpt / OPTIMIZER).unlink()  # as if the checkpoint had been written in the old pickle format
    (ckpt / planted).write_bytes(payload)
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}

    rc, err = resume_cli(work, capsys)
    assert rc == 2 and err.startswith("error: ") and str(ckpt / planted) in err and "pickle" in err
    assert not marker.exists(), "nothing in the checkpoint may run"
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before, "a refused resume changes nothing"
    with pytest.raises(CheckpointError, match=planted):
        train(load_recipe("smollm2_135m_tiny_smoke").replace(max_steps=2, save_steps=1, evaluation_freq=0,
                                                              max_length=64), work, resume=True, progress=False)
    assert not marker.exists()


def damage_optimizer(path: Path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return
    state = read_state_file(path)
    params = state["param_groups"][0]["params"]
    if how == "wrong shapes":
        state["state"][params[0]]["exp_avg"] = torch.zeros(3, 5)
    else:  # one parameter fewer
        state["state"].pop(params[-1], None)
        state["param_groups"][0]["params"] = params[:-1]
    write_state_file(state, path)


@pytest.mark.parametrize("how,words", [("truncated", "corrupt"), ("wrong shapes", "has shape \\(3, 5\\)"),
                                       ("wrong count", "parameters in groups")])
def test_a_damaged_optimizer_state_is_a_clear_error(work, capsys, how, words):
    path = work / "iter_1" / OPTIMIZER
    damage_optimizer(path, how)
    rc, err = resume_cli(work, capsys)
    assert rc == 2 and err.startswith(f"error: {path}")
    with pytest.raises(CheckpointError, match=words):
        train(load_recipe("smollm2_135m_tiny_smoke").replace(max_steps=2, save_steps=1, evaluation_freq=0,
                                                              max_length=64), work, resume=True, progress=False)


def test_damaged_scheduler_and_weights_are_clear_errors(work, capsys):
    ckpt = work / "iter_1"
    (ckpt / SCHEDULER).write_text("{not json")
    rc, err = resume_cli(work, capsys)
    assert rc == 2 and err.startswith(f"error: {ckpt / SCHEDULER}")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    name = sorted(weights)[0]
    weights[name] = torch.zeros(2, 2)
    save_file(weights, str(ckpt / "trainable.safetensors"))
    rc, err = resume_cli(work, capsys)
    assert rc == 2 and err.startswith(f"error: {ckpt / 'trainable.safetensors'}") and name in err


def test_state_files_round_trip_exactly(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))], lr=1e-3)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    write_state_file(opt.state_dict(), tmp_path / "o.safetensors")
    back = read_state_file(tmp_path / "o.safetensors")
    assert back["param_groups"] == opt.state_dict()["param_groups"]  # betas stay a tuple, params stay ints
    for i, entry in opt.state_dict()["state"].items():
        assert all(torch.equal(back["state"][i][k], v) for k, v in entry.items())

    write_state_file(rng_state(), tmp_path / "rng.safetensors")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(read_state_file(tmp_path / "rng.safetensors"), tmp_path / "rng.safetensors")
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_a_pointer_to_a_missing_checkpoint_is_a_clear_error(work, capsys):
    (work / "last_checkpoint").write_text("iter_7\n")  # the checkpoint it named was deleted
    rc, err = resume_cli(work, capsys)
    assert rc == 2 and err.startswith(f"error: {work / 'last_checkpoint'} names iter_7")
    assert "checkpoints kept: iter_1, iter_2: resume one with --resume iter_2" in err


def test_checkpoint_names_and_the_pointer(run_dir, tmp_path):
    work = run_dir / "work"
    assert [checkpoint_step(p) for p in list_checkpoints(work)] == [1, 2]
    assert checkpoint_step("iter_12") == 12 and last_checkpoint(work) == work / "iter_2"
    assert last_checkpoint(tmp_path) is None
    for bad in ("iter_", "iter_x", "adapter"):
        with pytest.raises(CheckpointError, match="not a checkpoint name"):
            checkpoint_step(bad)


def test_float16s_loss_scale_is_resumed_and_a_damaged_one_is_a_clear_error(tmp_path):
    """accelerate's GradScaler (float16 on a GPU; a CPU one stands in): its scale and growth count go into state.json
    (numbers, no pickle) and come back, so a resumed run skips and grows at the steps an uninterrupted one does."""
    import json

    from workbench.checkpoint import STATE, load_checkpoint, save_checkpoint

    def parts():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    model, optimizer, scheduler = parts()
    scaler = torch.amp.GradScaler("cpu")
    for poisoned in (True, False, False):  # an overflow halves the scale, then two good steps count towards growth
        optimizer.zero_grad()
        scaler.scale(model(torch.ones(2, 4)).sum()).backward()
        if poisoned:
            model.bias.grad[0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
    saved = scaler.state_dict()
    assert saved["scale"] == 32768.0 and saved["_growth_tracker"] == 2
    cfg = load_recipe("smollm2_135m_tiny_smoke")
    ckpt = save_checkpoint(tmp_path / "iter_3", model, optimizer, scheduler, 3, 1.0, cfg, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu")
    assert load_checkpoint(ckpt, *parts(), verbose=False, scaler=fresh) == 3
    assert fresh.state_dict() == saved
    state = json.loads((ckpt / STATE).read_text())
    for field, value, words in (("scale", -1.0, "a finite float > 0, got -1.0"),
                                ("_growth_tracker", float("inf"), "a finite int >= 0, got inf"),
                                ("growth_interval", 2.5, "a finite int > 0, got 2.5")):
        damaged = json.loads(json.dumps(state))
        damaged["grad_scaler"][field] = value
        (ckpt / STATE).write_text(json.dumps(damaged))
        with pytest.raises(CheckpointError, match=f"state\\.json: grad_scaler\\.{field} must be {words}"):
            load_checkpoint(ckpt, *parts(), verbose=False, scaler=torch.amp.GradScaler("cpu"))
