"""Several processes: the `--launcher accelerate` re-exec, and what must hold before it starts any.

`workbench train CONFIG --launcher accelerate --accelerate-config accelerate_configs/X.yaml [--num-processes N]`
re-executes itself as

    python -m accelerate.commands.launch --config_file X [--num_processes N] -m workbench train CONFIG ...

without the launcher flags (the processes it starts are plain `workbench train`
runs; accelerate tells each its rank). `NPROC_PER_NODE=N workbench train CONFIG`
does the same with N processes, as `NPROC_PER_NODE=N xtuner train` does.
`workbench train CONFIG --deepspeed deepspeed_zero2` is XTuner's spelling of
`--accelerate-config accelerate_configs/deepspeed_zero2.yaml` (`DEEPSPEED_NAMES`,
or the path of an accelerate config whose distributed_type is DEEPSPEED), and runs
as `xtuner train --deepspeed` does: one process unless `NPROC_PER_NODE` or
`--num-processes` says more (the config's own num_processes counts only with
`--accelerate-config`).
Started directly by `accelerate launch -m workbench train ...` or
`torchrun --nproc_per_node N -m workbench train ...`, the training runs as is.

Before starting any process the launcher reads the `Strategy` (workbench/distributed.py)
an accelerate config file asks for (`strategy_of_accelerate_config`) and refuses
what cannot run: a method the strategy cannot train (`check_supported`, which every
process checks again), a strategy this machine cannot start (`check_launchable`:
FSDP without a GPU, DeepSpeed not installed), a work dir that already holds a run.
DeepSpeed runs on CPUs too (its CPU accelerator, float32, gloo): the camp's
`--deepspeed deepspeed_zero2` command can be rehearsed on a laptop.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from workbench.checkpoint import check_fresh_work_dir
from workbench.config import PROJECT_ROOT, Config, ConfigError, resolve_path
from workbench.distributed import Strategy, UnsupportedSetup, check_supported

CONFIGS_DIR = PROJECT_ROOT / "accelerate_configs"
DEEPSPEED_NAMES = ("deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero2_offload", "deepspeed_zero3_offload")
LAUNCHED_ENV = ("LOCAL_RANK", "RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")


def strategy_of_accelerate_config(path: str | os.PathLike, num_processes: int | None = None) -> Strategy:
    """The strategy an accelerate config file asks for (read before any process starts)."""
    data = _read_accelerate_config(Path(path))
    kind = str(data.get("distributed_type", "NO")).upper()
    n = int(num_processes or data.get("num_processes") or 1)
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        stage = ds.get("zero_stage")
        if stage is None and ds.get("deepspeed_config_file"):
            stage = _json_zero_stage(resolve_path(ds["deepspeed_config_file"]))
        return Strategy("deepspeed", n, zero_stage=int(2 if stage is None else stage))  # accelerate's default stage
    if kind == "FSDP":
        return Strategy("fsdp", n, fsdp_version=int((data.get("fsdp_config") or {}).get("fsdp_version", 1)))
    return Strategy("ddp" if n > 1 else "single", n)


def _read_accelerate_config(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"accelerate config {path} not found (shipped ones: {', '.join(shipped_configs())})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise ConfigError(f"{path}: not an accelerate config (no distributed_type); see accelerate_configs/")
    return data


def _json_zero_stage(path: Path) -> int | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError):
        return None


def shipped_configs() -> list[str]:
    return sorted(p.name for p in CONFIGS_DIR.glob("*.yaml"))


# ---------------------------------------------------------------------------
# What this machine can launch
# ---------------------------------------------------------------------------
def check_launchable(strategy: Strategy) -> None:
    """What this machine needs for the strategy (checked by the launcher, before starting processes)."""
    if strategy.kind == "fsdp" and not torch.cuda.is_available():
        raise UnsupportedSetup(f"{strategy.describe()} needs CUDA GPUs and none is visible here; on CPUs use "
                               "accelerate_configs/cpu_2proc.yaml (data parallel over gloo) or a DeepSpeed config.")
    if strategy.kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UnsupportedSetup("DeepSpeed is not installed in this environment (pip install deepspeed, as make setup "
                               "does); or use accelerate_configs/ddp_1node.yaml, fsdp.yaml or, on CPUs, cpu_2proc.yaml.")


# ---------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------
def inside_launched_process() -> bool:
    """True in a process started by accelerate launch, torchrun or mpirun."""
    return any(k in os.environ for k in LAUNCHED_ENV)


def find_accelerate_config(name: str) -> Path:
    """A path (from the current directory or the project root), or the name of a shipped config."""
    p = resolve_path(name)
    if p.exists():
        return p
    for candidate in (CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError(f"accelerate config {name!r} not found; shipped ones (in {CONFIGS_DIR}): {', '.join(shipped_configs())}")


def find_deepspeed_config(name: str) -> Path:
    """XTuner's `--deepspeed NAME` (one of DEEPSPEED_NAMES) or an accelerate config file that asks for DeepSpeed."""
    if name in DEEPSPEED_NAMES:
        return CONFIGS_DIR / f"{name}.yaml"
    valid = ", ".join(DEEPSPEED_NAMES)
    path = resolve_path(name)
    if not path.is_file():
        raise ConfigError(f"--deepspeed {name!r}: not a known name ({valid}) nor a file")
    if path.suffix == ".json":
        raise ConfigError(f"--deepspeed {name}: a DeepSpeed JSON file goes into an accelerate config "
                          "(deepspeed_config: {deepspeed_config_file: FILE}, see accelerate_configs/deepspeed_zero2.yaml); "
                          f"pass that YAML, or one of {valid}")
    if str(_read_accelerate_config(path).get("distributed_type", "")).upper() != "DEEPSPEED":
        raise ConfigError(f"--deepspeed {name}: this accelerate config is not a DeepSpeed one "
                          f"(use --accelerate-config for it); names: {valid}")
    return path


def train_argv(args) -> list[str]:
    """The `workbench train` arguments each launched process gets: the same run, without the launcher flags."""
    argv = ["train", args.config]
    if args.work_dir:
        argv += ["--work-dir", args.work_dir]
    if args.resume is not None:
        argv += ["--resume", args.resume]
    if args.cfg_options:
        argv += ["--cfg-options", *args.cfg_options]
    return argv


def accelerate_command(args, accelerate_config: Path | None, num_processes: int | None) -> list[str]:
    """`accelerate launch ... -m workbench train ...` as an argument list (run with this Python)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        cmd += ["--config_file", str(accelerate_config)]
    else:  # no config: N processes of plain data parallelism (GPUs, or gloo on CPUs)
        cmd += (["--multi_gpu"] if (num_processes or 1) > 1 else []) + [
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    return cmd + ["-m", "workbench", *train_argv(args)]


def launch(args, cfg: Config) -> int:
    """Check what can be checked here, then re-execute `workbench train` under `accelerate launch`."""
    if inside_launched_process():
        raise UnsupportedSetup("--launcher is for the command you type: this process was already started by a "
                               "launcher (accelerate launch / torchrun); drop --launcher and its options.")
    path = _launch_config(args)
    n = args.num_processes or _env_nproc() or (1 if getattr(args, "deepspeed", None) else None)  # xtuner: 1 unless told
    if path is None and not n:
        raise ConfigError("--launcher accelerate needs --accelerate-config FILE or --num-processes N "
                          f"(shipped configs: {', '.join(shipped_configs())})")
    strategy = strategy_of_accelerate_config(path, n) if path else Strategy("ddp" if n > 1 else "single", n)
    check_supported(cfg, strategy)
    check_launchable(strategy)
    check_fresh_work_dir(Path(args.work_dir) if args.work_dir else cfg.resolved_work_dir, fresh=args.resume is None)
    from workbench.models import resolve_model_path  # a remote-code folder (InternLM2) is converted once here, not in every process

    resolve_model_path(cfg.pretrained_model_name_or_path)
    cmd = accelerate_command(args, path, n)
    print(f"launching {strategy.describe()}: {shlex.join(cmd)}", flush=True)
    env = dict(os.environ)
    if strategy.kind == "deepspeed" and not torch.cuda.is_available():
        print("note: no GPU here: DeepSpeed runs on the CPUs (its CPU accelerator, float32, gloo), slowly; "
              "the same command trains on GPUs.", flush=True)
        env["DS_ACCELERATOR"] = "cpu"  # told, instead of guessing it with a warning in every process
    return subprocess.run(cmd, env=env).returncode


def _launch_config(args) -> Path | None:
    """The accelerate config file of --accelerate-config or --deepspeed (not both)."""
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed and args.accelerate_config:
        raise ConfigError("--deepspeed NAME is a spelling of --accelerate-config accelerate_configs/NAME.yaml: give one of them")
    if deepspeed:
        return find_deepspeed_config(deepspeed)
    return find_accelerate_config(args.accelerate_config) if args.accelerate_config else None


def _env_nproc() -> int | None:
    """XTuner's NPROC_PER_NODE, when set."""
    raw = os.environ.get("NPROC_PER_NODE", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"NPROC_PER_NODE must be a positive integer, got {raw!r}")
    return int(raw)


def wants_launcher(args) -> bool:
    """--launcher accelerate (or its options), or NPROC_PER_NODE > 1 around a command typed by hand."""
    if args.launcher == "none":
        return False
    if args.launcher == "accelerate" or args.accelerate_config or getattr(args, "deepspeed", None) or args.num_processes:
        return True
    return not inside_launched_process() and (_env_nproc() or 1) > 1
