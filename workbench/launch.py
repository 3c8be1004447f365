"""Several processes: the `--launcher accelerate` re-exec, and what each strategy can train.

`workbench train CONFIG --launcher accelerate --accelerate-config accelerate_configs/X.yaml [--num-processes N]`
re-executes itself as

    python -m accelerate.commands.launch --config_file X [--num_processes N] -m workbench train CONFIG ...

without the launcher flags (the processes it starts are plain `workbench train`
runs; accelerate tells each its rank). `NPROC_PER_NODE=N workbench train CONFIG`
does the same with N processes, as `NPROC_PER_NODE=N xtuner train` does.
Started directly by `accelerate launch -m workbench train ...` or
`torchrun --nproc_per_node N -m workbench train ...`, the training runs as is.

A `Strategy` names how the processes share the work: one process, DDP (every
process holds the whole model), DeepSpeed ZeRO stage 0-3, or FSDP. It is read
from the running accelerator (`strategy_of`) or, before launching, from an
accelerate config file (`strategy_of_accelerate_config`). `check_supported`
refuses, with the reason, the combinations the libraries cannot train; the
launcher checks before starting any process, and every process checks again.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from workbench.config import PROJECT_ROOT, Config, ConfigError, resolve_path

CONFIGS_DIR = PROJECT_ROOT / "accelerate_configs"
LAUNCHED_ENV = ("LOCAL_RANK", "RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")


class UnsupportedSetup(ConfigError):
    """This method cannot train under this distributed strategy (or here); the message says why and what works."""


@dataclass(frozen=True)
class Strategy:
    """How the processes of a run share the work."""

    kind: str = "single"  # single, ddp, deepspeed or fsdp
    num_processes: int = 1
    zero_stage: int = 0  # DeepSpeed only
    fsdp_version: int = 0  # FSDP only

    @property
    def shards_weights(self) -> bool:
        """Each process holds only a shard of every weight (ZeRO-3, FSDP): reading a weight needs all processes."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)

    @property
    def engine_state(self) -> bool:
        """Optimizer state is split over the processes, so accelerate's save_state/load_state must checkpoint it."""
        return self.kind in ("deepspeed", "fsdp")

    def describe(self) -> str:
        name = {"single": "one process", "ddp": "DDP", "deepspeed": f"DeepSpeed ZeRO-{self.zero_stage}",
                "fsdp": f"FSDP{self.fsdp_version}"}[self.kind]
        return f"{name} x {self.num_processes} processes" if self.kind != "single" else name


def strategy_of(accelerator) -> Strategy:
    """The strategy an accelerator runs (from `accelerator.state.distributed_type`)."""
    from accelerate.utils import DistributedType

    state, n = accelerator.state, accelerator.num_processes
    if state.distributed_type == DistributedType.DEEPSPEED:
        return Strategy("deepspeed", n, zero_stage=int(state.deepspeed_plugin.zero_stage))
    if state.distributed_type == DistributedType.FSDP:
        return Strategy("fsdp", n, fsdp_version=int(getattr(state.fsdp_plugin, "fsdp_version", 1) or 1))
    return Strategy("ddp" if n > 1 else "single", n)


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
# What can train where
# ---------------------------------------------------------------------------
QLORA_SHARDED = (
    "the workbench stores QLoRA's 4-bit base weights as bitsandbytes uint8 blocks pinned to each process's GPU "
    "(bnb_4bit_quant_storage=uint8 and a device_map), and {what} can only split floating-point weights it places "
    "itself (the peft/bitsandbytes recipes for it load the base with bnb_4bit_quant_storage=bfloat16{extra}). "
    "For QLoRA use accelerate_configs/ddp_1node.yaml or deepspeed_zero2.yaml (the 4-bit base is small enough to "
    "copy to every GPU); to shard the weights, train method lora with {config}.")


def check_supported(cfg: Config, strategy: Strategy) -> None:
    """Refuse what the libraries cannot train, with the reason and what to use instead."""
    if strategy.kind == "fsdp" and strategy.fsdp_version != 2:
        raise UnsupportedSetup(
            f"FSDP version {strategy.fsdp_version} is not supported: FSDP1 flattens frozen and trainable weights "
            "into shared buffers and unwraps to a module whose top-level weights stay sharded, so LoRA's frozen "
            "base and the evaluation/export on the main process break. Set fsdp_version: 2 (as in "
            "accelerate_configs/fsdp.yaml).")
    if cfg.method == "qlora" and strategy.kind == "deepspeed" and strategy.zero_stage == 3:
        raise UnsupportedSetup("method qlora cannot run under DeepSpeed ZeRO-3: " + QLORA_SHARDED.format(
            what="ZeRO-3", extra=" and zero3_init", config="accelerate_configs/deepspeed_zero3.yaml"))
    if cfg.method == "qlora" and strategy.kind == "fsdp":
        raise UnsupportedSetup("method qlora cannot run under FSDP: " + QLORA_SHARDED.format(
            what="FSDP", extra=" and fsdp_cpu_ram_efficient_loading", config="accelerate_configs/fsdp.yaml"))


def check_launchable(strategy: Strategy) -> None:
    """What this machine needs for the strategy (checked by the launcher, before starting processes)."""
    import torch

    if strategy.kind in ("deepspeed", "fsdp") and not torch.cuda.is_available():
        raise UnsupportedSetup(f"{strategy.describe()} needs CUDA GPUs and none is visible here; on CPUs use "
                               "accelerate_configs/cpu_2proc.yaml (data parallel over gloo).")
    if strategy.kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UnsupportedSetup("DeepSpeed is not installed in this environment (pip install deepspeed); "
                               "or use accelerate_configs/ddp_1node.yaml or fsdp.yaml.")


def engine_requested() -> bool:
    """Whether `accelerate launch` asked for DeepSpeed or FSDP (it can only give them on GPUs)."""
    return any(os.environ.get(k, "false").lower() == "true" for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"))


def fallback_note(strategy: Strategy) -> str | None:
    """A note when DeepSpeed/FSDP were asked for but accelerate runs plain data parallelism (no GPU)."""
    if engine_requested() and not strategy.engine_state:
        return (f"note: the accelerate config asks for DeepSpeed/FSDP, but without a GPU accelerate runs "
                f"{strategy.describe()} (gloo); the weights are not sharded.")
    return None


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
    from workbench.train import check_fresh_work_dir

    if inside_launched_process():
        raise UnsupportedSetup("--launcher is for the command you type: this process was already started by a "
                               "launcher (accelerate launch / torchrun); drop --launcher and its options.")
    n = args.num_processes or _env_nproc()
    path = find_accelerate_config(args.accelerate_config) if args.accelerate_config else None
    if path is None and not n:
        raise ConfigError("--launcher accelerate needs --accelerate-config FILE or --num-processes N "
                          f"(shipped configs: {', '.join(shipped_configs())})")
    strategy = strategy_of_accelerate_config(path, n) if path else Strategy("ddp" if n > 1 else "single", n)
    check_supported(cfg, strategy)
    check_launchable(strategy)
    check_fresh_work_dir(Path(args.work_dir) if args.work_dir else cfg.resolved_work_dir, fresh=args.resume is None)
    cmd = accelerate_command(args, path, n)
    print(f"launching {strategy.describe()}: {shlex.join(cmd)}", flush=True)
    return subprocess.run(cmd).returncode


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
    if args.launcher == "accelerate" or args.accelerate_config or args.num_processes:
        return True
    return not inside_launched_process() and (_env_nproc() or 1) > 1
