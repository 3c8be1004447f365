"""Read the pickles DeepSpeed and FSDP write into a checkpoint's engine_state/, running no code.

The workbench's own checkpoint files are safetensors and JSON (workbench/checkpoint.py). Under
DeepSpeed and FSDP, accelerate's save_state adds the engines' own files, and their loaders unpickle
them as they are: a planted file would run code on `--resume`. So:
- `weights_only_load`: DeepSpeed's torch files through torch's weights-only unpickler, which builds
  tensors, plain containers and the few DeepSpeed classes its ZeRO checkpoints hold (DEEPSPEED_CLASSES);
  it replaces DeepSpeed's checkpoint engine's `load` while accelerate loads (distributed.py);
- `check_dcp_metadata`: FSDP's `.metadata` (PyTorch distributed checkpoint), which torch reads with a
  plain `pickle.load`, is read first by a restricted unpickler (Python's documented way to restrict
  globals) allowing the checkpoint-metadata classes, torch's sizes, dtypes and layouts and paths only.
A file holding anything else is refused with `CheckpointError` naming the file and what it holds.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import torch

from workbench.checkpoint import CheckpointError

# What torch.serialization.get_unsafe_globals_in_checkpoint lists in ZeRO-2 and ZeRO-3 checkpoints (fp16 runs
# keep the dynamic loss scaler); torch's weights-only unpickler builds them from their fields once allowed.
DEEPSPEED_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")

# What FSDP2's sharded model and optimizer metadata hold besides the classes of DCP_METADATA_MODULE (read from
# real ones: tests/test_safe_unpickle.py writes them with fully_shard and torch.distributed.checkpoint).
DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
DCP_GLOBALS = frozenset({
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))})


def _named_classes(names: tuple[str, ...]) -> list[type]:
    """The classes that import here (another DeepSpeed version may lack one: a file holding it is then refused)."""
    found = []
    for module, name in (n.rsplit(".", 1) for n in names):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


def weights_only_load(path, map_location=None, allowed: tuple[str, ...] = DEEPSPEED_CLASSES):
    """torch.load through the weights-only unpickler with `allowed` classes besides tensors and containers."""
    try:
        with torch.serialization.safe_globals(_named_classes(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        other = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
        raise CheckpointError(
            f"{path}: holds {', '.join(other) or 'code the weights-only unpickler refuses'}, so the workbench does "
            f"not load it (it could run code). A DeepSpeed checkpoint the workbench wrote holds tensors, plain "
            f"containers and {', '.join(n.rsplit('.', 1)[1] for n in allowed)} only") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: damaged or not a torch file ({exc})") from exc


class _Refused(pickle.UnpicklingError):
    """A global the FSDP metadata may not hold."""


def _dcp_allowed(module: str, name: str) -> bool:
    if (module, name) in DCP_GLOBALS:
        return True
    if module == DCP_METADATA_MODULE:  # its dataclasses and enums: data only
        return isinstance(getattr(importlib.import_module(module), name, None), type)
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if not _dcp_allowed(module, name):
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def check_dcp_metadata(path: Path) -> None:
    """Refuse an FSDP `.metadata` file that holds more than checkpoint metadata, before torch unpickles it."""
    try:
        with open(path, "rb") as f:
            _DcpMetadataUnpickler(f).load()
    except _Refused as exc:
        raise CheckpointError(
            f"{path}: holds {exc}, so the workbench does not load it (it could run code). FSDP's checkpoint "
            "metadata holds torch.distributed.checkpoint's metadata classes, sizes, dtypes and paths only") from exc
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: damaged or not FSDP checkpoint metadata ({type(exc).__name__}: {exc})") from exc
