"""SIGTERM to the ``onwards-trio`` process: a stream in flight finishes, then the process exits."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
import trio

from tests.support import FakeUpstream, Reply, serve_app, sse

pytestmark = [pytest.mark.slow]


async def _listening(proc: trio.Process, lines: list[str]) -> str:
    assert proc.stderr is not None
    with trio.fail_after(20):
        async for chunk in proc.stderr:
            lines.extend(chunk.decode(errors="replace").splitlines())
            found = re.search(r"listening on (http://\S+)", "\n".join(lines))
            if found:
                return found.group(1)
    raise AssertionError("the gateway never said where it listens")


async def test_sigterm_lets_a_stream_in_flight_finish(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    chunks = sse(*({"n": i} for i in range(8)))
    up = FakeUpstream(
        Reply(headers=[(b"content-type", b"text/event-stream")], chunks=chunks, chunk_delay=0.1)
    )
    config = tmp_path / "config.json"
    config.write_bytes(orjson.dumps({"targets": {"gpt-4": {"url": await serve_app(nursery, up)}}}))
    argv = [
        sys.executable, "-m", "onwards_trio", "-f", str(config), "--host", "127.0.0.1",
        "--port", "0", "--no-metrics",
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, env=dict(os.environ))
    lines: list[str] = []
    try:
        url = await _listening(proc, lines)
        request = {"model": "gpt-4", "messages": [], "stream": True}
        client = httpx.AsyncClient(base_url=url, timeout=10)
        async with client, client.stream("POST", "/v1/chat/completions", json=request) as r:
            stream = r.aiter_bytes()
            received = await anext(stream)
            proc.send_signal(signal.SIGTERM)
            async for chunk in stream:
                received += chunk
        with trio.fail_after(15):
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
    assert received == b"".join(chunks)
    assert code == 0
