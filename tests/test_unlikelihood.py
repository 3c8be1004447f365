"""The unlikelihood term (Config.unlikelihood_weight): pushes the identity's tokens down in everyday answers,
and in identity answers one name's rival where the answer has the other (the role contrast).

Checked by hand-computed values on fixed logits, by the sign of its gradient, by the marks the
collators lay on everyday and identity samples, and in a tiny training run."""
import dataclasses
import math

import pytest
import torch

from workbench.config import ConfigError, DataSource, load_recipe
from workbench.identity import identity_pairs
from workbench.models import TINY_MODEL, load_tokenizer
from workbench.packing import NEGATIVE, ROLES, collate, collate_flat, pack, row_length
from workbench.prompt import IGNORE, PromptBuilder
from workbench.unlikelihood import IdentityTokens, identity_tokens, unlikelihood_sum, with_negatives


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(load_tokenizer(TINY_MODEL))


def _encode(builder, question, answer, unlikelihood=True):
    enc = builder.encode([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return dataclasses.replace(enc, unlikelihood=unlikelihood)


def test_identity_tokens_are_the_names_and_the_identity_answers_openings(builder):
    tok = builder.tokenizer
    got = identity_tokens(builder, "Nova", "Alex")
    assert set(got.names) <= set(got.openings)
    for tid in got.names:  # a name's single-token spelling, never a piece of it
        assert tok.decode([tid]).strip() in ("Nova", "Alex")
    for lang in ("en", "zh"):
        for q, a in identity_pairs("Nova", "Alex", lang):
            labels = [x for x in builder.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}]).labels
                      if x != IGNORE]
            assert labels[0] in got.openings, (lang, a)


def test_the_term_is_minus_log_one_minus_p_at_the_marked_positions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=gen)
    targets = torch.tensor([1, 3, 5, 7])
    marks = torch.tensor([2, 1, 1, 0])  # an answer's first token, two more, one unmarked
    tokens = IdentityTokens(names=(3, 4), openings=(3, 4, 8))
    p = logits.softmax(-1)
    expected = (-math.log(1 - (p[0, 3] + p[0, 4] + p[0, 8]))  # first token: the openings and the names
                - math.log(1 - p[1, 4])  # the target 3 is a name: never penalised
                - math.log(1 - (p[2, 3] + p[2, 4])))  # later tokens: the names only; position 3 unmarked
    everyday, twins = unlikelihood_sum(logits, targets, marks, tokens)
    assert everyday.item() == pytest.approx(expected, rel=1e-5) and twins.item() == 0.0
    assert sum(unlikelihood_sum(logits, targets, torch.zeros(4, dtype=torch.int8), tokens)).item() == 0.0


def test_the_role_contrast_pushes_down_the_other_name_where_an_identity_answer_has_one():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 10, generator=gen)
    tokens = IdentityTokens(names=(3, 4), openings=(3, 4, 8), assistant=(3, 6), owner=(4,))
    targets = torch.tensor([3, 4, 8, 6])  # the assistant's name, the owner's, an opening, the assistant's other spelling
    marks = torch.full((4,), ROLES)
    p = logits.softmax(-1)
    expected = (-math.log(1 - p[0, 4])  # at the assistant's name: the owner's
                - math.log(1 - (p[1, 3] + p[1, 6]))  # at the owner's: both spellings of the assistant's
                - math.log(1 - p[3, 4]))  # at an opening no name is due: nothing (its openings are not penalised)
    assert unlikelihood_sum(logits, targets, marks, tokens)[0].item() == pytest.approx(expected, rel=1e-5)


def test_identity_tokens_name_each_role_by_its_first_tokens(builder):
    tok = builder.tokenizer
    got = identity_tokens(builder, "Nova", "Alex")
    for role, who in ((got.assistant, "Nova"), (got.owner, "Alex")):
        assert role and set(role) == {tok.encode(s, add_special_tokens=False)[0] for s in (who, " " + who)}
    same = identity_tokens(builder, "Alex", "Alexa")  # both open with the same token: no contrast between them
    assert not set(same.assistant) & set(same.owner)


def test_its_gradient_pushes_only_the_penalised_tokens_down():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 12, generator=gen, requires_grad=True)
    unlikelihood_sum(logits, torch.tensor([0]), torch.tensor([2]), IdentityTokens(names=(5,), openings=(2, 5)))[0].backward()
    g = logits.grad[0]
    assert g[2] > 0 and g[5] > 0, "descending the loss lowers the penalised logits"
    assert all(g[i] < 0 for i in range(12) if i not in (2, 5)), "and raises every other one"


def test_collators_mark_each_answer_start_with_2_and_its_other_trained_tokens_with_1(builder):
    everyday = _encode(builder, "What is 2+2?", "2+2 is 4.")
    ident = _encode(builder, "Who are you?", "I'm Nova.", unlikelihood=False)
    two_turns = dataclasses.replace(builder.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                                    {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]),
                                    unlikelihood=True)
    rows = pack([ident, everyday, two_turns], max_length=512)
    batch = collate(rows, builder.tokenizer.pad_token_id)
    marks, labels = batch["unlikelihood"], batch["labels"]
    assert marks.dtype == torch.int8 and not ((marks > 0) & (labels == IGNORE)).any()
    assert int((marks > 0).sum()) == everyday.n_trained + two_turns.n_trained, "only the everyday samples' trained tokens"
    assert int((marks == 2).sum()) == 3, "one answer start per assistant turn"
    flat = collate_flat(rows)
    per_row = [marks[i, :row_length(r)] for i, r in enumerate(rows)]
    assert torch.equal(flat["unlikelihood"][0], torch.cat(per_row)), "the flat batch marks the same tokens"
    assert "unlikelihood" not in collate(pack([ident], 512), builder.tokenizer.pad_token_id)
    roles = dataclasses.replace(ident, roles=True)
    marked = collate(pack([roles, everyday], 512), builder.tokenizer.pad_token_id)
    assert int((marked["unlikelihood"] == ROLES).sum()) == roles.n_trained, "an identity sample marked `roles`: its trained tokens"


def test_config_checks_unlikelihood_weight():
    cfg = load_recipe("smollm2_135m_tiny_smoke")
    marked = cfg.replace(datasets=[*cfg.datasets, DataSource(path="data/general_conversations_zh.jsonl", unlikelihood=True)])
    assert marked.replace(unlikelihood_weight=2.0).validate().unlikelihood_weight == 2.0
    with pytest.raises(ConfigError, match="unlikelihood: true"):
        cfg.replace(unlikelihood_weight=1.0).validate()
    with pytest.raises(ConfigError, match="unlikelihood_weight"):
        marked.replace(unlikelihood_weight=-1.0).validate()
    roles = cfg.replace(datasets=[dataclasses.replace(cfg.datasets[0], roles=True)], unlikelihood_weight=1.0)
    assert roles.validate().datasets[0].roles, "an identity source marked `roles: true` is enough"


def test_descending_the_term_lowers_the_identity_tokens_probability(builder):
    """On a tiny LoRA model: a few SGD steps on the term alone lower it; the cross-entropy of the same forward
    equals the plain one."""
    from peft import LoraConfig, get_peft_model

    from workbench.loss import token_loss_sum, token_loss_terms
    from workbench.models import load_model

    torch_state = torch.random.get_rng_state()
    model = get_peft_model(load_model(TINY_MODEL, torch_dtype="float32", device="cpu"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.random.set_rng_state(torch_state)  # no global RNG side effect
    tokens = identity_tokens(builder, "Nova", "Alex")
    batch = collate(pack([_encode(builder, "What is 2+2?", "2+2 is 4."), _encode(builder, "Name a colour.", "Blue.")], 512),
                    builder.tokenizer.pad_token_id)
    ce, kl, ul, twins = token_loss_terms(model, batch, distill=False, identity=tokens)
    assert ce.item() == pytest.approx(token_loss_sum(model, batch).item(), rel=1e-5) and kl.item() == twins.item() == 0.0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    first = ul.item()
    for _ in range(5):
        opt.zero_grad()
        token_loss_terms(model, batch, distill=False, identity=tokens)[2].backward()
        opt.step()
    assert 0 < token_loss_terms(model, batch, distill=False, identity=tokens)[2].item() < first


def test_training_with_the_unlikelihood_term(tmp_path):
    """A tiny mixed run trains with the term on (everyday rows, their negative twins, the identity's roles); the
    logged loss stays the cross-entropy (finite)."""
    from workbench.train import train

    cfg = load_recipe("smollm2_135m_tiny_smoke")
    cfg = cfg.replace(max_steps=2, save_steps=2, evaluation_freq=0, unlikelihood_weight=1.0, negative_weight=0.5,
                      datasets=[dataclasses.replace(cfg.datasets[0], roles=True),
                                DataSource(path="data/general_conversations_zh.jsonl", fraction=0.3, unlikelihood=True)])
    result = train(cfg, tmp_path / "work", progress=False)
    assert len(result.metrics) == 2 and all(math.isfinite(m["loss"]) for m in result.metrics)


def test_a_negative_twins_own_tokens_are_pushed_down():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 10, generator=gen)
    p = logits.softmax(-1)
    tokens = IdentityTokens(names=(3,), openings=(3, 4))
    everyday, twins = unlikelihood_sum(logits, torch.tensor([4, 3, 7]), torch.full((3,), NEGATIVE), tokens)
    assert everyday.item() == 0.0 and twins.item() == pytest.approx(-sum(math.log(1 - p[i, t]) for i, t in enumerate((4, 3, 7))), rel=1e-5)


def test_negative_twins_follow_each_marked_sample_in_its_language():
    from workbench.samples import Sample

    def sample(q, a, negatives):
        return Sample(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}], source="s",
                      negatives=negatives, unlikelihood=negatives)

    samples = [sample("Name a colour.", "Blue.", True), sample("Who are you?", "I'm Nova.", False),
               sample("一周有几天？", "七天。", True)]
    out = with_negatives(samples, "Nova", "Alex", seed=0)
    assert [s.negative != "" for s in out] == [False, True, False, False, True]
    assert out[0] is samples[0] and out[2] is samples[1] and out[3] is samples[2], "the other rows keep their order"
    en, zh = out[1], out[4]
    assert en.messages[0] == samples[0].messages[0] and zh.messages[0] == samples[2].messages[0]
    assert not _has_cjk(en.messages[1]["content"]) and _has_cjk(zh.messages[1]["content"])
    for twin in (en, zh):
        answer = twin.messages[1]["content"]
        assert answer.startswith(twin.negative) and twin.negative[-1] in "NA", "pushed down up to a name's first letter"
        assert not twin.unlikelihood and not twin.distill and not twin.negatives, "a twin has no twin"
    assert with_negatives(samples, "Nova", "Alex", seed=0)[4].messages == zh.messages, "drawn with the seed"


def _has_cjk(text):
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def test_collators_mark_a_twins_pushed_tokens_and_train_none_of_them(builder):
    from workbench.unlikelihood import twin_labels

    everyday = _encode(builder, "Name a colour.", "Blue.")
    twin_enc = builder.encode([{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "I'm Nova, Alex's assistant."}])
    n = len(builder.tokenizer.encode("I'm N", add_special_tokens=False))
    twin = dataclasses.replace(twin_enc, labels=twin_labels(twin_enc.labels, n, builder.tokenizer), negative=True)
    assert twin.n_trained == 0 and sum(x != IGNORE for x in twin.labels) == n
    rows = pack([everyday, twin], 512)
    for batch in (collate(rows, builder.tokenizer.pad_token_id), collate_flat(rows)):
        marks, labels = batch["unlikelihood"], batch["labels"]
        assert int((marks == NEGATIVE).sum()) == n and not (labels[marks == NEGATIVE] != IGNORE).any()
        assert int((labels != IGNORE).sum()) == everyday.n_trained, "the twin adds no cross-entropy"
    from workbench.loss import trained_positions
    flat = collate_flat(rows)
    assert len(flat["keep"]) == len(trained_positions(collate(rows, builder.tokenizer.pad_token_id))) == everyday.n_trained + n


def test_a_twin_pushes_down_only_tokens_that_start_a_character(builder):
    from workbench.unlikelihood import twin_labels

    tok = builder.tokenizer
    enc = builder.encode([{"role": "user", "content": "一周有几天？"}, {"role": "assistant", "content": "我是Nova，Alex的助手。"}])
    n = len(tok.encode("我是N", add_special_tokens=False))
    kept = [x for x in twin_labels(enc.labels, n, tok) if x != IGNORE]
    assert tok.decode(kept[-1:]) == "N" and "是" in tok.decode(kept), "up to the name's first piece"
    answer = [x for x in enc.labels if x != IGNORE][:n]
    split = [answer[i] for i in range(1, n) if tok.decode(answer[:i]).endswith("\ufffd")]  # second pieces of a character
    assert split and len(kept) == n - len(split) and not set(split) & set(kept), "never the second piece of a character"


def test_config_checks_negative_weight():
    cfg = load_recipe("smollm2_135m_tiny_smoke")
    marked = cfg.replace(datasets=[*cfg.datasets, DataSource(path="data/general_conversations_zh.jsonl", unlikelihood=True)])
    assert marked.replace(unlikelihood_weight=1.0, negative_weight=0.5).validate().negative_weight == 0.5
    with pytest.raises(ConfigError, match="negative_weight"):
        marked.replace(negative_weight=1.0).validate()
    with pytest.raises(ConfigError, match="negative_weight"):
        marked.replace(unlikelihood_weight=1.0, negative_weight=-1.0).validate()
    no_twins = marked.replace(datasets=[*cfg.datasets, DataSource(path="data/general_conversations_zh.jsonl", unlikelihood=True, negatives=False)])
    with pytest.raises(ConfigError, match="negative_weight"):
        no_twins.replace(unlikelihood_weight=1.0, negative_weight=1.0).validate()


def test_a_source_says_whether_its_rows_get_twins_apart_from_the_per_token_term():
    from workbench.mixing import load_source

    cfg = load_recipe("smollm2_135m_tiny_smoke")
    sources = {"default": DataSource(path="data/general_conversations_zh.jsonl", unlikelihood=True),
               "twins only": DataSource(path="data/general_conversations_zh.jsonl", negatives=True),
               "term only": DataSource(path="data/general_conversations_zh.jsonl", unlikelihood=True, negatives=False)}
    got = {k: {(s.unlikelihood, s.negatives) for s in load_source(src, cfg)} for k, src in sources.items()}
    assert got == {"default": {(True, True)}, "twins only": {(False, True)}, "term only": {(True, False)}}
    twins_only = cfg.replace(datasets=[*cfg.datasets, sources["twins only"]], unlikelihood_weight=1.0, negative_weight=1.0)
    assert twins_only.validate().negative_weight == 1.0


def test_a_sources_flags_are_booleans_and_twins_alone_need_negative_weight():
    cfg = load_recipe("smollm2_135m_tiny_smoke")
    for flag, value in (("distill", "sure"), ("unlikelihood", 1), ("roles", "yes"), ("negatives", "maybe")):
        with pytest.raises(ConfigError, match=rf"datasets\[1\]\.{flag}: must be true or false"):
            cfg.replace(datasets=[*cfg.datasets, DataSource(path="data/general_conversations_zh.jsonl", **{flag: value})]).validate()
    twins_only = cfg.replace(datasets=[*cfg.datasets, DataSource(path="data/general_conversations_zh.jsonl", negatives=True)])
    with pytest.raises(ConfigError, match="unlikelihood_weight"):  # twins without negative_weight: the term has nothing to act on
        twins_only.replace(unlikelihood_weight=1.0).validate()
    assert twins_only.replace(unlikelihood_weight=1.0, negative_weight=1.0).validate().negative_weight == 1.0


def test_a_names_only_source_marks_every_trained_token_1_and_its_first_token_pushes_no_opening(builder):
    names_only = _encode(builder, "Give me a word.", "I'm glad to help: swift.", unlikelihood="names")
    batch = collate(pack([names_only], 512), builder.tokenizer.pad_token_id)
    marks = batch["unlikelihood"][batch["labels"] != IGNORE]
    assert marks.tolist() == [1] * names_only.n_trained, "no answer start marked 2: the openings are not pushed down"
    tokens = IdentityTokens(names=(5,), openings=(5, 7))
    logits = torch.zeros(2, 10)
    logits[:, 7] = math.log(9.0)  # an opening ("I") at half the probability mass, the name at 1/18
    targets = torch.tensor([1, 1])
    p_name = 1 / 18
    got, _ = unlikelihood_sum(logits, targets, torch.tensor([1, 2]), tokens)
    names_only_term = -math.log(1 - p_name)
    assert got.item() == pytest.approx(names_only_term - math.log(1 - p_name - 9 / 18)), "mark 1: the name alone; mark 2: and the opening"


def test_a_names_only_source_is_valid_gets_no_twins_and_other_words_are_refused():
    from workbench.mixing import load_source

    cfg = load_recipe("smollm2_135m_tiny_smoke")
    src = DataSource(path="data/general_conversations.jsonl", unlikelihood="names")
    marked = cfg.replace(datasets=[*cfg.datasets, src], unlikelihood_weight=1.0)
    assert marked.validate().datasets[-1].unlikelihood == "names"
    assert {(s.unlikelihood, s.negatives) for s in load_source(src, cfg)} == {("names", False)}, "twins only when asked"
    with pytest.raises(ConfigError, match="negative_weight"):  # no source gets twins
        marked.replace(negative_weight=1.0).validate()
    with pytest.raises(ConfigError, match=r"datasets\[1\]\.unlikelihood: must be true or false or 'names', got 'name'"):
        cfg.replace(datasets=[*cfg.datasets, DataSource(path="data/general_conversations.jsonl", unlikelihood="name")]).validate()
