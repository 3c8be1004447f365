"""convert pth_to_hf and convert merge on the tiny random model, checked with real clients (peft, transformers)."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from workbench.config import load_config, load_recipe
from workbench.convert import ConvertError, merge, pth_to_hf, verify_merge
from workbench.hubcache import TINY_HUB_ID
from workbench.models import TINY_MODEL, load_tokenizer, resolve_model_path
from workbench.portable import template_with_default_system
from workbench.prompt import PromptBuilder
from workbench.checkpoint import load_trainable
from workbench.models import build_model
from workbench.train import train

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------
# One tiny LoRA run, shared by the module
# ---------------------------------------------------------------------------
def tiny_cfg(**changes):
    # lr 1e-2: LoRA's B matrices start at zero, so a few steps at a high rate make the adapter clearly non-zero;
    # max_length 64 keeps a step fast on a CPU (the 49152-token vocabulary dominates).
    return load_recipe("smollm2_135m_tiny_smoke").replace(**{"evaluation_freq": 0, "lr": 1e-2, "max_length": 64, **changes})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("lora") / "work"
    train(tiny_cfg(max_steps=4, save_steps=4), work, progress=False)
    return work


@pytest.fixture(scope="module")
def ckpt(lora_run):
    return lora_run / "iter_4"


@pytest.fixture(scope="module")
def hf16(lora_run, ckpt, tmp_path_factory):
    return pth_to_hf(lora_run / "config.yaml", ckpt, tmp_path_factory.mktemp("hf16") / "adapter")


@pytest.fixture(scope="module")
def hf32(lora_run, ckpt, tmp_path_factory):
    return pth_to_hf(lora_run / "config.yaml", ckpt, tmp_path_factory.mktemp("hf32") / "adapter", fp32=True)


@pytest.fixture(scope="module")
def base_dir():
    return resolve_model_path(TINY_MODEL)


@pytest.fixture(scope="module")
def prompt_ids():
    builder = PromptBuilder(load_tokenizer(TINY_MODEL))
    ids = builder.generation_prompt("Who are you, and who made you?", [("Hello", "Hi! How can I help?")])
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def training_model(lora_run, ckpt):
    """The model as training had it at the checkpoint: build_model + load_trainable."""
    model = build_model(load_config(lora_run / "config.yaml"), torch.device("cpu"))
    load_trainable(model, ckpt)
    return model.eval()


def plain_base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def with_adapter(base_dir, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(plain_base(base_dir), str(adapter)).eval()


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def safetensors_dtypes(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def snapshot(folder: Path) -> dict:
    """Every file under a folder with its bytes and mtime."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------
# pth_to_hf
# ---------------------------------------------------------------------------
def test_pth_to_hf_writes_a_complete_adapter_folder(lora_run, ckpt, hf16, hf32, base_dir):
    from transformers import AutoTokenizer

    cfg = load_config(lora_run / "config.yaml")
    for folder in (hf16, hf32):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "prompt.json",
                "workbench_config.yaml", "README.md"} <= names
        # The base is named portably (the tiny model by its local id), not by this checkout's cache path.
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == TINY_HUB_ID
        assert not [p for p in folder.rglob("*") if p.name.startswith(("optimizer", "scheduler", "rng_"))], "no optimizer state"
        assert not list(folder.rglob("*.pt")) and not list(folder.rglob("trainable.safetensors"))
        tok = AutoTokenizer.from_pretrained(folder)
        # The saved template is the base's, with the trained system prompt as its default (tests/test_portable.py).
        builder = PromptBuilder(load_tokenizer(cfg.pretrained_model_name_or_path), system=cfg.system)
        assert tok.chat_template == template_with_default_system(builder)
        prompt = json.loads((folder / "prompt.json").read_text())
        assert prompt["system"] == cfg.system and prompt["stop_token_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]
        assert load_config(folder / "workbench_config.yaml") == cfg
        assert (folder / "README.md").stat().st_size > 0
    assert safetensors_dtypes(hf16 / "adapter_model.safetensors") == {"F16"}
    assert safetensors_dtypes(hf32 / "adapter_model.safetensors") == {"F32"}

    # The fp32 export holds exactly the checkpoint's LoRA weights; the fp16 one the same values rounded.
    trained = {k.replace(".default", ""): v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()}
    w32 = load_file(str(hf32 / "adapter_model.safetensors"))
    w16 = load_file(str(hf16 / "adapter_model.safetensors"))
    assert set(w32) == set(w16) == set(trained) and len(w32) == 2 * 7 * 2  # A and B, 7 targets, 2 layers
    for k, v in trained.items():
        assert torch.equal(w32[k], v), k
        assert torch.equal(w16[k], v.half()), k
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in trained.items()), "the adapter trained"


def test_adapter_reloads_with_peft_to_the_training_model(training_model, hf16, hf32, base_dir, prompt_ids):
    expected = logits(training_model, prompt_ids)
    base = logits(plain_base(base_dir), prompt_ids)
    exact = max_diff(logits(with_adapter(base_dir, hf32), prompt_ids), expected)
    rounded = max_diff(logits(with_adapter(base_dir, hf16), prompt_ids), expected)
    effect = max_diff(base, expected)
    assert exact <= 1e-5
    assert rounded <= 1e-3
    assert effect > 1e-2 and effect > 100 * rounded, "the adapter must change the logits, or the test proves nothing"


def test_pth_to_hf_refuses_bad_checkpoint_and_nonempty_target(lora_run, ckpt, tmp_path):
    for not_ckpt in (lora_run, tmp_path / "missing", lora_run / "adapter"):
        with pytest.raises(ConvertError, match="not a workbench checkpoint"):
            pth_to_hf(lora_run / "config.yaml", not_ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine\n")
    before = snapshot(target)
    with pytest.raises(ConvertError, match="not empty"):
        pth_to_hf(lora_run / "config.yaml", ckpt, target)
    assert snapshot(target) == before


# ---------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged(hf32, tmp_path_factory):
    return merge(TINY_MODEL, hf32, tmp_path_factory.mktemp("merged") / "model", max_shard_size="4MB")


def test_merged_model_equals_base_plus_adapter(merged, hf32, base_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    peft_model = with_adapter(base_dir, hf32)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert not (merged / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert max_diff(logits(model, prompt_ids), logits(peft_model, prompt_ids)) <= 1e-4
    assert max_diff(logits(model, prompt_ids), logits(plain_base(base_dir), prompt_ids)) > 1e-2, "the merge changed the base"
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None)
    with torch.no_grad():
        a = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **kw)
        b = peft_model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), **kw)
    assert a.shape[1] == prompt_ids.shape[1] + 12
    assert torch.equal(a, b)
    # What chat needs travels with the merged model.
    assert {"prompt.json", "tokenizer_config.json", "workbench_config.yaml", "README.md"} <= {p.name for p in merged.iterdir()}


def test_verify_merge_reports_equal_logits_and_answers(merged, hf32):
    check = verify_merge(TINY_MODEL, hf32, merged, question="Who are you?")
    assert check["same answer"] is True and check["merged answers"] == check["base + adapter answers"]
    assert check["max |logit difference|"] <= 1e-4


def test_merged_model_loads_without_peft(merged, prompt_ids):
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "import torch, transformers\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r})\n"
        f"out = m(input_ids=torch.tensor({prompt_ids.tolist()!r})).logits\n"
        "assert torch.isfinite(out).all()\n"
        "try:\n    import peft\nexcept ImportError:\n    print('PEFT-BLOCKED', tuple(out.shape))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"PEFT-BLOCKED (1, {prompt_ids.shape[1]}, 49152)" in proc.stdout


def shard_contents(folder: Path) -> dict[str, tuple[int, int]]:
    """shard file name -> (number of tensors, bytes of tensor data)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            tensors = [s.get_tensor(k) for k in s.keys()]
        out[f.name] = (len(tensors), sum(t.numel() * t.element_size() for t in tensors))
    return out


@pytest.mark.parametrize("limit,limit_bytes", [("4MB", 4 * 10**6), ("100KB", 100 * 10**3)])
def test_merge_respects_max_shard_size(hf32, tmp_path, merged, limit, limit_bytes):
    from transformers.utils.hub import convert_file_size_to_int

    assert convert_file_size_to_int(limit) == limit_bytes, "transformers counts MB/KB in powers of ten"
    folder = merged if limit == "4MB" else merge(TINY_MODEL, hf32, tmp_path / "m", max_shard_size=limit)
    shards = shard_contents(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    for name, (n_tensors, nbytes) in shards.items():
        # A tensor is never split: one bigger than the limit (the 49152 x 64 embedding, 12.6 MB) gets a shard of its own.
        assert nbytes <= limit_bytes or n_tensors == 1, (name, n_tensors, nbytes)
        if n_tensors > 1:
            assert (folder / name).stat().st_size <= limit_bytes + 4096  # data plus the safetensors header
    assert sum(n for n, _ in shards.values()) == len(index["weight_map"])
    if limit == "100KB":
        assert len(shards) > 3


# ---------------------------------------------------------------------------
# merge errors
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A tiny Llama of another width (hidden size 32), with the same tokenizer: the adapter does not fit it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(TINY_MODEL)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("other") / "base"
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_merge_refuses_adapter_of_another_base(hf32, other_base, tmp_path):
    with pytest.raises(ConvertError, match="does not belong") as err:
        merge(str(other_base), hf32, tmp_path / "out")
    assert "hidden size 32" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_merge_refuses_nonempty_target(hf32, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"precious")
    (target / "sub").mkdir()
    (target / "sub" / "x.txt").write_text("x")
    before = snapshot(target)
    with pytest.raises(ConvertError, match="exists and is not empty"):
        merge(TINY_MODEL, hf32, target)
    assert snapshot(target) == before


def test_merge_refuses_folders_that_are_not_adapters(base_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConvertError, match="not an adapter folder"):
        merge(TINY_MODEL, empty, tmp_path / "out1")
    with pytest.raises(ConvertError, match="is a full model folder, not an adapter"):
        merge(TINY_MODEL, base_dir, tmp_path / "out2")
    with pytest.raises(ConvertError, match="not found"):
        merge(TINY_MODEL, tmp_path / "nowhere", tmp_path / "out3")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


# ---------------------------------------------------------------------------
# Other methods
# ---------------------------------------------------------------------------
def test_full_method_converts_to_a_full_model(tmp_path, base_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    work = tmp_path / "work"
    train(tiny_cfg(method="full", max_steps=2, save_steps=2, lr=1e-3), work, progress=False)
    cfg = load_config(work / "config.yaml")
    out32 = pth_to_hf(work / "config.yaml", work / "iter_2", tmp_path / "hf32", fp32=True)
    out16 = pth_to_hf(work / "config.yaml", work / "iter_2", tmp_path / "hf16")
    for out in (out32, out16):
        names = {p.name for p in out.iterdir()}
        assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
        assert "adapter_config.json" not in names and not list(out.rglob("*.pt"))
    assert {d for f in out32.glob("*.safetensors") for d in safetensors_dtypes(f)} == {"F32"}
    assert {d for f in out16.glob("*.safetensors") for d in safetensors_dtypes(f)} == {"F16"}

    reference = build_model(cfg, torch.device("cpu"))
    load_trainable(reference, work / "iter_2")
    expected = logits(reference.eval(), prompt_ids)
    loaded = AutoModelForCausalLM.from_pretrained(out32).eval()
    assert loaded.dtype == torch.float32
    assert max_diff(logits(loaded, prompt_ids), expected) <= 1e-5
    assert max_diff(logits(plain_base(base_dir), prompt_ids), expected) > 1e-3, "full training changed the weights"


def test_qlora_adapter_converts_and_merges_into_the_full_precision_base(tmp_path, base_dir, prompt_ids, capsys):
    from transformers import AutoModelForCausalLM

    work = tmp_path / "work"
    train(tiny_cfg(method="qlora", max_steps=2, save_steps=2), work, progress=False)
    adapter = pth_to_hf(work / "config.yaml", work / "iter_2", tmp_path / "hf")
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert load_config(adapter / "workbench_config.yaml").method == "qlora"
    capsys.readouterr()
    out = merge(TINY_MODEL, adapter, tmp_path / "merged")
    printed = capsys.readouterr().out
    assert "4-bit (QLoRA)" in printed and "full precision" in printed
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert max_diff(logits(model, prompt_ids), logits(with_adapter(base_dir, adapter), prompt_ids)) <= 1e-4
