"""Estimate what a run will need on this machine before starting it: memory and time.

Memory = base weights (4, 2 or ~0.56 bytes per parameter for fp32, bf16/fp16 or
NF4; under NF4 only the linear layers are 4-bit, the embeddings and an untied
output head keep the compute dtype, float32 under float16; on a CPU a QLoRA step's peak is measured at
about LoRA's, so there the weights count at the compute dtype; a full fine-tune in half precision keeps float32
master weights, `models.master_weights`) + for the trained weights their gradient and two AdamW moments (LoRA's
adapters: also the float32 weight; float32 master weights: also autocast's half copy) + the activations of one
micro-batch + the logits (one float32 matrix of tokens x vocabulary with the
fast path's fused loss, three without it) + on a CPU the process itself
(Python, torch, transformers). On a GPU's fast path a micro-batch is a flat row of the
step's tokens, as many as the token budget lets through (`workbench/fastpath/token_budget.py`:
micro_batch_tokens, or what the memory left free by the weights holds), each at what
the budget counts for a token: the activations then fill about 80% of that memory.
Time per micro-batch = a fixed cost (every weight read in the forward and the
backward, Python and autograd for thousands of operators: per layer, measured
on a CPU; under QLoRA also the dequantization of the 4-bit weights) + training
FLOPs per token (about 6 x parameters for full fine-tuning, 4 x parameters for
LoRA/QLoRA, where frozen weights need no weight gradient, plus the attention's
6 x layers x hidden x context, which grows with the sequence) x tokens / (this
machine's measured matrix-multiply throughput x the share of it training reaches).

The constants were fitted to `make bench`'s scaling sweep (benchmarks/scaling.py:
max_length 16-2048, 1-4 rows a step, 135M-0.5B models, LoRA and QLoRA, on a
2-core CPU), where every point is within 25% of the measurement. Estimates,
not promises: on other machines they are right within a factor of about two,
which is what a student needs to choose between "a coffee" and "overnight".
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from workbench.fastpath import token_budget, varlen_kernel
from workbench.config import Config
from workbench.i18n import t
from workbench.models import master_weights, pick_device, pick_dtype, resolve_model_path

ACTIVATION_FLOATS = 30  # activations kept for the backward, per token, layer and hidden unit (fitted: 2.2 MiB/token on 135M)
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "nf4": 0.56}
EFFICIENCY = {"cpu": 0.75, "cuda": 0.35}  # share of peak matmul throughput training reaches (CPU: fitted, scaling sweep)
STEP_OVERHEAD_S_PER_LAYER = {"cpu": 0.016, "cuda": 0.0}  # fixed cost of a micro-batch per layer (CPU: 0.48 s for 30 layers)
NF4_DEQUANT_S_PER_PARAM = {"cpu": 1.5e-9, "cuda": 0.0}  # QLoRA: dequantizing the 4-bit weights, forward and backward (CPU: fitted)
RUNTIME_GB = {"cpu": 0.47, "cuda": 0.0}  # the process itself in RAM (peak RSS of a run on the tiny random model)


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
    runtime_gb: float = 0.0

    def as_table(self, lang: str = "en"):
        """The estimate as a two-column table, its labels in `lang` ("en"/"zh")."""
        import pandas as pd

        rows = [
            (t("est.params", lang), f"{self.total_params / 1e6:.1f} M / {self.trainable_params / 1e6:.2f} M"),
            (t("est.weights", lang), f"{self.weights_gb:.2f} GB ({self.weight_dtype})"),
            (t("est.optimizer", lang), f"{self.optimizer_gb:.2f} GB"),
            (t("est.activations", lang), f"{self.activations_gb:.2f} GB"),
            (t("est.runtime", lang), f"{self.runtime_gb:.2f} GB"),
            (t("est.memory", lang), f"{self.total_gb:.2f} GB"),
            (t("est.tokens", lang), f"{self.tokens_per_step:,}"),
            (t("est.steps", lang), f"{self.steps}"),
            (t("est.gflops", lang, device=self.device), f"{self.machine_gflops:.0f} GFLOP/s"),
            (t("est.step_time", lang), f"{self.seconds_per_step:.1f} s"),
            (t("est.total_time", lang), f"{self.total_minutes:.1f} min"),
        ]
        return pd.DataFrame(rows, columns=[t("est.what", lang), t("est.estimate", lang)])


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
    counts = param_counts(cfg)
    return counts["total"], counts["trainable"]


def param_counts(cfg: Config) -> dict[str, int]:
    """total, trainable, and `linear`: the weights of the linear layers but the output head (what NF4 quantises)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    mcfg = AutoConfig.from_pretrained(resolve_model_path(cfg.pretrained_model_name_or_path), trust_remote_code=cfg.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.trust_remote_code)
    model.tie_weights()
    total = sum(p.numel() for p in model.parameters())
    out_head = model.get_output_embeddings()
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not out_head]
    linear = sum(mod.weight.numel() for _, mod in linears)
    if cfg.method == "full":
        return {"total": total, "trainable": total, "linear": linear}
    targets = cfg.lora_target_modules
    trainable = sum(cfg.lora_r * (mod.in_features + mod.out_features) for name, mod in linears
                    if targets == "all-linear" or name.split(".")[-1] in targets)
    return {"total": total, "trainable": trainable, "linear": linear}


def weight_bytes(counts: dict[str, int], dtype: str, compute_dtype: str) -> float:
    """The base weights in memory: under NF4 the linear layers are 4-bit, the rest (embeddings, norms) stays in the
    compute dtype, float32 under float16 (models.build_model: peft's k-bit preparation upcasts it)."""
    if dtype != "nf4":
        return counts["total"] * BYTES_PER_PARAM[dtype]
    rest = "float32" if compute_dtype == "float16" else compute_dtype
    return counts["linear"] * BYTES_PER_PARAM["nf4"] + (counts["total"] - counts["linear"]) * BYTES_PER_PARAM[rest]


def optimizer_bytes_per_param(cfg: Config, dtype: str, master: bool) -> float:
    """What a trained weight adds to the base weights: LoRA's float32 adapter weight, its gradient and AdamW's two
    moments (16 bytes); a full fine-tune's gradient and moments at the weight's dtype (the weight itself is among the
    base weights), and under float32 master weights the half-precision copy autocast keeps for the backward."""
    if cfg.method != "full":
        return 16.0
    return 3 * (4.0 if master else BYTES_PER_PARAM[dtype]) + (2.0 if master else 0.0)


def gpu_activations(cfg: Config, mcfg, compute: str, resident: float, step_tokens: int, master: bool = False) -> float:
    """The GPU fast path's activations: one flat micro-batch of the step's tokens, of at most micro_batch_tokens or what
    80% of the memory the weights and optimizer leave free holds (workbench/fastpath/token_budget.py), each token at what the
    budget counts for it with every position trained (and distilled, where the distillation is on): an upper bound."""
    text = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    shares = (1.0, 1.0 if cfg.distill_weight > 0 else 0.0)
    per_token = token_budget.config_token_bytes(text, 4 if compute == "float32" else 2, cfg.gradient_checkpointing,
                                                shares, fused_loss=False, master=master)
    budget = cfg.micro_batch_tokens or int(0.8 * max(torch.cuda.mem_get_info()[0] - resident, 0) / per_token)
    return min(step_tokens, max(cfg.max_length, min(token_budget.MAX_BUDGET_TOKENS, budget))) * per_token


def estimate(cfg: Config, tokens_per_row: int | None = None, steps: int | None = None, gflops: float | None = None,
             context: int | None = None) -> Estimate:
    """Memory and time for `cfg` on this machine. tokens_per_row defaults to max_length (packed rows are nearly full);
    context (the length of one conversation, what attention spans) defaults to tokens_per_row, an upper bound."""
    from transformers import AutoConfig

    device = pick_device(cfg.device)
    compute = str(pick_dtype(cfg.torch_dtype, device)).replace("torch.", "")
    dtype = "nf4" if cfg.method == "qlora" else compute
    counts = param_counts(cfg)
    total, trainable = counts["total"], counts["trainable"]
    mcfg = AutoConfig.from_pretrained(resolve_model_path(cfg.pretrained_model_name_or_path), trust_remote_code=cfg.trust_remote_code)
    row = tokens_per_row or cfg.max_length
    tokens = row * cfg.batch_size
    act_bytes = 4 if device.type == "cpu" else 2
    per_token_layer = mcfg.hidden_size * (ACTIVATION_FLOATS if not cfg.gradient_checkpointing else 2) * act_bytes
    logit_copies = 1 if getattr(cfg, "fast_path", True) else 3  # the fused loss turns the logits into their gradient in place
    activations = tokens * mcfg.num_hidden_layers * per_token_layer + logit_copies * tokens * mcfg.vocab_size * 4
    master = master_weights(cfg, device)  # a full fine-tune in half precision: float32 weights under autocast
    weights = weight_bytes(counts, "float32" if master else dtype, compute)
    optimizer = trainable * optimizer_bytes_per_param(cfg, dtype, master)
    if device.type == "cuda" and getattr(cfg, "fast_path", True) and varlen_kernel.available():
        activations = gpu_activations(cfg, mcfg, compute, weights + optimizer, tokens * cfg.accumulative_counts, master)
    if dtype == "nf4" and device.type == "cpu":  # bitsandbytes' CPU path: the step's peak is LoRA's (scaling sweep)
        activations += weight_bytes(counts, compute, compute) - weights
    attention = 6 * mcfg.num_hidden_layers * mcfg.hidden_size * (context or row)  # QK^T and AV over a causal context, x3
    flops_per_token = (6 if cfg.method == "full" else 4) * total + attention
    if gflops is None:
        gflops = measure_matmul_gflops(device.type, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    tokens_per_step = tokens * cfg.accumulative_counts
    fixed = STEP_OVERHEAD_S_PER_LAYER[device.type] * mcfg.num_hidden_layers
    if dtype == "nf4":
        fixed += NF4_DEQUANT_S_PER_PARAM[device.type] * counts["linear"]
    fixed *= cfg.accumulative_counts  # once per micro-batch
    sec = fixed + flops_per_token * tokens_per_step / (gflops * 1e9 * EFFICIENCY[device.type])
    n_steps = steps or cfg.max_steps or 100
    runtime = RUNTIME_GB[device.type] * 1e9
    return Estimate(total, trainable, f"float32, autocast {dtype}" if master else dtype, weights / 1e9, optimizer / 1e9, activations / 1e9,
                    (weights + optimizer + activations + runtime) / 1e9, tokens_per_step, n_steps,
                    flops_per_token, gflops, sec, sec * n_steps / 60, device.type, runtime / 1e9)
