"""The chat in the browser: `workbench web MODEL [--adapter DIR] [--compare BASE]` (Streamlit).

The camp's last step is a web demo of the fine-tuned model (`streamlit run
xtuner_streamlit_demo.py`); this is the workbench's, built on Streamlit too.

- The models are loaded once, by `load_app`, in the `workbench web` process
  (errors such as a missing folder stop the command before any server starts);
  Streamlit then runs this file as its page script in the same process and
  every browser session shares those models.
- Every answer comes from `workbench.chat.answer` with the model's saved
  `PromptBuilder`, streamed token by token: the browser sees exactly what
  `workbench chat` prints. The system prompt shown (and editable) is the
  trained one from the model's prompt.json unless --system says otherwise.
- With `--compare BASE`, the base model answers the same question in a second
  column of equal width: both are generated at the same time, each streamed in
  its own column, each with its own history (the same questions, its own
  answers). The sidebar's system prompt and generation settings apply to both.
- Answers are shown as plain text (`st.text`: no Markdown or HTML parsing), so
  the page shows the reply character for character.
- `--lang zh` (default: the system locale's language) puts the whole page in
  Chinese: title, column headings, sidebar, buttons, placeholder, messages
  (workbench/i18n/); the answers stay exactly what the model generated.
- The server binds 127.0.0.1 unless --host says otherwise, and starts with no
  network: usage statistics are off and nothing is fetched.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
from dataclasses import dataclass, field

import streamlit as st

from workbench.chat import GenerationSettings, answer, load_chat_model
from workbench.i18n import check_lang, default_lang, t
from workbench.prompt import PromptBuilder

TUNED, BASE = "tuned", "base"


@dataclass
class ChatModel:
    """One model of the page: its column's key, heading and model name, the model and its prompt builder."""

    label: str
    heading: str
    name: str
    model: object
    builder: PromptBuilder
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one generation at a time per model


@dataclass
class WebApp:
    """What the page shows: the models (fine-tuned first), the default system prompt and generation settings."""

    models: list[ChatModel]
    system: str
    settings: GenerationSettings
    lang: str = "en"  # the page's language ("en" or "zh"); the answers are the model's, untranslated


# Set by `serve` in the `workbench web` process, read by the page script that Streamlit runs in it.
_APP: WebApp | None = None


def load_app(model: str, adapter: str | None = None, compare: str | None = None, system: str | None = None,
             settings: GenerationSettings | None = None, device: str = "auto", trust_remote_code: bool = False,
             lang: str | None = None) -> WebApp:
    """Load MODEL (+ adapter) and, with `compare`, the base model BASE, through `load_chat_model`.

    `lang` is the page's language ("en"/"zh"; default: the system locale's, `default_lang`).
    """
    lang = check_lang(lang or default_lang())
    tuned = ChatModel(TUNED, t("web.heading.tuned" if compare else "web.heading.model", lang), f"{model} + {adapter}" if adapter else model,
                      *load_chat_model(model, adapter, device=device, system=system, trust_remote_code=trust_remote_code))
    models = [tuned]
    if compare:
        models.append(ChatModel(BASE, t("web.heading.base", lang), compare,
                                *load_chat_model(compare, device=device, trust_remote_code=trust_remote_code)))
    return WebApp(models, system=tuned.builder.system, settings=settings or GenerationSettings(), lang=lang)


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------
def streamlit_options(host: str = "127.0.0.1", port: int = 7860) -> dict:
    """Streamlit's config for `workbench web`: the address, headless, no usage statistics, no file watching."""
    shown = "localhost" if host in ("0.0.0.0", "::") else host  # the URL printed; no external-IP lookup
    return {
        "server.address": host,
        "server.port": port,
        "server.headless": True,  # no browser opened, no e-mail prompt
        "server.fileWatcherType": "none",
        "server.runOnSave": False,
        "browser.gatherUsageStats": False,  # no telemetry: this must start with no network
        "browser.serverAddress": shown,
        "global.developmentMode": False,
        "client.toolbarMode": "minimal",
        "theme.base": "light",
    }


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (in use, not an address of this machine), or None."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a port in TIME_WAIT is free
            s.bind((host, port))
    except OSError as e:
        return f"cannot listen on {host}:{port}: {e.strerror or e} (another server there? choose one with --port/--host)"
    return None


def serve(app: WebApp, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the chat page on host:port until Ctrl-C."""
    global _APP
    from streamlit.web import bootstrap  # heavy, and only this command needs it

    os.environ["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    options = streamlit_options(host, port)
    _APP = app
    bootstrap.load_config_options(options)
    print(t("web.started", app.lang, address=f"{options['browser.serverAddress']}:{port}"), flush=True)
    bootstrap.run(os.path.abspath(__file__), False, [], options)


# ---------------------------------------------------------------------------
# The page (run by Streamlit on every interaction)
# ---------------------------------------------------------------------------
def render_page(app: WebApp) -> None:
    """The sidebar, one column per model with its history, the question box, and the streamed answers."""
    lang = app.lang
    st.set_page_config(page_title=t("web.page_title", lang), layout="wide")
    histories = st.session_state.setdefault("histories", {m.label: [] for m in app.models})
    system, settings = _sidebar(app, histories)
    st.title(t("web.title", lang))
    columns = _columns(app, histories)
    question = st.chat_input(t("web.placeholder", lang), key="question", submit_mode="disable")
    if question:
        builders = {m.label: _with_system(m.builder, system) for m in app.models}
        replies = _stream_answers(app, question, histories, builders, settings, columns)
        for label, reply in replies.items():
            histories[label].append((question, reply))
        st.rerun()


def _sidebar(app: WebApp, histories: dict) -> tuple[str, GenerationSettings]:
    """System prompt, generation settings and the clear button; returns the prompt and settings to use."""
    d, lang = app.settings, app.lang
    with st.sidebar:
        st.header(t("web.sidebar.system", lang))
        system = st.text_area(t("web.sidebar.system", lang), value=app.system, key="system", height=120, label_visibility="collapsed",
                              help=t("web.sidebar.system_help", lang))
        st.header(t("web.sidebar.generation", lang))
        settings = GenerationSettings(
            max_new_tokens=int(st.number_input(t("web.max_new_tokens", lang), 1, max(4096, d.max_new_tokens), d.max_new_tokens,
                                               key="max_new_tokens")),
            temperature=st.slider(t("web.temperature", lang), 0.0, max(2.0, d.temperature), d.temperature, 0.05,
                                  key="temperature"),
            top_p=st.slider(t("web.top_p", lang), 0.05, 1.0, min(max(d.top_p, 0.05), 1.0), 0.05, key="top_p"),
            repetition_penalty=st.slider(t("web.repetition_penalty", lang), 1.0, max(2.0, d.repetition_penalty),
                                         d.repetition_penalty, 0.05, key="repetition_penalty"))
        st.button(t("web.clear", lang), key="clear", on_click=_clear, args=(histories,), type="primary", width="stretch")
    return system, settings


def _clear(histories: dict) -> None:
    for turns in histories.values():
        turns.clear()


def _with_system(builder: PromptBuilder, system: str) -> PromptBuilder:
    return builder if system == builder.system else dataclasses.replace(builder, system=system)


def _columns(app: WebApp, histories: dict) -> dict:
    """One container per model (columns of equal width when comparing), each showing its history."""
    boxes = {}
    for m, col in zip(app.models, st.columns(len(app.models), gap="medium")):
        with col:
            box = st.container(key=f"column-{m.label}")
            with box:
                st.subheader(m.heading)
                st.caption(m.name)
                for i, (q, a) in enumerate(histories[m.label]):
                    _turn(q, a, key=f"answer-{m.label}-{i}")
        boxes[m.label] = box
    return boxes


def _turn(question: str, reply: str, key: str) -> None:
    st.chat_message("user").text(question, width="stretch")
    with st.container(key=key):
        st.chat_message("assistant").text(reply, width="stretch")


def _stream_answers(app: WebApp, question: str, histories: dict, builders: dict, settings: GenerationSettings,
                    columns: dict) -> dict[str, str]:
    """Generate every model's reply at once, each streamed into its own column; the replies by label."""
    events: queue.Queue = queue.Queue()
    slots, texts = {}, {}
    for m in app.models:
        with columns[m.label]:
            st.chat_message("user").text(question, width="stretch")
            slots[m.label] = st.chat_message("assistant").empty()
        texts[m.label] = ""
        threading.Thread(target=_generate, daemon=True,
                         args=(m, builders[m.label], question, list(histories[m.label]), settings, events)).start()
    replies: dict[str, str] = {}
    while len(replies) < len(app.models):
        label, text, final = events.get()
        if isinstance(final, BaseException):
            raise final
        if final is not None:
            replies[label] = final
        else:
            texts[label] += text
            slots[label].text(texts[label] + " ▌", width="stretch")
    return replies


def _generate(m: ChatModel, builder: PromptBuilder, question: str, history: list, settings: GenerationSettings,
              events: queue.Queue) -> None:
    """One model's reply, in a worker thread: ("label", text, None) per piece, then ("label", None, reply or error)."""
    try:
        with m.lock:
            reply = answer(m.model, builder, question, history, settings,
                           on_text=lambda text: events.put((m.label, text, None)))
        events.put((m.label, None, reply))
    except BaseException as e:  # shown in the page instead of a hung stream
        events.put((m.label, None, e))


def _page_main() -> None:
    """Streamlit's entry: the page for the models `workbench web` loaded."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here in sys.path:  # Streamlit puts the script's folder first; workbench/io.py must not shadow io
        sys.path.remove(here)
    from workbench import web  # the imported module (not this __main__ copy) holds the loaded models

    if web._APP is None:
        st.error(t("web.not_started", default_lang()))
        return
    web.render_page(web._APP)


if __name__ == "__main__":
    _page_main()
