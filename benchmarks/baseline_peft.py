"""The baseline: the plain PEFT + transformers Trainer script of seed tutorial 03, in this process, measured.

    .venv/bin/python benchmarks/baseline_peft.py --config smollm2_135m_lora_identity_mixed_cpu --steps 12 --out base.json

This is what a user writes without the workbench, following the tutorial's
"PEFT QLoRA" part step by step:

1. the data as a `datasets.Dataset`, tokenised one sample at a time with
   `Dataset.map(process_func)`: the prompt and the answer are tokenised
   separately and concatenated, the prompt's labels are -100, and the sample
   is cut at MAX_LENGTH;
2. the model with `AutoModelForCausalLM.from_pretrained` (in 4-bit NF4 with
   double quantisation for QLoRA, then `prepare_model_for_kbit_training`);
3. `LoraConfig` + `get_peft_model`;
4. `TrainingArguments` + `Trainer` with `DataCollatorForSeq2Seq(padding=True)`,
   which pads every batch to its longest sample: no packing.

Kept equal to the workbench run, so that the two train the same thing: the
prompt text is the model's chat template with the config's system prompt (the
tutorial hand-writes InternLM's template; the answer includes the template's
end-of-turn token, as the tutorial appends one); LoRA r, alpha, dropout and
target modules; AdamW with the same lr, betas, weight decay, schedule, warmup
and clipping; the seed; the samples and their order (`train_sampling_strategy=
"sequential"` over `common.sample_stream`; each step trains the next B
samples); no gradient checkpointing and no gradient accumulation (the tutorial
uses both to save GPU memory; both slow a step down and would blur the
comparison; `--gradient-checkpointing` and `--micro-batch-size` turn them on, as
`make bench-gpu` does to fit 16k tokens a step into GPU memory). The benchmark's only additions are observers: a callback that
timestamps the end of every step and a wrapper that counts the real and padded
tokens of every batch the collator builds.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()

import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (step_record, with_system, run_main, runner_parser)  # noqa: E402

IGNORE = -100


# ---------------------------------------------------------------------------
# Data (tutorial step 2)
# ---------------------------------------------------------------------------
def make_process_func(tokenizer, max_length: int):
    """The tutorial's per-sample tokenisation, with the chat template instead of a hand-written one."""

    def process_func(example):
        messages = example["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        instruction = tokenizer(prompt, add_special_tokens=False)
        response = tokenizer(full[len(prompt):], add_special_tokens=False)  # the answer and the end-of-turn token
        input_ids = instruction["input_ids"] + response["input_ids"]
        attention_mask = instruction["attention_mask"] + response["attention_mask"]
        labels = [IGNORE] * len(instruction["input_ids"]) + response["input_ids"]
        return {"input_ids": input_ids[:max_length], "attention_mask": attention_mask[:max_length],
                "labels": labels[:max_length]}

    return process_func


def tokenized_dataset(stream: list, tokenizer, system: str, max_length: int):
    from datasets import Dataset

    ds = Dataset.from_list([{"messages": with_system(s.messages, system)} for s in stream])
    return ds.map(make_process_func(tokenizer, max_length), remove_columns=ds.column_names)


class CountingCollator:
    """A collator (DataCollatorForSeq2Seq here, TRL's padding-free one in baseline_trl.py), counting the real,
    computed and trained tokens and the samples of each batch it builds, in order (packed rows: position 0 starts a sample)."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[dict] = []

    def __call__(self, features):
        batch = self.collator(features)
        pos = batch.get("position_ids")
        samples = int((pos == 0).sum()) if pos is not None else len(features)
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        self.batches.append({"tokens": tokens, "positions": batch["input_ids"].numel(),
                             "trained_tokens": int((batch["labels"][:, 1:] != IGNORE).sum()), "samples": samples})
        return batch


# ---------------------------------------------------------------------------
# Model (tutorial step 3)
# ---------------------------------------------------------------------------
def load_base_model(path: str, method: str, dtype, device, checkpointing: bool = False):
    """The base model (4-bit NF4 for QLoRA) and its memory footprint in bytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0 if device.type == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    base_bytes = model.get_memory_footprint()  # the base as loaded, before any LoRA weight
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if checkpointing:
        model.enable_input_require_grads()  # as the tutorial does, for checkpointing through a frozen embedding
    return model, base_bytes


def add_lora(model, cfg):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=cfg.lora_target_modules, r=cfg.lora_r,
                        lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none")
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------
# Training (tutorial step 4)
# ---------------------------------------------------------------------------
def training_arguments(cfg, args, out_dir: str, device, dtype):
    import torch
    from transformers import TrainingArguments

    half = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size // accumulation(args),
        gradient_accumulation_steps=accumulation(args),
        max_steps=args.steps, learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=int(round(cfg.warmup_ratio * args.steps)), weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1], max_grad_norm=cfg.max_norm, seed=cfg.seed,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=device.type == "cpu",
        bf16=half and dtype == torch.bfloat16, fp16=half and dtype == torch.float16,
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=cfg.gradient_checkpointing)


def step_timer():
    """A callback that records when the epoch starts and when every optimizer step ends."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start: float | None = None
            self.ends: list[float] = []

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    return StepTimer()


def accumulation(args) -> int:
    """Micro-batches a step: --micro-batch-size splits a step's samples (as the tutorial does to fit GPU memory)."""
    micro = getattr(args, "micro_batch_size", None) or args.batch_size
    if args.batch_size % micro:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size {micro}")
    return args.batch_size // micro


def per_step(batches: list[dict], n: int) -> list[dict]:
    """The collator's batches summed n at a time (one optimizer step of n micro-batches)."""
    return [{k: sum(b[k] for b in batches[i:i + n]) for k in batches[i]} for i in range(0, len(batches) - n + 1, n)]


def step_records(losses: list[float], batches: list[dict], timer) -> list[dict]:
    starts = [timer.start, *timer.ends[:-1]]
    return [step_record(i + 1, loss, b["tokens"], b["positions"], b["trained_tokens"], b["samples"], end - start)
            for i, (loss, b, start, end) in enumerate(zip(losses, batches, starts, timer.ends))]


def train_baseline(cfg, args, stream: list) -> tuple[list[dict], dict]:
    """Tokenise, load, add LoRA, train with Trainer; per-step records and the side's extra measurements."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, set_seed

    from workbench.models import pick_device, pick_dtype, resolve_model_path

    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.torch_dtype, device)
    path = resolve_model_path(cfg.pretrained_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = tokenized_dataset(stream, tokenizer, cfg.system, cfg.max_length)
    model, base_bytes = load_base_model(path, cfg.method, dtype, device, cfg.gradient_checkpointing)
    model = add_lora(model, cfg)
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True))
    timer = step_timer()
    with tempfile.TemporaryDirectory(prefix="bench-base-") as tmp:
        trainer = Trainer(model=model, args=training_arguments(cfg, args, tmp, device, dtype), train_dataset=dataset,
                          data_collator=collator, callbacks=[timer])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]
    steps = step_records(losses, per_step(collator.batches, accumulation(args))[:args.steps], timer)
    extra = {"base_model_bytes": base_bytes, "setup_s": round(timer.start - STARTED, 2),
             "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "device": device.type, "dtype": "nf4" if cfg.method == "qlora" else str(dtype).replace("torch.", "")}
    return steps, extra


def parser():
    p = runner_parser(__doc__.splitlines()[0])
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="samples a forward pass (default: the whole step); the step's samples in several micro-batches "
                        "with gradient accumulation, as the tutorial fits GPU memory")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main("baseline", train_baseline, __doc__.splitlines()[0], STARTED, argv, parser=parser())


if __name__ == "__main__":
    sys.exit(main())
