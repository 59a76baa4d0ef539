"""The ``onwards-trio`` process end to end: hot reload, the metrics port, logs, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from tests.support import FakeUpstream, Reply, chat_completion, serve_app

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
UPSTREAM_KEY = "cli-upstream-key-93ab71"
CLIENT_KEY = "cli-client-key-5521ce"


class Process:
    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.url = ""
        self.metrics_url = ""

    async def pump(self, task_status: trio.TaskStatus[None]) -> None:
        """Collect stderr lines; started once both listeners are announced."""
        assert self.proc.stderr is not None
        buffer = b""
        announced = False
        async for chunk in self.proc.stderr:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if m := re.search(r"listening on (http://\S+)", line):
                    self.url = m.group(1)
                if m := re.search(r"metrics on (http://\S+)/metrics", line):
                    self.metrics_url = m.group(1)
            if not announced and self.url and self.metrics_url:
                announced = True
                task_status.started()

    async def wait_for_line(self, pattern: str) -> str:
        with trio.fail_after(10):
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                await trio.sleep(0.02)


@asynccontextmanager
async def gateway_process(
    nursery: trio.Nursery, config: Path, *extra: str
) -> AsyncIterator[Process]:
    argv = [
        sys.executable, "-m", "onwards_trio", "-f", str(config), "--host", "127.0.0.1",
        "--port", "0", "--metrics-port", "0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "ONWARDS_LOG": "info"}
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, env=env)
    process = Process(proc)
    try:
        with trio.fail_after(20):
            await nursery.start(process.pump)
        yield process
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(10):
            await proc.wait()


def write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(doc))
    os.replace(tmp, path)


def target(url: str) -> dict[str, Any]:
    return {"url": url, "onwards_key": UPSTREAM_KEY, "keys": [CLIENT_KEY]}


async def test_reload_metrics_and_sigterm_through_the_cli(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    up = FakeUpstream(Reply(body=chat_completion("hello")))
    upstream = await serve_app(nursery, up)
    config = tmp_path / "config.json"
    write(config, {"targets": {"gpt-4": target(upstream)}})
    async with gateway_process(nursery, config) as gw:
        headers = {"authorization": f"Bearer {CLIENT_KEY}"}
        async with httpx.AsyncClient(base_url=gw.url, timeout=10, headers=headers) as client:
            msg = {"messages": [{"role": "user", "content": "hi"}]}
            assert (await client.post(CHAT, json={"model": "gpt-4", **msg})).status_code == 200
            write(config, {"targets": {"gpt-4": target(upstream), "added": target(upstream)}})
            await gw.wait_for_line(r"config reloaded")
            assert (await client.post(CHAT, json={"model": "added", **msg})).status_code == 200
            config.write_bytes(b'{"targets": []}')
            rejected = await gw.wait_for_line(r"config reload rejected")
            assert "$.targets" in rejected
            assert (await client.post(CHAT, json={"model": "added", **msg})).status_code == 200
        async with httpx.AsyncClient(base_url=gw.metrics_url, timeout=10) as scraper:
            text = (await scraper.get("/metrics")).text
        gw.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            code = await gw.proc.wait()
    assert code == 0
    assert 'onwards_config_reloads_total{result="ok"} 1.0' in text
    assert 'onwards_config_reloads_total{result="failed"} 1.0' in text
    chat = 'onwards_http_requests_total{endpoint="/v1/chat/completions",method="POST",status="200"}'
    assert f"{chat} 3.0" in text
    logged = "\n".join(gw.lines)
    assert logged.count("onwards_trio.access") >= 3
    assert UPSTREAM_KEY not in logged and CLIENT_KEY not in logged


async def test_no_watch_and_no_metrics_switch_them_off(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = tmp_path / "config.json"
    write(config, {"targets": {"gpt-4": {"url": "https://x.example"}}})
    argv = [
        sys.executable, "-m", "onwards_trio", "-f", str(config), "--host", "127.0.0.1",
        "--port", "0", "--no-watch", "--no-metrics",
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    process = Process(proc)
    try:
        assert proc.stderr is not None
        with trio.fail_after(20):
            async for chunk in proc.stderr:
                process.lines.extend(chunk.decode().splitlines())
                if any("listening on" in ln for ln in process.lines):
                    break
        url = re.search(r"listening on (http://\S+)", "\n".join(process.lines))
        assert url is not None
        write(
            config,
            {"targets": {"gpt-4": {"url": "https://x.example"}, "new": {"url": "https://y"}}},
        )
        await trio.sleep(2.5)  # more than two poll intervals
        async with httpx.AsyncClient(base_url=url.group(1), timeout=10) as client:
            models = (await client.get("/v1/models")).json()["data"]
    finally:
        proc.kill()
        with trio.move_on_after(10):
            await proc.wait()
    assert [m["id"] for m in models] == ["gpt-4"]
    assert not any("metrics on" in ln for ln in process.lines)
