"""Messages of the terminal (`workbench chat`, `workbench compare`). key -> (English, Chinese), as in workbench/i18n."""

MESSAGES: dict[str, tuple[str, str]] = {
    "chat.banner": ("Chat with the model. Type RESET to clear the history, EXIT to quit.",
                    "和模型对话。输入 RESET（或“清空”）清空对话历史，输入 EXIT（或“退出”）退出。"),
    "chat.cleared": ("(history cleared)", "（对话历史已清空）"),
    "compare.written": ("written: {out}/comparison.md, comparison.csv, comparison.png",
                        "已写入：{out}/comparison.md、comparison.csv、comparison.png"),
}

# What a student may type to clear the history or quit, in either language (compared upper-cased).
RESET_WORDS = ("RESET", "清空")
EXIT_WORDS = ("EXIT", "退出")
