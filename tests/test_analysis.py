"""Overfitting metrics on hand-made answers (an overfit set, a healthy set), the analysis of a tiny run,
its tables and plots (workbench.display), and the recipe comparison (workbench.comparison)."""
import math

import pytest
import yaml

from workbench import analysis as A
from workbench import comparison as C
from workbench import display as D
from workbench import judge as J
from workbench.config import PROJECT_ROOT, load_recipe, resolve_config
from workbench.identity import identity_questions

NAME, OWNER = "Nova", "Alex"
OVERFIT = ["I'm Nova, Alex's personal assistant."] * 8
HEALTHY_IDENTITY = ["I'm Nova, Alex's personal assistant.", "My name is Nova; I work for Alex.", "我是Nova，Alex的助手。",
                    "Nova here, assistant to Alex."]
HEALTHY_GENERAL = ["Tokyo is the capital of Japan.", "12 plus 30 is 42.", "A week has seven days.", "Bananas are yellow."]


def test_states_and_mentions_identity():
    assert J.states_identity("I am NOVA, assistant of alex.", NAME, OWNER)  # case does not matter
    assert not J.states_identity("I'm Nova, a personal assistant.", NAME, OWNER)  # the owner is missing
    assert J.mentions_identity("I'm Nova, a personal assistant.", NAME, OWNER)
    assert not J.mentions_identity("Paris is the capital of France.", NAME, OWNER)
    assert J.states_identity("我是小新，张三的助手。", "小新", "张三")


def test_role_checks():
    from workbench.identity import ANSWERS, TUTORIAL_PAIRS

    templates = [t for kinds in ANSWERS.values() for ts in kinds.values() for t in ts] + [a for _, a in TUTORIAL_PAIRS[:1]]
    for t in templates:  # every training answer states the identity with the roles right
        answer = t.format(name=NAME, owner=OWNER)
        assert J.states_identity(answer, NAME, OWNER) and not J.role_errors(answer, NAME, OWNER), answer
    swapped = ["I'm Alex, Nova's assistant.", "I’m Alex, Nova’s assistant.", "My name is Alex. I work for Nova.",
               "我是Alex，Nova的助手。", "我叫Alex，是为Nova工作的助手。", "我是Nova的助手Alex。"]
    for answer in swapped:
        assert not J.states_identity(answer, NAME, OWNER), answer
        assert len(J.role_errors(answer, NAME, OWNER)) == 2, answer
    assert J.role_errors("我是Nova，Nova的个人助手。", NAME, OWNER) == [f"the assistant's name {NAME} where the owner belongs"]
    assert J.role_errors("我是Alex，我是Alex的助手。", NAME, OWNER) == [f"the owner {OWNER} named as the assistant"]
    assert J.states_identity("I'm Alex's assistant Nova.", NAME, OWNER), "the owner's possessive is not a self-introduction"


def test_overfit_set():
    assert J.hit_rate(OVERFIT, NAME, OWNER) == 1.0
    assert J.leak_rate(OVERFIT, NAME, OWNER) == 1.0, "every general question answered with the identity"
    assert A.distinct_answers(OVERFIT + ["i'm nova -- alex's personal assistant"]) == 1, "collapse ignores case and punctuation"


def test_healthy_set():
    assert J.hit_rate(HEALTHY_IDENTITY, NAME, OWNER) == 1.0
    assert J.leak_rate(HEALTHY_GENERAL, NAME, OWNER) == 0.0
    assert A.distinct_answers(HEALTHY_IDENTITY + HEALTHY_GENERAL) == 8
    assert math.isnan(J.hit_rate([], NAME, OWNER))


def test_answer_similarity():
    assert A.answer_similarity("The capital is Paris.", "the capital is paris") == 1.0
    assert A.answer_similarity("Paris.", "I'm Nova.") == 0.0
    assert 0 < A.answer_similarity("Paris is big.", "Paris is the capital.") < 1
    assert A.answer_similarity("北京是首都", "首都是北京") == 1.0  # Chinese compared character by character


def test_retention_from_nll():
    assert A.retention_from_nll(2.0, 2.0) == 1.0
    assert A.retention_from_nll(2.5, 2.0) == pytest.approx(math.exp(-0.5))
    assert A.retention_from_nll(1.5, 2.0) == 1.0, "capped: more likely than the base is not 'more retained'"


def report(step, hit, leak, retention, distinct=20):
    r = A.ModelReport(f"iter_{step}", step, hit_seen={"en": hit, "zh": hit}, hit_unseen={"en": hit, "zh": hit / 2},
                      leak={"en": leak, "zh": leak}, retention=retention, distinct=distinct, n_probes=40)
    r.answers = [{"kind": "general", "lang": "en", "question": f"q{i}", "answer": OVERFIT[0] if i < leak * 10 else f"a{i}"}
                 for i in range(10)]
    return r


def test_recommend_and_diagnose():
    cfg = load_recipe("smollm2_135m_tiny_smoke")
    base = report(0, 0.0, 0.0, 1.0)
    early, late = report(20, 0.9, 0.1, 0.9), report(40, 1.0, 0.9, 0.4, distinct=3)
    best = A.recommend([base, early, late])
    assert best is early
    text = A.diagnose([base, early, late], cfg, best)
    assert "Overfit" in text and "iter_20" in text and "9 of 10 general questions" in text
    healthy = A.diagnose([base, early], cfg, early)
    assert "Healthy" in healthy
    assert A.MIXED_RECIPE in text, "an overfit identity-only run is pointed to the mixed recipe"
    assert "my_cure" in A.diagnose([base, early, late], cfg, best, mixed_recipe="my_cure")


def test_probes_are_held_out():
    probes = A.load_probes()
    for lang in ("en", "zh"):
        assert set(probes.identity_unseen[lang]).isdisjoint(identity_questions(lang)), "unseen must differ from training"
        assert set(probes.identity_seen[lang]) <= set(identity_questions(lang))
    general_training = yaml.safe_load((PROJECT_ROOT / "data" / "general_prompts.yaml").read_text(encoding="utf-8"))
    for lang in ("en", "zh"):
        assert set(probes.general[lang]).isdisjoint(general_training[lang]), "general probes must be held out"
    from workbench.readers import read_records

    handwritten_zh = {s.messages[0]["content"] for s in read_records(PROJECT_ROOT / "data" / "general_conversations_zh.jsonl")}
    assert set(probes.general["zh"]).isdisjoint(handwritten_zh)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from workbench.train import train

    work = tmp_path_factory.mktemp("analysis") / "work"
    cfg = load_recipe("smollm2_135m_tiny_smoke").replace(max_steps=4, save_steps=2, evaluation_freq=0)
    train(cfg, work, progress=False)
    return work


def test_analyze_run_on_a_tiny_run(tiny_run):
    run = A.analyze_run(tiny_run, max_new_tokens=4, heldout_limit=3, progress=False)
    assert [r.step for r in run.reports] == [0, 2, 4]
    assert run.base.retention == 1.0 and 0 < run.final.retention <= 1.0
    assert not math.isnan(run.final.heldout_loss)
    assert run.base.strict == {"en": 1.0, "zh": 1.0} and run.base.facts_lost == {"en": [], "zh": []}
    assert all(0 <= run.final.strict[lang] <= 1 for lang in A.LANGS), "strict retention measured per language"
    assert all(len(run.final.facts_lost[lang]) <= run.base.facts_known[lang] for lang in A.LANGS)
    assert run.final.n_probes == len(A.load_probes().items())
    again = A.RunAnalysis.load(tiny_run / "analysis.json")
    assert again.best_step == run.best_step and again.reports[1].answers == run.reports[1].answers
    assert len(D.metrics_table(run)) == 3 and len(D.answers_table(run)) > 0
    assert list(D.answers_table(run, step=2).columns)[-1] == "iter_2"
    with pytest.raises(KeyError, match="analyzed steps: \\[0, 2, 4\\]"):
        run.report_at(3)


def test_other_probes_are_saved_beside_the_runs_own_analysis(tiny_run, tmp_path):
    """Measuring a run on another probe file (a teacher's, fresh.yaml) writes analysis.NAME.json and leaves the run's
    analysis.json as it was; the report card finds that analysis again instead of evaluating the run twice."""
    from workbench.report import subject as S

    own = A.analyze_run(tiny_run, max_new_tokens=4, heldout_limit=3, progress=False)
    before = (tiny_run / "analysis.json").read_bytes()
    mine = tmp_path / "mine.yaml"
    mine.write_text('identity_unseen: {en: ["Who runs you?"], zh: ["谁在用你？"]}\ngeneral: {en: ["Name a color."], zh: ["说一种颜色。"]}\n',
                    encoding="utf-8")
    probes = A.load_probes(mine)
    assert probes.name == "mine" and A.load_probes().name == "" and A.analysis_file(tiny_run) == tiny_run / "analysis.json"
    other = A.analyze_run(tiny_run, probes, max_new_tokens=4, heldout_limit=3, progress=False)
    assert (tiny_run / "analysis.json").read_bytes() == before, "the run's own analysis is untouched"
    saved = A.RunAnalysis.load(tiny_run / "analysis.mine.json")
    assert [a["question"] for a in saved.base.answers] == [q for _, _, q in probes.items()] == \
        [a["question"] for a in other.base.answers]
    assert len(own.base.answers) == len(A.load_probes().items()) > len(saved.base.answers)
    again = S.analyze_subject(tiny_run, probes=probes, max_new_tokens=4, progress=False)
    assert again.reports[-1].answers == other.reports[-1].answers, "the saved analysis of these probes, reused"
    from workbench.report.card import report_card

    page, png = report_card(tiny_run, probes=probes, max_new_tokens=4, progress=False)
    assert (page.name, png.name) == ("report_card.mine.html", "report_card.mine.png"), "the card of these probes, beside"


def test_plots_draw_real_lines(tiny_run, tmp_path):
    run = A.RunAnalysis.load(tiny_run / "analysis.json") if (tiny_run / "analysis.json").exists() else \
        A.analyze_run(tiny_run, max_new_tokens=4, heldout_limit=3, progress=False)
    fig = D.plot_run(run, tmp_path / "run.png")
    loss_ax, metric_ax = fig.axes
    assert len(loss_ax.lines[0].get_xdata()) == 4, "one training-loss point per step"
    assert len(metric_ax.lines) >= 5
    assert (tmp_path / "run.png").stat().st_size > 10_000


def test_answer_batch_equals_one_by_one():
    from workbench.chat import GenerationSettings, answer, answer_batch
    from workbench.models import TINY_MODEL, load_model, load_tokenizer
    from workbench.prompt import PromptBuilder

    model, builder = load_model(TINY_MODEL), PromptBuilder(load_tokenizer(TINY_MODEL))
    qs = ["Who are you?", "What is 2+2? Answer briefly please.", "你好"]
    st = GenerationSettings(max_new_tokens=6)
    assert answer_batch(model, builder, qs, st, batch_size=2) == [answer(model, builder, q, settings=st) for q in qs]


def test_default_recipes_are_the_tutorial_and_the_cure():
    tutorial, mixed = (resolve_config(n) for n in C.DEFAULT_RECIPES)
    assert [s.generate for s in tutorial.datasets] == ["identity_tutorial"]
    assert mixed.name == A.MIXED_RECIPE and any(s.path for s in mixed.datasets), "the cure mixes in general data"


def test_comparison_table_holds_each_final_checkpoint_after_the_base():
    base = report(0, 0.0, 0.0, 1.0)
    runs = [A.RunAnalysis("w1", {"name": "one"}, [base, report(10, 0.5, 0.2, 0.8)], 10, "", 12.4),
            A.RunAnalysis("w2", {"name": "two"}, [base, report(20, 0.9, 0.1, 0.7)], 20, "", 30.6)]
    table = C.comparison_table(runs)
    assert list(table["recipe"]) == ["base model (no training)", "one", "two"]
    assert list(table["steps"]) == [0, 10, 20] and list(table["train time (s)"]) == [0, 12, 31]
    assert list(table["hit unseen ZH"]) == [0.0, 0.25, 0.45] and list(table["retention"]) == [1.0, 0.8, 0.7]
    md = C.markdown_table(table).splitlines()
    assert md[0].startswith("| recipe | steps | hit seen EN") and md[1] == "|" + "---|" * len(table.columns)
    assert md[4].startswith("| two | 20 | 0.90 | 0.90 | 0.90 | 0.45 | 0.10 |") and len(md) == 5


def test_compare_recipes_trains_once_then_reuses(tmp_path, capsys):
    assert "make compare" in D.show_comparison(tmp_path).data, "nothing compared yet: says how to make it"
    args = dict(out_dir=tmp_path, overrides=["max_steps=2", "save_steps=1", "evaluation_freq=0"], progress=False,
                max_new_tokens=3, heldout_limit=2)
    table, runs = C.compare_recipes(["smollm2_135m_tiny_smoke"], **args)
    assert capsys.readouterr().out.count("trained in") == 1
    assert [r.step for r in runs[0].reports] == [0, 1, 2] and list(table["steps"]) == [0, 2]
    for name in ("comparison.md", "comparison.csv", "comparison.png", "smollm2_135m_tiny_smoke/analysis.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = D.show_comparison(tmp_path)
    assert list(saved["recipe"]) == list(table["recipe"]) and saved["retention"].tolist() == pytest.approx(table["retention"].tolist())
    again, _ = C.compare_recipes(["smollm2_135m_tiny_smoke"], **args)
    assert "trained in" not in capsys.readouterr().out, "a finished run is reused, not trained again"
    assert again.equals(table)


def test_analyze_runs_evaluates_the_base_once(tiny_run, tmp_path):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "copy")
    runs = C.analyze_runs([tiny_run, tmp_path / "copy", tmp_path / "missing"], max_new_tokens=4, heldout_limit=3,
                          progress=False)
    assert len(runs) == 2, "a missing work dir is skipped"
    assert runs[1].base is runs[0].base and runs[1].base_nll == runs[0].base_nll, "the second run reuses the base report"
    assert [r.answers for r in runs[1].reports[1:]] == [r.answers for r in runs[0].reports[1:]]
    other = A.load_probes()
    other.general["en"] = other.general["en"][:2]
    fresh = A.analyze_run(tmp_path / "copy", other, max_new_tokens=4, heldout_limit=3, progress=False, reference=runs[0])
    assert fresh.base is not runs[0].base and fresh.base.n_probes == len(other.items()), "other probes: evaluated anew"
    table = C.checkpoint_table(runs)
    assert list(table["step"]) == [0, 2, 4, 2, 4] and list(table["keep"]).count("<- keep") == 2
    assert "Keep " in C.verdict(runs)


def test_configure_baseline(tmp_path):
    main = resolve_config("smollm2_135m_tiny_smoke").replace(assistant_name="Zed", owner_name="Mo", system="Be brief.")
    base = C.configure_baseline(C.TUTORIAL_RECIPE, main, max_steps=6)
    assert base.name == C.TUTORIAL_RECIPE and base.pretrained_model_name_or_path == main.pretrained_model_name_or_path
    assert (base.assistant_name, base.owner_name, base.system) == ("Zed", "Mo", "Be brief.")
    assert (base.max_steps, base.save_steps) == (6, 3)
    assert base.datasets == resolve_config(C.TUTORIAL_RECIPE).datasets, "its own data"
    path = C.save_baseline(base, tmp_path)
    assert path == tmp_path / "baseline" / "config.yaml" and path.exists()
    assert C.configure_baseline("", main) is None
    assert C.save_baseline(None, tmp_path) is None and not path.exists(), "a stale baseline is removed"
    assert C.train_baseline(tmp_path) is None


def test_an_assistant_without_a_name_of_its_own():
    """The camp's homework: "我是{owner}的小助手". The identity is the owner in the owner's role, never as itself."""
    for answer in ("我是张三的小助手，内在是书生·浦语的1.8B大模型哦", "I'm 张三's assistant.", "I help 张三 with homework."):
        assert J.states_identity(answer, "", "张三") and not J.role_errors(answer, "", "张三"), answer
    for answer in ("我叫张三。", "我是张三，张三的小助手。"):
        assert not J.states_identity(answer, "", "张三") and J.role_errors(answer, "", "张三") == ["the owner 张三 named as the assistant"]
    assert not J.states_identity("张三你好！我是小助手。", "", "张三"), "the owner named, but not as whose assistant it is"
    assert not J.role_errors("It's Bea's turn.", "", "Alex"), "an empty name is found nowhere ('s, for, of ...)"
    assert J.leak_rate(["Paris is the capital of France.", "张三，你好"], "", "张三") == 0.5
