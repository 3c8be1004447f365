"""How wide is the strict retention measure's noise? The base model changed without learning anything.

Strict retention (workbench.retention) counts the held-out everyday probes whose first
sentence stays the base model's (token-F1 >= 0.5). Issue 23's target, 0.9 in English,
allows two changes in 26. This script asks how many changes come from no learning at all,
on a run that `workbench analyze` has measured (its analysis.json, or analysis.NAME.json for
`--probes NAME.yaml`, holds the base model's answers, which every variant here is compared with):

- `bf16`: the base model itself computed in bfloat16, as a GPU runs it (the analysis: float32);
- `random`: in every module the run adapted, a random rank-r update (Gaussian A and B) scaled
  to the Frobenius norm of the checkpoint's trained update there, times `--factor`;
- `permuted`: the checkpoint's own update with the rows of each B permuted: the same sizes and
  spectrum, other output directions.

    .venv/bin/python scripts/strict_noise_floor.py RUN [--checkpoint iter_60] [--seeds 0 1 2] [--factors 1 2] [--probes P]

About 20 s a variant on 2 cores (float32), 2 minutes for bf16. Written here: no library
perturbs an adapter this way; the answers and the measures are the workbench's own.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from workbench.analysis import ModelReport, RunAnalysis, analysis_file, evaluate_model, load_probes
from workbench.checkpoint import list_checkpoints, load_trainable
from workbench.config import load_config
from workbench.models import build_unquantized, load_builder
from workbench.retention import drifted


def lora_modules(model) -> list:
    """The adapted linear layers (peft LoRA modules with the default adapter)."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def update(m) -> torch.Tensor:
    """A module's LoRA update B A x scale (what merging adds to the weight)."""
    return m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]


def snapshot(mods: list) -> list[tuple]:
    """Each module's trained (A, B, norm of its update): what the variants are sized by and made from."""
    return [(m.lora_A["default"].weight.clone(), m.lora_B["default"].weight.clone(), update(m).norm()) for m in mods]


@torch.no_grad()
def set_random(mods: list, trained: list[tuple], factor: float, seed: int) -> None:
    """Each module's update replaced by a random rank-r one of the trained update's norm x factor."""
    g = torch.Generator().manual_seed(seed)
    for m, (a, b, norm) in zip(mods, trained):
        ra, rb = torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)
        m.lora_A["default"].weight.copy_(ra)
        m.lora_B["default"].weight.copy_(rb)
        m.lora_B["default"].weight.mul_(norm * factor / update(m).norm())


@torch.no_grad()
def set_permuted(mods: list, trained: list[tuple], seed: int) -> None:
    """Each module's trained update with the rows of its B permuted."""
    g = torch.Generator().manual_seed(seed)
    for m, (a, b, _) in zip(mods, trained):
        m.lora_A["default"].weight.copy_(a)
        m.lora_B["default"].weight.copy_(b[torch.randperm(b.shape[0], generator=g)])


@torch.no_grad()
def set_zero(mods: list) -> None:
    for m in mods:
        m.lora_B["default"].weight.zero_()


def row(label: str, rep: ModelReport, base: ModelReport) -> str:
    """A markdown row: strict EN / ZH with counts, leak, facts lost, and the English first sentences changed."""
    def general(r, lang):
        return [a["answer"] for a in r.answers if a["kind"] == "general" and a["lang"] == lang]
    cells = []
    for lang in ("en", "zh"):
        changed = drifted(general(rep, lang), general(base, lang))
        n = len(general(base, lang))
        cells.append(f"{rep.strict[lang]:.2f} ({n - len(changed)} of {n})")
    leak = " / ".join(f"{rep.leak[lang] * len(general(base, lang)):.0f}" for lang in ("en", "zh"))
    questions = [a["question"] for a in base.answers if a["kind"] == "general" and a["lang"] == "en"]
    changed_en = "; ".join(questions[i] for i in drifted(general(rep, "en"), general(base, "en")))
    lost = [q for questions in rep.facts_lost.values() for q in questions]
    facts = f"{len(lost)} ({'; '.join(lost)})" if lost else "0"
    return f"| {label} | {cells[0]} | {cells[1]} | {leak} | {facts} | {changed_en or '-'} |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a work dir that `workbench analyze` measured (analysis.json, iter_N/)")
    ap.add_argument("--checkpoint", default=None, help="the checkpoint whose update sets the sizes (default: the last)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--factors", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--no-bf16", action="store_true", help="leave out the bfloat16 variant (2 minutes on a CPU)")
    ap.add_argument("--probes", default=None, help="the probe YAML the run's analysis answered (default: the default set)")
    args = ap.parse_args(argv)

    cfg = load_config(args.run / "config.yaml")
    builder, probes = load_builder(cfg), load_probes(args.probes)
    saved = analysis_file(args.run, probes)
    if not saved.exists():
        raise SystemExit(f"{saved}: no analysis of these probes; run `workbench analyze {args.run}"
                         f"{' --probes ' + str(args.probes) if args.probes else ''}` first")
    analysis = RunAnalysis.load(saved)
    if [(a["kind"], a["lang"], a["question"]) for a in analysis.base.answers] != probes.items():
        raise SystemExit(f"{saved} answers other probes than {args.probes or 'the default set'} holds now: analyze again")
    ckpt = args.run / args.checkpoint if args.checkpoint else list_checkpoints(args.run)[-1]
    model = build_unquantized(cfg, device="cpu")
    load_trainable(model, ckpt)
    model.eval()
    mods = lora_modules(model)
    if not mods:
        raise SystemExit(f"{ckpt}: no LoRA modules (a full fine-tune has no low-rank update to size the noise by)")
    trained = snapshot(mods)

    def measure(label: str) -> None:
        rep = evaluate_model(model, builder, probes, cfg.assistant_name, cfg.owner_name, label, 0,
                             analysis.base, analysis.base_nll)
        print(row(label, rep, analysis.base), flush=True)

    print(f"{ckpt}: {len(mods)} adapted modules\n")
    print("| variant (no learning) | strict EN | strict ZH | leak EN / ZH | facts lost | English first sentences changed |")
    print("|---|---|---|---|---|---|")
    measure(f"the trained update ({ckpt.name})")
    for factor in args.factors:
        for seed in args.seeds:
            set_random(mods, trained, factor, seed)
            measure(f"random rank-{trained[0][0].shape[0]} update, x{factor:g} the trained norm, seed {seed}")
    for seed in args.seeds:
        set_permuted(mods, trained, seed)
        measure(f"the trained update, B's rows permuted, seed {seed}")
    if not args.no_bf16:
        set_zero(mods)
        model.to(torch.bfloat16)
        measure("the base model in bfloat16")


if __name__ == "__main__":
    main()
