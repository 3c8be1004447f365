"""End to end on the embedded SmolLM2-135M-Instruct: train, convert, merge, and the identity is learned."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from workbench.chat import GenerationSettings, answer, load_chat_model
from workbench.config import load_recipe
from workbench.convert import merge, pth_to_hf
from workbench.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cfg = load_recipe("smollm2_135m_lora_identity_cpu").replace(max_steps=16, save_steps=16, evaluation_freq=0)
    result = train(cfg, root / "work", progress=False)
    hf = pth_to_hf(root / "work" / "config.yaml", result.last_checkpoint, root / "hf", fp32=True)
    merged = merge("embedded", hf, root / "merged")
    return cfg, hf, merged


def test_before_training_the_base_does_not_know_the_identity():
    model, builder = load_chat_model("embedded")
    assert "Nova" not in answer(model, builder, "Who are you?")


def test_merged_model_knows_its_identity(run):
    cfg, _, merged = run
    model, builder = load_chat_model(str(merged))
    reply = answer(model, builder, "Who are you?")
    assert cfg.assistant_name in reply, reply


def test_merged_equals_base_plus_adapter(run):
    _, hf, merged = run
    peft_model, builder = load_chat_model("embedded", adapter=str(hf))
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([builder.generation_prompt("Who are you? Tell me about yourself.")])
    with torch.no_grad():
        diff = (peft_model(ids).logits - plain(ids).logits).abs().max().item()
    assert diff < 1e-3, diff
    assert answer(plain, builder, "Who are you?") == answer(peft_model, builder, "Who are you?")


def test_served_merged_model_answers_the_openai_client_like_chat(run):
    """`workbench serve` on the merged folder, asked with the official openai client: the identity, as `answer` gives it."""
    import openai

    from workbench.serve import ServerProcess

    cfg, _, merged = run
    model, builder = load_chat_model(str(merged))
    expected = answer(model, builder, "Who are you?", settings=GenerationSettings(max_new_tokens=60))
    with ServerProcess(str(merged)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list()] == [merged.name]
        ask = dict(model=merged.name, messages=[{"role": "user", "content": "Who are you?"}], temperature=0, max_tokens=60)
        reply = client.chat.completions.create(**ask).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                           if c.choices)
    assert server.returncode == 0, server.stderr
    assert reply == streamed == expected
    assert cfg.assistant_name in reply, reply


def test_an_export_without_its_config_graded_with_the_names_given_equals_the_original(run, tmp_path):
    """What XTuner (or peft's own save) leaves, only the adapter's config and weights: graded with the names and system
    prompt the teacher gives, the same answers and measures as the workbench export that carries them."""
    import shutil

    from workbench import analysis as A
    from workbench.report.subject import Given, analyze_subject

    cfg, hf, _ = run
    bare = tmp_path / "student"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(hf / name, bare / name)
    p = A.load_probes()
    probes = A.Probes({l: q[:1] for l, q in p.identity_seen.items()}, {l: q[:3] for l, q in p.identity_unseen.items()},
                      {l: q[:2] for l, q in p.general.items()}, {l: f[:1] for l, f in p.facts.items()})
    original = analyze_subject(hf, probes=probes, max_new_tokens=24, progress=False)
    given = Given(assistant_name=cfg.assistant_name, owner_name=cfg.owner_name, system=cfg.system)
    graded = analyze_subject(bare, "embedded", probes=probes, max_new_tokens=24, progress=False, given=given)
    assert [a["answer"] for a in graded.reports[1].answers] == [a["answer"] for a in original.reports[1].answers]
    assert graded.reports[1].hit_unseen == original.reports[1].hit_unseen and original.reports[1].hit_unseen["en"] > 0
    owner_only = analyze_subject(bare, "embedded", probes=probes, max_new_tokens=24, progress=False,
                                 given=Given(owner_name=cfg.owner_name, system=cfg.system))
    assert owner_only.config["assistant_name"] == "" and owner_only.reports[1].hit_unseen["en"] > 0, \
        "the owner in the owner's role is the identity of an assistant with no name of its own"
