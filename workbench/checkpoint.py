"""Checkpoints: save, restore, list and find them; the `last_checkpoint` pointer; a fresh work dir.

A checkpoint is a folder iter_N (N = optimizer steps done) in the work dir:

    trainable.safetensors    the weights that train (LoRA A/B, or every weight for method full)
    optimizer.safetensors    AdamW's state: tensors, with the rest (param groups) as JSON in the header
    scheduler.json           the learning-rate schedule's position
    rng_R.safetensors        process R's random generators (python, numpy, torch, cuda)
    state.json               step, elapsed time, method, processes and rows per step, float16's loss scale
    config.yaml              the run's config
    engine_state/            DeepSpeed/FSDP only: accelerate's save_state (optimizer split over processes)

The workbench's own files are no pickles: safetensors and JSON hold data only, so
a checkpoint folder from someone else cannot run code when it is resumed. A
checkpoint that holds pickle files beside them (*.pt, the format of older
workbench versions, or planted) is refused with `CheckpointError`, as is a state
that does not fit the model or optimizer (wrong parameter count or shapes, a
truncated file). The files DeepSpeed and FSDP write into engine_state/ are
pickles; they are read running no code, and a file that holds more than their
data is refused too (workbench/safe_unpickle.py).

The folder is written to a temporary sibling and renamed into place, and the
pointer file `last_checkpoint` is updated after that, so a run killed during a
save keeps its previous checkpoint usable.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from workbench.config import Config, ConfigError, save_config
from workbench.io import atomic_dir, atomic_write_text

LAST_POINTER = "last_checkpoint"
ENGINE_STATE = "engine_state"
PREFIX = "iter_"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
SCHEDULER = "scheduler.json"
STATE = "state.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin")
TREE_KEY = "workbench_state"  # safetensors header entry holding the non-tensor part as JSON


class CheckpointError(ValueError):
    """A checkpoint cannot be used (unsafe, corrupt, or not of this model/optimizer); the message names the file."""


# ---------------------------------------------------------------------------
# Names, the pointer and the work dir
# ---------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def checkpoint_step(path_or_name: str | os.PathLike) -> int:
    """N of a checkpoint folder iter_N."""
    name = Path(path_or_name).name
    digits = name[len(PREFIX):]
    if not name.startswith(PREFIX) or not digits.isdigit():
        raise CheckpointError(f"{path_or_name}: not a checkpoint name (iter_N)")
    return int(digits)


def list_checkpoints(work: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a work dir, oldest first."""
    found = [p for p in Path(work).glob(f"{PREFIX}*") if (p / STATE).exists() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def last_checkpoint(work: str | os.PathLike) -> Path | None:
    """The checkpoint the `last_checkpoint` pointer names, or None when there is none."""
    pointer = Path(work) / LAST_POINTER
    if not pointer.exists():
        return None
    ckpt = Path(work) / pointer.read_text(encoding="utf-8").strip()
    return ckpt if (ckpt / STATE).exists() else None


def write_pointer(work: Path, ckpt: Path) -> None:
    atomic_write_text(work / LAST_POINTER, ckpt.name + "\n")


def find_resume_checkpoint(work: Path, resume: bool | str) -> Path:
    """`resume` True/"auto": the last checkpoint of `work`; a path or name: that checkpoint."""
    if isinstance(resume, str) and resume not in ("", "auto"):
        p = Path(resume)
        p = p if p.exists() else work / resume
        if not (p / STATE).exists():
            raise FileNotFoundError(f"{p} is not a workbench checkpoint (no {STATE})")
        return p
    pointer = work / LAST_POINTER
    if not pointer.exists():
        raise FileNotFoundError(f"nothing to resume in {work}: no {LAST_POINTER} file (was a checkpoint ever saved?)")
    ckpt = work / pointer.read_text(encoding="utf-8").strip()
    if not (ckpt / STATE).exists():
        kept = [c.name for c in list_checkpoints(work)]
        raise FileNotFoundError(f"{pointer} names {ckpt.name}, which is not a checkpoint there (no {ckpt / STATE}); "
                                + (f"checkpoints kept: {', '.join(kept)}: resume one with --resume {kept[-1]}"
                                   if kept else "no checkpoint is kept there"))
    return ckpt


def check_fresh_work_dir(work: Path, fresh: bool) -> None:
    """A new run never writes over a run: refuse a work dir that holds checkpoints, unless resuming."""
    if fresh and (work / LAST_POINTER).exists():
        raise FileExistsError(f"{work} already holds a run (see {work / LAST_POINTER}). Continue it with --resume, "
                              f"or choose another --work-dir; nothing was overwritten.")


def prune_checkpoints(work: Path, limit: int) -> None:
    """Keep the newest `limit` checkpoints (all when limit < 0)."""
    if limit < 0:
        return
    for old in list_checkpoints(work)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def read_state(ckpt: Path) -> dict:
    """The checkpoint's state.json (step, elapsed_s, method, world_size, rows_per_step)."""
    try:
        return json.loads((Path(ckpt) / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{Path(ckpt) / STATE}: unreadable ({e})") from None


def check_same_plan(ckpt: Path, plan) -> None:
    """A run resumes with the rows per step it was trained with (processes x batch_size x accumulative_counts)."""
    state = read_state(ckpt)
    saved = state.get("rows_per_step")
    if saved is not None and saved != plan.rows_per_step:
        raise ConfigError(f"{ckpt} was trained with {saved} rows per step ({state.get('world_size')} processes x "
                          f"batch_size x accumulative_counts); this run has {plan.rows_per_step} ({plan.world_size} "
                          f"processes x {plan.batch_size} x {plan.accumulative_counts}). Resume with the same number of "
                          f"processes, or change batch_size/accumulative_counts so the product is the same.")


# ---------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------
def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(target: Path, model, optimizer, scheduler, step: int, elapsed: float, cfg: Config,
                    rng: dict | None = None, weights: dict[str, torch.Tensor] | None = None, plan=None,
                    scaler=None) -> Path:
    """Write iter_N atomically: trainable weights, optimizer, scheduler, RNG, step and the config.

    `weights` are the gathered trainable weights when the model holds only shards;
    `optimizer` is None when its state is saved as engine_state/ by all processes;
    `scaler`: float16's loss scaler (accelerate's GradScaler, None otherwise), whose scale and growth count a resumed
    run needs to skip and grow at the steps an uninterrupted one does.
    """
    state = {"step": step, "elapsed_s": elapsed, "method": cfg.method}
    if plan is not None:
        state.update(world_size=plan.world_size, rows_per_step=plan.rows_per_step)
    if scaler is not None and scaler.is_enabled():
        state["grad_scaler"] = scaler.state_dict()  # numbers only
    with atomic_dir(target, overwrite=True) as tmp:
        save_rng(tmp, 0, rng)
        save_file(weights if weights is not None else trainable_state_dict(model), str(tmp / TRAINABLE))
        if optimizer is not None:
            write_state_file(optimizer.state_dict(), tmp / OPTIMIZER)
        write_state_file(scheduler.state_dict(), tmp / SCHEDULER)
        (tmp / STATE).write_text(json.dumps(state) + "\n")
        save_config(cfg, tmp / "config.yaml")
    return target


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_rng(folder: Path, rank: int, rng: dict | None = None) -> None:
    """This process's random generators (or `rng`, taken earlier) as folder/rng_{rank}.safetensors."""
    write_state_file(rng or rng_state(), folder / f"rng_{rank}.safetensors")


# ---------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------
def load_trainable(model, ckpt: Path) -> None:
    """Load a checkpoint's trainable weights into a model built from the same config."""
    path = Path(ckpt) / TRAINABLE
    state = _read_safetensors(path)
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = set(expected) - set(state)
    if missing:
        raise CheckpointError(f"{path}: lacks {len(missing)} trainable weights (e.g. {sorted(missing)[0]}); "
                              f"was it made with another config?")
    wrong = [n for n, p in expected.items() if tuple(state[n].shape) != tuple(p.shape)]
    if wrong:
        raise CheckpointError(f"{path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model's is "
                              f"{tuple(expected[wrong[0]].shape)} ({len(wrong)} weights differ); was it made with another config?")
    model.load_state_dict(state, strict=False)


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, rank: int = 0, verbose: bool = True, scaler=None) -> int:
    """Restore model, optimizer, scheduler, float16's loss scaler and this process's RNG; return the step to continue
    from. model and optimizer may be None when an engine state (DeepSpeed, FSDP) restored them.
    """
    ckpt = Path(ckpt)
    refuse_pickles(ckpt)
    if optimizer is not None and not (ckpt / OPTIMIZER).exists() and (ckpt / ENGINE_STATE).is_dir():
        raise CheckpointError(f"{ckpt} has no {OPTIMIZER}: it was written under DeepSpeed/FSDP; resume it with the same accelerate config")
    if model is not None:
        load_trainable(model, ckpt)
    if optimizer is not None:
        load_optimizer(optimizer, ckpt / OPTIMIZER)
    _load_into(scheduler, ckpt / SCHEDULER)
    rng = ckpt / f"rng_{rank}.safetensors"
    if rng.exists():
        set_rng_state(read_state_file(rng), rng)
    state = read_state(ckpt)
    if scaler is not None and scaler.is_enabled() and "grad_scaler" in state:
        load_scaler(scaler, state["grad_scaler"], ckpt / STATE)
    step = state["step"]
    if verbose:
        print(f"resuming from {ckpt} at step {step}")
    return step


SCALER_FIELDS = {"scale": float, "growth_factor": float, "backoff_factor": float, "growth_interval": int,
                 "_growth_tracker": int}  # torch.amp.GradScaler.state_dict()


def load_scaler(scaler, saved, path: Path) -> None:
    """A loss scaler's state from a checkpoint's state.json, each field checked (a finite number, > 0 but the count)."""
    for name, kind in SCALER_FIELDS.items():
        value = saved.get(name) if isinstance(saved, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf") \
                or (kind is int and value != int(value)) or (name != "_growth_tracker" and value == 0):
            bound = ">= 0" if name == "_growth_tracker" else "> 0"
            raise CheckpointError(f"{path}: grad_scaler.{name} must be a finite {kind.__name__} {bound}, got {value!r}")
    scaler.load_state_dict({name: kind(saved[name]) for name, kind in SCALER_FIELDS.items()})


def refuse_pickles(ckpt: Path) -> None:
    """A checkpoint the workbench wrote holds no pickle; one that does is refused before anything is read."""
    found = sorted(p for p in ckpt.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if found:
        raise CheckpointError(
            f"{found[0]}: a pickle file, which can run code when loaded, so the workbench does not load it "
            f"(checkpoints hold safetensors and JSON only; pickles come from workbench versions before this "
            f"format, or were planted). The trainable weights of {ckpt} ({TRAINABLE}) still convert with "
            f"`workbench convert pth_to_hf`; to continue training, start a new run.")


def load_optimizer(optimizer, path: Path) -> None:
    """Load an optimizer state after checking it fits: the same groups, parameter counts and shapes."""
    state = read_state_file(path)
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict) and isinstance(state.get("param_groups"), list)):
        raise CheckpointError(f"{path}: not an optimizer state (no state / param_groups)")
    groups, saved = optimizer.param_groups, state["param_groups"]
    counts, saved_counts = [len(g["params"]) for g in groups], [len(g.get("params", ())) for g in saved]
    if counts != saved_counts:
        raise CheckpointError(f"{path}: holds the state of {sum(saved_counts)} parameters in groups {saved_counts}, "
                              f"this run's optimizer has {sum(counts)} in {counts}; was it made with another config?")
    params = [p for g in groups for p in g["params"]]
    for index, entry in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise CheckpointError(f"{path}: state entry {index!r} names no parameter of this optimizer")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                raise CheckpointError(f"{path}: {key} of parameter {index} has shape {tuple(value.shape)}, the "
                                      f"parameter's is {tuple(params[index].shape)}; was it made with another config?")
    _load_state_dict(optimizer, state, path)


def _load_into(obj, path: Path) -> None:
    _load_state_dict(obj, read_state_file(path), path)


def _load_state_dict(obj, state, path: Path) -> None:
    try:
        obj.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path}: does not fit this run's {type(obj).__name__} ({e})") from None


def set_rng_state(state, path: Path) -> None:
    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a random generator state ({e})") from None


# ---------------------------------------------------------------------------
# State files: tensors in safetensors, everything else as JSON (no pickle, nothing that runs code)
# ---------------------------------------------------------------------------
def write_state_file(obj, path: Path) -> None:
    """obj (nested dicts, lists, tuples, numbers, strings, tensors, numpy arrays) to .safetensors or .json."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(obj, tensors, ""))
    if path.suffix == ".json":
        if tensors:
            raise TypeError(f"{path}: a .json state cannot hold tensors ({', '.join(tensors)})")
        path.write_text(tree + "\n", encoding="utf-8")
    else:
        save_file(tensors, str(path), metadata={TREE_KEY: tree})


def read_state_file(path: Path):
    """What write_state_file wrote; CheckpointError naming the file when it is missing or corrupt."""
    if not path.exists():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        if path.suffix == ".json":
            return _decode(json.loads(path.read_text(encoding="utf-8")), {})
        with safe_open(str(path), "pt") as f:
            tree = (f.metadata() or {}).get(TREE_KEY)
        if tree is None:
            raise ValueError(f"no {TREE_KEY} entry in its header")
        return _decode(json.loads(tree), _read_safetensors(path))
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{path}: unreadable or corrupt ({e})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: unreadable or corrupt ({e})") from None


def _encode(obj, tensors: dict, key: str):
    if isinstance(obj, torch.Tensor):
        tensors[key or "tensor"] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key or "tensor"}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, list)):
        items = [_encode(v, tensors, f"{key}.{i}" if key else str(i)) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}" if key else k) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, ""), _encode(v, tensors, f"{key}.{k}" if key else str(k))]
                              for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint state")


def _decode(node, tensors: dict):
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"unexpected {type(node).__name__}")
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        dtype = np.dtype(str(node["dtype"]))
        if dtype.kind not in "biuf":
            raise TypeError(f"an array of {dtype} (only numbers are stored)")
        return np.array(node["__ndarray__"], dtype=dtype)
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__items__" in node:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in node["__items__"]}
    return {k: _decode(v, tensors) for k, v in node.items()}


def _hashable(key):
    if isinstance(key, (list, dict)):
        raise TypeError("a dict key must be a number or a string")
    return key
