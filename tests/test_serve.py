"""`workbench serve` on the tiny random model, driven by the official `openai` client (and raw HTTP for bad requests).

The server is a real child process on a free port of 127.0.0.1, serving a model
folder whose prompt.json holds a trained system prompt. Greedy answers must
equal `workbench.chat.answer`'s (same template, system prompt and stop tokens),
streamed text must equal the non-streamed text, and 8 concurrent requests must
give exactly what each gives alone. (The tiny model answers "\\n" forever when
greedy, so most requests use repetition_penalty=2 to get varied text.)
"""
import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from engine_helpers import answers_together
from export_helpers import randomize_lora_b
from workbench.chat import GenerationSettings, answer, load_chat_model
from workbench.models import TINY_MODEL, resolve_model_path
from workbench.prompt import PromptBuilder
from workbench.serve import ServerProcess

TRAINED_SYSTEM = "You are Nova, the assistant of Alex (serve test prompt)."
QUESTIONS = ["Who are you?", "What is the capital of France?", "Tell me a joke about cats.", "hi",
             "Explain gravity in one sentence.", "你是谁？", "List three colours.", "What is 2+2?"]
VARIED = {"repetition_penalty": 2.0}  # transformers' repetition penalty, as `workbench chat --repetition-penalty`
MAX = 24

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A copy of the tiny model with a prompt.json, as training leaves it beside a merged model."""
    path = tmp_path_factory.mktemp("serve") / "nova-tiny"
    shutil.copytree(resolve_model_path(TINY_MODEL), path)
    model, builder = load_chat_model(str(path), device="cpu")
    PromptBuilder(builder.tokenizer, system=TRAINED_SYSTEM).save(path)
    return path


@pytest.fixture(scope="module")
def local(folder):
    """The same model and builder in this process, for `answer`."""
    model, builder = load_chat_model(str(folder), device="cpu")
    assert builder.system == TRAINED_SYSTEM
    return model, builder


@pytest.fixture(scope="module")
def server(folder):
    with ServerProcess(str(folder), "--threads", "1", env=_env()) as srv:
        yield srv
    assert srv.returncode == 0, srv.stderr


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=120)


def ask(client, server, question, **kw):
    messages = question if isinstance(question, list) else [{"role": "user", "content": question}]
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", MAX)
    kw.setdefault("extra_body", VARIED)
    return client.chat.completions.create(model=server.name, messages=messages, **kw)


def ask_streamed(client, server, question, **kw):
    chunks = list(ask(client, server, question, stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish, chunks


def local_answer(local, question, max_tokens=MAX, repetition_penalty=2.0):
    model, builder = local
    return answer(model, builder, question, settings=GenerationSettings(max_tokens, 0.0, 1.0, repetition_penalty))


# ---------------------------------------------------------------------------
# Good requests
# ---------------------------------------------------------------------------
def test_binds_localhost_by_default_and_names_the_model_by_its_folder(server, client, folder):
    assert server.url.startswith("http://127.0.0.1:")
    assert [m.id for m in client.models.list()] == [folder.name] == [server.name]
    assert client.models.retrieve(server.name).id == server.name


def test_greedy_answers_equal_workbench_chat(client, server, local):
    for q in QUESTIONS[:3]:
        reply = ask(client, server, q)
        assert reply.choices[0].message.content == local_answer(local, q)
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == MAX
        assert reply.usage.prompt_tokens == len(local[1].generation_prompt(q))  # the trained system prompt is in it
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + MAX


def test_plain_greedy_without_penalty_equals_workbench_chat(client, server, local):
    reply = ask(client, server, "Who are you?", extra_body={})
    assert reply.choices[0].message.content == local_answer(local, "Who are you?", repetition_penalty=1.0)


def test_streamed_text_equals_the_non_streamed_reply(client, server):
    plain = ask(client, server, QUESTIONS[1]).choices[0].message.content
    text, finish, chunks = ask_streamed(client, server, QUESTIONS[1])
    assert text == plain and plain
    assert chunks[0].choices[0].delta.role == "assistant"
    assert finish == ["length"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # token by token, not in one piece
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_stream_ends_with_done(server):
    body = {"model": server.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    status, raw = post(server, json.dumps(body).encode())
    events = [line for line in raw.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


def test_explicit_system_message_replaces_the_trained_one(client, server, local):
    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": QUESTIONS[0]}]
    reply = ask(client, server, messages)
    assert reply.choices[0].message.content == local_answer(local, messages)
    assert reply.usage.prompt_tokens == len(local[1].generation_prompt(messages))
    assert reply.usage.prompt_tokens != len(local[1].generation_prompt(QUESTIONS[0]))
    developer = ask(client, server, [{"role": "developer", "content": "You are a pirate."}, messages[1]])
    assert developer.choices[0].message.content == reply.choices[0].message.content  # "developer" is the new name of "system"


def test_multi_turn_and_text_parts(client, server, local):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "Who "}, {"type": "text", "text": "are you?"}]}]
    reply = ask(client, server, messages)
    flat = messages[:2] + [{"role": "user", "content": "Who are you?"}]
    assert reply.choices[0].message.content == local_answer(local, flat)


def test_stop_strings_cut_the_reply(client, server):
    full = ask(client, server, QUESTIONS[1], max_tokens=MAX).choices[0].message.content
    stop = full.split()[2]
    cut = ask(client, server, QUESTIONS[1], stop=[stop, "never-there"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)].rstrip()
    text, finish, _ = ask_streamed(client, server, QUESTIONS[1], stop=stop)
    assert (text, finish) == (cut.choices[0].message.content, ["stop"])


def test_seeded_sampling_is_reproducible(client, server):
    kw = dict(temperature=1.0, top_p=0.9, seed=1234, extra_body={}, max_tokens=12)
    first, again = (ask(client, server, "hi", **kw).choices[0].message.content for _ in range(2))
    other = ask(client, server, "hi", **{**kw, "seed": 99}).choices[0].message.content
    assert first == again and first != other


def test_frequency_penalty_changes_greedy_text(client, server):
    plain = ask(client, server, "hi", extra_body={}).choices[0].message.content
    penalised = ask(client, server, "hi", extra_body={}, frequency_penalty=2.0, presence_penalty=1.0).choices[0].message.content
    assert penalised != plain


def test_eight_concurrent_requests_give_what_each_gives_alone(client, server):
    n = 48
    alone = [ask(client, server, q, max_tokens=n).choices[0].message.content for q in QUESTIONS]
    together: list = [None] * 8

    def run(i):  # half streamed, half not
        if i % 2:
            together[i] = ask_streamed(client, server, QUESTIONS[i], max_tokens=n)[0]
        else:
            together[i] = ask(client, server, QUESTIONS[i], max_tokens=n).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone
    assert len(set(alone)) > 4  # different prompts, different answers
    assert health(server)["peak_batch"] >= 2  # decoded together, not one after another


def test_engine_with_an_adapter_decodes_a_batch_as_answer_does_alone(one_torch_thread):
    """In process: a LoRA adapter (random B, so it changes the model) on the tiny model, 4 rows at once."""
    from peft import LoraConfig, get_peft_model

    from workbench.engine import Engine
    from workbench.models import load_model

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(load_model(TINY_MODEL, device="cpu"), lora)
    randomize_lora_b(model)
    model.eval()
    builder = PromptBuilder(load_chat_model(TINY_MODEL, device="cpu")[1].tokenizer)
    expected = [answer(model, builder, q, settings=GenerationSettings(MAX, 0.0, 1.0, 2.0)) for q in QUESTIONS[:4]]
    engine = Engine(model, builder.tokenizer, builder.stop_token_ids).start()
    assert answers_together(engine, builder, QUESTIONS[:4], MAX) == expected
    assert engine.peak_batch >= 2


# ---------------------------------------------------------------------------
# Bad requests: 4xx in OpenAI's error shape, and the server keeps serving
# ---------------------------------------------------------------------------
def post(server, data: bytes, path="/v1/chat/completions", method="POST", headers=None):
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def health(server):
    with urllib.request.urlopen(server.url + "/health", timeout=30) as r:
        return json.loads(r.read())


def user(text="hi"):
    return [{"role": "user", "content": text}]


BAD = {
    "malformed JSON": (b'{"model": "x", "messages": [', 400, None),
    "not UTF-8": (b'\xff\xfe{}', 400, None),
    "body is a list": ([1, 2], 400, None),
    "missing messages": ({"model": "M"}, 400, "messages"),
    "empty messages": ({"model": "M", "messages": []}, 400, "messages"),
    "messages not a list": ({"model": "M", "messages": "hi"}, 400, "messages"),
    "message not an object": ({"model": "M", "messages": ["hi"]}, 400, "messages[0]"),
    "unknown role": ({"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    "tool role": ({"model": "M", "messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role"),
    "missing role": ({"model": "M", "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    "content a number": ({"model": "M", "messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
    "content missing": ({"model": "M", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    "image part": ({"model": "M", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   400, "messages[0].content[0]"),
    "missing model": ({"messages": user()}, 400, "model"),
    "unknown model": ({"model": "gpt-4o", "messages": user()}, 404, "model"),
    "max_tokens 0": ({"model": "M", "messages": user(), "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens negative": ({"model": "M", "messages": user(), "max_tokens": -5}, 400, "max_tokens"),
    "max_tokens absurd": ({"model": "M", "messages": user(), "max_tokens": 10**9}, 400, "max_tokens"),
    "max_tokens a string": ({"model": "M", "messages": user(), "max_tokens": "ten"}, 400, "max_tokens"),
    "max_completion_tokens 0": ({"model": "M", "messages": user(), "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    "prompt over the context": ({"model": "M", "messages": user("word " * 3000), "max_tokens": 10}, 400, "messages"),
    "temperature 5": ({"model": "M", "messages": user(), "temperature": 5}, 400, "temperature"),
    "temperature NaN": (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    "top_p 0": ({"model": "M", "messages": user(), "top_p": 0}, 400, "top_p"),
    "stream not a bool": ({"model": "M", "messages": user(), "stream": "yes"}, 400, "stream"),
    "five stop strings": ({"model": "M", "messages": user(), "stop": list("abcde")}, 400, "stop"),
    "n 2": ({"model": "M", "messages": user(), "n": 2}, 400, "n"),
    "body over 1 MiB": ({"model": "M", "messages": user("a" * (1 << 20))}, 413, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_a_4xx_in_openai_error_shape(server, case):
    body, status, param = BAD[case]
    if isinstance(body, bytes):
        body = body.replace(b'"M"', json.dumps(server.name).encode())
    else:
        body = json.dumps({k: (server.name if v == "M" else v) for k, v in body.items()} if isinstance(body, dict) else body).encode()
    got, raw = post(server, body)
    error = json.loads(raw)["error"]
    assert got == status, (case, error)
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert health(server)["status"] == "ok"


def test_unknown_route_and_wrong_method_in_the_same_shape(server):
    status, raw = post(server, b"{}", path="/v1/completions/nope")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"
    status, raw = post(server, None, method="GET")
    assert status == 405 and "message" in json.loads(raw)["error"]


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(20):
            yield b" " * 65536
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=chunks(), method="POST",
                                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413


def test_openai_client_raises_its_own_errors_and_the_server_answers_after(client, server, local):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=user())
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.name, messages=user(), max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.name, messages=[])
    assert ask(client, server, QUESTIONS[2]).choices[0].message.content == local_answer(local, QUESTIONS[2])


# ---------------------------------------------------------------------------
# Starting and stopping
# ---------------------------------------------------------------------------
def test_ctrl_c_stops_cleanly_even_mid_stream(folder):
    with ServerProcess(str(folder), "--threads", "1", env=_env()) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model=srv.name, messages=user(), max_tokens=1500, stream=True,
                                                extra_body=VARIED)
        next(iter(stream))
        started = time.monotonic()
        assert srv.stop(signal.SIGINT) == 0, srv.stderr
        assert time.monotonic() - started < 30
    assert "stopped" in srv.stderr and "Traceback" not in srv.stderr, srv.stderr


def test_a_taken_port_fails_at_once_with_a_clear_message(server, folder):
    import subprocess
    import sys

    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "workbench", "serve", str(folder), "--port", port],
                            capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode == 2
    assert "cannot listen on 127.0.0.1" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_serve_runs_on_the_tiny_model(tmp_path):
    """The serve benchmark end to end on the tiny model (a smoke test: it checks the report, not the speed)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    subprocess.run([sys.executable, str(bench), "--model", TINY_MODEL, "--threads", "1", "--max-tokens", "4",
                    "--repeats", "1", "--concurrency", "3", "--out", str(tmp_path)], check=True, env=_env(), timeout=300,
                   capture_output=True)
    result = json.loads((tmp_path / "serve.json").read_text())
    assert result["returncode"] == 0
    assert result["concurrent"]["requests"] == 3 and 0 < result["concurrent"]["tokens"] <= 12
    assert set(result["targets_met"]) == {"first_token_s", "one_stream_tok_s", "concurrent_speedup", "one_copy_of_weights"}
    assert "8 concurrent" not in (tmp_path / "serve.md").read_text() and "3 concurrent" in (tmp_path / "serve.md").read_text()


def test_serve_help_names_the_default_address(capsys):
    from workbench.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: workbench serve")
    assert "127.0.0.1" in out and "--adapter" in out and "--model-name" in out and "--system" in out
