"""Exports carry the training prompt: checked with plain transformers and peft in a clean interpreter.

The tiny random model (`embedded:tiny-random`, the embedded tokenizer) is recorded as the local id
`workbench-local/tiny-random`; the embedded model's public id is checked in the slow test.
"""
import json
import shutil

import pytest
import torch

from export_helpers import SYSTEM, make_adapter, run_plain
from workbench.convert import merge
from workbench.hubcache import EMBEDDED_HUB_ID, TINY_HUB_ID, register_snapshot, registered_snapshot
from workbench.models import EMBEDDED_DIR, TINY_MODEL, load_tokenizer, resolve_model_path
from workbench.portable import (portable_base_name, read_card_header, strip_default_system,
                                template_with_default_system)
from workbench.prompt import PromptBuilder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMOLLM_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTION = "Who are you, and who made you?"


# ---------------------------------------------------------------------------
# The template function, on the embedded model's ChatML template
# ---------------------------------------------------------------------------
def render(tokenizer, template, messages):
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("system", [SYSTEM, "Line one\nline two {{ not jinja }} {% raw %} ü 😀 \\ ' \"", ""])
def test_default_system_replaces_the_templates_own_default(system):
    tokenizer = load_tokenizer("embedded")  # its own copy: PromptBuilder sets the tokenizer's template
    builder = PromptBuilder(tokenizer, system=system)
    assert SMOLLM_DEFAULT in builder.chat_template, "the test needs a template with a default of its own"
    template = template_with_default_system(builder)
    conversations = [
        [{"role": "user", "content": QUESTION}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And you?"}],
    ]
    for conv in conversations:
        expected = builder.render(builder.with_system(conv), add_generation_prompt=True)
        got = render(tokenizer, template, conv)
        assert got == expected and SMOLLM_DEFAULT not in got
        assert tokenizer(got, add_special_tokens=False)["input_ids"] == builder.generation_prompt(conv)
        explicit = [{"role": "system", "content": "Be terse."}, *conv]
        assert render(tokenizer, template, explicit) == builder.render(explicit, add_generation_prompt=True)
        assert system not in render(tokenizer, template, explicit) or not system
    # Applying it to a template that already has the block does not stack a second one.
    original = builder.chat_template
    again = PromptBuilder(load_tokenizer("embedded"), system=system, chat_template=template)
    assert template_with_default_system(again) == template
    assert strip_default_system(template) == original


def test_portable_names():
    assert portable_base_name("embedded:smollm2-135m-instruct") == EMBEDDED_HUB_ID
    assert portable_base_name("embedded") == EMBEDDED_HUB_ID
    assert portable_base_name(str(EMBEDDED_DIR)) == EMBEDDED_HUB_ID
    assert portable_base_name(TINY_MODEL) == TINY_HUB_ID
    assert portable_base_name(resolve_model_path(TINY_MODEL)) == TINY_HUB_ID
    assert portable_base_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert portable_base_name("models/my-own-base") == "models/my-own-base"  # a user's folder as written in the config
    # and the workbench resolves the ids it records to its local copies
    assert resolve_model_path(TINY_HUB_ID) == resolve_model_path(TINY_MODEL)


def test_register_snapshot_is_the_hub_cache_layout(tmp_path):
    snap = register_snapshot(resolve_model_path(TINY_MODEL), TINY_HUB_ID, cache=tmp_path)
    repo = tmp_path / "models--workbench-local--tiny-random"
    assert snap.parent.parent == repo and (repo / "refs" / "main").read_text() == snap.name and len(snap.name) == 40
    assert (snap / "config.json").is_symlink() and (snap / "model.safetensors").exists()
    assert register_snapshot(resolve_model_path(TINY_MODEL), TINY_HUB_ID, cache=tmp_path) == snap  # idempotent
    assert registered_snapshot(TINY_HUB_ID, cache=tmp_path) == snap
    assert registered_snapshot(EMBEDDED_HUB_ID, cache=tmp_path) is None


# ---------------------------------------------------------------------------
# Adapter and merged model, read by plain clients
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("portable")
    adapter, peft_model, builder = make_adapter(TINY_MODEL, root / "adapter")
    merged = merge(TINY_MODEL, adapter, root / "merged")
    hf_home = root / "hf_home"  # a hub cache that only the tiny model is registered in
    register_snapshot(resolve_model_path(TINY_MODEL), TINY_HUB_ID, cache=hf_home / "hub")
    return {"adapter": adapter, "merged": merged, "peft": peft_model, "builder": builder, "hf_home": hf_home, "root": root}


def test_export_files_name_the_base_portably_and_stop_at_end_of_turn(exported):
    im_end = exported["builder"].tokenizer.convert_tokens_to_ids("<|im_end|>")
    adapter_cfg = json.loads((exported["adapter"] / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == TINY_HUB_ID
    for folder in (exported["adapter"], exported["merged"]):
        gen = json.loads((folder / "generation_config.json").read_text())
        eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
        assert im_end in eos and set(exported["builder"].stop_token_ids) <= set(eos)
        prompt = json.loads((folder / "prompt.json").read_text())
        assert prompt["system"] == SYSTEM and prompt["chat_template"] == exported["builder"].chat_template
    header = read_card_header(exported["adapter"] / "README.md")
    assert header["library_name"] == "peft" and header["base_model"] == TINY_HUB_ID
    assert header["pipeline_tag"] == "text-generation" and {"peft", "workbench", "lora"} <= set(header["tags"])
    merged_header = read_card_header(exported["merged"] / "README.md")
    assert merged_header["library_name"] == "transformers" and merged_header["base_model"] == TINY_HUB_ID


def test_plain_transformers_chat_template_gives_the_training_ids(exported):
    builder = exported["builder"]
    explicit = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": QUESTION}]
    code = (
        "import json\nfrom transformers import AutoTokenizer\nout = {}\n"
        f"for name, folder in (('merged', {str(exported['merged'])!r}), ('adapter', {str(exported['adapter'])!r})):\n"
        "    tok = AutoTokenizer.from_pretrained(folder)\n"
        f"    out[name] = [tok.apply_chat_template([{{'role': 'user', 'content': {QUESTION!r}}}], add_generation_prompt=True, tokenize=True, return_dict=False),\n"
        f"                 tok.apply_chat_template({explicit!r}, add_generation_prompt=True, tokenize=True, return_dict=False)]\n"
        "print(json.dumps(out))\n")
    got = run_plain(code, {"HF_HOME": str(exported["hf_home"])})
    expected = [builder.generation_prompt(QUESTION), builder.generation_prompt(explicit)]
    assert got["merged"] == expected and got["adapter"] == expected
    assert expected[0] != expected[1]


def test_copied_adapter_loads_with_auto_peft_where_the_cache_is_elsewhere(exported, tmp_path):
    copy = tmp_path / "somewhere" / "else" / "nova-adapter"
    shutil.copytree(exported["adapter"], copy)
    ids = exported["builder"].generation_prompt(QUESTION)
    with torch.no_grad():
        expected = exported["peft"](input_ids=torch.tensor([ids])).logits[0]
        base = exported["peft"].get_base_model()
        with exported["peft"].disable_adapter():
            untouched = base(input_ids=torch.tensor([ids])).logits[0]
    assert (expected - untouched).abs().max().item() > 1e-2, "the adapter must change the logits"
    code = (
        "import json, torch\nfrom peft import AutoPeftModelForCausalLM\n"
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(copy)!r}).eval()\n"
        f"with torch.no_grad():\n    out = m(input_ids=torch.tensor([{ids!r}])).logits[0]\n"
        "print(json.dumps({'logits': out.tolist(), 'base': m.peft_config['default'].base_model_name_or_path}))\n")
    got = run_plain(code, {"HF_HOME": str(exported["hf_home"])})
    assert got["base"] == TINY_HUB_ID
    assert (torch.tensor(got["logits"]) - expected).abs().max().item() <= 1e-5


def test_merged_model_in_a_pipeline_answers_like_the_workbench(exported):
    """transformers' own generate on the merged folder, no system message: the workbench's prompt, stopped at <|im_end|>."""
    from workbench.chat import GenerationSettings, answer
    from transformers import AutoModelForCausalLM

    builder = exported["builder"]
    model = AutoModelForCausalLM.from_pretrained(exported["merged"]).eval()
    mine = answer(model, builder, QUESTION, settings=GenerationSettings(max_new_tokens=16))
    code = (
        "import json, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(exported['merged'])!r})\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(exported['merged'])!r}).eval()\n"
        f"ids = tok.apply_chat_template([{{'role': 'user', 'content': {QUESTION!r}}}], add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']\n"
        "out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)\n"
        "print(json.dumps({'answer': tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()}))\n")
    assert run_plain(code, {"HF_HOME": str(exported["hf_home"])})["answer"] == mine


@pytest.mark.slow
def test_embedded_adapter_is_recorded_by_its_public_id_and_loads_offline(tmp_path):
    adapter, peft_model, builder = make_adapter("embedded", tmp_path / "adapter", scale=0.01)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_HUB_ID
    header = read_card_header(adapter / "README.md")
    assert header["base_model"] == EMBEDDED_HUB_ID and header["license"] == "apache-2.0"
    hf_home = tmp_path / "hf_home"
    register_snapshot(EMBEDDED_DIR, EMBEDDED_HUB_ID, cache=hf_home / "hub")
    copy = tmp_path / "moved" / "adapter"
    shutil.copytree(adapter, copy)
    ids = builder.generation_prompt(QUESTION)
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([ids])).logits[0, -1]
    code = (
        "import json, torch\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n"
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(copy)!r}).eval()\n"
        f"tok = AutoTokenizer.from_pretrained({str(copy)!r})\n"
        f"ids = tok.apply_chat_template([{{'role': 'user', 'content': {QUESTION!r}}}], add_generation_prompt=True, tokenize=True, return_dict=False)\n"
        "with torch.no_grad():\n    out = m(input_ids=torch.tensor([ids])).logits[0, -1]\n"
        "print(json.dumps({'ids': list(ids), 'logits': out.tolist()}))\n")
    got = run_plain(code, {"HF_HOME": str(hf_home)}, timeout=600)
    assert got["ids"] == ids
    assert (torch.tensor(got["logits"]) - expected).abs().max().item() <= 1e-4
