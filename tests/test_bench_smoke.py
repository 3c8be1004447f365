"""Smoke test of the benchmark (benchmarks/): the whole of `make bench` on the tiny random model, in seconds.

2 steps, 1 repeat, both data sets (the mixed one with a small stand-in for the
general conversations, so the test does not depend on data/general_conversations.jsonl),
LoRA and QLoRA, and TRL's SFTTrainer on the mixed one when trl is installed
(benchmarks/requirements.txt; else those checks are skipped with a message and
the run uses --no-trl). Checks that RESULTS.md and results.json have the
expected rows and columns, that the numbers are sane, and that the workbench and
the PEFT baseline trained exactly the same samples and tokens at every step.
"""
import importlib.util
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
HAVE_TRL = importlib.util.find_spec("trl") is not None
NO_TRL = "trl is not installed (pip install -r benchmarks/requirements.txt): the TRL side is not smoke-tested"


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
           "--reference-repeats", "1", "--qlora-steps", str(STEPS), "--datasets", f"mixed={tmp / 'mixed.yaml'},tutorial", "--methods", "lora,qlora",
           "--threads", "1", "--matmul-seconds", "0.2", "--out", str(out)] + ([] if HAVE_TRL else ["--no-trl"])
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
    assert md.count("| workbench |") >= 3 and md.count("| PEFT baseline |") >= 3
    assert md.count("| PEFT baseline, no checkpointing |") >= 1 and "## Sides" in md and "## Headline" in md
    assert "- workbench / PEFT baseline" in md and "loss at equal tokens seen" in md and "| loss at equal tokens |" in md
    if HAVE_TRL:
        assert md.count("| TRL SFTTrainer |") >= 1 and md.count("| TRL SFTTrainer, no checkpointing |") >= 1
        assert "- workbench / TRL SFTTrainer" in md and "TRL 1.16.0" in md
    assert "benchmarks/bench.py --model embedded:tiny-random --steps 2" in md
    assert "CPU" in md and "torch threads" in md


def test_every_run_is_there_and_sane(report):
    jobs = [(r["job"]["dataset"], r["job"]["method"], r["job"]["side"]) for r in report["runs"]]
    trl = [("mixed", "lora", "trl"), ("mixed", "lora", "trl_no_ckpt")] if HAVE_TRL else []
    assert jobs == [("mixed", "lora", "workbench"), ("mixed", "lora", "baseline"), ("mixed", "lora", "baseline_no_ckpt"),
                    *trl, ("tutorial", "lora", "workbench"), ("tutorial", "lora", "baseline"),
                    ("mixed", "qlora", "workbench"), ("mixed", "qlora", "baseline")]
    for run in report["runs"]:
        s = run["summary"]
        assert len(run["steps_log"]) == STEPS
        assert s["tokens_per_s"] > 0 and s["step_time_s"] > 0 and math.isfinite(s["final_loss"])
        assert 0 < s["tokens_per_step"] <= s["positions_per_step"]
        assert s["samples_per_step"] == 4 or run["side"] == "trl"
        assert 100 < run["peak_rss_mib"] < 20_000 and run["base_model_bytes"] > 0 and run["trainable_params"] > 0
    assert report["matmul"]["gflops"] > 0 and report["flops"]["flops_per_token"] > 0
    assert set(report["summary"]) == {"mixed/lora", "tutorial/lora", "mixed/qlora"}
    check_targets(report)


def check_targets(report):
    """Each target's `met` follows from the summary's numbers, and `measured` shows them."""
    from benchmarks.summary import TARGET_MATMUL_SHARE, TARGET_SPEEDUP, TARGET_STRONGEST

    main = report["summary"]["mixed/lora"]
    speed, loss, share = main["ratio"]["tokens_per_s"], main["loss"], main["sides"]["workbench"]["matmul_share"]
    assert loss["difference"] == pytest.approx(loss["workbench"] - loss["baseline"])
    assert loss["workbench"] == main["sides"]["workbench"]["final_loss"]
    speed_t, loss_t, best_t, best_loss_t, share_t = report["targets"]
    assert speed_t["met"] is (speed >= TARGET_SPEEDUP) and speed_t["measured"] == f"{speed:.2f}x"
    assert loss_t["met"] is (abs(loss["difference"]) <= 2 * loss["noise"]) and f"{loss['workbench']:.4f}" in loss_t["measured"]
    best = main["strongest"]
    best_speed = main["ratios"][best]["tokens_per_s"]
    assert best_t["met"] is (best_speed >= TARGET_STRONGEST) and best_t["measured"] == f"{best_speed:.2f}x"
    assert main["sides"][best]["tokens_per_s"] == max(s["tokens_per_s"] for k, s in main["sides"].items() if k != "workbench")
    assert best_loss_t["met"] is main["losses_at_tokens"][best]["within_noise"]
    assert share_t["met"] is (share >= TARGET_MATMUL_SHARE) and share_t["measured"] == f"{share:.1%}"


def test_loss_at_equal_tokens_reads_every_curve_on_one_grid(report):
    from benchmarks.summary import interpolate, loss_curve

    runs = {(r["job"]["dataset"], r["job"]["method"], r["job"]["side"]): r for r in report["runs"]}
    for side, cmp in report["summary"]["mixed/lora"]["losses_at_tokens"].items():
        wb, base = loss_curve(runs["mixed", "lora", "workbench"]["steps_log"]), loss_curve(runs["mixed", "lora", side]["steps_log"])
        assert cmp["tokens"] == sorted(cmp["tokens"]) and cmp["tokens"][-1] <= min(wb[-1][0], base[-1][0])
        assert cmp["workbench_curve"] == pytest.approx([interpolate(wb, x) for x in cmp["tokens"]])
        assert cmp["baseline_curve"] == pytest.approx([interpolate(base, x) for x in cmp["tokens"]])
        assert cmp["difference"] == pytest.approx(cmp["workbench"] - cmp["baseline"]) and cmp["noise"] >= 0.01


def test_trl_side_packs_and_trains_the_completion_only(report):
    if not HAVE_TRL:
        pytest.skip(NO_TRL)
    runs = {r["job"]["side"]: r for r in report["runs"] if r["job"]["dataset"] == "mixed" and r["job"]["method"] == "lora"}
    for side, checkpointing in (("trl", True), ("trl_no_ckpt", False)):
        run = runs[side]
        assert run["trl"]["version"] == "1.16.0" and run["trl"]["gradient_checkpointing"] is checkpointing
        assert run["trl"]["completion_only_loss"] is True and run["trl"]["packed_rows"] >= STEPS
        for step in run["steps_log"]:
            assert step["positions"] == step["tokens"] <= run["max_length"]  # packed, padding-free, one row
            assert 0 < step["trained_tokens"] < step["tokens"] and step["samples"] >= 1
        assert run["trainable_params"] == runs["workbench"]["trainable_params"]  # the same LoRA
    for a, b in zip(runs["trl"]["steps_log"], runs["trl_no_ckpt"]["steps_log"]):  # checkpointing does not change the maths
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_bench_refuses_clearly_without_trl(tmp_path):
    """Where trl is missing, the benchmark says how to install it (or --no-trl) before any run starts."""
    if HAVE_TRL:
        pytest.skip("trl is installed here; the refusal is for an environment without it")
    proc = subprocess.run([sys.executable, str(BENCH), "--model", "embedded:tiny-random", "--datasets", "tutorial",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "benchmarks/requirements.txt" in proc.stderr and "--no-trl" in proc.stderr


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


def test_bench_config_trains_the_cross_entropy_alone(tmp_path):
    """The sides compared (PEFT's and TRL's trainers) train on the cross-entropy alone: the workbench side runs the
    mixed recipe without its distillation and unlikelihood terms."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.common import bench_config
    finally:
        sys.path.remove(str(ROOT))
    cfg = bench_config("smollm2_135m_lora_identity_mixed_cpu")
    assert cfg.distill_weight == 0.0 and cfg.unlikelihood_weight == 0.0
    recipe = (ROOT / "workbench/recipes/smollm2_135m_lora_identity_mixed_cpu.yaml").read_text(encoding="utf-8")
    (tmp_path / "twins.yaml").write_text(recipe + "negative_weight: 2.0\n", encoding="utf-8")
    twins = bench_config(str(tmp_path / "twins.yaml"))
    assert twins.negative_weight == 0.0 and twins.validate().unlikelihood_weight == 0.0, "no negative twins either"
