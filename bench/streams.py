"""Many long streams through one gateway process: memory per stream and added event delay.

Three processes: a fake upstream that holds every stream open and sends one SSE event per
``--interval`` to each (one ticker for all streams; each event carries its send time), the
gateway (``python -m onwards_trio``, one process, access log on, written to a file) and this
client, which opens ``--streams`` streaming chat requests and records, per event, how long
after its send time it arrived. The same client first measures the upstream directly, so the
"added" delay is the gateway's share.

The process file limit here is 20,000 descriptors and cannot be raised; the gateway holds two
per stream (client side and upstream side), so one gateway process can hold about 9,900
streams. The default is 9,000.

Run: ``nox -s bench -- streams`` or ``python bench/streams.py [--streams N] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trio.lowlevel
from proxy import free_port, load_average, wait_port


def upstream_main(port: int, interval: float, seconds: float) -> None:
    streams: set[trio.SocketStream] = set()
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        await stream.send_all(head)
        streams.add(stream)
        try:
            await trio.sleep(seconds + 30)  # the ticker writes; this task only holds on
        finally:
            streams.discard(stream)

    async def ticker() -> None:
        n = 0
        while True:
            await trio.sleep(interval)
            n += 1
            payload = json.dumps(
                {"choices": [{"index": 0, "delta": {"content": "x"}}], "t": time.time(), "n": n}
            ).encode()
            event = b"data: " + payload + b"\n\n"
            chunk = b"%x\r\n%s\r\n" % (len(event), event)
            for stream in list(streams):
                try:
                    await stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    streams.discard(stream)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.serve_tcp(handle, port, host="127.0.0.1", backlog=4096)

    trio.run(main)


async def clients(port: int, n: int, seconds: float) -> tuple[list[float], int]:
    """Open ``n`` streams, read them for ``seconds``; return every event's delay (seconds) and
    how many streams broke (reset or refused) before their time was up."""
    body = json.dumps({"model": "bench", "stream": True, "messages": []}).encode()
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    delays: list[float] = []
    broken = 0
    opened = 0
    start_reading = trio.Event()

    async def one() -> None:
        nonlocal opened
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            opened += 1
            if opened == n:
                start_reading.set()
            end = None
            buf = b""
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                now = time.time()
                if end is None and start_reading.is_set():
                    end = now + seconds
                buf += data
                while b'"t": ' in buf:
                    i = buf.index(b'"t": ') + 5
                    j = buf.index(b",", i)
                    if start_reading.is_set():
                        delays.append(now - float(buf[i:j]))
                    buf = buf[j:]
                if end is not None and now > end:
                    return

    limiter = trio.CapacityLimiter(500)  # pace the connects (the listen backlog is finite)

    async def paced() -> None:
        nonlocal broken, opened
        async with limiter:
            await trio.lowlevel.checkpoint()
        try:
            await one()
        except (OSError, trio.BrokenResourceError):
            broken += 1
            opened += 1
            if opened == n:
                start_reading.set()

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(paced)
    return delays, broken


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=9000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    up_port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--upstream",
                str(up_port),
                str(args.interval),
                str(args.seconds * 3),
            ]
        )
    ]
    workdir = tempfile.mkdtemp(prefix="onwards-streams-")
    before = load_average()
    try:
        wait_port(up_port)
        direct = trio.run(clients, up_port, args.streams, args.seconds)
        port = free_port()
        cfg = Path(workdir) / "config.json"
        cfg.write_text(
            json.dumps({"targets": {"bench": {"url": f"http://127.0.0.1:{up_port}/v1"}}})
        )
        cmd = [sys.executable, "-m", "onwards_trio", "-f", str(cfg), "--port", str(port),
               "--host", "127.0.0.1", "--no-watch", "--no-metrics"]  # fmt: skip
        with open(Path(workdir) / "gateway.log", "wb") as log:
            gateway = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=workdir)
        procs.append(gateway)
        wait_port(port)
        idle = rss_kib(gateway.pid)
        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_kib(gateway.pid))
                await trio.sleep(0.5)

        async def via_gateway() -> tuple[list[float], int]:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                result = await clients(port, args.streams, args.seconds)
                nursery.cancel_scope.cancel()
            return result

        through = trio.run(via_gateway)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)

    def q(values: list[float], f: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(len(values) * f))] * 1000 if values else float("nan")

    print(
        f"\n{args.streams} streams, one event per {args.interval * 1000:.0f} ms each, "
        f"{args.seconds:.0f} s; load average before {before}, after {load_average()}"
    )
    print(f"{'':22} {'events':>9} {'delay p50 ms':>13} {'delay p99 ms':>13} {'broken':>7}")
    for name, (d, broken) in (("direct", direct), ("through the gateway", through)):
        p50 = statistics.median(d) * 1000 if d else float("nan")
        print(f"{name:22} {len(d):9d} {p50:13.2f} {q(d, 0.99):13.2f} {broken:7d}")
    print(f"added delay p99: {q(through[0], 0.99) - q(direct[0], 0.99):.2f} ms")
    print(
        f"gateway RSS: idle {idle / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
        f"{(peak - idle) / max(args.streams, 1):.1f} KiB per stream"
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--upstream":
        upstream_main(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
