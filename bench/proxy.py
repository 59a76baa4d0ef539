"""Gateway throughput and added latency, measured over loopback with real processes.

Three processes share the machine: a fast fake upstream (raw Trio sockets, canned answers),
the gateway (``python -m onwards_trio``) and this load generator (raw keep-alive sockets).
Every figure is relative: on a 2-core machine the three compete for CPU.

Run: ``nox -s bench`` or ``python bench/proxy.py [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

CHAT_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok " * 40},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 40, "total_tokens": 50},
    }
).encode()
SSE_EVENTS = 20


def _sse_body() -> bytes:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "tok "}}],
    }
    return (
        b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for _ in range(SSE_EVENTS))
        + b"data: [DONE]\n\n"
    )


def upstream_main(port: int) -> None:
    """A minimal keep-alive HTTP/1.1 server: JSON for plain requests, SSE for streaming ones."""
    plain = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(CHAT_BODY)).encode()
        + b"\r\n\r\n"
        + CHAT_BODY
    )
    sse = _sse_body()
    streamed = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: "
        + str(len(sse)).encode()
        + b"\r\n\r\n"
        + sse
    )

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                while len(rest) < length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    rest += data
                body, buf = rest[:length], rest[length:]
                await stream.send_all(streamed if b'"stream":true' in body else plain)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    trio.run(trio.serve_tcp, handle, port)  # type: ignore[arg-type]


class Conn:
    """One keep-alive client connection speaking just enough HTTP/1.1."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def request(self, raw: bytes) -> tuple[float, float]:
        """Send one request; return (time to first body byte, total time)."""
        t0 = time.perf_counter()
        await self.stream.send_all(raw)
        while b"\r\n\r\n" not in self.buf:
            self.buf += await self.stream.receive_some(65536)
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = None
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            low = line.lower()
            if low.startswith(b"content-length:"):
                length = int(line[15:])
            elif low.startswith(b"transfer-encoding:") and b"chunked" in low:
                chunked = True
        while not rest:
            rest += await self.stream.receive_some(65536)
        ttfb = time.perf_counter() - t0
        if chunked:
            while not rest.endswith(b"0\r\n\r\n"):
                rest += await self.stream.receive_some(65536)
            self.buf = b""
        else:
            assert length is not None
            while len(rest) < length:
                rest += await self.stream.receive_some(65536)
            self.buf = rest[length:]
        return ttfb, time.perf_counter() - t0


def build_request(port: int, stream: bool, responses: bool | None = None) -> bytes:
    """A chat completion request, or with ``responses`` set a ``/v1/responses`` request
    (``responses`` is its ``store`` flag)."""
    if responses is None:
        path = b"/v1/chat/completions"
        payload: dict[str, object] = {
            "model": "bench",
            "stream": stream,
            "messages": [{"role": "user", "content": "hello " * 20}],
        }
    else:
        path = b"/v1/responses"
        payload = {"model": "bench", "input": "hello " * 20, "store": responses}
    body = json.dumps(payload, separators=(",", ":")).encode()
    return (
        b"POST %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
        b"content-type: application/json\r\nauthorization: Bearer bench-key\r\n"
        b"content-length: %d\r\n\r\n" % (path, port, len(body))
    ) + body


async def send_count(port: int, raw: bytes, concurrency: int, total: int) -> float:
    """Exactly ``total`` requests ``raw`` over ``concurrency`` keep-alive connections; the
    seconds taken (the fixed-count load of bench/tracing.py and bench/responses.py)."""
    left = [total]

    async def worker() -> None:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        conn = Conn(s)
        async with s:
            while left[0] > 0:
                left[0] -= 1
                await conn.request(raw)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return time.perf_counter() - t0


async def load(
    port: int, concurrency: int, seconds: float, stream: bool, responses: bool | None = None
) -> dict[str, float]:
    raw = build_request(port, stream, responses)
    lat: list[float] = []
    ttfbs: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        conn = Conn(s)
        async with s:
            while time.perf_counter() < deadline:
                ttfb, total = await conn.request(raw)
                lat.append(total)
                ttfbs.append(ttfb)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - t0
    lat.sort()
    ttfbs.sort()
    return {
        "rps": len(lat) / elapsed,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000,
        "ttfb_p50_ms": statistics.median(ttfbs) * 1000,
        "n": len(lat),
    }


async def send_for(
    port: int, concurrency: int, seconds: float, stream: bool, responses: bool | None = None
) -> int:
    """Requests over ``concurrency`` keep-alive connections for ``seconds``; how many."""
    return int((await load(port, concurrency, seconds, stream, responses))["n"])


K = TypeVar("K")  # a gateway's key in together()


async def together(
    gateways: dict[K, tuple[subprocess.Popen[bytes], int]],
    count: int,
    seconds: float,
    concurrency: int,
    stream: bool,
    responses: Callable[[K], bool | None] = lambda _: None,
) -> dict[K, list[tuple[float, float]]]:
    """Per gateway and round: (CPU µs per request, requests per second), every gateway loaded
    at the same time (each its own ``concurrency`` connections) for ``seconds`` per round: the
    machine's load then hits them alike at every instant, not just within a round.
    ``responses``: per gateway, ``/v1/responses`` requests and their ``store`` (see
    :func:`build_request`) instead of chat completions (None)."""
    results: dict[K, list[tuple[float, float]]] = {key: [] for key in gateways}

    async def one(key: K, got: dict[K, tuple[float, float]]) -> None:
        proc, port = gateways[key]
        before = cpu_ns(proc.pid)
        n = await send_for(port, concurrency, seconds, stream, responses(key))
        got[key] = ((cpu_ns(proc.pid) - before) / 1000 / max(n, 1), n / seconds)

    for r in range(count + 1):  # the first round warms up
        got: dict[K, tuple[float, float]] = {}
        async with trio.open_nursery() as nursery:
            for key in gateways:
                nursery.start_soon(one, key, got)
        if r:
            for key, figures in got.items():
                results[key].append(figures)
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    """Until something listens on ``port`` (a loaded machine takes seconds to start a
    gateway: two workers once took over 15 s)."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process and its children (workers) have used so far."""
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """:func:`cpu_seconds` as (user, system) time."""
    user = system = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
    return user, system


def cpu_ns(pid: int) -> int:
    """The process's CPU time so far, all threads, in nanoseconds."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that just ended
            total += int(Path(path).read_text().split()[0])
    return total


def paired(figures: dict[str, list[float]], name: str, base: str) -> str:
    """The median of per-round ratios (each against the same round's ``base``: the load
    drifts less within a round than across the run), with the quartiles."""
    ratios = [a / b for a, b in zip(figures[name], figures[base], strict=True)]
    q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{q2:.3f} [{q1:.3f}-{q3:.3f}]"


def reference_loop_ms() -> float:
    """CPU milliseconds of a fixed pure-Python loop in this process: how fast the machine runs
    Python right now. The shared 2-core machine drifts by up to ~1.8x over hours at the same
    load average (the same gateway measured 166 and 264 µs per request an hour apart), so a
    figure is only comparable with another one taken at a similar reference time."""
    start = time.process_time()
    x = 0
    for i in range(2_000_000):
        x += i * i
    return (time.process_time() - start) * 1000


def machine_state() -> str:
    """The load average and the reference loop (:func:`reference_loop_ms`), printed before and
    after every benchmark: a loaded or slow machine shows in its figures."""
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return f"load average {load}, reference loop {reference_loop_ms():.0f} ms"


def start_upstream() -> tuple[subprocess.Popen[bytes], int]:
    """The fake upstream in a process of its own: (the process, its port), once it listens."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--upstream", str(port)])
    wait_port(port)
    return proc, port


Gateways = dict[str, tuple[subprocess.Popen[bytes], int]]  # name -> (process, port)


async def interleave(
    gateways: Gateways,
    rounds: int,
    seconds: float,
    concurrency: int = 16,
    stream: bool = False,
    order: Callable[[int, list[str]], list[str]] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """Load every gateway in turn, ``rounds`` times, so that the machine's load hits them
    alike; per gateway, each round's :func:`load` figures plus ``cpu_us``, the gateway's own
    CPU time per request (``user_us`` + ``system_us``). ``order(round, names)`` says who goes
    when (default: the names rotated by one per round, so that no gateway always runs first)."""
    for _, port in gateways.values():  # warm-up: connections, caches
        await load(port, concurrency, 1.0, stream)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in gateways}
    for r in range(rounds):
        names = list(gateways)
        shift = r % len(names)
        for name in order(r, names) if order is not None else names[shift:] + names[:shift]:
            proc, port = gateways[name]
            user0, system0 = cpu_times(proc.pid)
            got = await load(port, concurrency, seconds, stream)
            user1, system1 = cpu_times(proc.pid)
            per = 1e6 / max(got["n"], 1)
            got["user_us"], got["system_us"] = (user1 - user0) * per, (system1 - system0) * per
            got["cpu_us"] = got["user_us"] + got["system_us"]
            results[name].append(got)
    return results


def start_gateway(
    config: dict[str, object],
    port: int,
    extra: list[str],
    workdir: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """The gateway as operators run it: access log on (info), written to a file."""
    cfg = Path(workdir) / f"config-{port}.json"
    cfg.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "onwards_trio", "-f", str(cfg), "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--no-watch", *extra]
    with open(Path(workdir) / f"gateway-{port}.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, stderr=log, stdout=log, cwd=workdir, env={**os.environ, **(env or {})}
        )
    wait_port(port)
    return proc


def traffic_control(
    upstream: str, token_limit: dict[str, object] | None = None
) -> dict[str, object]:
    """Auth (global and defined keys), key and pool limits, two weighted providers, fallback:
    every check on the hot path is exercised, none of them refuses (limits are generous).
    ``token_limit``: also a token limit on the pool and the key."""
    provider = {"url": upstream, "rate_limit": {"requests_per_second": 1e6, "burst_size": 10**6}}
    tokens = {"token_limit": token_limit} if token_limit is not None else {}
    return {
        "auth": {
            "global_keys": ["admin-key"],
            "key_definitions": {
                "bench": {
                    "key": "bench-key",
                    "rate_limit": {"requests_per_second": 1e6, "burst_size": 10**6},
                    "concurrency_limit": {"max_concurrent_requests": 10_000},
                    "labels": {"team": "bench"},
                    **tokens,
                }
            },
        },
        "targets": {
            "bench": {
                "keys": ["bench"],
                "rate_limit": {"requests_per_second": 1e6, "burst_size": 10**6},
                "concurrency_limit": {"max_concurrent_requests": 10_000},
                "fallback": {"enabled": True, "on_status": [5]},
                "routing_rules": [{"match_labels": {"team": "x"}, "action": {"type": "deny"}}],
                "providers": [{**provider, "weight": 3}, {**provider, "weight": 1}],
                **tokens,
            }
        },
    }


Scenario = tuple[str, int, bool, "bool | None"]  # label, concurrency, stream, responses store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()

    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    procs = [subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)])]
    rows: list[tuple[str, dict[str, float] | None, dict[str, float], float]] = []
    rss: dict[str, float] = {}
    workdir = tempfile.mkdtemp(prefix="onwards-bench-")
    load_before = machine_state()

    async def measure(gateway: subprocess.Popen[bytes], port: int, plan: list[Scenario]) -> None:
        await load(port, 16, 1.0, False, plan[0][3])  # warm-up (connections, caches)
        for label, conc, stream, responses in plan:
            direct = await load(up_port, conc, args.seconds, stream) if responses is None else None
            cpu0 = cpu_seconds(gateway.pid)
            via = await load(port, conc, args.seconds, stream, responses)
            cpu_ms = (cpu_seconds(gateway.pid) - cpu0) * 1000 / max(via["n"], 1)
            rows.append((label, direct, via, cpu_ms))

    def run(
        name: str,
        config: dict[str, object],
        extra: list[str],
        plan: list[Scenario],
        env: dict[str, str] | None = None,
    ) -> None:
        port = free_port()
        gateway = start_gateway(config, port, extra, workdir, env)
        procs.append(gateway)
        trio.run(measure, gateway, port, plan)
        if "--workers" not in extra:
            rss[name] = peak_rss_mb(gateway.pid)
        gateway.terminate()
        gateway.wait(timeout=10)

    try:
        wait_port(up_port)
        plain = {"targets": {"bench": {"url": upstream}}}
        events = f"streaming ({SSE_EVENTS} events)"
        run(
            "plain",
            plain,
            ["--no-metrics"],
            [
                ("non-streaming c=1", 1, False, None),
                ("non-streaming c=16", 16, False, None),
                ("non-streaming c=64", 64, False, None),
                (f"{events} c=16", 16, True, None),
            ],
        )
        run(
            "2 workers",
            plain,
            ["--no-metrics", "--workers", "2"],
            [("non-streaming c=64, 2 workers", 64, False, None)],
        )
        run(
            "plain, access log off",
            plain,
            ["--no-metrics", "--log-level", "warning"],
            [("non-streaming c=16, access log off", 16, False, None)],
        )
        run(
            "traffic control",
            traffic_control(upstream),
            ["--metrics-port", str(free_port())],
            [
                ("auth+limits+LB+metrics, non-streaming c=1", 1, False, None),
                ("auth+limits+LB+metrics, non-streaming c=16", 16, False, None),
            ],
        )
        # The same with token limits on the pool and the key (generous: none refuses), so the
        # reservation, the usage scan and the settlement are what the two rows differ by.
        run(
            "token limits",
            traffic_control(upstream, {"tokens": 10**12, "window_secs": 60}),
            ["--metrics-port", str(free_port())],
            [("auth+limits+LB+metrics+token limits, c=16", 16, False, None)],
        )
        adapter = {
            "store": {"kind": "sqlite", "path": str(Path(workdir) / "bench.sqlite3")},
            "targets": {"bench": {"url": upstream, "open_responses": {"adapter": True}}},
        }
        run(
            "/v1/responses",
            adapter,
            ["--no-metrics"],
            [
                ("/v1/responses store:false c=16", 16, False, False),
                ("/v1/responses stored (SQLite) c=16", 16, False, True),
            ],
        )
        # The same on PostgreSQL, when a server is at hand (.ci/postgres.sh prints a DSN).
        dsn = os.environ.get("ONWARDS_BENCH_POSTGRES_DSN") or os.environ.get(
            "ONWARDS_TEST_POSTGRES_DSN"
        )
        if dsn:
            run(
                "/v1/responses PostgreSQL",
                {**adapter, "store": {"kind": "postgres", "dsn": dsn}},
                ["--no-metrics"],
                [
                    ("/v1/responses store:false c=16 (PG run)", 16, False, False),
                    ("/v1/responses stored (PostgreSQL) c=16", 16, False, True),
                ],
            )
        # Every request traced, exported over OTLP/HTTP; the fake upstream doubles as the
        # collector (it answers the export POSTs with 200). Compare with the plain rows.
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{up_port}"}
        run(
            "tracing on",
            plain,
            ["--no-metrics"],
            [
                ("tracing on (100%), non-streaming c=16", 16, False, None),
                (f"tracing on (100%), {events} c=16", 16, True, None),
            ],
            {**otel, "OTEL_TRACES_SAMPLER": "always_on"},
        )
        run(
            "tracing 10%",
            plain,
            ["--no-metrics"],
            [("tracing on (10% sampled), non-streaming c=16", 16, False, None)],
            {
                **otel,
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.1",
            },
        )

        print(
            f"\nonwards_trio proxy benchmark ({os.cpu_count()} cores, {args.seconds:.0f}s per row, "
            f"machine before: {load_before}, machine after: {machine_state()})"
        )
        print(
            f"{'scenario':44} {'gateway req/s':>13} {'direct req/s':>12} {'ratio':>6} "
            f"{'CPU ms/req':>10} {'added p50 ms':>12} {'added p99 ms':>12} {'ttfb p50 ms':>11}"
        )
        for name, d, v, cpu_ms in rows:
            base = d or {"rps": float("nan"), "p50_ms": 0.0, "p99_ms": 0.0}
            print(
                f"{name:44} {v['rps']:13.0f} {base['rps']:12.0f} {v['rps'] / base['rps']:6.2f} "
                f"{cpu_ms:10.3f} {v['p50_ms'] - base['p50_ms']:12.2f} "
                f"{v['p99_ms'] - base['p99_ms']:12.2f} {v['ttfb_p50_ms']:11.2f}"
            )
        print("(/v1/responses rows: latency columns are absolute; there is no direct equivalent)")
        for label, mb in rss.items():
            print(f"gateway peak RSS ({label}): {mb:.1f} MiB")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--upstream":
        upstream_main(int(sys.argv[2]))
    elif sys.argv[1:] == ["--machine"]:
        print(f"machine: {machine_state()}")
    else:
        main()
