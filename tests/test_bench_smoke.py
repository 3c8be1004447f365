"""Smoke test of the benchmark (benchmarks/): the whole of `make bench` on the tiny random model, in seconds.

2 steps, 1 repeat, both data sets (the mixed one with a small stand-in for the
general conversations, so the test does not depend on data/general_conversations.jsonl),
LoRA and QLoRA. Checks that RESULTS.md and results.json have the expected rows
and columns, that the numbers are sane, and that both sides trained exactly the
same samples and tokens at every step.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"
STEPS = 2


def general_conversations(path: Path, n: int = 24) -> Path:
    """Short and long answers, as in the real general data (where padding waste comes from)."""
    words = "the quick brown fox jumps over the lazy dog while a small bird sings".split()
    records = [{"conversation": [{"input": f"Question number {i}: tell me something.",
                                  "output": " ".join(words[j % len(words)] for j in range(3 + (i * 37) % 150))}]}
               for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    mixed = yaml.safe_load((ROOT / "workbench" / "recipes" / "smollm2_135m_lora_identity_mixed_cpu.yaml").read_text())
    mixed["datasets"][1]["path"] = str(general_conversations(tmp / "general.jsonl"))
    (tmp / "mixed.yaml").write_text(yaml.safe_dump(mixed), encoding="utf-8")
    out = tmp / "results"
    cmd = [sys.executable, str(BENCH), "--model", "embedded:tiny-random", "--steps", str(STEPS), "--repeats", "1",
           "--qlora-steps", str(STEPS), "--datasets", f"mixed={tmp / 'mixed.yaml'},tutorial", "--methods", "lora,qlora",
           "--threads", "1", "--matmul-seconds", "0.2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def report(bench_out):
    return json.loads((bench_out / "results.json").read_text(encoding="utf-8"))


def test_results_markdown_has_rows_and_columns(bench_out):
    md = (bench_out / "RESULTS.md").read_text(encoding="utf-8")
    for heading in ("## Targets", "### mixed", "### tutorial", "## Base model memory: LoRA vs QLoRA", "## Settings", "## Machine"):
        assert heading in md
    for column in ("real tokens/s", "s/step", "samples/step", "real tokens/step", "computed tokens/step",
                   "time to loss < 0.7", "final loss", "peak RSS MiB", "achieved GFLOP/s", "base model in memory MiB"):
        assert column in md
    assert md.count("| workbench |") >= 3 and md.count("| baseline |") >= 3
    assert md.count("| baseline, no checkpointing |") >= 1 and "## Sides" in md
    assert "workbench / baseline real tokens/s" in md and "Against the reference" in md
    assert "benchmarks/bench.py --model embedded:tiny-random --steps 2" in md
    assert "CPU" in md and "torch threads" in md


def test_every_run_is_there_and_sane(report):
    jobs = [(r["job"]["dataset"], r["job"]["method"], r["job"]["side"]) for r in report["runs"]]
    assert jobs == [("mixed", "lora", "workbench"), ("mixed", "lora", "baseline"), ("mixed", "lora", "baseline_no_ckpt"),
                    ("tutorial", "lora", "workbench"), ("tutorial", "lora", "baseline"),
                    ("mixed", "qlora", "workbench"), ("mixed", "qlora", "baseline")]
    for run in report["runs"]:
        s = run["summary"]
        assert len(run["steps_log"]) == STEPS
        assert s["tokens_per_s"] > 0 and s["step_time_s"] > 0 and math.isfinite(s["final_loss"])
        assert s["samples_per_step"] == 4 and 0 < s["tokens_per_step"] <= s["positions_per_step"]
        assert 100 < run["peak_rss_mib"] < 20_000 and run["base_model_bytes"] > 0 and run["trainable_params"] > 0
    assert report["matmul"]["gflops"] > 0 and report["flops"]["flops_per_token"] > 0
    assert set(report["summary"]) == {"mixed/lora", "tutorial/lora", "mixed/qlora"}
    check_targets(report)


def check_targets(report):
    """Each target's `met` follows from the summary's numbers, and `measured` shows them."""
    from benchmarks.bench import TARGET_MATMUL_SHARE, TARGET_SPEEDUP

    main = report["summary"]["mixed/lora"]
    speed, loss, share = main["ratio"]["tokens_per_s"], main["loss"], main["sides"]["workbench"]["matmul_share"]
    assert loss["difference"] == pytest.approx(loss["workbench"] - loss["baseline"])
    assert loss["workbench"] == main["sides"]["workbench"]["final_loss"]
    speed_t, loss_t, share_t = report["targets"]
    assert speed_t["met"] is (speed >= TARGET_SPEEDUP) and speed_t["measured"] == f"{speed:.2f}x"
    assert loss_t["met"] is (abs(loss["difference"]) <= 2 * loss["noise"]) and f"{loss['workbench']:.4f}" in loss_t["measured"]
    assert share_t["met"] is (share >= TARGET_MATMUL_SHARE) and share_t["measured"] == f"{share:.1%}"


def test_both_sides_train_the_same_samples_and_tokens(report):
    """Same samples per step, same real and trained tokens at every step; only the baseline pads."""
    runs = {(r["job"]["dataset"], r["job"]["method"], r["job"]["side"]): r for r in report["runs"]}
    for dataset, method in (("mixed", "lora"), ("tutorial", "lora"), ("mixed", "qlora")):
        wb, base = runs[dataset, method, "workbench"], runs[dataset, method, "baseline"]
        for a, b in zip(wb["steps_log"], base["steps_log"]):
            assert (a["samples"], a["tokens"], a["trained_tokens"]) == (b["samples"], b["tokens"], b["trained_tokens"])
            assert a["positions"] == a["tokens"] <= b["positions"]
        assert wb["steps_log"][0]["loss"] == pytest.approx(base["steps_log"][0]["loss"], rel=1e-4)
        assert wb["trainable_params"] == base["trainable_params"], (dataset, method)  # the same LoRA on both sides
    ref, base = runs["mixed", "lora", "baseline_no_ckpt"], runs["mixed", "lora", "baseline"]
    for a, b in zip(ref["steps_log"], base["steps_log"]):  # checkpointing recomputes, it does not change the maths
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert ref["trainable_params"] == base["trainable_params"]
    mixed = runs["mixed", "lora", "baseline"]["summary"]
    assert mixed["padding_share"] > 0.05  # varied lengths: the baseline computes padding


def test_qlora_base_is_smaller(report):
    s = report["summary"]
    for side in ("workbench", "baseline"):
        assert s["mixed/qlora"]["sides"][side]["base_model_mib"] < s["mixed/lora"]["sides"][side]["base_model_mib"]


def test_profile_step_prints_where_the_time_goes():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--model", "embedded:tiny-random",
           "--config", "smollm2_135m_lora_identity_tutorial", "--repeats", "1", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for row in ("| matmul: base weights |", "| matmul: LoRA (rank r) |", "| matmul: output head |", "| attention |",
                "| dropout |", "| softmax + cross-entropy |", "| **total** |"):
        assert row in out
    assert "workbench, plain path ms (share)" in out and "top operators, baseline" in out
