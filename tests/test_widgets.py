"""Notebook widgets work when used: edits change the config, Send/Clear drive the models, the plot follows training;
text from users and models reaches HTML escaped."""
import asyncio

import pytest

from workbench.chat import GenerationSettings, answer
from workbench.config import load_recipe
from workbench.models import TINY_MODEL, load_model, load_tokenizer
from workbench.prompt import PromptBuilder
from workbench.widgets import ChatPanel, ConfigEditor, LiveTrainingPlot, checkpoint_picker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shown_text(output_widget) -> str:
    return "".join(o.get("text", "") + str(o.get("data", "")) for o in output_widget.outputs)


def test_config_editor_defaults_to_the_config_and_follows_edits():
    cfg = load_recipe("smollm2_135m_tiny_smoke")
    editor = ConfigEditor(cfg)
    assert editor.config() == cfg
    editor.method.value = "qlora"
    editor.lora_r.value = 16
    editor.eval_inputs.value = "Who are you?\n\nWhat is 2+2?\n"
    edited = editor.config()
    assert (edited.method, edited.lora_r, edited.evaluation_inputs) == ("qlora", 16, ["Who are you?", "What is 2+2?"])
    assert "method: qlora" in shown_text(editor.yaml), "the YAML view follows the widgets"
    editor.max_steps.value = 0  # 0 means "use epochs" ...
    editor.max_epochs.value = 0  # ... and zero epochs is not a run
    assert "max_epochs" in editor.error.value, "an invalid edit shows the validation message"


@pytest.fixture(scope="module")
def pair():
    return load_model(TINY_MODEL), PromptBuilder(load_tokenizer(TINY_MODEL))


def test_chat_panel_send_and_clear(pair):
    panel = ChatPanel({"base": pair, "tuned": pair})
    panel.max_new_tokens.value = 8
    panel.text.value = "Who are you?"
    panel.send_button.click()  # what a student's click does
    assert [len(h) for h in panel.history.values()] == [1, 1]
    assert all("Who are you?" in shown_text(o) for o in panel.outputs.values())
    assert panel.text.value == "", "the text box is emptied after sending"
    assert panel.settings.max_new_tokens == 8
    panel.clear_button.click()
    assert panel.history == {"base": [], "tuned": []} and all(o.outputs == () for o in panel.outputs.values())


def front_end_message(widget, content: dict) -> None:
    """What the kernel does with a message the browser's view of `widget` sends (a custom message: Enter in a Text)."""
    widget._handle_msg({"content": {"data": {"method": "custom", "content": content}}, "buffers": []})


def test_chat_panel_sends_the_text_enter_or_send_asked_for(pair):
    """What the browser sends, in the orders it can arrive: the text before Enter or Send, or after them (held back
    while the kernel was busy, or an edit that Enter commits after its "submit"); leaving the box alone sends nothing.
    Run on an event loop, as a kernel handles the messages."""
    def asked(panel) -> list[str]:
        return [q for q, _a in panel.history["base"]]

    async def browser() -> None:
        panel = ChatPanel({"base": pair}, GenerationSettings(max_new_tokens=4))
        grace = panel.GRACE_S + 0.2
        assert panel.text.continuous_update is False, "the text reaches the kernel at Enter or on leaving the box"
        panel.text.value = "Who are you?"  # the box left (a click at a slider): its text arrives
        await asyncio.sleep(grace)
        assert asked(panel) == [] and panel.text.value == "Who are you?"
        front_end_message(panel.text, {"event": "submit"})  # then Enter, nothing edited
        assert asked(panel) == [], "a newer text may still come"
        await asyncio.sleep(grace)
        assert asked(panel) == ["Who are you?"] and panel.text.value == ""

        front_end_message(panel.text, {"event": "submit"})  # Enter first, its text held back by the browser
        await asyncio.sleep(grace)
        assert asked(panel) == ["Who are you?"], "nothing to send yet"
        panel.text.value = "And your name?"
        assert asked(panel) == ["Who are you?", "And your name?"] and panel.text.value == ""

        panel.text.value = "Tell me"  # left, then edited: Enter's "submit" comes before the edit
        front_end_message(panel.text, {"event": "submit"})
        panel.text.value = "Tell me a joke"
        await asyncio.sleep(grace)
        assert asked(panel)[2:] == ["Tell me a joke"], "the edited text, once"

        panel.send_button.click()  # the same for Send
        panel.text.value = "Third?"
        front_end_message(panel.text, {"event": "blur"})  # not Enter: nothing more
        await asyncio.sleep(grace)
        assert asked(panel)[3:] == ["Third?"]
        panel.text.value = "left in the box"
        await asyncio.sleep(grace)
        assert len(asked(panel)) == 4, "a text that only left the box is not sent"

    asyncio.run(browser())


def test_chat_panel_keeps_every_generation_setting(pair):
    given = GenerationSettings(max_new_tokens=1000, temperature=1.7, top_p=0.9, repetition_penalty=1.3)
    assert ChatPanel({"m": pair}, given).settings == given, "sliders widen to hold the given values, none is dropped"
    panel = ChatPanel({"m": pair}, GenerationSettings(max_new_tokens=16, repetition_penalty=2.0))
    with_penalty = answer(*pair, "Who are you?", settings=GenerationSettings(16, repetition_penalty=2.0))
    assert with_penalty != answer(*pair, "Who are you?", settings=GenerationSettings(16)), "the penalty matters here"
    assert panel.send("Who are you?") == {"m": with_penalty}, "the panel generates with the penalty it shows"


def test_chat_panel_escapes_what_it_shows(pair):
    panel = ChatPanel({"<i>m</i>": pair}, GenerationSettings(max_new_tokens=4))
    panel.send("Say <b>hi</b>")
    shown = shown_text(panel.outputs["<i>m</i>"])
    assert "<b>hi" not in shown and "Say &lt;b&gt;hi&lt;/b&gt;" in shown and "<b>&lt;i&gt;m&lt;/i&gt;:</b>" in shown


def test_live_plot_follows_training():
    live = LiveTrainingPlot(total_steps=4, every=1)
    for step in range(1, 5):
        live.on_log({"step": step, "loss": 5.0 / step, "tokens_per_s": 100.0})
    line = live.ax.lines[0]
    assert list(line.get_xdata()) == [1, 2, 3, 4] and line.get_ydata()[-1] == pytest.approx(1.25)
    live.on_eval(4, [{"question": "Who are you?", "answer": "Nova"}])
    assert "Nova" in shown_text(live.answers)


def test_evaluation_answers_are_escaped():
    live = LiveTrainingPlot(total_steps=2)
    live.on_eval(2, [{"question": "Say <b>hi</b>", "answer": "<script>alert(1)</script> & <b>bold</b>"}])
    shown = shown_text(live.answers)
    assert "<script>" not in shown and "<b>hi" not in shown and "<b>bold" not in shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in shown and "Say &lt;b&gt;hi&lt;/b&gt;" in shown


def test_checkpoint_picker_defaults_to_the_last(tmp_path):
    for n in (2, 10):
        (tmp_path / f"iter_{n}").mkdir()
        (tmp_path / f"iter_{n}" / "state.json").write_text("{}")
    assert checkpoint_picker(tmp_path).label == "iter_10"
    assert checkpoint_picker(tmp_path, "iter_2").label == "iter_2"
    assert checkpoint_picker(tmp_path, str(tmp_path / "iter_2")).value == str(tmp_path / "iter_2")
    assert checkpoint_picker(tmp_path).options[0][0] == "iter_2", "oldest first"
    with pytest.raises(FileNotFoundError, match="no checkpoint iter_5 .*there are: iter_2, iter_10"):
        checkpoint_picker(tmp_path, "iter_5")
    with pytest.raises(FileNotFoundError, match="train first"):
        checkpoint_picker(tmp_path / "nothing")


def test_metrics_plot_draws_both_loraplus_rates():
    """Under LoRA+ the learning-rate panel has the A and the B matrices' rates, the B line at ratio x the A line."""
    import matplotlib.pyplot as plt

    from workbench.widgets import plot_metrics

    metrics = [{"step": s, "loss": 2.0 / s, "lr": 1e-4 * s, "tokens_per_s": 100.0} for s in (1, 2, 3)]
    fig = plot_metrics(metrics)
    assert len(fig.axes[1].lines) == 1 and fig.axes[1].get_legend() is None
    plt.close(fig)
    fig = plot_metrics([m | {"lr_b": 4 * m["lr"]} for m in metrics])
    a, b = fig.axes[1].lines
    assert list(b.get_ydata()) == pytest.approx([4 * y for y in a.get_ydata()])
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["LoRA A", "LoRA B"]
    plt.close(fig)
