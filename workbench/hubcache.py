"""Public ids for the local models, and their place in the standard Hugging Face hub cache.

Exports record their base model by a portable name instead of a path into this
checkout's `.cache/`: the embedded model by its public id
`HuggingFaceTB/SmolLM2-135M-Instruct`, the tiny test model by the local id
`workbench-local/tiny-random` (not a hub repository: it only exists in a local
cache). `register_snapshot` lays a prepared model folder out the way the hub
client caches downloads,

    $HF_HUB_CACHE (or $HF_HOME/hub, or ~/.cache/huggingface/hub)/
      models--HuggingFaceTB--SmolLM2-135M-Instruct/
        refs/main                 the revision below
        snapshots/<revision>/     symbolic links to the prepared files

so plain transformers and peft find the model by its id without a network
(`HF_HUB_OFFLINE=1`). `workbench prepare-model` does this for the embedded
model. A leaf module: it imports nothing from the workbench.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_HUB_ID = "workbench-local/tiny-random"


def hub_cache_dir() -> Path:
    """The hub cache the Hugging Face libraries read, from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def _revision(folder: Path) -> str:
    """A 40-hex revision naming this copy: a hash of its file names, sizes and modification times."""
    h = hashlib.sha1()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def register_snapshot(folder: str | os.PathLike, repo_id: str, cache: str | os.PathLike | None = None) -> Path:
    """Make `repo_id` resolve to `folder` in the hub cache (links, no copies); returns the snapshot folder.

    Idempotent; a changed folder gets a new revision and refs/main points at it.
    """
    src = Path(folder).resolve()
    repo = repo_folder(repo_id, Path(cache) if cache else None)
    rev = _revision(src)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if not p.is_file():
            continue
        link = snap / p.name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == p:
                continue
            link.unlink()
        link.symlink_to(p)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    tmp = repo / "refs" / ".main.tmp"
    tmp.write_text(rev, encoding="utf-8")
    os.replace(tmp, repo / "refs" / "main")
    return snap


def registered_snapshot(repo_id: str, cache: str | os.PathLike | None = None) -> Path | None:
    """The snapshot folder refs/main names, when `repo_id` is in the hub cache with a config.json."""
    repo = repo_folder(repo_id, Path(cache) if cache else None)
    ref = repo / "refs" / "main"
    if not ref.exists():
        return None
    snap = repo / "snapshots" / ref.read_text(encoding="utf-8").strip()
    return snap if (snap / "config.json").exists() else None
