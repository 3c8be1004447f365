"""Where the time of one training step goes: the workbench's step against the baseline's, by kind of work.

    .venv/bin/python benchmarks/profile_step.py [--config smollm2_135m_lora_identity_mixed_cpu --batch-size 4]

Loads the model once, builds the same B samples three ways and profiles one
forward + backward of each with torch.profiler (after two warm-up steps; each
is profiled --repeats times, alternating, and the fastest is kept):

* workbench: one packed row, per-conversation attention, fast LoRA dropout,
  the lean LoRA forward, logits only where the next token is trained (the
  default training path);
* workbench, plain path: the same row with `fast_path: false` (transformers'
  masked SDPA over the whole row, peft's dropout and LoRA forward);
* baseline: the samples padded to the longest (DataCollatorForSeq2Seq), logits
  and loss at every position, as the Trainer script computes them.

The operator times are summed into kinds of work (the base weights' matmuls,
LoRA's rank-r matmuls, the output head, attention, dropout, softmax and
cross-entropy, the rest) and printed as a table with milliseconds and shares,
plus the top operators of each step. This is the measurement behind the fast
path (workbench/fastpath/cpu.py) and the "where the time goes" section of
benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("matmul: base weights", "matmul: LoRA (rank r)", "matmul: output head", "attention", "dropout",
         "softmax + cross-entropy", "everything else")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}
DROPOUT = {"aten::bernoulli_", "aten::native_dropout",  # torch's dropout; FastDropout's draws and zeroing:
           "aten::uniform_", "aten::log1p_", "aten::floor_", "aten::cumsum_", "aten::searchsorted",
           "aten::_index_put_impl_", "_DropAt", "_DropAtBackward", "_DroppedLinear", "_DroppedLinearBackward"}
SOFTMAX = {"aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward", "aten::nll_loss_backward",
           "_CrossEntropySum", "_CrossEntropySumBackward"}


def kind_of(name: str, shapes, rank: int, vocab: int) -> str:
    dims = {d for shape in shapes if shape for d in shape}
    if name in MATMULS:
        if vocab in dims:
            return "matmul: output head"
        return "matmul: LoRA (rank r)" if rank in dims else "matmul: base weights"
    if name in SOFTMAX or vocab in dims:  # any other pass over the (tokens x vocabulary) logits
        return "softmax + cross-entropy"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in DROPOUT:
        return "dropout"
    return "everything else"


def profile(fn, rank: int, vocab: int) -> tuple[dict, float, list]:
    """Self CPU milliseconds by kind of work, the total, and the top operators, for one call of fn."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return summarize(prof, rank, vocab)


def summarize(prof, rank: int, vocab: int) -> tuple[dict, float, list]:
    by_kind: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages(group_by_input_shape=True):
        by_kind[kind_of(ev.key, ev.input_shapes, rank, vocab)] += ev.self_cpu_time_total / 1e3
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return dict(by_kind), sum(by_kind.values()), [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in top]


def steps(cfg, batch_size: int, step: int):
    """The model (LoRA on the base, fast path switchable) and the three step functions, on the samples of `step`."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from benchmarks.baseline_peft import make_process_func
    from benchmarks.common import sample_stream, with_system
    from benchmarks.run_workbench import stream_rows
    from workbench.fastpath import cpu as fastpath
    from workbench.packing import collate
    from workbench.loss import token_loss_sum
    from workbench.models import build_model

    stream = sample_stream(cfg, batch_size * (step + 1))[batch_size * step:]
    builder, rows = stream_rows(cfg, stream, batch_size)
    tok = builder.tokenizer
    model = build_model(cfg.replace(fast_path=False), torch.device("cpu"))
    model.train()
    drops = [(m.lora_dropout, k, m.lora_dropout[k]) for m in model.modules()
             if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict) for k in m.lora_dropout]
    packed = collate([rows[0]], tok.pad_token_id)
    process = make_process_func(tok, cfg.max_length)
    padded = DataCollatorForSeq2Seq(tokenizer=tok, padding=True)(
        [process({"messages": with_system(s.messages, cfg.system)}) for s in stream])

    def set_fast(on: bool) -> None:
        if on:
            fastpath.enable_packed_attention(model)
            fastpath.use_fast_lora_dropout(model)
            fastpath.use_lean_lora_forward(model)
            fastpath.use_fused_loss(model)
        else:
            fastpath.disable_packed_attention(model)
            fastpath.use_peft_lora_forward(model)
            fastpath.stop_fused_loss(model)
            for d, k, plain in drops:
                d[k] = plain

    def workbench(fast: bool):
        def run():
            set_fast(fast)
            token_loss_sum(model, packed).backward()
        return run

    def baseline():
        set_fast(False)
        model(**padded).loss.backward()

    sizes = {"workbench": (packed["input_ids"].numel(), packed["input_ids"].numel()),
             "baseline": (int(padded["attention_mask"].sum()), padded["input_ids"].numel())}
    return model, {"workbench": workbench(True), "workbench, plain path": workbench(False), "baseline": baseline}, sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="smollm2_135m_lora_identity_mixed_cpu", help="recipe name or config YAML")
    p.add_argument("--model", default=None, help="override the base model (e.g. embedded:tiny-random)")
    p.add_argument("--batch-size", type=int, default=4, help="samples in the step")
    p.add_argument("--step", type=int, default=1, help="which step of the benchmark's sample stream (0 is the first)")
    p.add_argument("--repeats", type=int, default=3,
                   help="profile each step this many times, alternating, and keep the fastest (a shared CPU is noisy)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args(argv)

    from benchmarks.common import bench_config, set_threads

    set_threads(args.threads)
    cfg = bench_config(args.config, args.model, "lora", 1)
    model, fns, sizes = steps(cfg, args.batch_size, args.step)
    vocab = model.get_output_embeddings().weight.shape[0]
    for fn in fns.values():  # warm-up: allocation, kernel choice
        fn(), fn()
    results: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            r = profile(fn, cfg.lora_r, vocab)
            if name not in results or r[1] < results[name][1]:
                results[name] = r

    real, computed = sizes["baseline"]
    print(f"\n{cfg.name}, {args.batch_size} samples: {sizes['workbench'][0]} real tokens "
          f"(baseline computes {computed}, {1 - real / computed:.0%} padding)\n")
    names = list(results)
    print("| kind of work | " + " | ".join(f"{n} ms (share)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for kind in KINDS:
        cells = [f"{r[0].get(kind, 0.0):.0f} ({r[0].get(kind, 0.0) / r[1]:.0%})" for r in results.values()]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(f"**{r[1]:.0f}**" for r in results.values()) + " |")
    for name, (_, _, top) in results.items():
        print(f"\ntop operators, {name}: " + "; ".join(f"{k} {ms:.0f} ms x{n}" for k, ms, n in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
