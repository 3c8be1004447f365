"""The notebook series in a real browser: JupyterLab from the venv, headless Chromium, every cell run through the UI.

JupyterLab is started the way `make lab` starts it (the venv's Python, bound to
127.0.0.1, kernels over Unix sockets where the runtime folder allows, a random
token, a free port) with `window.jupyterapp` exposed, at a
temporary copy of notebooks/ whose parameters papermill has set to smoke mode
(`papermill --prepare-only`: parameters injected, nothing executed), all seven
sharing one run dir, as `workbench run-notebooks --smoke` runs them. For each
notebook in order (a test that comes first runs the notebooks before its own),
the browser opens it, runs all cells (the "Run All" command) and waits for the
kernel; then it checks what a student would see: no error in
any cell, every widget rendered (not "Error displaying widget", not a text repr
like "HBox(children=...)"), no widget label cut off; in 06 it types a long
question into the chat panel and presses Send, then a short one and presses
Enter (each answered once in every column), and the panel's n columns must
share the width (each at least 1/(n+1) of the panel) without a horizontal
scrollbar. A screenshot of each notebook goes to outputs/screenshots/notebooks/
(git-ignored) for a person to look at.

Needs /usr/bin/chromium and /usr/bin/chromedriver; skipped with the install
command where they are missing. Marked slow: it runs the whole series (about
2.5 minutes on 2 cores); `make test` and `make test-browser` run it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import papermill as pm
import pytest

from browser import chromium, free_port, require_chromium
from workbench.notebooks import NOTEBOOK_DIR, SERIES, lab_kernel_arguments, series_parameters

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "outputs" / "screenshots" / "notebooks"
WIDTH, HEIGHT = 1400, 1000  # a laptop-sized window; the file browser stays open beside the notebook
STARTUP_S, RUN_S, RENDER_S = 240, 900, 60  # generous limits on a busy 2-core machine (the test never measures speed)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# What a widget shows when no widget manager renders it: its repr, e.g. "HBox(children=(...))" or "Output()".
WIDGET_REPR = re.compile(r"^(?:HBox|VBox|Box|Output|HTML|Label|Button|Text|Textarea|Dropdown|Checkbox|ToggleButtons|"
                         r"IntSlider|FloatSlider|FloatLogSlider|IntText|FloatText|FloatProgress|IntProgress)\(", re.M)


# ---------------------------------------------------------------------------
# JupyterLab, and the notebooks in smoke mode
# ---------------------------------------------------------------------------
def smoke_copies(folder: Path) -> Path:
    """notebooks/ copied to `folder` with the smoke parameters injected (not executed); one run dir for all."""
    folder.mkdir(parents=True)
    for name in SERIES:
        pm.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(folder / f"{name}.ipynb"),
                            parameters=series_parameters(name, folder.parent / "run", smoke=True),
                            prepare_only=True, kernel_name="python3", progress_bar=False, log_output=False)
    return folder


def fresh_user(home: Path) -> dict:
    """Environment variables for a Jupyter user with no history; news and update checks off (no network)."""
    settings = home / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    dirs = {"JUPYTER_CONFIG_DIR": "config", "JUPYTER_DATA_DIR": "data", "JUPYTER_RUNTIME_DIR": "runtime",
            "JUPYTERLAB_SETTINGS_DIR": "lab-settings", "JUPYTERLAB_WORKSPACES_DIR": "workspaces", "IPYTHONDIR": "ipython"}
    return {var: str(home / sub) for var, sub in dirs.items()}


class JupyterLab:
    """`python -m jupyterlab` from the venv on 127.0.0.1 with a token, waited for until its API answers."""

    def __init__(self, root_dir: Path, home: Path):
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "jupyterlab.log"
        env = {**{k: v for k, v in os.environ.items() if k != "MPLBACKEND"},  # a fresh user's kernels plot inline
               **fresh_user(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        args = ["--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root_dir}",
                "--ServerApp.open_browser=False", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
                "--ServerApp.allow_root=True",  # CI runs as root in a container
                *lab_kernel_arguments(env["JUPYTER_RUNTIME_DIR"])]  # kernels over Unix sockets, as `make lab`'s
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", *args], cwd=root_dir, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyterlab exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"jupyterlab did not start within {STARTUP_S} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-5000:]

    def stop(self) -> None:
        """SIGTERM: the server shuts its kernels down and exits."""
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_chromium()  # before starting JupyterLab for nothing
    home = tmp_path_factory.mktemp("lab")
    server = JupyterLab(smoke_copies(home / "notebooks"), home)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(lab):
    """JupyterLab in Chromium, logged in with the token, on a reset workspace."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(WIDTH, HEIGHT)
    driver.set_script_timeout(STARTUP_S)
    try:
        driver.get(f"{lab.url}/lab?reset&token={lab.token}")
        WebDriverWait(driver, STARTUP_S).until(lambda d: d.execute_script("return !!window.jupyterapp"))
        driver.execute_async_script("const done = arguments[0]; window.jupyterapp.restored.then(() => done(true));")
        yield driver
    finally:
        driver.quit()


# ---------------------------------------------------------------------------
# A notebook, run through the UI
# ---------------------------------------------------------------------------
OPEN = """
const [path, done] = arguments;
(async () => {
  const app = window.jupyterapp;
  const w = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
  await w.context.ready;
  await w.sessionContext.ready;
  app.shell.activateById(w.id);
  window.__notebook = w;
  done(null);
})().catch(e => done(String(e)));
"""

# The kernel's status, and per code cell: its execution count, prompt and outputs (the notebook model's JSON).
STATE = """
const w = window.__notebook, cells = [];
const model = w.content.model.cells;
for (let i = 0; i < model.length; i++) {
  const c = model.get(i);
  if (c.type !== 'code') continue;
  const prompt = w.content.widgets[i].node.querySelector('.jp-InputPrompt');
  cells.push({index: i, count: c.executionCount, prompt: prompt ? prompt.textContent : '', outputs: c.outputs.toJSON()});
}
const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
return {status: kernel ? kernel.status : 'none', cells};
"""

# What the student sees: widget outputs and whether each rendered, text of every output, cut labels, the chat panel.
VIEW = """
const w = window.__notebook, node = w.content.node, mime = arguments[0], widgets = [];
w.content.widgets.forEach((cell, i) => {  // each widget output as its renderer shows it
  if (!cell.outputArea) return;
  for (let j = 0; j < cell.outputArea.model.length; j++) {
    if (!(mime in cell.outputArea.model.get(j).data)) continue;
    const o = cell.outputArea.widgets[j].node.querySelector('.jp-OutputArea-output'), text = o ? o.textContent : '';
    const state = !o ? 'missing' : o.querySelector(':scope > .jupyter-widgets') ? 'shown'
      : o.classList.contains('lm-mod-hidden') ? 'closed'  // the kernel closed the widget (e.g. a finished progress bar)
      : text.startsWith('Loading widget') ? 'pending' : 'error';
    widgets.push({cell: i, state, text: text.slice(0, 200)});
  }
});
const outputs = Array.from(node.querySelectorAll('.jp-OutputArea-output'))  // a cell's own, not those inside widgets
  .filter(o => o.closest('.jp-OutputArea').classList.contains('jp-Cell-outputArea'));
const labels = Array.from(node.querySelectorAll('.widget-label'))
  .filter(l => l.clientWidth > 0 && l.textContent.trim())
  .map(l => ({text: l.textContent, scroll: l.scrollWidth, client: l.clientWidth}));
const rect = e => { const r = e.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; };
const panels = Array.from(node.querySelectorAll('.wb-chat-columns')).map(p => ({
  panel: rect(p),
  columns: Array.from(p.querySelectorAll(':scope > .wb-chat-column')).map(c => {
    const out = c.querySelector('.widget-output') || c;  // the answers' box inside the column
    const sideways = [c, ...c.querySelectorAll('*')].filter(e => e.scrollWidth > e.clientWidth + 1
      && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX)).length;  // boxes showing a horizontal scrollbar
    return {...rect(c), answers: out.getBoundingClientRect().width, sideways, text: c.innerText.slice(0, 80)}; })}));
return {
  texts: outputs.map(o => o.innerText),
  widgets,
  labels, panels,
};
"""

# The notebook's scrolling element: scrolled to the top, its content height and visible height.
SCROLL_TOP = """
const n = window.__notebook.content.node;
const s = n.closest('.jp-WindowedPanel-outer') || n.querySelector('.jp-WindowedPanel-outer') || n;
s.scrollTop = 0;
return [s.scrollHeight, s.clientHeight];
"""

CLOSE = """
const done = arguments[0], w = window.__notebook;
w.sessionContext.shutdown().then(() => { w.dispose(); done(null); }, e => done(String(e)));
"""


# Typed into 06's chat panel: long enough to wrap, with a word too long for a column (a path, as students paste).
LONG_QUESTION = ("Please explain in a few sentences what a learning rate is, why a very high one makes the training loss "
                 "jump around, and whether the file /home/student/work_dirs/smollm2_135m_lora_identity_cpu/iter_40/"
                 "adapter_model.safetensors is the checkpoint I should keep?")


def wait_for(driver, predicate, timeout: float, what: str, poll: float = 1.0):
    """Poll predicate(driver) until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate(driver):
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout} s")


def errors_in(state: dict) -> list[str]:
    """Error outputs, and tracebacks written to stderr, with the cell they are in."""
    found = []
    for cell in state["cells"]:
        for out in cell["outputs"]:
            if out["output_type"] == "error":
                found.append(f"cell {cell['index']}: {out['ename']}: {out['evalue']}")
            elif out["output_type"] == "stream" and out["name"] == "stderr" and "Traceback" in "".join(out["text"]):
                found.append(f"cell {cell['index']} stderr: {''.join(out['text'])[-500:]}")
    return found


def finished(driver) -> dict | None:
    """The state once the kernel is idle and no cell is pending: every cell ran, or one failed and Run All stopped."""
    state = driver.execute_script(STATE)
    pending = [c for c in state["cells"] if "*" in c["prompt"]]
    done = all(c["count"] is not None for c in state["cells"]) or errors_in(state)
    return state if state["status"] == "idle" and not pending and done else None


def run_all(driver, path: str) -> dict:
    """Open the notebook, wait for its kernel, run all cells through the UI; the state twice seen finished."""
    assert (error := driver.execute_async_script(OPEN, path)) is None, f"opening {path}: {error}"
    wait_for(driver, lambda d: d.execute_script("return window.__notebook.sessionContext.session.kernel.status") == "idle",
             STARTUP_S, f"{path}: kernel idle")
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    wait_for(driver, finished, RUN_S, f"{path}: all cells run")
    time.sleep(2)  # the kernel goes idle between cells: finished means seen finished twice, 2 s apart
    return wait_for(driver, finished, RUN_S, f"{path}: all cells run")


def widget_outputs(state: dict) -> int:
    """How many of the cells' outputs are widgets (in the notebook model)."""
    return sum(WIDGET_MIME in out.get("data", {}) for c in state["cells"] for out in c["outputs"])


def ask_chat_panel(driver, question: str, how: str = "send") -> None:
    """Type a question into the chat panel and send it as a student does: `how` is "send" (the Send button),
    "enter", or "edited" (the box left with the question's first words in it, come back to, completed, Enter);
    wait until every column shows the whole question, once."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, ".wb-chat-panel input[type='text']")
    if how == "send":
        box.send_keys(question)
        send, = [b for b in driver.find_elements(By.CSS_SELECTOR, ".wb-chat-panel button") if b.text == "Send"]
        send.click()
    elif how == "enter":
        box.send_keys(question + Keys.RETURN)
    else:
        first, rest = question.rsplit(" ", 1)
        box.send_keys(first)
        driver.find_element(By.CSS_SELECTOR, ".wb-chat-panel .wb-chat-column b").click()  # the box left
        time.sleep(1)  # its text reaches the kernel
        box.click()
        box.send_keys(Keys.END + " " + rest + Keys.RETURN)
    words = " ".join(question.split())

    def answered(d):
        columns = d.find_elements(By.CSS_SELECTOR, ".wb-chat-panel .wb-chat-column")
        return (box.get_attribute("value") == "" and all(" ".join(c.text.split()).count(words) == 1 for c in columns)
                and d.execute_script("return window.__notebook.sessionContext.session.kernel.status") == "idle")
    try:
        wait_for(driver, answered, RUN_S, f"the chat panel answers, once, a question sent with {how}")
    except AssertionError as e:
        shown = [" ".join(c.text.split()) for c in driver.find_elements(By.CSS_SELECTOR, ".wb-chat-panel .wb-chat-column")]
        raise AssertionError(f"{e}; the text box holds {box.get_attribute('value')!r}, the columns show {shown}") from None


def wait_rendered(driver, state: dict) -> None:
    """Until every widget output shows a widget view (or RENDER_S has passed: the checks then say what is missing)."""
    deadline = time.monotonic() + RENDER_S
    while time.monotonic() < deadline:
        shown = driver.execute_script(VIEW, WIDGET_MIME)["widgets"]
        if len(shown) == widget_outputs(state) and not [w for w in shown if w["state"] in ("pending", "missing")]:
            return
        time.sleep(1)


def screenshot(driver, name: str) -> Path:
    """The whole notebook: the window made as tall as the notebook's content, then captured."""
    content, visible = driver.execute_script(SCROLL_TOP)
    driver.set_window_size(WIDTH, min(HEIGHT + content - visible, 16000))
    time.sleep(2)  # layout and content-visibility settle
    driver.execute_script(SCROLL_TOP)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"could not write {path}"
    return path


def run_in_browser(page, name: str) -> tuple[dict, dict]:
    """Run All on one notebook as a student would (06: also ask the chat panel); (kernel state, what the page shows)."""
    state = run_all(page, f"{name}.ipynb")
    try:
        if name == "06_chat_compare":
            ask_chat_panel(page, LONG_QUESTION)
            ask_chat_panel(page, "What can you do for me?", how="enter")
            ask_chat_panel(page, "Who made you?", how="edited")
        wait_rendered(page, state)
        screenshot(page, name)
        view = page.execute_script(VIEW, WIDGET_MIME)  # measured with the whole notebook in the (tall) window
    finally:
        page.set_window_size(WIDTH, HEIGHT)
        page.execute_async_script(CLOSE)
    return state, view


@pytest.fixture(scope="module")
def series(page):
    """`series(name)`: the notebook's run, each notebook run once and in series order whichever test asks first
    (a notebook reads what the ones before it wrote to the run dir), so every test passes alone and in any order."""
    runs: dict[str, tuple[dict, dict]] = {}

    def run_up_to(name: str) -> tuple[dict, dict]:
        for earlier in SERIES[: SERIES.index(name) + 1]:
            if earlier not in runs:
                runs[earlier] = run_in_browser(page, earlier)
        return runs[name]

    return run_up_to


@pytest.mark.parametrize("name", SERIES)
def test_notebook_runs_in_jupyterlab(series, name):
    """Run All in the browser: no error, widgets rendered, labels whole, chat columns sharing the panel; a screenshot."""
    state, view = series(name)
    assert not (problems := problems_seen(name, state, view)), f"{name}:\n" + "\n".join(problems)


def problems_seen(name: str, state: dict, view: dict) -> list[str]:
    """Everything wrong in one notebook as the browser shows it (all of it, so one run reports every problem)."""
    problems = errors_in(state)
    problems += [f"cell {c['index']} did not run" for c in state["cells"] if c["count"] is None]
    if len(view["widgets"]) != widget_outputs(state):
        problems.append(f"{widget_outputs(state)} widget outputs, {len(view['widgets'])} in the page: {view['widgets']}")
    problems += [f"widget not rendered: {w}" for w in view["widgets"] if w["state"] not in ("shown", "closed")]
    shown = "\n".join(view["texts"])
    if "Error displaying widget" in shown:
        problems.append("a widget failed to render: Error displaying widget")
    problems += [f"a widget shown as text: {r}..." for r in WIDGET_REPR.findall(shown)]
    problems += [f"label cut off: {label}" for label in view["labels"] if label["scroll"] > label["client"]]
    if name == "06_chat_compare" and not view["panels"]:
        problems.append("the chat panel is not shown")
    for panel in view["panels"]:
        width, columns = panel["panel"]["width"], panel["columns"]
        if len(columns) < 2:
            problems.append(f"the chat panel has {len(columns)} column(s)")
        problems += [f"chat column narrower than 1/{len(columns) + 1} of the panel's {width:.0f} px: {col}"
                     for col in columns if min(col["width"], col["answers"]) < width / (len(columns) + 1)]
        problems += [f"chat column with a horizontal scrollbar: {col}" for col in columns if col["sideways"]]
        if len({round(col["y"]) for col in columns}) > 1:
            problems.append(f"chat columns not side by side: {columns}")
    return problems
