"""Shared by the export tests: an adapter made without a training run, and plain-client subprocesses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from workbench.config import load_recipe
from workbench.convert import export_trained
from workbench.models import load_model, load_tokenizer
from workbench.prompt import builder_for

SYSTEM = 'You are Nova, Alex\'s assistant. Answer "briefly".'


def make_adapter(base: str, out: Path, system: str = SYSTEM, seed: int = 0, scale: float = 0.05):
    """(adapter folder, the in-memory PeftModel, builder): a LoRA on `base` with random B matrices, exported as training does.

    LoRA's B starts at zero, so random B values stand in for a trained adapter: the export must carry
    a visible change of the logits. The config's system prompt is not the template's own default.
    """
    from peft import LoraConfig, get_peft_model

    cfg = load_recipe("smollm2_135m_tiny_smoke").replace(pretrained_model_name_or_path=base, system=system, name="nova_test")
    model = load_model(base, torch_dtype="float32", device="cpu")
    torch.manual_seed(seed)  # LoRA's A matrices are drawn here, B below: the same adapter every run
    peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                  target_modules="all-linear", task_type="CAUSAL_LM", bias="none"))  # as training builds it
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
    builder = builder_for(cfg, load_tokenizer(base))
    export_trained(peft_model, builder, cfg, out, fp32=True)
    return out, peft_model.eval(), builder


def randomize_lora_b(model, seed: int = 0, scale: float = 0.5) -> None:
    """Fill a PeftModel's LoRA B matrices (zero after init) with seeded noise, so the adapter changes the answers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def run_plain(code: str, env_extra: dict, timeout: int = 300) -> dict:
    """Run `code` in a fresh interpreter that cannot import the workbench; it prints one JSON line last."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORKBENCH_CACHE") and not k.startswith("HF_")}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env_extra})
    prelude = "import sys; sys.modules['workbench'] = None  # the check uses plain transformers/peft only\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
