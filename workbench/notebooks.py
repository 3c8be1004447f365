"""Run the numbered notebook series headless with papermill, and help notebooks find their files.

`run_series` executes notebooks/01_data ... 07_overfitting in order, each with
its parameters cell overridden by papermill: every notebook gets the same
`run_dir`, so each finds the previous stage's outputs there. Executed copies and
the figures they contain go to a git-ignored output folder. Smoke mode is only a
set of parameter overrides (a tiny random model, a handful of steps, short
answers): the notebooks themselves have no smoke branch. (Notebook 02 builds its
config with `workbench.config.configure`.) Notebooks are committed clean with
`make clean-nb` (nbconvert's clear-output). The kernels draw plots inline
whatever MPLBACKEND the calling process has (CI often sets Agg; importing
Streamlit sets it too), or the executed notebooks would hold no plots. They talk
to this process over Unix sockets in Jupyter's private runtime folder, not TCP
ports on localhost (`kernel_config`): no port any local user could connect to,
and no "running over TCP without encryption" warning from every kernel. `lab`
(`make lab`) starts JupyterLab on the notebooks with its kernels the same way.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

from workbench.config import PROJECT_ROOT
from workbench.i18n import check_lang

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
CELL_TIMEOUT_S = 3600  # a cell that runs longer has hung: fail instead of waiting forever
IPC_PATH_MAX = 100  # a kernel's Unix socket path must stay under 108 bytes (Linux; 104 on macOS)
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"  # what ipykernel sets when MPLBACKEND is unset
SERIES = ("01_data", "02_config", "03_train", "04_convert", "05_merge", "06_chat_compare", "07_overfitting")

# Paths every run passes as absolute, so executed copies run from any folder (nbval re-runs them elsewhere).
PATHS = {
    "01_data": {"example_table": str(PROJECT_ROOT / "data" / "examples" / "qa_example.csv")},
}

# Parameter overrides that make the series run in a minute or two.
SMOKE = {
    "02_config": {"recipe": "smollm2_135m_tiny_smoke", "max_steps": 4, "max_length": 256,
                  "evaluation_inputs": ["Who are you?"], "baseline_max_steps": 2},
    "05_merge": {"gguf_outtype": "q8_0", "gguf_max_new_tokens": 4},
    "06_chat_compare": {"max_new_tokens": 8},
    "07_overfitting": {"max_new_tokens": 6, "heldout_limit": 4},
}


def run_series(out_dir: str | Path | None = None, smoke: bool = False, only: list[str] | None = None,
               progress: bool = True, overrides: dict[str, dict] | None = None, lang: str | None = None) -> Path:
    """Execute the series; return the folder with the executed notebooks, figures and run files.

    `overrides` maps a notebook to parameters it gets on top of the series' own,
    e.g. {"02_config": {"baseline_recipe": ""}} trains only the main recipe.
    `lang` ("en"/"zh"; None: each notebook's own, "en") is every notebook's `lang` parameter.
    """
    out = Path(out_dir) if out_dir else PROJECT_ROOT / "outputs" / f"notebooks-{datetime.now():%Y%m%d-%H%M%S}"
    out = out.resolve()
    run_dir = out / "run"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    timings = {}
    for name in SERIES:
        if only and name not in only:
            continue
        params = {**series_parameters(name, run_dir, smoke, lang), **(overrides or {}).get(name, {})}
        t0 = time.time()
        print(f"[{name}] running ...", flush=True)
        execute(NOTEBOOK_DIR / f"{name}.ipynb", out / f"{name}.ipynb", params, cwd=NOTEBOOK_DIR)
        timings[name] = round(time.time() - t0, 1)
        n = extract_figures(out / f"{name}.ipynb", out / "figures")
        print(f"[{name}] done in {timings[name]} s, {n} figure(s)", flush=True)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"executed notebooks: {out}\nfigures: {out / 'figures'}\ntotal: {sum(timings.values()):.0f} s")
    return out


def execute(notebook: str | Path, out: str | Path, parameters: dict, cwd: str | Path) -> None:
    """Run one notebook with papermill (its parameters cell overridden) into `out`: plots inline, the kernel over
    Unix sockets where it can (`kernel_config`), a cell that runs past CELL_TIMEOUT_S failing the run."""
    import papermill as pm  # heavy, and only needed to run notebooks

    with kernel_env(MPLBACKEND=INLINE_BACKEND):
        pm.execute_notebook(str(notebook), str(out), parameters=parameters, cwd=str(cwd), kernel_name="python3",
                            progress_bar=False, log_output=False, execution_timeout=CELL_TIMEOUT_S, **kernel_config())


@contextlib.contextmanager
def kernel_env(**values: str):
    """Environment variables the kernels started inside the block inherit; this process's are back after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kernel_config(runtime_dir: str | os.PathLike | None = None) -> dict:
    """papermill's keyword for a kernel over IPC: Unix sockets named `<runtime>/kernel-<random>-ipc-<n>`, in Jupyter's
    runtime folder (private to the user); {} (TCP on localhost) where the platform has no Unix sockets or their paths
    would be too long. Called once per kernel: the name is that kernel's alone.

    The sockets' path is given, not left to jupyter_client: its default there is `kernel-ipc` relative to the working
    folder, which the kernel (started in the notebooks' folder) and this process would read differently.
    """
    import secrets

    from traitlets.config import Config

    prefix = _runtime_dir(runtime_dir) / f"kernel-{secrets.token_hex(6)}-ipc"
    if not _ipc_fits(prefix):
        return {}
    prefix.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = Config()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = str(prefix)
    return {"config": config}


def _runtime_dir(runtime_dir: str | os.PathLike | None) -> Path:
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(runtime_dir if runtime_dir is not None else jupyter_runtime_dir()).resolve()


def _ipc_fits(prefix: Path) -> bool:
    """Whether a kernel's sockets `<prefix>-<n>` can be Unix sockets here (n: 1 to 5, one per channel)."""
    return os.name != "nt" and len(os.fsencode(str(prefix))) + 3 <= IPC_PATH_MAX


def lab_arguments(port: int = 8888, ip: str = "127.0.0.1") -> list[str]:
    """JupyterLab's options for `lab`: the notebooks' folder, bound to `ip` (127.0.0.1: this machine only), root
    allowed where the user is root (containers, CI), and its kernels over Unix sockets where they can be."""
    args = [f"--notebook-dir={NOTEBOOK_DIR}", f"--ServerApp.ip={ip}", f"--ServerApp.port={int(port)}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    return args + lab_kernel_arguments()


def lab_kernel_arguments(runtime_dir: str | os.PathLike | None = None) -> list[str]:
    """The option that puts a Jupyter server's kernels on Unix sockets, or none (TCP, its default).

    The server names a kernel's sockets after its connection file, `<runtime>/kernel-<uuid>-ipc-<n>` (jupyter_client
    with transport ipc and no ip given), so only the transport is set; where that path would be too long for a Unix
    socket (a long runtime folder) or the platform has none, the kernels stay on TCP.
    """
    fits = _ipc_fits(_runtime_dir(runtime_dir) / f"kernel-{uuid.UUID(int=0)}-ipc")
    return ["--KernelManager.transport=ipc"] if fits else []


def lab(port: int = 8888, ip: str = "127.0.0.1") -> int:
    """JupyterLab from this Python (the venv's: its kernel finds the workbench package) with `lab_arguments`; on
    POSIX this process becomes JupyterLab, so Ctrl-C reaches the server alone and asks it to shut down."""
    argv = [sys.executable, "-m", "jupyterlab", *lab_arguments(port, ip)]
    if os.name == "nt":
        import subprocess

        return subprocess.call(argv)
    os.execv(sys.executable, argv)
    return 0  # not reached: execv replaced this process


def series_parameters(name: str, run_dir: str | Path, smoke: bool = False, lang: str | None = None) -> dict:
    """The parameters the series gives notebook `name`: the shared run dir, absolute paths, smoke overrides, `lang`."""
    chosen = {"lang": check_lang(lang)} if lang else {}
    return {"run_dir": str(run_dir), **PATHS.get(name, {}), **(SMOKE.get(name, {}) if smoke else {}), **chosen}


def extract_figures(notebook: str | Path, folder: str | Path) -> int:
    """Write every PNG output of an executed notebook to `folder` as NAME_k.png; return how many."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    stem, k = Path(notebook).stem, 0
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                k += 1
                (Path(folder) / f"{stem}_{k}.png").write_bytes(base64.b64decode(data["image/png"]))
    return k
