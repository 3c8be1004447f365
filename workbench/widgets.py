"""Notebook widgets: a thin veneer over the functions the headless path calls.

Every control starts at the value the notebook's parameters cell gave, and
nothing waits for a click: executed headless (papermill), a notebook shows the
controls and the results computed from those defaults; opened in JupyterLab,
the same controls re-run the same package functions.

- `ConfigEditor`: the important config fields as widgets, with the YAML shown live.
- `LiveTrainingPlot`: `on_log` / `on_eval` callbacks for `train()` that redraw
  the loss curve and list the evaluation answers as they come.
- `checkpoint_picker`: a dropdown of a work dir's checkpoints, last by default.
- `ChatPanel`: a text box, Send and Clear, generation sliders, and the answers of
  several models side by side, streamed as they are generated.

Text from users and models is HTML-escaped before it goes into an HTML widget.
Tables and plots without controls are in `workbench.display`.
"""
from __future__ import annotations

import asyncio
import html
from pathlib import Path

import ipywidgets as W
from IPython.display import HTML, display

from workbench.chat import GenerationSettings, answer
from workbench.checkpoint import checkpoint_step, list_checkpoints
from workbench.config import Config, config_to_yaml
from workbench.convert import list_files
from workbench.i18n import localize_columns, plot_lang, t
from workbench.io import human_size


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------
class ConfigEditor:
    """Edit method, LoRA r/alpha, learning rate, steps or epochs, max_length, packing and evaluation inputs."""

    def __init__(self, cfg: Config, lang: str = "en"):
        self.base = cfg
        self.method = W.ToggleButtons(options=["lora", "qlora", "full"], value=cfg.method, description=t("w.method", lang))
        self.lora_r = W.IntSlider(value=cfg.lora_r, min=1, max=128, description="LoRA r")
        self.lora_alpha = W.IntSlider(value=cfg.lora_alpha, min=1, max=256, description="LoRA alpha")
        self.lr = W.FloatLogSlider(value=cfg.lr, base=10, min=-6, max=-2, step=0.1, description=t("w.lr", lang), readout_format=".1e")
        self.max_steps = W.IntText(value=cfg.max_steps or 0, description=t("w.max_steps", lang),
                                 tooltip=t("w.max_steps_tip", lang))
        self.max_epochs = W.FloatText(value=cfg.max_epochs, description=t("w.epochs", lang))
        self.max_length = W.Dropdown(options=sorted({128, 256, 512, 1024, 2048, cfg.max_length}), value=cfg.max_length, description="max_length")
        self.pack = W.Checkbox(value=cfg.pack_to_max_length, description=t("w.pack", lang))
        self.eval_inputs = W.Textarea(value="\n".join(cfg.evaluation_inputs), description=t("w.eval_inputs", lang), layout=W.Layout(width="60%", height="80px"))
        self.yaml = W.Output(layout=W.Layout(max_height="320px", overflow="auto", border="1px solid #ddd"))
        self.error = W.HTML()
        for w in self.controls:
            w.observe(lambda _change: self.refresh(), names="value")
        self.refresh()

    @property
    def controls(self) -> list:
        return [self.method, self.lora_r, self.lora_alpha, self.lr, self.max_steps, self.max_epochs, self.max_length,
                self.pack, self.eval_inputs]

    def config(self) -> Config:
        """The config the widgets describe (validated)."""
        inputs = [line.strip() for line in self.eval_inputs.value.splitlines() if line.strip()]
        return self.base.replace(method=self.method.value, lora_r=self.lora_r.value, lora_alpha=self.lora_alpha.value,
                                 lr=float(f"{self.lr.value:.3g}"), max_steps=self.max_steps.value or None,
                                 max_epochs=self.max_epochs.value, max_length=self.max_length.value,
                                 pack_to_max_length=self.pack.value, evaluation_inputs=inputs)

    def refresh(self) -> None:
        # Widget state is set directly (no `with output:` capture), which also works headless.
        self.yaml.outputs = ()
        try:
            text = config_to_yaml(self.config())
            self.error.value = ""
        except ValueError as e:
            self.error.value = f"<b style='color:#b00'>{html.escape(str(e))}</b>"
            return
        self.yaml.append_stdout(text)

    def widget(self):
        return W.VBox([W.HBox([self.method]), W.HBox([self.lora_r, self.lora_alpha]), W.HBox([self.lr, self.max_length]),
                       W.HBox([self.max_steps, self.max_epochs, self.pack]), self.eval_inputs, self.error, self.yaml])

    def _ipython_display_(self):
        display(self.widget())


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
class LiveTrainingPlot:
    """Callbacks for train(): a loss / learning-rate plot redrawn every few steps, and the evaluation answers."""

    def __init__(self, total_steps: int | None = None, every: int = 2, lang: str = "en"):
        import matplotlib.pyplot as plt  # heavy: only when a plot is made

        self.lang = plot_lang(lang)
        self.records: list[dict] = []
        self.every = every
        self.total = total_steps
        self.fig, self.ax = plt.subplots(figsize=(7, 3.2))
        plt.close(self.fig)  # shown through the display handle only
        self.handle = display(self.fig, display_id=True)
        self.answers = W.Output(layout=W.Layout(border="1px solid #ddd", max_height="300px", overflow="auto"))
        display(W.HTML(f"<b>{html.escape(t('w.eval_answers', lang))}</b>"), self.answers)

    def on_log(self, rec: dict) -> None:
        self.records.append(rec)
        if len(self.records) % self.every == 0 or rec["step"] == self.total:
            self.redraw()

    def on_eval(self, step: int, answers: list[dict]) -> None:
        rows = "".join(f"<tr><td>{html.escape(a['question'])}</td><td>{html.escape(a['answer'])}</td></tr>" for a in answers)
        self.answers.append_display_data(HTML(f"<b>{t('w.step', self.lang, step=step)}</b><table>{rows}</table>"))

    def redraw(self) -> None:
        ax = self.ax
        ax.clear()
        steps = [r["step"] for r in self.records]
        lang, last = self.lang, self.records[-1]
        ax.plot(steps, [r["loss"] for r in self.records], label=t("plot.training_loss", lang))
        ax.set(xlabel=t("plot.step", lang), ylabel=t("plot.loss", lang), xlim=(0, self.total or max(steps) + 1),
               title=t("w.live_title", lang, step=steps[-1], loss=last["loss"], speed=last["tokens_per_s"]))
        ax.legend(loc="upper right")
        self.fig.tight_layout()
        self.handle.update(self.fig)


def plot_metrics(metrics: list[dict], path: str | Path | None = None, lang: str = "en"):
    """The metrics log at the end of training: loss, learning rate and tokens/s against step."""
    import matplotlib.pyplot as plt  # heavy: only when a plot is made

    lang = plot_lang(lang)
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, key, title in zip(axes, ["loss", "lr", "tokens_per_s"], ["plot.training_loss", "w.learning_rate", "w.tokens_per_s"]):
        ax.plot(steps, [m[key] for m in metrics], "-o", ms=2)
        ax.set(xlabel=t("plot.step", lang), title=t(title, lang))
    if all("lr_b" in m for m in metrics):  # LoRA+: the A matrices learn at lr, the B matrices at lr_b
        axes[1].plot(steps, [m["lr_b"] for m in metrics], "-o", ms=2)
        axes[1].legend(["LoRA A", "LoRA B"], loc="best")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
def checkpoint_picker(work_dir: str | Path, value: str | None = None, lang: str = "en") -> W.Dropdown:
    """A dropdown of the complete checkpoints of a work dir; the last one (or `value`, e.g. "iter_20") selected."""
    ckpts = {checkpoint_step(p): str(p) for p in list_checkpoints(work_dir)}
    if not ckpts:
        raise FileNotFoundError(f"no checkpoints in {work_dir}: train first (notebook 03)")
    step = checkpoint_step(value) if value else max(ckpts)
    if step not in ckpts:
        raise FileNotFoundError(f"no checkpoint {Path(value).name} in {work_dir}; "
                                f"there are: {', '.join(Path(c).name for c in ckpts.values())}")
    return W.Dropdown(options=[(Path(c).name, c) for c in ckpts.values()], value=ckpts[step],
                      description=t("w.checkpoint", lang))


def files_table(folder: str | Path, lang: str = "en"):
    """What a folder holds, with sizes, as a DataFrame (its headers in `lang`)."""
    import pandas as pd  # heavy: only for the table

    table = pd.DataFrame([(name, human_size(size)) for name, size in list_files(folder)], columns=["file", "size"])
    return localize_columns(table, lang)


# ---------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------
class ChatPanel:
    """Chat with several models at once: their answers side by side, streamed, with shared history per model."""

    def __init__(self, models: dict[str, tuple], settings: GenerationSettings | None = None, lang: str = "en"):
        settings = settings or GenerationSettings()
        self.you = t("w.you", lang)
        self.models = models
        self.history: dict[str, list[tuple[str, str]]] = {k: [] for k in models}
        # The box's value reaches the kernel when Enter is pressed or the box is left (`_asked`), not at every key.
        self.text = W.Text(placeholder=t("w.placeholder", lang), layout=W.Layout(width="60%"), continuous_update=False)
        self._waiting = False  # Enter or Send asked, and their text is not sent yet
        self.send_button = W.Button(description=t("w.send", lang), button_style="primary")
        self.clear_button = W.Button(description=t("w.clear", lang))
        self.max_new_tokens = _slider(W.IntSlider, settings.max_new_tokens, 8, 512, 8, t("w.max_new_tokens", lang))
        self.temperature = _slider(W.FloatSlider, settings.temperature, 0.0, 1.5, 0.05, t("w.temperature", lang))
        self.top_p = _slider(W.FloatSlider, settings.top_p, 0.05, 1.0, 0.05, t("w.top_p", lang))
        self.repetition_penalty = _slider(W.FloatSlider, settings.repetition_penalty, 1.0, 2.0, 0.05,
                                          t("w.repetition_penalty", lang))
        # No fixed width: the answers fill their column, and the columns (below) share the row.
        self.outputs = {k: W.Output(layout=W.Layout(border="1px solid #ddd", min_height="80px")) for k in models}
        self.send_button.on_click(lambda _b: self._asked())
        self.text.on_msg(lambda _t, content, _b: content.get("event") == "submit" and self._asked())  # Enter
        self.text.observe(self._committed, names="value")
        self.clear_button.on_click(lambda _b: self.clear())

    # Enter and Send reach the kernel as messages of their own, sent at once, while the box's text is a state update
    # the browser holds back while an earlier one is unanswered (ipywidgets' throttling): typed while the kernel is
    # busy (an answer streaming), or fast, the text comes after the Enter or click that should send it. Reading the
    # box at the Enter then sent what had arrived of it ("W" of "What ..."; ipywidgets 8's deprecated `on_submit` does
    # that), and watching the value alone would also send when the box is merely left (a click at a slider). So Enter
    # and Send wait for the text: the text that arrives after them is sent at once. A text already there (the box was
    # left, then perhaps edited: Enter commits an edit only after sending "submit") is sent when no newer one has
    # come within GRACE_S; both messages are already on their way by then, a local round trip apart.
    GRACE_S = 0.3

    def _asked(self) -> None:
        self._waiting = True
        if self.text.value.strip():
            _later(self.GRACE_S, self._grace_over)

    def _grace_over(self) -> None:
        if self._waiting and self.text.value.strip():
            self.send(self.text.value)

    def _committed(self, change) -> None:
        if self._waiting and change["new"].strip():
            self.send(change["new"])

    @property
    def settings(self) -> GenerationSettings:
        return GenerationSettings(self.max_new_tokens.value, self.temperature.value, self.top_p.value,
                                  self.repetition_penalty.value)

    def send(self, text: str) -> dict[str, str]:
        """Ask every model; stream each answer into its column. Returns the answers."""
        text = text.strip()
        if not text:
            return {}
        self._waiting = False
        replies = {}
        for label, (model, builder) in self.models.items():
            out = self.outputs[label]
            out.append_display_data(HTML(_message(self.you, text)))
            stream = W.HTML(value=_message(label, ""))
            out.append_display_data(stream)
            reply = answer(model, builder, text, self.history[label], self.settings, on_text=_streamer(stream, label))
            self.history[label].append((text, reply))
            replies[label] = reply
        self.text.value = ""
        return replies

    def clear(self) -> None:
        self._waiting = False
        for label in self.models:
            self.history[label] = []
            self.outputs[label].outputs = ()

    def widget(self):
        # Columns of equal flex-basis that may shrink below their content's width: they share the row equally.
        columns = [W.VBox([W.HTML(f"<b>{html.escape(k)}</b>"), o], layout=W.Layout(flex="1 1 0%", min_width="0", width="auto"))
                   .add_class("wb-chat-column") for k, o in self.outputs.items()]
        sliders = [self.max_new_tokens, self.temperature, self.top_p, self.repetition_penalty]
        return W.VBox([W.HBox([self.text, self.send_button, self.clear_button]),
                       W.HBox(sliders, layout=W.Layout(flex_flow="row wrap")),
                       W.HBox(columns, layout=W.Layout(width="100%")).add_class("wb-chat-columns")]).add_class("wb-chat-panel")

    def _ipython_display_(self):
        display(self.widget())


def _later(delay_s: float, call) -> None:
    """`call()` after `delay_s` on the running event loop: in a kernel its main thread's, between messages, where the
    widgets' own handlers run. With no loop running (the panel driven from plain Python) at once."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        call()
        return
    loop.call_later(delay_s, call)


def _slider(cls, value, lo, hi, step, description: str):
    """A slider starting at `value`; its range widened to hold it (a slider clamps values outside its range).
    Its label as wide as its description (the default 80 px cuts "temperature")."""
    return cls(value=value, min=min(lo, value), max=max(hi, value), step=step, description=description,
               style={"description_width": "initial"})


def _streamer(widget: W.HTML, speaker: str):
    """An `on_text` callback that shows the text streamed so far in `widget`."""
    parts: list[str] = []

    def on_text(text: str) -> None:
        parts.append(text)
        widget.value = _message(speaker, "".join(parts))
    return on_text


def _message(speaker: str, text: str) -> str:
    """One chat message as HTML, escaped; long words (paths, URLs) wrap instead of widening the column."""
    return f"<div style='overflow-wrap: anywhere'><b>{html.escape(speaker)}:</b> {html.escape(text)}</div>"
