"""RESULTS.md of `make bench`: the headline, the targets, one table per data set and method, memory, settings, machine."""
from __future__ import annotations

from benchmarks.sides import REFERENCE, SIDE_NAMES, SIDES
from benchmarks.summary import PEFT, WORKBENCH


def fmt(value, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def each(values: list[float]) -> str:
    return ", ".join(f"{x:.2f}x" for x in values)


def time_to_threshold(s: dict) -> str:
    if s["time_to_threshold_s"] is None:
        return "not reached"
    done, total = s["threshold_reached"].split("/")
    partial = "" if done == total else f", reached in {s['threshold_reached']} runs"
    return f"{s['time_to_threshold_s']:.1f} s (step {s['threshold_step']:.0f}{partial})"


# ---------------------------------------------------------------------------
# Per data set and method
# ---------------------------------------------------------------------------
HEAD = ["side", "real tokens/s", "s/step", "samples/step", "real tokens/step", "computed tokens/step",
        "time to loss < {threshold:g}", "final loss", "loss at equal tokens", "peak RSS MiB", "peak GPU MiB",
        "achieved GFLOP/s (of matmul)", "setup s"]


def side_row(name: str, s: dict, at_tokens: float | None) -> str:
    cells = [SIDE_NAMES[name], fmt(s["tokens_per_s"], ".0f"), fmt(s["step_time_s"], ".2f"), fmt(s["samples_per_step"], ".1f"),
             fmt(s["tokens_per_step"], ".0f"), f"{s['positions_per_step']:.0f} ({s['padding_share']:.0%} padding)",
             time_to_threshold(s), f"{s['final_loss']:.4f}", fmt(at_tokens, ".4f"), fmt(s["peak_rss_mib"], ".0f"),
             fmt(s["peak_gpu_mib"], ".0f"), f"{s['achieved_gflops']:.1f} ({s['matmul_share']:.1%})", fmt(s["setup_s"], ".1f")]
    return "| " + " | ".join(cells) + " |"


def loss_at(entry: dict, side: str) -> float | None:
    """A side's mean loss at equal tokens seen (the workbench's against the stronger baseline's grid)."""
    comparisons = entry["losses_at_tokens"]
    if side == WORKBENCH:
        return comparisons[entry["strongest"]]["workbench"]
    return comparisons[side]["baseline"] if side in comparisons else None


def ratio_line(entry: dict, side: str) -> str:
    r, loss = entry["ratios"][side], entry["losses_at_tokens"][side]
    tag = " (the stronger baseline)" if side == entry["strongest"] else ""
    return (f"- workbench / {SIDE_NAMES[side]}{tag}: **{r['tokens_per_s']:.2f}x** real tokens/s (median; each pair: "
            f"{each(r['tokens_per_s_each'])}); time per step {r['step_time_base_over_wb']:.2f}x; peak RSS ratio "
            f"{r['peak_rss']:.2f}; loss at equal tokens seen {loss['difference']:+.4f} (noise {loss['noise']:.4f}, "
            f"{'within' if loss['within_noise'] else 'NOT within'} noise)")


def pair_table(entry: dict, threshold: float) -> list[str]:
    head = [h.format(threshold=threshold) for h in HEAD]
    lines = [f"### {entry['dataset']} ({entry['config']}), {entry['method']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [side_row(name, s, loss_at(entry, name)) for name, s in entry["sides"].items()]
    lines += [""] + [ratio_line(entry, side) for side in entry["ratios"]]
    if "loss" in entry:
        loss = entry["loss"]
        lines.append(f"- final loss, workbench vs PEFT baseline (same samples at every step): {loss['difference']:+.4f} "
                     f"(noise {loss['noise']:.4f}, {'within' if loss['within_noise'] else 'NOT within'} noise)")
    if REFERENCE in entry["ratios"]:
        lines.append("- the PEFT baseline with and without checkpointing is the same script: what separates their ratios "
                     "is what the tutorial's checkpointing costs")
    grid = entry["losses_at_tokens"][entry["strongest"]]["tokens"]
    lines += ["", f"Loss at equal tokens: the mean training loss per trained token seen, averaged over {len(grid)} "
              f"token counts from {grid[0]:,} to {grid[-1]:,} (benchmarks/README.md).", ""]
    return lines


def headline(summary: dict, first: str) -> list[str]:
    main = summary.get(f"{first}/lora")
    if not main:
        return []
    best = main["strongest"]
    r = main["ratios"][best]
    lines = ["## Headline", "", f"On the {first} data (LoRA) the workbench trains **{r['tokens_per_s']:.2f}x** the real "
             f"tokens/s of the stronger baseline, {SIDE_NAMES[best]} (each pair: {each(r['tokens_per_s_each'])})"]
    if PEFT in main["ratios"] and best != PEFT:
        lines[-1] += f", and {main['ratios'][PEFT]['tokens_per_s']:.2f}x the tutorial's PEFT script"
    return lines + ["", ""]


# ---------------------------------------------------------------------------
# Memory, settings, machine
# ---------------------------------------------------------------------------
def memory_table(summary: dict) -> list[str]:
    head = ["data", "method", "side", "base model in memory MiB", "real tokens/s", "peak RSS MiB", "peak GPU MiB",
            "trainable params"]
    lines = ["## Base model memory: LoRA vs QLoRA", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary.values():
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
             ("torch / transformers / peft / accelerate / trl",
              f"{machine['torch']} / {machine['transformers']} / {machine['peft']} / {machine['accelerate']} / "
              f"{machine.get('trl') or 'not installed'}"),
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
    trl = next((r["trl"] for r in report["runs"] if "trl" in r), None)
    lines = ["## Settings", "",
             f"- model `{st['model']}` ({fl['total_params'] / 1e6:.1f} M parameters, {fl['trainable_params']:,} trained by LoRA); "
             f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, targets {lora.get('targets')}",
             f"- {st['batch_size']} samples per optimizer step (workbench: packed into one row; PEFT: one padded batch); "
             f"{st['steps']} steps; {st['repeats']} rounds on the first data set (the PEFT reference in "
             f"{st['reference_repeats']}, TRL's defaults in {st.get('trl_default_repeats', st['repeats'])}), {st['other_repeats']} on the others; QLoRA {st['qlora_steps']} steps x "
             f"{st['qlora_repeats']} pair on the first data set"]
    if trl:
        lines.append(f"- TRL {trl['version']}: {trl['rows_per_step']} packed row(s) of at most max_length tokens per step, "
                     f"the same steps; {trl['samples_given']} samples of the stream given so that BFD packing fills "
                     f"{trl['packed_rows']} rows (one epoch); completion-only loss {trl['completion_only_loss']}")
    lines += [f"- lr {first.get('lr')} ({first.get('lr_scheduler')}), max_length {first.get('max_length')}, seed {first.get('seed')}, "
              f"device {first.get('device')}, dtype {first.get('dtype')}",
              f"- training FLOPs per token: 4 x {fl['total_params']:,} parameters = {fl['flops_per_token'] / 1e9:.2f} GFLOP "
              "(LoRA: forward plus the backward through the activations; no weight gradients for the frozen base); "
              "achieved = FLOPs per token x real tokens/s",
              "- rates leave out the first step (warm-up); medians over the repeats; ratios are taken per pair of runs", ""]
    return lines


def sides_lines(st: dict) -> list[str]:
    lines = ["## Sides", "", "| side | what runs |", "|---|---|"]
    lines += [f"| {SIDE_NAMES[name]} | {side['label']} (`{' '.join([side['script'], *side['args']])}`) |"
              for name, side in st["sides"].items()]
    return lines + ["", "The two PEFT sides are the same script, and so are the two TRL sides; each pair differs only "
                    "in gradient checkpointing.", ""]


def render_markdown(report: dict) -> str:
    st = report["settings"]
    lines = ["# Benchmark: workbench vs the PEFT + Trainer script and TRL's SFTTrainer", "",
             f"Written by `make bench` (benchmarks/bench.py) on {report['finished']} in {report['wall_minutes']:.1f} min. Reproduce with:", "",
             "```bash", report["command"], "```", "",
             "What is measured and why it is fair: [benchmarks/README.md](../README.md). "
             "Every run's steps are in `results.json`; its log in `runs/`.", ""]
    lines += headline(report["summary"], st["first_dataset"])
    if report["targets"]:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]]
        lines += ["", "The targets are meant for a quiet machine; a busy one lowers both sides' rates and the matmul share.", ""]
    lines += sides_lines(st) + ["## The workbench against each baseline", ""]
    for entry in sorted(report["summary"].values(), key=lambda e: e["method"] != "lora"):
        lines += pair_table(entry, st["threshold"])
    lines += memory_table(report["summary"])
    lines += settings_lines(report) + machine_lines(report["machine"], report["matmul"])
    return "\n".join(lines) + "\n"


def sides_settings() -> dict:
    return {name: {"script": side.script, "args": list(side.args), "label": side.label} for name, side in SIDES.items()}

