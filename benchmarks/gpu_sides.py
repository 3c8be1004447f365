"""What `make bench-gpu` compares: the public shapes of its stand-in models, the sides, the plan and one job.

The shapes are the models' own config.json values; `TINY` shrinks a shape for the CPU rehearsal (--dry-run),
keeping its architecture and vocabulary. A side is a runner script with its options (sides.py does the same
for `make bench`); PLAN lists what runs, most important first, so that the time budget cuts from the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field


# Public shapes (the models' config.json), built with random weights.
SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                                   rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                                   rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class Side:
    script: str | None  # None: not a runner (Unsloth's row)
    args: tuple[str, ...]
    name: str


SIDES = {
    "workbench": Side("run_workbench.py", (), "workbench"),
    "workbench_compile": Side("run_workbench.py", ("--torch-compile",), "workbench + torch.compile (decoder layers)"),
    "workbench_ckpt": Side("run_workbench.py", ("--gradient-checkpointing",),
                           "workbench, gradient checkpointing on (the memory-lean setting)"),
    "workbench_fused_loss": Side("run_workbench.py", ("--fused-loss",),
                                 "workbench, Liger's fused linear cross-entropy on"),
    "workbench_mb8k": Side("run_workbench.py", ("--micro-batch-tokens", "8192"), "workbench, micro-batches of 8192 tokens"),
    "workbench_peft_lora": Side("run_workbench.py", ("--peft-lora",),
                                "workbench, peft's LoRA forward, torch's dropout (LoRA before 12-06, QLoRA before 12-07)"),
    "workbench_profile": Side("run_workbench.py", (), "workbench under torch.profiler (slower: where the time goes)"),
    "workbench_cure": Side("run_workbench.py", ("--extra-terms",),
                           "workbench, the mixed recipe's distillation and unlikelihood terms on (its own cost of them)"),
    "trl_best": Side("baseline_trl.py", ("--no-gradient-checkpointing", "--padding-free"),
                     "TRL best (BFD packing, padding-free, Liger if installed, no checkpointing)"),
    "trl": Side("baseline_trl.py", (), "TRL SFTTrainer, defaults"),
    "peft": Side("baseline_peft.py", ("--gradient-checkpointing",), "tutorial PEFT script (checkpointing on)"),
    "unsloth": Side(None, (), "Unsloth"),
}
# What runs, most important first: the time budget cuts from the end. (shape, method, sides, run): a second run of
# the main comparison gives issue 21's median of two runs.
PLAN = [("qwen2.5-1.5b", "lora", ("workbench", "trl_best"), 1),
        ("qwen2.5-1.5b", "lora", ("workbench", "trl_best"), 2),
        # QLoRA against TRL's QLoRA, side by side (never so far), and the 7B LoRA peak QLoRA's is compared with
        ("qwen2.5-7b", "qlora", ("workbench_ckpt", "trl"), 1),
        ("qwen2.5-7b", "lora", ("workbench",), 1),
        # 2026-12-06: the lean LoRA forward under autocast and the seeded dropout (unmeasured): the A/B of them
        ("qwen2.5-1.5b", "lora", ("workbench_peft_lora",), 1),
        ("qwen2.5-1.5b", "lora", ("workbench_profile",), 1),
        # measured 2026-12-04 20:07: the fused loss 0.71x the speed for 2.2 GB less; 8k micro-batches half the peak.
        # That fused loss called the decoder outside accelerate's autocast (peft's LoRA forward, float32 copies);
        # since 2026-12-07 the whole loss runs under it (unmeasured): the fused side may tell otherwise now
        ("qwen2.5-1.5b", "lora", ("workbench_fused_loss", "workbench_mb8k"), 1),
        # compiling took over 70 s on the H200 (12-04), its layers then split by the LoRA dropout (fixed 12-07)
        ("qwen2.5-1.5b", "lora", ("workbench_compile",), 1),
        ("qwen2.5-7b", "qlora", ("workbench", "trl_best"), 1),
        # 2026-12-07: QLoRA's 4-bit layers with the lean forward and the seeded dropout (unmeasured): the A/B of them
        ("qwen2.5-7b", "qlora", ("workbench_peft_lora",), 1),
        ("qwen2.5-1.5b", "lora", ("trl", "peft", "unsloth"), 1),
        ("qwen2.5-7b", "qlora", ("peft",), 1),
        ("smollm2-135m", "lora", ("workbench", "trl_best"), 1),
        # 2026-12-07: the cure's extra terms on a flat micro-batch without host synchronisation (unmeasured)
        ("qwen2.5-1.5b", "lora", ("workbench_cure",), 1)]


@dataclass
class Job:
    shape: str
    method: str
    side: str
    status: str = "planned"  # ok, failed, timeout, skipped, not installed
    error: str | None = None
    seconds: float | None = None
    result: dict | None = field(default=None, repr=False)
    run: int = 1  # the repeat of this (shape, method, side)

    @property
    def name(self) -> str:
        return f"{self.shape}-{self.method}-{self.side}" + (f"-run{self.run}" if self.run > 1 else "")

