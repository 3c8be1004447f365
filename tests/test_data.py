"""Reading every data format, validation errors, mixing, encoding reports and writing."""
import json
import os
import pickle
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from workbench.config import Config, ConfigError, DataSource, save_config
from workbench.encoding import DatasetReport, check_dataset, encode_samples
from workbench.formats import FORMATS
from workbench.mixing import load_source, mix_sources
from workbench.prompt import PromptBuilder
from workbench.readers import detect_format, read_records, read_source
from workbench.samples import DataError, Sample, to_xtuner_json, write_dataset

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "data", "examples")
ROOT = Path(__file__).resolve().parents[1]


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------
def test_xtuner_multi_turn_with_system(tmp_path):
    p = write_json(tmp_path / "x.json", [{"conversation": [
        {"system": "Be brief.", "input": "Hi", "output": "Hello!"},
        {"input": "Your name?", "output": "Nova."}]}])
    [s] = read_records(p)
    assert s.messages == [system("Be brief."), user("Hi"), assistant("Hello!"), user("Your name?"), assistant("Nova.")]
    assert (s.text, s.source, s.record) == (None, str(p), 1)


def test_xtuner_jsonl_numbers_records_by_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"conversation": [{"input": "a", "output": "b"}]}\n\n{"conversation": [{"input": "c", "output": "d"}]}\n',
                 encoding="utf-8")
    samples = read_records(p)
    assert [s.record for s in samples] == [1, 3]
    assert samples[1].messages == [user("c"), assistant("d")]


def test_xtuner_pretraining_form_becomes_text(tmp_path):
    p = write_json(tmp_path / "x.json", [{"conversation": [{"input": "", "output": "A plain document."}]}])
    [s] = read_records(p)
    assert (s.messages, s.text) == ([], "A plain document.")


def test_pairs_with_optional_system(tmp_path):
    p = write_json(tmp_path / "p.json", [{"input": "q1", "output": "a1"}, {"system": "S", "input": "q2", "output": "a2"}])
    a, b = read_records(p)
    assert a.messages == [user("q1"), assistant("a1")]
    assert b.messages == [system("S"), user("q2"), assistant("a2")]


def test_alpaca_joins_non_empty_input(tmp_path):
    p = write_json(tmp_path / "a.json", [{"instruction": "Translate.", "input": "chat", "output": "cat"},
                                         {"instruction": "Say hi.", "input": "", "output": "Hi!"}])
    a, b = read_records(p)
    assert a.messages[0] == user("Translate.\n\nchat")
    assert b.messages == [user("Say hi."), assistant("Hi!")]


def test_openai_messages_and_sharegpt(tmp_path):
    conv = [system("S"), user("q"), assistant("a"), user("q2"), assistant("a2")]
    share = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}, {"conversations": share}])
    a, b = read_records(p)
    assert a.messages == conv
    assert b.messages == [user("q"), assistant("a")]


def test_problem_solution_single_object_file(tmp_path):
    p = write_json(tmp_path / "1.json", {"problem": "1+1?", "solution": "$2$", "level": "Level 1"})
    [s] = read_records(p)
    assert s.messages == [user("1+1?"), assistant("$2$")]


def test_csv_table_with_bom_and_system_column(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("question,answer,system\nq1,a1,\n\nq2,\"a, 2\",S\n", encoding="utf-8-sig")
    a, b = read_records(p)
    assert a.messages == [user("q1"), assistant("a1")]
    assert b.messages == [system("S"), user("q2"), assistant("a, 2")]
    assert (a.record, b.record) == (1, 3)  # data rows, header excluded; the blank row keeps its number


def test_table_custom_columns_and_no_system(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("q\ta\tsystem\nWhy?\tBecause.\tS\n", encoding="utf-8")
    [s] = read_records(p, question_column="q", answer_column="a", system_column=None)
    assert s.messages == [user("Why?"), assistant("Because.")]


def test_xlsx_table(tmp_path):
    p = tmp_path / "t.xlsx"
    pd.DataFrame({"question": ["你好", "2+2?"], "answer": ["你好！", 4]}).to_excel(p, index=False)
    a, b = read_records(p)
    assert a.messages == [user("你好"), assistant("你好！")]
    assert b.messages == [user("2+2?"), assistant("4")]


def test_text_file_one_document_per_blank_line_block(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("First line\nsecond line.\n\n  \nNext document.\r\n\r\nLast.\n", encoding="utf-8")
    docs = read_records(p)
    assert [d.text for d in docs] == ["First line\nsecond line.", "Next document.", "Last."]
    assert [d.record for d in docs] == [1, 2, 3]
    assert all(d.messages == [] for d in docs)


def test_text_json_records(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
    assert [s.text for s in read_records(p)] == ["one", "two"]


def test_json_list_in_a_jsonl_file_and_jsonl_in_a_json_file(tmp_path):
    records = [{"input": "q", "output": "a"}, {"input": "q2", "output": "a2"}]
    assert len(read_records(write_json(tmp_path / "list.jsonl", records))) == 2
    assert [s.record for s in read_records(write_jsonl(tmp_path / "lines.json", records))] == [1, 2]


def test_shipped_examples_read():
    assert len(read_records(os.path.join(EXAMPLES, "qa_example.csv"))) >= 8
    assert len(read_records(os.path.join(EXAMPLES, "pretrain_example.txt"))) >= 3


# ---------------------------------------------------------------------------
# Auto-detection
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("record, expected", [
    ({"conversation": [{"input": "q", "output": "a"}]}, "xtuner"),
    ({"input": "q", "output": "a"}, "pairs"),
    ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
    ({"messages": [user("q"), assistant("a")]}, "messages"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "messages"),
    ({"problem": "q", "solution": "a"}, "problem_solution"),
    ({"question": "q", "answer": "a"}, "table"),
    ({"text": "doc"}, "text"),
])
def test_detect_format_from_first_record(tmp_path, record, expected):
    p = write_jsonl(tmp_path / "d.jsonl", [record])
    assert detect_format(p) == expected
    assert expected in FORMATS
    assert len(read_records(p)) == 1


@pytest.mark.parametrize("name, expected", [("a.csv", "table"), ("a.xlsx", "table"), ("a.tsv", "table"), ("a.txt", "text")])
def test_detect_format_from_extension(name, expected):
    assert detect_format(name) == expected


def test_explicit_format_overrides_detection(tmp_path):
    p = write_json(tmp_path / "q.json", [{"q": "Why?", "a": "Because."}])
    with pytest.raises(DataError, match="cannot tell the data format"):
        read_records(p)
    [s] = read_records(p, format="table", question_column="q", answer_column="a")
    assert s.messages == [user("Why?"), assistant("Because.")]


# ---------------------------------------------------------------------------
# Validation errors: each names file, record and field
# ---------------------------------------------------------------------------
def raises_at(path, record, field, *fragments, **kwargs):
    with pytest.raises(DataError) as info:
        read_records(path, **kwargs)
    err = info.value
    assert (err.path, err.record, err.field) == (str(path), record, field)
    text = str(err)
    assert text.startswith(str(path))
    if record:
        assert f"record {record}" in text
    if field:
        assert f"field '{field}'" in text
    for fragment in fragments:
        assert fragment in text
    return err


def test_error_message_shape(tmp_path):
    err = DataError("data/x.json", 3, "output", "empty answer")
    assert str(err) == "data/x.json: record 3: field 'output': empty answer"
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.record, again.field, str(again)) == (err.path, 3, "output", str(err))


def test_bad_json_line_in_jsonl(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"input": "q", "output": "a"}\n{"input": "q", "output": \n', encoding="utf-8")
    raises_at(p, 2, None, "not valid JSON")


def test_bad_json_reports_position(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[\n {"input": "q", "output": "a"},\n {"input": "q" "output": "a"}\n]\n', encoding="utf-8")
    raises_at(p, 0, None, "not valid JSON", "line 3")


def test_not_utf8_suggests_resaving(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes("question,answer\n你是谁,我是助手\n".encode("gbk"))
    raises_at(p, 0, None, "not UTF-8", "line 2", "GBK", "Re-save the file as UTF-8")


def test_top_level_must_be_list_or_object(tmp_path):
    raises_at(write_json(tmp_path / "x.json", "just a string"), 0, None, "top level")


def test_record_must_be_an_object(tmp_path):
    raises_at(write_json(tmp_path / "x.json", [{"input": "q", "output": "a"}, 3]), 2, None, "JSON object")


def test_missing_field(tmp_path):
    raises_at(write_json(tmp_path / "x.json", [{"input": "q", "output": "a"}, {"input": "q"}]), 2, "output", "missing")


def test_non_string_field(tmp_path):
    raises_at(write_json(tmp_path / "x.json", [{"input": "q", "output": 42}]), 1, "output", "must be a string")


def test_empty_answer(tmp_path):
    p = write_json(tmp_path / "x.json", [{"input": "q", "output": "a"}] * 2 + [{"input": "q", "output": "  "}])
    raises_at(p, 3, "output", "empty answer")


def test_empty_question_in_a_later_xtuner_turn(tmp_path):
    turns = [{"input": "q", "output": "a"}, {"input": "", "output": "b"}]
    raises_at(write_json(tmp_path / "x.json", [{"conversation": turns}]), 1, "conversation[1].input", "empty question")


def test_xtuner_system_only_on_first_turn(tmp_path):
    turns = [{"system": "A", "input": "q", "output": "a"}, {"system": "B", "input": "q", "output": "b"}]
    raises_at(write_json(tmp_path / "x.json", [{"conversation": turns}]), 1, "conversation[1].system", "first turn")


def test_roles_out_of_order(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": [user("a"), assistant("b")]}, {"messages": [user("a"), user("b")]}])
    raises_at(p, 2, "messages[1].role", "out of order", "expected 'assistant'")


def test_conversation_must_end_with_assistant(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": [system("s"), user("a"), assistant("b"), user("c")]}])
    raises_at(p, 1, "messages[3]", "end with an assistant")


def test_system_message_only_first(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": [user("a"), system("s"), assistant("b")]}])
    raises_at(p, 1, "messages[1].role", "only allowed as the first")


def test_unknown_role(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}])
    raises_at(p, 1, "conversations[1].from", "unknown role 'bot'")


@pytest.mark.parametrize("content", ["", "   \n", "[]"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "x.json"
    p.write_text(content, encoding="utf-8")
    raises_at(p, 0, None, "empty" if content.strip() == "" else "no records")


def test_table_missing_column(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("q,a\nx,y\n", encoding="utf-8")
    raises_at(p, 0, "question", "column missing", "['q', 'a']", question_column="question")


def test_table_empty_cell(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("question,answer\nx,y\n,z\n", encoding="utf-8")
    raises_at(p, 2, "question", "empty question")


def test_unknown_extension(tmp_path):
    raises_at(tmp_path / "data.parquet", 0, None, "unknown file type")


def test_format_that_cannot_read_the_file_type(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("question,answer\nx,y\n", encoding="utf-8")
    raises_at(p, 0, None, "format 'pairs' cannot read", format="pairs")


def test_first_error_in_file_order_is_raised(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"input": "q", "output": "a"}\n{"input": "q", "output": ""}\nnot json\n', encoding="utf-8")
    raises_at(p, 2, "output", "empty answer")


# ---------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------
@pytest.fixture()
def two_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"input": f"a{i}", "output": "x"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"input": f"b{i}", "output": "y"} for i in range(40)])
    return str(a), str(b)


def keys(samples):
    return [(os.path.basename(s.source), s.record) for s in samples]


def test_repeat_float_whole_copies_plus_sample(two_files):
    a, _ = two_files
    mixed = mix_sources(Config(datasets=[DataSource(path=a, repeat=2.5)]))
    counts = Counter(s.record for s in mixed)
    assert len(mixed) == 25
    assert sorted(Counter(counts.values()).items()) == [(2, 5), (3, 5)]


def shares_per_window(mixed, size):
    """For each window of `size` consecutive samples, how many come from b.jsonl."""
    from_b = [os.path.basename(s.source) == "b.jsonl" for s in mixed]
    return [sum(from_b[i:i + size]) for i in range(len(mixed) - size + 1)]


def test_stratified_mixture_spreads_each_source_evenly(two_files):
    a, b = two_files
    datasets = [DataSource(path=a, repeat=2), DataSource(path=b, repeat=2)]  # 20 of a, 80 of b: b is 4 in 5
    stratified = mix_sources(Config(datasets=datasets, mix_order="stratified"))
    shuffled = mix_sources(Config(datasets=datasets))
    assert sorted(keys(stratified)) == sorted(keys(shuffled)), "the same samples, in another order"
    assert keys(stratified) == keys(mix_sources(Config(datasets=datasets, mix_order="stratified"))), "seeded"
    assert keys(stratified) != keys(mix_sources(Config(datasets=datasets, mix_order="stratified", seed=1)))
    # every stretch of 10 holds 8 of b, give or take the jitter of one slot at each end
    assert all(6 <= n <= 10 for n in shares_per_window(stratified, 10))
    spread = [statistics.pstdev(shares_per_window(m, 10)) for m in (stratified, shuffled)]
    assert spread[0] < spread[1] / 2, f"stratified windows vary less than shuffled ones: {spread}"


def test_repeat_below_one_samples_without_replacement(two_files):
    _, b = two_files
    mixed = mix_sources(Config(datasets=[DataSource(path=b, repeat=0.25)]))
    assert len(mixed) == 10 and len(set(keys(mixed))) == 10


def test_fraction_is_share_of_final_mixture(two_files):
    a, b = two_files
    mixed = mix_sources(Config(datasets=[DataSource(path=b), DataSource(path=a, fraction=0.2)]))
    by_file = Counter(os.path.basename(s.source) for s in mixed)
    assert by_file == {"b.jsonl": 40, "a.jsonl": 10}
    mixed = mix_sources(Config(datasets=[DataSource(path=a), DataSource(path=b, fraction=0.5)]))
    assert Counter(os.path.basename(s.source) for s in mixed) == {"a.jsonl": 10, "b.jsonl": 10}


def test_fractions_leaving_no_share_are_refused(two_files):
    a, b = two_files
    with pytest.raises(ConfigError, match="fractions add up to 1"):
        mix_sources(Config(datasets=[DataSource(path=a), DataSource(path=b, fraction=1.0)]))


def test_all_fractions_are_normalised(two_files):
    a, b = two_files
    mixed = mix_sources(Config(datasets=[DataSource(path=a, fraction=0.3), DataSource(path=b, fraction=0.3)]))
    assert Counter(os.path.basename(s.source) for s in mixed) == {"a.jsonl": 25, "b.jsonl": 25}


def test_mixing_is_deterministic_and_shuffled(two_files):
    a, b = two_files
    cfg = Config(datasets=[DataSource(path=a, repeat=1.5), DataSource(path=b, repeat=0.5)], seed=7)
    first, again = keys(mix_sources(cfg)), keys(mix_sources(cfg))
    assert first == again and len(first) == 35
    assert first != sorted(first)
    assert keys(mix_sources(cfg.replace(seed=8))) != first


def test_generated_sources_use_config_names():
    cfg = Config(assistant_name="Zephyr", owner_name="Mira",
                 datasets=[DataSource(generate="identity_tutorial", n_repeat=3), DataSource(generate="identity")])
    tutorial = load_source(cfg.datasets[0], cfg)
    assert len(tutorial) == 8 and all("Mira" in s.messages[-1]["content"] for s in tutorial)
    mixed = mix_sources(cfg)
    assert Counter(s.source for s in mixed)["generated:identity_tutorial"] == 8
    assert all("Zephyr" in s.messages[-1]["content"] for s in mixed if s.source == "generated:identity")


# ---------------------------------------------------------------------------
# Encoding and checking (real tokenizer)
# ---------------------------------------------------------------------------
@pytest.fixture()
def builder(tokenizer):
    return PromptBuilder(tokenizer)


def conv_sample(question, answer, record):
    return Sample(messages=[user(question), assistant(answer)], source="t.json", record=record)


def test_encode_counts_truncated_and_dropped(builder):
    samples = [conv_sample("Who are you?", "I am Nova.", 1),
               conv_sample("Tell me a story.", "Once upon a time " * 40, 2),
               conv_sample("Please read this. " * 40, "OK.", 3),
               Sample(messages=[], text="A short document.", source="doc.txt", record=1)]
    encoded, report = encode_samples(samples, builder, max_length=64, loss_on="all_turns")
    assert (report.n_records, report.n_samples, report.n_truncated, report.n_dropped) == (4, 3, 1, 1)
    assert report.dropped == ["t.json: record 3"]
    assert report.per_source == {"t.json": 3, "doc.txt": 1}
    assert report.n_tokens == sum(len(e) for e in encoded)
    assert report.n_trained_tokens == sum(e.n_trained for e in encoded)
    assert report.max_len == 64 and all(len(e) <= 64 for e in encoded)
    assert all(e.n_trained > 0 for e in encoded)
    text = str(report)
    assert "1 dropped" in text and "truncated: 1" in text and "t.json: record 3" in text


def test_encode_repeated_samples_gives_independent_copies(builder):
    s = conv_sample("Who are you?", "I am Nova.", 1)
    (a, b), report = encode_samples([s, s], builder, max_length=128, loss_on="last_turn")
    assert a.input_ids == b.input_ids and a.input_ids is not b.input_ids
    assert a.input_ids == builder.encode(s.messages, 128, "last_turn").input_ids


def test_check_dataset_collects_all_errors_with_cap(tmp_path, tokenizer):
    records = [{"input": "q", "output": "a"}] + [{"input": "q", "output": ""}] * 25
    p = write_json(tmp_path / "bad.json", records)
    report = check_dataset(p, tokenizer=tokenizer)
    assert report.n_errors == 25 and len(report.errors) == 20 and not report.ok
    assert report.errors[0] == f"{p}: record 2: field 'output': empty answer"
    assert report.n_records == 1 and report.n_samples == 1
    assert "... and 5 more" in str(report)


def test_check_dataset_strict_counts_dropped_as_error_and_writes_nothing(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", [{"input": "hi", "output": "hello"}, {"input": "word " * 100, "output": "ok"},
                                           {"input": "hi", "output": "long " * 100}])
    before = sorted(os.listdir(tmp_path)), p.stat().st_mtime_ns
    strict = check_dataset(p, tokenizer=tokenizer, max_length=48)
    assert (strict.n_dropped, strict.n_truncated, strict.n_errors) == (1, 1, 1)
    assert "would be dropped" in strict.errors[0] and f"{p}: record 2" in strict.errors[0]
    lenient = check_dataset(p, tokenizer=tokenizer, max_length=48, strict=False)
    assert lenient.ok and lenient.n_dropped == 1
    assert (sorted(os.listdir(tmp_path)), p.stat().st_mtime_ns) == before


def test_check_dataset_on_a_config_file(tmp_path, tokenizer, two_files):
    a, b = two_files
    bad = write_json(tmp_path / "bad.json", [{"input": "q"}])
    cfg = Config(datasets=[DataSource(path=a, repeat=2), DataSource(path=str(bad)), DataSource(generate="identity")])
    cfg_path = save_config(cfg, tmp_path / "run.yaml")
    report = check_dataset(cfg_path, tokenizer=tokenizer)
    assert report.per_source[a] == 20 and report.per_source["generated:identity"] > 100
    assert report.errors == [f"{bad}: record 1: field 'output': missing (this record has the fields ['input'])"]
    assert check_dataset(cfg.replace(datasets=[{"path": a}]), tokenizer=tokenizer).ok


def test_report_str_without_problems():
    text = str(DatasetReport(n_records=2, n_samples=2, n_tokens=10, n_trained_tokens=4, max_len=6, per_source={"a": 2}))
    assert "2 kept" in text and "(40%)" in text and "errors: none" in text


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def test_to_xtuner_json_round_trip(tmp_path):
    samples = [Sample(messages=[system("S"), user("q1"), assistant("a1"), user("q2"), assistant("a2")]),
               Sample(messages=[user("你好"), assistant("你好！")]),
               Sample(messages=[], text="A document.")]
    records = to_xtuner_json(samples)
    assert records[0] == {"conversation": [{"system": "S", "input": "q1", "output": "a1"}, {"input": "q2", "output": "a2"}]}
    assert records[2] == {"conversation": [{"input": "", "output": "A document."}]}
    for name in ("out.json", "out.jsonl"):
        back = read_records(write_dataset(samples, tmp_path / name))
        assert [(s.messages, s.text) for s in back] == [(s.messages, s.text) for s in samples]


def test_write_dataset_layout_utf8_and_atomic(tmp_path):
    records = [{"input": "你是谁", "output": "我是助手"}, {"input": "q", "output": "a"}]
    jsonl = write_dataset(records, tmp_path / "d.jsonl")
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and "你是谁" in lines[0]
    listed = write_dataset(records, tmp_path / "d.json")
    assert json.loads(listed.read_text(encoding="utf-8")) == records and "\n    " in listed.read_text(encoding="utf-8")
    assert sorted(os.listdir(tmp_path)) == ["d.json", "d.jsonl"]  # no temporary files left behind
    with pytest.raises(ValueError, match=".json or .jsonl"):
        write_dataset(records, tmp_path / "d.csv")


# ---------------------------------------------------------------------------
# Folders and glob patterns (the MATH data set: folders of folders, one problem per JSON file)
# ---------------------------------------------------------------------------
@pytest.fixture()
def math_tree(tmp_path):
    """MATH as downloaded: MATH/{train,test}/<subject>/<n>.json, each one object; plus files that are not data."""
    root = tmp_path / "MATH"
    problems = {}
    for split in ("train", "test"):
        for subject in ("algebra", "geometry"):
            for n in (1, 2):
                folder = root / split / subject
                folder.mkdir(parents=True, exist_ok=True)
                problem = f"{split} {subject} problem {n}"
                write_json(folder / f"{n}.json", {"problem": problem, "level": "Level 2", "type": subject.title(),
                                                  "solution": f"The answer is $\\boxed{{{n}}}$."})
                problems[str(folder / f"{n}.json")] = problem
    (root / "README.md").write_text("the MATH data set", encoding="utf-8")
    (root / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    write_json(root / "train" / ".ipynb_checkpoints" / "1-checkpoint.json", {"problem": "copy", "solution": "copy"})
    return root, problems


def test_folder_reads_every_data_file_under_it(math_tree):
    root, problems = math_tree
    samples = read_records(root)
    assert len(samples) == len(problems) == 8
    assert {s.file: s.messages[0]["content"] for s in samples} == problems
    assert all(s.source == str(root) and s.record == 1 for s in samples)
    assert [s.file for s in samples] == sorted(problems, key=lambda f: Path(f).parts)  # a stable order
    assert samples[0].messages == [user("test algebra problem 1"), assistant("The answer is $\\boxed{1}$.")]
    reading = read_source(root)
    assert len(reading.files) == 8 and reading.skipped == [str(root / "README.md")]


def test_folder_errors_name_the_file_and_record(math_tree):
    root, _ = math_tree
    bad = root / "test" / "geometry" / "2.json"
    write_json(bad, {"problem": "p", "solution": ""})
    with pytest.raises(DataError) as info:
        read_records(root)
    assert (info.value.path, info.value.record, info.value.field) == (str(bad), 1, "solution")
    reading = read_source(root)
    assert len(reading.samples) == 7 and [e.path for e in reading.errors] == [str(bad)]


@pytest.mark.parametrize("pattern, n", [("MATH/**/*.json", 8), ("MATH/train/*/*.json", 4), ("MATH/test/algebra", 2),
                                        ("MATH/*/geometry", 4)])
def test_glob_pattern(math_tree, pattern, n):
    root, _ = math_tree
    path = root.parent / pattern
    samples = read_records(path)
    assert len(samples) == n and all(s.source == str(path) for s in samples)
    assert len({s.file for s in samples}) == n


def test_folder_or_pattern_without_data_files(tmp_path):
    (tmp_path / "empty").mkdir()
    raises_at(tmp_path / "empty", 0, None, "no data files under this folder", ".jsonl")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("x", encoding="utf-8")
    raises_at(tmp_path / "docs", 0, None, "no data files under this folder", "it has only .md")
    raises_at(tmp_path / "*.json", 0, None, "no data files match this pattern")


def test_config_source_may_be_a_folder_or_a_pattern(math_tree, tmp_path, tokenizer):
    root, _ = math_tree
    cfg = Config(datasets=[DataSource(path=str(root)), DataSource(path=str(root / "train" / "**" / "*.json"), repeat=2)])
    mixed = mix_sources(cfg)
    assert Counter(s.source for s in mixed) == {str(root): 8, str(root / "train" / "**" / "*.json"): 8}
    report = check_dataset(save_config(cfg, tmp_path / "math.yaml"), tokenizer=tokenizer)
    assert report.ok and (report.n_records, report.n_files) == (16, 12)
    assert report.files == {str(root): 8, str(root / "train" / "**" / "*.json"): 4}


def test_report_counts_files_as_well_as_records(math_tree, tokenizer):
    root, _ = math_tree
    write_json(root / "test" / "geometry" / "2.json", {"problem": "p", "solution": ""})
    report = check_dataset(root, tokenizer=tokenizer)
    assert (report.n_records, report.n_files, report.n_errors) == (7, 8, 1)  # the file whose record failed is counted
    text = str(report)
    assert f"files: 8 read ({root}: 8 files); 1 file of other types skipped, e.g. {root / 'README.md'}" in text
    assert f"per source: {root} 7" in text and "2.json: record 1: field 'solution': empty answer" in text


def test_report_of_a_single_file_has_no_files_line(tmp_path, tokenizer):
    p = write_json(tmp_path / "x.json", [{"input": "q", "output": "a"}])
    report = check_dataset(p, tokenizer=tokenizer)
    assert report.n_files == 1 and report.files == {} and "files:" not in str(report)


# ---------------------------------------------------------------------------
# Table columns: detected from common names unless given
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("question, answer", [("q", "a"), ("Question", "ANSWER"), ("prompt", "response"),
                                              ("instruction", "output"), ("问题", "答案")])
def test_table_columns_are_detected(tmp_path, question, answer):
    p = tmp_path / "t.csv"
    pd.DataFrame({"id": [1, 2], question: ["Why?", "How?"], answer: ["Because.", "Like this."]}).to_csv(p, index=False)
    reading = read_source(p)
    assert [s.messages for s in reading.samples] == [[user("Why?"), assistant("Because.")],
                                                     [user("How?"), assistant("Like this.")]]
    assert reading.columns == {str(p): f"question '{question}', answer '{answer}' (detected)"}


def test_career_coach_spreadsheet_with_q_and_a(tmp_path, tokenizer):
    """The tutorial's xlsx: columns q and a, Chinese text; read as it is, and the report says which columns."""
    p = tmp_path / "career_coach.xlsx"
    pd.DataFrame({"q": ["我总是担心找不到工作，怎么办？", "面试前很紧张"],
                  "a": ["先把担心写下来，再一件件拆解。", "提前演练几次会好很多。"]}).to_excel(p, index=False)
    a, b = read_records(p)
    assert a.messages == [user("我总是担心找不到工作，怎么办？"), assistant("先把担心写下来，再一件件拆解。")]
    assert (a.record, b.record) == (1, 2)
    report = check_dataset(p, tokenizer=tokenizer)
    assert report.ok and report.n_samples == 2
    assert f"columns: question 'q', answer 'a' (detected) in {p}" in str(report)


def test_ambiguous_or_unknown_table_columns_are_errors_listing_them(tmp_path):
    both = tmp_path / "both.csv"
    both.write_text("q,a,question,answer\n1,2,3,4\n", encoding="utf-8")
    raises_at(both, 0, None, "several known pairs (q/a, question/answer)", "['q', 'a', 'question', 'answer']",
              "Set question_column and answer_column")
    neither = tmp_path / "neither.xlsx"
    pd.DataFrame({"ask": ["x"], "reply": ["y"]}).to_excel(neither, index=False)
    raises_at(neither, 0, None, "no question and answer columns", "['ask', 'reply']", "q/a, question/answer")
    twice = tmp_path / "twice.csv"
    twice.write_text("Q,q,a\n1,2,3\n", encoding="utf-8")
    raises_at(twice, 0, None, "several known pairs (Q/a, q/a)")


def test_given_columns_win_over_detection(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("q,a,question,answer\nq1,a1,question1,answer1\n", encoding="utf-8")
    [s] = read_records(p, question_column="question", answer_column="answer")
    assert s.messages == [user("question1"), assistant("answer1")]
    [s] = read_records(p, question_column="a", answer_column="q")  # any columns, even odd ones
    assert s.messages == [user("a1"), assistant("q1")]
    assert read_source(p, question_column="question", answer_column="a").columns == {
        str(p): "question 'question', answer 'a' (given)"}
    with pytest.raises(DataError, match="several known pairs"):  # one side given: the other is detected, here twice
        read_records(p, answer_column="a")
    p.write_text("Prompt,reply\nq1,a1\n", encoding="utf-8")
    [s] = read_records(p, answer_column="reply")
    assert s.messages == [user("q1"), assistant("a1")]


def test_config_columns_default_to_detection_and_explicit_ones_still_work(tmp_path):
    p = tmp_path / "coach.csv"
    p.write_text("q,a,system\nWhy?,Because.,Be kind.\n", encoding="utf-8")
    assert (DataSource().question_column, DataSource().answer_column, DataSource().system_column) == (None, None, "system")
    [s] = mix_sources(Config(datasets=[DataSource(path=str(p))]))
    assert s.messages == [system("Be kind."), user("Why?"), assistant("Because.")]
    old = tmp_path / "old.csv"
    old.write_text("question,answer,q\nWhy?,Because.,x\n", encoding="utf-8")
    cfg = Config.from_dict({"datasets": [{"path": str(old), "question_column": "question", "answer_column": "answer"}]})
    [s] = mix_sources(cfg)
    assert s.messages == [user("Why?"), assistant("Because.")]


# ---------------------------------------------------------------------------
# Deeply nested JSON: a clear error, never a RecursionError
# ---------------------------------------------------------------------------
def deep(levels):
    return "[" * levels + "]" * levels


def test_deeply_nested_json_list_names_the_record(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text('[{"input": "q", "output": "a"},\n {"input": ' + deep(5000) + ', "output": "a"}]', encoding="utf-8")
    raises_at(p, 2, None, "nested too deeply", "5002 levels", "line 2")  # list, record, 5000


def test_deeply_nested_single_object_and_jsonl(tmp_path):
    one = tmp_path / "one.json"
    one.write_text('{"problem": ' + deep(100_000) + "}", encoding="utf-8")
    raises_at(one, 1, None, "nested too deeply")
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"input": "q", "output": "a"}\n{"input": "q", "output": "a"}\n{"x": ' + deep(3000) + "}\n",
                     encoding="utf-8")
    raises_at(lines, 3, None, "nested too deeply", "3001 levels")
    reading = read_source(lines)
    assert len(reading.samples) == 2 and len(reading.errors) == 1


def test_nesting_a_parser_can_read_is_an_ordinary_field_error(tmp_path):
    p = write_json(tmp_path / "x.json", [{"input": json.loads(deep(50)), "output": "a"}])
    raises_at(p, 1, "input", "must be a string, got a list")


# ---------------------------------------------------------------------------
# The command: workbench check-dataset PATH (exit status and message, nothing written)
# ---------------------------------------------------------------------------
def check_dataset_cli(capsys, path, cwd):
    """`workbench check-dataset PATH` in-process, run in `cwd`: (exit status, output); writes nothing, no traceback."""
    from workbench.cli import main

    before = sorted(str(p) for p in Path(cwd).rglob("*"))
    old = os.getcwd()
    os.chdir(cwd)
    try:
        capsys.readouterr()
        rc = main(["check-dataset", str(path), "--model", "embedded:tiny-random"])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert sorted(str(p) for p in Path(cwd).rglob("*")) == before, "check-dataset writes nothing"
    return rc, out + err


def test_cli_check_dataset_on_folders_patterns_and_tables(math_tree, tmp_path, capsys):
    pd.DataFrame({"Q": ["Why?"], "A": ["Because."]}).to_excel(tmp_path / "coach.xlsx", index=False)
    (tmp_path / "both.csv").write_text("q,a,prompt,response\n1,2,3,4\n", encoding="utf-8")
    (tmp_path / "run.yaml").write_text("pretrained_model_name_or_path: embedded:tiny-random\ndatasets:\n  - path: MATH/train\n"
                                       "  - path: 'MATH/test/**/*.json'\n  - path: coach.xlsx\n", encoding="utf-8")
    rc, out = check_dataset_cli(capsys, "MATH", tmp_path)
    assert rc == 0 and "records: 8 read" in out and "files: 8 read (MATH: 8 files)" in out
    rc, out = check_dataset_cli(capsys, "MATH/**/*.json", tmp_path)
    assert rc == 0 and "files: 8 read (MATH/**/*.json: 8 files)" in out
    rc, out = check_dataset_cli(capsys, "coach.xlsx", tmp_path)
    assert rc == 0 and "columns: question 'Q', answer 'A' (detected) in coach.xlsx" in out
    rc, out = check_dataset_cli(capsys, "run.yaml", tmp_path)
    assert rc == 0 and "files: 9 read (MATH/train: 4 files, MATH/test/**/*.json: 4 files)" in out
    assert "per source: MATH/train 4, MATH/test/**/*.json 4, coach.xlsx 1" in out
    rc, out = check_dataset_cli(capsys, "both.csv", tmp_path)
    assert rc == 1 and "both.csv: cannot tell the question and answer columns" in out
    assert "['q', 'a', 'prompt', 'response']" in out
    rc, out = check_dataset_cli(capsys, "MATH/*.parquet", tmp_path)
    assert rc == 1 and "MATH/*.parquet: no data files match this pattern" in out


def test_python_m_workbench_check_dataset_on_deep_json(tmp_path):
    """The real command in its own process: exit status 1, the file and record named, no traceback, nothing written."""
    (tmp_path / "deep.jsonl").write_text('{"input": "q", "output": "a"}\n{"x": ' + deep(5000) + "}\n", encoding="utf-8")
    before = sorted(tmp_path.iterdir())
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "workbench", "check-dataset", "deep.jsonl", "--model", "embedded:tiny-random"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out and "RecursionError" not in out
    assert "deep.jsonl: record 2: nested too deeply: 5001 levels" in out and "records: 1 read" in out
    assert sorted(tmp_path.iterdir()) == before


def test_json_records_in_table_form_detect_or_report_per_record(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"question": "q1", "answer": "a1"}, {"question": "q2"}])
    raises_at(p, 2, "answer", "missing")
    p = write_jsonl(tmp_path / "qa.jsonl", [{"q": "q1", "a": "a1"}])
    [s] = read_records(p, format="table")
    assert s.messages == [user("q1"), assistant("a1")]
    assert read_source(p, format="table").columns == {str(p): "question 'q', answer 'a' (detected)"}


def test_missing_folder_or_file_without_extension(tmp_path):
    raises_at(tmp_path / "MATH", 0, None, "no such file or folder")


def test_check_dataset_on_a_recipe_name(tokenizer):
    report = check_dataset("smollm2_135m_tiny_smoke", tokenizer=tokenizer)
    assert report.ok and report.n_samples > 0 and "generated:identity" in "".join(report.per_source)
