"""Where a profiled GPU run's time goes, in a few numbers: is the GPU kept busy, and by which kinds of kernels.

`make bench-gpu`'s side "workbench under torch.profiler" writes torch.profiler's operator
tables; an operator table alone does not say the one thing a launch-bound step needs
to know first: how much of the wall time the GPU worked at all. This summary gives

* the GPU's busy share: the union of the kernels' time intervals over the profiled
  wall time (the rest is the GPU waiting for the host to launch the next kernel);
* the kernel time by kind (matrix multiplies, flash attention, Liger's Triton
  kernels, torch's elementwise kernels and reductions, random numbers for dropout,
  bitsandbytes' 4-bit kernels, copies), from the kernels' names;
* kernels and host synchronisations (cudaStreamSynchronize, cudaDeviceSynchronize,
  cudaMemcpy without Async) per optimizer step.

Written here because torch.profiler reports operators and kernels but neither a busy
share nor kinds of kernels; the kinds follow the names cuBLAS, CUTLASS, PyTorch's
flash kernels, Triton and bitsandbytes give their kernels.
"""
from __future__ import annotations

import re

# (kind, pattern on the kernel's name), first match wins. Attention first: flash kernels' template arguments name
# CUTLASS types. Then cuBLAS's plain-identifier names (nvjet_..., sm90_xmma_...), before the rule that takes any
# other plain identifier (no "::", no spaces: not a C++ kernel) for a Triton kernel, and then torch's own kinds.
NAMED_KINDS = (
    ("attention (flash)", re.compile(r"flash|fmha|attention", re.I)),
    ("matmul (cuBLAS, CUTLASS)", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|splitKreduce|wgmma", re.I)),
    ("4-bit (bitsandbytes)", re.compile(r"kDequantize|kQuantize|kgemm_4bit|4bit", re.I)),
)
TORCH_KINDS = (
    ("dropout, random numbers", re.compile(r"philox|bernoulli|dropout|distribution|curand", re.I)),
    ("copies, fills", re.compile(r"^Memcpy|^Memset|copy_kernel|CatArrayBatched|fill_kernel|index_elementwise", re.I)),
    ("reductions (torch)", re.compile(r"reduce_kernel|softmax|norm_kernel|cross_entropy|nll_loss|cunn_|multi_tensor|"
                                      r"scatter|gather", re.I)),
    ("elementwise (torch)", re.compile(r"elementwise|vectorized|unrolled", re.I)),
)
TRITON = "Triton (Liger, torch.compile)"
OTHER = "other"
SYNCS = re.compile(r"^cuda(Stream|Device|Event)Synchronize$|^cudaMemcpy$|^cudaMemcpy2D$")


def kernel_kind(name: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and not any(p.search(name) for _, p in NAMED_KINDS):
        return TRITON  # Triton names a kernel by its Python function
    return next((kind for kind, p in NAMED_KINDS + TORCH_KINDS if p.search(name)), OTHER)


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals (kernels on several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize(kernels: list[tuple[str, float, float]], host_calls: list[str], wall_us: float, steps: int) -> dict:
    """kernels: (name, start µs, end µs); host_calls: the names of the host's runtime calls; wall_us: the profiled
    wall time. Returns the busy share, milliseconds and shares by kind, kernels and synchronisations a step."""
    by_kind: dict[str, float] = {}
    for name, start, end in kernels:
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + (end - start)
    total = sum(by_kind.values())
    busy = busy_us([(s, e) for _, s, e in kernels])
    return {"wall_ms": round(wall_us / 1e3, 1), "gpu_busy_ms": round(busy / 1e3, 1),
            "gpu_busy_share": round(busy / wall_us, 4) if wall_us else None, "steps": steps,
            "kernels_per_step": round(len(kernels) / max(1, steps)),
            "syncs_per_step": round(sum(1 for n in host_calls if SYNCS.match(n)) / max(1, steps), 1),
            "kernel_ms_by_kind": {k: round(v / 1e3, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "kernel_share_by_kind": {k: round(v / total, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
            if total else {}}


def from_profiler(prof, steps: int) -> dict | None:
    """The summary of a finished torch.profiler run (None where it saw no GPU kernel: a CPU run)."""
    from torch.autograd import DeviceType

    events = prof.events()
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.device_type != DeviceType.CPU
               and "annotation" not in str(getattr(e, "activity_type", "")).lower()]  # a label's range, not a kernel
    if not kernels:
        return None
    host = [e for e in events if e.device_type == DeviceType.CPU]
    wall = max(e.time_range.end for e in events) - min(e.time_range.start for e in host or events)
    return summarize(kernels, [e.name for e in host], wall, steps)


def describe(summary: dict) -> str:
    """One paragraph for gpu.md."""
    kinds = ", ".join(f"{k} {v:.0%}" for k, v in summary["kernel_share_by_kind"].items() if v >= 0.005)
    return (f"The GPU worked {summary['gpu_busy_share']:.0%} of the profiled wall time ({summary['gpu_busy_ms']:,.0f} of "
            f"{summary['wall_ms']:,.0f} ms, {summary['steps']} steps; the rest it waited for the host); "
            f"{summary['kernels_per_step']:,} kernels and {summary['syncs_per_step']:g} host synchronisations a step. "
            f"Kernel time by kind: {kinds}.")
