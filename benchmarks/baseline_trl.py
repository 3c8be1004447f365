"""The second baseline: TRL's `SFTTrainer` as its docs teach it (packing, completion-only loss, a LoRA peft_config).

    .venv/bin/python benchmarks/baseline_trl.py --config smollm2_135m_lora_identity_mixed_cpu --steps 12 --out trl.json
    .venv/bin/python benchmarks/baseline_trl.py ... --no-gradient-checkpointing   # TRL's default checkpointing off

This is the strongest library setup a user who reads the Hugging Face docs writes
today (TRL 1.16, installed for the benchmark only: benchmarks/requirements.txt):

* the data as a conversational *prompt-completion* dataset (`prompt`: the system
  and user messages, `completion`: the assistant's answer), which makes
  `SFTTrainer` compute the loss on the completion only (`completion_only_loss`
  defaults to True for this form). `assistant_only_loss=True` is not an option
  with SmolLM2: its chat template has no `{% generation %}` markers and TRL 1.16
  has no patched copy of it (`get_training_chat_template` raises), so the
  prompt-completion form is how the docs do completion-only loss here;
* `SFTConfig(packing=True, max_length=...)`: TRL's default best-fit-decreasing
  packing into rows of at most max_length tokens, padding-free (one flattened
  row per step, position_ids restarting per sample);
* `peft_config=LoraConfig(...)`: the config's r, alpha, dropout, target modules;
* gradient checkpointing as TRL defaults it (`SFTConfig.gradient_checkpointing=True`),
  or off with `--no-gradient-checkpointing`.

Kept equal to the other sides: the model as loaded by the PEFT baseline (the
config's dtype, float32 on CPU; TRL's `bf16=True` default is set to what the
other sides use, so that every side computes in the same precision), AdamW with
the config's lr, betas, weight decay, schedule, warmup and clipping, the seed,
`--rows-per-step` packed rows per optimizer step and `--steps` steps. The samples
come from the same seeded stream (`common.sample_stream`), but TRL packs and
shuffles them itself, so its step s does not train the workbench's step s: it
is given enough of the stream to fill steps x rows packed rows (one epoch, no
sample seen twice), and losses are compared against tokens trained
(bench.py, benchmarks/README.md). The benchmark adds only observers: the
PEFT baseline's step-end timer and a wrapper counting each batch's tokens.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()

import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baseline_peft import CountingCollator, load_base_model, step_records, step_timer  # noqa: E402
from benchmarks.common import run_main, runner_parser, sample_stream, with_system  # noqa: E402

TRL_VERSION = "1.16.0"
MISSING = (f"trl is not installed: the TRL baseline needs it (pip install -r benchmarks/requirements.txt, "
           f"trl=={TRL_VERSION}; `make bench` does this). It is not a dependency of the workbench package.")


def require_trl():
    """The trl module, or SystemExit with how to install it."""
    try:
        import trl
    except ImportError:
        raise SystemExit(MISSING) from None
    return trl


# ---------------------------------------------------------------------------
# Data: conversational prompt-completion records, enough for steps x rows packed rows
# ---------------------------------------------------------------------------
def prompt_completion(sample, system: str) -> dict:
    messages = with_system(sample.messages, system)
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def packed_rows(records: list[dict], tokenizer, max_length: int) -> int:
    """How many rows TRL's BFD packing makes of these records (tokenised as SFTTrainer does, cut at max_length)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ids = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=True)["input_ids"][:max_length]
           for r in records]
    return len(pack_dataset(Dataset.from_dict({"input_ids": ids}), max_length, "bfd"))


def trl_records(cfg, tokenizer, rows_needed: int, start: int) -> list[dict]:
    """The stream's first n samples as records, n grown until BFD packing fills rows_needed rows."""
    n = max(start, 1)
    while True:
        records = [prompt_completion(s, cfg.system) for s in sample_stream(cfg, n)]
        rows = packed_rows(records, tokenizer, cfg.max_length)
        if rows >= rows_needed:
            return records
        n = int(n * rows_needed / max(rows, 1) * 1.1) + 1


# ---------------------------------------------------------------------------
# SFTConfig and the run
# ---------------------------------------------------------------------------
def sft_config(cfg, args, out_dir: str, device, dtype):
    """TRL's defaults, with the benchmark's common optimisation settings and precision."""
    import torch
    from trl import SFTConfig

    half = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return SFTConfig(
        output_dir=out_dir, packing=True, max_length=cfg.max_length,
        per_device_train_batch_size=args.rows_per_step, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=int(round(cfg.warmup_ratio * args.steps)),
        weight_decay=cfg.weight_decay, adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1], max_grad_norm=cfg.max_norm,
        seed=cfg.seed, logging_steps=1, save_strategy="no", report_to="none", use_cpu=device.type == "cpu",
        bf16=half and dtype == torch.bfloat16, fp16=half and dtype == torch.float16, dataloader_num_workers=0,
        disable_tqdm=True, **({} if args.trl_checkpointing else {"gradient_checkpointing": False}),
        **({"padding_free": True} if args.padding_free else {}), **({"use_liger_kernel": True} if args.liger_kernel else {}))


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", target_modules=cfg.lora_target_modules, r=cfg.lora_r,
                      lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none")


def train_trl(cfg, args, stream: list) -> tuple[list[dict], dict]:
    """Build the records, load the base, train with SFTTrainer; per-step records and the side's extra measurements."""
    require_trl()
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed
    from trl import SFTTrainer

    from workbench.models import pick_device, pick_dtype, resolve_model_path

    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.torch_dtype, device)
    path = resolve_model_path(cfg.pretrained_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = trl_records(cfg, tokenizer, args.steps * args.rows_per_step, len(stream))
    model, base_bytes = load_base_model(path, cfg.method, dtype, device)
    timer = step_timer()
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        trainer = SFTTrainer(model=model, args=sft_config(cfg, args, tmp, device, dtype), train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=[timer])
        collator = trainer.data_collator = CountingCollator(trainer.data_collator)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]
    steps = step_records(losses, collator.batches[:args.steps], timer)
    extra = {"base_model_bytes": base_bytes, "setup_s": round(timer.start - STARTED, 2),
             "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
             "device": device.type, "dtype": "nf4" if cfg.method == "qlora" else str(dtype).replace("torch.", ""),
             "trl": {"version": require_trl().__version__, "gradient_checkpointing": trainer.args.gradient_checkpointing,
                     "rows_per_step": args.rows_per_step, "packed_rows": len(trainer.train_dataset),
                     "padding_free": trainer.args.padding_free, "use_liger_kernel": trainer.args.use_liger_kernel,
                     "samples_given": len(records), "completion_only_loss": trainer.completion_only_loss}}
    return steps, extra


def parser():
    p = runner_parser(__doc__.splitlines()[0])
    p.add_argument("--rows-per-step", type=int, default=1, help="packed rows of max_length tokens per optimizer step")
    p.add_argument("--no-gradient-checkpointing", dest="trl_checkpointing", action="store_false",
                   help="turn TRL's default gradient checkpointing off")
    p.add_argument("--padding-free", action="store_true", help="SFTConfig(padding_free=True): one flattened row per batch")
    p.add_argument("--liger-kernel", action="store_true",
                   help="SFTConfig(use_liger_kernel=True): Liger's fused kernels (needs liger-kernel and a GPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main("trl", train_trl, __doc__.splitlines()[0], STARTED, argv, parser=parser())


if __name__ == "__main__":
    sys.exit(main())
