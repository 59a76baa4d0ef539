"""``--workers N``: N gateway processes on one port, under a supervising parent.

One Python process uses one core. The parent starts N copies of the same command line as
workers; each binds the port with ``SO_REUSEPORT`` (the kernel spreads new connections across
them). The parent serves nothing itself but:

* restarts a worker that dies (after a back-off that grows to 30 s while it keeps dying early);
* forwards ``SIGHUP`` (reload) to every worker, and on ``SIGTERM``/``SIGINT`` asks every worker
  to drain (``SIGTERM``: stop accepting, finish in-flight requests for the grace period), waits
  for them, and exits; a second signal stops them at once;
* serves the metrics port: one scrape returns every worker's metrics merged (counters,
  histograms and in-flight gauges summed; gauges that hold a moment take the newest).

**Limits across workers.** With ``shared_limits`` (Redis) configured every limit is exact
across all workers (and replicas): nothing changes. Without it each worker holds its own
limiters, so each worker enforces a *share*: rate limits (rate and burst) are divided by N and
concurrency limits are divided by N rounded up (at least one request per worker for a
non-zero limit). A fleet of N workers therefore admits at most the configured rate, and at
most the configured concurrency rounded up to a multiple of N. A share is only as even as the
kernel's spreading of connections: a client that sends everything over one keep-alive
connection meets one worker's share.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from onwards_trio._config import ConcurrencyLimitSpec, Config, RateLimitSpec
from onwards_trio._transport.asgi import Receive, Scope, Send, send_response, serve_lifespan

__all__ = [
    "METRICS_FILE_ENV",
    "WORKER_ENV",
    "merge_metrics",
    "share_limits",
    "supervise",
    "watch_parent",
    "worker_count",
]

log = logging.getLogger("onwards_trio")

WORKER_ENV = "ONWARDS_WORKER"  # "<index>/<count>" in a worker's environment
METRICS_FILE_ENV = "ONWARDS_WORKER_METRICS_FILE"  # where a worker writes its metrics URL
_MAX_BACKOFF = 30.0
_STABLE_AFTER = 60.0  # a worker that ran this long resets the back-off
_SCRAPE_TIMEOUT = 2.0


def worker_count() -> int | None:
    """N when this process is one of N supervised workers, else ``None``."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    return int(value.partition("/")[2])


async def watch_parent(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """In a worker: stop (cancel ``scope``) once the supervising parent is gone, so a parent
    killed without a chance to stop its workers leaves none behind."""
    parent = os.getppid()
    task_status.started()
    while True:  # polled: a parent's death is no event a child can wait for
        await trio.sleep(1.0)
        if os.getppid() != parent:
            break
    log.warning("the supervising process is gone: this worker stops")
    scope.cancel()


# -- limits --------------------------------------------------------------------------------------


def share_limits(config: Config, workers: int) -> Config:
    """The config one of ``workers`` workers enforces locally (see the module docstring)."""
    if workers <= 1 or config.shared_limits is not None:
        return config
    result: Config = _shared(config, workers)
    return result


def _shared(value: Any, n: int) -> Any:
    if isinstance(value, RateLimitSpec):
        burst = value.burst_size
        return RateLimitSpec(
            requests_per_second=value.requests_per_second / n,
            burst_size=None if burst is None else max(1, math.ceil(burst / n)),
        )
    if isinstance(value, ConcurrencyLimitSpec):
        limit = value.max_concurrent_requests
        return ConcurrencyLimitSpec(math.ceil(limit / n) if limit else 0)
    if isinstance(value, dict):
        return {k: _shared(v, n) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared(v, n) for v in value]
    if attrs.has(type(value)):
        changes = {}
        for field in attrs.fields(type(value)):
            if not field.init:
                continue
            old = getattr(value, field.name)
            new = _shared(old, n)
            if new is not old:
                changes[field.name.lstrip("_")] = new
        return attrs.evolve(value, **changes) if changes else value
    return value


# -- metrics -------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?$")


def merge_metrics(texts: Sequence[str]) -> str:
    """Prometheus text expositions of several workers as one: samples with the same name and
    labels are summed (gauges named like a timestamp take the maximum); families keep the
    order in which they first appear."""
    families: dict[str, dict[str, Any]] = {}
    types: dict[str, str] = {}
    order: list[str] = []

    def family(sample: str) -> str:
        best = ""
        for name in types:
            if sample.startswith(name) and len(name) > len(best):
                best = name
        return best or sample

    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    name = parts[2]
                    fam = families.setdefault(name, {"meta": {}, "samples": {}})
                    if name not in order:
                        order.append(name)
                    fam["meta"].setdefault(parts[1], line)
                    if parts[1] == "TYPE" and len(parts) == 4:
                        types[name] = parts[3]
                continue
            match = _SAMPLE.match(line)
            if match is None:
                continue
            name, labels, raw = match.group(1), match.group(2) or "", match.group(3)
            try:
                value = float(raw)
            except ValueError:
                continue
            fam_name = family(name)
            fam = families.setdefault(fam_name, {"meta": {}, "samples": {}})
            if fam_name not in order:
                order.append(fam_name)
            key = name + labels
            samples: dict[str, float] = fam["samples"]
            if key not in samples:
                samples[key] = value
            elif types.get(fam_name) == "gauge" and _is_time(fam_name):
                samples[key] = max(samples[key], value)
            else:
                samples[key] += value
    out: list[str] = []
    for name in order:
        fam = families[name]
        for kind in ("HELP", "TYPE"):
            if kind in fam["meta"]:
                out.append(fam["meta"][kind])
        for key, value in fam["samples"].items():
            out.append(f"{key} {_number(value)}")
    return "\n".join(out) + "\n"


def _is_time(name: str) -> bool:
    """Gauges that hold a moment (a last reload, a creation time): never summed."""
    return "timestamp" in name or name.endswith(("_created", "_start_time_seconds"))


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value)) + ".0"
    return repr(value)


class _MergedMetrics:
    """The parent's metrics endpoint: every worker's ``/metrics``, merged at scrape time."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"unsupported ASGI scope type {scope['type']!r}")
        if scope["path"] != "/metrics":
            await send_response(send, 404, [(b"content-type", b"text/plain")], b"not found\n")
            return
        texts: list[str] = []
        async with httpx.AsyncClient(timeout=_SCRAPE_TIMEOUT) as client:

            async def scrape(url: str) -> None:
                try:
                    reply = await client.get(url + "/metrics")
                    if reply.status_code == 200:
                        texts.append(reply.text)
                except httpx.HTTPError:
                    pass  # a worker restarting: the others still answer

            async with trio.open_nursery() as nursery:
                for path in self.files:
                    try:
                        url = path.read_text().strip()
                    except OSError:
                        continue
                    if url:
                        nursery.start_soon(scrape, url)
        body = merge_metrics(texts).encode()
        content_type = b"text/plain; version=0.0.4; charset=utf-8"
        await send_response(send, 200, [(b"content-type", content_type)], body)


# -- the supervisor ------------------------------------------------------------------------------


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def supervise(
    argv: Sequence[str],
    workers: int,
    host: str,
    port: int,
    metrics_host: str,
    metrics_port: int | None,
    grace: float,
) -> None:
    """Run ``workers`` workers of ``python -m onwards_trio <argv>`` until a signal ends them."""
    if port == 0:
        port = _free_port(host)  # every worker must bind the same port
    tmp = Path(tempfile.mkdtemp(prefix="onwards-workers-"))
    files = [tmp / f"metrics-{i}.url" for i in range(workers)]
    base = [sys.executable, "-m", "onwards_trio", *argv, "--port", str(port)]
    stopping = trio.Event()
    all_exited = trio.Event()  # set once stopping and no worker is left
    procs: dict[int, trio.Process] = {}

    async def slot(i: int) -> None:
        backoff = 1.0
        env = {**os.environ, WORKER_ENV: f"{i}/{workers}", METRICS_FILE_ENV: str(files[i])}
        while not stopping.is_set():
            started = time.monotonic()
            proc = await trio.lowlevel.open_process(base, env=env)
            procs[i] = proc
            try:
                with trio.CancelScope(shield=True):
                    code = await proc.wait()
            finally:
                procs.pop(i, None)
                if stopping.is_set() and not procs:
                    all_exited.set()
            if stopping.is_set():
                return
            if time.monotonic() - started > _STABLE_AFTER:
                backoff = 1.0
            log.warning("worker %d exited with code %s; restarting in %.0f s", i, code, backoff)
            with trio.move_on_after(backoff):
                await stopping.wait()
            backoff = min(_MAX_BACKOFF, backoff * 2)

    def signal_all(sig: int) -> None:
        for proc in list(procs.values()):
            if proc.returncode is None:
                proc.send_signal(sig)

    async def watch_signals(scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                if sig == signal.SIGHUP:
                    log.info("SIGHUP: reloading every worker")
                    signal_all(signal.SIGHUP)
                elif not stopping.is_set():
                    log.info("draining %d workers (up to %.0f s)", workers, grace)
                    stopping.set()
                    if not procs:
                        all_exited.set()
                    signal_all(signal.SIGTERM)
                    with trio.move_on_after(grace + 5):
                        await all_exited.wait()
                    signal_all(signal.SIGKILL)
                    scope.cancel()
                else:
                    log.info("second signal: stopping every worker now")
                    signal_all(signal.SIGKILL)
                    scope.cancel()

    log.info("starting %d workers on %s:%d", workers, host, port)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals, nursery.cancel_scope)
        if metrics_port is not None:
            from onwards_trio._transport.server import serve as serve_http

            await nursery.start(serve_http, _MergedMetrics(files), metrics_host, metrics_port)
            log.info("merged metrics of every worker on %s:%d/metrics", metrics_host, metrics_port)
        for i in range(workers):
            nursery.start_soon(slot, i)
