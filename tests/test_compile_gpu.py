"""`torch_compile` on a CUDA GPU (`pytest -m gpu`; skipped without one): the decoder layers through Inductor.

As the training loop runs a GPU's LoRA: bf16 base under autocast, float32 adapters, LoRA dropout on, the varlen
kernel, Liger's kernels where installed. Each layer must compile whole (no graph break: on 2026-12-04 the LoRA
dropout split every layer into pieces, and compiling outran its 91 s box on an H200), the layers must share their
graphs, a micro-batch of other lengths must compile nothing new, and the loss must be the uncompiled model's.
scripts/gpu_check.sh runs this file last: Inductor takes tens of seconds. The same checks without a compiler
(aot_eager, on any machine) are in tests/test_fastpath_cuda.py.
"""
import importlib.util

import pytest
import torch

from workbench.fastpath import cuda as fastpath_cuda
from workbench.config import Config
from workbench.loss import token_loss_sum
from workbench.models import TINY_MODEL, build_model, load_tokenizer
from workbench.packing import collate_flat, pack, to_device
from workbench.prompt import PromptBuilder
from test_fastpath_gpu import QA

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run pytest -m gpu on one)")]

def training_model():
    cfg = Config(pretrained_model_name_or_path=TINY_MODEL, lora_dropout=0.1, fast_path=True, device="cuda",
                 torch_dtype="bfloat16")
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cuda")).train()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    if importlib.util.find_spec("liger_kernel"):
        fastpath_cuda.use_liger(model)
    return model


def loss_and_gradients(model, batch) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters() if p.requires_grad]


def test_compiled_layers_on_cuda_compile_whole_and_keep_the_loss():
    from torch._dynamo.utils import counters

    builder = PromptBuilder(load_tokenizer(TINY_MODEL))
    rows = pack([builder.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA],
                max_length=160)
    batches = [to_device(collate_flat(rows[shift:] + rows[:shift]), "cuda") for shift in (0, 1)]
    plain, compiled = training_model(), training_model()
    torch._dynamo.reset()
    counters.clear()
    try:
        assert fastpath_cuda.uses_varlen_attention(compiled)
        assert fastpath_cuda.compile_decoder_layers(compiled) == len(fastpath_cuda.decoder_layers(compiled)) >= 2
        graphs = []
        for batch in batches:
            loss_c, grads = loss_and_gradients(compiled, batch)
            graphs.append(counters["stats"]["unique_graphs"])
            assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
            # the dropout masks differ (the compiler draws its own): only the loss, which the rank-8 side moves little
            assert loss_c == pytest.approx(loss_and_gradients(plain, batch)[0], rel=2e-2)
        assert dict(counters["graph_break"]) == {}
        assert graphs[0] == graphs[1] <= 2, graphs  # the first layer's graph and the one the others share
    finally:
        torch._dynamo.reset()
