"""The upstream the gateway under test talks to: scripted models, recorded ones, Python tools.

One ASGI app on a loopback port plays every provider of a test. Each alias has its own path
prefix (``/m/<alias>``), so the gateway's real routing, pipeline and loop run unchanged and the
app always knows which alias a request was for:

* scripted aliases answer from their script (:mod:`._script`), recording each request;
* recorded aliases replay their cassette, or — when recording — forward the request to the real
  provider and keep the exchange (secrets scrubbed, stream events with their timing);
* ``/tools/<name>`` runs a Python function the test declared as a server-side tool.

Everything here runs in the gateway's Trio run (the test's nursery or the plugin's thread); the
test thread only reads the records, under a lock.
"""

from __future__ import annotations

import inspect
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import httpx
import orjson
import trio

from onwards_trio._transport.asgi import Receive, Scope, Send, read_body, send_json, serve_lifespan
from onwards_trio.testing._cassette import (
    Cassette,
    Interaction,
    Matcher,
    events_of,
    header_pairs,
    request_headers,
    response_headers,
    scrub,
)
from onwards_trio.testing._records import ModelCall, ToolCall, redact_headers
from onwards_trio.testing._script import Reply, as_reply, render_chunks, render_json

__all__ = ["PythonTool", "RealUpstream", "RecordedModel", "ScriptedModel", "UpstreamApp"]

_BODY_LIMIT = 64 * 1024 * 1024
_MISMATCH_STATUS = 400  # not retried by the SDKs: the test fails at once, at the call
# Hop and credential headers: the recorder sets the real provider's key itself.
_NOT_FORWARDED = frozenset(
    {"host", "content-length", "connection", "accept-encoding", "authorization", "x-api-key"}
)


class StreamBroken(Exception):
    """Raised inside the app to abort the connection mid-stream (``break_after``)."""


@attrs.frozen
class RealUpstream:
    """Where a recorded alias really goes when recording: base ``url`` and its key."""

    url: str
    key: str | None = None
    header: str = "authorization"
    prefix: str = "Bearer "


@attrs.define
class ScriptedModel:
    script: Any
    served: int = 0


@attrs.define
class RecordedModel:
    matcher: Matcher
    upstream: RealUpstream | None = None
    realtime: bool = False  # replay stream events at their recorded offsets


@attrs.frozen
class PythonTool:
    name: str
    fn: Callable[..., Any]
    description: str
    parameters: Mapping[str, Any]


def _json_or_none(body: bytes) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


def _error(message: str, code: str) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }


class UpstreamApp:
    """The ASGI app; its public attributes are what the harness reads and configures."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the test thread reads while the Trio thread writes
        self._recordings = 0  # recordings in flight (a client may stop reading before they end)
        self._recorded = threading.Condition(self.lock)
        self.models: dict[str, ScriptedModel | RecordedModel] = {}
        self.tools: dict[str, PythonTool] = {}
        self.calls: list[ModelCall] = []
        self.tool_calls: list[ToolCall] = []
        self.problems: list[str] = []
        self.cassette: Cassette | None = None
        self.recording = False
        self.client: httpx.AsyncClient | None = None

    def wait_for_recordings(self, timeout: float) -> bool:
        """Block (the test's thread) until no recording is in flight: a streaming client stops
        at ``[DONE]``, before the recorder has seen the upstream's end and kept the interaction.
        ``False`` if some are still running after ``timeout`` seconds."""
        with self._recorded:
            return self._recorded.wait_for(lambda: self._recordings == 0, timeout)

    def problem(self, message: str) -> None:
        with self.lock:
            self.problems.append(message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        path: str = scope["path"]
        body = await read_body(receive, _BODY_LIMIT)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        if path.startswith("/tools/"):
            await self._tool(path.removeprefix("/tools/"), body, dict(headers), send)
            return
        alias, _, rest = path.removeprefix("/m/").partition("/")
        model = self.models.get(alias) if path.startswith("/m/") else None
        if model is None:
            await send_json(send, 404, _error(f"no model {alias!r} here ({path})", "not_found"))
            return
        parsed = _json_or_none(body)
        record = ModelCall(alias, "/" + rest, parsed, redact_headers(headers))
        with self.lock:
            self.calls.append(record)
        if isinstance(model, ScriptedModel):
            if not rest.endswith("chat/completions"):
                message = (
                    f"scripted model {alias!r} answers chat completions only, not /{rest} "
                    "(the gateway turns /v1/responses and /v1/messages into chat completions)"
                )
                self.problem(message)
                await send_json(send, 404, _error(message, "onwards_script_error"))
                return
            await self._scripted(alias, model, record, send)
        elif self.recording:
            with self.lock:
                self._recordings += 1
            try:
                await self._record(alias, model, scope, "/" + rest, body, headers, send)
            finally:
                with self._recorded:
                    self._recordings -= 1
                    self._recorded.notify_all()
        else:
            await self._replay(alias, model, parsed, send)

    # -- scripted --------------------------------------------------------------------------------

    def _next(self, alias: str, model: ScriptedModel, record: ModelCall) -> Reply | str:
        """The reply for this call, or a message saying why the script has none."""
        item = model.script
        index = model.served
        model.served += 1
        try:
            if isinstance(item, list | tuple):
                if index >= len(item):
                    return (
                        f"model {alias!r} was called {index + 1} times but its script has "
                        f"{len(item)} replies"
                    )
                item = item[index]
            return as_reply(item(record) if callable(item) else item)
        except Exception:
            return f"the script of model {alias!r} failed:\n{traceback.format_exc()}"

    async def _scripted(
        self, alias: str, model: ScriptedModel, record: ModelCall, send: Send
    ) -> None:
        reply = self._next(alias, model, record)
        if isinstance(reply, str):
            self.problem(reply)
            await send_json(send, _MISMATCH_STATUS, _error(reply, "onwards_script_error"))
            return
        request = record.body if isinstance(record.body, dict) else {}
        if reply.first_byte_delay:
            await trio.sleep(reply.first_byte_delay)
        headers = [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
        if reply.is_error or not record.stream:
            payload = render_json(reply, request)
            headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        chunks = (
            [reply.body if isinstance(reply.body, bytes) else orjson.dumps(reply.body)]
            if reply.body is not None
            else render_chunks(reply, request)
        )
        headers += [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, chunk in enumerate(chunks):
            if reply.break_after is not None and i >= reply.break_after:
                raise StreamBroken(f"{alias}: stream broken after {i} chunks, as scripted")
            if i and reply.chunk_delay:
                await trio.sleep(reply.chunk_delay)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # -- cassettes -------------------------------------------------------------------------------

    async def _replay(self, alias: str, model: RecordedModel, body: Any, send: Send) -> None:
        cassette = self.cassette
        found = cassette.find(alias, body, model.matcher) if cassette is not None else None
        if found is None:
            message = (
                cassette.explain_miss(alias, body)
                if cassette is not None
                else "no cassette is open for this test"
            )
            self.problem(message)
            await send_json(send, _MISMATCH_STATUS, _error(message, "onwards_cassette_mismatch"))
            return
        response = found.response
        headers = header_pairs(response.get("headers", {}))
        events = response.get("events")
        if events is None:
            payload = orjson.dumps(response.get("body"))
            headers.append((b"content-length", str(len(payload)).encode()))
            await send(
                {"type": "http.response.start", "status": response["status"], "headers": headers}
            )
            await send({"type": "http.response.body", "body": payload})
            return
        await send(
            {"type": "http.response.start", "status": response["status"], "headers": headers}
        )
        started = trio.current_time()
        for event in events:
            if model.realtime:
                await trio.sleep_until(started + float(event.get("at_ms", 0)) / 1000)
            data = str(event["data"]).encode()
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _record(
        self,
        alias: str,
        model: RecordedModel,
        scope: Scope,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        send: Send,
    ) -> None:
        upstream = model.upstream
        if upstream is None or self.client is None or self.cassette is None:
            message = (
                f"recording {alias!r}: no real upstream is configured for it (pass upstream= "
                "or list it in the --onwards-upstreams file)"
            )
            self.problem(message)
            await send_json(send, _MISMATCH_STATUS, _error(message, "onwards_record_error"))
            return
        base = upstream.url.rstrip("/")
        tail = (
            path.removeprefix("/v1") if base.endswith("/v1") and path.startswith("/v1/") else path
        )
        url = base + tail
        query = scope.get("query_string", b"").decode()
        if query:
            url += "?" + query
        forward = [(k, v) for k, v in headers if k.lower() not in _NOT_FORWARDED]
        secrets = [upstream.key] if upstream.key else []
        if upstream.key:
            forward.append((upstream.header, upstream.prefix + upstream.key))
        started = time.monotonic()
        request = self.client.build_request(scope["method"], url, content=body, headers=forward)
        response = await self.client.send(request, stream=True)
        try:
            kept = response_headers(list(response.headers.items()))
            answer: dict[str, Any] = {"status": response.status_code, "headers": kept}
            interaction = Interaction(
                alias,
                {
                    "method": scope["method"],
                    "path": path,
                    "headers": request_headers(headers),
                    "body": scrub(_json_or_none(body), secrets),
                },
                answer,
            )
            relay = header_pairs(kept)
            start = {"type": "http.response.start", "status": response.status_code}
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                await send({**start, "headers": relay})
                chunks: list[tuple[float, bytes]] = []
                async for chunk in response.aiter_bytes():
                    chunks.append((time.monotonic() - started, chunk))
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                answer["events"] = scrub(events_of(chunks), secrets)
                self.cassette.interactions.append(interaction)  # before the client sees the end
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                payload = await response.aread()
                answer["body"] = scrub(_json_or_none(payload), secrets)
                self.cassette.interactions.append(interaction)
                relay.append((b"content-length", str(len(payload)).encode()))
                await send({**start, "headers": relay})
                await send({"type": "http.response.body", "body": payload})
        finally:
            await response.aclose()

    # -- Python tools ----------------------------------------------------------------------------

    async def _tool(self, name: str, body: bytes, headers: dict[str, str], send: Send) -> None:
        tool = self.tools.get(name)
        call_id = headers.get("x-tool-call-id")
        if tool is None:
            await send_json(send, 404, {"error": f"no tool {name!r}"})
            return
        args = _json_or_none(body)
        try:
            result = tool.fn(**args) if isinstance(args, dict) else tool.fn(args)
            if inspect.isawaitable(result):
                result = await result
            output = orjson.loads(orjson.dumps(result))
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            with self.lock:
                self.tool_calls.append(ToolCall(name, args, call_id, error=message))
            await send_json(send, 500, {"error": message})
            return
        with self.lock:
            self.tool_calls.append(ToolCall(name, args, call_id, output=output))
        await send_json(send, 200, output)
