"""A built-in demo upstream, so the gateway works offline with no API key.

The ``demo`` model is deterministic and behaves like a (very simple) model, never like a test
fixture: it calls an offered tool when the prompt is about it (the tool the client forces, or
the first whose name or description shares a word with the last user message; any tool when
one is required), with arguments built from the tool's parameter schema; once it sees a tool's
output it reports it; asked "what is my/the X?" it answers from an earlier turn that said "X is
Y" or "X: Y"; anything else it echoes (``You said: <last user text>``), streamed word by word.
The same app serves a ``get_weather`` tool at ``POST /tools/get_weather``, so ``/v1/responses``
shows a full server-side tool loop.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from typing import Any

import orjson
import trio

from onwards_trio._config import Config, parse_config
from onwards_trio._responses.input import chat_content_text
from onwards_trio._transport.asgi import Receive, Scope, Send, read_body, send_json, serve_lifespan

__all__ = ["chat_chunk", "demo_config", "demo_upstream"]

DEMO_MODEL = "demo"
_CREATED = 1_700_000_000
_ids = itertools.count(1)
_CITY = re.compile(r"\bin ([A-Z][\w\-]*(?: [A-Z][\w\-]*)*)")
_WORD = re.compile(r"[a-z]+")
_QUESTION = re.compile(r"\bwhat(?:'s| is) (?:my|the|our|your) ([a-z][a-z ]*?)\?", re.IGNORECASE)

WEATHER_TOOL = {
    "description": "Current weather for a city (demo data).",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "City name"}},
        "required": ["city"],
    },
}


_text_of = chat_content_text


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) > 3}


def _offered(request: dict[str, Any]) -> list[dict[str, Any]]:
    tools = request.get("tools")
    if not isinstance(tools, list) or request.get("tool_choice") == "none":
        return []
    return [
        t["function"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name")
    ]


def _pick_tool(request: dict[str, Any], text: str) -> dict[str, Any] | None:
    """The tool a model would call: the one the client forces, else the first whose name or
    description shares a word with the prompt (any tool when one is required)."""
    offered = _offered(request)
    choice = request.get("tool_choice")
    if isinstance(choice, dict):
        forced = (choice.get("function") or {}).get("name")
        return next((f for f in offered if f["name"] == forced), None)
    asked = _words(text)
    for fn in offered:
        about = _words(f"{fn['name'].replace('_', ' ')} {fn.get('description') or ''}")
        if asked & about:
            return fn
    return offered[0] if offered and choice == "required" else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _arguments(fn: dict[str, Any], text: str) -> dict[str, Any]:
    """Arguments for ``fn`` from its parameter schema: every required property, strings
    filled with the place the prompt names ("… in Oslo") or else the prompt itself."""
    params: dict[str, Any] = _dict(fn.get("parameters"))
    props = _dict(params.get("properties"))
    required: list[Any] = params["required"] if isinstance(params.get("required"), list) else []
    place = _CITY.search(text)
    fill = {"integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}
    args: dict[str, Any] = {}
    for name in required:
        schema = _dict(props.get(name))
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            args[name] = schema["enum"][0]
        elif schema.get("type", "string") == "string":
            args[name] = place.group(1) if place else text
        else:
            args[name] = fill.get(str(schema.get("type")))
    return args


def _recall(messages: list[Any], text: str) -> str | None:
    """Answer "what is my/the X?" from an earlier turn that said "X is Y" or "X: Y"."""
    question = _QUESTION.search(text)
    if question is None:
        return None
    noun = re.escape(question.group(1).strip())
    said = re.compile(rf"\b{noun}(?: is|:)\s*([\w\-]+)", re.IGNORECASE)
    for message in reversed(messages[:-1]):
        if isinstance(message, dict):
            found = said.search(_text_of(message.get("content")))
            if found:
                return found.group(1)
    return None


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    """The assistant message (and finish reason) the demo model gives for a chat request."""
    messages = request.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") == "tool":
        return {
            "message": {
                "role": "assistant",
                "content": f"The tool answered: {_text_of(last.get('content'))}",
            },
            "finish_reason": "stop",
        }
    text = _text_of(last.get("content"))
    tool = _pick_tool(request, text)
    if tool is not None:
        return {
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_demo_{next(_ids)}",
                        "type": "function",
                        "function": {
                            "name": tool["name"],
                            "arguments": orjson.dumps(_arguments(tool, text)).decode(),
                        },
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    recalled = _recall(messages, text)
    return {
        "message": {
            "role": "assistant",
            "content": f"{recalled}." if recalled else f"You said: {text}",
        },
        "finish_reason": "stop",
    }


def _usage(request: dict[str, Any], answer: dict[str, Any]) -> dict[str, int]:
    prompt = sum(
        len(_text_of(m.get("content")).split())
        for m in request.get("messages") or []
        if isinstance(m, dict)
    )
    completion = len(_text_of(answer["message"].get("content")).split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_chunk(
    cid: str,
    model: str,
    delta: dict[str, Any] | None,
    finish: str | None = None,
    *,
    usage: dict[str, int] | None = None,
) -> bytes:
    """One streamed ``chat.completion.chunk`` as an SSE event; ``delta=None`` with ``usage``
    is the final usage chunk (no choices). Shared with ``onwards_trio.testing``'s scripts."""
    payload: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        payload["usage"] = usage
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _chat(request: dict[str, Any], send: Send, delay: float) -> None:
    model = str(request.get("model") or DEMO_MODEL)
    answer = _answer(request)
    cid = f"chatcmpl-demo-{next(_ids)}"
    usage = _usage(request, answer)
    if request.get("stream") is not True:
        await send_json(
            send,
            200,
            {
                "id": cid,
                "object": "chat.completion",
                "created": _CREATED,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": answer["message"],
                        "finish_reason": answer["finish_reason"],
                    }
                ],
                "usage": usage,
            },
        )
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
        }
    )

    async def emit(data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    await emit(chat_chunk(cid, model, {"role": "assistant", "content": ""}))
    message = answer["message"]
    if message.get("tool_calls"):
        for i, call in enumerate(message["tool_calls"]):
            fn = call["function"]
            await emit(
                chat_chunk(
                    cid,
                    model,
                    {
                        "tool_calls": [
                            {
                                "index": i,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": fn["name"], "arguments": ""},
                            }
                        ]
                    },
                )
            )
            await emit(
                chat_chunk(
                    cid,
                    model,
                    {"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]},
                )
            )
    else:
        words = str(message.get("content") or "").split(" ")
        for i, word in enumerate(words):
            if delay:
                await trio.sleep(delay)
            await emit(chat_chunk(cid, model, {"content": word if i == 0 else " " + word}))
    await emit(chat_chunk(cid, model, {}, answer["finish_reason"]))
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        await emit(chat_chunk(cid, model, None, usage=usage))
    await emit(b"data: [DONE]\n\n")
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _embedding(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255.0, 6) for b in digest[:dims]]


def demo_upstream(delay: float = 0.02) -> Any:
    """The demo upstream as an ASGI app (``delay`` seconds between streamed words)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError("http only")
        path = scope["path"]
        body = await read_body(receive, 32 * 1024 * 1024)
        try:
            request = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            request = None
        if path.endswith("/models"):
            await send_json(
                send,
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": DEMO_MODEL,
                            "object": "model",
                            "created": _CREATED,
                            "owned_by": "demo",
                        }
                    ],
                },
            )
        elif not isinstance(request, dict):
            await send_json(
                send,
                400,
                {
                    "error": {
                        "message": "body must be a JSON object",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
            )
        elif path.endswith("/chat/completions"):
            await _chat(request, send, delay)
        elif path.endswith("/embeddings"):
            inputs = request.get("input")
            items = inputs if isinstance(inputs, list) else [inputs]
            await send_json(
                send,
                200,
                {
                    "object": "list",
                    "data": [
                        {"object": "embedding", "index": i, "embedding": _embedding(str(x))}
                        for i, x in enumerate(items)
                    ],
                    "model": request.get("model", DEMO_MODEL),
                    "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
                },
            )
        elif path.endswith("/tools/get_weather"):
            city = str(request.get("city") or "Paris")
            await send_json(send, 200, {"city": city, "forecast": "sunny", "temperature_c": 21})
        else:
            await send_json(
                send,
                404,
                {
                    "error": {
                        "message": f"demo upstream has no {path}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
            )

    return app


def demo_config(upstream_url: str, store_path: str = "onwards_trio_demo.sqlite3") -> Config:
    """The embedded default: alias ``demo`` (also in Open Responses adapter mode) on the demo
    upstream, a server-side ``get_weather`` tool, and the SQLite store."""
    base = upstream_url.rstrip("/")
    return parse_config(
        {
            "targets": {
                DEMO_MODEL: {
                    "url": f"{base}/v1",
                    "open_responses": {"adapter": True},
                },
            },
            "tools": {"get_weather": {"url": f"{base}/tools/get_weather", **WEATHER_TOOL}},
            "store": {"kind": "sqlite", "path": store_path},
        }
    )
