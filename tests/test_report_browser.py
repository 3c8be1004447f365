"""The report card and the grade table in real headless Chromium: no console error, every image loads, Chinese
renders (a CJK font is installed and the names are laid out), the table sorts on a click and links each card.

Needs /usr/bin/chromium and /usr/bin/chromedriver (see tests/browser.py); skipped where they are missing.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from browser import INSTALL, chromium
from workbench import analysis as A
from workbench.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "outputs" / "screenshots"


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """A class of two: a Chinese-named adapter and a folder that is no model, graded on a cut of the probes."""
    from workbench.report.grade import grade_folder
    from workbench.train import train

    root = tmp_path_factory.mktemp("browser_report")
    cfg = load_recipe("smollm2_135m_tiny_smoke").replace(max_steps=1, save_steps=1, evaluation_freq=0,
                                                         assistant_name="小新", owner_name="张三")
    train(cfg, root / "run", progress=False)
    room = root / "class"
    shutil.copytree(root / "run" / "adapter", room / "学生_一")
    (room / "not_a_model").mkdir()
    p = A.load_probes()
    probes = A.Probes({l: q[:1] for l, q in p.identity_seen.items()}, {l: q[:2] for l, q in p.identity_unseen.items()},
                      {l: q[:2] for l, q in p.general.items()}, {l: f[:1] for l, f in p.facts.items()})
    grade_folder(room, "embedded:tiny-random", probes=probes, max_new_tokens=4, progress=False)
    return room / "_grades"


def _severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_card_and_grades_in_chromium(graded):
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout if shutil.which("fc-list") else ""
    driver = chromium(1300, 1000, console_log=True)
    assert fonts.strip(), f"no Chinese font: the page would show boxes ({INSTALL})"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        driver.get((graded / "grades.html").as_uri())
        rows = driver.find_elements("css selector", "tbody tr")
        assert sorted(r.find_elements("tag name", "td")[0].text for r in rows) == ["not_a_model", "学生_一"]
        header = driver.find_elements("css selector", "th")[0]
        header.click()
        first = [r.find_elements("tag name", "td")[0].text for r in driver.find_elements("css selector", "tbody tr")]
        header.click()
        again = [r.find_elements("tag name", "td")[0].text for r in driver.find_elements("css selector", "tbody tr")]
        assert first == sorted(first) and again == first[::-1], "a click sorts, a second one reverses"
        driver.save_screenshot(str(SCREENSHOTS / "grades.png"))
        assert not _severe(driver), _severe(driver)
        driver.find_element("link text", "report card").click()
        assert driver.title.startswith("Report card: 小新, 张三")
        images = driver.find_elements("tag name", "img")
        assert images and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                              for i in images), "every image loads"
        h1 = driver.find_element("tag name", "h1")
        assert "小新" in h1.text and h1.size["width"] > 0
        # Chinese renders in a CJK font: the two names are as wide as two ideographs, not collapsed or missing.
        width = driver.execute_script(
            "const s = document.createElement('span'); s.textContent = '小新张三'; s.style.fontSize = '20px';"
            "document.body.appendChild(s); const w = s.getBoundingClientRect().width; s.remove(); return w;")
        assert 60 <= width <= 100, f"4 ideographs at 20px should be about 80px wide, got {width}"
        driver.save_screenshot(str(SCREENSHOTS / "report_card.png"))
        assert not _severe(driver), _severe(driver)
    finally:
        driver.quit()


def test_a_camp_grade_page_in_chinese_in_chromium(graded, tmp_path):
    """XTuner-style homework (no saved config) named by a roster, graded in Chinese: the missing student's row, the
    card of an assistant with no name of its own, every image loaded, no console error."""
    from workbench.report.grade import grade_folder

    room = tmp_path / "camp"
    adapter = graded.parent.parent / "run" / "adapter"
    (room / "zhangsan").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # what `xtuner convert pth_to_hf` leaves
        shutil.copy(adapter / name, room / "zhangsan" / name)
    roster = tmp_path / "roster.csv"
    roster.write_text("submission,owner\nzhangsan,张三\nlisi,李四\n", encoding="utf-8")
    p = A.load_probes()
    probes = A.Probes({l: q[:1] for l, q in p.identity_seen.items()}, {l: q[:1] for l, q in p.identity_unseen.items()},
                      {l: q[:1] for l, q in p.general.items()}, {l: f[:1] for l, f in p.facts.items()})
    grade_folder(room, "embedded:tiny-random", probes=probes, max_new_tokens=3, progress=False, lang="zh", roster=roster)
    driver = chromium(1300, 1000, console_log=True)
    try:
        driver.get((room / "_grades" / "grades.html").as_uri())
        cells = {r.find_elements("tag name", "td")[0].text: r.find_elements("tag name", "td")[1].text
                 for r in driver.find_elements("css selector", "tbody tr")}
        assert cells["zhangsan"] == "完成" and cells["lisi"].startswith("缺交：roster.csv"), cells
        driver.find_element("link text", "成绩单").click()
        assert driver.title == "成绩单：张三 的助手（没有自己的名字）"
        images = driver.find_elements("tag name", "img")
        assert images and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                              for i in images), "every image loads"
        assert not _severe(driver), _severe(driver)
    finally:
        driver.quit()
