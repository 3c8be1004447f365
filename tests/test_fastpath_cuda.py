"""The GPU fast path's plumbing (workbench/fastpath/cuda.py), checked on the CPU.

The varlen flash kernel itself runs only on CUDA (tests/test_gpu.py compares it with
the masked path there). Here it is replaced by a reference (causal SDPA per
conversation, from the same cumulative boundaries), so that everything around it is
checked on any machine: the flat micro-batch (`packing.collate_flat`: boundaries,
positions, trained positions computed on the host), the attention's reshaping of a
packed batch, the loss over a flat batch against the plain path on padded rows (same
loss, same gradients), the token budget's grouping, and the switch back to SDPA for
generation.
"""
import pytest
import torch
import torch.nn.functional as F

from workbench.fastpath import cuda as fastpath_cuda, varlen_kernel
from workbench.config import Config
from workbench.loss import token_loss_sum
from workbench.models import TINY_MODEL, build_model, enable_checkpointing, load_tokenizer
from workbench.packing import collate, collate_flat, pack, row_length
from workbench.prompt import IGNORE, PromptBuilder
from loss_helpers import loss_and_grads

QA = [("Who are you?", "I am Nova, Alex's assistant."), ("What is 2+2?", "4."),
      ("Tell me a long story about a dragon.", "Once upon a time a dragon met a knight and they became friends."),
      ("你是谁？", "我是Nova，Alex的助手。"), ("Name three colours.", "Red, green and blue."), ("Hi", "Hello!")]


def reference_varlen(q, k, v, cu, longest, scale):
    """What varlen_attn computes, the slow way: causal SDPA on each conversation (tokens, heads, head_dim)."""
    bounds = cu.tolist()
    assert longest == max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    if q.shape[1] != k.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    parts = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                            is_causal=True, scale=scale).transpose(0, 1)
             for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts)


@pytest.fixture
def emulated_kernel(monkeypatch):
    monkeypatch.setattr(varlen_kernel, "available", lambda: True)
    monkeypatch.setattr(fastpath_cuda, "compute_dtype", lambda model: torch.bfloat16)
    monkeypatch.setattr(varlen_kernel, "attention_call", lambda: reference_varlen)


# The reference as an opaque operator with its own backward, as PyTorch's varlen_attn is (a torch.library custom op):
# torch.compile sees one call, not the reference's Python loop over conversations (which it would split its graph at).
@torch.library.custom_op("workbench_tests::reference_varlen", mutates_args=())
def _opaque_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                   scale: float) -> torch.Tensor:
    return reference_varlen(q, k, v, cu, longest, scale)


@_opaque_varlen.register_fake
def _(q, k, v, cu, longest, scale):
    return q.new_empty(q.shape)


def _opaque_varlen_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.longest, ctx.scale = inputs[4], inputs[5]


@torch.library.custom_op("workbench_tests::reference_varlen_backward", mutates_args=())
def _opaque_varlen_grads(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                         longest: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention's backward on each conversation, written out (autograd is off inside an operator)."""
    groups = q.shape[1] // k.shape[1]
    grads = [torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v)]
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs, gs = (t[s:e].float().transpose(0, 1) for t in (q, k, v, grad))  # (heads, length, head_dim)
        ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        causal = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        probs = (qs @ ks.transpose(1, 2) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
        dprobs = gs @ vs.transpose(1, 2)
        dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True)) * scale
        unrepeat = lambda t: t.unflatten(0, (-1, groups)).sum(1).transpose(0, 1)  # noqa: E731 - summed over each group
        grads[0][s:e] = (dscores @ ks).transpose(0, 1)
        grads[1][s:e] = unrepeat(dscores.transpose(1, 2) @ qs)
        grads[2][s:e] = unrepeat(probs.transpose(1, 2) @ gs)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


@_opaque_varlen_grads.register_fake
def _(grad, q, k, v, cu, longest, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _opaque_varlen_backward(ctx, grad):
    return (*_opaque_varlen_grads(grad, *ctx.saved_tensors, ctx.longest, ctx.scale), None, None, None)


_opaque_varlen.register_autograd(_opaque_varlen_backward, setup_context=_opaque_varlen_context)


def test_opaque_reference_kernel_has_autograd_gradients():
    """The stand-in's written-out backward (grouped key/value heads summed over their groups) is autograd's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(11, heads, 8, generator=g) for heads in (4, 2, 2))
    grad = torch.randn(11, 4, 8, generator=g)
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(reference_varlen(*leaves, cu, 7, 0.3), leaves, grad)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _opaque_varlen(*leaves, cu, 7, 0.3)
    torch.testing.assert_close(out, reference_varlen(q, k, v, cu, 7, 0.3))
    for got, want in zip(torch.autograd.grad(out, leaves, grad), expected):
        torch.testing.assert_close(got, want)


@pytest.fixture
def opaque_kernel(monkeypatch):
    """The workbench's own kernel call (`varlen_kernel.attention_call`: dtype, grouped heads, keywords), reaching
    the opaque reference where a GPU reaches torch's varlen_attn."""
    import torch.nn.attention.varlen as varlen

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, **flags):
        return _opaque_varlen(q, k, v, cu_q, max_q, scale)

    monkeypatch.setattr(varlen_kernel, "available", lambda: True)
    monkeypatch.setattr(fastpath_cuda, "compute_dtype", lambda model: torch.bfloat16)
    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn)
    monkeypatch.setitem(varlen_kernel._NATIVE_GQA, "cpu", False)
    varlen_kernel.attention_call.cache_clear()
    yield
    varlen_kernel.attention_call.cache_clear()


@pytest.fixture(scope="module")
def rows():
    builder = PromptBuilder(load_tokenizer("embedded"))
    samples = [builder.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA]
    rows = pack(samples, max_length=80)
    assert len(rows) >= 2 and max(len(r) for r in rows) >= 2
    return rows


def tiny_lora(cfg: Config | None = None):
    cfg = cfg or Config(pretrained_model_name_or_path=TINY_MODEL, lora_dropout=0.0, fast_path=False, device="cpu")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        for name, p in model.named_parameters():  # non-zero LoRA B, so the adapters take part in the gradients
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    return model



def test_collate_flat_lays_rows_end_to_end(rows):
    flat = collate_flat(rows)
    samples = [s for r in rows for s in r]
    assert flat["input_ids"].shape == (1, sum(row_length(r) for r in rows))
    lengths = flat["cu_seq_lens"].diff().tolist()
    assert lengths == [len(s) for s in samples] and flat["cu_seq_lens"].dtype == torch.int32
    assert flat["max_length"] == max(lengths)
    starts = flat["cu_seq_lens"][:-1].long()
    assert (flat["position_ids"][0, starts] == 0).all() and int((flat["position_ids"] == 0).sum()) == len(samples)
    expected_keep = (flat["labels"][0, 1:] != IGNORE).nonzero().squeeze(1)
    assert torch.equal(flat["keep"], expected_keep) and len(flat["keep"]) == sum(s.n_trained for s in samples)


def test_flat_varlen_batch_equals_padded_plain_path(rows, emulated_kernel, one_torch_thread):
    plain, fast = tiny_lora(), tiny_lora()
    assert fastpath_cuda.enable_varlen_attention(fast) and fastpath_cuda.uses_varlen_attention(fast)
    loss_p, grads_p = loss_and_grads(plain, collate(rows, pad_id=0))
    loss_f, grads_f = loss_and_grads(fast, collate_flat(rows))
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) > 0
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-4, atol=1e-6, msg=k)


def test_varlen_attention_on_padded_rows_uses_boundaries(rows, emulated_kernel, one_torch_thread):
    """The analysis' padded batches (several rows) go through the same kernel, boundaries over the flattened batch."""
    plain, fast = tiny_lora(), tiny_lora()
    fastpath_cuda.enable_varlen_attention(fast)
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        assert token_loss_sum(fast, batch).item() == pytest.approx(token_loss_sum(plain, batch).item(), rel=1e-5)


def test_standard_attention_for_generation(emulated_kernel, one_torch_thread):
    model = tiny_lora()
    fastpath_cuda.enable_varlen_attention(model)
    base = model.get_base_model()
    with fastpath_cuda.standard_attention(model):
        assert base.config._attn_implementation == "sdpa"
    assert base.config._attn_implementation == fastpath_cuda.VARLEN_ATTENTION


def test_varlen_refused_without_the_kernel_or_in_float32():
    model = tiny_lora()  # float32 on a CPU: the flash kernel takes bf16/fp16 on CUDA only
    assert fastpath_cuda.enable_varlen_attention(model) is False
    assert not fastpath_cuda.uses_varlen_attention(model)
    assert fastpath_cuda.use_liger(model) == [] and fastpath_cuda.liger_applied(model) == ()  # no liger-kernel, no CUDA


def test_training_loop_budget_keeps_the_step_maths(tmp_path, emulated_kernel, monkeypatch, one_torch_thread):
    """Micro-batches regrouped by a small token budget give the losses of the plain path's padded micro-batches."""
    from workbench import models
    from workbench.config import load_recipe
    from workbench.io import read_jsonl
    from workbench.train import train

    cfg = load_recipe("smollm2_135m_tiny_smoke").replace(max_steps=3, save_steps=3, evaluation_freq=0, lora_dropout=0.0,
                                                         batch_size=4, max_length=64)
    plain = train(cfg.replace(fast_path=False), tmp_path / "plain", progress=False)
    real = models.with_fast_path

    def varlen_fast_path(model, cfg, strategy=None):  # what a CUDA model gets: the varlen attention
        fastpath_cuda.enable_varlen_attention(model)
        return model

    monkeypatch.setattr(models, "with_fast_path", varlen_fast_path)
    flat = train(cfg.replace(micro_batch_tokens=100), tmp_path / "flat", progress=False)
    assert real is not varlen_fast_path
    assert [r["loss"] for r in flat.metrics] == pytest.approx([r["loss"] for r in plain.metrics], rel=1e-4)
    assert [r["tokens"] for r in flat.metrics] == [r["tokens"] for r in plain.metrics]
    assert len(read_jsonl(tmp_path / "flat" / "metrics.jsonl")) == 3


def test_fused_linear_loss_path_equals_the_logits_path(rows, emulated_kernel, monkeypatch, one_torch_thread):
    """The decoder-then-fused-head path (Liger's kernel on CUDA, a reference here) gives the plain loss and gradients."""
    def reference(hidden, weight, target, ignore_index=-100, reduction="sum"):
        return F.cross_entropy(F.linear(hidden, weight).float(), target, ignore_index=ignore_index, reduction=reduction)

    monkeypatch.setattr(fastpath_cuda, "_fused_linear_cross_entropy", lambda: reference)
    plain, fast = tiny_lora(), tiny_lora()
    lm = fastpath_cuda._causal_lm(fast)
    assert lm is not None and fastpath_cuda._head_is_plain(lm)  # the causal LM, not the decoder peft forwards to
    fastpath_cuda.enable_varlen_attention(fast)
    assert fastpath_cuda.set_liger_loss(fast, True)  # what use_liger(fused_loss=True) sets where liger-kernel is installed
    assert fastpath_cuda.uses_liger_loss(fast)
    loss_p, grads_p = loss_and_grads(plain, collate(rows, pad_id=0))
    loss_f, grads_f = loss_and_grads(fast, collate_flat(rows))
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-4, atol=1e-6, msg=k)
    assert not fastpath_cuda.set_liger_loss(fast, False)  # the logits path again (the default), the same loss
    assert not fastpath_cuda.uses_liger_loss(fast)
    assert loss_and_grads(fast, collate_flat(rows))[0] == pytest.approx(loss_p, rel=1e-5)


def test_qlora_base_qualifies_for_varlen_and_attends_in_half_precision():
    class Cfg:
        quantization_config = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "torch.bfloat16"}

    class Base:
        config = Cfg()

    assert fastpath_cuda._is_4bit(Base())
    assert varlen_kernel.half_dtype(torch.float32) == torch.bfloat16
    assert varlen_kernel.half_dtype(torch.float16) == torch.float16


def test_flat_batch_carries_the_distillation_mask(rows):
    """collate_flat marks the same trained tokens for the distillation term as collate does, in flat order."""
    import dataclasses

    marked = [[dataclasses.replace(s, distill=i % 2 == 0) for i, s in enumerate(r)] for r in rows]
    flat, padded = collate_flat(marked), collate(marked, pad_id=0)
    per_row = [padded["distill"][i, :row_length(r)] for i, r in enumerate(marked)]
    assert torch.equal(flat["distill"][0], torch.cat(per_row))
    assert not (flat["distill"] & (flat["labels"] == IGNORE)).any()


def test_compiled_layers_keep_loss_and_gradients_and_leave_generation_alone(rows, opaque_kernel, one_torch_thread):
    """torch_compile: the varlen training forward goes through torch.compile (aot_eager here: the graph capture and
    autograd split, no C compiler), with the same loss and gradients; calls without boundaries stay uncompiled."""
    from torch._dynamo.utils import counters

    plain, fast = tiny_lora(), tiny_lora()
    for model in (plain, fast):
        fastpath_cuda.enable_varlen_attention(model)
    torch._dynamo.reset()
    counters.clear()
    assert fastpath_cuda.compile_decoder_layers(fast, backend="aot_eager") == len(fastpath_cuda.decoder_layers(fast)) >= 2
    assert fastpath_cuda.uses_compiled_layers(fast) and not fastpath_cuda.uses_compiled_layers(plain)
    assert fastpath_cuda.compile_decoder_layers(fast, backend="aot_eager") == 0  # already compiled: left as it is
    with fastpath_cuda.standard_attention(fast), torch.no_grad():  # generation: no boundaries, the layers' own forward
        fast.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert counters["stats"]["unique_graphs"] == 0
    try:
        loss_p, grads_p = loss_and_grads(plain, collate_flat(rows))
        loss_f, grads_f = loss_and_grads(fast, collate_flat(rows))
        assert 1 <= counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]  # shared by the layers
        assert loss_f == pytest.approx(loss_p, rel=1e-5)
        assert grads_p.keys() == grads_f.keys() and len(grads_p) > 0
        for k in grads_p:
            torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-4, atol=1e-6, msg=k)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("seeded", [True, False], ids=["gpu-seeded-dropout", "cpu-dropout"])
def test_compiled_layers_have_no_graph_breaks_with_lora_dropout(rows, opaque_kernel, monkeypatch, one_torch_thread,
                                                                 seeded):
    """torch_compile with LoRA dropout on the fast path's lean LoRA forward: each decoder layer is one graph, compiled
    once for every layer and every micro-batch. The seeded dropout (a GPU's) and the dropped positions (a CPU's) give
    way to torch's dropout inside the compiled layer; before, they split a two-layer model's forward into 50 graphs."""
    from torch._dynamo.utils import counters

    from workbench.fastpath import lora_dropout
    from workbench.fastpath.cpu import use_lean_lora_forward

    if seeded:  # the GPU's way, on this CPU
        linear = lora_dropout.FastDropout.linear
        monkeypatch.setattr(lora_dropout.FastDropout, "linear", lambda self, x, w, seeded=None: linear(self, x, w, True))
    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, lora_dropout=0.1, fast_path=False, device="cpu")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        assert lora_dropout.use_fast_lora_dropout(model) == use_lean_lora_forward(model) > 0
        assert fastpath_cuda.enable_varlen_attention(model)
        torch._dynamo.reset()
        counters.clear()
        try:
            assert fastpath_cuda.compile_decoder_layers(model, backend="aot_eager") >= 2
            model.train()
            graphs = []
            for shift in range(2):  # two micro-batches of other lengths and boundaries
                loss, grads = loss_and_grads(model, collate_flat(rows[shift:] + rows[:shift]))
                assert torch.isfinite(torch.tensor(loss)) and any(g.abs().sum() > 0 for g in grads.values())
                graphs.append(counters["stats"]["unique_graphs"])
            assert dict(counters["graph_break"]) == {}
            # one graph for the first layer (its input, the frozen embeddings' output, carries no gradient), one shared
            # by the others; the second micro-batch compiles nothing new
            assert graphs == [2, 2]
        finally:
            torch._dynamo.reset()


def test_compiled_layers_with_checkpointing_recompute_the_same_dropout(rows, opaque_kernel, one_torch_thread):
    """torch_compile with gradient checkpointing and LoRA dropout: the gradients are those of the same compiled model
    without checkpointing, exactly (the recomputed forward draws the first one's masks). transformers 5.23 checkpoints
    inside the layer's forward, so inside the compiled graph; 5.17 (the GPU machine's) around it, where the
    recomputation must restore the random state (this fails there with preserve_rng_state=False)."""
    from torch._dynamo.utils import counters

    def compiled(checkpointing: bool):
        cfg = Config(pretrained_model_name_or_path=TINY_MODEL, lora_dropout=0.3, fast_path=False, device="cpu")
        model = build_model(cfg, torch.device("cpu"))
        for name, p in model.named_parameters():  # a LoRA side large enough for its dropout to show in the loss
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
        assert fastpath_cuda.enable_varlen_attention(model)
        if checkpointing:
            enable_checkpointing(model)  # under the name this transformers version has for it
            model.enable_input_require_grads()
        fastpath_cuda.compile_decoder_layers(model, backend="aot_eager")
        return model.train()

    found = []
    with torch.random.fork_rng():
        for checkpointing in (False, True):
            torch._dynamo.reset()
            counters.clear()
            try:
                torch.manual_seed(0)
                model = compiled(checkpointing)
                torch.manual_seed(1)
                found.append(loss_and_grads(model, collate_flat(rows)))
                assert not counters["graph_break"] and counters["stats"]["unique_graphs"] >= 1
            finally:
                torch._dynamo.reset()
    (loss, grads), (loss_ckpt, grads_ckpt) = found
    assert loss_ckpt == loss and grads.keys() == grads_ckpt.keys()
    for k in grads:
        assert torch.equal(grads[k], grads_ckpt[k]), k


@pytest.fixture(scope="module")
def every_term():
    """The mixed recipe with every extra loss term at work (the distillation with its opening weights, the unlikelihood
    term with the role contrast and negative twins) on the tiny model: (config, its first rows, the identity's tokens)."""
    import dataclasses

    from workbench.config import load_recipe
    from workbench.train import prepare_rows
    from workbench.unlikelihood import identity_tokens

    cfg = load_recipe("smollm2_135m_lora_identity_mixed_cpu")
    cfg = cfg.replace(pretrained_model_name_or_path=TINY_MODEL, lora_dropout=0.0, fast_path=False, device="cpu",
                      negative_weight=5.0, distill_opening_factor=2.0,
                      datasets=[dataclasses.replace(d, roles=True) if d.generate else d for d in cfg.datasets])
    builder = PromptBuilder(load_tokenizer("embedded"))
    rows = prepare_rows(cfg, builder, is_main=False)[2][:6]
    flat = collate_flat(rows)
    assert set(flat["unlikelihood"].unique().tolist()) == {0, 1, 2, 3, 4} and "opening" in flat  # every term has work
    assert len(flat["distill_at"]) and len(flat["pushed_at"]) and len(flat["twin_at"])
    return cfg, rows, identity_tokens(builder, cfg.assistant_name, cfg.owner_name)


def every_term_model(cfg, varlen: bool):
    model = tiny_lora(cfg)
    if varlen:
        assert fastpath_cuda.enable_varlen_attention(model)
    return model


def test_the_flat_loss_with_every_term_equals_the_padded(every_term, emulated_kernel, one_torch_thread):
    """The extra terms on a flat micro-batch (their positions found on the host, `packing.loss_indices`; the base's
    logits only there) give the padded batch's loss and gradients (the CPU's way: boolean masks)."""
    from workbench.loss import training_loss

    cfg, rows, identity = every_term
    found = []
    for varlen, batch in ((False, collate(rows, 0)), (True, collate_flat(rows))):
        model = every_term_model(cfg, varlen)
        ce, total = training_loss(model, batch, cfg, model, identity)
        total.backward()
        found.append((ce.item(), total.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    (ce_p, total_p, grads_p), (ce_f, total_f, grads_f) = found
    assert total_f > ce_f + 1  # the extra terms count
    assert (ce_f, total_f) == (pytest.approx(ce_p, rel=1e-5), pytest.approx(total_p, rel=1e-5))
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-4, atol=1e-5, msg=k)


def test_the_flat_loss_with_every_term_never_waits_for_the_gpu(every_term, opaque_kernel, one_torch_thread):
    """The loss a GPU runs on a flat micro-batch with every extra term: forward and backward dispatch no operator that
    would make the host wait for the GPU or copy from the host (`host_waits`: nonzero, .item(), a boolean index, a
    tensor from Python data), once the first micro-batch of the run has made the penalised ids on the device."""
    from workbench.loss import training_loss
    from loss_helpers import host_waits

    cfg, rows, identity = every_term
    model, batch = every_term_model(cfg, varlen=True), collate_flat(rows)
    training_loss(model, batch, cfg, model, identity)
    assert host_waits(lambda: training_loss(model, batch, cfg, model, identity)[1].backward()) == []
    padded = collate(rows, 0)  # the CPU's padded batch finds the positions by their marks: it would wait
    assert "nonzero" in host_waits(lambda: training_loss(every_term_model(cfg, varlen=False), padded, cfg, None, identity))


def test_the_varlen_kernel_needs_an_ampere_gpu_that_runs_it(monkeypatch):
    """PyTorch's flash kernels run from compute capability 8.0: a T4 (7.5) or a V100 (7.0) keeps the masked path, as
    does a newer GPU whose first small forward and backward the kernel refuses (tried once a device, at set-up)."""
    tried = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(varlen_kernel, "kernel_runs", lambda device: tried.append(str(device)) or True)
    for capability, runs in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert varlen_kernel.available() == runs, capability
    assert tried == ["cuda:0"] * 3
    monkeypatch.setattr(varlen_kernel, "kernel_runs", lambda device: False)
    assert not varlen_kernel.available()


def test_kernel_runs_tries_a_small_forward_and_backward_once(monkeypatch):
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen_kernel, "_RUNS", {})
    calls = []

    def refusing(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(varlen, "varlen_attn", refusing)
    assert not varlen_kernel.kernel_runs("cpu") and not varlen_kernel.kernel_runs(torch.device("cpu"))
    assert len(calls) == 1, "tried once a device"
    monkeypatch.setattr(varlen_kernel, "_RUNS", {})
    monkeypatch.setattr(varlen, "varlen_attn", lambda q, k, v, cu, *a, **kw: reference_varlen(q, k, v, cu, 9, None))
    state = torch.get_rng_state()
    assert varlen_kernel.kernel_runs("cpu") and torch.equal(torch.get_rng_state(), state)  # no random numbers drawn


def test_a_gpu_without_the_varlen_kernel_keeps_transformers_attention(monkeypatch):
    """On a GPU the varlen kernel cannot serve, the fast path leaves transformers' masked attention in place, not the
    CPU's per-conversation attention (its loop over conversations waits for the GPU at every layer); on a CPU the
    same model gets that one."""
    from workbench import models
    from workbench.fastpath import cpu as fastpath

    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, lora_dropout=0.0, fast_path=True, device="cpu")
    attention = lambda m: fastpath._transformers_model(m).config._attn_implementation  # noqa: E731
    on_gpu = tiny_lora()
    with monkeypatch.context() as patched:
        patched.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # what with_fast_path asks of its weights
        models.with_fast_path(on_gpu, cfg)
    assert not varlen_kernel.available() and attention(on_gpu) == "sdpa"
    assert attention(models.with_fast_path(tiny_lora(), cfg)) == fastpath.PACKED_ATTENTION
