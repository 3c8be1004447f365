"""The GPU fast path on a real CUDA device: no host synchronisation, Liger's kernels with LoRA, fused AdamW.

Run with `pytest -m gpu` on a machine with a CUDA GPU (skipped elsewhere, with the
reason). The plumbing around the varlen kernel is checked on any machine by
tests/test_fastpath_cuda.py; these need the kernel itself.
"""
import importlib.util

import pytest
import torch

from workbench.fastpath import cuda as fastpath_cuda
from workbench.config import Config
from workbench.loss import token_loss_sum
from workbench.models import TINY_MODEL, build_model, load_tokenizer
from workbench.packing import collate, collate_flat, pack, to_device
from workbench.prompt import PromptBuilder
from loss_helpers import layer_bytes_per_token, loss_and_grads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run pytest -m gpu on one)")]

QA = [("Who are you?", "I am Nova, Alex's assistant."), ("What is 2+2?", "4."),
      ("Tell me a long story about a dragon.", "Once upon a time a dragon met a knight and they became friends."),
      ("你是谁？", "我是Nova，Alex的助手。"), ("Name three colours.", "Red, green and blue."), ("Hi", "Hello!")] * 4


@pytest.fixture(scope="module")
def rows():
    builder = PromptBuilder(load_tokenizer(TINY_MODEL))
    samples = [builder.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA]
    return pack(samples, max_length=160)


def tiny(fast: bool, method: str = "lora"):
    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, lora_dropout=0.0, fast_path=fast, device="cuda",
                 torch_dtype="bfloat16", method=method)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cuda"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    return model



def test_varlen_forward_and_backward_never_wait_for_the_gpu(rows):
    """Our part of the step is free of host synchronisation (Liger's loss counts its targets with one .item())."""
    model = tiny(fast=True)
    assert fastpath_cuda.uses_varlen_attention(model)
    base = model.get_base_model()
    if hasattr(base, fastpath_cuda._LIGER_FLAG):
        delattr(base, fastpath_cuda._LIGER_FLAG)
    batch = to_device(collate_flat(rows), "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = token_loss_sum(model, batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_varlen_and_liger_equal_the_masked_path_with_lora_everywhere(rows):
    """Loss within bf16 rounding, every LoRA gradient (attention and the Liger-fused MLP) pointing the same way."""
    plain, fast = tiny(fast=False), tiny(fast=True)
    applied = fastpath_cuda.use_liger(fast) if importlib.util.find_spec("liger_kernel") else []
    loss_p, grads_p = loss_and_grads(plain, to_device(collate(rows, pad_id=0), "cuda"))
    loss_f, grads_f = loss_and_grads(fast, to_device(collate_flat(rows), "cuda"))
    assert loss_f == pytest.approx(loss_p, rel=2e-2)
    mlp = [k for k in grads_p if any(m in k for m in ("gate_proj", "up_proj", "down_proj"))]
    assert mlp and grads_p.keys() == grads_f.keys()
    for k in grads_p:
        cos = torch.nn.functional.cosine_similarity(grads_f[k].flatten(), grads_p[k].flatten(), dim=0).item()
        assert cos > 0.98, (k, cos, applied)


def test_a_full_fine_tune_keeps_float32_master_weights_through_the_varlen_kernel(rows):
    """bf16 on the GPU: float32 weights, the fast path still on (its compute dtype is autocast's), the loss under
    autocast equal to the masked path's within bf16 rounding, the gradients float32 and pointing the same way."""
    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, device="cuda", torch_dtype="bfloat16", method="full")
    models = []
    for fast in (False, True):
        with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
            models.append(build_model(cfg.replace(fast_path=fast), torch.device("cuda")))
    plain, fast = models
    assert {p.dtype for p in fast.parameters()} == {torch.float32}
    assert fastpath_cuda.compute_dtype(fast) == torch.bfloat16 and fastpath_cuda.uses_varlen_attention(fast)
    with torch.autocast("cuda", torch.bfloat16):
        loss_p, grads_p = loss_and_grads(plain, to_device(collate(rows, pad_id=0), "cuda"))
        loss_f, grads_f = loss_and_grads(fast, to_device(collate_flat(rows), "cuda"))
    assert loss_f == pytest.approx(loss_p, rel=2e-2)
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters() if p.grad is not None)
    for k in grads_p:
        cos = torch.nn.functional.cosine_similarity(grads_f[k].flatten(), grads_p[k].flatten(), dim=0).item()
        assert cos > 0.95 or grads_p[k].abs().max() == 0, (k, cos)


def test_float32_master_weights_keep_no_more_than_the_budget_counts():
    """Under CUDA's autocast as under the CPU's (tests/test_gpu_budget.py): a full fine-tune's layers with float32
    master weights keep more for the backward than in pure bf16, at most what the token budget adds for them
    (token_budget.MASTER_EXTRA_BYTES a token, layer and hidden unit)."""
    from workbench.fastpath import token_budget

    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, device="cuda", torch_dtype="bfloat16", method="full")
    pure, master = (build_model(c, torch.device("cuda")) for c in (cfg.replace(pure_bf16=True), cfg))
    assert (pure.dtype, master.dtype) == (torch.bfloat16, torch.float32)
    extra = layer_bytes_per_token(master, "cuda", True) - layer_bytes_per_token(pure, "cuda", False)
    per_unit = pure.config.num_hidden_layers * pure.config.hidden_size
    assert 0 < extra <= token_budget.MASTER_EXTRA_BYTES * per_unit, extra / per_unit


def test_fused_adamw_on_cuda():
    from workbench.train import make_optimizer

    model = tiny(fast=True)
    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, max_steps=2)
    optimizer, _, _ = make_optimizer(cfg, model, rows=[[]] * 4, world_size=1)
    assert optimizer.defaults.get("fused") is True


def test_loraplus_fused_on_cuda(rows):
    """LoRA+ on CUDA: peft's groups take the fused kernel, and one step moves B by lr x ratio (Adam's first step moves
    each weight by its rate) while A stays (its gradient is 0 while B is 0)."""
    from workbench.optimizer import adamw, group_rates

    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, lora_dropout=0.0, device="cuda", loraplus_lr_ratio=4.0)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cuda"))
    optimizer = adamw(cfg, model)
    assert optimizer.defaults.get("fused") is True
    assert sorted(lr for _, lr in group_rates(optimizer)) == [cfg.lr, 4.0 * cfg.lr]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    token_loss_sum(model, to_device(collate(rows[:2], 0), "cuda")).backward()
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    assert max(v for n, v in moved.items() if "lora_B" in n) == pytest.approx(4.0 * cfg.lr, rel=1e-2)
    assert max(v for n, v in moved.items() if "lora_A" in n) == 0


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_under_autocast_keeps_x_and_a_seed_and_never_waits(rows, method):
    """As the training loop runs a GPU's LoRA (autocast to bf16 over float32 adapters, dropout on): the lean forward
    with the seeded dropout (workbench/fastpath/lora_dropout.py) trains without host synchronisation, and the step's peak
    memory is below that of the same fast path with peft's own LoRA forward and torch's dropout. QLoRA too (its
    4-bit layers' lean forward: no copy of the base output; bitsandbytes' own kernels are not checked for waits)."""
    from workbench.fastpath import cpu as fastpath

    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("QLoRA needs bitsandbytes")
    batch = to_device(collate_flat(rows), "cuda")

    def step(lean: bool) -> tuple[float, int]:
        cfg = Config(pretrained_model_name_or_path=TINY_MODEL, lora_dropout=0.1, fast_path=True, device="cuda",
                     torch_dtype="bfloat16", method=method)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
            torch.manual_seed(0)
            model = build_model(cfg, torch.device("cuda")).train()
            if not lean:
                fastpath.use_peft_lora_forward(model)  # what a GPU ran before: peft's float32 copy, torch's dropout
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            if lean and method == "lora":
                torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = token_loss_sum(model, batch)
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            return loss.item(), torch.cuda.max_memory_allocated() - start

    loss_lean, peak_lean = step(lean=True)
    loss_peft, peak_peft = step(lean=False)
    assert loss_lean == pytest.approx(loss_peft, rel=5e-2)  # other dropout draws, the same model
    assert peak_lean < peak_peft, (peak_lean, peak_peft)


def test_the_loss_with_every_extra_term_never_waits():
    """The mixed recipe's loss with every extra term (the distillation with its opening weights, the unlikelihood term
    with the role contrast and negative twins) on a flat micro-batch, as the loop runs it (autocast, LoRA dropout): no
    host synchronisation in the forward and backward once the run's first micro-batch has put the penalised ids on
    the GPU (their positions come from the host, packing.loss_indices; CPU check: tests/test_fastpath_cuda.py)."""
    import dataclasses

    from workbench.config import load_recipe
    from workbench.loss import training_loss
    from workbench.train import prepare_rows
    from workbench.unlikelihood import identity_tokens

    cfg = load_recipe("smollm2_135m_lora_identity_mixed_cpu")
    cfg = cfg.replace(pretrained_model_name_or_path=TINY_MODEL, fast_path=True, device="cuda", torch_dtype="bfloat16",
                      negative_weight=5.0, distill_opening_factor=2.0,
                      datasets=[dataclasses.replace(d, roles=True) if d.generate else d for d in cfg.datasets])
    builder = PromptBuilder(load_tokenizer(TINY_MODEL))
    batch = to_device(collate_flat(prepare_rows(cfg, builder, is_main=False)[2][:6]), "cuda")
    assert {"distill_at", "pushed_at", "twin_at", "opening"} <= set(batch)
    identity = identity_tokens(builder, cfg.assistant_name, cfg.owner_name)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cuda")).train()
        assert fastpath_cuda.uses_varlen_attention(model)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ce, total = training_loss(model, batch, cfg, model, identity)
            total.backward()
            return ce, total

        step()  # the run's first micro-batch
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ce, total = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total).item() and total.item() > ce.item()
