"""`make bench-gpu`: the workbench against TRL and the tutorial's PEFT script on one CUDA GPU, nothing downloaded.

    .venv/bin/python benchmarks/bench_gpu.py                 # on a CUDA machine: about 8 minutes on one H100/H200
    .venv/bin/python benchmarks/bench_gpu.py --dry-run       # rehearsal on a CPU: tiny shapes, a few minutes

The models are random-weight stand-ins of public shapes (SmolLM2-135M, Qwen2.5-1.5B, Qwen2.5-7B), built on the
GPU (never initialised on the host: a 1.4B model takes a minute there) and saved once, with the embedded model's
tokenizer (the shape's vocabulary is kept; token ids stay below the tokenizer's size). Every side trains the same
samples (`common.sample_stream` of the mixed recipe) with the same LoRA settings, in its own process (so that peak
GPU memory, `torch.cuda.max_memory_allocated`, is its own), about `--tokens` real tokens a step:

* workbench: `run_workbench.py`, the workbench's own training path (on CUDA: its CUDA path);
* TRL best: `baseline_trl.py` with BFD packing, padding-free rows, Liger Kernel when installed, no checkpointing;
* TRL defaults: `baseline_trl.py` as the docs teach it (its default gradient checkpointing);
* PEFT script: `baseline_peft.py`, the tutorial's PEFT + Trainer script as written (checkpointing on);
* Unsloth: a row saying whether it is installed (no runner for it here).

Each side is time-boxed; one that fails or runs out of time gets a row with the error, and the run goes on. The
report (`benchmarks/results/gpu.md` and `gpu.json`, naming the GPU) gives real tokens/s, MFU (4 x the linear
layers' weights per token, LoRA's frozen base has no weight gradients, over this GPU's measured bf16 matmul),
peak GPU memory, and the loss at equal tokens seen against the workbench (summary.loss_at_equal_tokens).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import ROOT  # noqa: E402
from benchmarks.gpu_report import job_row, machine, render_markdown, targets, write_report  # noqa: E402
from benchmarks.gpu_sides import PLAN, SHAPES, SIDES, TINY, Job  # noqa: E402

CONFIG = "smollm2_135m_lora_identity_mixed_cpu"  # the mixed data (identity + general, EN/ZH), LoRA r 8 all-linear
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
# Unsloth 2026.10 cannot be carried to an offline GPU machine within the 64 MiB a call takes (its wheel alone is
# 28.6 MB, and it needs xformers, torchvision, torchao and diffusers), and it pins trl <= 1.15, datasets < 5 and
# transformers <= 5.17, beside this bench's trl 1.16 and datasets 5.2; nor does it run on a CPU, where the dry run
# would rehearse a runner. So its row says why it has no figures rather than run code never run anywhere.
UNSLOTH_NOT_RUN = {
    "not installed": "its wheels (28.6 MB, with xformers, torchvision, torchao, diffusers) do not fit "
                     "the GPU check's carry, and it pins trl <= 1.15 and datasets < 5 (this bench: trl 1.16, datasets 5.2)",
    "skipped": "installed, but not run here: its pins (trl <= 1.15, datasets < 5) differ from this bench's, and a runner "
               "could not be rehearsed on a CPU"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="rehearse every side on this CPU: tiny shapes (architecture and vocabulary kept), float32, few steps")
    p.add_argument("--tokens", type=int, default=None, help="real tokens a step, every side (default 16384; dry run 1024)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps a side, the first a warm-up (default 4; dry run 3)")
    p.add_argument("--budget-s", type=float, default=None, help="the whole run's time box in seconds (default 450; dry run 420)")
    p.add_argument("--side-timeout-s", type=float, default=None, help="one side's time box (default 100; dry run 150)")
    p.add_argument("--shapes", default=None, help=f"comma list, a subset of {', '.join(SHAPES)}")
    p.add_argument("--methods", default=None, help="comma list: lora, qlora")
    p.add_argument("--sides", default=None, help=f"comma list, a subset of {', '.join(SIDES)}")
    p.add_argument("--runs", type=int, default=2, help="runs of the main comparison (1.5B LoRA, workbench and TRL best); "
                   "the targets take the median")
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="the workbench side's tokens a micro-batch (config micro_batch_tokens; default: sized from free memory)")
    p.add_argument("--config", default=CONFIG, help="recipe: data, LoRA settings, lr, max_length, seed")
    p.add_argument("--tokenizer", default=None, help="folder with the tokenizer files (default: the embedded model's)")
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "bench-gpu"), help="stand-in models and per-side logs")
    p.add_argument("--out-dir", default=None,
                   help="where gpu.md and gpu.json go (default benchmarks/results/; dry run: the work dir)")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.tokens = args.tokens or (1024 if dry else 16384)
    args.steps = args.steps or (3 if dry else 4)
    args.budget_s = args.budget_s or (420.0 if dry else 450.0)
    args.side_timeout_s = args.side_timeout_s or (150.0 if dry else 100.0)
    args.out_dir = Path(args.out_dir or (Path(args.work_dir) if dry else HERE / "results"))
    args.work_dir = Path(args.work_dir)
    return args


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    keep = {key: None if getattr(args, key) is None else set(getattr(args, key).split(",")) for key in ("shapes", "methods", "sides")}
    for key, known in (("shapes", SHAPES), ("methods", ("lora", "qlora")), ("sides", SIDES)):
        unknown = (keep[key] or set()) - set(known)
        if unknown:
            raise SystemExit(f"--{key}: unknown {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    jobs = [Job(shape, method, side, run=run) for shape, method, sides, run in PLAN for side in sides
            if all(keep[k] is None or v in keep[k] for k, v in (("shapes", shape), ("methods", method), ("sides", side)))
            and run <= args.runs]
    return jobs


# ---------------------------------------------------------------------------
# The stand-in models
# ---------------------------------------------------------------------------
def tokenizer_dir(args: argparse.Namespace) -> Path:
    from workbench.models import EMBEDDED_DIR

    folder = Path(args.tokenizer) if args.tokenizer else EMBEDDED_DIR
    missing = [f for f in TOKENIZER_FILES if not (folder / f).exists()]
    if missing:
        raise SystemExit(f"{folder}: no {', '.join(missing)}; pass --tokenizer DIR (the embedded model's tokenizer "
                         "files: `make setup` prepares them, scripts/gpu_wheels.sh packs them)")
    return folder


def shape_config(shape: str, tokenizer, tiny: bool):
    """The shape's transformers config: its vocabulary, the tokenizer's special ids."""
    from transformers import LlamaConfig, Qwen2Config

    kind, dims = SHAPES[shape]
    dims = {**dims, **(TINY if tiny else {})}
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if dims["vocab_size"] < len(tokenizer):
        raise ValueError(f"{shape}: vocabulary {dims['vocab_size']} < the tokenizer's {len(tokenizer)}")
    return (LlamaConfig if kind == "llama" else Qwen2Config)(**dims, **ids)


def build_stand_in(shape: str, args: argparse.Namespace, device: str, tok_dir: Path) -> Path:
    """The shape with random weights, built on `device` (bf16 on a GPU) and saved with the tokenizer, once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.work_dir / "models" / (shape + ("-tiny" if args.dry_run else ""))
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    cfg = shape_config(shape, tokenizer, args.dry_run)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # on the GPU: seconds for 7B, where the host takes minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="4GB")
    for name in TOKENIZER_FILES:
        shutil.copy2(tok_dir / name, tmp / name)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def linear_params(shape: str, tiny: bool, tokenizer) -> int:
    """Weights of every linear layer, the output head included (the matmuls a token costs), counted on `meta`."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(shape, tokenizer, tiny))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


# ---------------------------------------------------------------------------
# Equal tokens a step
# ---------------------------------------------------------------------------
def samples_for_tokens(config: str, model: Path, tokens: int, multiple: int) -> tuple[int, float, int]:
    """(samples a step, mean sample length, max_length): about `tokens` real tokens a step from the shared stream,
    a multiple of `multiple` samples (the PEFT script's micro-batch)."""
    from benchmarks.common import bench_config, sample_stream
    from workbench.encoding import encode_samples
    from workbench.models import load_builder

    cfg = bench_config(config, str(model))
    stream = sample_stream(cfg, 2000)
    encoded, _ = encode_samples(stream, load_builder(cfg), cfg.max_length, cfg.loss_on)
    mean = sum(len(s) for s in encoded) / len(encoded)
    return multiple * max(1, round(tokens / mean / multiple)), mean, cfg.max_length


# ---------------------------------------------------------------------------
# Running one side, time-boxed, in its own process
# ---------------------------------------------------------------------------
def micro_batch(args: argparse.Namespace) -> int:
    """Samples a forward pass of the PEFT script: padded to the longest of them, a whole 16k-token step (~160
    samples of up to max_length) would hold ~80k positions and their fp32 logits; the tutorial accumulates."""
    return 4 if args.dry_run else 16


def side_command(job: Job, args: argparse.Namespace, model: Path, batch: int, rows: int, out: Path) -> list[str]:
    side = SIDES[job.side]
    cmd = [sys.executable, str(HERE / side.script), "--config", args.config, "--model", str(model), "--method", job.method,
           "--steps", str(args.steps), "--batch-size", str(batch), *side.args, "--out", str(out)]
    if side.script == "baseline_peft.py":
        cmd[-2:-2] = ["--micro-batch-size", str(micro_batch(args))]
    if side.script == "run_workbench.py" and args.micro_batch_tokens:
        cmd[-2:-2] = ["--micro-batch-tokens", str(args.micro_batch_tokens)]
    if job.side == "workbench_profile":
        cmd[-2:-2] = ["--profile", str(out.with_suffix(".profile.txt"))]
    if side.script == "baseline_trl.py":
        cmd[-2:-2] = ["--rows-per-step", str(rows)]
        if job.side == "trl_best" and liger_usable(args):
            cmd[-2:-2] = ["--liger-kernel"]
    return cmd


def liger_usable(args: argparse.Namespace) -> bool:
    return not args.dry_run and importlib.util.find_spec("liger_kernel") is not None


RUNNING: list[subprocess.Popen] = []  # the side now running, stopped with this process (SIGTERM from `timeout`)


def stop_running(signum, frame) -> None:
    for proc in RUNNING:
        os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"stopped by signal {signum}")


def run_side(job: Job, cmd: list[str], timeout: float, runs_dir: Path) -> None:
    out, log = Path(cmd[-1]), runs_dir / f"{job.name}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        RUNNING.append(proc)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the side and anything it started
            proc.wait()
            code = None
        finally:
            RUNNING.remove(proc)
    job.seconds = round(time.perf_counter() - t0, 1)
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-6:]
    if code is None:
        job.status, job.error = "timeout", f"stopped after {timeout:.0f} s (its time box); log: {log}"
    elif code != 0 or not out.exists():
        job.status, job.error = "failed", f"exit {code}: " + " | ".join(line.strip() for line in tail if line.strip())[-600:]
    else:
        job.status, job.result = "ok", json.loads(out.read_text(encoding="utf-8"))


def run_jobs(jobs: list[Job], args: argparse.Namespace, deadline: float, device: str, tok_dir: Path, report) -> None:
    runs_dir = args.work_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, Path] = {}
    sizes: dict[str, tuple[int, float, int]] = {}
    floor = 20.0 if args.dry_run else 30.0  # less than this left: the side would not get past its set-up
    for i, job in enumerate(jobs, 1):
        if SIDES[job.side].script is None:
            job.status = "not installed" if importlib.util.find_spec("unsloth") is None else "skipped"
            job.error = UNSLOTH_NOT_RUN[job.status]
            continue
        if job.side.startswith("trl") and importlib.util.find_spec("trl") is None:
            job.status, job.error = "skipped", "trl is not installed (pip install -r benchmarks/requirements.txt)"
            continue
        if job.method == "qlora" and device == "cpu" and not args.dry_run:
            job.status, job.error = "skipped", "QLoRA needs a GPU here"
            continue
        left = deadline - time.perf_counter()
        if left < floor:
            job.status, job.error = "skipped", f"the run's time box ({args.budget_s:.0f} s) was spent"
            continue
        try:
            if job.shape not in models:
                models[job.shape] = build_stand_in(job.shape, args, device, tok_dir)
                sizes[job.shape] = samples_for_tokens(args.config, models[job.shape], args.tokens, micro_batch(args))
        except Exception as exc:  # noqa: BLE001 - a row with the error, never an aborted run
            job.status, job.error = "failed", f"building the stand-in: {type(exc).__name__}: {exc}"[:600]
            continue
        batch, _, max_length = sizes[job.shape]
        rows = max(1, round(args.tokens / max_length))
        cmd = side_command(job, args, models[job.shape], batch, rows, runs_dir / f"{job.name}.json")
        slow = (2 if job.shape == "qwen2.5-7b" else 1) * {"workbench_compile": 3, "workbench_profile": 2}.get(job.side, 1)
        timeout = min(args.side_timeout_s * slow, deadline - time.perf_counter())
        print(f"[{i}/{len(jobs)}] {job.name}: {batch} samples ({rows} TRL rows) a step, time box {timeout:.0f} s", flush=True)
        job.status = "running"
        run_side(job, cmd, timeout, runs_dir)
        print(f"    {job.status} in {job.seconds} s" + (f": {job.error}" if job.error else ""), flush=True)
        report()


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------
def matmul_tflops(device: str) -> dict:
    """This chip's bf16 matmul throughput (8192^3, timed with synchronisation); fp32 1024^3 on a CPU."""
    import torch

    from workbench.estimate import measure_matmul_gflops

    if device == "cuda":
        gflops = measure_matmul_gflops("cuda", size=8192, dtype=torch.bfloat16, seconds=2.0)
        return {"dtype": "bfloat16", "size": 8192, "tflops": gflops / 1000}
    gflops = measure_matmul_gflops("cpu", size=1024, dtype=torch.float32, seconds=1.0)
    return {"dtype": "float32", "size": 1024, "tflops": gflops / 1000}


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    deadline = started + args.budget_s - 5  # a few seconds for the last report
    import torch
    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA GPU here: `make bench-gpu` measures a GPU. --dry-run rehearses it on this CPU.")
    tok_dir = tokenizer_dir(args)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    jobs = plan_jobs(args)
    flops = {shape: linear_params(shape, args.dry_run, tokenizer) for shape in dict.fromkeys(j.shape for j in jobs)}
    mm = matmul_tflops(device)
    print(f"{machine(device)['gpu'] or 'CPU'}: {mm['dtype']} matmul {mm['tflops']:.1f} TFLOP/s; {len(jobs)} sides planned, "
          f"time box {args.budget_s:.0f} s", flush=True)
    info = machine(device)
    command = " ".join(shlex.quote(a) for a in ["benchmarks/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])])

    def report() -> dict:
        rows = [job_row(j, jobs, flops, mm["tflops"]) for j in jobs]
        rep = {"machine": info, "dry_run": args.dry_run, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "matmul": mm, "linear_params": flops, "tokens_per_step": args.tokens, "steps": args.steps,
               "config": args.config, "rows": rows, "targets": targets(rows), "command": command,
               "elapsed_s": time.perf_counter() - started, "jobs": [asdict(j) | {"result": None} for j in jobs]}
        write_report(rep, args.out_dir)
        return rep

    signal.signal(signal.SIGTERM, stop_running)
    try:
        run_jobs(jobs, args, deadline, device, tok_dir, report)
    finally:  # also when stopped (SIGTERM from `timeout`): the rows so far, the rest marked
        for job in jobs:
            if job.status in ("running", "planned"):
                job.status, job.error = ("stopped" if job.status == "running" else "not run"), "the benchmark was stopped"
        rep = report()
    print(render_markdown(rep))
    print(f"-> {args.out_dir / 'gpu.md'}, {args.out_dir / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
