"""Would a null-space adapter spare the everyday answers and not the identity? The measurement behind the README's answer.

Null-space methods (AlphaEdit; CorDA's knowledge-preserving mode in peft) keep a weight
update from reading the input directions that the data to keep uses. That spares the
everyday answers and still learns the identity only if the identity questions' inputs
lie outside those directions more than the everyday questions' do. This script measures
it on the embedded model: for every decoder layer it takes the inputs of the adapted
linear layers (attention input, attention output, MLP input, MLP down projection) over
the everyday training rows, keeps the subspace that holds a share of their energy
(uncentered second moment), and reports how much of the energy of the held-out probes'
inputs (the last prompt tokens, which choose the answer's first token) falls outside it:
unseen identity questions against everyday questions, per language.

    .venv/bin/python scripts/subspace_overlap.py          # under 3 minutes on 2 cores, 3.5 GB

Written here: no library measures this; the eigendecomposition is torch's.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from workbench.analysis import load_probes
from workbench.models import load_model, load_tokenizer, prepare_embedded_model
from workbench.prompt import PromptBuilder
from workbench.readers import read_source

ROOT = Path(__file__).resolve().parents[1]
EVERYDAY = [ROOT / "data" / "general_conversations.jsonl", ROOT / "data" / "general_conversations_zh.jsonl"]
INPUTS = {"attention input": lambda layer: layer.self_attn.q_proj, "attention output": lambda layer: layer.self_attn.o_proj,
          "MLP input": lambda layer: layer.mlp.gate_proj, "MLP down": lambda layer: layer.mlp.down_proj}


def conversations(paths: list[Path]) -> list[list[dict]]:
    """The everyday rows as chat messages, read as training reads them (`workbench.readers`)."""
    out = []
    for path in paths:
        reading = read_source(path)
        if reading.errors:
            raise reading.errors[0]
        out += [sample.messages for sample in reading.samples]
    return out


class Inputs:
    """Watches the inputs of each layer's adapted linears while the model runs: summed into their second moment
    (`energy`), or the last `last` positions kept (probes)."""

    def __init__(self, model):
        self.energy, self.kept, self.last = defaultdict(float), defaultdict(list), None
        for i, layer in enumerate(model.model.layers):
            for kind, pick in INPUTS.items():
                pick(layer).register_forward_pre_hook(self._hook((i, kind)))

    def _hook(self, key):
        def hook(_module, args):
            x = args[0][0].detach().double()
            if self.last is None:  # summed as it comes: all the rows' inputs at once would take over 15 GB
                self.energy[key] = self.energy[key] + x.T @ x
            else:
                self.kept[key].append(x[-self.last:])
        return hook

    def take(self) -> dict:
        out = {k: torch.cat(v) for k, v in self.kept.items()}
        self.kept.clear()
        return out


def outside_share(energy: dict, probes: dict, share: float) -> dict[str, dict[str, float]]:
    """Per input kind and probe set: the mean share of the probes' energy outside the subspace holding `share`."""
    out = defaultdict(lambda: defaultdict(list))
    for key, second_moment in energy.items():
        values, vectors = torch.linalg.eigh(second_moment)
        values, vectors = values.flip(0), vectors.flip(1)
        kept = int((values.cumsum(0) / values.sum() < share).sum()) + 1
        rest = vectors[:, kept:]
        for name, x in probes.items():
            out[key[1]][name].append(((x[key] @ rest).pow(2).sum() / x[key].pow(2).sum()).item())
    return {kind: {name: sum(v) / len(v) for name, v in sets.items()} for kind, sets in out.items()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.9, 0.99, 0.999], help="energy shares of the kept subspace")
    parser.add_argument("--last", type=int, default=4, help="prompt tokens measured at the end of each probe")
    args = parser.parse_args()
    path = str(prepare_embedded_model())
    tokenizer, model = load_tokenizer(path), load_model(path, torch_dtype="float32", device="cpu").eval()
    builder, inputs = PromptBuilder(tokenizer), Inputs(model)
    tokens = 0
    for messages in conversations(EVERYDAY):
        ids = builder.encode(messages).input_ids
        model(torch.tensor([ids]))
        tokens += len(ids)
    energy = dict(inputs.energy)
    print(f"everyday rows: {tokens:,} tokens")
    probes, inputs.last = load_probes(), args.last
    sets = {}
    for kind, label in (("identity_unseen", "identity"), ("general", "everyday")):
        for lang, questions in getattr(probes, kind).items():
            for question in questions:
                model(torch.tensor([builder.generation_prompt(question)]))
            sets[f"{label} {lang}"] = inputs.take()
    for share in args.shares:
        print(f"\nenergy outside the subspace holding {share:.1%} of the everyday inputs' energy")
        for kind, by_set in outside_share(energy, sets, share).items():
            print(f"  {kind:17s} " + "  ".join(f"{name} {value:.4f}" for name, value in by_set.items()))


if __name__ == "__main__":
    main()
