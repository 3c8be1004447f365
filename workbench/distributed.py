"""Several processes: the strategy a run uses and every branch the strategies need, in one place.

A `Strategy` names how the processes share the work: one process, DDP (every
process holds the whole model), DeepSpeed ZeRO stage 0-3, or FSDP. It is read
from the running accelerator (`strategy_of`); `check_supported` refuses, with the
reason, the combinations the libraries cannot train (the launcher checks before
starting any process, workbench/launch.py, and every process checks again).

`Distributed(accelerator, strategy)` is what the training loop asks instead of
testing the strategy itself:
- `micro_batch(model, last)`: gradients are all-reduced once per optimizer step;
- `loss_scale(cfg)`: undo the averaging DDP/FSDP/DeepSpeed do, so each process
  adds its share of the step's token sum;
- `generates_everywhere` and `root_unsharded(model)`: under ZeRO-3 and FSDP each
  process holds a shard of every weight, so all processes generate together;
- `trainable_weights(model)`, `gathered(params)`: the whole weights for saving
  and exporting (a collective where the weights are sharded);
- `save_engine_state` / `load_engine_state`: under DeepSpeed and FSDP the
  optimizer state is split over the processes, so accelerate's save_state writes
  it to iter_N/engine_state/. The pickles DeepSpeed and FSDP write there are read
  back running no code (workbench/safe_unpickle.py).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.checkpoint import ENGINE_STATE, CheckpointError
from workbench.config import Config, ConfigError
from workbench.i18n import t
from workbench.models import master_weights, pick_device, pick_dtype
from workbench.safe_unpickle import check_dcp_metadata, weights_only_load


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
        if self.kind == "single":
            return name
        return f"{name} x {self.num_processes} process{'es' if self.num_processes > 1 else ''}"


def strategy_of(accelerator) -> Strategy:
    """The strategy an accelerator runs (from `accelerator.state.distributed_type`)."""
    from accelerate.utils import DistributedType  # heavy: accelerate is imported when a run starts

    state, n = accelerator.state, accelerator.num_processes
    if state.distributed_type == DistributedType.DEEPSPEED:
        return Strategy("deepspeed", n, zero_stage=int(state.deepspeed_plugin.zero_stage))
    if state.distributed_type == DistributedType.FSDP:
        return Strategy("fsdp", n, fsdp_version=int(getattr(state.fsdp_plugin, "fsdp_version", 1) or 1))
    return Strategy("ddp" if n > 1 else "single", n)


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


def deepspeed_requested() -> bool:
    """Whether `accelerate launch` asked for DeepSpeed (it runs on CPUs too: DeepSpeed's CPU accelerator, gloo)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def engine_requested() -> bool:
    """Whether `accelerate launch` asked for DeepSpeed or FSDP."""
    return deepspeed_requested() or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fallback_note(strategy: Strategy) -> str | None:
    """A note when FSDP was asked for but accelerate runs plain data parallelism (no GPU)."""
    if engine_requested() and not strategy.engine_state:
        return t("train.fsdp_fallback", None, strategy=strategy.describe())
    return None


# ---------------------------------------------------------------------------
# The accelerator of a run
# ---------------------------------------------------------------------------
def make_accelerator(cfg: Config):
    """One per process; under `accelerate launch` / `torchrun` it joins the others (gloo on CPUs, NCCL on GPUs).

    Half precision on a GPU runs as autocast over float32 LoRA weights, and over a
    full fine-tune's float32 master weights (`models.master_weights`, on a CPU too,
    where accelerate's autocast is bfloat16's only); DeepSpeed and FSDP keep their
    own float32 copy of half-precision weights in the mixed-precision mode; with
    `pure_bf16` a full fine-tune trains its bf16 weights directly.
    """
    from accelerate import Accelerator  # heavy: accelerate is imported when a run starts

    device = pick_device(cfg.device)
    dtype, master = pick_dtype(cfg.torch_dtype, device), master_weights(cfg, device, engine_requested())
    if cfg.pure_bf16 and dtype == torch.float16:  # torch_dtype auto on a GPU without bfloat16 (a T4, a V100)
        raise ConfigError("config.pure_bf16: true, but this GPU has no bfloat16 and computes in float16, whose weights "
                          "cannot train without float32 master weights and loss scaling: set pure_bf16: false")
    half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no") if device.type == "cuda" or master else "no"
    mixed = half if cfg.method != "full" or engine_requested() or master else "no"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # one process: a second run in it (a notebook) may change precision
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    if device.type == "cpu" and deepspeed_requested():
        return _deepspeed_on_cpus(Accelerator)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)


def _deepspeed_on_cpus(Accelerator):
    """DeepSpeed on CPUs (its CPU accelerator, float32, gloo between the processes): the GPU command rehearsed.

    accelerate hands a run to DeepSpeed only when not told `cpu=True`, and then
    picks no process-group backend on a machine without GPUs (every process
    would count itself alone); gloo is named here, as DeepSpeed's CPU
    accelerator uses without Intel's oneCCL.
    """
    from accelerate.utils import InitProcessGroupKwargs  # heavy: accelerate is imported when a run starts

    return Accelerator(cpu=False, mixed_precision="no", kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])


def configure_deepspeed(accelerator, cfg: Config) -> None:
    """DeepSpeed takes batch size, accumulation and clipping from its own config: give it the run's (before prepare).

    Our loop has no DataLoader for accelerate to read the batch size from. The
    optimizer stays our torch AdamW, also under ZeRO-Offload (a LoRA's few
    weights do not need DeepSpeed's compiled CPU Adam).
    """
    from accelerate.utils import DistributedType  # heavy: accelerate is imported when a run starts

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.accumulative_counts
    ds["train_batch_size"] = cfg.batch_size * cfg.accumulative_counts * accelerator.num_processes
    ds["gradient_clipping"] = cfg.max_norm
    ds["zero_force_ds_cpu_optimizer"] = False
    accelerator.gradient_accumulation_steps = cfg.accumulative_counts


# ---------------------------------------------------------------------------
# What the loop asks
# ---------------------------------------------------------------------------
class Distributed:
    """The accelerator and its strategy, answering the loop's questions (see the module docstring)."""

    def __init__(self, accelerator, strategy: Strategy | None = None):
        self.acc = accelerator
        self.strategy = strategy or Strategy()
        self._scale: float | None = None  # float16's loss scale after the last step (`step`)

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def rank(self) -> int:
        return self.acc.process_index

    def wait(self) -> None:
        self.acc.wait_for_everyone()

    def micro_batch(self, model, last: bool):
        """Gradients are all-reduced once per step: skip it on all but the last micro-batch.

        DeepSpeed runs its optimizer step inside `backward` at the end of the
        accumulation; accelerate tells it where that is through `sync_gradients`.
        """
        if self.strategy.kind == "deepspeed":
            self.acc.sync_gradients = last
        return self.acc.no_sync(model) if not last and self.acc.num_processes > 1 else contextlib.nullcontext()

    def loss_scale(self, cfg: Config) -> float:
        """DDP, FSDP and DeepSpeed average gradients over the processes; DeepSpeed also divides
        every micro-batch's loss by its gradient_accumulation_steps. This undoes both."""
        gas = cfg.accumulative_counts if self.strategy.kind == "deepspeed" else 1
        return float(self.acc.num_processes * gas)

    def step(self, optimizer) -> bool:
        """Step the optimizer; False where float16's loss scaler skipped the step (an overflow lowers its scale). Read
        from the scale: accelerate's `step_was_skipped` stays False for a fused AdamW, which skips inside its kernel."""
        scaler = self.acc.scaler
        if scaler is None:
            optimizer.step()
            return True
        # one host synchronisation a step: the scale before this step is the one read after the last (or, first, now:
        # a resumed run's restored scale)
        before = self._scale if self._scale is not None else scaler.get_scale()
        optimizer.step()
        self._scale = scaler.get_scale()
        return self._scale >= before

    def clip(self, model, max_norm: float) -> float:
        """Clip to max_norm; the norm before clipping (DeepSpeed clips inside its step; nan if it tells none).

        All parameters are passed (frozen ones have no gradient): FSDP clips only
        when given exactly the model's parameters.
        """
        norm = self.acc.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
        return float("nan") if norm is None else float(norm)

    @property
    def generates_everywhere(self) -> bool:
        """Under ZeRO-3 and FSDP every forward gathers weights from all processes: all must generate."""
        return self.strategy.shards_weights

    @contextlib.contextmanager
    def root_unsharded(self, model):
        """FSDP2 gathers the top-level weights (embeddings, head) in the root's forward, which `generate` bypasses."""
        if self.strategy.kind != "fsdp":
            yield
            return
        model.unshard()
        try:
            yield
        finally:
            model.reshard()

    @contextlib.contextmanager
    def gathered(self, params: list):
        """Under ZeRO-3, `params` are whole on every process inside the block (a collective); elsewhere nothing to do."""
        if self.strategy.kind == "deepspeed" and self.strategy.zero_stage == 3:
            import deepspeed  # optional: installed only where DeepSpeed runs

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def trainable_weights(self, model) -> dict[str, torch.Tensor] | None:
        """Where weights are sharded, the trainable ones whole on the CPU (every process must call it); else None
        (the main process reads them from its own model when it saves)."""
        if not self.strategy.shards_weights:
            return None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with self.gathered([p for _, p in named]):
            return {n: _whole(p.detach()).to("cpu").contiguous().clone() for n, p in named}

    @property
    def exports_from_checkpoint(self) -> bool:
        """Under FSDP (DTensor shards) the main process exports from a model rebuilt on the CPU from the checkpoint."""
        return self.strategy.kind == "fsdp"

    def save_engine_state(self, target: Path) -> None:
        """All processes write their part of the optimizer (and weights) to target/engine_state/ (DeepSpeed, FSDP)."""
        if self.strategy.engine_state:
            self.acc.save_state(str(target / ENGINE_STATE), **_engine_kwargs(self.strategy, loading=False))

    def load_engine_state(self, ckpt: Path) -> None:
        if not (ckpt / ENGINE_STATE).is_dir():
            raise CheckpointError(f"{ckpt} has no {ENGINE_STATE}/ folder: it was not written under DeepSpeed/FSDP, "
                                  f"so it cannot resume a {self.strategy.describe()} run")
        for metadata in sorted((ckpt / ENGINE_STATE).rglob(".metadata")):  # FSDP's: torch unpickles it as it is
            check_dcp_metadata(metadata)
        with _weights_only_engine_loads(self.acc, self.strategy):
            self.acc.load_state(str(ckpt / ENGINE_STATE), **_engine_kwargs(self.strategy, loading=True))


def _whole(t: torch.Tensor) -> torch.Tensor:
    """FSDP2 keeps parameters as DTensor shards; `full_tensor` all-gathers one (a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _engine_kwargs(strategy: Strategy, loading: bool) -> dict:
    """DeepSpeed checkpoints hold only the trained weights (the frozen base is reloaded from the model folder)."""
    if strategy.kind != "deepspeed":
        return {}
    return {"load_module_strict": False} if loading else {"exclude_frozen_parameters": True}


@contextlib.contextmanager
def _weights_only_engine_loads(acc, strategy: Strategy):
    """While accelerate's load_state runs, every DeepSpeed engine reads its files with `weights_only_load`
    (accelerate itself loads its random states weights-only)."""
    if strategy.kind != "deepspeed":
        yield
        return
    engines = [m.checkpoint_engine for m in getattr(acc, "_models", []) if hasattr(m, "checkpoint_engine")]
    if not engines:
        raise CheckpointError("no DeepSpeed engine to load the checkpoint into (accelerate prepared none)")
    for engine in engines:
        engine.load = weights_only_load  # an instance attribute: the class's own load is back after
    try:
        yield
    finally:
        for engine in engines:
            vars(engine).pop("load", None)
