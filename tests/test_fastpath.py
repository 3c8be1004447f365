"""The training fast path (workbench/fastpath/cpu.py) computes the same thing as the plain path.

Packed attention: same loss and same gradients as transformers' masked SDPA on a
packed batch with several rows and padding, generation unchanged; fast LoRA
dropout: an inverted dropout with the right rate, scale, mean and gradient; fused
loss: torch's cross-entropy and its gradient.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench.fastpath import cpu as fastpath, lora_dropout
from workbench.config import Config
from workbench.models import TINY_MODEL, load_model, load_tokenizer
from workbench.packing import collate, pack
from workbench.prompt import PromptBuilder
from workbench.checkpoint import trainable_state_dict
from workbench.models import build_model
from loss_helpers import loss_and_grads

QA = [("Who are you?", "I am Nova, Alex's assistant."), ("What is 2+2?", "4."),
      ("Tell me a long story about a dragon.", "Once upon a time a dragon met a knight and they became friends."),
      ("你是谁？", "我是Nova，Alex的助手。"), ("Name three colours.", "Red, green and blue."), ("Hi", "Hello!")]


pytestmark = pytest.mark.usefixtures("tiny_model")


@pytest.fixture(autouse=True)
def isolated_rng():
    """Every test's draws (manual_seed included) stay inside it: the tests pass alone and in any order."""
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(load_tokenizer("embedded"))


@pytest.fixture(scope="module")
def batch(builder):
    samples = [builder.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA]
    rows = pack(samples, max_length=80)
    assert len(rows) >= 2 and len({sum(len(s) for s in r) for r in rows}) > 1, "rows of different widths: padding"
    assert max(len(r) for r in rows) >= 2, "a row with several conversations"
    return collate(rows, builder.tokenizer.pad_token_id)


def tiny_lora(fast: bool, dropout: float = 0.0, checkpointing: bool = False):
    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, lora_dropout=dropout, fast_path=fast, device="cpu",
                 gradient_checkpointing=checkpointing)
    with torch.random.fork_rng(devices=[]):  # LoRA's A matrices drawn from seed 0, whatever ran before
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-zero LoRA B, so the adapters take part in the gradients
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model



def test_packed_attention_same_loss_and_gradients(batch, one_torch_thread):
    plain, fast = tiny_lora(fast=False), tiny_lora(fast=True)
    assert not fastpath.uses_packed_attention(plain) and fastpath.uses_packed_attention(fast)
    loss_p, grads_p = loss_and_grads(plain, batch)
    loss_f, grads_f = loss_and_grads(fast, batch)
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) > 0
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-4, atol=1e-6, msg=k)


def test_packed_attention_equals_sdpa_per_conversation(builder, one_torch_thread):
    """Each conversation of a packed row gets exactly the logits it gets alone."""
    model = tiny_lora(fast=True)
    samples = [builder.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA[:3]]
    row = collate([samples], builder.tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"],
                       **fastpath.packed_kwargs(row["position_ids"])).logits[0]
        start = 0
        for s in samples:
            alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
            torch.testing.assert_close(packed[start:start + len(s)], alone, rtol=1e-4, atol=1e-5)
            start += len(s)


@pytest.mark.parametrize("kv_heads", [2, 6])
def test_packed_attention_equals_the_block_diagonal_mask(kv_heads, one_torch_thread):
    """Grouped key/value heads taken as they are (the CPU's way), two rows with padding segments: the same outputs and
    gradients as SDPA over the whole rows with repeated key/value heads and a block-diagonal causal mask."""
    gen = torch.Generator().manual_seed(3)
    lengths = [[5, 9, 2], [12, 4]]  # each row 16 positions; the last segment of each stands for padding
    width, heads = 16, 6
    q, k, v = (torch.randn(2, n, width, 8, generator=gen, requires_grad=True) for n in (heads, kv_heads, kv_heads))
    starts = [r * width + sum(row[:i]) for r, row in enumerate(lengths) for i in range(len(row))]
    cu = torch.tensor(starts + [2 * width], dtype=torch.int32)
    out, _ = fastpath.packed_sdpa_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu)
    segment = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal  # (rows, query, key)
    g = heads // kv_heads
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask[:, None],
                                         scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn(out.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_packed_attention_refuses_a_segment_across_rows():
    q = torch.zeros(2, 2, 4, 8)
    with pytest.raises(ValueError, match="crosses a row"):
        fastpath.packed_sdpa_attention(None, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 3, 6, 8], dtype=torch.int32))


def test_packed_kwargs_mark_every_conversation_and_the_padding(batch):
    kw = fastpath.packed_kwargs(batch["position_ids"])
    cu = kw["cu_seq_lens_q"].tolist()
    flat = batch["position_ids"].reshape(-1).tolist()
    assert cu[0] == 0 and cu[-1] == len(flat) and cu == sorted(set(cu))
    assert all(flat[i] == 0 for i in cu[:-1])
    assert kw["max_length_q"] == max(b - a for a, b in zip(cu, cu[1:]))
    width = batch["position_ids"].shape[1]
    assert all(a // width == (b - 1) // width for a, b in zip(cu, cu[1:])), "no segment crosses a row"


def test_generation_is_unchanged_by_packed_attention(builder, one_torch_thread):
    """Without segment boundaries the packed attention is transformers' SDPA, padding mask included."""
    plain, fast = tiny_lora(fast=False).eval(), tiny_lora(fast=True).eval()
    pad = builder.tokenizer.pad_token_id
    ids = [builder.generation_prompt(q) for q in ("Hi", "Tell me a long story about a dragon.")]
    width = max(map(len, ids))
    enc = {"input_ids": torch.tensor([[pad] * (width - len(i)) + i for i in ids]),  # left-padded: the mask matters
           "attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])}
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        assert fast.generate(**enc, **kw).tolist() == plain.generate(**enc, **kw).tolist()


def test_models_without_sdpa_keep_their_attention():
    model = load_model(TINY_MODEL)
    model.set_attn_implementation("eager")
    assert fastpath.enable_packed_attention(model) is False
    assert model.config._attn_implementation == "eager"
    assert fastpath.enable_packed_attention(nn.Linear(2, 2)) is False


def test_full_model_export_names_a_standard_attention(tmp_path, builder):
    from workbench.convert import export_trained

    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, method="full", device="cpu")
    model = build_model(cfg, torch.device("cpu"))
    assert fastpath.uses_packed_attention(model)
    export_trained(model, builder, cfg, tmp_path / "out", fp32=True)
    assert fastpath.PACKED_ATTENTION not in (tmp_path / "out" / "config.json").read_text()


# ---------------------------------------------------------------------------
# Fast dropout
# ---------------------------------------------------------------------------
def test_fast_dropout_rate_scale_and_mean():
    torch.manual_seed(0)
    drop = fastpath.FastDropout(0.05).train()
    x = torch.full((1000, 1001), 2.0)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    n = x.numel()
    assert abs(dropped - 0.05) < 5 * math.sqrt(0.05 * 0.95 / n)
    assert torch.allclose(y[y != 0], torch.tensor(2.0 / 0.95))
    assert y.mean().item() == pytest.approx(2.0, rel=3e-3)
    # neighbouring elements are independent
    a, b = (y[:, 0:-1:2] == 0).float(), (y[:, 1::2] == 0).float()
    assert (a * b).mean().item() == pytest.approx(dropped**2, abs=1e-3)


def test_fast_dropout_gaps_are_geometric(monkeypatch):
    """P(gap = k) = (1-p)^(k-1) p, also when the first batch of gaps falls short of n and more are drawn."""
    p, n = 0.2, 400_000
    monkeypatch.setattr(lora_dropout, "_GAP_HEADROOM", -0.9)  # draw about a tenth of the gaps at a time
    torch.manual_seed(0)
    idx = fastpath.FastDropout(p).dropped(n)
    assert int(idx[-1]) < n and bool((idx[1:] > idx[:-1]).all())
    assert abs(len(idx) / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    gaps = (idx[1:] - idx[:-1]).float()
    for k in (1, 2, 5):
        want = (1 - p) ** (k - 1) * p
        assert (gaps == k).float().mean().item() == pytest.approx(want, abs=5 * math.sqrt(want / len(gaps)))


def test_fast_dropout_linear_is_linear_of_the_dropout():
    """`drop.linear(x, A)` (the sparse correction) equals `F.linear(drop(x), A)` with the same draw, gradients too."""
    drop = fastpath.FastDropout(0.3).train()
    torch.manual_seed(0)
    x, a = torch.randn(2, 30, 48, requires_grad=True), torch.randn(8, 48, requires_grad=True)
    torch.manual_seed(7)
    fused = drop.linear(x, a)
    torch.manual_seed(7)
    plain = F.linear(drop(x), a)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(plain)
    for got, want in zip(torch.autograd.grad(fused, (x, a), g), torch.autograd.grad(plain, (x, a), g)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(drop.eval().linear(x, a), F.linear(x, a))


def test_fast_dropout_gradient_is_the_mask():
    torch.manual_seed(0)
    drop = fastpath.FastDropout(0.2).train()
    x = torch.randn(64, 96, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    expected = torch.where(y == 0, 0.0, drop.scale)
    torch.testing.assert_close(x.grad, expected)


def test_fast_dropout_is_off_in_eval_and_for_p_zero():
    x = torch.randn(8, 8)
    assert fastpath.FastDropout(0.3).eval()(x) is x
    assert fastpath.FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        fastpath.FastDropout(1.0)


def test_fast_dropout_follows_the_seed():
    drop = fastpath.FastDropout(0.1).train()
    x = torch.ones(300, 7)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)


def test_fast_dropout_under_gradient_checkpointing(batch, one_torch_thread):
    """The recomputed forward draws the same dropped positions: the same loss and gradients as without checkpointing."""
    results = []
    for checkpointing in (False, True):
        model = tiny_lora(fast=True, dropout=0.2, checkpointing=checkpointing).train()
        torch.manual_seed(11)
        results.append(loss_and_grads(model, batch))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    for k in grads_plain:
        torch.testing.assert_close(grads_ckpt[k], grads_plain[k], rtol=1e-5, atol=1e-6, msg=k)


def test_lora_layers_get_fast_dropout_and_the_adapter_is_unchanged():
    fast, plain = tiny_lora(fast=True, dropout=0.1), tiny_lora(fast=False, dropout=0.1)
    fast_drops = [m for m in fast.modules() if isinstance(m, fastpath.FastDropout)]
    plain_drops = [m for m in plain.modules() if isinstance(m, nn.Dropout) and m.p == 0.1]
    assert len(fast_drops) == len(plain_drops) > 0 and all(d.p == 0.1 for d in fast_drops)
    assert trainable_state_dict(fast).keys() == trainable_state_dict(plain).keys()


# ---------------------------------------------------------------------------
# Lean LoRA forward
# ---------------------------------------------------------------------------
def test_lean_lora_forward_same_output_and_gradients(batch, one_torch_thread):
    model = tiny_lora(fast=False)
    plain = loss_and_grads(model, batch)
    assert fastpath.use_lean_lora_forward(model) == 14  # 2 layers x 7 linear modules
    lean = loss_and_grads(model, batch)
    assert lean[0] == pytest.approx(plain[0], rel=1e-6)
    for k in plain[1]:
        torch.testing.assert_close(lean[1][k], plain[1][k], rtol=1e-5, atol=1e-6, msg=k)  # gradients up to ~4: rounding
    fastpath.use_peft_lora_forward(model)
    assert not any("forward" in vars(m) for m in model.modules() if hasattr(m, "lora_A"))


def test_lean_lora_forward_leaves_other_cases_to_peft(batch, one_torch_thread):
    """Adapters disabled (the base model's answer) and merged weights go through peft's own forward."""
    model = tiny_lora(fast=True).eval()
    with torch.no_grad():
        lean = model(input_ids=batch["input_ids"]).logits
        with model.disable_adapter():
            base_lean = model(input_ids=batch["input_ids"]).logits
        fastpath.use_peft_lora_forward(model)
        with model.disable_adapter():
            base_plain = model(input_ids=batch["input_ids"]).logits
        assert torch.equal(base_lean, base_plain) and not torch.allclose(lean, base_plain)


@pytest.mark.parametrize("rows, vocab", [(7, 11), (37, 1000)])
def test_fused_cross_entropy_equals_torch(rows, vocab):
    """Value and gradient, with ignored rows, an upstream gradient other than 1 and rows of large logits."""
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab) * 4
    logits[1] += 80.0  # exp would overflow without the max shift
    targets = torch.randint(0, vocab, (rows,))
    targets[::3] = -100
    plain, fused = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want = F.cross_entropy(plain, targets, ignore_index=-100, reduction="sum")
    want.backward(torch.tensor(0.37))
    got = fastpath.cross_entropy_sum(fused * 1.0, targets, ignore_index=-100)  # * 1.0: a non-leaf, as model logits are
    got.backward(torch.tensor(0.37))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-5, atol=1e-6)  # softmax - 1 rounds differently
    assert torch.all(fused.grad[::3] == 0)


def test_fused_loss_same_loss_and_gradients_on_a_model(batch, one_torch_thread):
    model = tiny_lora(fast=False)
    plain = loss_and_grads(model, batch)
    assert fastpath.use_fused_loss(model) and fastpath.uses_fused_loss(model)
    fused = loss_and_grads(model, batch)
    assert fused[0] == pytest.approx(plain[0], rel=1e-6)
    for k in plain[1]:
        torch.testing.assert_close(fused[1][k], plain[1][k], rtol=1e-4, atol=1e-6, msg=k)
    fastpath.stop_fused_loss(model)
    assert not fastpath.uses_fused_loss(model)


def test_fused_loss_is_left_out_where_the_model_reuses_its_logits():
    """Soft-capped logits (Gemma) are kept by tanh for its backward: the in-place gradient would corrupt them."""
    model = tiny_lora(fast=False)
    fastpath._transformers_model(model).config.final_logit_softcapping = 30.0
    assert not fastpath.use_fused_loss(model) and not fastpath.uses_fused_loss(model)
    assert fastpath.uses_fused_loss(tiny_lora(fast=True))
