"""`workbench serve`: the fine-tuned model behind an OpenAI-compatible HTTP API.

    workbench serve MODEL [--adapter DIR] [--host 127.0.0.1] [--port 8000] [--model-name NAME] [--system ...]

Routes: POST /v1/chat/completions (JSON, or server-sent events with
"stream": true, ending with `data: [DONE]`), GET /v1/models, GET /health.

A small FastAPI app rather than `transformers serve`, because the prompt must be
exactly the training prompt: every request is rendered by the workbench's
`PromptBuilder` (the template and system prompt saved in prompt.json beside the
adapter or merged model) and stops at its `stop_token_ids` (EOS and the
template's end-of-turn token). A request without a system message gets the
trained system prompt; an explicit one replaces it. Generation runs in
`workbench.engine.Engine`: one copy of the weights, one worker thread, the
running requests decoded together in one batch.

Bad requests get a 4xx answer in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}` and the server keeps serving.
It binds 127.0.0.1 unless --host says otherwise; Ctrl-C stops it cleanly.
"""
from __future__ import annotations

import asyncio
import json
import math
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from workbench.engine import Engine, Sampling

MAX_BODY_BYTES = 1 << 20          # 1 MiB: far more than any chat with a small model needs
DRAIN_FACTOR = 8                  # an oversized body is read on (and dropped) up to 8 times the limit, then the connection closes
DEFAULT_MAX_TOKENS = 512          # when a request names no max_tokens (capped by the room left in the context)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


# ---------------------------------------------------------------------------
# Validating a request
# ---------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """A validated chat completion request."""

    messages: list[dict]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: object, model_name: str, context: int) -> ChatRequest:
    """Check a decoded JSON body field by field; APIError names the field that is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_model(body.get("model"), model_name)
    messages = _messages(body.get("messages"))
    if body.get("n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise APIError(400, "logprobs are not supported", "logprobs")
    if body.get("tools"):
        raise APIError(400, "tools are not supported", "tools")
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {}) or {}
    return ChatRequest(messages, _sampling(body, context), stream, bool(options.get("include_usage")))


def _check_model(name, model_name: str) -> None:
    if name is None or name == "":
        raise APIError(400, "you must provide a model parameter", "model")
    if not isinstance(name, str):
        raise APIError(400, "'model' must be a string", "model")
    if name != model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model", "model_not_found")


def _messages(value) -> list[dict]:
    if value is None:
        raise APIError(400, "'messages' is a required property", "messages")
    if not isinstance(value, list):
        raise APIError(400, "'messages' must be an array of messages", "messages")
    if not value:
        raise APIError(400, "'messages' must not be empty", "messages")
    return [_message(m, i) for i, m in enumerate(value)]


def _message(m, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise APIError(400, f"{where} must be an object with 'role' and 'content'", where)
    role = m.get("role")
    if role not in ROLES:
        raise APIError(400, f"{where}.role {role!r} is not supported; use one of {sorted(ROLES)}", f"{where}.role")
    return {"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content")}


def _content(content, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"{where}[{k}] must be a text part {{'type': 'text', 'text': ...}}; this model reads text only",
                               f"{where}[{k}]")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where} must be a string or a list of text parts, not {type(content).__name__}", where)


def _typed(body: dict, key: str, kind: type, default):
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise APIError(400, f"'{key}' must be of type {kind.__name__}", key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{key}' must be a number", key)
    if value < low or value > high or (low_open and value == low):
        raise APIError(400, f"'{key}' must be {'>' if low_open else '>='} {low} and <= {high}, not {value}", key)
    return float(value)


def _sampling(body: dict, context: int) -> Sampling:
    max_tokens, key = body.get("max_completion_tokens"), "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = body.get("max_tokens"), "max_tokens"
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise APIError(400, f"'{key}' must be an integer", key)
        if max_tokens < 1:
            raise APIError(400, f"'{key}' must be at least 1, not {max_tokens}", key)
        if max_tokens > context:
            raise APIError(400, f"'{key}' is {max_tokens}, more than this model's context of {context} tokens", key)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) for s in stop)):
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "'seed' must be an integer", "seed")
    return Sampling(
        max_tokens=max_tokens or 0,  # 0: filled in once the prompt's length is known
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        seed=seed, stop=[s for s in stop or [] if s])


def prompt_ids(builder, request: ChatRequest, context: int) -> list[int]:
    """The request's prompt, built as in training; fills in the default max_tokens; 400 when it cannot fit."""
    try:
        ids = builder.generation_prompt(request.messages)
    except Exception as e:  # noqa: BLE001 - the chat template rejects this conversation (e.g. its order of roles)
        raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
    s = request.sampling
    room = context - len(ids)
    if s.max_tokens == 0:
        s.max_tokens = min(DEFAULT_MAX_TOKENS, room)
    if s.max_tokens < 1 or len(ids) + s.max_tokens > context:
        raise APIError(400, f"this model's context is {context} tokens; the messages take {len(ids)} and max_tokens "
                       f"asks for {s.max_tokens} more", "messages", "context_length_exceeded")
    return ids


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------
def create_app(engine: Engine, builder, model_name: str, context: int, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app around a started engine."""
    app = FastAPI(title="workbench serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(404, f"Invalid URL ({request.method} {request.url.path})", code="not_found")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": len(engine.rows), "queued": engine.jobs.qsize(),
                "peak_batch": engine.peak_batch, "steps": engine.steps}

    def model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "workbench"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_json(request, max_body_bytes)
        chat = parse_chat_request(body, model_name, context)
        ids = prompt_ids(builder, chat, context)
        reply = _Reply(engine, ids, chat, model_name)
        if chat.stream:
            return StreamingResponse(reply.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.json()

    return app


async def _read_json(request: Request, limit: int):
    """The body as JSON; 413 past `limit` bytes (read on, up to a few times the limit, so the client hears the answer)."""
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() else 0
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_FACTOR * limit:
            break
        if size <= limit and declared <= limit:
            chunks.append(chunk)
    if size > limit or declared > limit:
        raise APIError(413, f"the request body is {max(size, declared)} bytes or more; the limit is {limit}", code="request_too_large")
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body of the request is not valid JSON ({e})", code="invalid_json") from None


class _Reply:
    """One request in flight: submits it to the engine and turns the engine's events into OpenAI's format."""

    def __init__(self, engine: Engine, ids: list[int], chat: ChatRequest, model_name: str):
        self.chat, self.model_name = chat, model_name
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.job = engine.submit(ids, chat.sampling, self._emit)

    def _emit(self, event: tuple) -> None:
        """Called from the engine's thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (the server is stopping)
            self.job.cancel()

    async def _next(self) -> tuple:
        event = await self.queue.get()
        if event[0] != "text":
            self.finished = True
        return event

    def _usage(self, event: tuple) -> dict:
        return {"prompt_tokens": event[2], "completion_tokens": event[3], "total_tokens": event[2] + event[3]}

    async def json(self) -> JSONResponse:
        parts = []
        try:
            while (event := await self._next())[0] == "text":
                parts.append(event[1])
        finally:
            if not self.finished:
                self.job.cancel()  # the client went away
        if event[0] == "error":
            return error_response(500, event[1], "server_error")
        if event[1] == "cancelled":
            return error_response(503, "the server is stopping", "server_error")
        return JSONResponse({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": event[1], "logprobs": None}],
            "usage": self._usage(event), "system_fingerprint": None})

    def _chunk(self, delta: dict, finish: str | None = None) -> str:
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self):
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while (event := await self._next())[0] == "text":
                yield self._chunk({"content": event[1]})
            if event[0] == "error" or event[1] == "cancelled":
                message = event[1] if event[0] == "error" else "the server is stopping"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
            else:
                yield self._chunk({}, event[1])
                if self.chat.include_usage:
                    usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                             "model": self.model_name, "choices": [], "usage": self._usage(event)}
                    yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not self.finished:
                self.job.cancel()  # the client went away mid-stream


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------
class ServeError(RuntimeError):
    """The server cannot start (the port is taken, the address is wrong); the message says what to do."""


def served_name(model: str, adapter: str | None = None) -> str:
    """The model's name in the API: the adapter's or model's folder name, else what was given ("embedded", a hub id)."""
    for path in (adapter, model):
        if path and Path(path).exists():
            return Path(path).resolve().name
    return model


def context_length(model, tokenizer) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", 0)
    return value if 0 < value < 1_000_000 else 4096


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, opened before the model loads so that a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}. Pick another --port (or --port 0 for any free one).") from None
    sock.listen(128)
    return sock


def serve(model: str, adapter: str | None = None, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          system: str | None = None, device: str = "auto", max_batch: int = 8, threads: int | None = None,
          trust_remote_code: bool = False, max_body_bytes: int = MAX_BODY_BYTES, log_level: str = "info") -> None:
    """Load the model once, start the engine and serve until Ctrl-C (or SIGTERM)."""
    import torch

    from workbench.chat import load_chat_model

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background by a shell (which ignores it)
        signal.signal(signal.SIGTERM, _interrupt)                 # `kill PID` stops it as cleanly as Ctrl-C
    sock = bind(host, port)
    if threads:
        torch.set_num_threads(threads)
    loaded, builder = load_chat_model(model, adapter, device=device, system=system, trust_remote_code=trust_remote_code)
    name = model_name or served_name(model, adapter)
    engine = Engine(loaded, builder.tokenizer, builder.stop_token_ids, max_batch=max_batch).start()
    app = create_app(engine, builder, name, context_length(loaded, builder.tokenizer), max_body_bytes)
    server = _Server(engine, uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"workbench serve: model {name!r} at http://{url_host}:{bound_port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        pass
    finally:
        engine.stop()
        sock.close()
    print("workbench serve: stopped", file=sys.stderr, flush=True)


class _Server(uvicorn.Server):
    """uvicorn's server that, on Ctrl-C, first ends the requests in flight, so that streams close within the grace period."""

    def __init__(self, engine: Engine, config: uvicorn.Config):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame):
        self.engine.stop(timeout=0)
        super().handle_exit(sig, frame)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------
# A server in a child process (scripts, notebooks, the tests, the benchmark)
# ---------------------------------------------------------------------------
class ServerProcess:
    """`workbench serve MODEL ARGS` in a child process on a free port; a context manager that stops it with Ctrl-C.

        with ServerProcess("merged") as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="none")
    """

    def __init__(self, model: str, *args: str, env: dict | None = None, timeout: float = 300.0):
        self.command = [sys.executable, "-m", "workbench", "serve", model, "--port", "0", *args]
        self.env, self.timeout = env, timeout
        self.proc: subprocess.Popen | None = None
        self.url = self.base_url = self.name = ""
        self.returncode: int | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=self.env)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while not self.url:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"workbench serve did not start (exit status {self.proc.returncode}):\n{self.stderr}")
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line.startswith("workbench serve: model "):
                self.name = line.split("'")[1]
                self.base_url = line.split(" at ", 1)[1].split()[0]
                self.url = self.base_url.removesuffix("/v1")
        self._wait_healthy(deadline)
        return self

    def _wait_healthy(self, deadline: float) -> None:
        import urllib.request

        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"workbench serve does not answer /health:\n{self.stderr}") from None
                time.sleep(0.2)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> int | None:
        """Send `sig` (Ctrl-C by default) and wait; the exit status (killed after `timeout` seconds)."""
        if self.proc is None or self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode

    @property
    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()
