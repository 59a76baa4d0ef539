"""A built-in demo upstream, so the gateway works offline with no API key.

The ``demo`` model is a deterministic echo: it answers ``You said: <last user text>``, streams
that answer word by word, and knows one tool: when the client (or the gateway, for server-side
tools) offers ``get_weather`` and the last user message mentions the weather, it asks for that
tool; once it sees the tool's output it reports it. The same app serves the tool itself at
``POST /tools/get_weather``, so ``/v1/responses`` shows a full server-side tool loop.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from typing import Any

import orjson
import trio

from onwards_trio._config import Config, parse_config
from onwards_trio._transport.asgi import Receive, Scope, Send, read_body, send_json, serve_lifespan

__all__ = ["chat_chunk", "demo_config", "demo_upstream"]

DEMO_MODEL = "demo"
_CREATED = 1_700_000_000
_ids = itertools.count(1)
_WEATHER = re.compile(r"\bweather\b", re.IGNORECASE)
_CITY = re.compile(r"\bin ([A-Z][\w\- ]+)")

WEATHER_TOOL = {
    "description": "Current weather for a city (demo data).",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "City name"}},
        "required": ["city"],
    },
}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


def _weather_tool(tools: Any) -> str | None:
    """The name under which ``get_weather`` is offered: itself, or ``<server>__get_weather``
    when it comes from an MCP server."""
    if not isinstance(tools, list):
        return None
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str) and (name == "get_weather" or name.endswith("__get_weather")):
            return name
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
    tool = _weather_tool(request.get("tools"))
    if tool is not None and _WEATHER.search(text):
        match = _CITY.search(text)
        city = match.group(1).strip() if match else "Paris"
        return {
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_demo_{next(_ids)}",
                        "type": "function",
                        "function": {
                            "name": tool,
                            "arguments": orjson.dumps({"city": city}).decode(),
                        },
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    return {
        "message": {"role": "assistant", "content": f"You said: {text}"},
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
