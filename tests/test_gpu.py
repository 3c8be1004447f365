"""On a CUDA GPU (`pytest -m gpu`; skipped without one): the CUDA path, the whole workflow, serving, DeepSpeed.

* the packed (varlen) fast path computes what the masked path computes: the same tiny model built twice through
  `build_model(cfg, "cuda")`, fast_path on and off, one packed batch: loss within bf16 tolerance, gradients close;
* LoRA, QLoRA and full fine-tuning: train -> interrupt -> resume (the losses of an uninterrupted run) -> convert
  -> merge -> chat, on the GPU (tiny random model, a few steps);
* the GGUF export of the GPU-trained, merged model (read back by transformers: the same logits and answers);
* the serving engine on the GPU: a batch of greedy requests answers what each request answers alone;
* `workbench train --deepspeed deepspeed_zero2` on one GPU, where deepspeed is importable.

Every model is built with its own seeded generator or under `torch.random.fork_rng`: no global RNG side effects.
"""
import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import answers_together
from loss_helpers import loss_and_grads
from train_helpers import losses, train_interrupted_and_resumed

ROOT = Path(__file__).resolve().parents[1]
# WORKBENCH_GPU_TESTS_DEVICE=cpu rehearses these tests on a CPU (slow; float32): their code, not the GPU.
DEVICE = os.environ.get("WORKBENCH_GPU_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="no CUDA GPU here (the GPU tests run on one)"),
              pytest.mark.usefixtures("tiny_model")]

QA = [("Who are you?", "I am Nova, Alex's assistant."), ("What is 2+2?", "4."),
      ("Tell me a long story about a dragon.", "Once upon a time a dragon met a knight and they became friends."),
      ("你是谁？", "我是Nova，Alex的助手。"), ("Name three colours.", "Red, green and blue."), ("Hi", "Hello!")]
QUESTIONS = ["Who are you?", "What is the capital of France?", "Tell me a joke about cats.", "hi"]


def tiny_cfg(**changes):
    """The smoke recipe on the GPU: lr 1e-2 makes LoRA's B clearly non-zero in a few steps; max_length 64 keeps it quick."""
    from workbench.config import load_recipe

    return load_recipe("smollm2_135m_tiny_smoke").replace(
        **{"device": DEVICE, "evaluation_freq": 0, "lr": 1e-2, "max_length": 64, "save_total_limit": -1, **changes})


@contextlib.contextmanager
def seeded(seed: int):
    """Global RNG state (CPU and GPU) restored afterwards: what runs inside draws from `seed`."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if DEVICE == "cuda" else []):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------
# The varlen fast path equals the masked path
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builder():
    from workbench.models import TINY_MODEL, load_tokenizer
    from workbench.prompt import PromptBuilder

    return PromptBuilder(load_tokenizer(TINY_MODEL))


@pytest.fixture(scope="module")
def packed_batch(builder):
    from workbench.packing import collate, pack

    samples = [builder.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA]
    rows = pack(samples, max_length=80)
    assert len(rows) >= 2 and max(len(r) for r in rows) >= 2, "several rows, one with several conversations"
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in collate(rows, builder.tokenizer.pad_token_id).items()}


def tiny_lora_on_cuda(fast: bool):
    """The tiny model with LoRA on the GPU (bf16), every draw from seed 0, LoRA B non-zero so it takes part."""
    from workbench.config import Config
    from workbench.models import TINY_MODEL, build_model

    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, fast_path=fast, device=DEVICE, lora_dropout=0.0)
    with seeded(0):
        model = build_model(cfg, torch.device(DEVICE))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))
    return model



def test_varlen_fast_path_equals_the_masked_path(packed_batch):
    plain, fast = tiny_lora_on_cuda(fast=False), tiny_lora_on_cuda(fast=True)
    from workbench.fastpath import cpu as fastpath, cuda as fastpath_cuda

    assert next(fast.parameters()).device.type == DEVICE
    assert fastpath.uses_packed_attention(fast) or fastpath_cuda.uses_varlen_attention(fast)
    p_plain, p_fast = dict(plain.named_parameters()), dict(fast.named_parameters())
    trainable = {k for k, p in p_plain.items() if p.requires_grad}
    assert trainable == {k for k, p in p_fast.items() if p.requires_grad} and trainable, "the same LoRA parameters"
    for k in p_plain.keys() & p_fast.keys():  # fused kernels may rename a module; what both have is the same
        assert torch.equal(p_plain[k], p_fast[k]), f"the two builds differ at {k}"
    loss_p, grads_p = loss_and_grads(plain, packed_batch)
    loss_f, grads_f = loss_and_grads(fast, packed_batch)
    assert math_isfinite(loss_p) and loss_f == pytest.approx(loss_p, rel=2e-2)  # bf16: 8 bits of mantissa
    assert grads_p.keys() == grads_f.keys() and len(grads_p) > 0
    for k in grads_p:
        g_p, g_f = grads_p[k].flatten(), grads_f[k].flatten()
        cos = torch.nn.functional.cosine_similarity(g_p, g_f, dim=0).item()
        assert cos > 0.99, f"{k}: cosine {cos:.4f}"
        assert (g_f.norm() - g_p.norm()).abs().item() <= 0.05 * g_p.norm().item() + 1e-6, k


def math_isfinite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# ---------------------------------------------------------------------------
# train -> resume -> convert -> merge -> chat, per method
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workflows(tmp_path_factory):
    """Per method: the work dir of a straight run and of an interrupted + resumed one (4 steps, checkpoints at 2 and 4)."""
    from workbench.train import train

    out = {}
    for method in ("lora", "qlora", "full"):
        if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
            continue
        cfg = tiny_cfg(method=method, max_steps=4, save_steps=2, **({"lr": 1e-3} if method == "full" else {}))
        root = tmp_path_factory.mktemp(method)
        train(cfg, root / "straight", progress=False)
        train_interrupted_and_resumed(cfg, root / "resumed", stop_at=3)
        out[method] = root
    return out


def test_a_float16_run_resumes_its_loss_scale(tmp_path):
    """float16 (a GPU without bfloat16, or chosen): accelerate's loss scaler comes back with the run, so the resumed
    run skips and grows its scale at the steps the straight one does (a fresh scaler would count from 0 again)."""
    from workbench.checkpoint import read_state
    from workbench.train import train

    if DEVICE != "cuda":
        pytest.skip("accelerate scales float16 losses on CUDA only")
    cfg = tiny_cfg(torch_dtype="float16", max_steps=4, save_steps=2)
    train(cfg, tmp_path / "straight", progress=False)
    train_interrupted_and_resumed(cfg, tmp_path / "resumed", stop_at=3)
    scaler = [read_state(tmp_path / run / "iter_4")["grad_scaler"] for run in ("straight", "resumed")]
    assert scaler[0] == scaler[1]  # a fresh scaler at the resume would count its growth from 0 again
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=2e-2, abs=2e-2)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_train_resume_convert_merge_chat(workflows, method, tmp_path):
    from transformers import AutoModelForCausalLM

    from workbench.chat import answer, load_chat_model
    from workbench.convert import merge, pth_to_hf
    from workbench.models import TINY_MODEL

    if method not in workflows:
        pytest.skip("bitsandbytes is not installed: no QLoRA")
    root = workflows[method]
    straight, resumed = losses(root / "straight"), losses(root / "resumed")
    assert len(straight) == 4 and len(resumed) == 4
    assert resumed == pytest.approx(straight, rel=2e-2, abs=2e-2), "the resumed run continues the straight one"
    adapter = pth_to_hf(root / "resumed" / "config.yaml", root / "resumed" / "iter_4", tmp_path / "hf")
    if method == "full":
        model_dir = adapter
    else:
        assert (adapter / "adapter_config.json").exists()
        model_dir = merge(TINY_MODEL, adapter, tmp_path / "merged", device=DEVICE, torch_dtype="float32")
        base_plus = load_chat_model(TINY_MODEL, adapter=str(adapter), device=DEVICE, torch_dtype="float32")[0]
        merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=DEVICE)
        with torch.no_grad():
            diff = (merged(input_ids=ids).logits - base_plus(input_ids=ids).logits).abs().max().item()
        assert diff <= (5e-2 if method == "qlora" else 1e-3), f"merged != base + adapter: {diff}"
    model, builder = load_chat_model(str(model_dir), device=DEVICE)
    assert next(model.parameters()).device.type == DEVICE
    reply = answer(model, builder, "Who are you?")
    assert isinstance(reply, str)
    assert answer(model, builder, "Who are you?") == reply, "greedy answers are deterministic"


def test_gguf_export_of_a_gpu_trained_model(workflows, tmp_path):
    from workbench.convert import merge, pth_to_hf
    from workbench.gguf_export import export_gguf, verify_gguf
    from workbench.models import TINY_MODEL

    root = workflows["lora"]
    adapter = pth_to_hf(root / "straight" / "config.yaml", root / "straight" / "iter_4", tmp_path / "hf")
    merged = merge(TINY_MODEL, adapter, tmp_path / "merged", device=DEVICE, torch_dtype="float32")
    result = export_gguf(str(merged), tmp_path / "gguf" / "nova.gguf", "f16", progress=False)
    assert Path(result.path).exists() and (tmp_path / "gguf" / "Modelfile").exists()
    report = verify_gguf(result.path, str(merged), questions=("Who are you?",), max_new_tokens=6)
    assert report["max |logit difference| vs merged with the GGUF's rounding"] <= 1e-3
    assert report["same greedy answers"] is True and report["template gives the training prompt ids"] is True


# ---------------------------------------------------------------------------
# The serving engine on the GPU
# ---------------------------------------------------------------------------
def test_engine_batch_answers_equal_the_answers_alone():
    """float32 on the GPU (TF32 off, torch's default): a batch's rounding cannot flip a greedy choice of the random model."""
    from peft import LoraConfig, get_peft_model

    from workbench.chat import GenerationSettings, answer, load_chat_model
    from workbench.engine import Engine
    from workbench.models import TINY_MODEL, load_model

    n = 24
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    with seeded(0):
        model = get_peft_model(load_model(TINY_MODEL, device=DEVICE, torch_dtype="float32"), lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.eval()
    builder = load_chat_model(TINY_MODEL, device="cpu")[1]
    expected = [answer(model, builder, q, settings=GenerationSettings(n, 0.0, 1.0, 2.0)) for q in QUESTIONS]
    engine = Engine(model, builder.tokenizer, builder.stop_token_ids).start()
    assert engine.device.type == DEVICE
    assert answers_together(engine, builder, QUESTIONS, n) == expected
    assert engine.peak_batch >= 2, "the requests were decoded together"


# ---------------------------------------------------------------------------
# DeepSpeed ZeRO-2 on one GPU
# ---------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install deepspeed)")
def test_deepspeed_zero2_on_one_gpu(tmp_path):
    from workbench.config import save_config

    cfg_path = tmp_path / "tiny.yaml"
    save_config(tiny_cfg(max_steps=2, save_steps=2), cfg_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "workbench", "train", str(cfg_path), "--work-dir", str(tmp_path / "work"),
                           "--deepspeed", "deepspeed_zero2", "--num-processes", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(losses(tmp_path / "work")) == 2 and (tmp_path / "work" / "iter_2").is_dir()
    from workbench.safe_unpickle import weights_only_load

    files = sorted((tmp_path / "work" / "iter_2").rglob("*.pt"))
    assert files and all(isinstance(weights_only_load(f, map_location="cpu"), dict) for f in files), \
        "bf16 DeepSpeed state on a GPU holds only the classes a resume reads weights-only"
