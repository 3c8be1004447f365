"""Scaling curves: the workbench's real tokens/s and peak memory against max_length, rows per step and model size.

    .venv/bin/python benchmarks/scaling.py            # the sweep -> benchmarks/results/scaling.{md,json,png}
    .venv/bin/python benchmarks/scaling.py --quick    # tiny stand-ins, seconds a point (the test runs this)

Three sweeps of the workbench's training path (LoRA settings and optimiser of
the mixed CPU recipe), each point a fresh process (`scaling_point.py`):

* max_length 256, 512, 1024, 2048 (one row per step), the embedded SmolLM2-135M, LoRA;
* rows per step 1, 2, 4 at max_length 256, the same model, LoRA;
* model size at max_length 512, one row: SmolLM2-135M (embedded) and randomly
  initialised models of the public configs of SmolLM2-360M and Qwen2.5-0.5B
  (`MODEL_CONFIGS`, written by hand, nothing downloaded), LoRA and QLoRA.

Each point trains 1 warm-up step and 2 measured steps on synthetic rows of
exactly max_length tokens. Next to each measurement stands what
`workbench.estimate.estimate` predicts for the same config, with the matmul
throughput measured once at the start, and the ratio estimate / measured (time
per step, memory); points outside ±25% are flagged. Memory is the peak RSS of
the training on a CPU (the high-water mark after the model is loaded; the
lifetime peak RSS beside it), the peak GPU memory allocated on a GPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT_MODEL, ROOT  # noqa: E402
from benchmarks.machine import load_average, machine_info, matmul_gflops  # noqa: E402

HERE = Path(__file__).resolve().parent
TOLERANCE = 0.25  # the estimate should be within this of the measurement
MIB = 2**20

# The public configs (hub config.json of each model), written out by hand; the weights are random.
SMOLLM2_360M = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 960,
                "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
                "intermediate_size": 2560, "vocab_size": 49152, "tie_word_embeddings": True, "hidden_act": "silu",
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                "bos_token_id": 1, "eos_token_id": 2}
QWEN25_05B = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def model_configs(quick: bool = False) -> dict[str, dict]:
    """The random models by name; --quick: the same architectures and vocabularies, 2 layers of width 64."""
    configs = {"smollm2-360m": SMOLLM2_360M, "qwen2.5-0.5b": QWEN25_05B}
    if not quick:
        return configs
    return {name: {**c, **TINY, "intermediate_size": 128 if c["model_type"] == "llama" else 256}
            for name, c in configs.items()}


def models_dir(given: str | None = None) -> Path:
    from workbench.models import CACHE_DIR

    return Path(given) if given else CACHE_DIR / "bench-models"


@dataclass(frozen=True)
class Point:
    model: str  # smollm2-135m, smollm2-360m or qwen2.5-0.5b
    method: str
    max_length: int
    rows: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.method}-L{self.max_length}-r{self.rows}"


@dataclass(frozen=True)
class Sweep:
    max_lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    rows: tuple[int, ...] = (1, 2, 4)
    rows_at: int = 256  # max_length of the rows sweep
    models_at: int = 512  # max_length of the model sweep
    models: tuple[str, ...] = ("smollm2-135m", "smollm2-360m", "qwen2.5-0.5b")
    methods: tuple[str, ...] = ("lora", "qlora")


QUICK = Sweep(max_lengths=(32, 64), rows=(1, 2), rows_at=32, models_at=64)


def plan(sweep: Sweep) -> dict[Point, list[str]]:
    """Every point once, with the sweeps it belongs to (in the order they run)."""
    points: dict[Point, list[str]] = {}

    def add(point: Point, sweep_name: str) -> None:
        points.setdefault(point, []).append(sweep_name)

    for length in sweep.max_lengths:
        add(Point("smollm2-135m", "lora", length, 1), "max_length")
    for rows in sweep.rows:
        add(Point("smollm2-135m", "lora", sweep.rows_at, rows), "rows")
    for method in sweep.methods:
        for model in sweep.models:
            add(Point(model, method, sweep.models_at, 1), "model")
    return points


# ---------------------------------------------------------------------------
# Running the points
# ---------------------------------------------------------------------------
def model_path(name: str, args) -> str:
    """The folder or id of a sweep model; random ones are written once, in a process of their own."""
    if name == "smollm2-135m":
        return "embedded:tiny-random" if args.quick else DEFAULT_MODEL
    target = models_dir(args.models_dir) / name
    if not (target / "config.json").exists():
        cmd = [sys.executable, str(HERE / "scaling_point.py"), "--make-model", name,
               "--models-dir", str(models_dir(args.models_dir))] + (["--quick"] if args.quick else [])
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return str(target)


def run_point(point: Point, args, gflops: float, runs_dir: Path) -> dict:
    out, log = runs_dir / f"{point.name}.json", runs_dir / f"{point.name}.log"
    cmd = [sys.executable, str(HERE / "scaling_point.py"), "--model", model_path(point.model, args),
           "--label", point.model, "--method", point.method, "--max-length", str(point.max_length),
           "--rows", str(point.rows), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--threads", str(args.threads), "--gflops", str(gflops), "--out", str(out)]
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{point.name} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return json.loads(out.read_text(encoding="utf-8"))


def with_ratios(result: dict) -> dict:
    """estimate / measured for the time per step and the memory; flagged outside ±TOLERANCE."""
    m, e = result["measured"], result["estimate"]
    ratios = {"time": e["seconds_per_step"] / m["seconds_per_step"], "memory": e["memory_gb"] * 1e9 / MIB / m["memory_mib"]}
    flags = [k for k, v in ratios.items() if abs(v - 1) > TOLERANCE]
    return {**result, "ratios": ratios, "flags": flags}


def run_sweep(points: dict[Point, list[str]], args, gflops: float, runs_dir: Path) -> list[dict]:
    results, t0 = [], time.perf_counter()
    for i, (point, sweeps) in enumerate(points.items(), 1):
        r = with_ratios(run_point(point, args, gflops, runs_dir))
        r["sweeps"] = sweeps
        results.append(r)
        elapsed = time.perf_counter() - t0
        print(f"[{i}/{len(points)}] {point.name}: {r['measured']['tokens_per_s']:.0f} real tokens/s, peak RSS "
              f"{r['measured']['memory_mib']:.0f} MiB; estimate/measured time {r['ratios']['time']:.2f}, memory "
              f"{r['ratios']['memory']:.2f} ({elapsed / 60:.1f} min so far, about "
              f"{elapsed / i * (len(points) - i) / 60:.1f} min to go)", flush=True)
    return results


# ---------------------------------------------------------------------------
# Output: scaling.md, scaling.json, scaling.png
# ---------------------------------------------------------------------------
HEAD = ["sweep", "model", "method", "max_length", "rows/step", "real tokens/s", "s/step", "peak memory MiB",
        "lifetime peak RSS MiB",
        "estimate: tokens/s", "estimate: memory MiB", "estimate/measured: time", "estimate/measured: memory", "within ±25%"]


def table_row(r: dict) -> str:
    m, e, q = r["measured"], r["estimate"], r["ratios"]
    flag = "yes" if not r["flags"] else "**no** (" + ", ".join(r["flags"]) + ")"
    cells = [", ".join(r["sweeps"]), r["model"], r["method"], str(r["max_length"]), str(r["rows"]),
             f"{m['tokens_per_s']:.0f}", f"{m['seconds_per_step']:.2f}", f"{m['memory_mib']:.0f}",
             f"{m['peak_rss_mib']:.0f}", f"{e['tokens_per_s']:.0f}",
             f"{e['memory_gb'] * 1e9 / MIB:.0f}", f"{q['time']:.2f}", f"{q['memory']:.2f}", flag]
    return "| " + " | ".join(cells) + " |"


def render_markdown(report: dict) -> str:
    mach, rs = report["machine"], report["points"]
    flagged = sum(1 for r in rs if r["flags"])
    lines = ["# Scaling: real tokens/s and peak memory of the workbench's training path", "",
             f"Written by `benchmarks/scaling.py` on {report['finished']} in {report['wall_minutes']:.1f} min"
             f"{' (--quick: tiny stand-ins, not measurements)' if report['quick'] else ''}. Each point is a fresh process: "
             f"{report['warmup']} warm-up step, then {report['steps']} measured steps of synthetic rows of exactly "
             "max_length tokens (3/4 of each trained). The estimate is `workbench.estimate.estimate` for the same "
             f"config with the matmul throughput measured at the start ({report['gflops']:.1f} GFLOP/s); "
             f"{flagged} of {len(rs)} points are outside ±{TOLERANCE:.0%}.", "", "![scaling](scaling.png)", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += [table_row(r) for r in rs]
    lines += ["", "Peak memory: the peak RSS of the training itself (the high-water mark reset once the model is "
              "loaded, so the model file's pages read while loading do not count; the process's lifetime peak beside "
              f"it), or the peak GPU memory allocated on a GPU. Machine: {mach['cpu']}, "
              f"{mach['torch_threads']} torch threads, GPU {mach['gpu'] or 'none'}, torch {mach['torch']}, "
              f"load average at start / end {_load(report['load_average_start'])} / {_load(report['load_average_end'])}.", ""]
    return "\n".join(lines)


def _load(values) -> str:
    return "-" if not values else " ".join(f"{v:.2f}" for v in values)


def plot(report: dict, path: Path) -> Path:
    """Tokens/s (top) and peak memory (bottom) against max_length, rows per step and model parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - ScalarFormatter

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    sweeps = (("max_length", "max_length", "max_length (tokens per row)"), ("rows", "rows", "rows per step"),
              ("model", "total_params", "model parameters (M)"))
    for col, (sweep, key, label) in enumerate(sweeps):
        for method, color in (("lora", "C0"), ("qlora", "C1")):
            pts = sorted((r for r in report["points"] if sweep in r["sweeps"] and r["method"] == method),
                         key=lambda r: r[key])
            if pts:
                plot_method(axes[:, col], pts, key, method, color)
        axes[0, col].set(title=f"against {label}", ylabel="real tokens/s")
        axes[1, col].set(xlabel=label, ylabel="peak memory MiB")
        for ax in axes[:, col]:
            if key != "total_params":
                ax.set_xscale("log", base=2)
                ax.set_xticks(sorted({r[key] for r in report["points"] if sweep in r["sweeps"]}))
                ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_method(axes, pts: list[dict], key: str, method: str, color: str) -> None:
    """Measured (solid) and estimated (dotted) tokens/s and memory of one method along one sweep."""
    xs = [r[key] / 1e6 if key == "total_params" else r[key] for r in pts]
    mem = [r["measured"]["memory_mib"] for r in pts]
    axes[0].plot(xs, [r["measured"]["tokens_per_s"] for r in pts], "o-", color=color, label=f"{method} measured")
    axes[0].plot(xs, [r["estimate"]["tokens_per_s"] for r in pts], "o:", color=color, alpha=0.5, label=f"{method} estimate")
    axes[1].plot(xs, mem, "o-", color=color, label=f"{method} measured")
    axes[1].plot(xs, [r["estimate"]["memory_gb"] * 1e9 / MIB for r in pts], "o:", color=color, alpha=0.5,
                 label=f"{method} estimate")


def write_outputs(report: dict, out: Path) -> list[Path]:
    from workbench.io import atomic_write_text

    js, md = out / "scaling.json", out / "scaling.md"
    atomic_write_text(js, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(md, render_markdown(report))
    png = out / "scaling.png"
    tmp = out / ".scaling.tmp.png"
    plot(report, tmp)
    tmp.replace(png)
    return [md, js, png]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny stand-ins and short rows: checks the sweep in about a minute")
    p.add_argument("--methods", default="lora,qlora", help="methods of the model-size sweep")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per point (left out of the rates)")
    p.add_argument("--steps", type=int, default=2, help="measured steps per point")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every point (0: torch's default)")
    p.add_argument("--models-dir", default=None, help="where the random models are written once (default: WORKBENCH_CACHE/bench-models)")
    p.add_argument("--matmul-seconds", type=float, default=2.0, help="length of the matmul throughput measurement")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for scaling.md, scaling.json, scaling.png and scaling-runs/")
    args = p.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods or not set(methods) <= {"lora", "qlora"}:
        p.error(f"--methods: use lora and/or qlora, got {args.methods!r}")
    args.sweep = Sweep(**{**asdict(QUICK if args.quick else Sweep()), "methods": methods})
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started, out = time.perf_counter(), Path(args.out)
    runs_dir = out / "scaling-runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    machine, load_start = machine_info(), load_average()
    gflops = matmul_gflops(args.matmul_seconds)["gflops"]
    points = plan(args.sweep)
    print(f"scaling: {len(points)} points, matmul {gflops:.1f} GFLOP/s", flush=True)
    results = run_sweep(points, args, gflops, runs_dir)
    report = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_minutes": (time.perf_counter() - started) / 60,
              "quick": args.quick, "warmup": args.warmup, "steps": args.steps, "gflops": gflops, "machine": machine,
              "load_average_start": load_start, "load_average_end": load_average(), "sweep": asdict(args.sweep),
              "model_configs": model_configs(args.quick), "points": results}
    files = write_outputs(report, out)
    print(f"\n{files[0].read_text(encoding='utf-8')}\nwritten: {', '.join(map(str, files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
