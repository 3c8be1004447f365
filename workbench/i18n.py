"""The message catalogue: every sentence a student reads, in English and in Chinese (简体中文).

- `t(key, lang, **fmt)` gives the text of `key` in `lang` ("en" or "zh"),
  formatted with `fmt`; a key missing in Chinese falls back to English, an
  unknown key or language is an error (a typo must not ship silently).
- `default_lang()` reads the system locale (LC_ALL, LC_MESSAGES, LANG, in the
  order POSIX gives them precedence): "zh" for zh_*, else "en".
- `cjk_font()` finds an installed CJK font for matplotlib (Noto Sans CJK first)
  and `plot_lang(lang)` says which language a plot can be drawn in: Chinese
  when such a font is there, else English with one line saying so (a plot
  without the font would show empty boxes).

Users: the web page (workbench/web.py), the CLI's refusals (workbench/cli.py),
the plots and the notebooks' display code. Why hand-written and not gettext:
the catalogue is two languages of a few dozen short strings that notebooks and
a Streamlit page switch at run time by a parameter, not by the process locale;
a dict keeps both languages side by side where a reviewer sees them together,
and needs no compiled .mo files in the package.
"""
from __future__ import annotations

import os

LANGS = ("en", "zh")

# key -> (English, Chinese)
MESSAGES: dict[str, tuple[str, str]] = {
    # --- the web page (workbench web) ---
    "web.page_title": ("workbench chat", "workbench 对话"),
    "web.title": ("Chat with your assistant", "和你的助手对话"),
    "web.heading.model": ("Model", "模型"),
    "web.heading.tuned": ("Fine-tuned", "微调后"),
    "web.heading.base": ("Base", "基础模型"),
    "web.sidebar.system": ("System prompt", "系统提示词"),
    "web.sidebar.system_help": ("Default: the system prompt the model was trained with (its prompt.json).",
                                "默认：模型训练时使用的系统提示词（保存在它的 prompt.json 中）。"),
    "web.sidebar.generation": ("Generation", "生成设置"),
    "web.max_new_tokens": ("max new tokens", "最多生成的 token 数"),
    "web.temperature": ("temperature (0 = greedy)", "温度（0 = 贪心解码）"),
    "web.top_p": ("top p", "top p（核采样）"),
    "web.repetition_penalty": ("repetition penalty", "重复惩罚"),
    "web.clear": ("Clear chat", "清空对话"),
    "web.placeholder": ("Ask a question", "输入你的问题"),
    "web.not_started": ("Start the chat with `workbench web MODEL [--adapter DIR] [--compare BASE]`.",
                        "请用 `workbench web MODEL [--adapter DIR] [--compare BASE]` 启动对话页面。"),
    "web.error": ("The model could not answer: {error}", "模型未能回答：{error}"),
    "web.started": ("workbench web: http://{address}  (Ctrl-C stops it)", "workbench web：http://{address}（按 Ctrl-C 停止）"),
    # --- the CLI's refusals: what to do next (printed after the error itself) ---
    "cli.error": ("error", "错误"),
    "cli.hint.model": ("What to do: check the model name or folder; 'embedded' is prepared by `make setup` "
                       "(or `workbench prepare-model`).",
                       "怎么办：检查模型名称或文件夹是否正确；内置模型 'embedded' 由 `make setup`"
                       "（或 `workbench prepare-model`）准备好。"),
    "cli.hint.data": ("What to do: fix the record and field named above, then check the file with "
                      "`workbench check-dataset FILE`.",
                      "怎么办：按上面指出的文件、记录和字段修改数据，然后用 `workbench check-dataset FILE` 检查数据集。"),
    "cli.hint.config": ("What to do: fix the field named above in the config; `workbench list-cfg` lists the "
                        "recipes to start from.",
                        "怎么办：修改配置文件中上面指出的字段；`workbench list-cfg` 列出可以作为起点的配置。"),
    "cli.hint.file": ("What to do: check the path (it is relative to the folder you run the command in).",
                      "怎么办：检查路径是否正确（相对路径以运行命令时所在的文件夹为准）。"),
    # --- plots ---
    "plot.no_cjk_font": ("No CJK font found (install fonts-noto-cjk): the plot's labels are in English.",
                         "No CJK font found (install fonts-noto-cjk): the plot's labels are in English."),
    "plot.loss_title": ("Training and validation loss", "训练损失与验证损失"),
    "plot.step": ("step", "训练步数"),
    "plot.loss": ("loss", "损失"),
    "plot.train": ("train", "训练集"),
    "plot.validation": ("validation", "验证集"),
    # --- notebooks' display code ---
    "nb.lang_note": ("Cells print and draw in English.", "单元格的输出和图表使用中文。"),
}


def check_lang(lang: str) -> str:
    """`lang` if it is "en" or "zh", else a ValueError saying which are."""
    if lang not in LANGS:
        raise ValueError(f"lang: {lang!r} is not one of {', '.join(LANGS)}")
    return lang


def t(key: str, lang: str = "en", **fmt) -> str:
    """The text of `key` in `lang`, formatted with `fmt` (str.format)."""
    try:
        en, zh = MESSAGES[key]
    except KeyError:
        raise KeyError(f"no message {key!r} in workbench/i18n.py") from None
    text = zh if check_lang(lang) == "zh" and zh else en
    return text.format(**fmt) if fmt else text


def default_lang(environ: dict | None = None) -> str:
    """"zh" when the locale (LC_ALL, else LC_MESSAGES, else LANG; the first set and non-empty) is zh_*, else "en"."""
    env = os.environ if environ is None else environ
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = env.get(name, "")
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


# ---------------------------------------------------------------------------
# Plots: a CJK font when one is installed, else English labels
# ---------------------------------------------------------------------------
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Serif CJK SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC")


def cjk_font() -> str | None:
    """The family name of an installed CJK font matplotlib can use (Noto Sans CJK first), or None."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def plot_lang(lang: str, say=print) -> str:
    """The language to draw a plot in: `lang`, or "en" (with one line through `say`) when Chinese has no font.

    With "zh" and a CJK font, that font is put first in matplotlib's sans-serif
    list (Latin text keeps DejaVu Sans's glyphs through the fallback that
    follows it), so labels render without missing-glyph boxes.
    """
    if check_lang(lang) == "en":
        return "en"
    font = cjk_font()
    if font is None:
        say(t("plot.no_cjk_font", "en"))
        return "en"
    import matplotlib

    sans = [font] + [f for f in matplotlib.rcParams["font.sans-serif"] if f != font]
    matplotlib.rcParams["font.sans-serif"] = sans
    matplotlib.rcParams["font.family"] = "sans-serif"
    matplotlib.rcParams["axes.unicode_minus"] = False  # CJK fonts often lack U+2212
    return "zh"
