"""Library chatter silenced, so that the workbench's own progress bars and messages stay readable in a notebook.

Called before a model is loaded or written (workbench/models.py):
- transformers' per-tensor "Loading weights" bar;
- a bitsandbytes note about an optional download-only CPU kernel;
- a peft and a torch deprecation warning;
- DeepSpeed's warning that it guessed its CPU accelerator: transformers' `save_pretrained`
  imports DeepSpeed (installed for `--deepspeed`) through accelerate in every process that
  writes a model; with a CPU build of torch DeepSpeed is told its accelerator instead.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch


def quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging  # heavy: transformers is imported when a model is

    if torch.version.cuda is None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning)
