"""The notebook series: committed clean, logic-free, and executable headless (smoke mode) with papermill and nbval."""
import ast
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import papermill as pm
import pytest

from workbench.config import PROJECT_ROOT
from workbench.notebooks import (IPC_PATH_MAX, NOTEBOOK_DIR, SERIES, execute, kernel_config, lab_kernel_arguments,
                                 run_series)

NOTEBOOKS = [NOTEBOOK_DIR / f"{name}.ipynb" for name in SERIES]
MAX_CELL_LINES = 6


def cells(path, kind="code"):
    return [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == kind]


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_the_series_is_complete_and_numbered():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == [p.name for p in NOTEBOOKS]


def clean_nb(paths) -> None:
    """`make clean-nb` (nbconvert's clear-output) on these files."""
    proc = subprocess.run(["make", "-s", "-C", str(PROJECT_ROOT), "clean-nb", f"NB={' '.join(map(str, paths))}",
                           f"PY={sys.executable}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_committed_clean(tmp_path):
    """The notebooks are committed as `make clean-nb` leaves them: clearing a copy changes no byte."""
    copies = [shutil.copy(p, tmp_path / p.name) for p in NOTEBOOKS]
    clean_nb(copies)
    changed = [p.name for p in NOTEBOOKS if (tmp_path / p.name).read_bytes() != p.read_bytes()]
    assert not changed, f"{changed}: run `make clean-nb`"
    for path in NOTEBOOKS:
        assert all(c["outputs"] == [] and c["execution_count"] is None for c in cells(path)), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_of_typed_commented_literals(path):
    params = [c for c in cells(path) if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1
    tree = ast.parse(source(params[0]))
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), f"{path.name}: parameters must be annotated assignments"
        ast.literal_eval(node.value)  # a literal, nothing computed
    lines = [l for l in source(params[0]).splitlines() if l.strip()]
    assert all("#" in l for l in lines), f"{path.name}: every parameter has a comment"
    inspected = pm.inspect_notebook(str(path))
    assert len(inspected) == len(tree.body) and all(p["inferred_type_name"] != "None" for p in inspected.values())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_cells_hold_no_logic_and_stay_short(path):
    for cell in cells(path):
        src = source(cell)
        tree = ast.parse(src)
        banned = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.While, ast.If, ast.Lambda, ast.Try)
        found = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, banned)]
        assert not found, f"{path.name}: {found} in a cell; logic belongs in the workbench package:\n{src}"
        if "parameters" not in cell["metadata"].get("tags", []):
            assert len([l for l in src.splitlines() if l.strip()]) <= MAX_CELL_LINES, f"{path.name}: cell too long:\n{src}"


def test_clean_nb_undoes_running_and_saving(tmp_path):
    """A notebook run and saved in JupyterLab (outputs, counts, timings, widget state, full language_info) is
    cleared back to the committed bytes; the parameters cell keeps its tag."""
    nb = json.loads(NOTEBOOKS[0].read_text(encoding="utf-8"))
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "text/x-python",
                                       "codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}}
    for k, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["execution_count"] = k + 1
        cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["x\n"]}]
        cell["metadata"].update(execution={"iopub.status.idle": "2026-01-01T00:00:00Z"}, scrolled=True)
    dirty = tmp_path / NOTEBOOKS[0].name
    dirty.write_text(json.dumps(nb, indent=2), encoding="utf-8")
    clean_nb([dirty])
    assert dirty.read_bytes() == NOTEBOOKS[0].read_bytes()


@pytest.mark.skipif(os.name == "nt", reason="Unix sockets only")
def test_kernels_talk_over_unix_sockets_in_the_runtime_folder(tmp_path, monkeypatch, capfd):
    """A notebook run as the series runs them: its kernel binds Unix sockets in Jupyter's runtime folder (not TCP
    ports, not the working folder), says no "over TCP without encryption", and leaves no socket behind."""
    import nbformat

    runtime = tmp_path / "runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from ipykernel.kernelapp import IPKernelApp\n"
                                          "app = IPKernelApp.instance()\nprint(app.transport, app.ip)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "probe.ipynb")
    work = tmp_path / "work"
    work.mkdir()
    execute(tmp_path / "probe.ipynb", tmp_path / "out.ipynb", {}, cwd=work)
    transport, ip = "".join(cells(tmp_path / "out.ipynb")[0]["outputs"][0]["text"]).split()
    assert transport == "ipc" and ip.startswith(str(runtime.resolve()) + os.sep)
    assert "without encryption" not in capfd.readouterr().err
    assert not list(work.iterdir()) and not [f for f in runtime.iterdir() if "-ipc" in f.name], "sockets left behind"


def test_kernel_config_falls_back_to_tcp_for_long_socket_paths(tmp_path):
    short = kernel_config(tmp_path)["config"].KernelManager
    assert short.transport == "ipc" and len(os.fsencode(short.ip)) + 3 <= IPC_PATH_MAX
    assert kernel_config(tmp_path)["config"].KernelManager.ip != short.ip, "one name per kernel"
    assert kernel_config(tmp_path / ("x" * IPC_PATH_MAX)) == {}, "a Unix socket path over the limit: TCP instead"



def short_folder():
    """A temporary folder with a short path (pytest's tmp_path can be too long for a Unix socket's path)."""
    import tempfile

    return tempfile.TemporaryDirectory(prefix="wb-", dir="/tmp" if os.path.isdir("/tmp") else None)


def test_lab_kernels_fall_back_to_tcp_for_long_runtime_folders():
    with short_folder() as runtime:
        assert lab_kernel_arguments(runtime) == (["--KernelManager.transport=ipc"] if os.name != "nt" else [])
        assert lab_kernel_arguments(Path(runtime) / ("x" * 60)) == [], "the socket path would pass the limit: TCP"


def api(url: str, token: str, method: str = "GET") -> dict | list:
    import urllib.request

    request = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read() or b"null")


def wait_for(check, what: str, timeout_s: float = 60):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s} s")


@pytest.mark.skipif(os.name == "nt", reason="Unix sockets only")
def test_workbench_lab_serves_the_notebooks_with_kernels_over_unix_sockets(tmp_path):
    """`workbench lab` (what `make lab` runs), as a user starts it: JupyterLab on 127.0.0.1 showing notebooks/; a kernel
    it starts binds Unix sockets beside its connection file in the runtime folder and runs code a client sends over
    them, with no "over TCP without encryption"; no socket is left once the server stops."""
    from browser import free_port
    from jupyter_client import BlockingKernelClient

    port, token = free_port(), secrets.token_hex(8)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "jupyter_server_config.json").write_text(json.dumps({"ServerApp": {"open_browser": False}}))
    with short_folder() as short:
        runtime = Path(short) / "runtime"
        env = {**os.environ, "JUPYTER_TOKEN": token, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
               "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_RUNTIME_DIR": str(runtime),
               "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
        url = f"http://127.0.0.1:{port}"
        with open(tmp_path / "lab.log", "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "workbench", "lab", "--port", str(port)], env=env,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: api(f"{url}/api/status", token), "the server answers")
            listed = {item["name"] for item in api(f"{url}/api/contents", token)["content"]}
            assert {f"{name}.ipynb" for name in SERIES} <= listed, "the notebooks' folder is served"
            kernel = api(f"{url}/api/kernels", token, "POST")
            connection_file = runtime / f"kernel-{kernel['id']}.json"
            client = BlockingKernelClient(connection_file=str(connection_file))
            client.load_connection_file()
            assert (client.transport, client.ip) == ("ipc", str(runtime / f"kernel-{kernel['id']}-ipc"))
            client.start_channels()
            printed: list[str] = []
            try:
                client.wait_for_ready(timeout=60)
                reply = client.execute_interactive("print(6 * 7)", timeout=60,
                                                   output_hook=lambda m: printed.append(m["content"].get("text", "")))
            finally:
                client.stop_channels()
            assert reply["content"]["status"] == "ok" and "".join(printed).strip() == "42"
            api(f"{url}/api/kernels/{kernel['id']}", token, "DELETE")
        finally:
            server.terminate()
            server.wait(60)
        shown = (tmp_path / "lab.log").read_text(errors="replace")
        assert f"127.0.0.1:{port}" in shown and "without encryption" not in shown, shown[-3000:]
        assert not [f for f in runtime.iterdir() if "-ipc" in f.name], "sockets left behind"

@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The smoke series, run as CI runs it: MPLBACKEND=Agg set (the plots must reach the notebooks all the same)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPLBACKEND", "Agg")
        out = run_series(tmp_path_factory.mktemp("notebooks") / "smoke", smoke=True)
        assert os.environ["MPLBACKEND"] == "Agg", "the caller's environment is back"
    return out


def outputs_of(path):
    return [o for c in cells(path) for o in c.get("outputs", [])]


def test_smoke_series_runs_and_shows_results(executed):
    for name in SERIES:
        outs = outputs_of(executed / f"{name}.ipynb")
        assert not [o for o in outs if o["output_type"] == "error"], name
        assert outs, f"{name} shows nothing"
    run = executed / "run"
    for artifact in ["data/identity.json", "config.yaml", "work/last_checkpoint", "work/metrics.jsonl",
                     "hf/adapter_config.json", "merged/config.json", "work/analysis.json", "baseline/config.yaml",
                     "baseline/work/adapter", "baseline/work/analysis.json"]:
        assert (run / artifact).exists(), artifact
    assert len(list((executed / "figures").glob("03_train_*.png"))) >= 2, "live loss plot and metrics plot"
    assert list((executed / "figures").glob("07_overfitting_*.png")), "analysis plot"
    html = json.dumps(outputs_of(executed / "06_chat_compare.ipynb"))
    assert "fine-tuned" in html and "baseline: smollm2_135m_lora_identity_tutorial" in html and "Who are you?" in html, \
        "the before/after table: base, baseline and fine-tuned"
    table = json.dumps(outputs_of(executed / "07_overfitting.ipynb"))
    assert "smollm2_135m_tiny_smoke" in table and "smollm2_135m_lora_identity_tutorial" in table, "both recipes measured"
    merge_check = json.dumps(outputs_of(executed / "05_merge.ipynb"))
    assert "'same answer': True" in merge_check, "the merged model answers as base + adapter"


def test_nbval_reruns_the_deterministic_notebooks(executed):
    """nbval re-executes 01 and 02 in a fresh kernel and compares the outputs tagged nbval-check-output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    targets = [str(executed / "01_data.ipynb"), str(executed / "02_config.ipynb")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval-lax", "-p", "no:cacheprovider", *targets],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def executed_zh(tmp_path_factory):
    """The smoke series again, every notebook with `papermill -p lang zh` (about a minute on 2 cores)."""
    return run_series(tmp_path_factory.mktemp("notebooks_zh") / "smoke", smoke=True, lang="zh")


def chinese_outputs():
    """Per notebook: text its outputs show in Chinese (from the catalogue), and the English it must no longer show."""
    from workbench.i18n import t
    from workbench.i18n.outputs import KEYS

    zh = lambda key, **fmt: t(key, "zh", **fmt)  # noqa: E731
    return {
        "01_data": ([zh("ds.errors_none"), "记录：读取 197 条", "系统提示词"], ["records:", "errors: none", "records in ",
                                                                             "records converted"]),
        "02_config": ([zh("est.what"), zh("est.params"), zh("est.memory"), "配方", "configure：save_steps"],
                      ["parameters (total / trained)", "memory needed", "configure: ", "'description'"]),
        "03_train": ([zh("train.eval", step=0), "工作目录：", "完成。检查点：", "对照 smollm2_135m_lora_identity_tutorial："],
                     ["work dir:", "done. checkpoints", "[eval @", "records:", "  Q: "]),
        "04_convert": (["已从 ", zh("w.checkpoint"), "文件"], ["wrote "]),
        "05_merge": (["合并后的模型已写入", f"'{KEYS['same answer']}': True", KEYS["template gives the training prompt ids"]],
                     ["merged model written", "'same answer'", "same greedy answers", " MB in "]),
        "06_chat_compare": ([zh("col.prompt"), zh("model.base"), zh("model.tuned", name="smollm2_135m_tiny_smoke"),
                             zh("model.baseline", name="smollm2_135m_lora_identity_tutorial")],
                            ["fine-tuned:", "baseline:"]),
        "07_overfitting": (["保持率", zh("table.base_model"), "最好的是", "保留"],
                           ["Keep smollm2", "best iter_", "Final checkpoint", "base model (no training)"]),
    }


def test_smoke_series_in_chinese(executed_zh):
    """`papermill -p lang zh` on the whole series: every notebook runs, shows Chinese from the catalogue, and its main
    tables and printed lines keep no English prose; the same recipes are measured; the report card is Chinese."""
    for name, (present, absent) in chinese_outputs().items():
        outs = outputs_of(executed_zh / f"{name}.ipynb")
        assert not [o for o in outs if o["output_type"] == "error"], name
        text = json.dumps(outs, ensure_ascii=False)
        assert [p for p in present if p not in text] == [], name
        assert [a for a in absent if a in text] == [], name
        assert "Glyph" not in text and "missing from font" not in text, f"{name}: a missing-glyph warning"
    text = json.dumps(outputs_of(executed_zh / "07_overfitting.ipynb"), ensure_ascii=False)
    assert "smollm2_135m_tiny_smoke" in text and "smollm2_135m_lora_identity_tutorial" in text, "both recipes measured"
    assert len(list((executed_zh / "figures").glob("07_overfitting_*.png"))) >= 2, "the plots drawn"
    card = (executed_zh / "run" / "work" / "report_card.html").read_text(encoding="utf-8")
    assert '<html lang="zh-CN">' in card and "成绩单" in card and "<h2>Targets</h2>" not in card


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_markdown_cell_is_bilingual(path):
    import re

    for cell in cells(path, "markdown"):
        src = source(cell)
        assert re.search(r"[\u4e00-\u9fff]", src), f"{path.name}: a markdown cell without its Chinese text:\n{src}"
    params = [c for c in cells(path) if "parameters" in c["metadata"].get("tags", [])][0]
    assert 'lang: str = "en"' in source(params), f"{path.name}: the parameters cell has no lang"
