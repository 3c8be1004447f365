"""XTuner's LoRA adapters of InternLM2 on the Llama model the workbench loads InternLM2 as
(workbench.convert_models.internlm2_adapter): the logits of the adapter attached through the workbench equal the
reference forward of the original InternLM2 weights with the LoRA update merged in by hand."""
import json

import pytest
import torch
from internlm2_helpers import DIMS, cache, source  # noqa: F401 (fixtures)

from workbench.convert_models import internlm2_adapter as IA
from workbench.convert_models.internlm2_check import reference_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")
R, ALPHA = 4, 8
TARGETS = ["wqkv", "wo", "w1", "w2", "w3"]


def xtuner_adapter(folder, base, targets=TARGETS, seed=0, **config):
    """A LoRA adapter as `xtuner convert pth_to_hf --safe-serialization` leaves it: peft's names for InternLM2's modules,
    lora_B not zero (so that it changes the model)."""
    from safetensors.torch import save_file

    src = json.loads((base / "config.json").read_text())
    h, inter, d = src["hidden_size"], src["intermediate_size"], src["hidden_size"] // src["num_attention_heads"]
    rows = {"wqkv": (src["num_attention_heads"] + 2 * src["num_key_value_heads"]) * d, "wo": h, "w1": inter, "w3": inter,
            "w2": h}
    cols = {"wqkv": h, "wo": h, "w1": h, "w3": h, "w2": inter}
    where = {"wqkv": "attention", "wo": "attention", "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(src["num_hidden_layers"]):
        for m in targets:
            p = f"base_model.model.model.layers.{i}.{where[m]}.{m}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(R, cols[m], generator=gen) * 0.2
            tensors[f"{p}.lora_B.weight"] = torch.randn(rows[m], R, generator=gen) * 0.2
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.1, "bias": "none",
           "target_modules": targets, "base_model_name_or_path": str(base), **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder, tensors


def merged_by_hand(base, tensors):
    """The original InternLM2 weights with W + (alpha / r) B A for every LoRA pair: the reference's input."""
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(base.glob("*.safetensors")):
        weights |= load_file(str(f))
    for name, a in tensors.items():
        if ".lora_A." in name:
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            target = name.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            weights[target] = weights[target] + (ALPHA / R) * b @ a
    return weights


@torch.no_grad()
def test_an_xtuner_adapter_of_internlm2_equals_the_update_merged_into_the_original(source, cache, tmp_path):
    from workbench.models import attach_adapter, load_model, load_tokenizer

    adapter, tensors = xtuner_adapter(tmp_path / "hf", source)
    assert IA.is_internlm2_adapter(adapter)
    cached_before = set(cache.glob("internlm2-adapter-*"))  # the cache is the module's: other tests convert too
    model = load_model(str(source), device="cpu", torch_dtype="float32")
    ids = load_tokenizer(str(source))("Who are you? 你是谁？ 123", add_special_tokens=True)["input_ids"]
    before = model(input_ids=torch.tensor([ids])).logits[0]
    tuned = attach_adapter(model, adapter).eval()
    got = tuned(input_ids=torch.tensor([ids])).logits[0]
    src = json.loads((source / "config.json").read_text())
    want = reference_logits(merged_by_hand(source, tensors).__getitem__, src, ids, DIMS["num_hidden_layers"])
    assert (got - before).abs().max() > 0.1, "the adapter changes the model"
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    converted = json.loads((IA.llama_adapter(adapter, 4, 2, 16, cache) / "adapter_config.json").read_text())
    assert converted["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == TARGETS, "the original is untouched"
    assert len(set(cache.glob("internlm2-adapter-*")) - cached_before) == 1, "converted once, then read from the cache"


def test_adapters_of_other_layouts_are_left_alone(tmp_path, source):
    from workbench.models import in_model_layout

    llama, _ = xtuner_adapter(tmp_path / "llama", source, targets=["wo"], target_modules=["q_proj", "o_proj"])
    assert not IA.is_internlm2_adapter(llama)
    assert IA.is_internlm2_adapter(xtuner_adapter(tmp_path / "regex", source, target_modules=r".*\.(wqkv|wo)")[0])

    class Model:  # only the config is read
        config = type("C", (), {"model_type": "qwen2"})()

    assert in_model_layout(Model(), tmp_path / "regex") == tmp_path / "regex", "only a Llama model (converted InternLM2)"


def test_a_tensor_the_converter_does_not_know_is_refused(tmp_path, source):
    from safetensors.torch import save_file

    from workbench.convert_models.internlm2 import InternLM2Error

    adapter, tensors = xtuner_adapter(tmp_path / "hf", source, targets=["wqkv"])
    save_file(tensors | {"base_model.model.output.lora_A.weight": torch.zeros(R, 64)}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(InternLM2Error, match=r"adapter_model.safetensors: tensor 'base_model.model.output.lora_A.weight'"):
        IA.llama_adapter(adapter, 4, 2, 16, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("internlm2-adapter-*")), "nothing half-written is left in the cache"


@torch.no_grad()
def test_workbench_merges_and_chats_with_an_xtuner_adapter_of_internlm2(source, cache, tmp_path, capsys):
    """`workbench convert merge` (and chat, which loads the same way) takes the XTuner adapter as it is."""
    from workbench.cli import main
    from workbench.models import attach_adapter, load_model

    adapter, _ = xtuner_adapter(tmp_path / "hf", source, seed=1)
    assert main(["convert", "merge", str(source), str(adapter), str(tmp_path / "merged")]) == 0
    ids = torch.tensor([[1, 5, 9, 42, 77]])
    merged = load_model(str(tmp_path / "merged"), device="cpu", torch_dtype="float32")
    assert merged.config.model_type == "llama"
    on_base = attach_adapter(load_model(str(source), device="cpu", torch_dtype="float32"), adapter).eval()
    torch.testing.assert_close(merged(input_ids=ids).logits, on_base(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert main(["chat", str(source), "--adapter", str(adapter), "--prompt", "Who are you?", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()


def test_grading_a_class_of_internlm2_homework_leaves_no_copy_per_merged_submission(source, cache, tmp_path):
    """The camp's homework on InternLM2 itself: an XTuner adapter and two merged models in InternLM2's own layout (as
    `xtuner convert merge` leaves them). Each merged one is evaluated through a converted copy; the copy made for
    grading is gone after its row, one converted before (by chat, say) stays, and the base's conversion stays."""
    import shutil

    from workbench.analysis import Probes, load_probes
    from workbench.convert_models.internlm2 import converted_dir
    from workbench.models import prepare_remote_code_folder
    from workbench.report.grade import grade_folder
    from workbench.report.subject import Given

    room = tmp_path / "homework"
    xtuner_adapter(room / "zhangsan", source, seed=2)
    for name in ("lisi_merged", "wangwu_merged"):
        shutil.copytree(source, room / name)
    kept = prepare_remote_code_folder(room / "wangwu_merged")  # wangwu chatted with it before handing it in
    p = load_probes()
    probes = Probes(*({l: q[:1] for l, q in part.items()} for part in (p.identity_seen, p.identity_unseen, p.general, p.facts)))
    table = grade_folder(room, str(source), probes=probes, max_new_tokens=2, progress=False, given=Given(owner_name="张三"))
    assert list(table["status"]) == ["ok", "ok", "ok"], list(table["status"])
    assert list(table["kind"]) == ["merged", "merged", "adapter"]
    assert not converted_dir(room / "lisi_merged", cache)[0].exists(), "the copy made for grading is removed"
    assert kept.exists() and converted_dir(source, cache)[0].exists(), "a copy made before, and the base's, stay"
