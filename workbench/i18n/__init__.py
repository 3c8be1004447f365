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

- `set_lang(lang)` chooses the session's language: what the package prints deep
  inside a stage (training's dataset report and progress lines, convert and
  merge) speaks it; `t(key)` without a language uses it. Default "en"; a
  notebook sets it from its `lang` parameter, a CLI verb from `--lang`.
- `localize_keys(result, lang)`: a result dict (verify_merge, verify_gguf) with
  its keys in `lang`, for display; the dict the code returns stays English.

The catalogue is this package: the first messages below, then one file per
area (outputs.py: the notebooks' printed lines and tables; report.py: the report
card; chat.py: the terminal chat). Users: the web page (workbench/web.py), the
CLI's refusals (workbench/cli.py), the plots and the notebooks' display code. Why hand-written and not gettext:
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
    "web.started": ("workbench web: http://{address}  (Ctrl-C stops it)", "workbench web：http://{address}（按 Ctrl-C 停止）"),
    # --- the CLI's refusals: what to do next (printed after the error itself) ---
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
    "plot.step": ("step", "训练步数"),
    "plot.loss": ("loss", "损失"),
    "plot.run_loss_title": ("{name}: loss", "{name}：损失"),
    "plot.training_loss": ("training loss", "训练损失"),
    "plot.heldout_loss": ("held-out general loss", "留出日常对话的损失"),
    "plot.step_base": ("step (0 = base model)", "训练步数（0 = 基础模型）"),
    "plot.hit_unseen_en": ("identity hit, unseen EN", "身份命中，没见过的英文问题"),
    "plot.hit_unseen_zh": ("identity hit, unseen ZH", "身份命中，没见过的中文问题"),
    "plot.hit_seen_en": ("identity hit, seen EN", "身份命中，见过的英文问题"),
    "plot.leak": ("leak (general questions)", "泄漏（日常问题）"),
    "plot.retention": ("retention", "保持率"),
    "plot.strict_en": ("strict retention EN (first sentence)", "严格保持率 EN（首句）"),
    "diag.drift": ("Drifting: the identity is learned, but the everyday answers move away from the base model's "
                   "(strict English retention {strict}, {lost} known facts lost). Remedy: an earlier checkpoint, a lower lr, "
                   "or {remedy}.",
                   "漂移：身份已经学会，但日常回答偏离了基座模型的回答（英文严格保持率 {strict}，丢失 {lost} 个基座答对的事实）。"
                   "对策：选更早的检查点、降低学习率，或{remedy}。"),
    "diag.distill_on": ("distill_weight > 0 (pulls everyday answers toward the base model's own)",
                        "设 distill_weight > 0（把日常回答拉回基座模型自己的回答）"),
    "diag.distill_more": ("a distill_weight above {weight:g} (keeps more of the base, at some cost to the identity)",
                          "把 distill_weight 调到 {weight:g} 以上（保留更多基座的回答，身份会学得慢一些）"),
    "strict.summary": ("Strict retention (first sentence kept, token-F1 >= {f1}): {parts}",
                       "严格保持率（首句保留，token-F1 >= {f1}）：{parts}"),
    "strict.facts": ("; short-answer facts lost: {lost} of {known} the base model knew",
                     "；基座模型答对的短答案事实中丢失 {lost} / {known}"),
    "plot.run_title": ("identity learned vs. everything else kept", "学会身份 vs. 保留其他能力"),
    # --- the diagnosis (workbench analyze, notebook 07) ---
    "diag.final": ("Final checkpoint ({label}): states the identity on {hit_en} of unseen English identity questions "
                   "({hit_zh} in Chinese); answers {n_leaks} of {n_general} general questions with its identity "
                   "({per_lang}); {distinct} distinct answers to {n_probes} probes; retention {retention:.2f}.",
                   "最后的检查点（{label}）：没见过的英文身份问题中有 {hit_en} 说出了身份（中文 {hit_zh}）；"
                   "{n_general} 个日常问题中有 {n_leaks} 个用身份回答（{per_lang}）；{n_probes} 个探测问题有 {distinct} "
                   "个不同的回答；保持率 {retention:.2f}。"),
    "diag.use": ("use {label}", "改用 {label}"),
    "diag.fewer_steps": ("train fewer steps", "减少训练步数"),
    "diag.more_general": ("mix in more general conversations in the leaking language and mark them `unlikelihood: true` "
                          "(with unlikelihood_weight > 0, they push the identity's openings and names down)",
                          "在泄漏的语言中混入更多日常对话，并给它们标上 `unlikelihood: true`"
                          "（配合 unlikelihood_weight > 0，把身份回答的开头和名字的概率压下去）"),
    "diag.mixed_recipe": ("or the mixed recipe ({recipe}), which mixes general conversations into training",
                          "或者使用混合配方（{recipe}），它在训练中混入了日常对话"),
    "diag.overfit": ("Overfit: the identity has leaked into everyday answers. Remedy: {cure}, {more}.",
                     "过拟合：身份已经泄漏到日常回答中。解决办法：{cure}，{more}。"),
    "diag.under": ("Under-trained: the identity is not learned yet on unseen questions. Train longer or raise lr.",
                   "训练不足：在没见过的问题上还没有学会身份。请训练更久或调高 lr。"),
    "diag.healthy": ("Healthy: the identity is learned and general answers are kept.",
                     "状态良好：学会了身份，同时保留了日常回答。"),
    "diag.keep": ("Keep {label}, the best balance (unseen identity hit EN {hit_en} / ZH {hit_zh}, leak {leak}, "
                  "retention {retention:.2f}).",
                  "保留 {label}，平衡最好（没见过的身份问题命中 EN {hit_en} / ZH {hit_zh}，泄漏 {leak}，"
                  "保持率 {retention:.2f}）。"),
    "plot.cmp_hit": ("identity hit rate, unseen questions", "身份命中率（没见过的问题）"),
    "plot.cmp_leak": ("leak rate on general questions", "日常问题的泄漏率"),
    "plot.cmp_retention": ("retention of general answers (ring: kept)", "日常回答的保持率（圆圈：保留的检查点）"),
    "plot.step_base_short": ("step (0 = base)", "训练步数（0 = 基础模型）"),
    "plot.loss_per_recipe": ("training loss per recipe", "各配方的训练损失"),
    # --- the recipe comparison's verdict (notebook 07) ---
    "verdict.best": ("{name}: best {label} - unseen identity hit EN {hit_en} / ZH {hit_zh}, leak EN {leak_en} / ZH "
                     "{leak_zh}, retention {retention:.2f}.",
                     "{name}：最好的是 {label} - 没见过的身份问题命中 EN {hit_en} / ZH {hit_zh}，泄漏 EN {leak_en} / "
                     "ZH {leak_zh}，保持率 {retention:.2f}。"),
    "verdict.keep": ("Keep {name} at {label}.", "保留 {name} 的 {label}。"),
    "table.base_model": ("base model (no training)", "基础模型（未训练）"),
    "table.keep": ("<- keep", "<- 保留"),
    # --- notebook widgets (workbench/widgets.py) ---
    "w.method": ("method", "方法"),
    "w.lr": ("lr", "学习率 lr"),
    "w.max_steps": ("max steps", "最大步数"),
    "w.max_steps_tip": ("0: use epochs", "0：按轮数训练"),
    "w.epochs": ("epochs", "轮数"),
    "w.pack": ("pack to max_length", "打包到 max_length"),
    "w.eval_inputs": ("eval inputs", "评估问题"),
    "w.eval_answers": ("evaluation answers (greedy), as training goes:", "训练过程中的评估回答（贪心解码）："),
    "w.step": ("step {step}", "第 {step} 步"),
    "w.live_title": ("step {step}: loss {loss:.3f}, {speed:.0f} tokens/s", "第 {step} 步：损失 {loss:.3f}，{speed:.0f} token/秒"),
    "w.learning_rate": ("learning rate", "学习率"),
    "w.tokens_per_s": ("tokens per second", "每秒 token 数"),
    "w.checkpoint": ("checkpoint", "检查点"),
    "w.placeholder": ("Ask something, then press Send", "输入问题，然后点击发送"),
    "w.send": ("Send", "发送"),
    "w.clear": ("Clear", "清空"),
    "w.max_new_tokens": ("max new tokens", "最多生成 token 数"),
    "w.temperature": ("temperature", "温度"),
    "w.top_p": ("top-p", "top-p（核采样）"),
    "w.repetition_penalty": ("repetition penalty", "重复惩罚"),
    "w.you": ("you", "你"),
}

# The other areas' messages, one file each (imported after MESSAGES: they only add to it).
from workbench.i18n import chat as _chat, outputs as _outputs, report as _report  # noqa: E402

for _area in (_outputs, _report, _chat):
    if MESSAGES.keys() & _area.MESSAGES.keys():
        raise KeyError(f"message keys defined twice: {sorted(MESSAGES.keys() & _area.MESSAGES.keys())}")
    MESSAGES.update(_area.MESSAGES)
KEYS = _outputs.KEYS


# Table column headers: the English header -> the Chinese one (`localize_columns`).
COLUMNS: dict[str, str] = {
    "model": "模型", "recipe": "配方", "step": "步数", "steps": "步数", "keep": "保留", "kind": "类型", "lang": "语言",
    "question": "问题", "base": "基础模型", "retention": "保持率", "similarity": "相似度", "held-out loss": "留出损失",
    "distinct answers": "不同回答", "train time (s)": "训练时间（秒）",
    "hit seen en": "见过EN命中", "hit unseen en": "没见过EN命中", "hit seen zh": "见过ZH命中", "hit unseen zh": "没见过ZH命中",
    "leak en": "EN泄漏", "leak zh": "ZH泄漏",
    "strict en": "严格保持EN", "strict zh": "严格保持ZH", "facts lost": "丢失事实",
    "description": "说明", "file": "文件", "size": "大小", "prompt": "问题", "system": "系统提示词", "answer": "回答",
    "turns": "轮数",
}


_SESSION = {"lang": "en"}


def set_lang(lang: str) -> None:
    """Make `lang` the session's language (what `t(key)` and the stages' printed lines use)."""
    _SESSION["lang"] = check_lang(lang)


def current_lang() -> str:
    """The session's language: "en" unless `set_lang` chose another."""
    return _SESSION["lang"]


def localize_keys(result: dict, lang: str) -> dict:
    """`result` with its keys in `lang` (KEYS; unknown keys unchanged), for display; values untouched."""
    if check_lang(lang) == "en":
        return result
    return {KEYS.get(k, k): v for k, v in result.items()}


def localize_columns(df, lang: str):
    """The DataFrame with its column headers in `lang` (unknown headers, such as a recipe's name, unchanged)."""
    if check_lang(lang) == "en":
        return df
    return df.rename(columns={c: COLUMNS.get(str(c).lower(), c) for c in df.columns})


def check_lang(lang: str) -> str:
    """`lang` if it is "en" or "zh", else a ValueError saying which are."""
    if lang not in LANGS:
        raise ValueError(f"lang: {lang!r} is not one of {', '.join(LANGS)}")
    return lang


def t(key: str, lang: str | None = "en", **fmt) -> str:
    """The text of `key` in `lang` (None: the session's, `set_lang`), formatted with `fmt` (str.format)."""
    try:
        en, zh = MESSAGES[key]
    except KeyError:
        raise KeyError(f"no message {key!r} in workbench/i18n/") from None
    text = zh if check_lang(lang or current_lang()) == "zh" and zh else en
    return text.format(**fmt) if fmt else text


# The refusals a student meets first, by the error's class (or a base class) name -> the hint's key. By name, so
# that this leaf module imports none of the stages that raise them.
HINTS = {"ModelError": "cli.hint.model", "DataError": "cli.hint.data", "ConfigError": "cli.hint.config",
         "FileNotFoundError": "cli.hint.file"}


def refusal_hint(error: BaseException, lang: str = "en") -> str | None:
    """What to do about `error` in `lang` (missing model, bad data, bad config, missing file), or None."""
    key = next((HINTS[k.__name__] for k in type(error).__mro__ if k.__name__ in HINTS), None)
    return t(key, lang) if key else None


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
    if not installed.intersection(CJK_FONTS):  # installed after matplotlib's font cache was built: add them now
        for path in font_manager.findSystemFonts():
            if "CJK" in os.path.basename(path) or "wqy" in path.lower():
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
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
