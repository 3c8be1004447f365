"""`workbench web` in a real browser: headless Chromium (Debian's package) driven by selenium.

The server is started as a subprocess, the way a user starts it; the browser
types questions and presses send; the streamed answers must equal what
`workbench.chat.answer` gives for the same model, question, history and
settings (greedy). With --compare the two columns must both be there, side by
side and of equal width; "Clear chat" must empty the history. Screenshots go to
outputs/screenshots/ (git-ignored).

Needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install -y chromium
chromium-driver fonts-noto-cjk); skipped with that message where they are missing.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlsplit
from pathlib import Path

import pytest
import torch

from browser import INSTALL, chromium, free_port
from export_helpers import randomize_lora_b
from workbench.chat import GenerationSettings, answer, load_chat_model
from workbench.config import load_recipe
from workbench.convert import export_trained
from workbench.models import TINY_MODEL, load_model, load_tokenizer
from workbench.prompt import builder_for

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "outputs" / "screenshots"
CURSOR = "▌"  # the page's cursor at the end of an answer being streamed
TRAINED_SYSTEM = "You are Nova, the assistant of Alex (web test prompt)."
OTHER_SYSTEM = "You are a pirate. Answer like one."
# Greedy, short, and a repetition penalty: the tiny random model then says varied things instead of newlines.
TINY_SETTINGS = GenerationSettings(max_new_tokens=12, repetition_penalty=2.0)
STARTUP_S, ANSWER_S = 240, 240  # generous limits on a busy 2-core machine (not timings: the test never measures speed)

# ---------------------------------------------------------------------------
# The server and the browser
# ---------------------------------------------------------------------------
class WebServer:
    """`python -m workbench web ARGS --port P` as a subprocess, waited for until it answers its health check."""

    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "workbench", "web", *args, "--port", str(self.port)],
                                         cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"workbench web exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=5) as r:
                    if r.read().strip() == b"ok":
                        return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"workbench web did not start within {STARTUP_S} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class ChatPage:
    """The chat page, as a user sees it: elements found by Streamlit's test ids and the page's keys."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        if "performance" in driver.log_types:
            driver.get_log("performance")  # drained: requested_urls lists this page's requests, not an earlier page's
        driver.get(url)
        self.wait = WebDriverWait(driver, ANSWER_S)
        self.wait.until(lambda d: self._all("textarea[data-testid='stChatInputTextArea']"))

    def _all(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def one(self, css: str):
        self.wait.until(lambda d: self._all(css))
        return self._all(css)[0]

    def ask(self, question: str) -> None:
        """Type the question and press the send button."""
        self.wait_idle()
        self.one("textarea[data-testid='stChatInputTextArea']").send_keys(question)
        self.one("[data-testid='stChatInputSubmitButton']").click()

    def answer(self, label: str, turn: int) -> str:
        """The finished answer of column `label` at `turn` (the page shows it keyed once streaming is over).

        Read once the page script has finished: on a busy machine the keyed element can
        appear a moment before its text does.
        """
        from selenium.common.exceptions import TimeoutException

        css = f".st-key-answer-{label}-{turn} [data-testid='stChatMessageContent']"
        self.one(css)
        self.wait_idle()
        try:  # the text node is filled in after the element (textContent: whether or not it is in view)
            self.wait.until(lambda d: self._all(css) and self._all(css)[0].get_attribute("textContent").strip())
        except TimeoutException:
            return ""
        return self._all(css)[0].get_attribute("textContent")

    def wait_idle(self) -> None:
        """Until the page script has finished (the question box is enabled again after a send)."""
        self.wait.until(lambda d: self.one("textarea[data-testid='stChatInputTextArea']").is_enabled())

    def streaming_text(self, label: str) -> str | None:
        """The answer of column `label` while it streams (it ends with the cursor), or None once all are finished."""
        for element in self._all(f".st-key-column-{label} [data-testid='stChatMessageContent']"):
            try:
                text = element.text
            except Exception:  # replaced by the finished page meanwhile
                continue
            if text.endswith(CURSOR):
                return text[:-len(CURSOR)]
        return None

    def messages(self) -> list:
        return self._all("[data-testid='stChatMessage']")

    def system_prompt(self) -> str:
        return self.one(".st-key-system textarea").get_attribute("value")

    def set_system_prompt(self, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.one(".st-key-system textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(text)
        box.send_keys(Keys.CONTROL, Keys.ENTER)  # Streamlit applies a text area on Ctrl+Enter
        self.wait.until(lambda d: self.system_prompt() == text)

    def set_number(self, key: str, value: int) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.one(f".st-key-{key} input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.ENTER)
        self.wait.until(lambda d: self.one(f".st-key-{key} input").get_attribute("value") == str(value))

    def clear(self) -> None:
        self.one(".st-key-clear button").click()
        self.wait.until(lambda d: not self.messages())

    def requested_urls(self) -> set[str]:
        """Every URL the page has requested since it was opened (Chromium's network log)."""
        import json

        urls = set()
        for entry in self.driver.get_log("performance"):
            event = json.loads(entry["message"])["message"]
            if event["method"] == "Network.requestWillBeSent":
                urls.add(event["params"]["request"]["url"])
        return urls

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / name
        assert self.driver.save_screenshot(str(path)), f"could not write {path}"
        return path


def same_text(shown: str, expected: str) -> bool:
    """The browser's rendering of the text equals the text (the browser folds runs of white space)."""
    return " ".join(shown.split()) == " ".join(expected.split())


# ---------------------------------------------------------------------------
# The tiny model: fine-tuned (a random LoRA adapter) against its base, side by side
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """The tiny model with a LoRA adapter whose B matrices are random, saved as training saves it (prompt.json
    holding TRAINED_SYSTEM): it answers differently from its base, so the two columns can be told apart."""
    from peft import LoraConfig, get_peft_model

    cfg = load_recipe("smollm2_135m_tiny_smoke").replace(system=TRAINED_SYSTEM)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    torch.manual_seed(0)  # peft draws the A matrices
    model = get_peft_model(load_model(TINY_MODEL, device="cpu"), lora)
    randomize_lora_b(model)
    folder = tmp_path_factory.mktemp("web") / "adapter"
    return export_trained(model.eval(), builder_for(cfg, load_tokenizer(TINY_MODEL)), cfg, folder, fp32=True)


@pytest.fixture(scope="module")
def tiny_server(adapter_dir, tmp_path_factory):
    s = TINY_SETTINGS
    server = WebServer([TINY_MODEL, "--adapter", str(adapter_dir), "--compare", TINY_MODEL, "--device", "cpu",
                        "--max-new-tokens", str(s.max_new_tokens), "--repetition-penalty", str(s.repetition_penalty)],
                       tmp_path_factory.mktemp("web-log") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    driver = chromium(network_log=True)
    yield driver
    driver.quit()


def test_web_chat_in_chromium(browser, tiny_server, adapter_dir, one_torch_thread):
    """Two turns in both columns equal `answer` with history; equal columns; the trained system prompt; clear."""
    tuned = load_chat_model(TINY_MODEL, str(adapter_dir), device="cpu")
    base = load_chat_model(TINY_MODEL, device="cpu", system=TRAINED_SYSTEM)  # the page asks both with one system prompt
    page = ChatPage(browser, tiny_server.url)
    assert page.system_prompt() == TRAINED_SYSTEM, "the page starts with the system prompt the adapter was trained with"

    left, right = page.one(".st-key-column-tuned"), page.one(".st-key-column-base")
    assert left.text.startswith(f"Fine-tuned\n{TINY_MODEL} + {adapter_dir}") and right.text.startswith(f"Base\n{TINY_MODEL}")
    assert left.rect["x"] < right.rect["x"] and abs(left.rect["y"] - right.rect["y"]) < 2, "side by side"
    assert abs(left.rect["width"] - right.rect["width"]) <= 0.02 * left.rect["width"], "columns of equal width"
    assert left.rect["width"] > 300

    questions = ["Who are you?", "And who made you?"]
    histories = {"tuned": [], "base": []}
    for turn, question in enumerate(questions):
        page.ask(question)
        for label, (model, builder) in (("tuned", tuned), ("base", base)):
            expected = answer(model, builder, question, histories[label], TINY_SETTINGS, on_text=lambda t: None)
            shown = page.answer(label, turn)
            assert expected.strip(), "the tiny model says something (else the comparison means nothing)"
            assert same_text(shown, expected), f"{label} turn {turn}: page {shown!r} != answer() {expected!r}"
            histories[label].append((question, expected))
        page.wait_idle()
    assert histories["tuned"] != histories["base"], "the adapter changes the answers: the columns show two models"
    assert len(page.messages()) == 2 * 2 * len(questions)  # a question and an answer per turn, per column
    page.screenshot("web_chat.png")
    web = {u for u in page.requested_urls() if urlsplit(u).scheme in ("http", "https", "ws", "wss")}
    assert any(u.startswith(tiny_server.url) for u in web)
    outside = {u for u in web if urlsplit(u).netloc != f"127.0.0.1:{tiny_server.port}"}
    assert not outside, f"the page asked other hosts (it must work with no network): {sorted(outside)}"

    page.clear()
    assert not page.messages(), "Clear chat empties the history"
    # An edited system prompt and max new tokens apply to both models; after clearing there are no previous turns.
    page.set_system_prompt(OTHER_SYSTEM)
    page.set_number("max_new_tokens", 6)
    page.ask(questions[1])
    settings = dataclasses.replace(TINY_SETTINGS, max_new_tokens=6)
    differs = []
    for label, (model, builder) in (("tuned", tuned), ("base", base)):
        expected = answer(model, dataclasses.replace(builder, system=OTHER_SYSTEM), questions[1], None, settings,
                          on_text=lambda t: None)
        assert same_text(page.answer(label, 0), expected), label
        differs.append(expected != answer(model, builder, questions[1], None, settings, on_text=lambda t: None))
    assert any(differs), "the system prompt changes an answer: the check above can tell which prompt was used"
    assert len(page.messages()) == 2 * 2
    page.wait_idle()


def test_web_binds_loopback_only(tiny_server):
    """The default host is 127.0.0.1: not reachable on another address, not even 127.0.0.2 (loopback too, on Linux)."""
    others = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for address in others | {"127.0.0.2"}:
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((address, tiny_server.port)) != 0, f"reachable on {address}"


def test_web_command_defaults_and_streamlit_options(monkeypatch):
    """`workbench web` binds 127.0.0.1:7860 unless told otherwise; Streamlit is told not to collect usage statistics."""
    # importing streamlit sets MPLBACKEND=Agg in this process's environment: put it back after the test, or kernels
    # started later (the notebook tests) inherit it and show no plots
    monkeypatch.delenv("MPLBACKEND", raising=False)  # monkeypatch restores what was there before
    from workbench.cli import build_parser
    from workbench.web import streamlit_options

    args = build_parser().parse_args(["web", "embedded"])
    assert (args.host, args.port, args.compare, args.adapter, args.system) == ("127.0.0.1", 7860, None, None, None)
    options = streamlit_options(args.host, args.port)
    assert options["server.address"] == "127.0.0.1" and options["server.port"] == 7860
    assert options["browser.gatherUsageStats"] is False and options["server.headless"] is True
    assert streamlit_options("0.0.0.0", 8000)["server.address"] == "0.0.0.0"


def test_web_stops_on_ctrl_c(adapter_dir, tmp_path):
    server = WebServer([TINY_MODEL, "--device", "cpu"], tmp_path / "server.log")
    assert server.stop() == 0, server.output()


def test_web_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "workbench", "web", TINY_MODEL, "--port", str(port)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and f"127.0.0.1:{port}" in out.stderr and "--port" in out.stderr, out.stderr


def test_web_missing_model_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "workbench", "web", str(tmp_path / "nowhere"), "--port", str(free_port())],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "error:" in out.stderr and "nowhere" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------
# The embedded model end to end: English and Chinese
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_web_embedded_english_and_chinese(browser, tmp_path):
    """The embedded model answers an English and a Chinese question in the page as `answer` does; CJK renders."""
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout if shutil.which("fc-list") else ""
    assert fonts.strip(), f"no Chinese font: the page would show boxes ({INSTALL})"
    settings = GenerationSettings(max_new_tokens=40)
    server = WebServer(["embedded", "--device", "cpu", "--max-new-tokens", str(settings.max_new_tokens)], tmp_path / "server.log")
    try:
        model, builder = load_chat_model("embedded", device="cpu")
        page = ChatPage(browser, server.url)
        history, partial = [], None
        for turn, question in enumerate(["Tell me about Paris, the capital of France.", "你好！请用中文介绍一下你自己。"]):
            page.ask(question)
            if turn == 0:  # catch the answer while it streams (the browser may also see it only when finished)
                page.wait.until(lambda d: page.streaming_text("tuned") is not None or page._all(".st-key-answer-tuned-0"))
                partial = page.streaming_text("tuned")
                if partial is not None:
                    page.screenshot("web_chat_streaming.png")
            expected = answer(model, builder, question, history, settings, on_text=lambda t: None)
            if turn == 0 and partial is not None:
                assert " ".join(expected.split()).startswith(" ".join(partial.split())), "streamed text is the answer's start"
            shown = page.answer("tuned", turn)
            assert same_text(shown, expected), f"turn {turn}: page {shown!r} != answer() {expected!r}"
            history.append((question, expected))
            page.wait_idle()
        assert "你好" in page.one(".st-key-column-tuned").text
        page.screenshot("web_chat_embedded.png")
    finally:
        assert server.stop() == 0, server.output()


# ---------------------------------------------------------------------------
# The page in Chinese: `workbench web --lang zh`
# ---------------------------------------------------------------------------
def test_web_page_in_chinese(browser, adapter_dir, tmp_path, one_torch_thread):
    """With --lang zh every label of the page is Chinese, the layout is today's, and the answer is the model's own."""
    from workbench.i18n import t

    s = TINY_SETTINGS
    server = WebServer([TINY_MODEL, "--adapter", str(adapter_dir), "--compare", TINY_MODEL, "--device", "cpu", "--lang", "zh",
                        "--max-new-tokens", str(s.max_new_tokens), "--repetition-penalty", str(s.repetition_penalty)],
                       tmp_path / "server.log")
    try:
        page = ChatPage(browser, server.url)
        body = page.one("body").text
        for key in ("web.title", "web.sidebar.system", "web.sidebar.generation", "web.max_new_tokens", "web.temperature",
                    "web.repetition_penalty", "web.clear"):
            assert t(key, "zh") in body, f"{key}: {t(key, 'zh')!r} not on the page"
        for english in ("Chat with your assistant", "System prompt", "Generation", "Clear chat", "Fine-tuned"):
            assert english not in body, f"English {english!r} left on the Chinese page"
        assert browser.title == t("web.page_title", "zh")
        box = page.one("textarea[data-testid='stChatInputTextArea']")
        assert box.get_attribute("placeholder") == t("web.placeholder", "zh")

        left, right = page.one(".st-key-column-tuned"), page.one(".st-key-column-base")
        assert left.text.startswith(f"{t('web.heading.tuned', 'zh')}\n{TINY_MODEL} + {adapter_dir}")
        assert right.text.startswith(f"{t('web.heading.base', 'zh')}\n{TINY_MODEL}")
        assert left.rect["x"] < right.rect["x"] and abs(left.rect["y"] - right.rect["y"]) < 2, "side by side"
        assert abs(left.rect["width"] - right.rect["width"]) <= 0.02 * left.rect["width"], "columns of equal width"

        question = "你是谁？"
        page.ask(question)
        model, builder = load_chat_model(TINY_MODEL, str(adapter_dir), device="cpu")
        expected = answer(model, builder, question, None, TINY_SETTINGS, on_text=lambda t: None)
        assert expected.strip() and same_text(page.answer("tuned", 0), expected), "the answer is exactly the model's"
        page.answer("base", 0)  # both columns answered before the screenshot
        page.wait_idle()
        shot = page.screenshot("web_chat_zh.png")
        assert shot.stat().st_size > 10_000
    finally:
        assert server.stop() == 0, server.output()


def test_web_lang_defaults_to_the_locale():
    from workbench.cli import build_parser
    from workbench.i18n import default_lang

    assert build_parser().parse_args(["web", "embedded"]).lang is None  # then load_app takes default_lang()
    assert build_parser().parse_args(["web", "embedded", "--lang", "zh"]).lang == "zh"
    assert default_lang({"LANG": "zh_CN.UTF-8"}) == "zh" and default_lang({"LANG": "en_US.UTF-8"}) == "en"
    assert default_lang({"LC_ALL": "C", "LANG": "zh_CN.UTF-8"}) == "en", "LC_ALL wins over LANG"
    assert default_lang({"LC_MESSAGES": "zh_TW.UTF-8", "LANG": "en_US"}) == "zh"
    assert default_lang({}) == "en"
