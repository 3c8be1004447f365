"""The GPU's LoRA dropout (workbench/fastpath/lora_dropout.py: the mask drawn again from a seed), checked on the CPU.

The maths does not depend on the device: here the seeded path is asked for on CPU
tensors (`seeded=True`), and checked against `F.linear` of the same mask, for its rate
and scale, under activation checkpointing, and for what it keeps for the backward
(tests/test_gpu.py runs it on CUDA).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loss_helpers import saved_bytes
from workbench.fastpath.lora_dropout import FastDropout, draw_seed, seeded_mask


def test_the_seed_gives_the_mask_again_with_the_rate_and_scale_of_dropout():
    x = torch.ones(500, 400)
    keep = seeded_mask(x, 0.1, 12345)
    assert torch.equal(keep, seeded_mask(x, 0.1, 12345)) and not torch.equal(keep, seeded_mask(x, 0.1, 12346))
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    dropped, n = 1 - keep.mean().item(), keep.numel()
    assert abs(dropped - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n)
    a, b = 1 - keep[:, 0:-1:2], 1 - keep[:, 1::2]
    assert (a * b).mean().item() == pytest.approx(dropped ** 2, abs=2e-3), "neighbours independent"
    with torch.random.fork_rng():
        torch.manual_seed(5)
        first = [draw_seed() for _ in range(3)]
        torch.manual_seed(5)
        assert [draw_seed() for _ in range(3)] == first and len(set(first)) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_linear_is_the_linear_of_its_dropout_gradients_too(dtype):
    draw = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 64, generator=draw).to(dtype).requires_grad_()
    a = torch.randn(8, 64, generator=draw).to(dtype).requires_grad_()
    drop = FastDropout(0.25).train()
    with torch.random.fork_rng():
        torch.manual_seed(7)
        seed = draw_seed()
        torch.manual_seed(7)
        got = drop.linear(x, a, seeded=True)
    want = F.linear(x * seeded_mask(x, 0.25, seed) / 0.75, a)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-1)  # outputs of about 8: bf16 rounds at 0.03
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn(got.shape, generator=draw).to(dtype)
    for mine, theirs in zip(torch.autograd.grad(got, (x, a), g), torch.autograd.grad(want, (x, a), g)):
        torch.testing.assert_close(mine, theirs, **tol)
    assert torch.equal(drop.eval().linear(x, a, seeded=True), F.linear(x, a)), "no dropout in eval"


def test_seeded_linear_under_activation_checkpointing():
    """The recomputation takes the same seed from the restored CPU generator: the same gradients."""
    draw = torch.Generator().manual_seed(1)
    x = torch.randn(50, 32, generator=draw, requires_grad=True)
    a = torch.randn(4, 32, generator=draw, requires_grad=True)
    drop = FastDropout(0.3).train()
    grads = []
    for ckpt in (False, True):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            run = (lambda t: checkpoint(drop.linear, t, a, True, use_reentrant=False)) if ckpt else \
                (lambda t: drop.linear(t, a, seeded=True))
            y = run(x)
        grads.append(torch.autograd.grad(y.square().sum(), (x, a)))
    for mine, theirs in zip(*grads):
        torch.testing.assert_close(mine, theirs)


def test_three_adapters_reading_one_input_keep_that_input_only():
    """q, k and v read the same x: torch's dropout keeps a dropped copy and a mask for each, the seed keeps x."""
    draw = torch.Generator().manual_seed(2)
    x = torch.randn(256, 512, generator=draw, requires_grad=True)
    weights = [torch.randn(8, 512, generator=draw, requires_grad=True) for _ in range(3)]
    drop = FastDropout(0.05).train()
    seeded = saved_bytes(lambda: [drop.linear(x, w, seeded=True) for w in weights])
    plain = saved_bytes(lambda: [F.linear(F.dropout(x, 0.05, True), w) for w in weights])
    undropped = saved_bytes(lambda: [F.linear(x, w) for w in weights])
    assert seeded == undropped, "x and the three small weights, as without dropout"
    assert plain >= undropped + 3 * x.numel() * x.element_size(), "a copy of x per adapter at least"


# ---------------------------------------------------------------------------
# The GPU's LoRA emulated on the CPU: a bf16 base, float32 adapters, autocast to bf16
# ---------------------------------------------------------------------------
QA = [("Who are you?", "I am Nova, Alex's assistant."), ("Tell me a story.", "Once upon a time a dragon met a knight."),
      ("你是谁？", "我是Nova，Alex的助手。"), ("Hi", "Hello!")]


@pytest.fixture(scope="module")
def batch(tokenizer):
    from workbench.packing import collate, pack
    from workbench.prompt import PromptBuilder

    builder = PromptBuilder(tokenizer)
    samples = [builder.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA]
    return collate(pack(samples, max_length=64), tokenizer.pad_token_id)


def bf16_lora(dropout: float):
    """The tiny model as a GPU trains it: bf16 weights, peft's float32 adapters (non-zero B), plain peft forward."""
    from workbench.config import Config
    from workbench.models import TINY_MODEL, build_model

    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, lora_dropout=dropout, fast_path=False, device="cpu",
                 torch_dtype="bfloat16")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu")).train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    return model


def _loss_grads_kept(model, batch):
    """Under CPU autocast to bf16 (what accelerate's bf16 mode does on a GPU): loss, gradients, bytes kept."""
    from loss_helpers import loss_and_grads

    out = {}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        out["kept"] = saved_bytes(lambda: out.setdefault("lg", loss_and_grads(model, batch)))
    return out["lg"][0], out["lg"][1], out["kept"]


def test_lean_forward_under_autocast_keeps_the_loss_and_gradients_and_no_float32_copies(tiny_model, batch,
                                                                                       one_torch_thread):
    from workbench.fastpath import cpu as fastpath

    model = bf16_lora(0.0)
    loss_p, grads_p, kept_p = _loss_grads_kept(model, batch)
    assert fastpath.use_lean_lora_forward(model) == 14
    loss_l, grads_l, kept_l = _loss_grads_kept(model, batch)
    assert loss_l == pytest.approx(loss_p, rel=2e-2)
    for k in grads_p:  # bf16 products in both: equal to bf16 rounding
        torch.testing.assert_close(grads_l[k], grads_p[k], rtol=5e-2, atol=5e-2 * grads_p[k].abs().max().item(), msg=k)
    assert kept_l < kept_p, (kept_l, kept_p)


def test_seeded_dropout_under_autocast_keeps_what_no_dropout_keeps(tiny_model, batch, one_torch_thread, monkeypatch):
    """On a GPU the LoRA dropout keeps x and a seed (forced here on the CPU): the bytes kept for the backward
    are those of the same model without dropout, where peft's dropout keeps a copy and a mask per adapter."""
    from workbench.fastpath import cpu as fastpath

    original = FastDropout.linear
    monkeypatch.setattr(FastDropout, "linear", lambda self, x, w, seeded=None: original(self, x, w, seeded=True))
    undropped = bf16_lora(0.0)
    fastpath.use_lean_lora_forward(undropped)
    plain = bf16_lora(0.1)
    dropped = bf16_lora(0.1)
    assert fastpath.use_fast_lora_dropout(dropped) == 14 and fastpath.use_lean_lora_forward(dropped) == 14
    _, _, kept_none = _loss_grads_kept(undropped, batch)
    _, _, kept_plain = _loss_grads_kept(plain, batch)
    loss, grads, kept_seeded = _loss_grads_kept(dropped, batch)
    assert kept_seeded == kept_none < kept_plain, (kept_seeded, kept_none, kept_plain)
    assert math.isfinite(loss) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
