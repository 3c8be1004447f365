"""QLoRA's base as `models.build_model` prepares it: which of the weights left unquantized stay in half precision.

peft's k-bit preparation casts the embeddings, norms and an untied head to float32, and the residual stream
follows them. A bfloat16 base keeps them (bfloat16 has float32's range: what a GPU's QLoRA runs, as TRL's QLoRA
does); a float16 base is still upcast (its range is what some residual streams overflow). Checked on this CPU
with bitsandbytes' CPU kernels under CPU autocast, as accelerate's mixed precision runs it on a GPU.
"""
import pytest
import torch

from loss_helpers import loss_and_grads, saved_bytes
from workbench.config import Config
from workbench.models import TINY_MODEL, build_model, load_tokenizer
from workbench.packing import collate, pack
from workbench.prompt import PromptBuilder

QA = [("Who are you?", "I am Nova, Alex's assistant."), ("你是谁？", "我是Nova，Alex的助手。"), ("Hi", "Hello!")]


@pytest.fixture(scope="module")
def batch(tiny_model):
    builder = PromptBuilder(load_tokenizer(TINY_MODEL))
    rows = pack([builder.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA],
                max_length=64)
    return collate(rows, builder.tokenizer.pad_token_id)


def qlora(dtype: str, checkpointing: bool = False):
    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, method="qlora", torch_dtype=dtype, device="cpu",
                 fast_path=False, lora_dropout=0.0, gradient_checkpointing=checkpointing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu")).train()
    with torch.no_grad():  # a non-zero B: the adapters take part in the forward
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    return model


def step(model, dtype: str, batch):
    """Loss, adapter gradients and the last hidden state's dtype, under autocast where the base is half precision."""
    half = getattr(torch, dtype)
    with torch.autocast("cpu", dtype=half, enabled=half != torch.float32):
        loss, grads = loss_and_grads(model, batch)
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"][:, :8], output_hidden_states=True).hidden_states[-1]
    return loss, grads, hidden.dtype


@pytest.mark.parametrize("dtype, unquantized", [("bfloat16", torch.bfloat16), ("float16", torch.float32),
                                                ("float32", torch.float32)])
def test_weights_left_unquantized_keep_bfloat16_and_float16_is_upcast(dtype, unquantized, batch, one_torch_thread):
    model = qlora(dtype)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.uint8, unquantized}, "4-bit weights and the rest at one dtype"
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}, "peft's float32 adapters"
    assert step(model, dtype, batch)[2] == unquantized, "the residual stream follows the unquantized weights"


def test_bfloat16_qlora_trains_as_the_float32_one_and_checkpointing_changes_nothing(batch, one_torch_thread):
    loss32, grads32, _ = step(qlora("float32"), "float32", batch)
    loss16, grads16, _ = step(qlora("bfloat16"), "bfloat16", batch)
    loss_ck, grads_ck, _ = step(qlora("bfloat16", checkpointing=True), "bfloat16", batch)
    assert loss16 == pytest.approx(loss32, rel=1e-3) and loss_ck == loss16
    for name in grads32:  # a whole bf16 forward and backward: each gradient within a few % of float32's, same direction
        cosine = torch.nn.functional.cosine_similarity(grads16[name].flatten(), grads32[name].flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)
        torch.testing.assert_close(grads_ck[name], grads16[name], msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_estimate_counts_the_unquantized_weights_as_built(dtype, batch):
    """workbench.estimate's NF4 weights: the bytes the built model's weights left unquantized take, per parameter."""
    from workbench.estimate import BYTES_PER_PARAM, weight_bytes

    model = qlora(dtype)
    rest = [p for p in model.parameters() if not p.requires_grad and p.dtype != torch.uint8]
    counts = {"linear": 1000, "total": 1000 + sum(p.numel() for p in rest)}
    assert weight_bytes(counts, "nf4", dtype) == pytest.approx(
        1000 * BYTES_PER_PARAM["nf4"] + sum(p.numel() * p.element_size() for p in rest))


# ---------------------------------------------------------------------------
# The lean LoRA forward on 4-bit base layers (the GPU's way, emulated here under CPU autocast)
# ---------------------------------------------------------------------------
def _loss_grads_kept(model, batch):
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        out["kept"] = saved_bytes(lambda: out.setdefault("step", step(model, "bfloat16", batch)))
    return out["step"][0], out["step"][1], out["kept"]


def test_lean_forward_on_4bit_layers_keeps_loss_and_gradients_and_less_for_the_backward(batch, one_torch_thread):
    from workbench.fastpath import cpu as fastpath

    model = qlora("bfloat16")
    assert fastpath.use_lean_lora_forward(model) == 0, "the CPU's QLoRA keeps peft's forward"
    loss_p, grads_p, kept_p = _loss_grads_kept(model, batch)
    assert fastpath.use_lean_lora_forward(model, four_bit=True) == 14  # 2 layers x 7 linear modules
    loss_l, grads_l, kept_l = _loss_grads_kept(model, batch)
    assert loss_l == pytest.approx(loss_p, rel=1e-3)
    for name in grads_p:  # bf16 products in both: equal to bf16 rounding
        torch.testing.assert_close(grads_l[name], grads_p[name], rtol=5e-2, atol=5e-2 * grads_p[name].abs().max().item(),
                                   msg=name)
    assert kept_l < kept_p, (kept_l, kept_p)
    fastpath.use_peft_lora_forward(model)
    assert _loss_grads_kept(model, batch)[0] == loss_p


def test_seeded_dropout_on_4bit_layers_keeps_what_no_dropout_keeps(batch, one_torch_thread, monkeypatch):
    """With dropout on, a GPU's 4-bit LoRA layers keep x and a seed (forced here on the CPU), not a mask and a copy."""
    from workbench.fastpath import cpu as fastpath
    from workbench.fastpath.lora_dropout import FastDropout

    original = FastDropout.linear
    monkeypatch.setattr(FastDropout, "linear", lambda self, x, w, seeded=None: original(self, x, w, seeded=True))

    def built(dropout: float, lean: bool):
        model = qlora("bfloat16")
        for module in model.modules():
            if hasattr(module, "lora_dropout") and dropout:
                module.lora_dropout["default"] = torch.nn.Dropout(dropout)
        if lean:
            fastpath.use_fast_lora_dropout(model)
            fastpath.use_lean_lora_forward(model, four_bit=True)
        return model

    kept_none = _loss_grads_kept(built(0.0, lean=True), batch)[2]
    kept_peft = _loss_grads_kept(built(0.1, lean=False), batch)[2]
    loss, grads, kept_seeded = _loss_grads_kept(built(0.1, lean=True), batch)
    assert kept_seeded == kept_none < kept_peft, (kept_seeded, kept_none, kept_peft)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()) and loss > 0
