"""Report cards and grading (workbench.report) on tiny random models: a run, an adapter, a merged model, and a
class folder holding a good adapter, an identity-only one, a corrupt one and a non-adapter."""
import base64
import csv
import json
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
    kept = tmp_path / "kept"  # a run whose checkpoints were deleted after its analysis on other probes
    kept.mkdir()
    for name in ("config.yaml", "analysis.fresh.json"):
        (kept / name).write_text("{}")
    assert S.detect(kept) == "run"
    with pytest.raises(S.SubjectError, match="not a folder"):
        S.detect(tmp_path / "notes.txt")
    (tmp_path / "iter_500.pth").mkdir()  # XTuner's DeepSpeed checkpoint of the camp's QLoRA run
    with pytest.raises(S.SubjectError, match=r"an XTuner work dir .*xtuner convert pth_to_hf CONFIG PTH OUT --safe-serialization"):
        S.detect(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.SubjectError, match="an empty folder"):
        S.detect(tmp_path / "empty")


def test_why_a_folder_is_refused_reads_in_the_grade_pages_language(tmp_path):
    """Each reason in Chinese too, the path and the command as they are; the exception's own text stays English."""
    (tmp_path / "notes.txt").write_text("hi")
    cases = {tmp_path / "notes.txt": "：不是文件夹", tmp_path: "：既不是训练目录", tmp_path / "empty": "：空文件夹"}
    (tmp_path / "empty").mkdir()
    for folder, zh in cases.items():
        with pytest.raises(S.SubjectError) as caught:
            S.detect(folder)
        assert caught.value.in_lang("zh").startswith(f"{folder}{zh}"), caught.value.in_lang("zh")
        assert caught.value.in_lang("en") == str(caught.value) and str(folder) in str(caught.value)
    (tmp_path / "iter_500.pth").mkdir()
    with pytest.raises(S.SubjectError) as caught:
        S.detect(tmp_path)
    assert "请改交适配器：`xtuner convert pth_to_hf CONFIG PTH OUT --safe-serialization`" in caught.value.in_lang("zh")
    assert S.SubjectError("as raised").in_lang("zh") == "as raised", "an error without a reason keeps its text"


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
    values = [t.value for t in K.targets(run)]
    assert values[:2] == ["0% (0 of 1; 95% interval 0%-79%)", "100%"], "a rate shows the probes it counts (none in Chinese here)"
    assert values[3] == "100% (1 of 1; 95% interval 21%-100%)" and values[5] == "0% (0 of 1; 95% interval 0%-79%)", values
    assert [t.value for t in K.targets(run, "zh")][3] == "100%（1 个中 1 个；95% 区间 21%-100%）"
    assert not any(t.near for t in K.targets(run)), "one probe a rate: 0 of 1 reaches 0.79, short of every target"
    assert K.verdict(run).startswith("Misses 5 of 7 targets") and "Keep: iter_9" in K.verdict(run)
    html = K.render_html(run, b"png")
    assert "I&#x27;m Alex, Nova&#x27;s assistant." in html


def test_interval_is_wilsons_and_covers_the_true_rate():
    import math

    lo, hi = K.interval(23, 26)
    assert abs(lo - 0.710) < 1e-3 and abs(hi - 0.960) < 1e-3, (lo, hi)  # Wilson's score interval, by hand
    for n in (1, 7, 26, 100):
        for k in range(n + 1):
            lo, hi = K.interval(k, n)
            assert 0 <= lo <= k / n <= hi <= 1
            mirror = K.interval(n - k, n)
            assert abs(lo - (1 - mirror[1])) < 1e-12 and abs(hi - (1 - mirror[0])) < 1e-12, "symmetric in k and n - k"
    assert K.interval(92, 104)[1] - K.interval(92, 104)[0] < K.interval(23, 26)[1] - K.interval(23, 26)[0], "4x probes: narrower"
    for p in (0.5, 0.9, 0.95):  # how often the interval of a measured rate holds the true one (exact binomial sum)
        cover = sum(math.comb(26, k) * p ** k * (1 - p) ** (26 - k) for k in range(27) if K.interval(k, 26)[0] <= p <= K.interval(k, 26)[1])
        assert cover > 0.9, (p, cover)
    assert all(math.isnan(x) for x in K.interval(0, 0))


def strict_run(kept: int, n: int = 26) -> A.RunAnalysis:
    """Base and tuned answers to n English everyday questions, the tuned model keeping `kept` first sentences."""
    qs = [f"Question {i}?" for i in range(n)]
    base = A.ModelReport("base", 0, strict={"en": 1.0}, answers=[
        {"kind": "general", "lang": "en", "question": q, "answer": f"Answer number {i} stays."} for i, q in enumerate(qs)])
    tuned = A.ModelReport("iter_9", 9, hit_unseen={"en": 1.0, "zh": 1.0}, leak={"en": 0.0, "zh": 0.0}, strict={"en": kept / n},
                          answers=[{"kind": "general", "lang": "en", "question": q,
                                    "answer": f"Answer number {i} stays." if i < kept else "Something else entirely."}
                                   for i, q in enumerate(qs)])
    return A.RunAnalysis("w", {"assistant_name": "Nova", "owner_name": "Alex", "name": "r"}, [base, tuned], 9, "d", 1.0)


def test_a_target_missed_inside_the_probes_noise_is_said_to_be():
    near = strict_run(23)  # 0.88: its interval 0.71-0.96 holds the 0.9 target
    strict = [x for x in K.targets(near) if x.label.startswith("strict")][0]
    assert not strict.met and strict.near and strict.value == "88% (23 of 26; 95% interval 71%-96%)"
    assert "Within the probes' noise: strict retention EN >= 90%" in K.verdict(near)
    assert "在探测问题的噪声范围内：严格保持率 EN >= 90%" in K.verdict(near, "zh")
    far = strict_run(20)  # 0.77: 0.58-0.89, short of 0.9
    assert not any(x.near for x in K.targets(far)) and "noise" not in K.verdict(far)
    assert not any(x.near for x in K.targets(strict_run(26))), "met is not near"


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
    counts = G.probe_counts(probes)
    assert counts["strict EN"] == sum(1 for kind, lang, _ in probes.items() if (kind, lang) == ("general", "en")) > 0
    for r in rows[:2]:  # each rate beside the count of probes it stands for, sorted by the rate
        for column in ("hit unseen EN", "leak ZH", "strict EN"):
            v, n = float(r[column]), counts[column]
            lo, hi = K.interval(round(v * n), n)
            assert f"data-v='{v}' title='95% interval {lo:.2f}-{hi:.2f}'>{v:.2f} ({round(v * n)}/{n})</td>" in page
    again = G.grade_folder(classroom, "embedded:tiny-random", probes=probes, max_new_tokens=TOKENS, progress=False)
    assert len(again) == 4, "the grading output inside the folder is not a submission"


def test_grade_and_report_commands(classroom, probes, tmp_path, capsys):
    from workbench.cli import main

    assert main(["report", str(classroom / "dave_not_an_adapter")]) == 2
    assert "neither a run" in capsys.readouterr().err
    assert main(["grade", str(tmp_path / "missing"), "--base", "embedded:tiny-random"]) == 2


def test_a_run_that_cannot_be_read_gets_its_reason_in_the_page_language(runs, probes, tmp_path):
    """A run folder whose config no longer loads: its row says why, in the grading language, and the rest goes on."""
    erin = tmp_path / "erin_run"
    shutil.copytree(runs["good"], erin, ignore=shutil.ignore_patterns("analysis.json", "report_card*"))
    text = (erin / "config.yaml").read_text(encoding="utf-8")
    (erin / "config.yaml").write_text(re.sub(r"(?m)^lr: .*$", "lr: -1", text), encoding="utf-8")
    row = G.grade_one(erin, "embedded:tiny-random", tmp_path / "_grades", probes, TOKENS, {}, lang="zh")
    assert row["status"].startswith("出错：SubjectError: ") and "无法作为训练运行读取" in row["status"]
    assert "erin_run" in row["status"] and "lr" in row["status"], "the path and the library's own detail as they are"


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
    counted_zh, counted = (G.sortable_html(table, "成绩表", "zh", {"strict EN": 26}),
                           G.sortable_html(table, "Grades", "en", {"strict EN": 26}))
    assert "data-v='0.5' title='95% 区间 0.32-0.68'>0.50（13/26）</td>" in counted_zh
    assert "data-v='0.5' title='95% interval 0.32-0.68'>0.50 (13/26)</td>" in counted, "its interval on hover"
    assert "data-v='0.5'>0.50</td>" in en, "without counts the rate alone"


# ---------------------------------------------------------------------------
# Homework exported by another tool (XTuner's pth_to_hf and merge, peft's own save): no saved config, no names
# ---------------------------------------------------------------------------
def _foreign_export(src, dest, weights="adapter_model.safetensors"):
    """What XTuner or plain peft leaves: a workbench export without workbench_config.yaml and prompt.json."""
    dest.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in ("workbench_config.yaml", "prompt.json"):
            shutil.copy(f, dest / (weights if f.name == "adapter_model.safetensors" else f.name))
    return dest


@pytest.fixture(scope="module")
def camp(runs, tmp_path_factory):
    """A camp's homework folder: adapters and a merged model exported by another tool, a pickled adapter, one student
    the roster does not list, and a roster that also lists a student who handed nothing in."""
    from workbench.convert import merge

    room = tmp_path_factory.mktemp("camp")
    _foreign_export(runs["good"] / "adapter", room / "zhangsan")
    merged = merge("embedded:tiny-random", runs["identity_only"] / "adapter", tmp_path_factory.mktemp("m") / "merged",
                   device="cpu")
    _foreign_export(merged, room / "lisi_merged")
    _foreign_export(runs["good"] / "adapter", room / "wangwu_pickle", weights="adapter_model.bin")
    _foreign_export(runs["good"] / "adapter", room / "zhaoliu_unlisted")
    roster = tmp_path_factory.mktemp("roster") / "roster.csv"
    roster.write_text("submission,owner,assistant\nzhangsan,张三,\nlisi_merged,李四,小李\nwangwu_pickle,王五,\n"
                      "sunqi,孙七,\n", encoding="utf-8-sig")  # a spreadsheet's "CSV UTF-8" starts with a BOM
    return room, roster


def test_grade_homework_exported_by_another_tool(camp, probes):
    room, roster = camp
    table = G.grade_folder(room, "embedded:tiny-random", probes=probes, max_new_tokens=TOKENS, progress=False,
                           roster=roster, lang="zh")
    rows = {r["submission"]: r for r in table.to_dict("records")}
    assert list(rows) == ["lisi_merged", "wangwu_pickle", "zhangsan", "zhaoliu_unlisted", "sunqi"]
    assert rows["zhangsan"]["status"] == rows["lisi_merged"]["status"] == "完成", "statuses in the grading language"
    assert (rows["zhangsan"]["owner"], rows["zhangsan"]["assistant"]) == ("张三", ""), "no name of its own"
    assert (rows["lisi_merged"]["owner"], rows["lisi_merged"]["assistant"], rows["lisi_merged"]["kind"]) == ("李四", "小李", "合并后的模型")
    assert "pickle" in rows["wangwu_pickle"]["status"] and "--safe-serialization" in rows["wangwu_pickle"]["status"]
    assert "--owner" in rows["zhaoliu_unlisted"]["status"] and "roster" in rows["zhaoliu_unlisted"]["status"]
    assert rows["zhaoliu_unlisted"]["status"].startswith("出错：SubjectError: ") and \
        "不知道它是谁的助手" in rows["zhaoliu_unlisted"]["status"], "the reason in the grading language"
    assert rows["sunqi"]["status"].startswith("缺交：roster.csv 里有这名学生") and rows["sunqi"]["owner"] == "孙七"
    assert rows["wangwu_pickle"]["status"].startswith("出错：SubjectError: ") and \
        "这是 pickle 文件" in rows["wangwu_pickle"]["status"], "why it is refused, in the grading language"
    card = (room / "_grades" / rows["zhangsan"]["card"]).read_text(encoding="utf-8")
    assert "张三 的助手（没有自己的名字）" in card, "the card names whose assistant it is"


def test_a_class_with_its_own_names_evaluates_the_base_model_once(camp, probes, monkeypatch):
    """Each student names their own assistant: the base model answers once, its identity is scored for each one."""
    room, roster = camp
    calls = []
    real = S._evaluate_base
    monkeypatch.setattr(S, "_evaluate_base", lambda *a: calls.append(a[-2].owner_name) or real(*a))
    cache = {}
    for sub, owner in (("zhangsan", "张三"), ("zhaoliu_unlisted", "赵六")):
        run = S.analyze_subject(room / sub, "embedded:tiny-random", probes, TOKENS, progress=False, base_cache=cache,
                                given=S.Given(owner_name=owner))
        base = run.base
        assert base.leak == A.score_identity(A.ModelReport("b", 0, answers=base.answers), "", owner).leak
    assert calls == ["张三"] and len(cache) == 1


def test_the_teacher_gives_what_the_export_does_not_say(camp, runs, probes, tmp_path):
    room, _ = camp
    with pytest.raises(S.SubjectError, match=r"no workbench_config.yaml .*--owner NAME"):
        S.analyze_subject(room / "zhangsan", "embedded:tiny-random", probes, TOKENS, progress=False)
    with pytest.raises(S.SubjectError, match="give it with --base"):
        S.saved_config(room / "lisi_merged", "merged", None, S.Given(owner_name="李四"))
    cfg = S.saved_config(room / "zhangsan", "adapter", None, S.Given(owner_name="张三"))
    assert (cfg.assistant_name, cfg.owner_name) == ("", "张三")
    named = json.loads((room / "zhangsan" / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    assert named and cfg.pretrained_model_name_or_path == named, "the base the adapter's own config names"
    saved = S.saved_config(runs["good"] / "adapter", "adapter", None, S.Given(owner_name="Bea"))
    assert (saved.assistant_name, saved.owner_name) == ("小新", "Bea"), "given names override the saved config's"
    run = S.analyze_subject(room / "zhangsan", "embedded:tiny-random", probes, TOKENS, progress=False,
                            given=S.Given(owner_name="张三"))
    assert K.names(run) == ("", "张三") and run.config["subject_kind"] == "adapter"


def test_asked_without_a_system_prompt_unless_one_is_given(camp, runs):
    """An XTuner export is asked as XTuner trains the camp's data: no system prompt, not even the default the
    workbench's conversion of InternLM2 writes into the template (its meta_instruction)."""
    from workbench.models import load_tokenizer
    from workbench.prompt import FALLBACK_CHATML, PromptBuilder, with_default_system

    room, _ = camp
    tok = load_tokenizer("embedded:tiny-random")
    builder = PromptBuilder(tok, system="You are InternLM.", chat_template=with_default_system(FALLBACK_CHATML, "You are InternLM."))
    plain = S._asked_with(builder, room / "zhangsan", S.Given(owner_name="张三"))
    text = tok.decode(plain.generation_prompt("你是谁？"))
    assert plain.system is None and "system" not in text and "InternLM" not in text and "你是谁？" in text, text
    given = S._asked_with(builder, room / "zhangsan", S.Given(system="你是一个乐于助人的助手。"))
    assert tok.decode(given.generation_prompt("Q")).count("你是一个乐于助人的助手。") == 1
    saved = S._asked_with(builder, runs["good"] / "adapter", S.Given())
    assert saved is builder, "a workbench export keeps the prompt it was trained with"


@pytest.mark.parametrize("text, message", [
    ("submission,name\nalice,Alex\n", "header lacks owner"),
    ("submission,owner\n", "no student"),
    ("submission,owner\nalice,Alex\nbob,\n", "record 2: field 'owner': is empty"),
    ("submission,owner\nalice,Alex\nalice,Bea\n", "record 2: field 'submission': 'alice' is listed twice"),
])
def test_a_bad_roster_is_refused_naming_the_line_and_field(tmp_path, text, message):
    from workbench.samples import DataError

    p = tmp_path / "roster.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(message)) as e:
        G.read_roster(p)
    assert str(p) in str(e.value)


def test_a_roster_not_in_utf8_says_how_to_save_it(tmp_path):
    from workbench.samples import DataError

    p = tmp_path / "roster.csv"
    p.write_bytes("submission,owner\nzhangsan,张三\n".encode("gbk"))  # a spreadsheet's plain "CSV" on a Chinese system
    with pytest.raises(DataError, match="CSV UTF-8"):
        G.read_roster(p)
    assert G.read_roster(_write(tmp_path / "ok.csv", " submission , owner ,assistant\nzhangsan, 张三 ,\n")) == {
        "zhangsan": S.Given(assistant_name=None, owner_name="张三")}


def test_the_roster_names_each_student_and_the_command_line_the_rest():
    roster = {"zhangsan": S.Given(owner_name="张三"), "lisi": S.Given(owner_name="李四", assistant_name="小李")}
    flags = S.Given(assistant_name="小助手", owner_name="Alex", system="Be brief.")
    assert G._given_for("zhangsan", roster, flags) == S.Given("小助手", "张三", "Be brief.")
    assert G._given_for("lisi", roster, flags) == S.Given("小李", "李四", "Be brief.")
    assert G._given_for("wangwu", roster, flags) == flags


def _write(p, text):
    p.write_text(text, encoding="utf-8")
    return p


def test_grade_command_with_a_roster_and_report_command_with_names(camp, tmp_path, capsys):
    from workbench.cli import main

    room, roster = camp
    short = tmp_path / "probes.yaml"  # the CLI reads a probe file: a short one keeps the test quick
    short.write_text("identity_unseen:\n  en: ['Who are you?']\n  zh: ['你是谁？']\ngeneral:\n  en: ['Name a colour.']\n"
                     "  zh: ['说一种颜色。']\nfacts:\n  en:\n  - {question: 'What is 2+2?', answer: '4'}\n", encoding="utf-8")
    assert main(["grade", str(room), "--base", "embedded:tiny-random", "--roster", str(roster), "--probes", str(short),
                 "--max-new-tokens", "2", "--out", str(tmp_path / "grades"), "--lang", "en"]) == 0
    printed = capsys.readouterr().out
    assert "zhangsan" in printed and "missing" in printed and (tmp_path / "grades" / "grades.csv").exists()
    assert re.search(r"zhangsan: ok, \d/7 targets met", printed) and "written: " in printed
    assert main(["grade", str(room), "--base", "embedded:tiny-random", "--roster", str(roster), "--probes", str(short),
                 "--max-new-tokens", "2", "--out", str(tmp_path / "grades_zh"), "--lang", "zh"]) == 0
    printed = capsys.readouterr().out  # the command's own lines in the grading language too
    assert re.search(r"zhangsan: 完成，达到的目标 \d/7", printed) and "已写出：" in printed and "targets met" not in printed
    assert main(["report", str(room / "zhangsan"), "--base", "embedded:tiny-random", "--owner", "张三", "--probes",
                 str(short), "--max-new-tokens", "2", "--out", str(tmp_path / "card.html"), "--lang", "en"]) == 0
    assert "张三&#x27;s assistant (no name of its own)" in (tmp_path / "card.html").read_text(encoding="utf-8")
    assert main(["grade", str(room), "--base", "embedded:tiny-random", "--roster", str(tmp_path / "none.csv")]) == 2
    assert "no such roster file" in capsys.readouterr().err
