"""One point of the scaling sweep (benchmarks/scaling.py) in this process: the workbench's training path, measured.

    .venv/bin/python benchmarks/scaling_point.py --model MODEL --method lora --max-length 512 --rows 1 --out p.json
    .venv/bin/python benchmarks/scaling_point.py --make-model qwen2.5-0.5b --models-dir DIR   # a random model, once

A point trains `--warmup` + `--steps` optimizer steps of `--rows` rows, each row
one synthetic conversation of exactly max_length tokens (seeded random token
ids; the first quarter is the prompt, the rest the trained answer), through
`workbench.train.Trainer` as run_workbench.py does (the rows and the model given
to `Trainer.setup`). Real tokens/s is over the steps after the warm-up, each
step timed by the loop itself. Peak memory is the peak RSS of the training
itself (Linux: the high-water mark VmHWM, reset through /proc/self/clear_refs
once the model is loaded, so that the pages of the model file read while loading
do not count), the process's lifetime peak RSS beside it, and the peak GPU memory
on a GPU. It also writes what `workbench.estimate.estimate`
predicts for the same config (time per step and memory), with the matmul
throughput the sweep measured once (`--gflops`).

The larger models are randomly initialised from the public configs (scaling.py,
`MODEL_CONFIGS`), written once by `--make-model` into the models folder with the
embedded model's tokenizer: speed and memory do not depend on the weights' values.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT_MODEL, bench_config, peak_memory, set_threads, write_result  # noqa: E402

RECIPE = "smollm2_135m_lora_identity_mixed_cpu"  # LoRA settings, optimiser and seed of the sweep
PROMPT_SHARE = 0.25  # the untrained part of each synthetic conversation
MIB = 2**20


# ---------------------------------------------------------------------------
# Random models from public configs
# ---------------------------------------------------------------------------
def make_model(name: str, config: dict, models_dir: Path) -> Path:
    """A randomly initialised model of this config with the embedded tokenizer, written once to models_dir/name."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from workbench.io import atomic_dir
    from workbench.models import embedded_ready, resolve_model_path

    target = models_dir / name
    if embedded_ready(target):
        return target
    tok = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    mcfg = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(mcfg, dtype=torch.bfloat16)  # bf16 on disk: half the size; loaded as float32
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"Random weights, config {json.dumps(config)}; for benchmarks/scaling.py only.\n",
                                        encoding="utf-8")
    return target


# ---------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------
def synthetic_rows(n_rows: int, max_length: int, vocab: int, seed: int) -> list:
    """n_rows rows, each one conversation of max_length seeded random tokens, the last 3/4 trained."""
    import torch

    from workbench.prompt import IGNORE, Encoded

    g = torch.Generator().manual_seed(seed)
    prompt = int(max_length * PROMPT_SHARE)
    rows = []
    for _ in range(n_rows):
        ids = torch.randint(0, vocab, (max_length,), generator=g).tolist()
        rows.append([Encoded(ids, [IGNORE] * prompt + ids[prompt:])])
    return rows


# ---------------------------------------------------------------------------
# The point
# ---------------------------------------------------------------------------
def point_config(args):
    cfg = bench_config(RECIPE, args.model, args.method, args.warmup + args.steps)
    return cfg.replace(max_length=args.max_length, batch_size=args.rows, warmup_ratio=0.0)


def train_point(cfg, args) -> tuple[list[dict], dict]:
    """Train on synthetic rows; the per-step metrics lines and what the process measured."""
    from workbench.models import build_model, load_base, load_builder
    from workbench.train import Trainer

    log: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        trainer = Trainer(cfg, work_dir=Path(tmp) / "work", on_log=log.append, progress=False)
        builder = load_builder(trainer.cfg)
        base = load_base(trainer.cfg, trainer.device)
        base_bytes = base.get_memory_footprint()
        vocab = min(base.config.vocab_size, len(builder.tokenizer))
        model = build_model(trainer.cfg, trainer.device, trainer.strategy, base=base)
        rows = synthetic_rows(cfg.max_steps * args.rows, args.max_length, vocab, cfg.seed)
        trainer.setup(rows=rows, model=model, builder=builder)
        reset = reset_peak_rss()
        trainer.train()
        train_peak = vm_hwm_mib() if reset else None
    return log, {"base_model_bytes": base_bytes, "loaded_params": sum(p.numel() for p in model.parameters()),
                 "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                 "train_peak_rss_mib": train_peak}


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) on Linux; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return vm_hwm_mib() is not None
    except OSError:
        return False


def vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def predicted(cfg, gflops: float) -> dict:
    """What workbench.estimate says for this config: seconds per step, tokens/s and memory (GB)."""
    from workbench.estimate import estimate

    e = estimate(cfg, tokens_per_row=cfg.max_length, steps=cfg.max_steps, gflops=gflops)
    return {"seconds_per_step": e.seconds_per_step, "tokens_per_s": e.tokens_per_step / e.seconds_per_step,
            "total_params": e.total_params, "trainable_params": e.trainable_params,
            "memory_gb": e.total_gb, "weights_gb": e.weights_gb, "activations_gb": e.activations_gb,
            "optimizer_gb": e.optimizer_gb}


def predicted_params(cfg) -> int:
    """The model's parameters counted from its config (a 4-bit model's packed weights count half in numel())."""
    from workbench.estimate import param_counts

    return param_counts(cfg)["total"]


def measured(log: list[dict], warmup: int) -> dict:
    timed = log[warmup:] or log
    seconds = [r["tokens"] / r["tokens_per_s"] for r in timed]
    return {"tokens_per_s": sum(r["tokens"] for r in timed) / sum(seconds), "seconds_per_step": statistics.median(seconds),
            "tokens_per_step": timed[0]["tokens"], "steps_timed": len(timed),
            "first_step_s": log[0]["tokens"] / log[0]["tokens_per_s"]}


def run_point(args) -> dict:
    import torch

    set_threads(args.threads)
    cfg = point_config(args)
    log, extra = train_point(cfg, args)
    memory = {**peak_memory(), "train_peak_rss_mib": extra.pop("train_peak_rss_mib")}
    memory["memory_mib"] = memory["peak_gpu_mib"] or memory["train_peak_rss_mib"] or memory["peak_rss_mib"]
    result = {"model": args.label or args.model, "path": args.model, "method": args.method, "max_length": args.max_length,
              "rows": args.rows, "warmup": args.warmup, "steps": args.steps, "threads": torch.get_num_threads(),
              "measured": {**measured(log, args.warmup), **memory}, "estimate": predicted(cfg, args.gflops),
              "total_params": predicted_params(cfg), **extra, "process_s": round(time.perf_counter() - STARTED, 2), "steps_log": log}
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model id or folder")
    p.add_argument("--label", default=None, help="the model's name in the tables")
    p.add_argument("--method", default="lora", choices=("lora", "qlora"))
    p.add_argument("--max-length", type=int, default=512, help="tokens per row (one synthetic conversation)")
    p.add_argument("--rows", type=int, default=1, help="rows per optimizer step")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the rates")
    p.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--gflops", type=float, default=None, help="matmul throughput for the estimate (default: measure)")
    p.add_argument("--make-model", default=None, metavar="NAME", help="write the random model NAME (scaling.MODEL_CONFIGS) and exit")
    p.add_argument("--quick", action="store_true", help="with --make-model: the tiny stand-in of that model")
    p.add_argument("--models-dir", default=None, help="where random models are written (default: WORKBENCH_CACHE/bench-models)")
    p.add_argument("--out", default=None, help="result JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_model:
        from benchmarks.scaling import model_configs, models_dir

        print(make_model(args.make_model, model_configs(args.quick)[args.make_model], models_dir(args.models_dir)))
        return 0
    if args.gflops is None:
        from benchmarks.machine import matmul_gflops

        args.gflops = matmul_gflops(1.0)["gflops"]
    result = run_point(args)
    write_result(args.out, result)
    m, e = result["measured"], result["estimate"]
    print(f"{result['model']} {args.method} L={args.max_length} rows={args.rows}: {m['tokens_per_s']:.0f} real tokens/s "
          f"(estimate {e['tokens_per_s']:.0f}), peak memory {m['memory_mib']:.0f} MiB (estimate {e['memory_gb'] * 1e9 / MIB:.0f}; "
          f"lifetime peak RSS {m['peak_rss_mib']:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
