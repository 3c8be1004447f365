"""What the two benchmark runners share: the command line, the config, the sample stream and the result.

The runners (`run_workbench.py`, `baseline_peft.py`, `baseline_trl.py`) build the same `Config`
from a recipe and the command line (`bench_config`), take the same samples in
the same order from it (`sample_stream`: step s trains samples s*B .. s*B+B-1),
and write a result JSON of the same shape: one record per optimizer step
(`step_record`), the memory the process used (`peak_memory`), and a summary
computed the same way for both (`summarize`).

Step records hold: loss (mean over the step's trained tokens), tokens (real,
non-padding tokens), positions (tokens the model computed, padding included),
trained_tokens (tokens with a loss), samples, and time_s (wall time of the
step, data collation included). The first step warms up (memory allocation,
kernel selection) and is left out of the rates, but counted in the time to
reach the loss threshold.
"""
from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
FINAL_STEPS = 3  # the final loss is the mean of the last FINAL_STEPS step losses


# ---------------------------------------------------------------------------
# Command line and config
# ---------------------------------------------------------------------------
def runner_parser(description: str) -> argparse.ArgumentParser:
    """The command line both runners take (bench.py passes the same arguments to each)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="recipe name or config YAML: data, LoRA settings, lr, max_length, seed")
    p.add_argument("--model", default=None, help="override pretrained_model_name_or_path (e.g. embedded:tiny-random)")
    p.add_argument("--method", default="lora", choices=("lora", "qlora"), help="LoRA on the float base, or on a 4-bit NF4 base")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="samples per optimizer step (the same on both sides)")
    p.add_argument("--threshold", type=float, default=0.7, help="time to identity: first step whose training loss is below this")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (the tutorial's TrainingArguments set it)")
    p.add_argument("--no-fast-path", action="store_true",
                   help="workbench: transformers', peft's and torch's plain attention, dropout, LoRA forward and loss (config fast_path: false)")
    p.add_argument("--out", required=True, help="result JSON to write")
    return p


def bench_config(config: str, model: str | None = None, method: str = "lora", steps: int = 12,
                 gradient_checkpointing: bool = False, fast_path: bool = True):
    """The recipe with the benchmark's settings: no evaluation, no checkpoints but the last, one row per step, and no
    distillation or unlikelihood term (the sides compared, PEFT's and TRL's trainers, train on the cross-entropy alone)."""
    from workbench.config import resolve_config

    cfg = resolve_config(config)
    changes = dict(method=method, max_steps=steps, batch_size=1, accumulative_counts=1, evaluation_freq=0,
                   save_steps=10**9, save_total_limit=1, logging_steps=1, gradient_checkpointing=gradient_checkpointing,
                   fast_path=fast_path, distill_weight=0.0, unlikelihood_weight=0.0, negative_weight=0.0)
    if model:
        changes["pretrained_model_name_or_path"] = model
    return cfg.replace(**changes)


def set_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


# ---------------------------------------------------------------------------
# Data: the same samples, in the same order, on both sides
# ---------------------------------------------------------------------------
def sample_stream(cfg, n: int) -> list:
    """n samples in the config's seeded mixture order, cycled when the mixture is shorter.

    Only conversations with one assistant answer are used, so that the baseline
    (which trains the last answer, as the tutorial does) and the workbench
    (which trains every answer) train exactly the same tokens.
    """
    from workbench.mixing import mix_sources

    pool = [s for s in mix_sources(cfg) if single_answer(s)]
    if not pool:
        raise ValueError(f"{cfg.name}: no single-answer conversations in its data")
    return [pool[i % len(pool)] for i in range(n)]


def single_answer(sample) -> bool:
    roles = [m["role"] for m in sample.messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return sample.text is None and roles == ["user", "assistant"]


def with_system(messages: list[dict], system: str) -> list[dict]:
    """The config's system prompt in front, unless the sample brings its own (as the workbench does)."""
    if messages and messages[0]["role"] == "system":
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def check_stream(cfg, n: int) -> str:
    """Read the config's data once (raises when a file is missing); a one-line description of the stream."""
    stream = sample_stream(cfg, n)
    distinct = len({tuple((m["role"], m["content"]) for m in s.messages) for s in stream})
    return f"{cfg.name}: {n} samples ({distinct} distinct) from {', '.join(describe_sources(cfg))}"


def describe_sources(cfg) -> list[str]:
    return [src.path or f"generate:{src.generate}" for src in cfg.datasets]


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------
def step_record(step: int, loss: float, tokens: int, positions: int, trained_tokens: int, samples: int,
                time_s: float) -> dict:
    return {"step": step, "loss": float(loss), "tokens": int(tokens), "positions": int(positions),
            "trained_tokens": int(trained_tokens), "samples": int(samples), "time_s": float(time_s)}


def peak_memory() -> dict:
    """Peak resident memory of this process (MiB) and peak GPU memory allocated by torch (MiB, None on CPU)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    gpu = None
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            gpu = torch.cuda.max_memory_allocated() / 2**20
    return {"peak_rss_mib": round(rss_mib, 1), "peak_gpu_mib": None if gpu is None else round(gpu, 1)}


def run_header(side: str, cfg, args, device: str, dtype: str) -> dict:
    """What was run: enough to recognise the run in results.json."""
    import torch

    return {"side": side, "config": cfg.name, "data": describe_sources(cfg), "model": cfg.pretrained_model_name_or_path,
            "method": cfg.method, "steps": args.steps, "batch_size": args.batch_size, "max_length": cfg.max_length,
            "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                     "targets": cfg.lora_target_modules},
            "lr": cfg.lr, "lr_scheduler": cfg.lr_scheduler, "seed": cfg.seed, "device": device, "dtype": dtype,
            "threads": torch.get_num_threads(), "threshold": args.threshold}


def summarize(steps: list[dict], threshold: float) -> dict:
    """Rates over the steps after the first, time to the loss threshold, final loss, tokens and samples per step."""
    timed = steps[1:] or steps
    time_sum = sum(r["time_s"] for r in timed)
    reached = next((i for i, r in enumerate(steps) if r["loss"] < threshold), None)
    last = [r["loss"] for r in steps[-FINAL_STEPS:]]
    positions = sum(r["positions"] for r in steps)
    return {
        "tokens_per_s": sum(r["tokens"] for r in timed) / time_sum if time_sum > 0 else float("nan"),
        "step_time_s": statistics.median(r["time_s"] for r in timed),
        "time_to_threshold_s": None if reached is None else sum(r["time_s"] for r in steps[:reached + 1]),
        "threshold_step": None if reached is None else steps[reached]["step"],
        "final_loss": statistics.fmean(last),
        "final_loss_sem": statistics.stdev(last) / math.sqrt(len(last)) if len(last) > 1 else 0.0,
        "tokens_per_step": statistics.fmean(r["tokens"] for r in steps),
        "positions_per_step": statistics.fmean(r["positions"] for r in steps),
        "trained_tokens_per_step": statistics.fmean(r["trained_tokens"] for r in steps),
        "samples_per_step": statistics.fmean(r["samples"] for r in steps),
        "padding_share": 1 - sum(r["tokens"] for r in steps) / positions if positions else 0.0,
        "train_s": sum(r["time_s"] for r in steps),
    }


def finish_result(header: dict, steps: list[dict], extra: dict, started: float) -> dict:
    """The result JSON: header, summary, memory, the extra measurements of the side, and every step."""
    return {**header, "summary": summarize(steps, header["threshold"]), **peak_memory(), **extra,
            "process_s": round(time.perf_counter() - started, 2), "steps_log": steps}


def write_result(path: str | Path, result: dict) -> Path:
    from workbench.io import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result, indent=1)
    return path


def run_main(side: str, train_fn, description: str, started: float, argv: list[str] | None = None,
             parser: argparse.ArgumentParser | None = None) -> int:
    """One measured run of `side` ("workbench", "baseline" or "trl"): parse, train, summarise, write the result JSON."""
    args = (parser or runner_parser(description)).parse_args(argv)
    set_threads(args.threads)
    cfg = bench_config(args.config, args.model, args.method, args.steps, args.gradient_checkpointing,
                       not args.no_fast_path)
    stream = sample_stream(cfg, args.steps * args.batch_size)
    steps, extra = train_fn(cfg, args, stream)
    if len(steps) != args.steps:
        raise RuntimeError(f"expected {args.steps} logged steps, got {len(steps)}")
    header = run_header(side, cfg, args, extra.pop("device"), extra.pop("dtype"))
    result = finish_result(header, steps, extra, started)
    write_result(args.out, result)
    s = result["summary"]
    print(f"{side} {cfg.name} {cfg.method}: {s['tokens_per_s']:.0f} real tokens/s, {s['step_time_s']:.2f} s/step, "
          f"final loss {s['final_loss']:.4f}, peak RSS {result['peak_rss_mib']:.0f} MiB -> {args.out}")
    return 0
