"""One run of the workbench's default training path in this process, measured.

    .venv/bin/python benchmarks/run_workbench.py --config smollm2_135m_lora_identity_mixed_cpu --steps 12 --out wb.json

It calls `workbench.train.train` in a temporary work dir (no evaluation, one
checkpoint at the end) with two kinds of benchmark-only hooks:

* the data: step s trains exactly the B samples the baseline's step s trains
  (`common.sample_stream`), encoded by the workbench's prompt builder with the
  config's max_length and packed into one row (position_ids restart at every
  sample, so no token attends across samples and nothing is padded). The rows
  are placed so that the run's seeded data order (`workbench.packing.StepPlan`)
  visits them in step order. This replaces only `prepare_data`, which would
  otherwise read, shuffle and pack the whole data set.
* observers, which change nothing: the base model's memory footprint as loaded
  (`model.get_memory_footprint()`) and the number of trainable parameters.

Everything else is the workbench's own code, unchanged: the model with LoRA or
QLoRA, accelerate, the loop (collate, `token_loss_sum` with `logits_to_keep`,
clipping, AdamW, the scheduler) and metrics.jsonl, whose per-step `tokens`
(real tokens) and `loss` this script reads through `train`'s `on_log`.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()

import contextlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (step_record, run_main)  # noqa: E402


# ---------------------------------------------------------------------------
# The rows: the baseline's steps, one packed row each, in the run's data order
# ---------------------------------------------------------------------------
def stream_rows(cfg, stream: list, batch_size: int):
    """(tokenizer, builder, rows by step): every B consecutive samples of the stream packed into one row."""
    from workbench.encoding import encode_samples
    from workbench.models import load_tokenizer
    from workbench.prompt import builder_for

    tokenizer = load_tokenizer(cfg.pretrained_model_name_or_path, cfg.trust_remote_code, cfg.chat_template)
    builder = builder_for(cfg, tokenizer)
    encoded, report = encode_samples(stream, builder, cfg.max_length, cfg.loss_on)
    if report.n_dropped:
        raise ValueError(f"{report.n_dropped} samples have nothing to train after truncation to max_length "
                         f"{cfg.max_length}; the two sides would not train the same samples")
    return tokenizer, builder, [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]


def in_plan_order(rows: list, seed: int) -> list:
    """The rows placed so that StepPlan (one row per step, this seed) trains rows[s] at step s."""
    from workbench.packing import StepPlan

    plan = StepPlan(len(rows), 1, 1, 1, seed, max_steps=len(rows))
    placed = [None] * len(rows)
    for s, row in enumerate(rows):
        (index,) = plan.step_rows(s)
        placed[index] = row
    return placed


@contextlib.contextmanager
def hooks(stream: list, batch_size: int, seen: dict):
    """Replace train()'s data preparation by the stream's rows; observe the base model and the trained model."""
    import workbench.models
    import workbench.train

    load_model, build_model = workbench.models.load_model, workbench.train.build_model

    def prepare_data(cfg, work, is_main):
        tokenizer, builder, rows = stream_rows(cfg, stream, batch_size)
        seen["rows"] = rows
        return tokenizer, builder, in_plan_order(rows, cfg.seed)

    def observed_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        seen["base_model_bytes"] = model.get_memory_footprint()
        return model

    def observed_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        seen["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model

    with mock.patch.object(workbench.train, "prepare_data", prepare_data), \
            mock.patch.object(workbench.models, "load_model", observed_load_model), \
            mock.patch.object(workbench.train, "build_model", observed_build_model):
        yield


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
def step_records(log: list[tuple[float, dict]], rows: list) -> list[dict]:
    """Per-step records from metrics lines and the times train() reported them.

    Step 1 takes the loop's own measure of it (it starts after setup); every
    later step is the time between two metrics lines, as the baseline's steps
    are the time between two step ends.
    """
    from workbench.packing import row_length

    out, prev = [], None
    for (t, rec), row in zip(log, rows):
        if rec["tokens"] != row_length(row):
            raise RuntimeError(f"step {rec['step']} trained {rec['tokens']} tokens, its row has {row_length(row)}: "
                               "the data order is not the stream's")
        dt = rec["tokens"] / rec["tokens_per_s"] if prev is None else t - prev
        out.append(step_record(rec["step"], rec["loss"], rec["tokens"], row_length(row), rec["trained_tokens"],
                               len(row), dt))
        prev = t
    return out


def train_workbench(cfg, args, stream: list) -> tuple[list[dict], dict]:
    from workbench.models import pick_device, pick_dtype
    from workbench.train import train

    seen: dict = {}
    log: list[tuple[float, dict]] = []
    with tempfile.TemporaryDirectory(prefix="bench-wb-") as tmp, hooks(stream, args.batch_size, seen):
        train(cfg, work_dir=Path(tmp) / "work", on_log=lambda rec: log.append((time.perf_counter(), rec)),
              progress=False)
    steps = step_records(log, seen["rows"])
    device = pick_device(cfg.device)
    dtype = "nf4" if cfg.method == "qlora" else str(pick_dtype(cfg.torch_dtype, device)).replace("torch.", "")
    first_start = log[0][0] - steps[0]["time_s"]
    extra = {"base_model_bytes": seen.get("base_model_bytes"), "trainable_params": seen.get("trainable_params"),
             "setup_s": round(first_start - STARTED, 2), "device": device.type, "dtype": dtype}
    return steps, extra


def main(argv: list[str] | None = None) -> int:
    return run_main("workbench", train_workbench, __doc__.splitlines()[0], STARTED, argv)


if __name__ == "__main__":
    sys.exit(main())
