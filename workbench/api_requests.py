"""The OpenAI chat-completions request format: validation, errors, and the prompt a request asks for.

`parse_chat_request` checks a decoded JSON body field by field and returns a
`ChatRequest` (messages, sampling settings, stream flag), or raises `APIError`,
which the server turns into a 4xx answer in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`. `prompt_ids` renders the
messages with the workbench's prompt builder (the trained system prompt when the
request has none). Kept apart from the HTTP app so the rules can be read and
tested without a server.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from workbench.engine import Sampling

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


