"""The GPU fast path's token budget (token_budget.budget_tokens), checked on the CPU.

What a token of a flat micro-batch costs at the peak of a step: the layers' share (grows
with layers x hidden size) and its logits' share of the loss (grows with the vocabulary
and with the share of positions the loss takes logits at, more where the distillation
compares with the base). The logits' bytes are measured here, on a bfloat16 model through
the loss the GPU runs; the layers' were measured on an H200 (token_budget's constants).
"""
from types import SimpleNamespace

import pytest
import torch

from workbench import i18n
from workbench.fastpath import cpu as fastpath, cuda as fastpath_cuda, token_budget, varlen_kernel
from workbench.config import Config, load_recipe
from workbench.loss import training_loss
from workbench.models import build_model, load_tokenizer
from workbench.packing import collate_flat, logit_shares
from workbench.prompt import IGNORE, PromptBuilder
from workbench.train import gpu_budget, prepare_rows
from loss_helpers import layer_bytes_per_token, peak_bytes

CUDA = torch.device("cuda")
SHARES = (0.6, 0.3)  # kept, distilled


@pytest.fixture(scope="module")
def mixed():
    """The mixed recipe and its rows (identity, everyday rows distilled, Chinese everyday rows kept off the identity):
    `make bench-gpu`'s data."""
    cfg = load_recipe("smollm2_135m_lora_identity_mixed_cpu")
    return cfg, prepare_rows(cfg, PromptBuilder(load_tokenizer("embedded")), is_main=False)[2]


def tiny_lora(tiny_model: str, dtype: str = "float32", method: str = "lora", **fields):
    cfg = Config(pretrained_model_name_or_path=tiny_model, lora_dropout=0.0, fast_path=False, device="cpu",
                 torch_dtype=dtype, method=method, **fields)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model(cfg, torch.device("cpu"))


def shape(layers: int, hidden: int, vocab: int):
    """A bfloat16 model of a public shape, as budget_tokens sees it (its config and the dtype of its weights)."""
    config = SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden, vocab_size=vocab)
    return SimpleNamespace(config=config, parameters=lambda: iter([torch.zeros(1, dtype=torch.bfloat16)]))


def free_memory(monkeypatch, usable: float, model=None) -> int:
    """Fakes the free GPU memory as `usable` bytes plus what `model`'s gradients and optimizer will take; `usable`."""
    pending = token_budget.optimizer_bytes(model) if model is not None else 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(usable) + pending, 10 ** 12))
    return int(usable)


def test_group_by_budget():
    assert token_budget.group_by_budget([10, 10, 10, 10], 25) == [[0, 1], [2, 3]]
    assert token_budget.group_by_budget([30, 5, 5], 25) == [[0], [1, 2]]  # a longer row goes alone
    assert token_budget.group_by_budget([8] * 6, 1000) == [list(range(6))]
    groups = token_budget.group_by_budget([7, 3, 9, 1, 4, 6], 10)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(sum([7, 3, 9, 1, 4, 6][i] for i in g) <= 10 for g in groups)


def test_budget_tokens_on_cpu_and_requested(tiny_model):
    model = tiny_lora(tiny_model)
    assert token_budget.budget_tokens(model, 512, torch.device("cpu"), None) == (512, False)
    assert token_budget.budget_tokens(model, 512, torch.device("cpu"), 16384) == (16384, False)
    assert token_budget.budget_tokens(model, 2048, torch.device("cpu"), 1024) == (2048, False)  # at least one row


def test_logit_shares_are_the_flat_batch_positions_with_logits(mixed):
    """The shares the budget is sized with are those collate_flat's `keep` and `distill` give a micro-batch."""
    _, rows = mixed
    for chunk in (rows[:3], rows[40:60], rows):
        batch = collate_flat(chunk)
        tokens, keep = batch["input_ids"].shape[1], batch["keep"]
        kept, distilled = logit_shares(chunk)
        assert round(kept * tokens) == len(keep)
        assert round(distilled * tokens) == int(batch["distill"][0, 1:][keep].sum())
    # the data the H200's 52 floats were measured on, whose logits the layers' constant leaves out
    assert logit_shares(rows)[0] == pytest.approx(token_budget.MEASURED_KEPT_SHARE, abs=0.005)


def test_a_token_costs_its_layers_and_its_logits(tiny_model):
    """Layers plus logits, never below the H200's all-told measurement without checkpointing (the tiny model's
    vocabulary makes its logits most of a token's cost)."""
    model = tiny_lora(tiny_model)
    c = model.config
    per_float = c.num_hidden_layers * c.hidden_size * 4  # float32 weights here
    kept, distilled = SHARES
    logits = c.vocab_size * (token_budget.LOGIT_BYTES * kept + token_budget.DISTILL_LOGIT_BYTES * distilled)
    all_told = token_budget.CUDA_ACTIVATION_FLOATS * per_float
    assert token_budget.token_bytes(model, False, (0.0, 0.0), False) == all_told
    with_logits = token_budget.CUDA_LAYER_FLOATS * per_float + logits
    assert token_budget.token_bytes(model, False, SHARES, False) == pytest.approx(with_logits) and with_logits > all_told
    assert token_budget.token_bytes(model, False, SHARES, True) == all_told  # Liger's fused loss: no logits kept
    checkpointed = token_budget.CHECKPOINTED_FLOATS * per_float
    assert token_budget.token_bytes(model, True, SHARES, False) == pytest.approx(checkpointed + logits)
    assert token_budget.token_bytes(model, True, SHARES, True) == checkpointed


def test_float32_master_weights_cost_their_float32_residual_stream(tiny_model):
    """A full fine-tune with float32 master weights under bfloat16 autocast keeps more for the backward than one in
    pure bfloat16 (its residual stream stays float32): measured here a token at a time, and no more than the budget
    adds for it (MASTER_EXTRA_BYTES per layer and hidden unit, only for such a model), nor far less."""
    pure, master = tiny_lora(tiny_model, "bfloat16", "full", pure_bf16=True), tiny_lora(tiny_model, "bfloat16", "full")
    assert (pure.dtype, master.dtype) == (torch.bfloat16, torch.float32)  # models.master_weights
    c = pure.config
    per_unit = c.num_hidden_layers * c.hidden_size
    extra = layer_bytes_per_token(master, "cpu", True) - layer_bytes_per_token(pure, "cpu", False)
    assert token_budget.MASTER_EXTRA_BYTES - 2 <= extra / per_unit <= token_budget.MASTER_EXTRA_BYTES

    fastpath_cuda.set_compute_dtype(master, torch.bfloat16)
    for checkpointing, extra in ((False, token_budget.MASTER_EXTRA_BYTES * per_unit),
                                 (True, (2 * c.num_hidden_layers + token_budget.MASTER_EXTRA_BYTES) * c.hidden_size)):
        for fused in (False, True):
            assert token_budget.token_bytes(master, checkpointing, SHARES, fused) == pytest.approx(
                token_budget.token_bytes(pure, checkpointing, SHARES, fused) + extra)
    lora = tiny_lora(tiny_model, "bfloat16")  # float32 adapters on a bfloat16 base: no master weights
    assert token_budget.token_bytes(lora, False, SHARES, False) == token_budget.token_bytes(pure, False, SHARES, False)


def test_the_rule_keeps_the_h200_measurement_and_counts_a_large_vocabulary():
    """At the shape and data the H200 measured (Qwen2.5-1.5B, 65.5% of positions with logits) a token costs the 52
    floats measured, and no less at the 7B shape; at Qwen2.5-0.5B's shape, whose vocabulary is 4.6x larger per layer
    and hidden unit, with every position trained, 1.5x more (a budget sized by the 52 floats would not fit); under
    gradient checkpointing the logits are most of a token's cost unless the loss is fused."""
    measured = lambda layers, hidden: token_budget.CUDA_ACTIVATION_FLOATS * layers * hidden * 2  # noqa: E731
    kept = (token_budget.MEASURED_KEPT_SHARE, 0.0)
    qwen_1_5b = shape(28, 1536, 151936)
    assert token_budget.token_bytes(qwen_1_5b, False, kept, False) == pytest.approx(measured(28, 1536), rel=0.01)
    assert token_budget.token_bytes(shape(28, 3584, 152064), False, kept, False) == measured(28, 3584)
    assert token_budget.token_bytes(shape(24, 896, 151936), False, (1.0, 0.0), False) > 1.5 * measured(24, 896)
    assert token_budget.token_bytes(qwen_1_5b, True, kept, False) > 2.5 * token_budget.token_bytes(qwen_1_5b, True, kept, True)


def test_budget_from_free_memory_switches_checkpointing_on_only_when_needed(tiny_model, monkeypatch):
    model = tiny_lora(tiny_model)
    per_token = token_budget.token_bytes(model, False, SHARES, False)
    free = free_memory(monkeypatch, per_token * 40000 / 0.8, model)
    assert token_budget.budget_tokens(model, 2048, CUDA, None, shares=SHARES) == (int(0.8 * free / per_token), False)
    assert 39999 <= int(0.8 * free / per_token) <= 40000
    fewer = token_budget.budget_tokens(model, 2048, CUDA, None, shares=(0.9, 0.6))[0]
    assert fewer < 40000 * per_token / token_budget.token_bytes(model, False, (0.9, 0.6), False) + 1
    free = free_memory(monkeypatch, per_token * 1000 / 0.8, model)  # not one row of 1010 (the tiny model's logits are most
    tokens, checkpoint = token_budget.budget_tokens(model, 1010, CUDA, None, shares=SHARES)  # of a token's cost)
    assert checkpoint and tokens == int(0.8 * free / token_budget.token_bytes(model, True, SHARES, False)) > 1010
    assert token_budget.budget_tokens(model, 2048, CUDA, None, shares=SHARES) == (2048, True)  # at least one row


def test_the_budget_leaves_room_for_the_gradients_and_the_optimizer(tiny_model, monkeypatch):
    """Before the first step free memory still holds what the gradients and AdamW's moments will take (three times
    the trained weights: little for LoRA, all of it again three times for full fine-tuning); the micro-batch is sized
    from what is left after them."""
    lora, full = tiny_lora(tiny_model), tiny_lora(tiny_model, method="full")
    weights = sum(p.numel() * p.element_size() for p in full.parameters())
    assert token_budget.optimizer_bytes(full) == 3 * weights > 100 * token_budget.optimizer_bytes(lora) > 0
    per_token = token_budget.token_bytes(full, False, SHARES, False)
    free_memory(monkeypatch, per_token * 5000 / 0.8, full)
    assert token_budget.budget_tokens(full, 128, CUDA, None, shares=SHARES)[0] in (4999, 5000)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(per_token * 5000 / 0.8), 10 ** 12))
    assert token_budget.budget_tokens(full, 128, CUDA, None, shares=SHARES)[0] < 5000 - 0.8 * 3 * weights / per_token + 1


@pytest.mark.parametrize("liger, wrapped, distill, lang", [(True, False, False, "en"), (False, False, False, "zh"),
                                                           (True, True, False, "en"), (True, False, True, "en")],
                         ids=["liger", "no-liger-said-in-chinese", "liger-under-a-wrapper", "liger-with-distillation"])
def test_checkpointing_switched_on_by_the_budget_fuses_the_loss_where_liger_applies(tiny_model, mixed, monkeypatch,
                                                                                    capsys, liger, wrapped, distill,
                                                                                    lang):
    """A GPU with too little memory for one row: the training loop's budget switches gradient checkpointing on and,
    where Liger is applied (its kernels on CUDA; marked here), its fused loss, so that the logits cost nothing and
    the budget is sized without them. Without Liger, under a wrapper (DDP) whose forward the fused loss cannot go
    around, or with the distillation (whose loss needs the logits; the fused loss is then not switched on nor said),
    the logits are counted."""
    cfg, rows = mixed
    cfg = cfg.replace(distill_weight=5.0 if distill else 0.0, unlikelihood_weight=0.0, max_length=1010)
    monkeypatch.setattr(varlen_kernel, "available", lambda: True)
    monkeypatch.setattr(fastpath_cuda, "compute_dtype", lambda model: torch.bfloat16)
    model = tiny_lora(tiny_model)
    assert fastpath_cuda.enable_varlen_attention(model)
    if liger:
        fastpath._transformers_model(model)._wb_liger = ("rms_norm", "swiglu", "rope")  # what use_liger records
    shares = (logit_shares(rows)[0], logit_shares(rows)[1] if distill else 0.0)
    free = free_memory(monkeypatch, token_budget.token_bytes(model, False, shares, False) * 1000 / 0.8, model)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: getattr(m, "module", m)), cfg=cfg,
                              model=SimpleNamespace(module=model) if wrapped else model, device=CUDA, rows=rows,
                              dist=SimpleNamespace(is_main=True))
    before = i18n.current_lang()
    try:
        i18n.set_lang(lang)
        budget = gpu_budget(trainer)
    finally:
        i18n.set_lang(before)
    assert model.is_gradient_checkpointing
    assert fastpath_cuda.uses_liger_loss(model) == (liger and not distill)
    fused = liger and not wrapped and not distill
    assert budget == min(token_budget.MAX_BUDGET_TOKENS, int(0.8 * free / token_budget.token_bytes(model, True, shares, fused)))
    said = capsys.readouterr().out
    assert ("gradient checkpointing switched on" if lang == "en" else "已开启梯度检查点") in said and f"{budget} " in said
    assert ("fused_linear_cross_entropy" in said) == (liger and not distill)


@pytest.mark.parametrize("part", ["few distilled", "some distilled", "all distilled"])
def test_the_logit_bytes_are_what_the_loss_holds(tiny_model, mixed, one_torch_thread, part):
    """The budget's LOGIT_BYTES and DISTILL_LOGIT_BYTES against the loss itself: the peak of a step (training_loss
    and its backward on a flat micro-batch, as a GPU runs them, in bfloat16) grows with the output head's vocabulary
    by what they say (within 10%), at micro-batches with few, some and all of their trained positions distilled."""
    cfg, rows = mixed
    cfg = cfg.replace(unlikelihood_weight=0.0)
    ratio = lambda row: logit_shares([row])[1] / max(logit_shares([row])[0], 1e-9)  # noqa: E731
    ordered = sorted(rows, key=ratio)
    at = {"few distilled": 0, "some distilled": len(rows) // 2, "all distilled": len(rows) - 4}[part]
    batch = collate_flat(ordered[at:at + 4])
    model = tiny_lora(tiny_model, "bfloat16")
    lm = fastpath_cuda._causal_lm(model)
    vocabs, peaks = (4096, 8192), {}
    batch["labels"] = torch.where(batch["labels"] == IGNORE, IGNORE, batch["labels"] % vocabs[0])  # within both heads
    for vocab in vocabs:
        lm.lm_head = torch.nn.Linear(lm.config.hidden_size, vocab, bias=False, dtype=torch.bfloat16).requires_grad_(False)
        for distill in (0.0, cfg.distill_weight):
            model.zero_grad(set_to_none=True)
            peaks[vocab, distill] = peak_bytes(lambda: training_loss(model, batch, cfg.replace(distill_weight=distill),
                                                                     model)[1].backward())
    kept = len(batch["keep"])
    distilled = int(batch["distill"][0, 1:][batch["keep"]].sum())
    grown = {d: (peaks[vocabs[1], d] - peaks[vocabs[0], d]) / (vocabs[1] - vocabs[0]) for d in (0.0, cfg.distill_weight)}
    assert grown[0.0] / kept == pytest.approx(token_budget.LOGIT_BYTES, rel=0.05)
    said = token_budget.LOGIT_BYTES * kept + token_budget.DISTILL_LOGIT_BYTES * distilled
    assert 0.9 * said <= grown[cfg.distill_weight] <= 1.1 * said  # measured: 1.07, 0.97, 1.00


def test_the_estimate_on_a_gpu_counts_the_micro_batch_the_budget_lets_through(tiny_model, monkeypatch):
    """workbench.estimate on a GPU's fast path: the activations of one flat micro-batch of the step's tokens, as many
    as micro_batch_tokens or 80% of the memory the weights leave free let through, at the budget's cost of a token
    (every position trained: an upper bound); a step smaller than that is counted whole."""
    from workbench import estimate as est
    from workbench.models import resolve_model_path
    from transformers import AutoConfig

    cfg = Config(pretrained_model_name_or_path=tiny_model, torch_dtype="bfloat16", max_length=128, batch_size=4,
                 accumulative_counts=8)
    per_token = token_budget.config_token_bytes(AutoConfig.from_pretrained(resolve_model_path(tiny_model)), 2,
                                                False, (1.0, 0.0), False)
    monkeypatch.setattr(est, "pick_device", lambda name: CUDA)
    monkeypatch.setattr(varlen_kernel, "available", lambda: True)
    free = free_memory(monkeypatch, 10 ** 9)
    gpu = est.estimate(cfg, gflops=1000.0)
    resident = (gpu.weights_gb + gpu.optimizer_gb) * 1e9
    fits = int(0.8 * (free - resident) / per_token)
    assert 128 < fits < 4 * 128 * 8  # the step (4096 tokens) does not fit in one micro-batch here
    assert gpu.activations_gb * 1e9 == pytest.approx(fits * per_token)
    assert est.estimate(cfg.replace(micro_batch_tokens=1000), gflops=1000.0).activations_gb * 1e9 == pytest.approx(
        1000 * per_token)
    free_memory(monkeypatch, 10 ** 12)
    assert est.estimate(cfg, gflops=1000.0).activations_gb * 1e9 == pytest.approx(4 * 128 * 8 * per_token)
    assert est.estimate(cfg.replace(fast_path=False), gflops=1000.0).activations_gb < gpu.activations_gb  # as before
    full = est.estimate(cfg.replace(method="full", micro_batch_tokens=1000), gflops=1000.0)  # float32 master weights
    master_token = token_budget.config_token_bytes(AutoConfig.from_pretrained(resolve_model_path(tiny_model)), 2,
                                                   False, (1.0, 0.0), False, master=True)
    assert full.weight_dtype.startswith("float32") and full.activations_gb * 1e9 == pytest.approx(1000 * master_token)
