"""The report of `make bench-gpu`: one row per side, MFU, the loss at equal tokens, issue 21's targets, gpu.md.

MFU = 4 x the linear layers' weights (the output head included) x real tokens/s over the GPU's measured bf16
matmul: LoRA's frozen base has no weight gradients, so a token costs a forward (2 FLOPs a weight) and the
backward to the activations (2 more). The loss at equal tokens seen is summary.loss_at_equal_tokens against the
workbench's run of the same shape and method.
"""
from __future__ import annotations

import math
from pathlib import Path

from benchmarks.gpu_profile import describe
from benchmarks.gpu_sides import SIDES, Job
from benchmarks.summary import loss_at_equal_tokens


def job_row(job: Job, jobs: list[Job], flops: dict, tflops: float) -> dict:
    row = {"shape": job.shape, "method": job.method, "side": job.side, "run": job.run,
           "name": SIDES[job.side].name + (f" (run {job.run})" if job.run > 1 else ""),
           "status": job.status, "error": job.error, "seconds": job.seconds}
    r = job.result
    if r is None:
        return row
    s = r["summary"]
    row.update(tokens_per_s=s["tokens_per_s"], step_time_s=s["step_time_s"], tokens_per_step=s["tokens_per_step"],
               positions_per_step=s["positions_per_step"], final_loss=s["final_loss"], peak_gpu_mib=r.get("peak_gpu_mib"),
               peak_rss_mib=r.get("peak_rss_mib"), setup_s=r.get("setup_s"), trl=r.get("trl"),
               micro_batch_tokens=r.get("micro_batch_tokens"), gpu_profile=r.get("gpu_profile"),
               mfu=4 * flops[job.shape] * s["tokens_per_s"] / (tflops * 1e12) if tflops else None)
    same = [j for j in jobs if j.side == "workbench" and (j.shape, j.method) == (job.shape, job.method) and j.result]
    wb = next((j for j in same if j.run == job.run), same[0] if same else None)  # the workbench of the same run
    if wb is not None and wb is not job:
        cmp = loss_at_equal_tokens([wb.result], [r])
        row["loss_at_equal_tokens"] = {"tokens": cmp["tokens"], "workbench": cmp["workbench"], "side": cmp["baseline"],
                                       "difference": cmp["difference"], "noise": cmp["noise"],
                                       "within_noise": cmp["within_noise"]}
        row["workbench_speedup"] = wb.result["summary"]["tokens_per_s"] / s["tokens_per_s"]
    return row


def find(rows: list[dict], shape: str, method: str, side: str) -> dict | None:
    return next(iter(find_all(rows, shape, method, side)), None)


def find_all(rows: list[dict], shape: str, method: str, side: str) -> list[dict]:
    return [r for r in rows if (r["shape"], r["method"], r["side"]) == (shape, method, side) and r["status"] == "ok"]


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def runs_note(rows: list[dict]) -> str:
    return f"median of {len(rows)} runs" if len(rows) > 1 else "one run"


def targets(rows: list[dict]) -> list[dict]:
    """Issue 21's targets, where the rows they need ran; the median where a side ran more than once."""
    out = []
    wbs, bests = find_all(rows, "qwen2.5-1.5b", "lora", "workbench"), find_all(rows, "qwen2.5-1.5b", "lora", "trl_best")
    if wbs and bests:
        speedup = median([r["tokens_per_s"] for r in wbs]) / median([r["tokens_per_s"] for r in bests])
        losses = [r.get("loss_at_equal_tokens") or {} for r in bests]
        diff = median([loss.get("difference", float("nan")) for loss in losses])
        out.append({"target": "1.5B LoRA: >= 1.5x TRL's best in real tokens/s, loss at equal tokens within noise",
                    "value": f"{speedup:.2f}x ({runs_note(wbs)} / {runs_note(bests)}), loss (workbench - TRL) {diff:+.4f} "
                             f"(noise {losses[0].get('noise', float('nan')):.4f})",
                    "met": speedup >= 1.5 and all(bool(loss.get("within_noise")) for loss in losses)})
    if wbs and all(r.get("mfu") is not None for r in wbs):
        mfu = median([r["mfu"] for r in wbs])
        out.append({"target": "1.5B LoRA: >= 40% MFU", "value": f"{mfu:.1%} ({runs_note(wbs)})", "met": mfu >= 0.40})
    if wbs and bests and all(r.get("peak_gpu_mib") for r in wbs + bests):
        peak, trl_peak = max(r["peak_gpu_mib"] for r in wbs), min(r["peak_gpu_mib"] for r in bests)
        out.append({"target": "1.5B LoRA: peak GPU memory <= TRL's best at the same tokens a step",
                    "value": f"{peak:,.0f} vs {trl_peak:,.0f} MiB", "met": peak <= trl_peak})
    compiled = find_all(rows, "qwen2.5-1.5b", "lora", "workbench_compile")
    if wbs and compiled:
        ratio = median([r["tokens_per_s"] for r in compiled]) / median([r["tokens_per_s"] for r in wbs])
        out.append({"target": "1.5B LoRA: torch.compile of the decoder layers (kept only where faster)",
                    "value": f"{ratio:.2f}x the workbench without it", "met": ratio > 1.0})
    out += qlora_targets(rows)
    return out


def qlora_targets(rows: list[dict]) -> list[dict]:
    """7B QLoRA against 7B LoRA's peak (the memory-lean workbench row where it ran) and the fastest workbench QLoRA
    side against TRL's fastest QLoRA side (like with like: a checkpointed row is not raced against one without)."""
    wb_q = [r for side in ("workbench_ckpt", "workbench") for r in find_all(rows, "qwen2.5-7b", "qlora", side)]
    lora7 = find(rows, "qwen2.5-7b", "lora", "workbench")
    out = []
    lean = wb_q[0] if wb_q else None
    if lean and lora7 and lean["peak_gpu_mib"] and lora7["peak_gpu_mib"]:
        share = lean["peak_gpu_mib"] / lora7["peak_gpu_mib"]
        out.append({"target": "7B QLoRA: peak GPU memory <= 0.6x LoRA's",
                    "value": f"{share:.2f}x ({lean['name']}: {lean['peak_gpu_mib']:,.0f} MiB)", "met": share <= 0.6})
    trl_q = [r for side in ("trl_best", "trl") for r in find_all(rows, "qwen2.5-7b", "qlora", side)]
    if wb_q and trl_q:
        ours, theirs = (max(side, key=lambda r: r["tokens_per_s"]) for side in (wb_q, trl_q))
        speedup = ours["tokens_per_s"] / theirs["tokens_per_s"]
        out.append({"target": "7B QLoRA: faster than TRL's QLoRA",
                    "value": f"{speedup:.2f}x ({ours['name']} vs {theirs['name']})", "met": speedup > 1.0})
    return out


def fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# `make bench-gpu`{' (dry run on a CPU, tiny shapes)' if report['dry_run'] else ''}", "",
             f"GPU: **{m['gpu'] or 'none (CPU)'}**; torch {m['torch']}, transformers {m['transformers']}, "
             f"peft {m['peft']}, trl {m['trl'] or '-'}, liger-kernel {m['liger_kernel'] or '-'}, "
             f"bitsandbytes {m['bitsandbytes'] or '-'}; {report['date']}.", "",
             f"Measured {report['matmul']['dtype']} matmul ({report['matmul']['size']}^3): "
             f"{report['matmul']['tflops']:.1f} TFLOP/s. MFU = 4 x linear weights x real tokens/s / that. "
             f"About {report['tokens_per_step']} real tokens a step, {report['steps']} steps a side (the first a warm-up), "
             f"recipe `{report['config']}` (LoRA r 8 all-linear), random-weight stand-ins with the embedded tokenizer.", ""]
    for (shape, method) in dict.fromkeys((r["shape"], r["method"]) for r in report["rows"]):
        lines += [f"## {shape}, {method}", "",
                  "| side | real tokens/s | s/step | real tokens/step | MFU | peak GPU MiB | loss at equal tokens (side - workbench) | workbench x | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in report["rows"] if (r["shape"], r["method"]) == (shape, method)):
            loss = r.get("loss_at_equal_tokens")
            loss_cell = "-" if not loss else f"{loss['side']:.4f} ({-loss['difference']:+.4f}, noise {loss['noise']:.4f})"
            status = r["status"] if not r["error"] else f"{r['status']}: {r['error']}".replace("|", "/")
            lines.append(f"| {r['name']} | {fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('step_time_s'), '.2f')} | "
                         f"{fmt(r.get('tokens_per_step'), ',.0f')} | {fmt(r.get('mfu'), '.1%')} | "
                         f"{fmt(r.get('peak_gpu_mib'), ',.0f')} | {loss_cell} | {fmt(r.get('workbench_speedup'), '.2f')} | "
                         f"{status} |")
        lines.append("")
        lines += [f"Where the time of \"{r['name']}\" went: {describe(r['gpu_profile'])}\n"
                  for r in report["rows"] if (r["shape"], r["method"]) == (shape, method) and r.get("gpu_profile")]
    if report["targets"]:
        lines += ["## Targets (issue 21)", "", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]]
        lines.append("")
    lines += [f"Reproduce: `{report['command']}` ({report['elapsed_s']:.0f} s).", ""]
    return "\n".join(lines)


def machine(device: str) -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "device": device,
            "cuda": torch.version.cuda, "python": platform.python_version(), "torch": torch.__version__,
            **{k.replace("-", "_"): v(k) for k in ("transformers", "peft", "accelerate", "trl", "liger-kernel",
                                                    "bitsandbytes", "datasets")}}


def write_report(report: dict, out_dir: Path) -> None:
    from workbench.io import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "gpu.json", report, indent=1)
    atomic_write_text(out_dir / "gpu.md", render_markdown(report))
