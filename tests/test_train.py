"""Training on the tiny random model: resume, atomic checkpoints, reproducibility, accumulation."""
import pytest

import workbench.checkpoint as checkpoint_mod
from workbench.checkpoint import list_checkpoints
from workbench.config import load_config, load_recipe
from workbench.io import read_jsonl
from workbench.train import train
from train_helpers import Stop, losses, train_interrupted_and_resumed


@pytest.fixture()
def cfg(tmp_path):
    return load_recipe("smollm2_135m_tiny_smoke").replace(max_steps=6, save_steps=3, evaluation_freq=0,
                                                          lora_dropout=0.1, save_total_limit=-1)


def test_same_seed_same_losses(cfg, tmp_path):
    a = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    assert len(a.metrics) == 6
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.parametrize("changes", [{}, dict(loraplus_lr_ratio=4.0), dict(neftune_noise_alpha=5.0)],
                         ids=["one_rate", "loraplus", "neftune"])
def test_resume_matches_uninterrupted_run(cfg, tmp_path, changes):
    # LoRA+'s two parameter groups come back with their rates; NEFTune's noise comes from the saved generators
    cfg = cfg.replace(**changes)
    train(cfg, tmp_path / "straight", progress=False)

    train_interrupted_and_resumed(cfg, tmp_path / "resumed", stop_at=4)  # iter_3 saved; dies in step 4's bookkeeping
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-5, abs=1e-6)
    metrics = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    ratio = changes.get("loraplus_lr_ratio")  # LoRA+: the B matrices' rate logged beside the A matrices'
    assert all(r["lr_b"] == pytest.approx(r["lr"] * ratio) if ratio else "lr_b" not in r for r in metrics)


def test_neftune_noise_changes_training_and_is_seeded(cfg, tmp_path):
    noisy = cfg.replace(neftune_noise_alpha=5.0)
    train(noisy, tmp_path / "a", progress=False)
    train(noisy, tmp_path / "b", progress=False)
    train(cfg, tmp_path / "clean", progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a")[0] != losses(tmp_path / "clean")[0]


def test_killed_during_save_leaves_previous_checkpoint_usable(cfg, tmp_path, monkeypatch):
    work = tmp_path / "w"
    real_save = checkpoint_mod.save_file
    calls = {"n": 0}

    def dying_save(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)
        calls["n"] += path.endswith("trainable.safetensors")
        if calls["n"] == 2:  # the second checkpoint (iter_6): write half of it, then die
            raise Stop

    monkeypatch.setattr(checkpoint_mod, "save_file", dying_save)
    with pytest.raises(Stop):
        train(cfg, work, progress=False)
    monkeypatch.setattr(checkpoint_mod, "save_file", real_save)
    assert [p.name for p in list_checkpoints(work)] == ["iter_3"]
    assert not [p for p in work.iterdir() if p.name.startswith(".")], "no half-written folder is left behind"
    assert (work / "last_checkpoint").read_text().strip() == "iter_3"
    result = train(cfg, work, resume=True, progress=False)
    assert result.metrics[-1]["step"] == 6


def test_work_dir_layout(cfg, tmp_path):
    work = tmp_path / "w"
    res = train(cfg.replace(evaluation_freq=3, save_total_limit=1), work, progress=False)
    assert load_config(work / "config.yaml") == cfg.replace(evaluation_freq=3, save_total_limit=1, work_dir=str(work))
    assert [p.name for p in list_checkpoints(work)] == ["iter_6"], "save_total_limit=1 keeps the newest only"
    rec = res.metrics[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(rec)
    assert sorted({e["step"] for e in res.evaluations}) == [0, 3, 6]
    assert (work / "adapter" / "adapter_config.json").exists() and (work / "adapter" / "prompt.json").exists()
    assert (work / "data" / "generated.jsonl").exists() and (work / "dataset_report.txt").exists()
    ckpt = work / "iter_6"
    names = {p.name for p in ckpt.iterdir()}
    assert {"trainable.safetensors", "optimizer.safetensors", "scheduler.json", "rng_0.safetensors", "state.json",
            "config.yaml"} <= names
    assert not [n for n in names if n.endswith((".pt", ".pkl", ".bin"))], "no pickle in a checkpoint"


def test_fresh_run_refuses_to_overwrite_a_run(cfg, tmp_path):
    train(cfg.replace(max_steps=1, save_steps=1), tmp_path / "w", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg.replace(max_steps=1, save_steps=1), tmp_path / "w", progress=False)


def test_accumulation_equals_a_bigger_batch(cfg, tmp_path):
    base = cfg.replace(lora_dropout=0.0, max_steps=3, save_steps=3, pack_to_max_length=False)
    big = train(base.replace(batch_size=4, accumulative_counts=1), tmp_path / "big", progress=False)
    acc = train(base.replace(batch_size=1, accumulative_counts=4), tmp_path / "acc", progress=False)
    assert [r["loss"] for r in acc.metrics] == pytest.approx([r["loss"] for r in big.metrics], rel=1e-4)


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_other_methods_train(cfg, tmp_path, method):
    res = train(cfg.replace(method=method, max_steps=2, save_steps=2), tmp_path / method, progress=False)
    assert len(res.metrics) == 2 and all(r["loss"] > 0 for r in res.metrics)
    marker = "config.json" if method == "full" else "adapter_config.json"
    assert (tmp_path / method / "adapter" / marker).exists()


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_evaluation_does_not_change_training(cfg, tmp_path, method):
    """Answering evaluation_inputs between steps must leave the losses untouched (it once broke QLoRA's gradients)."""
    base = cfg.replace(method=method, max_steps=4, save_steps=4, lora_dropout=0.0)
    quiet = train(base.replace(evaluation_freq=0), tmp_path / "quiet", progress=False)
    noisy = train(base.replace(evaluation_freq=1), tmp_path / "noisy", progress=False)
    assert [r["loss"] for r in noisy.metrics] == pytest.approx([r["loss"] for r in quiet.metrics], rel=1e-5)
    assert quiet.metrics[-1]["loss"] < quiet.metrics[0]["loss"], "the model must learn something in 4 steps"
