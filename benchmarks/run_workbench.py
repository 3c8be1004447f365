"""One run of the workbench's default training path in this process, measured.

    .venv/bin/python benchmarks/run_workbench.py --config smollm2_135m_lora_identity_mixed_cpu --steps 12 --out wb.json

It runs `workbench.train.Trainer` in a temporary work dir (no evaluation, one
checkpoint at the end) and gives it, through `Trainer.setup(rows=..., model=...)`:

* the data: step s trains exactly the B samples the baseline's step s trains
  (`common.sample_stream`), encoded by the workbench's prompt builder with the
  config's max_length and packed into one row (position_ids restart at every
  sample, so no token attends across samples and nothing is padded). The rows
  are placed so that the run's seeded data order (`workbench.packing.StepPlan`)
  visits them in step order. Only the data preparation differs: the trainer
  would otherwise read, shuffle and pack the whole data set.
* the model, built here by the workbench's own `load_base` + `build_model` (what
  `setup` would call), so that this script can observe, changing nothing, the base
  model's memory footprint as loaded (`model.get_memory_footprint()`) and the
  number of trainable parameters.

Everything else is the workbench's own code, unchanged: the model with LoRA or
QLoRA, accelerate, the loop (collate, `token_loss_sum` with `logits_to_keep`,
clipping, AdamW, the scheduler) and metrics.jsonl, whose per-step `tokens`
(real tokens) and `loss` this script reads through the trainer's `on_log`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

STARTED = time.perf_counter()

import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (step_record, run_main, runner_parser)  # noqa: E402


# ---------------------------------------------------------------------------
# The rows: the baseline's steps, one packed row each, in the run's data order
# ---------------------------------------------------------------------------
def stream_rows(cfg, stream: list, batch_size: int):
    """(builder, rows by step): every B consecutive samples of the stream packed into one row."""
    from workbench.encoding import encode_samples
    from workbench.models import load_builder

    builder = load_builder(cfg)
    encoded, report = encode_samples(stream, builder, cfg.max_length, cfg.loss_on)
    if report.n_dropped:
        raise ValueError(f"{report.n_dropped} samples have nothing to train after truncation to max_length "
                         f"{cfg.max_length}; the two sides would not train the same samples")
    return builder, [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]


def in_plan_order(rows: list, seed: int) -> list:
    """The rows placed so that StepPlan (one row per step, this seed) trains rows[s] at step s."""
    from workbench.packing import StepPlan

    plan = StepPlan(len(rows), 1, 1, 1, seed, max_steps=len(rows))
    placed = [None] * len(rows)
    for s, row in enumerate(rows):
        (index,) = plan.step_rows(s)
        placed[index] = row
    return placed


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
def step_records(log: list[tuple[float, dict]], rows: list) -> list[dict]:
    """Per-step records from metrics lines and the times train() reported them.

    Step 1 takes the loop's own measure of it (it starts after setup); every
    later step is the time between two metrics lines, as the baseline's steps
    are the time between two step ends.
    """
    from workbench.packing import row_length

    out, prev = [], None
    for (t, rec), row in zip(log, rows):
        if rec["tokens"] != row_length(row):
            raise RuntimeError(f"step {rec['step']} trained {rec['tokens']} tokens, its row has {row_length(row)}: "
                               "the data order is not the stream's")
        dt = rec["tokens"] / rec["tokens_per_s"] if prev is None else t - prev
        out.append(step_record(rec["step"], rec["loss"], rec["tokens"], row_length(row), rec["trained_tokens"],
                               len(row), dt))
        prev = t
    return out


def train_workbench(cfg, args, stream: list) -> tuple[list[dict], dict]:
    from workbench.models import build_model, load_base, pick_device, pick_dtype
    from workbench.train import Trainer

    if getattr(args, "extra_terms", False):  # the recipe's own extra loss terms, which common.bench_config turns off
        from workbench.config import resolve_config

        recipe = resolve_config(args.config)
        cfg = cfg.replace(distill_weight=recipe.distill_weight, unlikelihood_weight=recipe.unlikelihood_weight,
                          negative_weight=recipe.negative_weight)
    cfg = with_field(cfg, "micro_batch_tokens", getattr(args, "micro_batch_tokens", None))
    cfg = with_field(cfg, "torch_compile", True if getattr(args, "torch_compile", False) else None)
    log: list[tuple[float, dict]] = []
    with tempfile.TemporaryDirectory(prefix="bench-wb-") as tmp:
        trainer = Trainer(cfg, work_dir=Path(tmp) / "work", on_log=lambda rec: log.append((time.perf_counter(), rec)),
                          progress=False)  # seeds the generators, as before the data and the model
        builder, rows = stream_rows(trainer.cfg, stream, args.batch_size)
        base = load_base(trainer.cfg, trainer.device)
        base_model_bytes = base.get_memory_footprint()
        model = build_model(trainer.cfg, trainer.device, trainer.strategy, base=base)
        if getattr(args, "fused_loss", False):
            from workbench.fastpath.cuda import liger_available, set_liger_loss

            set_liger_loss(model, liger_available())
        if getattr(args, "peft_lora", False):  # what a GPU ran before the lean LoRA under autocast: the A/B of it
            from workbench.fastpath.cpu import use_peft_lora_forward

            use_peft_lora_forward(model)
        trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trainer.setup(rows=in_plan_order(rows, cfg.seed), model=model, builder=builder)
        with profiled(getattr(args, "profile", None), steps=lambda: len(log)) as profile:
            trainer.train()
        trainer.export()
    steps = step_records(log, rows)
    device = pick_device(cfg.device)
    dtype = "nf4" if cfg.method == "qlora" else str(pick_dtype(cfg.torch_dtype, device)).replace("torch.", "")
    first_start = log[0][0] - steps[0]["time_s"]
    extra = {"base_model_bytes": base_model_bytes, "trainable_params": trainable_params,
             "micro_batch_tokens": getattr(cfg, "micro_batch_tokens", None),
             "torch_compile": getattr(cfg, "torch_compile", None), "gradient_checkpointing": cfg.gradient_checkpointing,
             "setup_s": round(first_start - STARTED, 2), "device": device.type, "dtype": dtype}
    if profile.get("summary"):
        extra["gpu_profile"] = profile["summary"]
    return steps, extra


def with_field(cfg, name: str, value):
    """The config with `name` set (micro_batch_tokens, torch_compile) where the workbench's Config has the field."""
    import dataclasses

    if value is None or name not in {f.name for f in dataclasses.fields(cfg)}:
        return cfg
    return cfg.replace(**{name: value})


@contextmanager
def profiled(path: str | None, steps=lambda: 1):
    """torch.profiler around the training steps (CPU and CUDA activity); the operators' table by GPU time to `path`.

    For finding where a step's time goes: the profiler's own overhead makes this run's
    tokens/s not comparable with an unprofiled one. Yields a dict that gets, on a GPU,
    "summary": the GPU's busy share and kernel time by kind (benchmarks/gpu_profile.py),
    `steps()` optimizer steps.
    """
    found: dict = {}
    if not path:
        yield found
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.gpu_profile import describe, from_profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield found
    found["summary"] = from_profiler(prof, steps())
    sorts = ["self_device_time_total", "device_time_total"] if torch.cuda.is_available() else ["self_cpu_time_total"]
    averages = prof.key_averages()
    text = "every training step of the run (the first is a warm-up)\n"
    if found["summary"]:
        text += f"\n{describe(found['summary'])}\n"
    for sort in sorts + ["cpu_time_total"]:
        text += f"\n## sorted by {sort}\n\n{averages.table(sort_by=sort, row_limit=35, max_name_column_width=70)}\n"
    Path(path).write_text(text, encoding="utf-8")


def parser():
    p = runner_parser(__doc__.splitlines()[0])
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="GPU: tokens a micro-batch (config micro_batch_tokens; default: sized from free GPU memory)")
    p.add_argument("--torch-compile", action="store_true",
                   help="GPU: torch.compile the decoder layers (config torch_compile)")
    p.add_argument("--fused-loss", action="store_true",
                   help="GPU: the loss through Liger's fused linear cross-entropy (by default only with checkpointing)")
    p.add_argument("--peft-lora", action="store_true",
                   help="peft's own LoRA forward and torch's dropout (a GPU's float32 copies of each adapter's input) "
                        "instead of the lean forward and the seeded dropout")
    p.add_argument("--extra-terms", action="store_true",
                   help="the recipe's distillation, unlikelihood and negative-twin terms on (the mixed recipe's cure; "
                        "no other side has them, so it is the workbench's own cost of them)")
    p.add_argument("--profile", default=None, metavar="TXT",
                   help="write torch.profiler's operator table of the training steps here (slows the run)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main("workbench", train_workbench, __doc__.splitlines()[0], STARTED, argv, parser=parser())


if __name__ == "__main__":
    sys.exit(main())
