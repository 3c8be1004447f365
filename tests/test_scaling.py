"""The scaling sweep (benchmarks/scaling.py --quick) on tiny stand-ins: every point, the table, the plot, the estimate.

--quick runs the same code as the real sweep on the tiny random model and tiny
random models of the SmolLM2-360M and Qwen2.5-0.5B architectures (their real
vocabularies), with rows of 32-64 tokens: it checks that each point trains in
its own process, that the outputs have every point with its estimate and
ratios, and that the numbers follow from each other. It measures nothing.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scaling(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaling")
    out = tmp / "results"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--quick", "--threads", "1", "--steps", "1",
           "--matmul-seconds", "0.2", "--models-dir", str(tmp / "models"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "scaling.json").read_text(encoding="utf-8"))


def test_every_point_ran_once_with_its_sweeps(scaling):
    from benchmarks.scaling import QUICK, model_configs, plan

    _, report = scaling
    points = [(r["model"], r["method"], r["max_length"], r["rows"]) for r in report["points"]]
    expected = plan(QUICK)
    assert points == [(p.model, p.method, p.max_length, p.rows) for p in expected]
    assert [r["sweeps"] for r in report["points"]] == list(expected.values())
    assert report["model_configs"] == model_configs(quick=True) and report["quick"] is True
    qwen = next(r for r in report["points"] if r["model"] == "qwen2.5-0.5b" and r["method"] == "lora")
    small = next(r for r in report["points"] if r["model"] == "smollm2-360m" and r["method"] == "lora")
    assert qwen["total_params"] > small["total_params"]  # Qwen's vocabulary of 151,936 makes it the largest


def test_points_are_measured_and_estimated(scaling):
    from benchmarks.scaling import TOLERANCE

    _, report = scaling
    for r in report["points"]:
        m, e, q = r["measured"], r["estimate"], r["ratios"]
        assert m["tokens_per_step"] == r["max_length"] * r["rows"] and m["steps_timed"] == 1
        assert m["tokens_per_s"] > 0 and m["peak_rss_mib"] > 100 and r["base_model_bytes"] > 0
        if m["train_peak_rss_mib"] is not None:  # Linux: the training's own peak, after the model is loaded
            assert 100 < m["train_peak_rss_mib"] <= m["peak_rss_mib"] * 1.02 and m["memory_mib"] == m["train_peak_rss_mib"]
        assert len(r["steps_log"]) == r["warmup"] + r["steps"]
        assert q["time"] == pytest.approx(e["seconds_per_step"] / m["seconds_per_step"])
        assert q["memory"] == pytest.approx(e["memory_gb"] * 1e9 / 2**20 / m["memory_mib"])
        assert r["total_params"] == e["total_params"]  # counted from the config, also for a 4-bit model
        assert r["flags"] == [k for k in ("time", "memory") if abs(q[k] - 1) > TOLERANCE]
    lora = {r["max_length"]: r for r in report["points"] if "max_length" in r["sweeps"]}
    assert lora[64]["estimate"]["memory_gb"] > lora[32]["estimate"]["memory_gb"]  # the estimate grows with max_length


def test_outputs_have_the_table_and_the_plot(scaling):
    out, report = scaling
    md = (out / "scaling.md").read_text(encoding="utf-8")
    assert "| sweep | model | method | max_length | rows/step | real tokens/s |" in md and "![scaling](scaling.png)" in md
    assert md.count("| smollm2-135m |") == sum(1 for r in report["points"] if r["model"] == "smollm2-135m")
    assert "estimate/measured: time" in md and "--quick" in md
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "scaling-runs").glob("*.json"))) == len(report["points"])


def test_qlora_estimate_keeps_the_embeddings_in_float():
    """NF4 quantises the linear layers only: a model with a large vocabulary keeps its embedding in the compute dtype."""
    from workbench.config import load_recipe
    from workbench.estimate import BYTES_PER_PARAM, param_counts, weight_bytes

    cfg = load_recipe("smollm2_135m_tiny_smoke").replace(method="qlora")
    counts = param_counts(cfg)
    assert 0 < counts["linear"] < counts["total"]
    nf4 = weight_bytes(counts, "nf4", "float32")
    assert nf4 == pytest.approx(counts["linear"] * BYTES_PER_PARAM["nf4"] + (counts["total"] - counts["linear"]) * 4)
    assert nf4 > counts["total"] * BYTES_PER_PARAM["nf4"]
