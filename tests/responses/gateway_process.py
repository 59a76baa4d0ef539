"""A gateway in a real process (the ``onwards-trio`` CLI) that tests can kill, and the fake
model and tool servers those tests script, counting every call they get."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

from onwards_trio._transport.asgi import Receive, Scope, Send, serve_lifespan
from tests.responses.test_responses_api import text_reply, tool_reply
from tests.support import FakeUpstream, Recorded, Reply

__all__ = [
    "KEY",
    "GatewayProcess",
    "ToolServer",
    "agent_upstream",
    "events_of",
    "model_calls",
    "wait_until",
    "write_config",
]

KEY = "sk-durable"
START_TIMEOUT = 60.0


async def wait_until(check: Callable[[], bool]) -> None:
    """Poll ``check`` (state that another process or task changes) until it holds."""
    with trio.fail_after(30):
        while not check():
            await trio.sleep(0.02)


class GatewayProcess:
    """``python -m onwards_trio -f config --port 0`` with its output drained into ``output``."""

    def __init__(self, config: Path, *, grace: float = 1.0) -> None:
        self.config = config
        self.grace = grace
        self.output: list[str] = []
        self.url = ""
        self.process: trio.Process | None = None

    async def start(self, nursery: trio.Nursery) -> GatewayProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "ONWARDS_LOG": "info"}
        self.process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "onwards_trio",
                "-f",
                str(self.config),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-metrics",
                "--no-watch",
                "--shutdown-grace",
                str(self.grace),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        listening = trio.Event()
        nursery.start_soon(self._drain, listening)
        nursery.start_soon(self._reap)
        with trio.fail_after(START_TIMEOUT):
            await listening.wait()
        return self

    async def _reap(self) -> None:
        """When the test ends (its nursery is cancelled), the process goes too."""
        assert self.process is not None
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                if self.process.returncode is None:
                    self.process.kill()
                await self.process.wait()
                if self.process.stdout is not None:
                    await self.process.stdout.aclose()

    async def _drain(self, listening: trio.Event) -> None:
        assert self.process is not None and self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                self.output.append(text)
                match = re.search(r"listening on (http://\S+)", text)
                if match and not listening.is_set():
                    self.url = match.group(1)
                    listening.set()

    async def stop(self, sig: int = signal.SIGKILL) -> int:
        self.signal(sig)
        return await self.exited()

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def exited(self) -> int:
        assert self.process is not None
        with trio.fail_after(30):
            return await self.process.wait()

    def log(self) -> str:
        return "\n".join(self.output)

    async def post(self, path: str, body: Any) -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as http:
            return await http.post(
                self.url + path, json=body, headers={"authorization": f"Bearer {KEY}"}
            )

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as http:
            return await http.get(self.url + path, headers={"authorization": f"Bearer {KEY}"})

    async def wait_finished(self, response_id: str) -> dict[str, Any]:
        with trio.fail_after(60):
            while True:
                body: dict[str, Any] = (await self.get(f"/v1/responses/{response_id}")).json()
                if body.get("status") in ("completed", "failed", "cancelled", "incomplete"):
                    return body
                await trio.sleep(0.1)


def events_of(sse: str) -> list[dict[str, Any]]:
    """The ``data:`` objects of an SSE body, in order (the closing ``[DONE]`` is not one)."""
    return [
        orjson.loads(line[6:])
        for line in sse.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


class ToolServer:
    """A tool endpoint counting its calls; ``hold`` keeps a call open until the test lets go
    (or the caller dies); ``answered`` is set once a call has been answered."""

    def __init__(self) -> None:
        self.calls = 0
        self.hold = False
        self.called = trio.Event()
        self.answered = trio.Event()
        self._released = trio.Event()

    def release(self) -> None:
        """Let held calls answer (and stop holding new ones)."""
        self.hold = False
        self._released.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        self.calls += 1
        self.called.set()
        if self.hold:
            await self._released.wait()
        body = orjson.dumps({"answer": 42})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
        self.answered.set()


def agent_upstream(*, slow_answers: int = 0) -> FakeUpstream:
    """A model that asks for the ``lookup`` tool, then answers (slowly, ``slow_answers``
    times: long enough for a test to kill the gateway in the middle of the answer)."""
    answers = 0

    def script(rec: Recorded) -> Reply:
        nonlocal answers
        messages = rec.json()["messages"]
        if not any(m.get("role") == "tool" for m in messages):
            return tool_reply(rec, "lookup", '{"q": 1}')
        answers += 1
        slow = answers <= slow_answers
        return text_reply(rec, "the answer is 42 indeed", chunk_delay=5.0 if slow else 0.0)

    return FakeUpstream(script)


def model_calls(upstream: FakeUpstream) -> tuple[int, int]:
    """(calls asking for the tool, calls answering after it)."""
    first = sum(
        1
        for r in upstream.requests
        if not any(m.get("role") == "tool" for m in r.json()["messages"])
    )
    return first, len(upstream.requests) - first


def write_config(
    path: Path,
    upstream_url: str,
    tool_url: str,
    store: dict[str, Any],
    *,
    idempotent: bool = False,
    **background: Any,
) -> Path:
    config = {
        "targets": {
            "m": {
                "url": upstream_url + "/v1",
                "keys": [KEY],
                "open_responses": {"adapter": True},
            }
        },
        "tools": {
            "lookup": {
                "url": tool_url,
                "description": "look it up",
                "parameters": {"type": "object", "properties": {"q": {"type": "integer"}}},
                "idempotent": idempotent,
            }
        },
        "store": store,
        "background": {"lease_secs": 2.0, "recovery_interval_secs": 0.2, **background},
    }
    path.write_bytes(orjson.dumps(config))
    return path
