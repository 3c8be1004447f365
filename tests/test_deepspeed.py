"""DeepSpeed for real on this CPU: XTuner's `workbench train CONFIG --deepspeed deepspeed_zero2`, 2 processes.

DeepSpeed runs on CPUs with its own CPU accelerator (float32, gloo between the processes), so the camp's
command is exercised here and not only on a GPU (tests/test_gpu.py runs it there):
* ZeRO-2 and ZeRO-3 (optimizer state, gradients and, for ZeRO-3, the weights split over the processes)
  train exactly as one process with twice the batch: the same losses, gradient norms and trained weights;
* each writes its split state to iter_N/engine_state/ beside the workbench's own checkpoint files, and a
  run resumed from iter_2 ends with the uninterrupted run's losses and weights;
* the checkpoint converts to an adapter that plain peft reads;
* DeepSpeed's own files are read weights-only: a planted file that would run code on resume is refused;
* QLoRA and a full fine-tune train under ZeRO-2 and ZeRO-3 (the combinations `check_supported` allows).
Skipped where deepspeed is not installed (`make setup` installs it).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch_helpers import OPTIONS, RECIPE, metrics, one_process_run, run
from planted import RunsCode
from workbench.checkpoint import ENGINE_STATE, CheckpointError, list_checkpoints
from workbench.safe_unpickle import weights_only_load

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (make setup installs it)")
STAGES = ["deepspeed_zero2", "deepspeed_zero3"]


def train_command(name: str, work, *options: str, resume: bool = False) -> list[str]:
    """`workbench train RECIPE --deepspeed NAME --num-processes 2` (the launcher re-executes under accelerate launch)."""
    return [sys.executable, "-m", "workbench", "train", RECIPE, "--work-dir", str(work),
            *(["--resume"] if resume else []), "--deepspeed", name, "--num-processes", "2",
            "--cfg-options", *OPTIONS, "batch_size=1", *options]


def train_with(name: str, work, *options: str, resume: bool = False) -> str:
    return run(train_command(name, work, *options, resume=resume))


def trained(ckpt) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "trainable.safetensors")


def assert_same_weights(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=tol, rtol=tol), name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, batch_size 2, no DeepSpeed."""
    return one_process_run(tmp_path_factory.mktemp("one") / "w")


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """ZeRO-2 and ZeRO-3, 2 processes of batch_size 1: {name: (work dir, output)}."""
    runs = {}
    for name in STAGES:
        work = tmp_path_factory.mktemp(name) / "w"
        runs[name] = work, train_with(name, work)
    return runs


@pytest.mark.parametrize("name", STAGES)
def test_zero_trains_as_one_process_with_twice_the_batch(one_process, zero_runs, name):
    work, out = zero_runs[name]
    one, zero = metrics(one_process), metrics(work)
    assert [r["step"] for r in zero] == [1, 2, 3, 4]
    assert [r["trained_tokens"] for r in zero] == [r["trained_tokens"] for r in one], "the same rows every step"
    assert [r["loss"] for r in zero] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["grad_norm"] for r in zero] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert [r["lr"] for r in zero] == pytest.approx([r["lr"] for r in one])
    assert_same_weights(trained(work / "iter_4"), trained(one_process / "iter_4"))
    stage = name[-1]
    assert out.count(f"launching DeepSpeed ZeRO-{stage} x 2 processes") == 1
    assert out.count("note: no GPU here: DeepSpeed runs on the CPUs") == (0 if torch.cuda.is_available() else 1)
    assert out.count("done. checkpoints") == 1 and out.count("[eval @ step") == 3, "the main process reports once"


@pytest.mark.parametrize("name", STAGES)
def test_zero_checkpoints_hold_the_split_state(zero_runs, name):
    work, _ = zero_runs[name]
    assert [p.name for p in list_checkpoints(work)] == ["iter_2", "iter_4"]
    for ckpt in list_checkpoints(work):
        names = {p.name for p in ckpt.iterdir()}
        assert {"rng_0.safetensors", "rng_1.safetensors", "trainable.safetensors", "scheduler.json", "state.json",
                ENGINE_STATE} <= names
        assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
        shards = sorted(p.name for p in (ckpt / ENGINE_STATE).rglob("*optim_states.pt"))
        assert len(shards) == 2, f"one optimizer shard per process: {shards}"
    assert (work / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("name", STAGES)
def test_zero_resume_matches_the_uninterrupted_run(zero_runs, name, tmp_path):
    straight, _ = zero_runs[name]
    work = tmp_path / "w"
    shutil.copytree(straight, work)
    shutil.rmtree(work / "iter_4")
    shutil.rmtree(work / "adapter")
    (work / "last_checkpoint").write_text("iter_2\n")
    out = train_with(name, work, resume=True)
    assert out.count("resuming from") == 1
    assert [r["loss"] for r in metrics(work)] == pytest.approx([r["loss"] for r in metrics(straight)], rel=1e-6)
    assert_same_weights(trained(work / "iter_4"), trained(straight / "iter_4"), tol=1e-6)


def plant(state_file: Path, marker: Path) -> None:
    state = torch.load(state_file, weights_only=False)  # the test's own file, to plant into
    state["planted"] = RunsCode(marker)
    torch.save(state, state_file)


@pytest.mark.parametrize("name", STAGES)
def test_deepspeed_files_load_weights_only(zero_runs, name):
    work, _ = zero_runs[name]
    files = sorted(work.glob(f"iter_*/{ENGINE_STATE}/**/*.pt"))
    assert len(files) >= 6, files  # per checkpoint: the model states and one optimizer shard per process
    for f in files:
        assert isinstance(weights_only_load(f, map_location="cpu"), dict), f


def test_weights_only_load_refuses_a_file_that_runs_code(tmp_path):
    f, marker = tmp_path / "optim_states.pt", tmp_path / "ran"
    torch.save({"w": torch.ones(2)}, f)
    assert torch.equal(weights_only_load(f)["w"], torch.ones(2))
    plant(f, marker)
    with pytest.raises(CheckpointError, match=f"{f}: holds .*open.*does not load it"):
        weights_only_load(f)
    assert not marker.exists()


def test_resume_refuses_a_planted_deepspeed_file(zero_runs, tmp_path):
    straight, _ = zero_runs["deepspeed_zero2"]
    work, marker = tmp_path / "w", tmp_path / "ran"
    shutil.copytree(straight, work)
    shutil.rmtree(work / "iter_4")
    (work / "last_checkpoint").write_text("iter_2\n")
    target = next((work / "iter_2" / ENGINE_STATE).rglob("zero_pp_rank_0_*optim_states.pt"))
    plant(target, marker)
    proc = subprocess.run(train_command("deepspeed_zero2", work, resume=True), capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert f"{target}: holds" in out and "does not load it" in out, out[-3000:]
    assert not marker.exists(), "the planted file ran"
    assert not (work / "iter_4").exists()


def test_a_zero3_checkpoint_converts_to_an_adapter_plain_peft_reads(zero_runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from workbench import cli
    from workbench.models import TINY_MODEL, resolve_model_path

    work, _ = zero_runs["deepspeed_zero3"]
    assert cli.main(["convert", "pth_to_hf", str(work / "config.yaml"), str(work / "iter_4"), str(tmp_path / "hf"),
                     "--fp32"]) == 0
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY_MODEL), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "hf")
    loaded = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert_same_weights(loaded, trained(work / "iter_4"), tol=0)  # the names are peft's own; float32 throughout
    assert any(float(p.abs().max()) > 0 for n, p in loaded.items() if "lora_B" in n), "LoRA B was trained"


@pytest.mark.parametrize("name,method", [("deepspeed_zero2", "qlora"), ("deepspeed_zero3", "full")])
def test_other_methods_train_under_zero(name, method, tmp_path):
    work = tmp_path / "w"
    train_with(name, work, f"method={method}", "max_steps=2", "save_steps=2", "evaluation_freq=0")
    recs = metrics(work)
    assert [r["step"] for r in recs] == [1, 2] and all(0 < r["loss"] < 100 and r["grad_norm"] > 0 for r in recs)
    assert (work / "iter_2" / ENGINE_STATE).is_dir() and (work / "iter_2" / "trainable.safetensors").exists()


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch: DeepSpeed finds its accelerator itself")
def test_writing_a_model_prints_no_deepspeed_warning(tmp_path):
    """transformers' save_pretrained imports DeepSpeed through accelerate; on CPUs it is told its accelerator."""
    import os
    import subprocess

    code = ("import sys; from workbench.models import TINY_MODEL, load_model; "
            "load_model(TINY_MODEL).save_pretrained(sys.argv[1]); print('deepspeed' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("True"), "DeepSpeed was imported (the case this guards)"
    assert "accelerator" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
