"""Config: validation messages, YAML round trip, recipes, overrides, and `configure` (the notebooks' config)."""
import pytest
import yaml

from workbench.config import (Config, ConfigError, DataSource, configure, copy_recipe, list_recipes, load_config, load_recipe,
                              resolve_config, save_config)


def test_yaml_round_trip_is_equal(tmp_path):
    cfg = Config(name="t", method="qlora", lora_target_modules=["q_proj", "v_proj"], max_steps=7,
                 datasets=[DataSource(path="a.json", repeat=2.5), DataSource(generate="identity")], owner_name="张三")
    path = save_config(cfg, tmp_path / "c.yaml")
    assert load_config(path) == cfg
    text = path.read_text(encoding="utf-8")
    assert "张三" in text and "# Peak learning rate" in text  # UTF-8, help as comments


@pytest.mark.parametrize("field,value,needle", [
    ("method", "dora", "method: must be one of"),
    ("lr", 5, "lr: must be in (0, 1)"),
    ("batch_size", 0, "batch_size: must be a positive integer"),
    ("save_total_limit", 0, "save_total_limit"),
    ("lora_target_modules", "everything", "lora_target_modules"),
    ("max_length", 8, "max_length: must be at least 16"),
])
def test_validation_names_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=None) as e:
        Config.from_dict({field: value})
    assert needle in str(e.value)


def test_unknown_field_and_bad_source(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown field.*lerning_rate"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"datasets\[0\]: give exactly one of 'path' or 'generate'"):
        Config.from_dict({"datasets": [{"repeat": 2}]})


def test_xtuner_data_path_is_accepted():
    assert Config.from_dict({"data_path": "x.json"}).datasets == [DataSource(path="x.json")]


def test_recipes_list_load_and_differ_by_a_few_fields():
    names = [n for n, _ in list_recipes()]
    assert "smollm2_135m_lora_identity_cpu" in names and "smollm2_135m_qlora_identity_cpu" in names
    assert [n for n, _ in list_recipes("qlora")] == [n for n in names if "qlora" in n]
    for n in names:
        cfg = load_recipe(n)
        assert cfg.name == n and cfg.description
    qlora, lora = load_recipe("smollm2_135m_qlora_identity_cpu"), load_recipe("smollm2_135m_lora_identity_cpu")
    diff = {k for k, v in qlora.to_dict().items() if lora.to_dict()[k] != v}
    assert diff == {"name", "description", "method"}


def test_copy_cfg_writes_a_full_config_and_never_overwrites(tmp_path):
    out = copy_recipe("smollm2_135m_lora_identity_cpu", tmp_path)
    assert out.name == "smollm2_135m_lora_identity_cpu_copy.yaml"
    assert load_config(out) == load_recipe("smollm2_135m_lora_identity_cpu")
    assert set(yaml.safe_load(out.read_text())) == set(Config().to_dict())
    with pytest.raises(ConfigError, match="already exists"):
        copy_recipe("smollm2_135m_lora_identity_cpu", tmp_path)


def test_cfg_options_override_nested_fields():
    cfg = resolve_config("smollm2_135m_lora_identity_cpu", ["lr=1e-4", "max_steps=3", "datasets.0.repeat=2",
                                                            "evaluation_inputs=[hi]"])
    assert (cfg.lr, cfg.max_steps, cfg.datasets[0].repeat, cfg.evaluation_inputs) == (1e-4, 3, 2, ["hi"])
    with pytest.raises(ConfigError, match="expected key=value"):
        resolve_config("smollm2_135m_lora_identity_cpu", ["lr"])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="shipped recipes: .*smollm2_135m_lora_identity_cpu"):
        load_recipe("nope")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n", "---\n"])
def test_empty_config_file_is_refused(tmp_path, text):
    p = tmp_path / "empty.yaml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"empty.yaml: the config file is empty"):
        load_config(p)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just words\n", "str"), ("3\n", "int")])
def test_config_whose_top_level_is_not_a_mapping_is_refused(tmp_path, text, kind):
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"c.yaml: a config must be a YAML mapping of field: value, got {kind}"):
        load_config(p)


def test_train_on_an_empty_config_exits_2_and_writes_nothing(tmp_path, capsys):
    from workbench.cli import main

    p = tmp_path / "empty.yaml"
    p.write_text("# TODO\n", encoding="utf-8")
    rc = main(["train", str(p), "--work-dir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {p}: the config file is empty" in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == [p]


def test_table_columns_default_to_detection_and_old_explicit_columns_reload(tmp_path):
    assert (DataSource().question_column, DataSource().answer_column) == (None, None)
    p = tmp_path / "old.yaml"
    p.write_text("datasets:\n  - path: qa.csv\n    question_column: question\n    answer_column: answer\n", encoding="utf-8")
    src = load_config(p).datasets[0]
    assert (src.question_column, src.answer_column, src.system_column) == ("question", "answer", "system")
    cfg = Config(datasets=[DataSource(path="qa.csv")])
    again = load_config(save_config(cfg, tmp_path / "new.yaml"))
    assert again == cfg and again.datasets[0].question_column is None


def test_configure_sets_the_fields_asked_for_and_says_what_else_it_changes(capsys):
    recipe = load_recipe("smollm2_135m_tiny_smoke")  # max_steps 6, save_steps 3, evaluation_freq 3
    assert configure("smollm2_135m_tiny_smoke", lr=None, max_steps=None) == recipe, "None keeps the recipe's value"
    assert capsys.readouterr().out == "", "nothing changed that was not asked for"
    cfg = configure("smollm2_135m_tiny_smoke", max_steps=4, lora_r=4)
    assert (cfg.max_steps, cfg.lora_r, cfg.save_steps, cfg.evaluation_freq) == (4, 4, 2, 2)
    said = capsys.readouterr().out.splitlines()
    assert said == ["configure: save_steps 3 -> 2 (half of max_steps=4; pass save_steps= to choose)",
                    "configure: evaluation_freq 3 -> 2 (half of max_steps=4; pass evaluation_freq= to choose)"]
    cfg = configure("smollm2_135m_tiny_smoke", max_steps=4, evaluation_freq=1)
    assert (cfg.save_steps, cfg.evaluation_freq) == (2, 1), "a field asked for is never overridden"
    assert capsys.readouterr().out.count("configure:") == 1
    assert configure("smollm2_135m_tiny_smoke", max_steps=6) == recipe and capsys.readouterr().out == "", \
        "half of 6 is the recipe's 3 already: no change, nothing said"


def test_configure_replaces_the_generated_identity_data_by_a_file(tmp_path, capsys):
    data = tmp_path / "identity.json"
    cfg = configure("smollm2_135m_lora_identity_mixed_cpu", str(data))
    recipe = load_recipe("smollm2_135m_lora_identity_mixed_cpu")
    generated, *kept = recipe.datasets
    assert generated.generate == "identity" and generated.repeat == 3 and kept
    assert cfg.datasets == [DataSource(path=str(data.resolve()), repeat=3), *kept], "the file takes its place and weight"
    assert capsys.readouterr().out == (f"configure: datasets: {data.resolve()} (repeat 3) replaces generate: identity; "
                                       "2 other source(s) kept\n")
    with pytest.raises(ConfigError, match="unknown field.*lerning_rate"):
        configure("smollm2_135m_tiny_smoke", lerning_rate=0.1)
