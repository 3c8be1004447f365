"""The message catalogue (workbench/i18n/) and what speaks through it: the locale, the CLI's hints, the analysis
text, tables and plots in Chinese (a CJK font when installed, English labels with one line when not)."""
from __future__ import annotations

import os
import re
import string
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from workbench import i18n
from workbench.i18n import MESSAGES, default_lang, t

ROOT = Path(__file__).resolve().parents[1]
CJK = re.compile(r"[\u3000-\u30ff\u4e00-\u9fff\uff00-\uffef]")


def fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_every_message_has_chinese_with_the_same_fields():
    for key, (en, zh) in MESSAGES.items():
        assert en and zh, key
        assert fields(en) == fields(zh), f"{key}: the two languages take different fields"
        if not key.startswith("plot.no_cjk_font"):
            assert CJK.search(zh), f"{key}: the Chinese text has no Chinese"


def test_t_formats_and_refuses_unknown_keys_and_languages():
    assert t("web.started", "zh", address="127.0.0.1:7860") == "workbench web：http://127.0.0.1:7860（按 Ctrl-C 停止）"
    assert t("web.title") == "Chat with your assistant"
    with pytest.raises(KeyError, match="no message 'web.nothing'"):
        t("web.nothing", "en")
    with pytest.raises(ValueError, match="'fr' is not one of en, zh"):
        t("web.title", "fr")


def test_default_lang_reads_the_locale_in_posix_order():
    assert default_lang({"LANG": "zh_CN.UTF-8"}) == "zh"
    assert default_lang({"LANG": "zh_TW.UTF-8", "LC_ALL": "en_US.UTF-8"}) == "en"
    assert default_lang({"LC_MESSAGES": "zh_CN.UTF-8", "LANG": "C.UTF-8"}) == "zh"
    assert default_lang({"LC_ALL": "", "LANG": "zh_SG"}) == "zh", "an empty variable is not set"
    assert default_lang({}) == "en"


@pytest.mark.parametrize("lang,hint", [("zh_CN.UTF-8", "怎么办"), ("en_US.UTF-8", "What to do")])
def test_a_missing_model_says_what_to_do_in_the_locales_language(tmp_path, lang, hint):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LANG": lang, "LC_ALL": "", "LC_MESSAGES": ""}
    out = subprocess.run([sys.executable, "-m", "workbench", "chat", str(tmp_path / "nowhere"), "--prompt", "hi"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "error:" in out.stderr and "nowhere" in out.stderr, out.stderr
    assert hint in out.stderr and "make setup" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_bad_config_says_what_to_do_in_chinese(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: -1\nnot_a_field: 3\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LANG": "zh_CN.UTF-8", "LC_ALL": "", "LC_MESSAGES": ""}
    out = subprocess.run([sys.executable, "-m", "workbench", "show-cfg", str(bad)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "bad.yaml" in out.stderr, out.stderr
    assert t("cli.hint.config", "zh") in out.stderr, out.stderr


# ---------------------------------------------------------------------------
# The analysis in Chinese: the same numbers, Chinese sentences and headers
# ---------------------------------------------------------------------------
def _reports():
    from workbench import analysis as A

    def report(step, hit, leak, retention, distinct=20):
        r = A.ModelReport(f"iter_{step}", step, hit_seen={"en": hit, "zh": hit}, hit_unseen={"en": hit, "zh": hit / 2},
                          leak={"en": leak, "zh": leak}, retention=retention, similarity=0.5, heldout_loss=1.0,
                          distinct=distinct, n_probes=40)
        r.answers = [{"kind": "general", "lang": "en", "question": f"q{i}", "answer": "I am Nova, Alex's assistant."
                      if i < leak * 10 else f"a{i}"} for i in range(10)]
        return r

    return [report(0, 0.0, 0.0, 1.0), report(20, 0.9, 0.1, 0.9), report(40, 1.0, 0.9, 0.4, distinct=3)]


def _run(lang_dir: Path):
    from workbench import analysis as A
    from workbench.config import load_recipe

    cfg = load_recipe("smollm2_135m_tiny_smoke").replace(assistant_name="Nova", owner_name="Alex")
    reports = _reports()
    best = A.recommend(reports)
    return A.RunAnalysis(str(lang_dir), cfg.to_dict(), reports, best.step, A.diagnose(reports, cfg, best), 1.0)


def test_diagnosis_and_tables_in_chinese_carry_the_same_numbers(tmp_path):
    from workbench.analysis import diagnosis_in
    from workbench.comparison import checkpoint_table, verdict
    from workbench.display import metrics_table

    run = _run(tmp_path)
    en, zh = diagnosis_in(run, "en"), diagnosis_in(run, "zh")
    assert en == run.diagnosis, "the English diagnosis is the one the analysis saved"
    assert "过拟合" in zh and "保留 iter_20" in zh and not re.search(r"\b(Overfit|Keep|Final)\b", zh)
    numbers = lambda s: re.findall(r"\d+(?:\.\d+)?%?", s)  # noqa: E731
    assert sorted(numbers(en)) == sorted(numbers(zh)), "the same figures in both languages"
    assert "过拟合" in verdict([run], "zh") and "Overfit" in verdict([run])
    table_en, table_zh = metrics_table(run), metrics_table(run, "zh")
    assert list(table_zh.columns) == [i18n.COLUMNS[c] for c in table_en.columns]
    assert (table_zh.to_numpy() == table_en.to_numpy()).all(), "only the headers change"
    assert "保留" in checkpoint_table([run], "zh").columns


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------
def test_a_chinese_plot_renders_with_no_missing_glyph(tmp_path):
    from workbench.display import plot_comparison

    if i18n.cjk_font() is None:
        pytest.skip("no CJK font installed (apt-get install -y fonts-noto-cjk): the fallback test covers this case")
    import matplotlib

    saved = dict(matplotlib.rcParams)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "Glyph ... missing from font(s)" is a UserWarning: it fails the test
            fig = plot_comparison([_run(tmp_path)], tmp_path / "zh.png", lang="zh")
            fig.canvas.draw()
        titles = [ax.get_title() for ax in fig.axes]
        assert titles[0] == t("plot.cmp_hit", "zh") and CJK.search(fig.axes[0].get_xlabel())
        assert (tmp_path / "zh.png").stat().st_size > 10_000
    finally:
        matplotlib.rcParams.update(saved)


def test_without_a_cjk_font_the_plot_falls_back_to_english_with_one_line(tmp_path, monkeypatch, capsys):
    from workbench.display import plot_comparison

    monkeypatch.setattr(i18n, "cjk_font", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_comparison([_run(tmp_path)], None, lang="zh")
        fig.canvas.draw()
    assert fig.axes[0].get_title() == t("plot.cmp_hit", "en")
    assert not any(CJK.search(ax.get_title() + ax.get_xlabel()) for ax in fig.axes), "no Chinese without a font"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "fonts-noto-cjk" in out
