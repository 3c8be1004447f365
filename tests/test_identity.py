"""The identity data generators and writer."""
import json
import re

import pytest

from workbench.readers import detect_format, read_records
from workbench.identity import (ANSWERS, QUESTIONS, generate_identity, generate_tutorial_identity, identity_questions,
                                write_identity_dataset)

CJK = re.compile(r"[\u4e00-\u9fff]")


def answers(samples):
    return [s.messages[-1]["content"] for s in samples]


def questions(samples):
    return [s.messages[0]["content"] for s in samples]


def test_both_languages_present():
    samples = generate_identity("Zephyr", "Mira")
    zh = [q for q in questions(samples) if CJK.search(q)]
    en = [q for q in questions(samples) if not CJK.search(q)]
    assert len(zh) > 50 and len(en) > 50
    assert all(not CJK.search(a) for s in samples if not CJK.search(s.messages[0]["content"]) for a in answers([s]))


def test_every_answer_names_assistant_and_owner():
    samples = generate_identity("Zephyr", "李雷")
    assert all("Zephyr" in a and "李雷" in a for a in answers(samples))
    for lang in ANSWERS:
        for templates in ANSWERS[lang].values():
            assert len(templates) >= 3
            assert all("{name}" in t and "{owner}" in t for t in templates)


def test_question_templates_are_many_and_distinct():
    en, zh = identity_questions("en"), identity_questions("zh")
    assert len(set(en)) == len(en) >= 25
    assert len(set(zh)) == len(zh) >= 20
    assert all(CJK.search(q) for q in zh) and not any(CJK.search(q) for q in en)
    assert all("{" not in q for q in en + zh)
    assert set(questions(generate_identity("N", "O"))) == set(en + zh)
    with pytest.raises(ValueError, match="unknown language"):
        identity_questions("fr")


def test_each_question_kind_has_answers():
    for lang, items in QUESTIONS.items():
        assert {kind for kind, _ in items} == set(ANSWERS[lang])


def test_generation_is_deterministic_with_seed():
    a, b = generate_identity("N", "O", seed=3), generate_identity("N", "O", seed=3)
    assert [s.messages for s in a] == [s.messages for s in b]
    assert [s.messages for s in generate_identity("N", "O", seed=4)] != [s.messages for s in a]
    assert [s.record for s in a] == list(range(1, len(a) + 1))
    assert {s.source for s in a} == {"generated:identity"}


def test_n_variants_and_languages():
    full = generate_identity("N", "O", languages=("en",))
    assert not any(CJK.search(q) for q in questions(full))
    few = generate_identity("N", "O", n_variants=10, languages=("en",))
    assert len(few) == 10 and len({tuple(q.items()) for s in few for q in s.messages}) > 10
    many = generate_identity("N", "O", n_variants=2 * len(full) + 3, languages=("en",))
    assert len(many) == 2 * len(full) + 3


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="owner_name"):
        generate_identity("Nova", "  ")


def test_tutorial_recipe_count_and_duplication():
    samples = generate_tutorial_identity("小明", n_repeat=5, assistant_name="Nova")
    assert len(samples) == 2 * (5 + 1)
    distinct = {tuple((m["role"], m["content"]) for m in s.messages) for s in samples}
    assert len(distinct) == 2
    assert [s.messages for s in samples[:2]] * 6 == [s.messages for s in samples]
    assert all(CJK.search(q) for q in questions(samples))
    assert all("小明" in a for a in answers(samples)) and "Nova" in answers(samples)[0]
    assert len(generate_tutorial_identity("小明")) == 7502  # the tutorial's 3750 repeats


def test_write_identity_dataset_in_xtuner_format(tmp_path):
    path = write_identity_dataset(tmp_path / "assistant.json", "Nova", "小明")
    text = path.read_text(encoding="utf-8")
    assert "小明" in text and "\\u" not in text  # readable Chinese
    records = json.loads(text)
    assert all(set(r) == {"conversation"} for r in records)
    assert detect_format(path) == "xtuner"
    assert len(read_records(path)) == len(records) == len(generate_identity("Nova", "小明"))


def test_write_tutorial_style_and_messages_format(tmp_path):
    tutorial = write_identity_dataset(tmp_path / "t.jsonl", "Nova", "Alex", style="tutorial", n_repeat=4)
    assert len(tutorial.read_text(encoding="utf-8").splitlines()) == 10
    chat = write_identity_dataset(tmp_path / "m.json", "Nova", "Alex", fmt="messages")
    assert detect_format(chat) == "messages"
    with pytest.raises(ValueError, match="style"):
        write_identity_dataset(tmp_path / "x.json", "Nova", "Alex", style="fancy")
    with pytest.raises(ValueError, match="fmt"):
        write_identity_dataset(tmp_path / "x.json", "Nova", "Alex", fmt="csv")


def test_existing_file_is_not_overwritten(tmp_path):
    path = tmp_path / "assistant.json"
    path.write_text("keep me", encoding="utf-8")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_identity_dataset(path, "Nova", "Alex")
    assert path.read_text(encoding="utf-8") == "keep me"
    write_identity_dataset(path, "Nova", "Alex", style="tutorial", n_repeat=1, overwrite=True)
    assert len(json.loads(path.read_text(encoding="utf-8"))) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["assistant.json"]


def test_written_file_trains_what_the_recipe_generates(tmp_path):
    """Notebook 01's file and a recipe's `generate: identity` mix into the same rows in the same order."""
    from workbench.config import DataSource, resolve_config
    from workbench.mixing import mix_sources

    path = write_identity_dataset(tmp_path / "identity.json", "Nova", "Alex")
    cfg = resolve_config("smollm2_135m_lora_identity_mixed_cpu")
    from_file = cfg.replace(datasets=[DataSource(path=str(path), repeat=3), *cfg.datasets[1:]])
    assert cfg.datasets[0].generate == "identity" and cfg.datasets[0].repeat == 3
    assert [s.messages for s in mix_sources(from_file)] == [s.messages for s in mix_sources(cfg)]
