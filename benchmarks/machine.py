"""The machine a benchmark ran on: CPU, cores, threads, versions, load, and its measured matmul throughput."""
from __future__ import annotations

import os
import platform
from pathlib import Path


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
            "accelerate": version("accelerate"), "trl": optional_version("trl"), "platform": platform.platform(),
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


def optional_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
