"""Estimate what a run will need on this machine before starting it: memory and time.

Memory = base weights (4, 2 or ~0.56 bytes per parameter for fp32, bf16/fp16 or
NF4) + for the trained weights their gradient and two AdamW moments + the
activations of one micro-batch + the logits. Time = training FLOPs per token
(about 6 x parameters for full fine-tuning, 4 x parameters for LoRA/QLoRA, where
frozen weights need no weight gradient) x tokens / (this machine's measured
matrix-multiply throughput x a typical efficiency). Estimates, not promises:
they are right within a factor of about two, which is what a student needs to
choose between "a coffee" and "overnight".
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from workbench.config import Config
from workbench.models import pick_device, pick_dtype, resolve_model_path

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "nf4": 0.56}
EFFICIENCY = {"cpu": 0.7, "cuda": 0.35}  # share of peak matmul throughput training typically reaches


@dataclass
class Estimate:
    total_params: int
    trainable_params: int
    weight_dtype: str
    weights_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float
    tokens_per_step: int
    steps: int
    flops_per_token: float
    machine_gflops: float
    seconds_per_step: float
    total_minutes: float
    device: str

    def as_table(self):
        import pandas as pd

        rows = [
            ("parameters (total / trained)", f"{self.total_params / 1e6:.1f} M / {self.trainable_params / 1e6:.2f} M"),
            ("base weights", f"{self.weights_gb:.2f} GB ({self.weight_dtype})"),
            ("gradients + AdamW state", f"{self.optimizer_gb:.2f} GB"),
            ("activations + logits (one micro-batch)", f"{self.activations_gb:.2f} GB"),
            ("memory needed, about", f"{self.total_gb:.2f} GB"),
            ("tokens per step", f"{self.tokens_per_step:,}"),
            ("steps", f"{self.steps}"),
            (f"measured matmul throughput ({self.device})", f"{self.machine_gflops:.0f} GFLOP/s"),
            ("time per step, about", f"{self.seconds_per_step:.1f} s"),
            ("training time, about", f"{self.total_minutes:.1f} min"),
        ]
        return pd.DataFrame(rows, columns=["what", "estimate"])


def measure_matmul_gflops(device: str = "cpu", size: int = 1024, dtype=torch.float32, seconds: float = 1.0) -> float:
    """This machine's large-matmul throughput in GFLOP/s (fp32 on CPU, bf16 on GPU)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - t0) / 1e9


def count_params(cfg: Config) -> tuple[int, int]:
    """(total, trainable) parameters for the config's model and method, without loading weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    mcfg = AutoConfig.from_pretrained(resolve_model_path(cfg.pretrained_model_name_or_path), trust_remote_code=cfg.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.trust_remote_code)
    model.tie_weights()
    total = sum(p.numel() for p in model.parameters())
    if cfg.method == "full":
        return total, total
    targets = cfg.lora_target_modules
    out_head = model.get_output_embeddings()
    trainable = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or mod is out_head:
            continue
        if targets == "all-linear" or name.split(".")[-1] in targets:
            trainable += cfg.lora_r * (mod.in_features + mod.out_features)
    return total, trainable


def estimate(cfg: Config, tokens_per_row: int | None = None, steps: int | None = None, gflops: float | None = None) -> Estimate:
    """Memory and time for `cfg` on this machine. tokens_per_row defaults to max_length (packed rows are nearly full)."""
    from transformers import AutoConfig

    device = pick_device(cfg.device)
    dtype = "nf4" if cfg.method == "qlora" else str(pick_dtype(cfg.torch_dtype, device)).replace("torch.", "")
    total, trainable = count_params(cfg)
    mcfg = AutoConfig.from_pretrained(resolve_model_path(cfg.pretrained_model_name_or_path), trust_remote_code=cfg.trust_remote_code)
    tokens = (tokens_per_row or cfg.max_length) * cfg.batch_size
    act_bytes = 4 if device.type == "cpu" else 2
    per_token_layer = mcfg.hidden_size * (34 if not cfg.gradient_checkpointing else 2) * act_bytes
    activations = tokens * mcfg.num_hidden_layers * per_token_layer + 3 * tokens * mcfg.vocab_size * 4
    weights = total * BYTES_PER_PARAM[dtype]
    optimizer = trainable * (4 + 4 + 8)
    flops_per_token = (6 if cfg.method == "full" else 4) * total
    if gflops is None:
        gflops = measure_matmul_gflops(device.type, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    tokens_per_step = tokens * cfg.accumulative_counts
    sec = flops_per_token * tokens_per_step / (gflops * 1e9 * EFFICIENCY[device.type])
    n_steps = steps or cfg.max_steps or 100
    return Estimate(total, trainable, dtype, weights / 1e9, optimizer / 1e9, activations / 1e9,
                    (weights + optimizer + activations) / 1e9 * 1.15, tokens_per_step, n_steps, flops_per_token,
                    gflops, sec, sec * n_steps / 60, device.type)
