"""Report cards and grading (workbench.report) on tiny random models: a run, an adapter, a merged model, and a
class folder holding a good adapter, an identity-only one, a corrupt one and a non-adapter."""
import base64
import csv
import re
import shutil

import pytest

from workbench import analysis as A
from workbench.config import load_recipe
from workbench.report import card as K
from workbench.report import grade as G
from workbench.report import subject as S

TOKENS = 4  # answers are noise on a tiny random model: the shape of everything is what is tested


@pytest.fixture(scope="module")
def probes():
    """A cut of the default probes (every kind, both languages), to keep generation short."""
    p = A.load_probes()
    return A.Probes({l: q[:2] for l, q in p.identity_seen.items()}, {l: q[:3] for l, q in p.identity_unseen.items()},
                    {l: q[:3] for l, q in p.general.items()}, {l: f[:2] for l, f in p.facts.items()})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: identity with general data mixed in ("good"), identity only; their adapters exported."""
    from workbench.train import train

    root = tmp_path_factory.mktemp("report")
    out = {}
    for label in ("good", "identity_only"):
        cfg = load_recipe("smollm2_135m_tiny_smoke").replace(max_steps=2, save_steps=1, evaluation_freq=0,
                                                             assistant_name="小新" if label == "good" else "Nova",
                                                             owner_name="Alex")
        if label == "good":
            from workbench.config import DataSource

            cfg = cfg.replace(datasets=[*cfg.datasets, DataSource(path="data/general_conversations_zh.jsonl", fraction=0.2)])
        train(cfg, root / label, progress=False)
        out[label] = root / label
    return out


def test_detect_says_what_a_folder_is(tmp_path, runs):
    assert S.detect(runs["good"]) == "run" and S.detect(runs["good"] / "adapter") == "adapter"
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(S.SubjectError, match="neither a run.*notes.txt"):
        S.detect(tmp_path)
    with pytest.raises(S.SubjectError, match="not a folder"):
        S.detect(tmp_path / "notes.txt")


def test_report_card_of_an_adapter(runs, probes, tmp_path):
    page, png = K.report_card(runs["good"] / "adapter", out=tmp_path / "card.html", probes=probes, max_new_tokens=TOKENS,
                              progress=False)
    run = S.analyze_subject(runs["good"] / "adapter", probes=probes, max_new_tokens=TOKENS, progress=False)
    assert K.names(run) == ("小新", "Alex"), "names read from the adapter's saved config"
    assert [r.step for r in run.reports] == [0, 1] and run.best_step == 1
    assert run.base.strict == {"en": 1.0, "zh": 1.0}, "the base (adapter switched off) keeps its own first sentences"
    assert 0 <= run.reports[1].strict["en"] <= 1 and set(run.reports[1].facts_known) == {"en", "zh"}
    text = page.read_text(encoding="utf-8")
    assert "小新" in text and "Alex" in text and text.count("data:image/png;base64,") >= 1
    assert not re.search(r"(src|href)=['\"](?!data:)", text), "self-contained: no external file"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    embedded = base64.b64decode(re.search(r"data:image/png;base64,([^'\"]+)", text).group(1))
    assert embedded == png.read_bytes(), "the page embeds the PNG it writes beside itself"
    t = K.targets(run)
    assert len(t) == 7 and all(isinstance(x.met, bool) for x in t)
    assert set(K.failure_examples(run)) == {k for k in K.failure_examples(run)} and len(K.failure_examples(run)) == 5


def test_report_card_of_a_run_and_of_a_merged_model(runs, probes, tmp_path):
    from workbench.convert import merge

    page, _ = K.report_card(runs["identity_only"], out=tmp_path / "run.html", probes=probes, max_new_tokens=TOKENS,
                            progress=False)
    text = page.read_text(encoding="utf-8")
    assert "iter_" in text and "Keep" in text and text.count("data:image/png;base64,") == 2, "summary and the run's plot"
    merged = merge("embedded:tiny-random", runs["identity_only"] / "adapter", tmp_path / "merged", device="cpu")
    run = S.analyze_subject(merged, probes=probes, max_new_tokens=TOKENS, progress=False)
    assert run.config["subject_kind"] == "merged" and K.names(run) == ("Nova", "Alex")
    adapter = S.analyze_subject(runs["identity_only"] / "adapter", probes=probes, max_new_tokens=TOKENS, progress=False)
    assert [a["answer"] for a in run.reports[1].answers] == [a["answer"] for a in adapter.reports[1].answers], \
        "the merged model answers as base + adapter"


def test_failure_examples_and_verdict_on_hand_made_answers():
    base = A.ModelReport("base", 0, strict={"en": 1.0}, answers=[
        {"kind": "identity_unseen", "lang": "en", "question": "Name?", "answer": "I am an AI."},
        {"kind": "general", "lang": "en", "question": "Capital of Kenya?", "answer": "Nairobi is the capital."},
        {"kind": "fact", "lang": "en", "question": "2+2?", "answer": "It is 4."}])
    tuned = A.ModelReport("iter_9", 9, hit_unseen={"en": 0.0, "zh": 1.0}, leak={"en": 1.0, "zh": 0.0}, retention=0.5,
                          strict={"en": 0.0}, facts_known={"en": 1}, facts_lost={"en": ["2+2?"]}, answers=[
        {"kind": "identity_unseen", "lang": "en", "question": "Name?", "answer": "I'm Alex, Nova's assistant."},
        {"kind": "general", "lang": "en", "question": "Capital of Kenya?", "answer": "I'm Nova, here to help."},
        {"kind": "fact", "lang": "en", "question": "2+2?", "answer": "I'm Nova."}])
    run = A.RunAnalysis("w", {"assistant_name": "Nova", "owner_name": "Alex", "name": "r"}, [base, tuned], 9, "d", 1.0)
    ex = K.failure_examples(run)
    assert all(len(v) == 1 for v in ex.values()), ex
    assert ex["fact lost (the base model was right)"] == [("2+2?", "It is 4.", "I'm Nova.")]
    assert [t.met for t in K.targets(run)] == [False, True, False, False, True, False, False]
    assert K.verdict(run).startswith("Misses 5 of 7 targets") and "Keep: iter_9" in K.verdict(run)
    html = K.render_html(run, b"png")
    assert "I&#x27;m Alex, Nova&#x27;s assistant." in html


@pytest.fixture(scope="module")
def classroom(runs, tmp_path_factory):
    """A class's homework: a good adapter, an identity-only one, a corrupt one and a folder that is no model."""
    room = tmp_path_factory.mktemp("class")
    shutil.copytree(runs["good"] / "adapter", room / "alice_good")
    shutil.copytree(runs["identity_only"] / "adapter", room / "bob_identity_only")
    shutil.copytree(runs["good"] / "adapter", room / "carol_corrupt")
    (room / "carol_corrupt" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (room / "dave_not_an_adapter").mkdir()
    (room / "dave_not_an_adapter" / "homework.txt").write_text("I forgot to export it", encoding="utf-8")
    return room


def test_grade_a_class(classroom, probes):
    table = G.grade_folder(classroom, "embedded:tiny-random", probes=probes, max_new_tokens=TOKENS, progress=False)
    out = classroom / "_grades"
    assert list(table["submission"]) == ["alice_good", "bob_identity_only", "carol_corrupt", "dave_not_an_adapter"]
    status = dict(zip(table["submission"], table["status"]))
    assert status["alice_good"] == status["bob_identity_only"] == "ok"
    assert status["carol_corrupt"].startswith("error: SubjectError") and "carol_corrupt" in status["carol_corrupt"]
    assert "neither a run" in status["dave_not_an_adapter"]
    with open(out / "grades.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["submission"] for r in rows] == list(table["submission"]) and rows[0]["assistant"] == "小新"
    for r in rows[:2]:
        assert (out / r["card"]).exists() and (out / r["card"]).with_suffix(".png").exists()
        assert 0 <= float(r["strict EN"]) <= 1 and re.fullmatch(r"\d/7", r["targets met"])
    page = (out / "grades.html").read_text(encoding="utf-8")
    assert page.count("<tr>") == 5 and "href='cards/alice_good.html'" in page and "<script>" in page
    again = G.grade_folder(classroom, "embedded:tiny-random", probes=probes, max_new_tokens=TOKENS, progress=False)
    assert len(again) == 4, "the grading output inside the folder is not a submission"


def test_grade_and_report_commands(classroom, probes, tmp_path, capsys):
    from workbench.cli import main

    assert main(["report", str(classroom / "dave_not_an_adapter")]) == 2
    assert "neither a run" in capsys.readouterr().err
    assert main(["grade", str(tmp_path / "missing"), "--base", "embedded:tiny-random"]) == 2


def test_grade_page_in_chinese_keeps_the_csv_columns():
    """grades.html in Chinese: every header, the link text and the page language; the values and links unchanged."""
    import pandas as pd

    from workbench.i18n.report import GRADE_COLUMNS_ZH

    row = {c: "" for c in G.COLUMNS} | {"submission": "alice", "strict EN": 0.5, "card": "cards/alice.html"}
    table = pd.DataFrame([row], columns=G.COLUMNS)
    zh, en = G.sortable_html(table, "成绩表", "zh"), G.sortable_html(table, "Grades")
    assert set(GRADE_COLUMNS_ZH) == set(G.COLUMNS), "every column has its Chinese header"
    assert all(f">{h}</th>" in zh for h in GRADE_COLUMNS_ZH.values()) and '<html lang="zh-CN">' in zh
    assert ">成绩单</a>" in zh and "href='cards/alice.html'" in zh and "data-v='0.5'" in zh and ">alice<" in zh
    assert all(f">{c}</th>" in en for c in G.COLUMNS) and ">report card</a>" in en and '<html lang="en">' in en
