"""`make bench`: the workbench's training path against the PEFT + Trainer script and TRL's SFTTrainer, in one go.

    .venv/bin/python benchmarks/bench.py [--steps 16 --repeats 2 --datasets mixed,tutorial --methods lora,qlora]

For every data set it runs the workbench (A, `run_workbench.py`) and the
baselines in alternation, each in a fresh process, on the same base model,
samples, LoRA settings and number of steps (benchmarks/sides.py):

* B, `baseline_peft.py --gradient-checkpointing`: the tutorial's script as written;
* C, `baseline_peft.py`: the same with checkpointing off (first data set, the
  first `--reference-repeats` rounds, none by default), which splits the speed-up
  into what checkpointing costs and what packing and the fast path gain;
* T and T', `baseline_trl.py`: TRL's SFTTrainer with its defaults (packing,
  completion-only loss, gradient checkpointing on) and with checkpointing off
  (first data set; needs trl, benchmarks/requirements.txt; `--no-trl` leaves
  them out).

A round on the first data set is A B C T T' (C and T in the first
`--reference-repeats` / `--trl-default-repeats` rounds; T' is the faster TRL
configuration and runs in every round); `--repeats` rounds there,
`--other-repeats` rounds of A B on the others. QLoRA runs one pair (A B) on the
first data set, for the memory of the loaded base model and the speed. It also
measures this machine's matmul throughput (before and after the runs) and turns
the real tokens per second into achieved FLOP/s (4 x parameters per token for
LoRA/QLoRA) as a share of it.

Output in --out (default benchmarks/results/): RESULTS.md (the headline against
the stronger baseline, medians, the ratio of each pair, losses at equal tokens
seen, the targets, the machine and the command that reproduces it),
results.json (the same plus every run with its steps), and runs/ (each run's
JSON and log). See benchmarks/README.md for the fairness rules.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT_MODEL, ROOT, bench_config, check_stream, set_threads  # noqa: E402
from benchmarks.machine import load_average, machine_info, matmul_gflops  # noqa: E402
from benchmarks.report import render_markdown, sides_settings  # noqa: E402
from benchmarks.sides import REFERENCE, SIDES, TRL_SIDES  # noqa: E402
from benchmarks.summary import summarize_all, targets  # noqa: E402

HERE = Path(__file__).resolve().parent
DATASETS = {"mixed": "smollm2_135m_lora_identity_mixed_cpu", "tutorial": "smollm2_135m_lora_identity_tutorial",
            "default": "smollm2_135m_lora_identity_cpu"}
TRL_MISSING = ("trl is not installed, and the TRL baseline needs it: .venv/bin/python -m pip install -r "
               "benchmarks/requirements.txt (`make bench` does it), or leave TRL out with --no-trl")


@dataclass
class Job:
    dataset: str  # short name (mixed, tutorial, or the name given as name=config)
    config: str  # recipe name or YAML path
    method: str
    steps: int
    repeat: int
    side: str

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.method}-r{self.repeat + 1}-{self.side}"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model for every run (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of every LoRA run (12: `make bench` within 20 min on 2 cores)")
    p.add_argument("--repeats", type=int, default=2, help="rounds (A B T', plus T and C in the first rounds their options give) on the first data set (LoRA)")
    p.add_argument("--other-repeats", type=int, default=1, help="rounds (A B) on each other data set (LoRA)")
    p.add_argument("--reference-repeats", type=int, default=0,
                   help="rounds of the first data set that include the reference C (the PEFT script, checkpointing off; "
                        "0 by default, so that `make bench` stays within 20 min: T' is the no-checkpointing library setup)")
    p.add_argument("--trl-default-repeats", type=int, default=1,
                   help="rounds of the first data set that include T (TRL's defaults, checkpointing on; T' runs every round)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per optimizer step, on both sides")
    p.add_argument("--datasets", default="mixed,default",
                   help=f"comma-separated: {', '.join(f'{k} ({v})' for k, v in DATASETS.items())}, or name=RECIPE_OR_YAML")
    p.add_argument("--methods", default="lora,qlora", help="lora and/or qlora (QLoRA: first data set only, see --qlora-*)")
    p.add_argument("--qlora-steps", type=int, default=4, help="optimizer steps of each QLoRA run")
    p.add_argument("--qlora-repeats", type=int, default=1, help="A B pairs for QLoRA")
    p.add_argument("--threshold", type=float, default=0.7, help="time to identity: first step whose training loss is below this")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads in every run (0: torch's default)")
    p.add_argument("--no-reference", action="store_true",
                   help="leave out the reference side (the baseline with checkpointing off) on the first data set")
    p.add_argument("--no-trl", action="store_true", help="leave out TRL's SFTTrainer (the sides T and T')")
    p.add_argument("--trl-rows-per-step", type=int, default=1, help="TRL: packed rows of max_length tokens per step")
    p.add_argument("--matmul-seconds", type=float, default=2.0, help="length of each matmul throughput measurement")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for RESULTS.md, results.json and runs/")
    args = p.parse_args(argv)
    args.dataset_specs = dataset_specs(args.datasets)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.method_list or not set(args.method_list) <= {"lora", "qlora"}:
        p.error(f"--methods: use lora and/or qlora, got {args.methods!r}")
    if min(args.steps, args.repeats, args.other_repeats, args.batch_size, args.qlora_steps, args.qlora_repeats,
           args.trl_rows_per_step) < 1:
        p.error("--steps, --repeats, --other-repeats, --batch-size, --qlora-steps, --qlora-repeats and "
                "--trl-rows-per-step must be >= 1")
    return args


def dataset_specs(text: str) -> list[tuple[str, str]]:
    """[(name, recipe or YAML)] from 'mixed,tutorial' or 'name=path,...'."""
    specs = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        name, _, config = item.partition("=")
        if not config and name not in DATASETS:
            raise SystemExit(f"--datasets: unknown data set {name!r}; use {', '.join(DATASETS)} or name=RECIPE_OR_YAML")
        specs.append((name, config or DATASETS[name]))
    if not specs:
        raise SystemExit("--datasets: give at least one data set")
    return specs


def reproduce_command(args: argparse.Namespace) -> str:
    """The command line that repeats this benchmark, every option explicit."""
    opts = ["--model", args.model, "--steps", args.steps, "--repeats", args.repeats, "--other-repeats", args.other_repeats,
            "--reference-repeats", args.reference_repeats, "--trl-default-repeats", args.trl_default_repeats, "--batch-size", args.batch_size, "--datasets", args.datasets,
            "--methods", args.methods, "--qlora-steps", args.qlora_steps, "--qlora-repeats", args.qlora_repeats,
            "--threshold", args.threshold, "--threads", args.threads, "--trl-rows-per-step", args.trl_rows_per_step,
            "--matmul-seconds", args.matmul_seconds]
    opts += (["--no-reference"] if args.no_reference else []) + (["--no-trl"] if args.no_trl else [])
    return ".venv/bin/python benchmarks/bench.py " + " ".join(shlex.quote(str(o)) for o in opts)


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------
def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """LoRA: rounds of A B (C) (T T') on the first data set, A B on the others; then QLoRA: A B on the first."""
    pair = ["workbench", "baseline"]
    jobs = []
    if "lora" in args.method_list:
        for i, (name, config) in enumerate(args.dataset_specs):
            for r in range(args.repeats if i == 0 else args.other_repeats):
                sides = pair + first_data_sides(args, r) if i == 0 else pair
                jobs += [Job(name, config, "lora", args.steps, r, side) for side in sides]
    if "qlora" in args.method_list:
        name, config = args.dataset_specs[0]
        jobs += [Job(name, config, "qlora", args.qlora_steps, r, side) for r in range(args.qlora_repeats) for side in pair]
    return jobs


def first_data_sides(args: argparse.Namespace, repeat: int) -> list[str]:
    """The sides beyond A B in round `repeat` of the first data set."""
    reference = [REFERENCE] if not args.no_reference and repeat < args.reference_repeats else []
    trl = [] if args.no_trl else [s for s in TRL_SIDES if s != "trl" or repeat < args.trl_default_repeats]
    return reference + trl


def run_job(job: Job, args: argparse.Namespace, runs_dir: Path) -> dict:
    """One run in a fresh process; its result JSON (raises with the log's tail when it fails)."""
    out, log = runs_dir / f"{job.name}.json", runs_dir / f"{job.name}.log"
    side = SIDES[job.side]
    cmd = [sys.executable, str(HERE / side.script), "--config", job.config, "--model", args.model, "--method", job.method,
           "--steps", str(job.steps), "--batch-size", str(args.batch_size), "--threshold", str(args.threshold),
           "--threads", str(args.threads), *side.args, "--out", str(out)]
    if job.side in TRL_SIDES:
        cmd[-2:-2] = ["--rows-per-step", str(args.trl_rows_per_step)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    with log.open("w", encoding="utf-8") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{job.name} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    result = json.loads(out.read_text(encoding="utf-8"))
    result["job"] = asdict(job)
    return result


def run_all(jobs: list[Job], args: argparse.Namespace, runs_dir: Path) -> list[dict]:
    results, t0 = [], time.perf_counter()
    for i, job in enumerate(jobs, 1):
        started = time.perf_counter()
        result = run_job(job, args, runs_dir)
        results.append(result)
        took, elapsed = time.perf_counter() - started, time.perf_counter() - t0
        eta = elapsed / i * (len(jobs) - i)
        print(f"[{i}/{len(jobs)}] {job.name}: {result['summary']['tokens_per_s']:.0f} real tokens/s, "
              f"{result['summary']['step_time_s']:.2f} s/step ({took:.0f} s; {elapsed / 60:.1f} min so far, "
              f"about {eta / 60:.1f} min to go)", flush=True)
    return results


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------
def flops_per_token(args: argparse.Namespace) -> dict:
    """Training FLOPs per token: 4 x parameters for LoRA/QLoRA (no weight gradients for the frozen base)."""
    from workbench.estimate import count_params

    total, trainable = count_params(bench_config(args.dataset_specs[0][1], args.model, "lora", args.steps))
    return {"total_params": total, "trainable_params": trainable, "factor": 4, "flops_per_token": 4 * total}


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def preflight(args: argparse.Namespace) -> None:
    """Read every data set once before spending time on runs (a missing file fails here)."""
    from workbench.samples import DataError

    if "lora" in args.method_list and not args.no_trl and importlib.util.find_spec("trl") is None:
        raise SystemExit(TRL_MISSING)
    for name, config in args.dataset_specs:
        cfg = bench_config(config, args.model, "lora", args.steps)
        try:
            print(f"data {name}: {check_stream(cfg, args.steps * args.batch_size)}")
        except DataError as e:
            raise SystemExit(f"data set {name!r} ({config}) cannot be read: {e}\n"
                             "data/general_conversations.jsonl is made by scripts/make_general_data.py; "
                             "or leave this data set out, e.g. --datasets tutorial") from None


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    from workbench.io import atomic_write_text

    js, md = out / "results.json", out / "RESULTS.md"
    atomic_write_text(js, json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n")
    atomic_write_text(md, render_markdown(report))
    return md, js


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    started, out = time.perf_counter(), Path(args.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    preflight(args)
    machine = machine_info()
    jobs = plan_jobs(args)
    print(f"{len(jobs)} runs; machine: {machine['cpu']}, {machine['torch_threads']} torch threads", flush=True)
    matmul = matmul_gflops(args.matmul_seconds)
    results = run_all(jobs, args, runs_dir)
    matmul = {**matmul, "before": matmul.pop("gflops"), "after": matmul_gflops(args.matmul_seconds)["gflops"]}
    matmul["gflops"] = max(matmul["before"], matmul["after"])
    machine["load_average_end"] = load_average()
    flops = flops_per_token(args)
    summary = summarize_all(results, flops, matmul["gflops"])
    settings = {k: getattr(args, k) for k in ("model", "steps", "repeats", "other_repeats", "reference_repeats", "trl_default_repeats",
                                              "batch_size", "datasets", "methods", "qlora_steps", "qlora_repeats",
                                              "threshold", "threads", "no_reference", "no_trl", "trl_rows_per_step")}
    settings["first_dataset"] = args.dataset_specs[0][0]
    ran = {r["job"]["side"] for r in results}
    settings["sides"] = {k: v for k, v in sides_settings().items() if k in ran}
    report = {"command": reproduce_command(args), "finished": dt.datetime.now().isoformat(timespec="seconds"),
              "wall_minutes": (time.perf_counter() - started) / 60, "settings": settings, "machine": machine,
              "matmul": matmul, "flops": flops, "summary": summary,
              "targets": targets(summary, args.dataset_specs[0][0], {k: v.name for k, v in SIDES.items()}), "runs": results}
    md, js = write_report(report, out)
    print(f"\n{md.read_text(encoding='utf-8')}\nwritten: {md} and {js} ({report['wall_minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
