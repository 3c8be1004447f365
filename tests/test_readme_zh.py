"""README.md and README.zh-CN.md stay in step: the same command lines, the same sections, each linking the other.

A command line is a line of a ```bash block, its trailing comment dropped (the
comments are translated, the commands are not).
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EN, ZH = ROOT / "README.md", ROOT / "README.zh-CN.md"


def command_lines(path: Path) -> set[str]:
    """The command lines of the file's ```bash blocks, without their ` # comment` and surrounding blanks."""
    lines, inside = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash" if not inside else False
            continue
        if inside:
            command = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            if command:
                lines.add(command)
    return lines


def sections(path: Path) -> list[str]:
    """The `## ` headings outside code blocks."""
    out, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside and line.startswith("## "):
            out.append(line)
    return out


def test_every_command_line_is_in_both_readmes():
    en, zh = command_lines(EN), command_lines(ZH)
    assert len(en) > 30, "the check reads the bash blocks"
    assert not en - zh, f"in README.md, missing from README.zh-CN.md: {sorted(en - zh)}"
    assert not zh - en, f"in README.zh-CN.md, missing from README.md: {sorted(zh - en)}"


def test_same_sections_and_links_at_the_top():
    assert len(sections(EN)) == len(sections(ZH)), (sections(EN), sections(ZH))
    assert "(README.zh-CN.md)" in "\n".join(EN.read_text(encoding="utf-8").splitlines()[:4])
    assert "(README.md)" in "\n".join(ZH.read_text(encoding="utf-8").splitlines()[:4])


def test_the_chinese_readme_is_chinese():
    text = ZH.read_text(encoding="utf-8")
    prose = [line for line in text.splitlines() if line and not line.startswith(("```", "|", " ", "$", "workbench", "make"))]
    cjk = [line for line in prose if re.search(r"[\u4e00-\u9fff]", line)]
    assert len(cjk) >= 0.8 * len(prose), "most prose lines of README.zh-CN.md are Chinese"
