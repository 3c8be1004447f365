"""The sides `make bench` compares: which runner script each is, with which options, and its name in the tables.

A workbench (`run_workbench.py`), B the tutorial's PEFT + Trainer script as written
(gradient checkpointing on), C the same script with checkpointing off (the
reference), T TRL's `SFTTrainer` with its defaults (packing, completion-only loss,
its default gradient checkpointing) and T' the same with checkpointing off.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Side:
    script: str
    args: tuple[str, ...]
    label: str
    name: str  # in the tables


SIDES = {
    "workbench": Side("run_workbench.py", (), "the workbench's default training path", "workbench"),
    "baseline": Side("baseline_peft.py", ("--gradient-checkpointing",),
                     "the tutorial's PEFT + Trainer script as written (gradient checkpointing on)", "PEFT baseline"),
    "baseline_no_ckpt": Side("baseline_peft.py", (), "reference: the same script with gradient checkpointing off",
                             "PEFT baseline, no checkpointing"),
    "trl": Side("baseline_trl.py", (), "TRL SFTTrainer as the docs teach it: packing (BFD), completion-only loss, "
                "LoRA peft_config, TRL's default gradient checkpointing", "TRL SFTTrainer"),
    "trl_no_ckpt": Side("baseline_trl.py", ("--no-gradient-checkpointing",),
                        "the same SFTTrainer with gradient_checkpointing=False", "TRL SFTTrainer, no checkpointing"),
}
REFERENCE = "baseline_no_ckpt"
TRL_SIDES = ("trl", "trl_no_ckpt")
SIDE_NAMES = {key: side.name for key, side in SIDES.items()}
