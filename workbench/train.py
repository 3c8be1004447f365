"""Training: full fine-tuning, LoRA or QLoRA on one training path, through accelerate.

`train(cfg)` reads as its steps: prepare the work dir, encode and pack the data,
build the model (the method only changes how the base is loaded and which
weights train), then run the loop. The loop computes the loss over the trained
tokens of the whole optimizer step (all micro-batches on all processes), so
gradient accumulation and N processes give the same losses as one big batch.

Work dir layout (printed at the start of a run):
    config.yaml          the full config of this run
    data/                generated data sets, when the config generates them
    dataset_report.txt   what check-dataset says about the training data
    iter_N/              checkpoints: trainable weights, optimizer, scheduler, RNG, step
    last_checkpoint      the name of the newest complete checkpoint
    metrics.jsonl        one line per step: loss, lr, grad_norm, tokens/s, elapsed
    eval_log.jsonl       answers to evaluation_inputs, with their step
    adapter/             the final adapter (or model, for method full) in Hugging Face format

Checkpoints are written to a temporary folder and renamed into place, and the
pointer is updated after that, so a run killed during a save leaves the
previous checkpoint usable; `--resume` continues with the same model,
optimizer, scheduler, RNG and data order.

Several processes (`accelerate launch` / `torchrun`, see workbench/launch.py):
every process runs this same code on its share of each step
(`StepPlan.micro_batches`); the main process alone prints, writes logs,
checkpoints and the adapter, and generates the evaluation answers (under ZeRO-3
and FSDP, where each process holds only a shard of every weight, all processes
generate and the main one writes). Each process adds its RNG as iter_N/rng_{rank}.pt.
Under DeepSpeed and FSDP the optimizer state is split over the processes, so
checkpoints also hold iter_N/engine_state/ (accelerate's save_state), and
trainable.safetensors is gathered from all processes.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from workbench import fastpath
from workbench.config import Config, ConfigError, save_config
from workbench.io import append_jsonl, atomic_dir, atomic_write_jsonl, atomic_write_text, read_jsonl
from workbench.packing import StepPlan, collate, pack, row_length, row_trained_tokens, unpacked
from workbench.prompt import IGNORE, PromptBuilder, builder_for

LAST_POINTER = "last_checkpoint"
ENGINE_STATE = "engine_state"
METRICS = "metrics.jsonl"
EVAL_LOG = "eval_log.jsonl"


@dataclass
class TrainResult:
    work_dir: Path
    adapter_dir: Path
    last_checkpoint: Path
    metrics: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------
def train(cfg: Config, work_dir: str | os.PathLike | None = None, resume: bool | str | None = None,
          on_log: Callable[[dict], None] | None = None, on_eval: Callable[[int, list[dict]], None] | None = None,
          progress: bool = True) -> TrainResult:
    """Train as the config says; `resume=True` continues from the last checkpoint, a path from that one."""
    from workbench.launch import check_supported, fallback_note, strategy_of

    accelerator = make_accelerator(cfg)
    strategy = strategy_of(accelerator)
    check_supported(cfg, strategy)
    work = Path(work_dir) if work_dir else cfg.resolved_work_dir
    cfg = cfg.replace(work_dir=str(work))
    start_ckpt = find_resume_checkpoint(work, resume) if resume else None
    open_work_dir(work, cfg, accelerator, fresh=start_ckpt is None)
    if accelerator.is_main_process and fallback_note(strategy):
        print(fallback_note(strategy))
    set_seed(cfg.seed)
    tokenizer, builder, rows = prepare_data(cfg, work, accelerator.is_main_process)
    model = build_model(cfg, accelerator.device, strategy)
    optimizer, scheduler, plan = make_optimizer(cfg, model, rows, accelerator.num_processes)
    if start_ckpt:
        check_same_plan(start_ckpt, plan)
    configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step = restore_checkpoint(start_ckpt, accelerator, strategy, model, optimizer, scheduler) if start_ckpt else 0
    loop = TrainLoop(cfg, work, accelerator, model, optimizer, scheduler, plan, rows, builder, on_log, on_eval, progress,
                     strategy=strategy)
    loop.run(start_step)
    return loop.finish()


# ---------------------------------------------------------------------------
# Steps of a run
# ---------------------------------------------------------------------------
def make_accelerator(cfg: Config):
    """One per process; under `accelerate launch` / `torchrun` it joins the others (gloo on CPUs, NCCL on GPUs).

    Half precision on a GPU runs as autocast over float32 LoRA weights; a full
    fine-tune trains its bf16/fp16 weights directly, except under DeepSpeed and
    FSDP, which keep float32 master weights when given the mixed-precision mode.
    """
    from accelerate import Accelerator

    from workbench.launch import engine_requested
    from workbench.models import pick_device, pick_dtype

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.torch_dtype, device)
    half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no") if device.type == "cuda" else "no"
    mixed = half if cfg.method != "full" or engine_requested() else "no"
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)


def configure_deepspeed(accelerator, cfg: Config) -> None:
    """DeepSpeed takes batch size, accumulation and clipping from its own config: give it the run's (before prepare).

    Our loop has no DataLoader for accelerate to read the batch size from. The
    optimizer stays our torch AdamW, also under ZeRO-Offload (a LoRA's few
    weights do not need DeepSpeed's compiled CPU Adam).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.accumulative_counts
    ds["train_batch_size"] = cfg.batch_size * cfg.accumulative_counts * accelerator.num_processes
    ds["gradient_clipping"] = cfg.max_norm
    ds["zero_force_ds_cpu_optimizer"] = False
    accelerator.gradient_accumulation_steps = cfg.accumulative_counts


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def open_work_dir(work: Path, cfg: Config, accelerator, fresh: bool) -> None:
    """Every process checks (so all refuse together); the main one writes; the others wait until it has."""
    check_fresh_work_dir(work, fresh)
    if accelerator.is_main_process:
        prepare_work_dir(work, cfg, fresh)
    accelerator.wait_for_everyone()
    if not (work / "config.yaml").exists():
        raise FileNotFoundError(f"{work.resolve()} (written by the main process) is not visible to process "
                                f"{accelerator.process_index}: on several machines the work dir must be on a shared filesystem")


def check_fresh_work_dir(work: Path, fresh: bool) -> None:
    if fresh and (work / LAST_POINTER).exists():
        raise FileExistsError(f"{work} already holds a run (see {work / LAST_POINTER}). Continue it with --resume, "
                              f"or choose another --work-dir; nothing was overwritten.")


def prepare_work_dir(work: Path, cfg: Config, fresh: bool) -> None:
    check_fresh_work_dir(work, fresh)
    work.mkdir(parents=True, exist_ok=True)
    save_config(cfg, work / "config.yaml")
    print(f"work dir: {work.resolve()}\n  config.yaml, metrics.jsonl, eval_log.jsonl, iter_N/ checkpoints, adapter/ at the end")


def prepare_data(cfg: Config, work: Path, is_main: bool):
    """Tokenizer, prompt builder and the packed (or single-sample) rows of the run."""
    from workbench.encoding import encode_samples
    from workbench.mixing import mix_sources
    from workbench.samples import write_dataset
    from workbench.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.pretrained_model_name_or_path, cfg.trust_remote_code, cfg.chat_template)
    builder = builder_for(cfg, tokenizer)
    samples = mix_sources(cfg)
    encoded, report = encode_samples(samples, builder, cfg.max_length, cfg.loss_on)
    if is_main:
        if any(src.generate for src in cfg.datasets):
            write_dataset([s for s in samples if s.source.startswith("generated")], work / "data" / "generated.jsonl")
        atomic_write_text(work / "dataset_report.txt", str(report) + "\n")
        print(report)
    if not encoded:
        raise ValueError("no trainable samples: every record was dropped (see dataset_report.txt)")
    rows = pack(encoded, cfg.max_length) if cfg.pack_to_max_length else unpacked(encoded)
    return tokenizer, builder, rows


def build_model(cfg: Config, device: torch.device, strategy=None):
    """The base model, with LoRA adapters for lora/qlora; only the weights to train have requires_grad."""
    from workbench.models import load_model

    model = load_model(cfg.pretrained_model_name_or_path, torch_dtype=cfg.torch_dtype, device=str(device),
                       quantize_4bit=cfg.method == "qlora", trust_remote_code=cfg.trust_remote_code, for_training=True)
    model.config.use_cache = False
    if cfg.method == "full":
        model.requires_grad_(True)
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return with_fast_path(model, cfg, strategy)
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        keep_4bit_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return with_fast_path(get_peft_model(model, lora_config(cfg)), cfg, strategy)


def with_fast_path(model, cfg: Config, strategy=None):
    """The speed-ups of workbench/fastpath.py, unless cfg.fast_path is off.

    The lean LoRA forward reads the weights directly, so it is left out where each
    process holds only a shard of them (ZeRO-3, FSDP gather weights in module hooks).
    """
    if cfg.fast_path:
        fastpath.enable_packed_attention(model)
        fastpath.use_fast_lora_dropout(model)
        fastpath.use_fused_loss(model)
        if strategy is None or not strategy.shards_weights:
            fastpath.use_lean_lora_forward(model)
    return model


def keep_4bit_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    bitsandbytes 0.50 repacks a Linear4bit layer's weights for a fast CPU kernel the
    first time it runs in eval mode (our evaluation before training); that kernel has
    no backward, so every later training step silently gets no gradient through the
    frozen layers and QLoRA stops learning. Training models never repack.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(cfg: Config):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM", bias="none")


def make_optimizer(cfg: Config, model, rows, world_size: int):
    from transformers import get_scheduler

    plan = StepPlan(len(rows), cfg.batch_size, cfg.accumulative_counts, world_size, cfg.seed, cfg.max_steps, cfg.max_epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    warmup = int(round(cfg.warmup_ratio * plan.total_steps))
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=plan.total_steps)
    return optimizer, scheduler, plan


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
class TrainLoop:
    """Runs optimizer steps, logs, evaluates and checkpoints (on every process; see the module docstring)."""

    def __init__(self, cfg, work, accelerator, model, optimizer, scheduler, plan, rows, builder,
                 on_log=None, on_eval=None, progress=True, strategy=None):
        from workbench.launch import Strategy

        self.cfg, self.work, self.acc = cfg, work, accelerator
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.plan, self.rows, self.builder = plan, rows, builder
        self.on_log, self.on_eval, self.progress = on_log, on_eval, progress
        self.strategy = strategy or Strategy()
        self.pad_id = builder.tokenizer.pad_token_id
        self.elapsed = 0.0
        self.last_ckpt: Path | None = None

    # -- one step ----------------------------------------------------------------
    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        rank = self.acc.process_index
        all_rows = [self.rows[i] for i in self.plan.step_rows(step)]
        n_trained = sum(row_trained_tokens(r) for r in all_rows)  # the whole step, all processes
        n_real = sum(row_length(r) for r in all_rows)
        loss_sum = torch.zeros((), device=self.acc.device)
        micro = self.plan.micro_batches(step, rank)
        for i, idx in enumerate(micro):
            batch = collate([self.rows[j] for j in idx], self.pad_id)
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            with self._micro_batch(last=i == len(micro) - 1):
                s = token_loss_sum(self.model, batch)
                self.acc.backward(s * self._loss_scale() / max(n_trained, 1))
            loss_sum += s.detach()
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.acc.reduce(loss_sum, "sum").item() / max(n_trained, 1)
        dt = time.perf_counter() - t0
        self.elapsed += dt
        return {"step": step + 1, "epoch": round(self.plan.epoch_at(step + 1), 4), "loss": loss,
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": n_real,
                "trained_tokens": n_trained, "tokens_per_s": n_real / dt, "elapsed_s": round(self.elapsed, 3)}

    def _micro_batch(self, last: bool):
        """Gradients are all-reduced once per step: skip it on all but the last micro-batch.

        DeepSpeed runs its optimizer step inside `backward` at the end of the
        accumulation; accelerate tells it where that is through `sync_gradients`.
        """
        if self.strategy.kind == "deepspeed":
            self.acc.sync_gradients = last
        return self.acc.no_sync(self.model) if not last and self.acc.num_processes > 1 else contextlib.nullcontext()

    def _loss_scale(self) -> float:
        """Undo the averaging the libraries do, so each process adds its share of the step's token sum.

        DDP, FSDP and DeepSpeed average gradients over the processes; DeepSpeed also
        divides every micro-batch's loss by its gradient_accumulation_steps.
        """
        gas = self.cfg.accumulative_counts if self.strategy.kind == "deepspeed" else 1
        return float(self.acc.num_processes * gas)

    def _clip(self) -> float:
        """Clip to max_norm and return the norm before clipping (DeepSpeed clips inside its step; nan if it tells none).

        All parameters are passed (frozen ones have no gradient): FSDP clips only
        when given exactly the model's parameters.
        """
        limit = self.cfg.max_norm if self.cfg.max_norm > 0 else float("inf")
        norm = self.acc.clip_grad_norm_(self.model.parameters(), limit)
        return float("nan") if norm is None else float(norm)

    # -- the run --------------------------------------------------------------------
    def run(self, start_step: int) -> None:
        from tqdm.auto import tqdm

        total = self.plan.total_steps
        if start_step:
            self.elapsed = self._restore_logs(start_step)
            self.last_ckpt = self.work / f"iter_{start_step}"
        elif self.cfg.evaluation_freq:
            self.evaluate(0)
        bar = tqdm(total=total, initial=start_step, desc=f"train {self.cfg.method}", unit="step",
                   disable=not (self.progress and self.acc.is_main_process), dynamic_ncols=True)
        self.model.train()
        for step in range(start_step, total):
            rec = self.step(step)
            done = step + 1
            bar.update()
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if done % self.cfg.logging_steps == 0 or done == total:
                self.log(rec)
            if self.cfg.evaluation_freq and (done % self.cfg.evaluation_freq == 0 or done == total):
                self.evaluate(done)
            if done % self.cfg.save_steps == 0 or done == total:
                self.save(done)
        bar.close()

    def log(self, rec: dict) -> None:
        if self.acc.is_main_process:
            append_jsonl(self.work / METRICS, rec)
            if self.on_log:
                self.on_log(rec)

    def evaluate(self, step: int) -> list[dict]:
        """Answer evaluation_inputs greedily on the main process; others wait.

        Under ZeRO-3 and FSDP every forward gathers the weights from all processes,
        so all generate the same greedy answers in step and the main one writes.
        """
        from workbench.chat import GenerationSettings, answer

        out = []
        if self.acc.is_main_process or self.strategy.shards_weights:
            model = self.acc.unwrap_model(self.model)
            settings = GenerationSettings(max_new_tokens=self.cfg.evaluation_max_new_tokens)
            with _root_unsharded(model, self.strategy):
                out = [{"step": step, "question": q, "answer": answer(model, self.builder, q, settings=settings)}
                       for q in self.cfg.evaluation_inputs]
        if self.acc.is_main_process:
            for rec in out:
                append_jsonl(self.work / EVAL_LOG, rec)
            _print_eval(step, out)
            if self.on_eval:
                self.on_eval(step, out)
        self.acc.wait_for_everyone()
        return out

    def save(self, step: int) -> None:
        """The main process writes iter_N atomically; then every process adds its RNG (and engine state); then the pointer."""
        self.acc.wait_for_everyone()
        target = self.work / f"iter_{step}"
        rng = _rng_state()
        model = self.acc.unwrap_model(self.model)
        weights = gathered_trainable_state_dict(model, self.strategy) if self.strategy.shards_weights else None
        if self.acc.is_main_process:
            optimizer = None if self.strategy.engine_state else self.optimizer  # split over processes: in engine_state/
            save_checkpoint(target, model, optimizer, self.scheduler, step, self.elapsed, self.cfg, rng, weights=weights,
                            plan=self.plan)
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:  # the main process's RNG is inside the atomic folder
            torch.save(rng, target / f"rng_{self.acc.process_index}.pt")
        if self.strategy.engine_state:
            self.acc.save_state(str(target / ENGINE_STATE), **_engine_kwargs(self.strategy, loading=False))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            atomic_write_text(self.work / LAST_POINTER, target.name + "\n")
            prune_checkpoints(self.work, self.cfg.save_total_limit)
        self.last_ckpt = target

    def _restore_logs(self, start_step: int) -> float:
        """Drop log lines written after the checkpoint we resume from; return its elapsed time."""
        if self.acc.is_main_process:
            for name in (METRICS, EVAL_LOG):
                kept = [r for r in read_jsonl(self.work / name) if r["step"] <= start_step]
                atomic_write_jsonl(self.work / name, kept)
        state = json.loads((self.work / f"iter_{start_step}" / "state.json").read_text())
        return state["elapsed_s"]

    def finish(self) -> TrainResult:
        adapter = self.work / "adapter"
        self.export(adapter)
        if self.acc.is_main_process:
            print(f"done. checkpoints: {self.work.resolve()}/iter_*  final adapter: {adapter.resolve()}")
        self.acc.wait_for_everyone()
        return TrainResult(self.work, adapter, self.last_ckpt, read_jsonl(self.work / METRICS), read_jsonl(self.work / EVAL_LOG))

    def export(self, adapter: Path) -> None:
        """The main process writes the adapter (or model); with sharded weights all processes gather them first.

        Under ZeRO-3 the exported weights are gathered for the time of the export;
        under FSDP (DTensor shards) the main process rebuilds the model on the CPU
        from the last checkpoint, as `convert pth_to_hf` does.
        """
        from workbench.convert import export_trained

        model = self.acc.unwrap_model(self.model)
        if self.strategy.kind == "fsdp":
            if self.acc.is_main_process:
                export_from_checkpoint(self.cfg, self.builder, self.last_ckpt, adapter)
            return
        params = [p for p in model.parameters() if p.requires_grad or self.cfg.method == "full"]
        with _gathered(self.strategy, params):
            if self.acc.is_main_process:
                export_trained(model, self.builder, self.cfg, adapter)


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the trained tokens of a batch (float32).

    The output head (vocabulary x hidden) runs only at the positions whose next token
    is trained: system and user tokens need no logits, which saves a large share of
    the compute and memory of a chat fine-tune.
    """
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
    logits = _forward_logits(model, batch, keep).float()
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets[:, keep].reshape(-1)
    if fastpath.uses_fused_loss(model):
        return fastpath.cross_entropy_sum(logits, targets, ignore_index=IGNORE)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def _forward_logits(model, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """Logits at positions `keep` (models without `logits_to_keep` compute all and are sliced)."""
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    if fastpath.uses_packed_attention(model):
        kwargs.update(fastpath.packed_kwargs(batch["position_ids"]))
    if getattr(model, "_wb_no_logits_to_keep", False):
        return model(**kwargs).logits[:, keep]
    try:
        return model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # remote-code models that predate logits_to_keep
        model._wb_no_logits_to_keep = True
        return model(**kwargs).logits[:, keep]


def _print_eval(step: int, out: list[dict]) -> None:
    from tqdm.auto import tqdm

    lines = [f"[eval @ step {step}]"] + [f"  Q: {r['question']}\n  A: {r['answer']}" for r in out]
    tqdm.write("\n".join(lines))



# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def gathered_trainable_state_dict(model, strategy) -> dict[str, torch.Tensor]:
    """The trainable weights whole, where each process holds a shard of each (ZeRO-3, FSDP): every process must call it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with _gathered(strategy, [p for _, p in named]):
        return {n: _whole(p.detach()).to("cpu").contiguous().clone() for n, p in named}


@contextlib.contextmanager
def _gathered(strategy, params: list):
    """Under ZeRO-3, `params` are whole on every process inside the block (a collective); elsewhere nothing to do."""
    if strategy.kind == "deepspeed" and strategy.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


@contextlib.contextmanager
def _root_unsharded(model, strategy):
    """FSDP2 gathers the top-level weights (embeddings, head) in the root's forward, which `generate` bypasses."""
    if strategy.kind != "fsdp":
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _whole(t: torch.Tensor) -> torch.Tensor:
    """FSDP2 keeps parameters as DTensor shards; `full_tensor` all-gathers one (a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _engine_kwargs(strategy, loading: bool) -> dict:
    """DeepSpeed checkpoints hold only the trained weights (the frozen base is reloaded from the model folder)."""
    if strategy.kind != "deepspeed":
        return {}
    return {"load_module_strict": False} if loading else {"exclude_frozen_parameters": True}


def save_checkpoint(target: Path, model, optimizer, scheduler, step: int, elapsed: float, cfg: Config,
                    rng: dict | None = None, weights: dict[str, torch.Tensor] | None = None, plan: StepPlan | None = None) -> Path:
    """Write iter_N atomically: trainable weights, optimizer, scheduler, RNG, step and the config.

    `weights` are the gathered trainable weights when the model holds only shards;
    `optimizer` is None when its state is saved as engine_state/ by all processes.
    """
    state = {"step": step, "elapsed_s": elapsed, "method": cfg.method}
    if plan is not None:
        state.update(world_size=plan.world_size, rows_per_step=plan.rows_per_step)
    with atomic_dir(target, overwrite=True) as tmp:
        torch.save(rng or _rng_state(), tmp / "rng_0.pt")
        save_file(weights if weights is not None else trainable_state_dict(model), str(tmp / "trainable.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
        save_config(cfg, tmp / "config.yaml")
    return target


def load_trainable(model, ckpt: Path) -> None:
    """Load a checkpoint's trainable weights into a model built from the same config."""
    state = load_file(str(Path(ckpt) / "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = expected - set(state)
    if missing:
        raise ValueError(f"{ckpt}: checkpoint lacks {len(missing)} trainable weights (e.g. {sorted(missing)[0]}); was it made with another config?")
    model.load_state_dict(state, strict=False)


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, rank: int = 0, verbose: bool = True) -> int:
    """Restore model, optimizer, scheduler and this process's RNG; return the step to continue from.

    model and optimizer may be None when an engine state (DeepSpeed, FSDP) restored them.
    """
    if model is not None:
        load_trainable(model, ckpt)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng = ckpt / f"rng_{rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    step = json.loads((ckpt / "state.json").read_text())["step"]
    if verbose:
        print(f"resuming from {ckpt} at step {step}")
    return step


def restore_checkpoint(ckpt: Path, accelerator, strategy, model, optimizer, scheduler) -> int:
    """Every process restores; under DeepSpeed/FSDP weights and optimizer come from iter_N/engine_state/."""
    verbose = accelerator.is_main_process
    if strategy.engine_state:
        if not (ckpt / ENGINE_STATE).is_dir():
            raise FileNotFoundError(f"{ckpt} has no {ENGINE_STATE}/ folder: it was not written under DeepSpeed/FSDP, "
                                    f"so it cannot resume a {strategy.describe()} run")
        accelerator.load_state(str(ckpt / ENGINE_STATE), **_engine_kwargs(strategy, loading=True))
        return load_checkpoint(ckpt, None, None, scheduler, accelerator.process_index, verbose)
    if not (ckpt / "optimizer.pt").exists():
        raise FileNotFoundError(f"{ckpt} has no optimizer.pt: it was written under DeepSpeed/FSDP; resume it with the same accelerate config")
    return load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler, accelerator.process_index, verbose)


def check_same_plan(ckpt: Path, plan: StepPlan) -> None:
    """A run resumes with the rows per step it was trained with (processes x batch_size x accumulative_counts)."""
    state = json.loads((ckpt / "state.json").read_text())
    saved = state.get("rows_per_step")
    if saved is not None and saved != plan.rows_per_step:
        raise ConfigError(f"{ckpt} was trained with {saved} rows per step ({state.get('world_size')} processes x "
                          f"batch_size x accumulative_counts); this run has {plan.rows_per_step} ({plan.world_size} "
                          f"processes x {plan.batch_size} x {plan.accumulative_counts}). Resume with the same number of "
                          f"processes, or change batch_size/accumulative_counts so the product is the same.")


def export_from_checkpoint(cfg: Config, builder: PromptBuilder, ckpt: Path, save_dir: Path) -> Path:
    """Export a checkpoint's weights through a model rebuilt on the CPU (for sharded runs; as `convert pth_to_hf`)."""
    from workbench.convert import export_trained

    model = build_model(cfg.replace(method="lora") if cfg.method == "qlora" else cfg, torch.device("cpu"))
    load_trainable(model, ckpt)
    return export_trained(model, builder, cfg, save_dir)


def find_resume_checkpoint(work: Path, resume: bool | str) -> Path:
    if isinstance(resume, str) and resume not in ("", "auto"):
        p = Path(resume)
        p = p if p.exists() else work / resume
        if not (p / "state.json").exists():
            raise FileNotFoundError(f"{p} is not a workbench checkpoint (no state.json)")
        return p
    pointer = work / LAST_POINTER
    if not pointer.exists():
        raise FileNotFoundError(f"nothing to resume in {work}: no {LAST_POINTER} file (was a checkpoint ever saved?)")
    return work / pointer.read_text().strip()


def list_checkpoints(work: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a work dir, oldest first."""
    found = [p for p in Path(work).glob("iter_*") if (p / "state.json").exists() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def prune_checkpoints(work: Path, limit: int) -> None:
    if limit < 0:
        return
    for old in list_checkpoints(work)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
