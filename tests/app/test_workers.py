"""``--workers N``: N gateway processes on one port under a supervising parent."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import orjson
import pytest
import trio

from onwards_trio import parse_config
from onwards_trio._app.workers import merge_metrics, share_limits

pytestmark = [pytest.mark.slow]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _metrics_url(worker: int) -> str:
    """A worker's own metrics listener (its parent scrapes it), from its environment."""
    env = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    path = next(e for e in env if e.startswith(b"ONWARDS_WORKER_METRICS_FILE=")).split(b"=", 1)[1]
    return Path(path.decode()).read_text().strip()


def _requests_total(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("onwards_http_requests_total{")
    )


@asynccontextmanager
async def _fleet(tmp_path: Path, workers: int = 2) -> AsyncIterator[tuple[trio.Process, str, str]]:
    config = tmp_path / "config.json"
    config.write_bytes(orjson.dumps({"targets": {"a": {"url": "http://127.0.0.1:1/v1"}}}))
    metrics_port = _free_port()
    argv = [
        sys.executable, "-m", "onwards_trio", "-f", str(config), "--host", "127.0.0.1",
        "--port", "0", "--metrics-port", str(metrics_port), "--no-watch",
        "--workers", str(workers),
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, env=dict(os.environ))
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        with trio.fail_after(30):
            async for chunk in proc.stderr:
                lines.extend(chunk.decode(errors="replace").splitlines())
                text = "\n".join(lines)
                if text.count("listening on") >= workers:
                    break
        port = re.search(r"starting \d+ workers on 127\.0\.0\.1:(\d+)", "\n".join(lines))
        assert port, lines
        yield proc, f"http://127.0.0.1:{port.group(1)}", f"http://127.0.0.1:{metrics_port}"
    finally:
        # Workers first: once the parent is gone they are no longer its children to find.
        for child in _children(proc.pid):
            os.kill(child, signal.SIGKILL)
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        with trio.move_on_after(10):
            await proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _get_models(url: str, n: int) -> list[int]:
    """``n`` requests, each on a new connection (the kernel spreads connections, not requests)."""
    codes = []
    for _ in range(n):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            codes.append((await client.get("/v1/models")).status_code)
    return codes


async def test_every_worker_serves_the_one_port_and_metrics_are_merged(tmp_path: Path) -> None:
    async with _fleet(tmp_path) as (proc, url, metrics):
        assert await _get_models(url, 40) == [200] * 40
        workers = _children(proc.pid)
        assert len(workers) == 2
        async with httpx.AsyncClient(timeout=10) as client:
            own = [
                _requests_total((await client.get(_metrics_url(w) + "/metrics")).text)
                for w in workers
            ]
            merged = _requests_total((await client.get(metrics + "/metrics")).text)
    assert all(n > 0 for n in own)  # both took connections
    assert sum(own) == merged == 40


async def test_a_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    async with _fleet(tmp_path) as (proc, url, _):
        first = _children(proc.pid)
        os.kill(first[0], signal.SIGKILL)
        assert await _get_models(url, 5) == [200] * 5  # the other one still answers
        with trio.fail_after(20):
            while True:
                now = _children(proc.pid)
                if len(now) == 2 and first[0] not in now:
                    break
                await trio.sleep(0.1)
        replacement = next(p for p in now if p not in first)
        with trio.fail_after(20):
            while True:
                try:
                    _metrics_url(replacement)  # written once it serves
                    break
                except (OSError, StopIteration):
                    await trio.sleep(0.1)
        assert await _get_models(url, 10) == [200] * 10


async def test_workers_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    async with _fleet(tmp_path) as (proc, _, _):
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)  # no chance to stop them itself
        with trio.fail_after(15):
            while any(_alive(w) for w in workers):
                await trio.sleep(0.1)


async def test_sigterm_drains_every_worker_and_exits_cleanly(tmp_path: Path) -> None:
    async with _fleet(tmp_path) as (proc, _, _):
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            code = await proc.wait()
    assert code == 0
    assert len(workers) == 2 and not any(_alive(w) for w in workers)


async def test_sighup_reloads_every_worker(tmp_path: Path) -> None:
    async with _fleet(tmp_path) as (proc, url, _):
        (tmp_path / "config.json").write_bytes(
            orjson.dumps(
                {"targets": {"a": {"url": "http://127.0.0.1:1/v1"}, "b": {"url": "http://x/v1"}}}
            )
        )
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(20):
            while True:
                seen = []
                for _ in range(12):  # new connections: both workers answer some
                    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                        data = (await client.get("/v1/models")).json()["data"]
                    seen.append(sorted(m["id"] for m in data))
                if all(ids == ["a", "b"] for ids in seen):
                    break
                await trio.sleep(0.2)


def test_without_shared_limits_each_worker_enforces_its_share() -> None:
    limits = {"rate_limit": {"requests_per_second": 10, "burst_size": 5}}
    config = parse_config(
        {
            "auth": {
                "key_definitions": {
                    "k": {"key": "sk-k", "concurrency_limit": {"max_concurrent_requests": 3}}
                }
            },
            "targets": {
                "a": {
                    "providers": [{"url": "http://u/v1", **limits}],
                    "concurrency_limit": {"max_concurrent_requests": 1},
                    **limits,
                }
            },
        }
    )
    shared = share_limits(config, 2)
    pool = shared.targets["a"]
    assert pool.rate_limit is not None and pool.rate_limit.requests_per_second == 5
    assert pool.rate_limit.burst_size == 3  # rounded up
    provider = pool.providers[0].rate_limit
    assert provider is not None and provider.requests_per_second == 5
    assert pool.concurrency_limit is not None
    assert pool.concurrency_limit.max_concurrent_requests == 1  # at least one per worker
    assert shared.auth is not None
    key = shared.auth.key_definitions["k"].concurrency_limit
    assert key is not None and key.max_concurrent_requests == 2
    assert share_limits(config, 1) is config


def test_with_shared_limits_every_limit_is_kept_whole() -> None:
    config = parse_config(
        {
            "shared_limits": {"redis_url": "redis://127.0.0.1:1/0"},
            "targets": {"a": {"url": "http://u/v1", "rate_limit": {"requests_per_second": 10}}},
        }
    )
    assert share_limits(config, 4) is config


def test_merged_metrics_sum_counters_and_histograms_and_keep_the_newest_timestamp() -> None:
    one = (
        '# HELP x_total X.\n# TYPE x_total counter\nx_total{a="1"} 2.0\n'
        '# HELP h H.\n# TYPE h histogram\nh_bucket{le="1.0"} 1.0\nh_sum 0.5\nh_count 1.0\n'
        "# HELP t_timestamp T.\n# TYPE t_timestamp gauge\nt_timestamp 100.0\n"
    )
    two = (
        '# HELP x_total X.\n# TYPE x_total counter\nx_total{a="1"} 3.0\nx_total{a="2"} 1.0\n'
        '# HELP h H.\n# TYPE h histogram\nh_bucket{le="1.0"} 2.0\nh_sum 1.0\nh_count 2.0\n'
        "# HELP t_timestamp T.\n# TYPE t_timestamp gauge\nt_timestamp 200.0\n"
    )
    merged = merge_metrics([one, two]).splitlines()
    assert merged == [
        "# HELP x_total X.",
        "# TYPE x_total counter",
        'x_total{a="1"} 5.0',
        'x_total{a="2"} 1.0',
        "# HELP h H.",
        "# TYPE h histogram",
        'h_bucket{le="1.0"} 3.0',
        "h_sum 1.5",
        "h_count 3.0",
        "# HELP t_timestamp T.",
        "# TYPE t_timestamp gauge",
        "t_timestamp 200.0",
    ]
