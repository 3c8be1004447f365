"""`make bench`: the workbench's training path against the plain PEFT + Trainer baseline, measured in one go.

    .venv/bin/python benchmarks/bench.py [--steps 12 --repeats 2 --datasets mixed,tutorial --methods lora,qlora]

For every data set it runs the workbench (A, `run_workbench.py`) and the
baseline (B, `baseline_peft.py`: the tutorial's script as written, gradient
checkpointing on) in alternation, A B A B, each in a fresh process, on the
same base model, samples, LoRA settings, samples per step and number of steps.
On the first data set a reference side C runs too (the baseline with
checkpointing off: A B C A B C), which splits the speed-up into what
checkpointing costs and what packing and the fast path gain. QLoRA runs once
per side (A B) on the first data set, to compare the memory of the loaded base
model and the speed. It also measures
this machine's matmul throughput (before and after the runs) and turns the
real tokens per second into achieved FLOP/s (4 x parameters per token for
LoRA/QLoRA) as a share of it.

Output in --out (default benchmarks/results/): RESULTS.md (medians, the ratio
workbench/baseline of each pair, the targets, the machine and the command that
reproduces it), results.json (the same plus every run with its steps), and
runs/ (each run's JSON and log). See benchmarks/README.md for the fairness rules.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT_MODEL, ROOT, bench_config, check_stream, set_threads  # noqa: E402

HERE = Path(__file__).resolve().parent
DATASETS = {"mixed": "smollm2_135m_lora_identity_mixed_cpu", "tutorial": "smollm2_135m_lora_identity_tutorial",
            "default": "smollm2_135m_lora_identity_cpu"}


@dataclass(frozen=True)
class Side:
    script: str
    args: tuple[str, ...]
    label: str


SIDES = {
    "workbench": Side("run_workbench.py", (), "the workbench's default training path"),
    "baseline": Side("baseline_peft.py", ("--gradient-checkpointing",),
                     "the tutorial's PEFT + Trainer script as written (gradient checkpointing on)"),
    "baseline_no_ckpt": Side("baseline_peft.py", (), "reference: the same script with gradient checkpointing off"),
}
REFERENCE = "baseline_no_ckpt"
TARGET_SPEEDUP = 2.5
TARGET_MATMUL_SHARE = 0.40
LOSS_NOISE_FLOOR = 0.01  # final losses closer than this are equal for any practical purpose
MIB = 2**20


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
    p.add_argument("--steps", type=int, default=16, help="optimizer steps of every LoRA run (16: the tutorial data reaches the loss threshold)")
    p.add_argument("--repeats", type=int, default=2, help="A B pairs per data set (LoRA)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per optimizer step, on both sides")
    p.add_argument("--datasets", default="mixed,tutorial",
                   help=f"comma-separated: {', '.join(f'{k} ({v})' for k, v in DATASETS.items())}, or name=RECIPE_OR_YAML")
    p.add_argument("--methods", default="lora,qlora", help="lora and/or qlora (QLoRA: first data set only, see --qlora-*)")
    p.add_argument("--qlora-steps", type=int, default=4, help="optimizer steps of each QLoRA run")
    p.add_argument("--qlora-repeats", type=int, default=1, help="A B pairs for QLoRA")
    p.add_argument("--threshold", type=float, default=0.7, help="time to identity: first step whose training loss is below this")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads in every run (0: torch's default)")
    p.add_argument("--no-reference", action="store_true",
                   help="leave out the reference side (the baseline with checkpointing off) on the first data set")
    p.add_argument("--matmul-seconds", type=float, default=2.0, help="length of each matmul throughput measurement")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for RESULTS.md, results.json and runs/")
    args = p.parse_args(argv)
    args.dataset_specs = dataset_specs(args.datasets)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.method_list or not set(args.method_list) <= {"lora", "qlora"}:
        p.error(f"--methods: use lora and/or qlora, got {args.methods!r}")
    if min(args.steps, args.repeats, args.batch_size, args.qlora_steps, args.qlora_repeats) < 1:
        p.error("--steps, --repeats, --batch-size, --qlora-steps and --qlora-repeats must be >= 1")
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
    opts = ["--model", args.model, "--steps", args.steps, "--repeats", args.repeats, "--batch-size", args.batch_size,
            "--datasets", args.datasets, "--methods", args.methods, "--qlora-steps", args.qlora_steps,
            "--qlora-repeats", args.qlora_repeats, "--threshold", args.threshold, "--threads", args.threads,
            "--matmul-seconds", args.matmul_seconds] + (["--no-reference"] if args.no_reference else [])
    return ".venv/bin/python benchmarks/bench.py " + " ".join(shlex.quote(str(o)) for o in opts)


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------
def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """LoRA: A B (C) A B (C) per data set, C on the first one; then QLoRA: A B on the first data set."""
    pair = ["workbench", "baseline"]
    jobs = []
    if "lora" in args.method_list:
        for i, (name, config) in enumerate(args.dataset_specs):
            sides = pair + [REFERENCE] if i == 0 and not args.no_reference else pair
            jobs += [Job(name, config, "lora", args.steps, r, side) for r in range(args.repeats) for side in sides]
    if "qlora" in args.method_list:
        name, config = args.dataset_specs[0]
        jobs += [Job(name, config, "qlora", args.qlora_steps, r, side) for r in range(args.qlora_repeats) for side in pair]
    return jobs


def run_job(job: Job, args: argparse.Namespace, runs_dir: Path) -> dict:
    """One run in a fresh process; its result JSON (raises with the log's tail when it fails)."""
    out, log = runs_dir / f"{job.name}.json", runs_dir / f"{job.name}.log"
    side = SIDES[job.side]
    cmd = [sys.executable, str(HERE / side.script), "--config", job.config, "--model", args.model, "--method", job.method,
           "--steps", str(job.steps), "--batch-size", str(args.batch_size), "--threshold", str(args.threshold),
           "--threads", str(args.threads), *side.args, "--out", str(out)]
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
# The machine
# ---------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None where it does not say."""
    try:
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        return None
    cores = set()
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def machine_info() -> dict:
    from importlib.metadata import version

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable, "physical_cores": physical_cores(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": version("transformers"), "peft": version("peft"),
            "accelerate": version("accelerate"), "platform": platform.platform(),
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def matmul_gflops(seconds: float) -> dict:
    """Large-matmul throughput: fp32 on CPU, bf16 on a GPU (workbench.estimate.measure_matmul_gflops)."""
    import torch

    from workbench.estimate import measure_matmul_gflops

    if torch.cuda.is_available():
        value = measure_matmul_gflops("cuda", size=4096, dtype=torch.bfloat16, seconds=seconds)
        return {"device": "cuda", "dtype": "bfloat16", "size": 4096, "gflops": value}
    value = measure_matmul_gflops("cpu", size=1024, dtype=torch.float32, seconds=seconds)
    return {"device": "cpu", "dtype": "float32", "size": 1024, "gflops": value}


def flops_per_token(args: argparse.Namespace) -> dict:
    """Training FLOPs per token: 4 x parameters for LoRA/QLoRA (no weight gradients for the frozen base)."""
    from workbench.estimate import count_params

    total, trainable = count_params(bench_config(args.dataset_specs[0][1], args.model, "lora", args.steps))
    return {"total_params": total, "trainable_params": trainable, "factor": 4, "flops_per_token": 4 * total}


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------
def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def group_summary(runs: list[dict]) -> dict:
    """Medians over the repeats of one side, data set and method."""
    s = [r["summary"] for r in runs]
    reached = [x["time_to_threshold_s"] for x in s if x["time_to_threshold_s"] is not None]
    finals = [x["final_loss"] for x in s]
    out = {key: median([x[key] for x in s]) for key in
           ("tokens_per_s", "step_time_s", "final_loss", "final_loss_sem", "tokens_per_step", "positions_per_step",
            "trained_tokens_per_step", "samples_per_step", "padding_share", "train_s")}
    out.update(
        runs=len(runs), tokens_per_s_each=[x["tokens_per_s"] for x in s], final_loss_spread=max(finals) - min(finals),
        time_to_threshold_s=median(reached), threshold_reached=f"{len(reached)}/{len(runs)}",
        threshold_step=median([x["threshold_step"] for x in s]), setup_s=median([r["setup_s"] for r in runs]),
        peak_rss_mib=median([r["peak_rss_mib"] for r in runs]), peak_gpu_mib=median([r["peak_gpu_mib"] for r in runs]),
        base_model_mib=median([r["base_model_bytes"] / MIB if r["base_model_bytes"] else None for r in runs]),
        trainable_params=runs[0]["trainable_params"])
    return out


def pair_ratios(wb: list[dict], base: list[dict]) -> dict:
    """Workbench / baseline of each A B pair (in the order they ran), and their median."""
    speed = [a["summary"]["tokens_per_s"] / b["summary"]["tokens_per_s"] for a, b in zip(wb, base)]
    step = [b["summary"]["step_time_s"] / a["summary"]["step_time_s"] for a, b in zip(wb, base)]
    rss = [a["peak_rss_mib"] / b["peak_rss_mib"] for a, b in zip(wb, base)]
    return {"tokens_per_s": median(speed), "tokens_per_s_each": speed, "step_time_base_over_wb": median(step),
            "peak_rss": median(rss)}


def loss_comparison(wb: dict, base: dict) -> dict:
    """Final losses of the two sides, their difference, and the noise it is judged against.

    Noise: the larger of each side's run-to-run spread and the standard error of
    its last steps' mean loss, at least LOSS_NOISE_FLOOR; "within noise" means the
    difference is at most twice that.
    """
    noise = max(wb["final_loss_spread"], base["final_loss_spread"], wb["final_loss_sem"], base["final_loss_sem"],
                LOSS_NOISE_FLOOR)
    diff = wb["final_loss"] - base["final_loss"]
    return {"workbench": wb["final_loss"], "baseline": base["final_loss"], "difference": diff, "noise": noise,
            "within_noise": abs(diff) <= 2 * noise}


def summarize_all(results: list[dict], flops: dict, gflops: float) -> dict:
    """{dataset/method: {sides: {name: summary}, ratio, loss, and the reference's ratio where it ran}}."""
    out = {}
    keys = dict.fromkeys((r["job"]["dataset"], r["job"]["method"]) for r in results)
    for dataset, method in keys:
        runs = {side: [r for r in results if r["job"]["dataset"] == dataset and r["job"]["method"] == method
                       and r["job"]["side"] == side] for side in SIDES}
        runs = {side: rs for side, rs in runs.items() if rs}
        if not {"workbench", "baseline"} <= set(runs):
            continue
        sides = {side: group_summary(rs) for side, rs in runs.items()}
        for s in sides.values():
            s["achieved_gflops"] = flops["flops_per_token"] * s["tokens_per_s"] / 1e9
            s["matmul_share"] = s["achieved_gflops"] / gflops
        entry = {"dataset": dataset, "method": method, "config": runs["workbench"][0]["config"], "sides": sides,
                 "ratio": pair_ratios(runs["workbench"], runs["baseline"]),
                 "loss": loss_comparison(sides["workbench"], sides["baseline"])}
        if REFERENCE in runs:
            entry["reference_ratio"] = pair_ratios(runs["workbench"], runs[REFERENCE])
        out[f"{dataset}/{method}"] = entry
    return out


def targets(summary: dict, first_dataset: str) -> list[dict]:
    """The issue's targets, checked on this machine's numbers (they are meant for a quiet machine)."""
    main = summary.get(f"{first_dataset}/lora")
    if not main:
        return []
    speed, loss, share = main["ratio"]["tokens_per_s"], main["loss"], main["sides"]["workbench"]["matmul_share"]
    return [
        {"target": f"workbench >= {TARGET_SPEEDUP}x baseline real tokens/s ({first_dataset}, LoRA)",
         "measured": f"{speed:.2f}x", "met": speed >= TARGET_SPEEDUP},
        {"target": f"same final loss within noise ({first_dataset}, LoRA)",
         "measured": f"{loss['workbench']:.4f} vs {loss['baseline']:.4f} (difference {loss['difference']:+.4f}, "
                     f"noise {loss['noise']:.4f})", "met": loss["within_noise"]},
        {"target": f"workbench >= {TARGET_MATMUL_SHARE:.0%} of measured matmul throughput ({first_dataset}, LoRA)",
         "measured": f"{share:.1%}", "met": share >= TARGET_MATMUL_SHARE},
    ]


# ---------------------------------------------------------------------------
# RESULTS.md
# ---------------------------------------------------------------------------
def fmt(value, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def time_to_threshold(s: dict) -> str:
    if s["time_to_threshold_s"] is None:
        return "not reached"
    partial = "" if s["threshold_reached"].split("/")[0] == s["threshold_reached"].split("/")[1] else \
        f", reached in {s['threshold_reached']} runs"
    return f"{s['time_to_threshold_s']:.1f} s (step {s['threshold_step']:.0f}{partial})"


def side_row(name: str, s: dict) -> str:
    cells = [name, fmt(s["tokens_per_s"], ".0f"), fmt(s["step_time_s"], ".2f"), fmt(s["samples_per_step"], ".1f"),
             fmt(s["tokens_per_step"], ".0f"), f"{s['positions_per_step']:.0f} ({s['padding_share']:.0%} padding)",
             time_to_threshold(s), f"{s['final_loss']:.4f}", fmt(s["peak_rss_mib"], ".0f"), fmt(s["peak_gpu_mib"], ".0f"),
             f"{s['achieved_gflops']:.1f} ({s['matmul_share']:.1%})", fmt(s["setup_s"], ".1f")]
    return "| " + " | ".join(cells) + " |"


def pair_table(entry: dict, threshold: float) -> list[str]:
    r = entry["ratio"]
    each = ", ".join(f"{x:.2f}x" for x in r["tokens_per_s_each"])
    head = ["side", "real tokens/s", "s/step", "samples/step", "real tokens/step", "computed tokens/step",
            f"time to loss < {threshold:g}", "final loss", "peak RSS MiB", "peak GPU MiB",
            "achieved GFLOP/s (of matmul)", "setup s"]
    lines = [f"### {entry['dataset']} ({entry['config']}), {entry['method']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [side_row(SIDE_NAMES[name], s) for name, s in entry["sides"].items()]
    lines += ["", f"workbench / baseline real tokens/s: **{r['tokens_per_s']:.2f}x** (median; each pair: {each}); "
              f"baseline / workbench time per step {r['step_time_base_over_wb']:.2f}x; peak RSS ratio {r['peak_rss']:.2f}; "
              f"final loss difference {entry['loss']['difference']:+.4f} (noise {entry['loss']['noise']:.4f}, "
              f"{'within' if entry['loss']['within_noise'] else 'NOT within'} noise)."]
    if "reference_ratio" in entry:
        ref = entry["reference_ratio"]
        lines += ["", f"Against the reference (the same script with checkpointing off): **{ref['tokens_per_s']:.2f}x** "
                  f"(each: {', '.join(f'{x:.2f}x' for x in ref['tokens_per_s_each'])}); peak RSS ratio {ref['peak_rss']:.2f}. "
                  "The rest of the speed-up is what the tutorial's checkpointing costs."]
    return lines + [""]


SIDE_NAMES = {"workbench": "workbench", "baseline": "baseline", REFERENCE: "baseline, no checkpointing"}


def memory_table(summary: dict) -> list[str]:
    rows = list(summary.values())
    head = ["data", "method", "side", "base model in memory MiB", "real tokens/s", "peak RSS MiB", "peak GPU MiB",
            "trainable params"]
    lines = ["## Base model memory: LoRA vs QLoRA", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in rows:
        for side, s in e["sides"].items():
            lines.append("| " + " | ".join([e["dataset"], e["method"], SIDE_NAMES[side], fmt(s["base_model_mib"]),
                                            fmt(s["tokens_per_s"], ".0f"), fmt(s["peak_rss_mib"], ".0f"),
                                            fmt(s["peak_gpu_mib"], ".0f"), f"{s['trainable_params']:,}"]) + " |")
    return lines + ["", "Base model memory is `model.get_memory_footprint()` right after loading (weights and buffers)."
                    " QLoRA runs are shorter (see settings) and are compared only for memory and speed.", ""]


def machine_lines(machine: dict, matmul: dict) -> list[str]:
    items = [("CPU", machine["cpu"]), ("logical CPUs / usable / physical cores",
                                       f"{machine['logical_cpus']} / {machine['usable_cpus']} / {machine['physical_cores'] or '?'}"),
             ("torch threads", machine["torch_threads"]), ("GPU", machine["gpu"] or "none"),
             ("torch / transformers / peft / accelerate",
              f"{machine['torch']} / {machine['transformers']} / {machine['peft']} / {machine['accelerate']}"),
             ("Python, platform", f"{machine['python']}, {machine['platform']}"),
             ("load average at start / end", f"{_load(machine['load_average_start'])} / {_load(machine.get('load_average_end'))}"),
             (f"matmul throughput ({matmul['device']}, {matmul['dtype']}, {matmul['size']}^3), before / after",
              f"{matmul['before']:.1f} / {matmul['after']:.1f} GFLOP/s (the larger is used)")]
    return ["## Machine", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in items] + [""]


def _load(values) -> str:
    return "-" if not values else " ".join(f"{v:.2f}" for v in values)


def settings_lines(report: dict) -> list[str]:
    st, fl = report["settings"], report["flops"]
    first = report["runs"][0] if report["runs"] else {}
    lora = first.get("lora", {})
    return ["## Settings", "",
            f"- model `{st['model']}` ({fl['total_params'] / 1e6:.1f} M parameters, {fl['trainable_params']:,} trained by LoRA); "
            f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, targets {lora.get('targets')}",
            f"- {st['batch_size']} samples per optimizer step on both sides; {st['steps']} steps x {st['repeats']} "
            f"pairs (A B) per data set for LoRA; QLoRA {st['qlora_steps']} steps x {st['qlora_repeats']} pair on the first data set",
            f"- lr {first.get('lr')} ({first.get('lr_scheduler')}), max_length {first.get('max_length')}, seed {first.get('seed')}, "
            f"device {first.get('device')}, dtype {first.get('dtype')}",
            f"- training FLOPs per token: 4 x {fl['total_params']:,} parameters = {fl['flops_per_token'] / 1e9:.2f} GFLOP "
            "(LoRA: forward plus the backward through the activations; no weight gradients for the frozen base); "
            "achieved = FLOPs per token x real tokens/s",
            "- rates leave out the first step (warm-up); medians over the repeats; ratios are taken per A B pair", ""]


def render_markdown(report: dict) -> str:
    st = report["settings"]
    lines = ["# Benchmark: workbench vs plain PEFT + Trainer", "",
             f"Written by `make bench` (benchmarks/bench.py) on {report['finished']} in {report['wall_minutes']:.1f} min. Reproduce with:", "",
             "```bash", report["command"], "```", "",
             "What is measured and why it is fair: [benchmarks/README.md](../README.md). "
             "Every run's steps are in `results.json`; its log in `runs/`.", ""]
    if report["targets"]:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]]
        lines += ["", "The targets are meant for a quiet machine; a busy one lowers both sides' rates and the matmul share.", ""]
    lines += ["## Sides", "", "| side | what runs |", "|---|---|"]
    lines += [f"| {SIDE_NAMES[name]} | {side['label']} (`{' '.join([side['script'], *side['args']])}`) |"
              for name, side in st["sides"].items()]
    lines += ["", "Both baseline sides are the same script; only the tutorial's `gradient_checkpointing=True` differs.", ""]
    lines += ["## Workbench (A) vs baseline (B)", ""]
    for entry in sorted(report["summary"].values(), key=lambda e: e["method"] != "lora"):
        lines += pair_table(entry, st["threshold"])
    lines += memory_table(report["summary"])
    lines += settings_lines(report) + machine_lines(report["machine"], report["matmul"])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def preflight(args: argparse.Namespace) -> None:
    """Read every data set once before spending time on runs (a missing file fails here)."""
    from workbench.samples import DataError

    for name, config in args.dataset_specs:
        cfg = bench_config(config, args.model, "lora", args.steps)
        try:
            print(f"data {name}: {check_stream(cfg, args.steps * args.batch_size)}")
        except DataError as e:
            raise SystemExit(f"data set {name!r} ({config}) cannot be read: {e}\n"
                             "data/general_conversations.jsonl is made by scripts/make_general_data.py; "
                             "or leave this data set out, e.g. --datasets tutorial") from None


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "results.json", out / "RESULTS.md"
    js.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    md.write_text(render_markdown(report), encoding="utf-8")
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
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    flops = flops_per_token(args)
    summary = summarize_all(results, flops, matmul["gflops"])
    settings = {k: getattr(args, k) for k in ("model", "steps", "repeats", "batch_size", "datasets", "methods",
                                              "qlora_steps", "qlora_repeats", "threshold", "threads", "no_reference")}
    settings["sides"] = {name: {"script": side.script, "args": list(side.args), "label": side.label}
                         for name, side in SIDES.items()}
    report = {"command": reproduce_command(args), "finished": dt.datetime.now().isoformat(timespec="seconds"),
              "wall_minutes": (time.perf_counter() - started) / 60, "settings": settings, "machine": machine,
              "matmul": matmul, "flops": flops, "summary": summary,
              "targets": targets(summary, args.dataset_specs[0][0]), "runs": results}
    md, js = write_report(report, out)
    print(f"\n{md.read_text(encoding='utf-8')}\nwritten: {md} and {js} ({report['wall_minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
