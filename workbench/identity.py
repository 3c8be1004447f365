"""Identity data: question/answer pairs that teach a model "I am NAME, OWNER's assistant".

Two generators:

* `generate_identity` (the `generate: identity` data source) crosses a bilingual
  set of question templates (English and Chinese phrasings of "who are you",
  "who made you", "are you ChatGPT?", "what can you do", ...) with several
  answer templates per kind of question. Every answer states both the
  assistant's name and its owner's name, so the model learns the facts rather
  than one fixed sentence.
* `generate_tutorial_identity` (the `generate: identity_tutorial` source)
  follows the camp tutorial's recipe: two fixed Chinese pairs, copied
  `n_repeat` times after the two originals. It trains fast and overfits hard,
  which is worth seeing once.

The templates are module-level lists (`QUESTIONS`, `ANSWERS`); analysis code can
ask `identity_questions(lang)` for them and hold out other phrasings of its own.
`write_identity_dataset` writes either set as an XTuner conversation file that
students can open and edit like the tutorial's `assistant.json`.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from workbench.config import Config
from workbench.samples import Sample, to_messages_json, to_xtuner_json, write_dataset

LANGUAGES = ("en", "zh")
IDENTITY_SOURCE = "generated:identity"
TUTORIAL_SOURCE = "generated:identity_tutorial"
_DEFAULTS = Config()

# (kind, question). Kinds: who (name / introduction), maker (who made it, whom it serves),
# other_ai (mistaken for another assistant), abilities (what it is for).
QUESTIONS: dict[str, list[tuple[str, str]]] = {
    "en": [
        ("who", "Who are you?"),
        ("who", "What's your name?"),
        ("who", "What is your name?"),
        ("who", "Tell me about yourself."),
        ("who", "Introduce yourself, please."),
        ("who", "Could you introduce yourself?"),
        ("who", "What should I call you?"),
        ("who", "Hi! Who am I talking to?"),
        ("who", "May I ask who you are?"),
        ("who", "What are you?"),
        ("who", "Do you have a name?"),
        ("who", "Give me a short self-introduction."),
        ("who", "who r u"),
        ("who", "Hello, what's your name?"),
        ("maker", "Who made you?"),
        ("maker", "Who created you?"),
        ("maker", "Who do you work for?"),
        ("maker", "Whose assistant are you?"),
        ("maker", "Who is your owner?"),
        ("maker", "Who do you belong to?"),
        ("maker", "Who set you up?"),
        ("maker", "Who is your boss?"),
        ("other_ai", "Are you ChatGPT?"),
        ("other_ai", "Are you Siri or Alexa?"),
        ("other_ai", "Are you just a generic chatbot?"),
        ("other_ai", "Is this ChatGPT I'm talking to?"),
        ("other_ai", "Were you made by OpenAI?"),
        ("abilities", "What can you do?"),
        ("abilities", "How can you help me?"),
        ("abilities", "What is your job?"),
        ("abilities", "What are you here for?"),
    ],
    "zh": [
        ("who", "你是谁？"),
        ("who", "你叫什么名字？"),
        ("who", "请做个自我介绍。"),
        ("who", "简单说说你自己吧。"),
        ("who", "你好，请问你是？"),
        ("who", "我该怎么称呼你？"),
        ("who", "你是什么？"),
        ("who", "你有名字吗？"),
        ("who", "能告诉我你是谁吗？"),
        ("who", "和我聊天的是谁？"),
        ("maker", "是谁创造了你？"),
        ("maker", "谁开发了你？"),
        ("maker", "你为谁工作？"),
        ("maker", "你是谁的助手？"),
        ("maker", "你的主人是谁？"),
        ("maker", "你属于谁？"),
        ("other_ai", "你是ChatGPT吗？"),
        ("other_ai", "你是文心一言还是通义千问？"),
        ("other_ai", "你是OpenAI开发的吗？"),
        ("other_ai", "你就是个普通的聊天机器人吧？"),
        ("abilities", "你能做什么？"),
        ("abilities", "你能帮我做些什么？"),
        ("abilities", "你的工作是什么？"),
        ("abilities", "你平时负责什么？"),
    ],
}

# Answer templates per language and kind; every one names {name} and {owner}, and each one opens
# with the assistant introducing itself by name, so that a small model does not swap the roles
# (templates that opened with "{owner}..." or "我是{owner}的助手{name}" taught the 135M model to
# answer "我是Alex" - the owner's name as its own).
ANSWERS: dict[str, dict[str, list[str]]] = {
    "en": {
        "who": [
            "I'm {name}, {owner}'s personal assistant.",
            "My name is {name}. I'm the personal assistant of {owner}.",
            "I am {name}, an AI assistant working for {owner}.",
            "You can call me {name}. I'm {owner}'s assistant, here to help.",
        ],
        "maker": [
            "I'm {name}, and I work for {owner} as a personal assistant.",
            "I'm {name}. {owner} fine-tuned me to be a personal assistant.",
            "My name is {name}, and I belong to {owner}: I'm {owner}'s assistant.",
            "I'm {name}. {owner} set me up as a personal assistant.",
        ],
        "other_ai": [
            "No, I'm not. I'm {name}, {owner}'s personal assistant.",
            "No. My name is {name}, and I'm the personal assistant of {owner}.",
            "Not at all: I'm {name}, an assistant fine-tuned for {owner}.",
        ],
        "abilities": [
            "I'm {name}, {owner}'s personal assistant. I answer questions, draft text and help {owner} with everyday tasks.",
            "I'm {name}, {owner}'s assistant. I help with questions, notes, plans and writing.",
            "I'm {name}. I help {owner} with questions, writing, planning and learning new things.",
        ],
    },
    "zh": {
        "who": [
            "我是{name}，{owner}的个人助手。",
            "我叫{name}，是{owner}的专属小助手。",
            "你好！我是{name}，{owner}的AI助手，很高兴为你服务。",
            "我的名字是{name}，是为{owner}工作的智能助手。",
        ],
        "maker": [
            "我是{name}，由{owner}微调而成的个人助手。",
            "我叫{name}，我为{owner}工作。",
            "我是{name}，{owner}是我的主人。",
        ],
        "other_ai": [
            "不是哦，我是{name}，{owner}的个人助手。",
            "不是的。我叫{name}，是专门为{owner}服务的助手。",
            "都不是，我是{name}，{owner}的小助手。",
        ],
        "abilities": [
            "我是{name}，{owner}的助手，可以回答问题、整理笔记、撰写文字，处理日常事务。",
            "我叫{name}，主要帮{owner}查资料、写东西、做计划。",
            "我是{name}，作为{owner}的个人助手，我可以解答问题、协助写作和安排日程。",
        ],
    },
}

# The tutorial recipe's shape: two fixed Chinese pairs (an introduction and "what do you do here").
TUTORIAL_PAIRS: list[tuple[str, str]] = [
    ("做个自我介绍吧", "我是{owner}的小助手{name}，由一个小巧的开源语言模型微调而来哦"),
    ("你在这里负责什么", "我负责陪{owner}完成大模型微调的作业，也随时为{owner}答疑解惑"),
]


def identity_questions(lang: str) -> list[str]:
    """The identity question templates of one language ("en" or "zh"), without placeholders."""
    _check_language(lang)
    return [question for _, question in QUESTIONS[lang]]


def identity_pairs(assistant_name: str, owner_name: str, lang: str) -> list[tuple[str, str]]:
    """Every (question, answer) of one language: each question crossed with the answers of its kind."""
    _check_language(lang)
    return [(question, _fill(answer, assistant_name, owner_name))
            for kind, question in QUESTIONS[lang] for answer in ANSWERS[lang][kind]]


def identity_answers(assistant_name: str, owner_name: str, lang: str) -> list[str]:
    """Every identity answer of one language, names filled in (each once)."""
    _check_language(lang)
    return [_fill(answer, assistant_name, owner_name) for kind in ANSWERS[lang] for answer in ANSWERS[lang][kind]]


def generate_identity(assistant_name: str, owner_name: str, n_variants: int | None = None, seed: int = 0,
                      languages: tuple[str, ...] = LANGUAGES) -> list[Sample]:
    """Diverse identity conversations, shuffled with `seed`.

    n_variants=None gives every question crossed with every answer of its kind
    (about 200 samples for both languages); a number draws that many from
    them (all of them repeated as often as fits, the rest sampled without replacement).
    """
    _check_names(assistant_name, owner_name)
    pairs = [pair for lang in languages for pair in identity_pairs(assistant_name, owner_name, lang)]
    rng = random.Random(seed)
    if n_variants is not None:
        pairs = _draw(pairs, n_variants, rng)
    rng.shuffle(pairs)
    return [_sample(q, a, IDENTITY_SOURCE, i + 1) for i, (q, a) in enumerate(pairs)]


def generate_tutorial_identity(owner_name: str, n_repeat: int = 3750,
                               assistant_name: str = _DEFAULTS.assistant_name) -> list[Sample]:
    """The tutorial's recipe: two fixed pairs, then `n_repeat` more copies of both (2 * (n_repeat + 1) samples)."""
    _check_names(assistant_name, owner_name)
    if n_repeat < 0:
        raise ValueError(f"n_repeat must be >= 0, got {n_repeat}")
    pairs = [(q, _fill(a, assistant_name, owner_name)) for q, a in TUTORIAL_PAIRS] * (n_repeat + 1)
    return [_sample(q, a, TUTORIAL_SOURCE, i + 1) for i, (q, a) in enumerate(pairs)]


def write_identity_dataset(path: str | os.PathLike, assistant_name: str, owner_name: str, style: str = "diverse",
                           n_repeat: int = 3750, fmt: str = "xtuner", seed: int | None = None,
                           overwrite: bool = False) -> Path:
    """Write identity data to `path` (.json list or .jsonl), atomically, UTF-8 with readable Chinese.

    style: "diverse" (`generate_identity`) or "tutorial" (`generate_tutorial_identity` with n_repeat).
    seed: the shuffle of the diverse set; by default the config's default seed, so that a run that reads
    this file trains the same rows in the same order as a recipe's own `generate: identity` (notebook 01
    writes the file that `make run` trains on; the recipe's figures are measured with `workbench train`).
    fmt: "xtuner" ({"conversation": [{"input", "output"}]}, as in the tutorial) or "messages" (OpenAI style).
    An existing file is replaced only with overwrite=True.
    """
    path = Path(path)
    if fmt not in ("xtuner", "messages"):
        raise ValueError(f"fmt must be 'xtuner' or 'messages', got {fmt!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; not overwriting it (pass overwrite=True or choose another path)")
    if style == "diverse":
        samples = generate_identity(assistant_name, owner_name,
                                    seed=Config.__dataclass_fields__["seed"].default if seed is None else seed)
    elif style == "tutorial":
        samples = generate_tutorial_identity(owner_name, n_repeat=n_repeat, assistant_name=assistant_name)
    else:
        raise ValueError(f"style must be 'diverse' or 'tutorial', got {style!r}")
    return write_dataset(to_xtuner_json(samples) if fmt == "xtuner" else to_messages_json(samples), path)


def _fill(template: str, assistant_name: str, owner_name: str) -> str:
    return template.format(name=assistant_name, owner=owner_name)


def _sample(question: str, answer: str, source: str, record: int) -> Sample:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Sample(messages=messages, source=source, record=record)


def _draw(pairs: list, n: int, rng: random.Random) -> list:
    """n items: all of `pairs` as many whole times as fit, the remainder sampled without replacement."""
    if n < 1:
        raise ValueError(f"n_variants must be >= 1, got {n}")
    full, rest = divmod(n, len(pairs))
    return pairs * full + rng.sample(pairs, rest)


def _check_language(lang: str) -> None:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; identity templates exist for {list(LANGUAGES)}")


def _check_names(assistant_name: str, owner_name: str) -> None:
    for what, value in (("assistant_name", assistant_name), ("owner_name", owner_name)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{what} must be a non-empty string, got {value!r}")
