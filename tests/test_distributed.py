"""Several processes: 2 CPU processes (gloo) train exactly as 1 process with twice the batch.

The first tests start real processes with `accelerate launch --config_file
accelerate_configs/cpu_2proc.yaml -m workbench train ...` on the tiny random
model; the fast ones check the shipped accelerate configs against accelerate's
own parser, the launcher's command line and the refused combinations.
"""
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workbench import cli
from workbench.config import load_recipe
from workbench.io import read_jsonl
from workbench.checkpoint import list_checkpoints
from workbench.distributed import Strategy, UnsupportedSetup, check_supported
from workbench.launch import shipped_configs, strategy_of_accelerate_config
from workbench.train import train
from launch_helpers import CONFIGS, OPTIONS, RECIPE, metrics, one_process_run, run

N_QUESTIONS = len(load_recipe(RECIPE).evaluation_inputs)


def accelerate_launch(*train_args: str) -> str:
    exe = Path(sys.executable).with_name("accelerate")
    launcher = [str(exe), "launch"] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    return run([*launcher, "--config_file", str(CONFIGS / "cpu_2proc.yaml"), "-m", "workbench", "train", *train_args])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """1 process, batch_size 2 (in this process)."""
    return one_process_run(tmp_path_factory.mktemp("one") / "w")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """2 processes, batch_size 1 each, started by accelerate launch; returns the work dir and the output."""
    work = tmp_path_factory.mktemp("two") / "w"
    out = accelerate_launch(RECIPE, "--work-dir", str(work), "--cfg-options", *OPTIONS, "batch_size=1")
    return work, out


# ---------------------------------------------------------------------------
# 2 real processes
# ---------------------------------------------------------------------------
def test_two_processes_match_one_process_with_twice_the_batch(one_process, two_processes):
    one, two = metrics(one_process), metrics(two_processes[0])
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["trained_tokens"] for r in two] == [r["trained_tokens"] for r in one], "the same rows every step"
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert [r["lr"] for r in two] == pytest.approx([r["lr"] for r in one])


def test_two_processes_write_everything_once(two_processes):
    work, out = two_processes
    assert [p.name for p in list_checkpoints(work)] == ["iter_2", "iter_4"]
    for ckpt in list_checkpoints(work):
        names = {p.name for p in ckpt.iterdir()}
        assert {"rng_0.safetensors", "rng_1.safetensors", "trainable.safetensors", "optimizer.safetensors",
                "scheduler.json", "state.json"} <= names and not [n for n in names if n.endswith(".pt")]
        assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    assert (work / "last_checkpoint").read_text().strip() == "iter_4"
    lines = (work / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4, "one metrics line per step, written by the main process only"
    evals = read_jsonl(work / "eval_log.jsonl")
    assert [e["step"] for e in evals] == [0] * N_QUESTIONS + [2] * N_QUESTIONS + [4] * N_QUESTIONS
    assert (work / "adapter" / "adapter_config.json").exists() and (work / "adapter" / "adapter_model.safetensors").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".")], "no temporary folder is left behind"
    assert out.count("work dir:") == 1 and out.count("done. checkpoints") == 1 and out.count("records:") == 1
    assert out.count("[eval @ step") == 3


def test_two_process_resume_matches_the_uninterrupted_run(two_processes, tmp_path):
    """Resume iter_2 of the 2-process run (through --launcher) and end with the same losses and logs."""
    straight = two_processes[0]
    work = tmp_path / "w"
    shutil.copytree(straight, work)
    shutil.rmtree(work / "iter_4")
    shutil.rmtree(work / "adapter")
    (work / "last_checkpoint").write_text("iter_2\n")
    out = run([sys.executable, "-m", "workbench", "train", RECIPE, "--work-dir", str(work), "--resume",
               "--launcher", "accelerate", "--accelerate-config", "cpu_2proc", "--cfg-options", *OPTIONS, "batch_size=1"])
    assert out.count("launching DDP x 2 processes") == 1
    assert out.count("resuming from") == 1, "printed by the main process only"
    assert [r["step"] for r in metrics(work)] == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics(work)] == pytest.approx([r["loss"] for r in metrics(straight)], rel=1e-6)
    assert [e["step"] for e in read_jsonl(work / "eval_log.jsonl")] == [e["step"] for e in read_jsonl(straight / "eval_log.jsonl")]
    assert {"rng_0.safetensors", "rng_1.safetensors"} <= {p.name for p in (work / "iter_4").iterdir()}
    assert (work / "adapter" / "adapter_config.json").exists()


def test_qlora_trains_on_two_processes(tmp_path):
    work = tmp_path / "q"
    accelerate_launch(RECIPE, "--work-dir", str(work), "--cfg-options", "method=qlora", "max_steps=2", "save_steps=2",
                      "evaluation_freq=0", "max_length=96")
    recs = metrics(work)
    assert [r["step"] for r in recs] == [1, 2] and all(0 < r["loss"] < 100 and r["grad_norm"] > 0 for r in recs)
    assert {"rng_0.safetensors", "rng_1.safetensors"} <= {p.name for p in (work / "iter_2").iterdir()}
    assert (work / "adapter" / "adapter_config.json").exists()


# ---------------------------------------------------------------------------
# Configs, launcher and refusals (no processes started)
# ---------------------------------------------------------------------------
EXPECTED = {
    "cpu_2proc.yaml": Strategy("ddp", 2), "ddp_1node.yaml": Strategy("ddp", 2), "ddp_2nodes.yaml": Strategy("ddp", 16),
    "deepspeed_zero2.yaml": Strategy("deepspeed", 2, zero_stage=2),
    "deepspeed_zero2_offload.yaml": Strategy("deepspeed", 2, zero_stage=2),
    "deepspeed_zero3.yaml": Strategy("deepspeed", 2, zero_stage=3),
    "deepspeed_zero3_offload.yaml": Strategy("deepspeed", 2, zero_stage=3),
    "fsdp.yaml": Strategy("fsdp", 2, fsdp_version=2),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_accelerate_configs_are_valid(name):
    """Each file parses with accelerate's own config loader and launcher checks, and documents its launch command."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = CONFIGS / name
    text = path.read_text()
    header = text.split("\ncompute_environment")[0]
    assert text.startswith("# ") and "Pick it" in header
    assert f"accelerate launch --config_file accelerate_configs/{name}" in header and "-m workbench train" in header
    load_config_from_file(str(path))  # unknown keys raise
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "workbench", "train", RECIPE])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(EXPECTED[name].zero_stage)
    else:
        env = prepare_multi_gpu_env(args)
        assert args.multi_gpu or env.get("ACCELERATE_USE_FSDP") == "true"
    assert strategy_of_accelerate_config(path) == EXPECTED[name]
    assert set(shipped_configs()) == set(EXPECTED)


@pytest.mark.parametrize("method,strategy,words", [
    ("qlora", Strategy("deepspeed", 2, zero_stage=3), "ZeRO-3"),
    ("qlora", Strategy("fsdp", 2, fsdp_version=2), "FSDP"),
    ("lora", Strategy("fsdp", 2, fsdp_version=1), "fsdp_version: 2"),
])
def test_unsupported_combinations_are_refused(method, strategy, words):
    with pytest.raises(UnsupportedSetup, match=words):
        check_supported(load_recipe(RECIPE).replace(method=method), strategy)


@pytest.mark.parametrize("method,strategy", [
    ("qlora", Strategy("ddp", 2)), ("qlora", Strategy("deepspeed", 2, zero_stage=2)),
    ("lora", Strategy("deepspeed", 2, zero_stage=3)), ("full", Strategy("fsdp", 2, fsdp_version=2)),
    ("full", Strategy("deepspeed", 4, zero_stage=3)),
])
def test_supported_combinations_pass(method, strategy):
    check_supported(load_recipe(RECIPE).replace(method=method), strategy)


def test_cli_refuses_qlora_with_zero3_cleanly(capsys, tmp_path):
    rc = cli.main(["train", RECIPE, "--work-dir", str(tmp_path / "w"), "--cfg-options", "method=qlora",
                   "--launcher", "accelerate", "--accelerate-config", "accelerate_configs/deepspeed_zero3.yaml"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: method qlora cannot run under DeepSpeed ZeRO-3") and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_train_refuses_before_touching_the_work_dir(monkeypatch, tmp_path):
    """Inside a launched process the same check runs on the accelerator's strategy (here a fake ZeRO-3 one)."""
    import workbench.train as train_mod
    from accelerate.utils import DistributedType

    fake = SimpleNamespace(num_processes=2, state=SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                                                  deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    monkeypatch.setattr(train_mod, "make_accelerator", lambda cfg: fake)
    with pytest.raises(UnsupportedSetup, match="ZeRO-3"):
        train(load_recipe(RECIPE).replace(method="qlora"), tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()


@pytest.fixture()
def launched(monkeypatch):
    """Capture the command the launcher would run."""
    import workbench.launch as launch_mod

    calls = []
    monkeypatch.setattr(launch_mod.subprocess, "run",
                        lambda cmd, env=None: calls.append(cmd) or SimpleNamespace(returncode=0, env=env))
    for k in ("NPROC_PER_NODE", "LOCAL_RANK", "RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(k, raising=False)
    return calls


def test_launcher_reexecutes_under_accelerate_launch(launched, tmp_path):
    rc = cli.main(["train", RECIPE, "--work-dir", str(tmp_path / "w"), "--launcher", "accelerate",
                   "--accelerate-config", "cpu_2proc", "--num-processes", "3", "--cfg-options", "max_steps=1", "lr=1e-4"])
    assert rc == 0 and len(launched) == 1
    cmd = launched[0]
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(CONFIGS / "cpu_2proc.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "3"
    assert cmd[cmd.index("-m", 3):] == ["-m", "workbench", "train", RECIPE, "--work-dir", str(tmp_path / "w"),
                                        "--cfg-options", "max_steps=1", "lr=1e-4"]
    assert not {"--launcher", "--accelerate-config", "--num-processes"} & set(cmd)


def test_nproc_per_node_launches_like_xtuner(launched, monkeypatch, tmp_path):
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    assert cli.main(["train", RECIPE, "--work-dir", str(tmp_path / "w"), "--resume", "iter_2"]) == 0
    cmd = launched[0]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-2:] == ["--resume", "iter_2"]


def test_launcher_is_refused_inside_a_launched_process(launched, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc = cli.main(["train", RECIPE, "--work-dir", str(tmp_path / "w"), "--launcher", "accelerate", "--num-processes", "2"])
    assert rc == 2 and "already started by a launcher" in capsys.readouterr().err and not launched


def test_launcher_checks_the_work_dir_before_starting(launched, capsys, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "last_checkpoint").write_text("iter_1\n")
    rc = cli.main(["train", RECIPE, "--work-dir", str(work), "--accelerate-config", "cpu_2proc"])
    assert rc == 2 and "already holds a run" in capsys.readouterr().err and not launched


# ---------------------------------------------------------------------------
# --deepspeed NAME: XTuner's spelling of --accelerate-config accelerate_configs/NAME.yaml
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero2_offload", "deepspeed_zero3_offload"])
def test_deepspeed_names_map_to_the_shipped_configs(name):
    from workbench.launch import DEEPSPEED_NAMES, find_deepspeed_config

    path = find_deepspeed_config(name)
    assert name in DEEPSPEED_NAMES and path == CONFIGS / f"{name}.yaml"
    assert strategy_of_accelerate_config(path) == EXPECTED[f"{name}.yaml"]
    assert find_deepspeed_config(str(path)) == path  # a path to a DeepSpeed accelerate config works too


def test_deepspeed_launches_the_matching_accelerate_config(launched, monkeypatch, tmp_path):
    import workbench.launch as launch_mod

    monkeypatch.setattr(launch_mod, "check_launchable", lambda strategy: None)  # as on a machine with GPUs and DeepSpeed
    rc = cli.main(["train", RECIPE, "--work-dir", str(tmp_path / "w"), "--deepspeed", "deepspeed_zero2",
                   "--cfg-options", "max_steps=1"])
    assert rc == 0 and len(launched) == 1
    cmd = launched[0]
    assert cmd[cmd.index("--config_file") + 1] == str(CONFIGS / "deepspeed_zero2.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "1", "as xtuner train --deepspeed: one process unless told"
    assert cmd[cmd.index("-m", 3):] == ["-m", "workbench", "train", RECIPE, "--work-dir", str(tmp_path / "w"),
                                        "--cfg-options", "max_steps=1"]
    assert "--deepspeed" not in cmd


def test_deepspeed_takes_its_processes_from_nproc_per_node(launched, monkeypatch, tmp_path):
    import workbench.launch as launch_mod

    monkeypatch.setattr(launch_mod, "check_launchable", lambda strategy: None)
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    assert cli.main(["train", RECIPE, "--work-dir", str(tmp_path / "w"), "--deepspeed", "deepspeed_zero2"]) == 0
    cmd = launched[0]
    assert cmd[cmd.index("--num_processes") + 1] == "4"


def test_deepspeed_without_deepspeed_installed_is_refused_clearly(launched, monkeypatch, capsys, tmp_path):
    import workbench.launch as launch_mod

    find_spec = launch_mod.importlib.util.find_spec
    monkeypatch.setattr(launch_mod.importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    rc = cli.main(["train", RECIPE, "--work-dir", str(tmp_path / "w"), "--deepspeed", "deepspeed_zero2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: DeepSpeed is not installed") and "cpu_2proc.yaml" in err
    assert "Traceback" not in err and not launched and not (tmp_path / "w").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal is for one without")
def test_fsdp_without_cuda_is_refused_clearly(launched, capsys, tmp_path):
    rc = cli.main(["train", RECIPE, "--work-dir", str(tmp_path / "w"), "--accelerate-config", "fsdp"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: FSDP2") and "needs CUDA GPUs" in err and "Traceback" not in err
    assert not launched and not (tmp_path / "w").exists()


@pytest.mark.parametrize("value,words", [
    ("deepspeed_zero4", "not a known name (deepspeed_zero2, deepspeed_zero3, deepspeed_zero2_offload, deepspeed_zero3_offload)"),
    ("accelerate_configs/ddp_1node.yaml", "not a DeepSpeed one"),
])
def test_deepspeed_refuses_unknown_names_and_other_configs(launched, capsys, tmp_path, value, words):
    rc = cli.main(["train", RECIPE, "--work-dir", str(tmp_path / "w"), "--deepspeed", value])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err and not launched


def test_deepspeed_and_accelerate_config_together_are_refused(launched, capsys, tmp_path):
    rc = cli.main(["train", RECIPE, "--work-dir", str(tmp_path / "w"), "--deepspeed", "deepspeed_zero2",
                   "--accelerate-config", "ddp_1node"])
    assert rc == 2 and "give one of them" in capsys.readouterr().err and not launched


def test_train_help_names_the_deepspeed_spellings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--deepspeed NAME" in out and "deepspeed_zero2" in out and "deepspeed_zero3_offload" in out
