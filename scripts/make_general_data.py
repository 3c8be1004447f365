"""Make the general conversation data: the base model's own answers to everyday prompts.

Fine-tuning on identity data alone makes the model answer everything with its
identity. Mixing in ordinary conversations cures that, and the conversations
used here are the project's own: every prompt in `data/general_prompts.yaml`
(groups `en` and `zh`) is answered by the base model itself, greedily, with the
same chat template and system prompt as training (the prompt builder's
default, `workbench.config.DEFAULT_SYSTEM`). Training on its own answers keeps
the model's general behaviour where it was, instead of teaching it someone
else's.

Every answer is checked, and the ones that would teach something bad are
dropped and counted by reason (printed, never silent):

* empty: nothing but whitespace.
* identity: the answer names the base model or its makers (SmolLM, Hugging
  Face, OpenAI, ChatGPT, "my name is" ...), which would teach an identity that
  conflicts with the one being fine-tuned.
* repetition: degenerate loops: the same 2-30 characters 5 times or more
  back to back ("lessnesslessness...", "ha ha ha ha ha"), one character 12
  times or more, a line of 8+ characters (code fences aside) that occurs 3
  times or more, or a run of 6 words (Chinese: 6 characters) that occurs 3
  times or more.
* language: a Chinese prompt answered in mostly non-Chinese text (less than
  half of the letters are Chinese characters), unless the prompt asks for
  English or code; an English prompt answered in mostly Chinese.
* off-topic: the answer is unrelated to the prompt. English: it shares no
  content word with the prompt (related forms count: plant / houseplant).
  Chinese: it contains fewer than min(2, n) of the prompt's n topic words
  (two-character words without generic characters such as 的, 是, 什么; when
  there are none, the prompt's non-generic characters); not checked for
  prompts that ask for English or code.
* garbled: U+FFFD replacement characters (broken multi-byte output).
* truncated: see below.

The 135M model's Chinese is weak: it drifts into English, loops, or writes
fluent-looking nonsense about something else. The language, repetition,
off-topic, garbled and truncated rules together decide which Chinese answers
survive, and few do.

Truncation. An answer that hit --max-new-tokens without the end-of-turn token
was cut mid-sentence; training on it would teach the model to stop
mid-sentence. English answers are TRIMMED to their last complete sentence (a
sentence end . ! ? 。！？ that is not a list number such as "2." or an
abbreviation, or the end of a complete list-item line); an unclosed code block
is removed first. When less than a quarter of the answer would be left, or
nothing, the answer is dropped as "truncated" instead. Answers that ended by
themselves are never trimmed. Chinese answers are never trimmed but dropped
as "truncated" when they hit the limit: every one that did in the run that
made the shipped file was rambling nonsense whose first sentence or two
happened to pass the other checks.

Output: XTuner records {"conversation": [{"input": prompt, "output": answer}]},
one per line, UTF-8, written atomically with `workbench.samples.write_dataset`.
No record has a system field: the training config's system prompt is applied.
An existing output file is never overwritten without --overwrite.

    .venv/bin/python scripts/make_general_data.py \\
        --prompts data/general_prompts.yaml --out data/general_conversations.jsonl \\
        --model embedded --max-new-tokens 160

--limit N answers only the first N prompts of each language (smoke runs).
--cache FILE keeps every raw answer (appended as it is made): an interrupted
run resumes from it, and the checks can be changed and re-run without
generating again. Answers made with another model or other settings are not
reused.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

LANGS = ("en", "zh")
SOURCE = "generated:general"
DEFAULT_PROMPTS = "data/general_prompts.yaml"
DEFAULT_OUT = "data/general_conversations.jsonl"

# Answers that speak as the base model (or as another vendor's assistant) would teach a conflicting identity.
IDENTITY_PATTERNS = re.compile(
    r"smol\s*lm|hugging\s*face|openai|chatgpt|\bgpt-\d|\bmy name is\b|\bI am called\b|\bI'm called\b|我叫|我的名字",
    re.IGNORECASE)
# Chinese prompts whose proper answer is mostly English or code: the language rule is relaxed for them.
ASKS_FOR_LATIN = re.compile(r"英文|英语|python|代码|code", re.IGNORECASE)

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN = re.compile(r"[A-Za-z]")
UNITS = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[A-Za-z0-9']+")  # words, and single Chinese characters
REPEATED_LINE_MIN_CHARS = 8
REPEATED_LINE_TIMES = 3
NGRAM = 6
NGRAM_TIMES = 3
# The same 2-30 characters 5+ times back to back ("lessnesslessness..."), or one character 12+ times.
RUN = re.compile(r"(\S.{1,29}?)\1{4,}|(\S)\2{11,}", re.DOTALL)
MIN_KEPT_SHARE = 0.25  # a trimmed answer must keep at least this share of the text

ABBREVIATIONS = {"e.g", "i.e", "mr", "mrs", "ms", "dr", "vs", "approx", "fig"}
LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S")
CN_END = "。！？"
EN_END = ".!?"
CLOSERS = "\"'”’)]*"


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------
def load_prompts(path: str | Path) -> list[tuple[str, str]]:
    """(language, prompt) pairs from the YAML file: groups `en` and `zh`, each a list of non-empty strings, no duplicates."""
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or set(data) - set(LANGS) or not data:
        raise ValueError(f"{path}: expected a mapping with the groups {list(LANGS)}")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lang in LANGS:
        items = data.get(lang) or []
        if not isinstance(items, list):
            raise ValueError(f"{path}: '{lang}' must be a list of prompts")
        for i, prompt in enumerate(items):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}: {lang}[{i}] must be a non-empty string, got {prompt!r}")
            prompt = prompt.strip()
            if prompt in seen:
                raise ValueError(f"{path}: {lang}[{i}] {prompt!r} is a duplicate")
            seen.add(prompt)
            out.append((lang, prompt))
    return out


def limit_prompts(prompts: list[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
    """The first `limit` prompts of each language (all when limit is None)."""
    if limit is None:
        return prompts
    taken: Counter = Counter()
    out = []
    for lang, prompt in prompts:
        if taken[lang] < limit:
            taken[lang] += 1
            out.append((lang, prompt))
    return out


# ---------------------------------------------------------------------------
# Checking answers
# ---------------------------------------------------------------------------
def cjk_share(text: str) -> float:
    """Chinese characters among all letters (Chinese characters plus Latin letters); 0 when there are none."""
    n_cjk, n_latin = len(CJK.findall(text)), len(LATIN.findall(text))
    return n_cjk / (n_cjk + n_latin) if n_cjk + n_latin else 0.0


def repetition(text: str) -> str | None:
    """What makes the text a degenerate loop, or None."""
    run = RUN.search(text)
    if run:
        unit = run.group(1) or run.group(2)
        return f"{unit!r} repeated back to back {len(run.group(0)) // len(unit)} times"
    lines = Counter(line.strip() for line in text.splitlines()
                    if len(line.strip()) >= REPEATED_LINE_MIN_CHARS and not line.strip().startswith("```"))
    if lines:
        line, times = lines.most_common(1)[0]
        if times >= REPEATED_LINE_TIMES:
            return f"line repeated {times} times: {line[:40]!r}"
    units = [u.lower() for u in UNITS.findall(text)]
    grams = Counter(tuple(units[i:i + NGRAM]) for i in range(len(units) - NGRAM + 1))
    if grams:
        gram, times = grams.most_common(1)[0]
        if times >= NGRAM_TIMES:
            joiner = "" if all(CJK.fullmatch(u) for u in gram) else " "
            return f"{NGRAM}-gram repeated {times} times: {joiner.join(gram)!r}"
    return None


def language_problem(lang: str, prompt: str, text: str) -> str | None:
    share = cjk_share(text)
    if lang == "zh" and share < 0.5 and not ASKS_FOR_LATIN.search(prompt):
        return f"Chinese prompt, {share:.0%} of the letters Chinese"
    if lang == "zh" and share == 0 and ASKS_FOR_LATIN.search(prompt) and not LATIN.search(text):
        return "Chinese prompt, no letters at all"
    if lang == "en" and share > 0.2:
        return f"English prompt, {share:.0%} of the letters Chinese"
    return None


EN_STOPWORDS = set("""
a an the and or but if of to in on at by for from with without into onto about as than then so too very is are was were
be been being am do does did doing have has had having can could should would will shall may might must i me my mine we
us our you your he him his she her it its they them their this that these those there here what which who whom whose
when where why how whether not no yes any some all each every one two three four five more most much many few such
other another own same just only also again please tell give write make let explain describe list name suggest short
simple simply good best way ways thing things something someone day use using used get got say said know like want need
into up down out over under around between during before after while words word sentence in order
""".split())
# Chinese characters too common to show what a prompt is about (question words, particles, pronouns, verbs of asking).
ZH_GENERIC = set("的了是吗呢吧啊么什怎样多少哪里谁为一个有在和与及把给我你他她它们这那请帮用写说出列举做会能要应该可以"
                 "些种条句段到对从就也还很最更得地着过而且或如果时候上下来去好才")


def _en_words(text: str) -> set[str]:
    """Lower-case content words (and numbers), with a crude plural / verb -s removed."""
    words = {w.lower().strip("'") for w in re.findall(r"[A-Za-z][A-Za-z']+|\d+", text)} - EN_STOPWORDS
    out = set()
    for w in words:
        if len(w) > 4 and w.endswith("ies"):
            w = w[:-3] + "y"
        elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
            w = w[:-1]
        out.add(w)
    return out - EN_STOPWORDS


def _related(a: str, b: str) -> bool:
    """The same word, or one of 4+ letters inside the other (plant / houseplant), or a shared 5-letter stem."""
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    return len(short) >= 4 and short in long or len(short) >= 5 and long.startswith(short[:5])


def _zh_topic(text: str) -> set[str]:
    """Two-character words of the text made of Chinese characters that are not generic."""
    return {text[i:i + 2] for i in range(len(text) - 1)
            if CJK.fullmatch(text[i]) and CJK.fullmatch(text[i + 1]) and not ZH_GENERIC & set(text[i:i + 2])}


def off_topic(lang: str, prompt: str, text: str) -> str | None:
    """Why the answer looks unrelated to the prompt, or None.

    English: the answer must share a content word with the prompt (or a word
    related to one: plant / houseplant, grocery / groceries). Chinese: it
    must contain min(2, n) of the prompt's n topic words (two-character words
    without generic characters; when the prompt has none, its non-generic
    characters); prompts that ask for English or code are not checked.
    Fluent-looking nonsense, the small model's typical Chinese, rarely passes.
    """
    if lang == "en":
        words, said = _en_words(prompt), _en_words(text)
        if words and not any(_related(w, x) for w in words for x in said):
            return f"shares no content word with the prompt ({', '.join(sorted(words))})"
        return None
    if ASKS_FOR_LATIN.search(prompt):
        return None  # the answer is English or code: it need not repeat the prompt's Chinese words
    topic = _zh_topic(prompt) or {c for c in CJK.findall(prompt) if c not in ZH_GENERIC}
    found = {w for w in topic if w in text}
    if topic and len(found) < min(2, len(topic)):
        return f"contains {len(found)} of the prompt's topic words ({'、'.join(sorted(topic))})"
    return None


def _sentence_ends(text: str) -> list[int]:
    """Positions just after each complete sentence or complete list-item line."""
    ends = []
    for i, ch in enumerate(text):
        if ch in CN_END:
            j = i + 1
        elif ch in EN_END:
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt and not (nxt.isspace() or nxt in CLOSERS):
                continue  # 3.14, example.com, ...
            word = re.search(r"(\S*)$", text[:i]).group(1).lower()
            if ch == "." and (word.isdigit() or word.lstrip("*(#") in ABBREVIATIONS or len(word) == 1 and word.isalpha()):
                continue  # "2." list numbers, "e.g.", initials
            j = i + 1
        else:
            continue
        while j < len(text) and text[j] in CLOSERS:
            j += 1
        ends.append(j)
    start = 0
    for line in text.split("\n")[:-1]:  # the last line is the one cut off
        stop = start + len(line)
        if LIST_ITEM.match(line) and not line.rstrip().endswith((":", "：", ",", "，")):
            ends.append(stop)
        start = stop + 1
    return sorted(set(ends))


def trim_to_sentence(text: str) -> str:
    """The text up to its last complete sentence ('' when there is none); an unclosed code block is removed first."""
    if text.count("```") % 2:
        text = text[:text.rfind("```")]
    ends = _sentence_ends(text)
    return text[:ends[-1]].rstrip() if ends else ""


@dataclass
class Verdict:
    text: str | None  # the answer to keep (maybe trimmed), or None when dropped
    reason: str | None = None  # why it was dropped
    detail: str = ""
    trimmed: bool = False


def check_answer(lang: str, prompt: str, text: str, finished: bool) -> Verdict:
    """Keep, trim or drop one answer. `finished`: generation ended with the end-of-turn token."""
    text = text.strip()
    if not text:
        return Verdict(None, "empty")
    if "\ufffd" in text:
        return Verdict(None, "garbled", "replacement character in the text")
    hit = IDENTITY_PATTERNS.search(text)
    if hit:
        return Verdict(None, "identity", f"mentions {hit.group(0)!r}")
    loop = repetition(text)
    if loop:
        return Verdict(None, "repetition", loop)
    wrong = language_problem(lang, prompt, text)
    if wrong:
        return Verdict(None, "language", wrong)
    unrelated = off_topic(lang, prompt, text)
    if unrelated:
        return Verdict(None, "off-topic", unrelated)
    if finished:
        return Verdict(text)
    if lang == "zh":
        return Verdict(None, "truncated", "a Chinese answer that ran to the token limit (never trimmed: see the module docstring)")
    cut = trim_to_sentence(text)
    if not cut or len(cut) < MIN_KEPT_SHARE * len(text):
        return Verdict(None, "truncated", f"hit the token limit; {len(cut)} of {len(text)} characters would be left")
    return Verdict(cut, trimmed=cut != text)


# ---------------------------------------------------------------------------
# Generating
# ---------------------------------------------------------------------------
class _Recorder:
    """Wraps the model so the raw token ids that `answer` decodes can be seen: did the reply end with a stop token?"""

    def __init__(self, model):
        self._model = model
        self.generated: list[int] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, **kwargs):
        out = self._model.generate(**kwargs)
        self.generated = out[0, kwargs["input_ids"].shape[1]:].tolist()
        return out


@dataclass
class Summary:
    n_prompts: int = 0
    n_kept: int = 0
    n_trimmed: int = 0  # kept after trimming to the last complete sentence
    n_dropped: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    per_lang: dict = field(default_factory=dict)  # lang -> {"prompts", "kept", "dropped"}
    seconds: float = 0.0
    n_new_tokens: int = 0
    n_cached: int = 0  # answers taken from --cache instead of generated
    out: str = ""

    def __str__(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items())) or "none"
        langs = "; ".join(f"{lang}: {c['prompts']} prompts, {c['kept']} kept, {c['dropped']} dropped"
                          for lang, c in self.per_lang.items())
        rate = self.n_new_tokens / self.seconds if self.seconds else 0.0
        return "\n".join([
            f"prompts: {self.n_prompts}",
            f"kept: {self.n_kept} ({self.n_trimmed} of them trimmed to the last complete sentence)",
            f"dropped: {self.n_dropped} ({reasons})",
            f"by language: {langs}",
            f"time: {self.seconds:.0f} s for {self.n_new_tokens} generated tokens ({rate:.1f} tokens/s)"
            + (f"; {self.n_cached} answers taken from the cache" if self.n_cached else ""),
            f"written: {self.out}",
        ])


def split_heldout(samples: list, every: int = 7) -> tuple[list, list]:
    """(train, held-out): every `every`-th sample is held out, deterministically, for measuring retention."""
    held = [s for i, s in enumerate(samples) if i % every == every - 1]
    train = [s for i, s in enumerate(samples) if i % every != every - 1]
    return train, held


def _load_cache(path: str | None, setup: dict) -> dict[str, dict]:
    """Answers saved by earlier runs with the same model and generation settings, by prompt."""
    if not path:
        return {}
    from workbench.io import read_jsonl

    return {r["prompt"]: r for r in read_jsonl(path) if all(r.get(k) == v for k, v in setup.items())}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, help="YAML file with the groups en: and zh: (default %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output JSONL file, XTuner format (default %(default)s)")
    p.add_argument("--model", default="embedded", help="base model: embedded, embedded:tiny-random, a folder or a hub id (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="longest answer in tokens (default %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="greedy decoding's repetition penalty (default %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N prompts of each language (smoke runs)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights' precision; the shipped data was made on CPU in float32 (default %(default)s)")
    p.add_argument("--cache", default=None,
                   help="JSONL file of raw answers: each new answer is appended, and answers already there (same model "
                        "and settings) are reused, so an interrupted run resumes and the checks can be re-run "
                        "without generating again")
    p.add_argument("--heldout-out", default=None,
                   help="where the held-out answers go: kept out of training, used for the held-out loss "
                        "(default: beside --out, named <out>_heldout.jsonl)")
    p.add_argument("--heldout-every", type=int, default=7, help="hold out every N-th kept answer (default %(default)s; 0: none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no per-answer drop lines")
    return p


def main(argv: list[str] | None = None) -> Summary:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} already exists; not overwriting it (pass --overwrite to replace it)")
    if out.suffix.lower() != ".jsonl":
        raise SystemExit(f"--out must be a .jsonl file, got {out}")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be at least 1")
    prompts = limit_prompts(load_prompts(args.prompts), args.limit)

    from tqdm.auto import tqdm

    from workbench.chat import GenerationSettings, answer, load_chat_model
    from workbench.io import append_jsonl
    from workbench.samples import Sample, write_dataset

    t0 = time.time()
    model, builder = load_chat_model(args.model, device=args.device, torch_dtype=args.dtype)
    print(f"model: {args.model}; system prompt: {builder.system!r}; greedy, max_new_tokens {args.max_new_tokens}, "
          f"repetition_penalty {args.repetition_penalty}", flush=True)
    recorder = _Recorder(model)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0,
                                  repetition_penalty=args.repetition_penalty)
    stop_ids = set(builder.stop_token_ids)
    setup = {"model": args.model, "dtype": args.dtype, "system": builder.system, "max_new_tokens": args.max_new_tokens,
             "repetition_penalty": args.repetition_penalty}
    cache = _load_cache(args.cache, setup)
    if args.cache:
        print(f"cache: {args.cache}, {len(cache)} answers made with these settings already", flush=True)

    summary = Summary(n_prompts=len(prompts), out=str(out))
    summary.per_lang = {lang: {"prompts": 0, "kept": 0, "dropped": 0} for lang in LANGS if any(lg == lang for lg, _ in prompts)}
    samples: list[Sample] = []
    for lang, prompt in tqdm(prompts, desc="answering", unit="prompt", disable=args.quiet, mininterval=2):
        if prompt in cache:
            text, finished = cache[prompt]["answer"], cache[prompt]["finished"]
            summary.n_cached += 1
        else:
            text = answer(recorder, builder, prompt, settings=settings)
            generated = recorder.generated
            summary.n_new_tokens += len(generated)
            finished = bool(generated) and generated[-1] in stop_ids
            if args.cache:
                append_jsonl(args.cache, {**setup, "prompt": prompt, "answer": text, "finished": finished,
                                          "n_tokens": len(generated)})
        verdict = check_answer(lang, prompt, text, finished)
        counts = summary.per_lang[lang]
        counts["prompts"] += 1
        if verdict.text is None:
            summary.n_dropped += 1
            summary.dropped[verdict.reason] += 1
            counts["dropped"] += 1
            if not args.quiet:
                shown = text.replace("\n", " ")[:100]
                tqdm.write(f"dropped [{verdict.reason}] {prompt!r}: {verdict.detail} -> {shown!r}")
            continue
        summary.n_kept += 1
        summary.n_trimmed += verdict.trimmed
        counts["kept"] += 1
        samples.append(Sample(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": verdict.text}],
                              source=SOURCE, record=len(samples) + 1))
    if args.heldout_every:
        samples, heldout = split_heldout(samples, args.heldout_every)
        heldout_out = args.heldout_out or out.with_name(f"{out.stem}_heldout.jsonl")
        write_dataset(heldout, heldout_out)
        print(f"held out {len(heldout)} answers in {heldout_out} (kept out of training)", flush=True)
    write_dataset(samples, out)  # atomic, UTF-8, ensure_ascii=False; no system field
    summary.seconds = time.time() - t0
    print(summary, flush=True)
    return summary


if __name__ == "__main__":
    main()
