"""The `workbench` command, in-process through cli.main (and the console script through a subprocess)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.config import RECIPES_DIR, list_recipes, load_config, load_recipe
from workbench.io import read_jsonl
from workbench.readers import read_records

ROOT = Path(__file__).resolve().parents[1]
WORKBENCH = ROOT / ".venv" / "bin" / "workbench"
TINY_RECIPE = RECIPES_DIR / "smollm2_135m_tiny_smoke.yaml"

VERBS = [["list-cfg"], ["copy-cfg"], ["show-cfg"], ["gen-data"], ["check-dataset"], ["log-dataset"], ["train"],
         ["convert"], ["convert", "pth_to_hf"], ["convert", "merge"], ["convert", "gguf"], ["chat"], ["prepare-model"], ["lab"]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(capsys, *argv) -> tuple[int, str, str]:
    """cli.main in-process: (exit status, stdout, stderr); a Traceback must never reach the user."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def file_state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# ---------------------------------------------------------------------------
# Help and configs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_help_works_for_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*verb, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: workbench {' '.join(verb)}")


def test_no_command_prints_help(capsys):
    rc, out, _ = run(capsys)
    assert rc == 0 and "list-cfg" in out and "convert" in out


def test_list_cfg_lists_and_filters_recipes(capsys):
    def listed(out: str) -> set[str]:
        return {line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in everything}

    everything = {name for name, _ in list_recipes()}
    rc, out, _ = run(capsys, "list-cfg")
    assert rc == 0 and listed(out) == everything and "smollm2_135m_tiny_smoke" in everything
    rc, out, _ = run(capsys, "list-cfg", "-p", "qlora")
    assert rc == 0 and listed(out) == {n for n in everything if "qlora" in n} and len(listed(out)) >= 1
    rc, out, _ = run(capsys, "list-cfg", "-p", "no-such-recipe")
    assert rc == 1 and not listed(out)


def test_copy_cfg_writes_once_then_refuses(tmp_path, capsys):
    rc, _, _ = run(capsys, "copy-cfg", "smollm2_135m_tiny_smoke", tmp_path / "cfgs")
    target = tmp_path / "cfgs" / "smollm2_135m_tiny_smoke_copy.yaml"
    assert rc == 0 and load_config(target) == load_recipe("smollm2_135m_tiny_smoke")
    before = file_state(target)
    rc, out, err = run(capsys, "copy-cfg", "smollm2_135m_tiny_smoke", tmp_path / "cfgs")
    assert rc == 2 and err.startswith("error:") and "already exists" in err
    assert file_state(target) == before
    rc, _, err = run(capsys, "copy-cfg", "no_such_recipe", tmp_path / "cfgs")
    assert rc == 2 and err.startswith("error:") and "smollm2_135m_tiny_smoke" in err  # it lists the known ones


def test_show_cfg_applies_cfg_options(capsys, tmp_path):
    rc, out, _ = run(capsys, "show-cfg", TINY_RECIPE, "--cfg-options", "max_steps=7", "lr=0.5")
    assert rc == 0
    (tmp_path / "shown.yaml").write_text(out)
    assert load_config(tmp_path / "shown.yaml") == load_recipe("smollm2_135m_tiny_smoke").replace(max_steps=7, lr=0.5)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
def xtuner_records(path: Path) -> list[dict]:
    return read_jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("style,suffix", [("diverse", ".json"), ("tutorial", ".jsonl")])
def test_gen_data_writes_xtuner_format_and_refuses_to_overwrite(tmp_path, capsys, style, suffix):
    out = tmp_path / f"identity{suffix}"
    rc, _, _ = run(capsys, "gen-data", out, "--name", "Kiki", "--owner", "Sam", "--style", style, "--n-repeat", "2")
    assert rc == 0
    records = xtuner_records(out)
    if style == "tutorial":
        assert len(records) == 2 * (2 + 1)
    assert len(records) > 1
    for rec in records:
        assert set(rec) == {"conversation"} and rec["conversation"]
        for turn in rec["conversation"]:
            assert {"input", "output"} <= set(turn) and turn["input"].strip() and turn["output"].strip()
    assert any("Kiki" in t["output"] for r in records for t in r["conversation"])
    assert any("Sam" in t["output"] for r in records for t in r["conversation"])
    assert len(read_records(out)) == len(records)  # the project's own reader accepts every record (raises otherwise)

    before = file_state(out)
    rc, _, err = run(capsys, "gen-data", out, "--name", "Other", "--style", style, "--n-repeat", "2")
    assert rc == 2 and err.startswith("error:") and str(out) in err
    assert file_state(out) == before
    rc, _, _ = run(capsys, "gen-data", out, "--name", "Other", "--style", style, "--n-repeat", "2", "--overwrite")
    assert rc == 0 and "Other" in out.read_text(encoding="utf-8") and "Kiki" not in out.read_text(encoding="utf-8")


def test_check_dataset(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    assert main(["gen-data", str(good), "--style", "tutorial", "--n-repeat", "1"]) == 0
    rc, out, _ = run(capsys, "check-dataset", good, "--model", "embedded:tiny-random")
    assert rc == 0 and "errors: none" in out

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([
        {"conversation": [{"input": "Who are you?", "output": "I am Nova."}]},
        {"conversation": [{"input": "Who made you?", "output": ""}]},
        {"conversation": [{"input": "Hi", "output": "Hello!"}]},
    ], indent=2), encoding="utf-8")
    before = file_state(bad)
    rc, out, err = run(capsys, "check-dataset", bad, "--model", "embedded:tiny-random")
    assert rc != 0
    problem = [line for line in (out + err).splitlines() if "record 2" in line]
    assert len(problem) == 1 and str(bad) in problem[0] and "conversation[0].output" in problem[0]
    assert "records: 2 read" in out, "the two good records are still checked"
    assert file_state(bad) == before, "check-dataset changes no file"

    # A config: the shipped tiny recipe is fine; one that reads the bad file is not.
    rc, out, _ = run(capsys, "check-dataset", TINY_RECIPE)
    assert rc == 0 and "errors: none" in out
    cfg_path = tmp_path / "bad_cfg.yaml"
    cfg_path.write_text(f"pretrained_model_name_or_path: embedded:tiny-random\ndatasets:\n  - path: {bad}\n", encoding="utf-8")
    rc, out, err = run(capsys, "check-dataset", cfg_path)
    assert rc != 0 and "record 2" in out + err and str(bad) in out + err
    assert file_state(bad) == before


# ---------------------------------------------------------------------------
# The pipeline: train, convert, merge, chat, resume
# ---------------------------------------------------------------------------
def test_pipeline_train_convert_merge_chat_resume(tmp_path, capsys):
    from workbench.chat import GenerationSettings, answer, load_chat_model

    work, hf, merged = tmp_path / "work", tmp_path / "hf", tmp_path / "merged"
    options = ["evaluation_freq=0", "max_length=64"]
    rc, _, _ = run(capsys, "train", TINY_RECIPE, "--work-dir", work, "--cfg-options", "max_steps=2", "save_steps=2", *options)
    assert rc == 0 and (work / "iter_2" / "trainable.safetensors").exists()
    assert [r["step"] for r in read_jsonl(work / "metrics.jsonl")] == [1, 2]

    rc, _, _ = run(capsys, "convert", "pth_to_hf", work / "config.yaml", work / "iter_2", hf)
    assert rc == 0 and (hf / "adapter_config.json").exists() and not list(hf.rglob("optimizer*")) and not list(hf.rglob("rng_*"))

    rc, _, _ = run(capsys, "convert", "merge", "embedded:tiny-random", hf, merged, "--max-shard-size", "5MB")
    assert rc == 0 and (merged / "config.json").exists() and (merged / "model.safetensors.index.json").exists()
    assert len(list(merged.glob("*.safetensors"))) >= 2

    rc, out, _ = run(capsys, "chat", merged, "--prompt", "Who are you?", "--max-new-tokens", "5")
    assert rc == 0 and out.startswith(">>> Who are you?\n")
    model, builder = load_chat_model(str(merged), device="cpu")
    streamed = out[len(">>> Who are you?\n"):]
    assert streamed.strip() == answer(model, builder, "Who are you?", settings=GenerationSettings(5))

    # Known errors: one line, status 2, nothing overwritten.
    before = {p.name: file_state(p) for p in merged.iterdir() if p.is_file()}
    rc, _, err = run(capsys, "convert", "merge", "embedded:tiny-random", hf, merged)
    assert rc == 2 and err.startswith("error:") and "not empty" in err
    assert {p.name: file_state(p) for p in merged.iterdir() if p.is_file()} == before
    rc, _, err = run(capsys, "convert", "pth_to_hf", work / "config.yaml", work, tmp_path / "x")
    assert rc == 2 and err.startswith("error:") and "not a workbench checkpoint" in err
    rc, _, err = run(capsys, "convert", "merge", "embedded:tiny-random", merged, tmp_path / "y")
    assert rc == 2 and err.startswith("error:") and "full model folder" in err

    # A second fresh run into the same work dir is refused; --resume continues it.
    rc, _, err = run(capsys, "train", TINY_RECIPE, "--work-dir", work, "--cfg-options", "max_steps=2", "save_steps=2", *options)
    assert rc == 2 and err.startswith("error:") and "--resume" in err
    assert [r["step"] for r in read_jsonl(work / "metrics.jsonl")] == [1, 2]
    rc, out, _ = run(capsys, "train", TINY_RECIPE, "--work-dir", work, "--resume",
                     "--cfg-options", "max_steps=3", "save_steps=3", *options)
    assert rc == 0 and "resuming from" in out and "step 2" in out
    assert [r["step"] for r in read_jsonl(work / "metrics.jsonl")] == [1, 2, 3]
    assert (work / "last_checkpoint").read_text().strip() == "iter_3" and (work / "iter_3" / "state.json").exists()


# ---------------------------------------------------------------------------
# The console script
# ---------------------------------------------------------------------------
def test_console_script_help():
    proc = subprocess.run([str(WORKBENCH), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: workbench")


def test_console_script_scripted_chat():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(WORKBENCH), "chat", "embedded:tiny-random", "--max-new-tokens", "4", "--device", "cpu"],
                          input="hello\nRESET\nEXIT\n", capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESET" in proc.stdout and "(history cleared)" in proc.stdout
    assert proc.stdout.count(">>> ") == 3 and "Traceback" not in proc.stderr
