"""A run the config cannot make is refused through the CLI with one clear line, exit 2, and no work dir.

Each refusal is checked before the work dir is written (workbench/train.py's
`Trainer.setup`: data, model and LoRA targets come first), so nothing is left
behind to clean up or to be mistaken for a run.
"""
import pytest

from workbench.cli import main

RECIPE = "smollm2_135m_tiny_smoke"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("option,words", [
    ("datasets=[{path: nowhere/data.jsonl}]", "nowhere/data.jsonl"),
    ("pretrained_model_name_or_path=./no/such/model", "./no/such/model"),
    ("lora_target_modules=[q_prj,v_proj]", "'q_prj' matches no module"),
])
def test_refused_config_leaves_no_work_dir(tmp_path, capsys, option, words):
    work = tmp_path / "runs" / "w"
    rc = main(["train", RECIPE, "--work-dir", str(work), "--cfg-options", option, "max_steps=1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and words in err and "Traceback" not in err
    assert not work.exists() and not (tmp_path / "runs").exists()


def test_unmatched_targets_list_the_models_linear_layers(tmp_path, capsys):
    rc = main(["train", RECIPE, "--work-dir", str(tmp_path / "w"), "--cfg-options", "lora_target_modules=[attn]"])
    err = capsys.readouterr().err
    assert rc == 2
    listed = err.split("its linear layers are: ")[1].split(" (or use")[0].split(", ")
    assert listed == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_matching_targets_train(tmp_path, capsys):
    """The check passes every name peft would match (here two of the seven projections)."""
    work = tmp_path / "w"
    rc = main(["train", RECIPE, "--work-dir", str(work), "--cfg-options", "lora_target_modules=[q_proj,v_proj]",
               "max_steps=1", "save_steps=1", "evaluation_freq=0", "max_length=64"])
    assert rc == 0, capsys.readouterr().err
    from safetensors.torch import load_file

    names = load_file(str(work / "iter_1" / "trainable.safetensors"))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
