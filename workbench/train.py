"""Training: full fine-tuning, LoRA or QLoRA on one training path, through accelerate.

`train(cfg)` is a recipe object's three steps, torchtune-style:

    trainer = Trainer(cfg, work_dir, resume)   # accelerator, strategy checks, seed
    trainer.setup()                            # data -> rows, model, optimizer (each injectable), work dir
    trainer.train()                            # the loop: steps, logs, evaluation, checkpoints
    result = trainer.export()                  # adapter/ (or the model, for method full)

`setup(rows=..., model=..., optimizer=...)` takes any of them ready-made (the
benchmark gives its own rows and a model it measured). Everything a config can
refuse (the data, the model, the LoRA targets, the strategy) is checked before
the work dir is written, so a refused run leaves nothing behind. The loop
computes the loss over the trained tokens of the whole optimizer step (all
micro-batches on all processes), so gradient accumulation and N processes give
the same losses as one big batch.

Work dir layout (printed at the start of a run):
    config.yaml          the full config of this run
    data/                generated data sets, when the config generates them
    dataset_report.txt   what check-dataset says about the training data
    iter_N/              checkpoints (workbench/checkpoint.py): weights, optimizer, scheduler, RNG, step
    last_checkpoint      the name of the newest complete checkpoint
    metrics.jsonl        one line per step: loss, lr, grad_norm, tokens/s, elapsed
    eval_log.jsonl       answers to evaluation_inputs, with their step
    adapter/             the final adapter (or model, for method full) in Hugging Face format

Several processes (`accelerate launch` / `torchrun`, see workbench/launch.py):
every process runs this same code on its share of each step
(`StepPlan.micro_batches`); the main process alone prints, writes logs,
checkpoints and the adapter. What differs under DDP, DeepSpeed and FSDP is asked
of `workbench.distributed.Distributed`.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.chat import GenerationSettings, answer_batch
from workbench.checkpoint import (check_fresh_work_dir, check_same_plan, checkpoint_name, find_resume_checkpoint,
                                  load_checkpoint, load_trainable, prune_checkpoints, read_state, refuse_pickles,
                                  rng_state, save_checkpoint, save_rng, write_pointer)
from workbench import neftune
from workbench.fastpath import cuda as fastpath_cuda, token_budget
from workbench.config import Config, save_config
from workbench.convert import export_trained
from workbench.encoding import encode_samples
from workbench.fastpath.cpu import keeps_conversations_apart
from workbench.distributed import (Distributed, check_supported, configure_deepspeed, fallback_note, make_accelerator,
                                   strategy_of)
from workbench.i18n import t
from workbench.io import append_jsonl, atomic_write_jsonl, atomic_write_text, read_jsonl
from workbench.loss import training_loss
from workbench.mixing import mix_sources
from workbench.models import build_model, build_unquantized, enable_checkpointing, load_builder, model_vocab_size
from workbench.optimizer import adamw
from workbench.packing import StepPlan, collate, collate_flat, pack_rows, row_length, row_trained_tokens, to_device, unpacked
from workbench.prompt import PromptBuilder
from workbench.samples import DataError, write_dataset
from workbench.unlikelihood import identity_tokens

METRICS = "metrics.jsonl"
EVAL_LOG = "eval_log.jsonl"


@dataclass
class TrainResult:
    work_dir: Path
    adapter_dir: Path
    last_checkpoint: Path
    metrics: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


def train(cfg: Config, work_dir: str | os.PathLike | None = None, resume: bool | str | None = None,
          on_log: Callable[[dict], None] | None = None, on_eval: Callable[[int, list[dict]], None] | None = None,
          progress: bool = True) -> TrainResult:
    """Train as the config says; `resume=True` continues from the last checkpoint, a path from that one."""
    trainer = Trainer(cfg, work_dir, resume, on_log=on_log, on_eval=on_eval, progress=progress)
    trainer.setup()
    trainer.train()
    return trainer.export()


# ---------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------
class Trainer:
    """One training run: `setup()`, `train()`, `export()` (see the module docstring).

    Constructing it makes the accelerator, refuses a strategy the method cannot
    train or a work dir that holds a run (unless resuming), and seeds the random
    generators, as a run always did before building anything.
    """

    def __init__(self, cfg: Config, work_dir: str | os.PathLike | None = None, resume: bool | str | None = None,
                 on_log: Callable[[dict], None] | None = None, on_eval: Callable[[int, list[dict]], None] | None = None,
                 progress: bool = True):
        self.accelerator = make_accelerator(cfg)
        self.dist = Distributed(self.accelerator, strategy_of(self.accelerator))
        check_supported(cfg, self.dist.strategy)
        self.work = Path(work_dir) if work_dir else cfg.resolved_work_dir
        self.cfg = cfg.replace(work_dir=str(self.work))
        self.resume_from = find_resume_checkpoint(self.work, resume) if resume else None
        if self.resume_from:
            refuse_pickles(self.resume_from)  # before anything is built or written
        check_fresh_work_dir(self.work, fresh=self.resume_from is None)
        self.on_log, self.on_eval, self.progress = on_log, on_eval, progress
        self.builder: PromptBuilder | None = None
        self.rows: list | None = None
        self.model = self.optimizer = self.scheduler = None
        self.plan: StepPlan | None = None
        self.start_step = 0
        self.last_ckpt: Path | None = None
        set_seed(cfg.seed)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def strategy(self):
        return self.dist.strategy

    def setup(self, rows: list | None = None, model=None, optimizer=None, builder: PromptBuilder | None = None) -> Trainer:
        """Rows, model and optimizer (each made here unless given), then the work dir, then a checkpoint to resume.

        rows: packed rows (lists of `Encoded` samples, see workbench/packing.py);
        model: as `workbench.models.build_model(cfg, trainer.device, trainer.strategy)` returns it;
        optimizer: over the model's trainable weights (the learning-rate schedule is made for it);
        builder: the prompt builder the rows were encoded with (default: `load_builder(cfg)`).
        """
        if self.dist.is_main and fallback_note(self.strategy):
            print(fallback_note(self.strategy))
        self.builder = builder or load_builder(self.cfg)
        data_files = None
        if rows is None:
            samples, report, rows = prepare_rows(self.cfg, self.builder, self.dist.is_main)
            data_files = (samples, report)
        self.model = model if model is not None else build_model(self.cfg, self.device, self.strategy)
        neftune.attach(self.model, self.cfg.neftune_noise_alpha)
        self.rows = rows = self.rows_for_model(rows, data_files)
        self.optimizer, self.scheduler, self.plan = make_optimizer(self.cfg, self.model, rows,
                                                                   self.accelerator.num_processes, optimizer)
        if self.resume_from:
            check_same_plan(self.resume_from, self.plan)
        open_work_dir(self.work, self.cfg, self.dist, fresh=self.resume_from is None)
        if self.dist.is_main and data_files is not None:
            write_data_files(self.work, self.cfg, *data_files)
        configure_deepspeed(self.accelerator, self.cfg)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        if self.resume_from:
            self.start_step = self.restore(self.resume_from)
        return self

    def rows_for_model(self, rows: list, data_files) -> list:
        """Packed rows only for a model whose attention the workbench controls; else one conversation a row, said in the report."""
        if not self.cfg.pack_to_max_length or keeps_conversations_apart(self.model) or all(len(r) == 1 for r in rows):
            return rows
        note = t("train.packing_off", None, model=type(self.accelerator.unwrap_model(self.model)).__name__)
        if self.dist.is_main:
            print(note)
        if data_files is not None:
            data_files[1].notes = [*getattr(data_files[1], "notes", []), note]
        return unpacked([sample for row in rows for sample in row])

    def restore(self, ckpt: Path) -> int:
        """Every process restores; under DeepSpeed/FSDP weights and optimizer come from iter_N/engine_state/
        (written and read by accelerate and DeepSpeed/FSDP themselves; only on GPUs)."""
        rank, verbose = self.dist.rank, self.dist.is_main
        if self.strategy.engine_state:
            self.dist.load_engine_state(ckpt)
            return load_checkpoint(ckpt, None, None, self.scheduler, rank, verbose)
        return load_checkpoint(ckpt, self.accelerator.unwrap_model(self.model), self.optimizer, self.scheduler, rank,
                               verbose, scaler=self.accelerator.scaler)

    def train(self) -> None:
        if self.model is None:
            raise RuntimeError("Trainer.setup() first")
        TrainLoop(self).run()

    def export(self, save_dir: str | os.PathLike | None = None) -> TrainResult:
        """The main process writes the adapter (or model); with sharded weights all processes gather them first.

        Under ZeRO-3 the exported weights are gathered for the time of the export;
        under FSDP (DTensor shards) the main process rebuilds the model on the CPU
        from the last checkpoint, as `convert pth_to_hf` does.
        """
        adapter = Path(save_dir) if save_dir else self.work / "adapter"
        model = self.accelerator.unwrap_model(self.model)
        if self.dist.exports_from_checkpoint:
            if self.dist.is_main:
                export_from_checkpoint(self.cfg, self.builder, self.last_ckpt, adapter)
        else:
            params = [p for p in model.parameters() if p.requires_grad or self.cfg.method == "full"]
            with self.dist.gathered(params):
                if self.dist.is_main:
                    export_trained(model, self.builder, self.cfg, adapter)
        if self.dist.is_main:
            print(t("train.done", None, work=self.work.resolve(), adapter=adapter.resolve()))
        self.dist.wait()
        return TrainResult(self.work, adapter, self.last_ckpt, read_jsonl(self.work / METRICS),
                           read_jsonl(self.work / EVAL_LOG))


# ---------------------------------------------------------------------------
# Steps of setup
# ---------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator, CUDA's too


def prepare_rows(cfg: Config, builder: PromptBuilder, is_main: bool):
    """(samples, report, rows): the config's data read, encoded and packed (or one sample per row)."""
    samples = mix_sources(cfg)
    vocab_size = model_vocab_size(cfg.pretrained_model_name_or_path, cfg.trust_remote_code)
    encoded, report = encode_samples(samples, builder, cfg.max_length, cfg.loss_on, vocab_size)
    if is_main:
        print(report.text())  # in the session's language (workbench.i18n.set_lang)
    if report.errors:
        raise DataError("training data", 0, None, f"{report.n_errors} record(s) cannot be trained on this model, "
                        f"e.g. {report.errors[0]}")
    if not encoded:
        raise DataError("training data", 0, None, "no trainable samples: every record was dropped (see the report above)")
    rows = pack_rows(encoded, cfg)
    return samples, report, rows


def write_data_files(work: Path, cfg: Config, samples, report) -> None:
    if any(src.generate for src in cfg.datasets):
        write_dataset([s for s in samples if s.source.startswith("generated")], work / "data" / "generated.jsonl")
    atomic_write_text(work / "dataset_report.txt", "\n".join([str(report), *getattr(report, "notes", [])]) + "\n")


def make_optimizer(cfg: Config, model, rows, world_size: int, optimizer=None):
    """(optimizer, scheduler, plan): AdamW over the trainable weights unless given (optimizer.py), schedule, step plan."""
    from transformers import get_scheduler  # heavy: transformers is imported when a run starts

    plan = StepPlan(len(rows), cfg.batch_size, cfg.accumulative_counts, world_size, cfg.seed, cfg.max_steps, cfg.max_epochs)
    if optimizer is None:
        optimizer = adamw(cfg, model)
    warmup = int(round(cfg.warmup_ratio * plan.total_steps))
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=plan.total_steps)
    return optimizer, scheduler, plan


def open_work_dir(work: Path, cfg: Config, dist: Distributed, fresh: bool) -> None:
    """Every process checks (so all refuse together); the main one writes; the others wait until it has."""
    check_fresh_work_dir(work, fresh)
    if dist.is_main:
        work.mkdir(parents=True, exist_ok=True)
        save_config(cfg, work / "config.yaml")
        print(t("train.work_dir", None, work=work.resolve()))
    dist.wait()
    if not (work / "config.yaml").exists():
        raise FileNotFoundError(f"{work.resolve()} (written by the main process) is not visible to process "
                                f"{dist.rank}: on several machines the work dir must be on a shared filesystem")


def export_from_checkpoint(cfg: Config, builder: PromptBuilder, ckpt: Path, save_dir: Path) -> Path:
    """Export a checkpoint's weights through a model rebuilt on the CPU (for sharded runs; as `convert pth_to_hf`)."""
    model = build_unquantized(cfg)
    load_trainable(model, ckpt)
    return export_trained(model, builder, cfg, save_dir)


def gpu_budget(trainer: Trainer) -> int:
    """The GPU fast path's micro-batch token budget (0: not on it), said once by the main process.

    Sized from free memory and the run's rows, it switches gradient checkpointing on (and with it Liger's fused loss,
    where it applies) only when not even one row of max_length would fit without it.
    """
    model, cfg = trainer.accelerator.unwrap_model(trainer.model), trainer.cfg
    if not fastpath_cuda.uses_varlen_attention(model):
        return 0
    budget, checkpoint = token_budget.run_budget(model, cfg, trainer.device, trainer.rows,
                                                 wrapped=not fastpath_cuda.can_call_decoder(trainer.model))
    if checkpoint:
        enable_checkpointing(model)
        fastpath_cuda.set_liger_loss(model, fastpath_cuda.can_fuse_loss(model) and not cfg.extra_loss_terms)
    if trainer.dist.is_main:
        sized = "" if cfg.micro_batch_tokens else t("train.gpu_sized", None)
        note = t("train.gpu_checkpointing", None) if checkpoint else ""
        print(t("train.gpu", None, what=fastpath_cuda.describe(model), budget=budget, sized=sized, note=note))
    return budget


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
class TrainLoop:
    """Runs optimizer steps, logs, evaluates and checkpoints a set-up Trainer (on every process)."""

    def __init__(self, trainer: Trainer):
        self.t = trainer
        self.cfg, self.work, self.dist = trainer.cfg, trainer.work, trainer.dist
        self.pad_id = trainer.builder.tokenizer.pad_token_id
        self.elapsed = 0.0
        self.budget = gpu_budget(trainer)  # tokens a flat micro-batch holds on the GPU fast path; 0 elsewhere
        self.identity = (identity_tokens(trainer.builder, self.cfg.assistant_name, self.cfg.owner_name)
                         if self.cfg.unlikelihood_weight > 0 else None)  # what the unlikelihood term pushes down

    def run(self) -> None:
        start, total = self.t.start_step, self.t.plan.total_steps
        if start:
            self.elapsed = self.restore_logs(start)
            self.t.last_ckpt = self.work / checkpoint_name(start)
        elif self.cfg.evaluation_freq:
            self.evaluate(0)
        bar = tqdm(total=total, initial=start, desc=f"train {self.cfg.method}", unit="step",
                   disable=not (self.t.progress and self.dist.is_main), dynamic_ncols=True)
        self.t.model.train()
        for step in range(start, total):
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

    # -- one step ----------------------------------------------------------------
    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        all_rows = [self.t.rows[i] for i in self.t.plan.step_rows(step)]
        n_trained = sum(row_trained_tokens(r) for r in all_rows)  # the whole step, all processes
        n_real = sum(row_length(r) for r in all_rows)
        loss_sum = self.accumulate_gradients(step, n_trained)
        grad_norm = self.optimizer_step()
        loss = self.t.accelerator.reduce(loss_sum, "sum").item() / max(n_trained, 1)
        dt = time.perf_counter() - t0
        self.elapsed += dt
        lr = self.t.scheduler.get_last_lr()[0]  # LoRA+: the A matrices' (peft's first group); the B matrices' is lr_b
        lr_b = {"lr_b": lr * self.cfg.loraplus_lr_ratio} if self.cfg.loraplus_lr_ratio > 0 else {}  # one schedule
        return {"step": step + 1, "epoch": round(self.t.plan.epoch_at(step + 1), 4), "loss": loss, "lr": lr, **lr_b,
                "grad_norm": grad_norm, "tokens": n_real, "trained_tokens": n_trained, "tokens_per_s": n_real / dt,
                "elapsed_s": round(self.elapsed, 3)}

    def accumulate_gradients(self, step: int, n_trained: int) -> torch.Tensor:
        """Forward and backward over this process's micro-batches; the sum of their token losses."""
        acc, model, device = self.t.accelerator, self.t.model, self.t.device
        loss_sum = torch.zeros((), device=device)
        micro = self.micro_batches(step)
        scale = self.dist.loss_scale(self.cfg)
        for i, rows in enumerate(micro):
            batch = self.batch(rows)
            with self.dist.micro_batch(model, last=i == len(micro) - 1):
                with acc.autocast():  # also where the loss calls the decoder directly (the fused loss, the base's logits)
                    s, total = training_loss(model, batch, self.cfg, acc.unwrap_model(model), self.identity)
                acc.backward(total * scale / max(n_trained, 1))  # the logged loss stays the cross-entropy `s`
            loss_sum += s.detach()
        return loss_sum

    def micro_batches(self, step: int) -> list[list]:
        """This process's micro-batches of a step, as lists of rows; on the GPU fast path regrouped by the token budget.

        There the step's conversations (whatever rows they were packed into) are laid
        into as few flat micro-batches of at most `budget` tokens as fit. DeepSpeed and
        FSDP count the micro-batches of a step themselves, so under them the
        accumulation's grouping stays and only the flat layout applies.
        """
        micro = [[self.t.rows[j] for j in m] for m in self.t.plan.micro_batches(step, self.dist.rank)]
        if not self.budget or self.dist.strategy.engine_state:
            return micro
        samples = [s for rows in micro for row in rows for s in row]
        groups = token_budget.group_by_budget([len(s) for s in samples], self.budget)
        return [[[samples[g] for g in group]] for group in groups]

    def batch(self, rows: list) -> dict:
        """A micro-batch on the device: one flat row on the GPU fast path, padded rows otherwise."""
        if self.budget:
            return to_device(collate_flat(rows), self.t.device)
        return to_device(collate(rows, self.pad_id), self.t.device)

    def optimizer_step(self) -> float:
        """Clip; step the optimizer, and the schedule unless float16's loss scaler skipped it; clear; the norm before clipping."""
        grad_norm = self.dist.clip(self.t.model, self.cfg.max_norm)
        if self.dist.step(self.t.optimizer):
            self.t.scheduler.step()
        self.t.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # -- bookkeeping -----------------------------------------------------------------
    def log(self, rec: dict) -> None:
        if self.dist.is_main:
            append_jsonl(self.work / METRICS, rec)
            if self.t.on_log:
                self.t.on_log(rec)

    def evaluate(self, step: int) -> list[dict]:
        """Answer evaluation_inputs greedily on the main process (on all where weights are sharded); others wait."""
        out = []
        if self.dist.is_main or self.dist.generates_everywhere:
            model = self.t.accelerator.unwrap_model(self.t.model)
            settings = GenerationSettings(max_new_tokens=self.cfg.evaluation_max_new_tokens)
            with self.dist.root_unsharded(model), fastpath_cuda.standard_attention(model):
                answers = answer_batch(model, self.t.builder, list(self.cfg.evaluation_inputs), settings)
                out = [{"step": step, "question": q, "answer": a} for q, a in zip(self.cfg.evaluation_inputs, answers)]
        if self.dist.is_main:
            for rec in out:
                append_jsonl(self.work / EVAL_LOG, rec)
            tqdm.write("\n".join([t("train.eval", None, step=step)] + [t("train.qa", None, **r) for r in out]))
            if self.t.on_eval:
                self.t.on_eval(step, out)
        self.dist.wait()
        return out

    def save(self, step: int) -> None:
        """The main process writes iter_N atomically; then every process adds its RNG (and engine state); then the pointer."""
        dist = self.dist
        dist.wait()
        target = self.work / checkpoint_name(step)
        rng = rng_state()
        model = self.t.accelerator.unwrap_model(self.t.model)
        weights = dist.trainable_weights(model)
        if dist.is_main:
            optimizer = None if dist.strategy.engine_state else self.t.optimizer  # split over processes: in engine_state/
            save_checkpoint(target, model, optimizer, self.t.scheduler, step, self.elapsed, self.cfg, rng,
                            weights=weights, plan=self.t.plan, scaler=self.t.accelerator.scaler)
        dist.wait()
        if not dist.is_main:  # the main process's RNG is inside the atomic folder
            save_rng(target, dist.rank, rng)
        dist.save_engine_state(target)
        dist.wait()
        if dist.is_main:
            write_pointer(self.work, target)
            prune_checkpoints(self.work, self.cfg.save_total_limit)
        self.t.last_ckpt = target

    def restore_logs(self, start_step: int) -> float:
        """Drop log lines written after the checkpoint we resume from; return its elapsed time."""
        if self.dist.is_main:
            for name in (METRICS, EVAL_LOG):
                kept = [r for r in read_jsonl(self.work / name) if r["step"] <= start_step]
                atomic_write_jsonl(self.work / name, kept)
        return read_state(self.work / checkpoint_name(start_step))["elapsed_s"]
