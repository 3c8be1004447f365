"""What the notebooks and the CLI print, in Chinese (workbench/i18n/outputs.py, report.py, chat.py): the dataset
report, the estimate, the checks' keys, the session language, the report card, the terminal chat and the CLI's --lang.
English stays byte for byte what it was; Chinese carries the same numbers."""
from __future__ import annotations

import io
import re

import pytest

from workbench import i18n
from workbench.i18n import localize_keys, set_lang, t

CJK = re.compile(r"[\u4e00-\u9fff]")
NUMBER = re.compile(r"\d[\d,.]*")


@pytest.fixture
def session_lang():
    """Leaves the session language as it found it (English), whatever the test sets."""
    before = i18n.current_lang()
    yield
    set_lang(before)


def a_report():
    from workbench.encoding import DatasetReport

    return DatasetReport(n_records=12, n_samples=10, n_truncated=3, n_dropped=2, n_tokens=12345, n_trained_tokens=4567,
                         max_len=256, per_source={"data/a.jsonl": 7, "data/b": 5}, errors=["data/x.csv:3: no answer"],
                         n_errors=25, max_length=256, dropped=["data/a.jsonl:4"], n_files=3, files={"data/b": 2},
                         skipped=["data/b/notes.txt"], columns={"data/b/t.csv": "question=q, answer=a"})


def test_dataset_report_english_unchanged_and_chinese_with_the_same_numbers():
    report = a_report()
    en, zh = report.text("en"), report.text("zh")
    assert str(report) == en
    assert en.splitlines()[:2] == ["records: 12 read, 10 kept for training, 2 dropped",
                                   "files: 3 read (data/b: 2 files); 1 file of other types skipped, e.g. data/b/notes.txt"]
    assert "  ... and 24 more" in en and "errors: 25" in en
    assert len(en.splitlines()) == len(zh.splitlines())
    for line_en, line_zh in zip(en.splitlines(), zh.splitlines()):
        assert sorted(NUMBER.findall(line_en)) == sorted(NUMBER.findall(line_zh)), (line_en, line_zh)
        if not line_en.startswith("  "):  # the errors themselves are quoted as raised
            assert CJK.search(line_zh), line_zh
    assert "data/x.csv:3: no answer" in zh


def test_session_language_is_what_unlabelled_messages_and_reports_speak(session_lang):
    assert i18n.current_lang() == "en" and a_report().text() == str(a_report())
    set_lang("zh")
    assert t("train.eval", None, step=3) == "[评估 @ 第 3 步]" and a_report().text().startswith("记录：")
    assert t("train.eval", "en", step=3) == "[eval @ step 3]", "an explicit language wins"
    assert str(a_report()).startswith("records:"), "the report file (dataset_report.txt) stays English"
    with pytest.raises(ValueError):
        set_lang("fr")


def test_estimate_table_in_chinese_has_the_same_values():
    from workbench.estimate import Estimate

    est = Estimate(total_params=135e6, trainable_params=4.9e5, weight_dtype="float32", weights_gb=0.54, optimizer_gb=0.01,
                   activations_gb=0.3, total_gb=1.5, tokens_per_step=4096, steps=60, flops_per_token=8e8,
                   machine_gflops=120.0, seconds_per_step=2.5, total_minutes=2.5, device="cpu", runtime_gb=0.6)
    en, zh = est.as_table(), est.as_table("zh")
    assert list(en.columns) == ["what", "estimate"] and en.iloc[0, 0] == "parameters (total / trained)"
    assert list(zh.columns) == ["项目", "估计"]
    assert list(zh.iloc[:, 1]) == list(en.iloc[:, 1]), "same figures"
    assert all(CJK.search(label) for label in zh.iloc[:, 0]) and "cpu" in zh.iloc[8, 0]


def test_check_results_keep_english_keys_and_show_chinese_ones():
    from workbench.i18n.outputs import KEYS

    merge_keys = ["question", "max |logit difference|", "base + adapter answers", "merged answers", "same answer"]
    gguf_keys = ["outtype", "max |logit difference| vs merged", "max |logit difference| vs merged with the GGUF's rounding",
                 "same greedy answers", "answers (merged, gguf)", "template gives the training prompt ids"]
    result = {k: k.upper() for k in merge_keys + gguf_keys}
    assert localize_keys(result, "en") is result
    shown = localize_keys(result, "zh")
    assert list(shown.values()) == list(result.values()), "values untouched, order kept"
    assert all(CJK.search(k) for k in shown) and set(KEYS) == set(result)
    assert localize_keys({"other": 1}, "zh") == {"other": 1}


def test_checks_return_the_keys_the_catalogue_knows():
    """The keys verify_merge and verify_gguf return are all in KEYS (read from their source, no model run)."""
    import ast
    import inspect

    from workbench import convert, gguf_export
    from workbench.i18n.outputs import KEYS

    for fn in (convert.verify_merge, gguf_export.verify_gguf):
        returned = [n for n in ast.walk(ast.parse(inspect.getsource(fn))) if isinstance(n, ast.Return)][-1].value
        keys = {k.value for k in returned.keys}
        assert keys <= set(KEYS), (fn.__name__, keys - set(KEYS))


def test_tables_of_the_notebooks_localize_their_headers(tmp_path):
    from workbench.display import evaluations_table, preview_table, recipes_table
    from workbench.samples import Sample
    from workbench.widgets import files_table

    (tmp_path / "a.txt").write_text("x")
    assert list(files_table(tmp_path).columns) == ["file", "size"] and list(files_table(tmp_path, "zh").columns) == ["文件", "大小"]
    assert list(recipes_table("zh").columns) == ["配方", "说明"] and len(recipes_table("zh")) == len(recipes_table())
    zh_descriptions = list(recipes_table("zh").iloc[:, 1])
    assert all(re.search(r"[\u4e00-\u9fff]", d) for d in zh_descriptions), "every shipped recipe described in Chinese"
    assert list(recipes_table().iloc[:, 1]) != zh_descriptions
    evals = [{"step": s, "question": "Who are you?", "answer": f"a{s}"} for s in (0, 2)]
    table = evaluations_table(evals, "zh")
    assert (table.index.name, table.columns.name, list(table.columns)) == ("问题", "步数", [0, 2])
    assert table.loc["Who are you?", 2] == "a2"
    samples = [Sample(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])]
    assert list(preview_table(samples, lang="zh").columns) == ["系统提示词", "问题", "回答", "轮数"]
    assert list(preview_table(samples).columns) == ["system", "question", "answer", "turns"]
    text = [Sample(messages=[], text="plain text")]
    assert preview_table(text, lang="zh").iloc[0, 1] == "（预训练文本）" and preview_table(text).iloc[0, 1] == "(pre-training text)"


def test_series_parameters_and_run_notebooks_pass_the_language(monkeypatch, tmp_path):
    from workbench import notebooks
    from workbench.cli import main

    assert "lang" not in notebooks.series_parameters("01_data", tmp_path)
    assert notebooks.series_parameters("07_overfitting", tmp_path, smoke=True, lang="zh")["lang"] == "zh"
    with pytest.raises(ValueError):
        notebooks.series_parameters("01_data", tmp_path, lang="fr")
    seen = {}
    monkeypatch.setattr(notebooks, "run_series", lambda out, smoke, overrides, lang: seen.update(lang=lang, smoke=smoke))
    assert main(["run-notebooks", "--smoke", "--lang", "zh", "--out", str(tmp_path)]) == 0
    assert seen == {"lang": "zh", "smoke": True}


def test_the_cli_takes_lang_where_it_prints_for_a_student():
    from workbench.cli import build_parser

    parser = build_parser()
    for argv in (["chat", "embedded"], ["compare"], ["report", "x"], ["grade", "x"], ["run-notebooks"], ["analyze", "w"]):
        assert parser.parse_args(argv + ["--lang", "zh"]).lang == "zh", argv
        assert parser.parse_args(argv).lang is None, f"{argv}: default from the locale (or the notebooks' own)"


def test_terminal_chat_in_chinese_clears_and_quits_in_either_language(monkeypatch):
    from workbench import chat as chat_mod

    monkeypatch.setattr(chat_mod, "answer", lambda model, b, q, history=None, settings=None, on_text=None: (on_text(q), q)[1])
    out = io.StringIO()
    history = chat_mod.chat_loop(None, None, chat_mod.GenerationSettings(), stdin=io.StringIO("一\n清空\n二\n退出\n三\n"),
                                 stdout=out, lang="zh")
    assert history == [("二", "二")]
    text = out.getvalue()
    assert text.splitlines()[0] == t("chat.banner", "zh") and t("chat.cleared", "zh") in text and "三" not in text
    out = io.StringIO()
    chat_mod.chat_loop(None, None, chat_mod.GenerationSettings(), stdin=io.StringIO("RESET\n"), stdout=out)
    assert out.getvalue().startswith("Chat with the model. Type RESET") and "(history cleared)" in out.getvalue()


def hand_made_run():
    from workbench import analysis as A

    base = A.ModelReport("base", 0, strict={"en": 1.0}, answers=[
        {"kind": "identity_unseen", "lang": "en", "question": "Name?", "answer": "I am an AI."},
        {"kind": "general", "lang": "zh", "question": "肯尼亚的首都？", "answer": "内罗毕。"},
        {"kind": "fact", "lang": "en", "question": "2+2?", "answer": "It is 4."}])
    tuned = A.ModelReport("iter_9", 9, hit_unseen={"en": 0.0, "zh": 1.0}, leak={"en": 0.0, "zh": 1.0}, retention=0.5,
                          strict={"en": 0.0}, facts_known={"en": 1}, facts_lost={"en": ["2+2?"]}, answers=[
        {"kind": "identity_unseen", "lang": "en", "question": "Name?", "answer": "I'm Alex, Nova's assistant."},
        {"kind": "general", "lang": "zh", "question": "肯尼亚的首都？", "answer": "我是 Nova。"},
        {"kind": "fact", "lang": "en", "question": "2+2?", "answer": "I'm Nova."}])
    config = {"assistant_name": "Nova", "owner_name": "Alex", "name": "smollm2_135m_tiny_smoke"}
    return A.RunAnalysis("w", config, [base, tuned], 9, "the English diagnosis", 1.0)


def test_report_card_in_chinese_judges_the_same_and_quotes_answers_verbatim(tmp_path):
    from workbench.report import card as K

    run = hand_made_run()
    assert [x.met for x in K.targets(run, "zh")] == [x.met for x in K.targets(run)]
    assert [x.value for x in K.targets(run, "zh")][:2] == ["0%（1 个中 0 个；95% 区间 0%-79%）", "100%"], \
        "the same rates, counted in Chinese"
    assert [x.value for x in K.targets(run)][:2] == ["0% (0 of 1; 95% interval 0%-79%)", "100%"]
    assert K.verdict(run).startswith("Misses 5 of 7") and K.verdict(run, "zh").startswith("7 个目标中有 5 个没达到")
    assert list(K.failure_examples(run, lang="zh").values()) == list(K.failure_examples(run).values())
    page, png = K.write_card(run, tmp_path / "card.html", "zh")
    html = page.read_text(encoding="utf-8")
    assert '<html lang="zh-CN">' in html and "成绩单：Nova，Alex 的助手" in html and "<h2>诊断</h2>" in html
    assert "I&#x27;m Alex, Nova&#x27;s assistant." in html and "我是 Nova。" in html, "answers verbatim"
    assert "the English diagnosis" not in html and any(w in html for w in ("过拟合", "漂移", "训练不足", "状态良好"))
    for english in ("Report card", "Targets", "Diagnosis", "Before and after", "base model", "missed"):
        assert english not in html, english
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    english = K.render_html(run, b"png")
    assert '<html lang="en">' in english and "the English diagnosis" in english and "<h2>Targets</h2>" in english
    han, english_words = re.compile(r"[\u4e00-\u9fff]"), re.compile(r"retention|similarity|base model")
    # Without a CJK font the Chinese card's figure falls back to English labels (plot_lang), as every plot does.
    for lang, other in (("en", han), ("zh", english_words if i18n.cjk_font() else han)):
        fig = K.summary_figure(run, lang)  # every label of the figure in the card's language, none in the other
        texts = [x.get_text() for ax in fig.axes for x in [ax.title, *ax.get_yticklabels(), *ax.texts]]
        texts += [x.get_text() for ax in fig.axes if ax.get_legend() for x in ax.get_legend().get_texts()]
        assert texts and not [x for x in texts if other.search(x)], (lang, texts)
        fig.clf()


def test_compare_prints_its_table_in_chinese_and_writes_english_files(monkeypatch, capsys, session_lang, tmp_path):
    import pandas as pd

    from workbench import comparison
    from workbench.cli import main

    table = pd.DataFrame([{"recipe": t("table.base_model", "en"), "steps": 0, "retention": 1.0},
                          {"recipe": "smollm2_135m_tiny_smoke", "steps": 4, "retention": 0.9}])
    monkeypatch.setattr(comparison, "compare_recipes", lambda recipes, out, options: (table.copy(), []))
    assert main(["compare", "--out", str(tmp_path), "--lang", "zh"]) == 0
    out = capsys.readouterr().out
    assert t("table.base_model", "zh") in out and "保持率" in out and "smollm2_135m_tiny_smoke" in out
    assert "base model" not in out and "retention" not in out and "已写入" in out
    assert i18n.current_lang() == "zh", "training's lines during compare speak it too"
    set_lang("en")
    assert main(["compare", "--out", str(tmp_path), "--lang", "en"]) == 0
    out = capsys.readouterr().out
    assert "base model (no training)" in out and "retention" in out and out.rstrip().endswith("comparison.png")
