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
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from workbench.api_requests import APIError, ChatRequest, error_response, parse_chat_request, prompt_ids
from workbench.engine import Engine, cache_api_problem

MAX_BODY_BYTES = 1 << 20          # 1 MiB: far more than any chat with a small model needs
DRAIN_FACTOR = 8                  # an oversized body is read on (and dropped) up to 8 times the limit, then the connection closes


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
    problem = cache_api_problem(loaded, builder.generation_prompt("hi"))
    if problem:
        sock.close()
        raise ServeError(f"{problem}. Serve a model of a standard transformers architecture (InternLM2 folders are converted "
                         "to Llama automatically, see `workbench prepare-model FOLDER`), or try `workbench chat` with this one.")
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
