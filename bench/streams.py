"""Many long streams through one gateway process: memory per stream, added event delay, and
the gateway's CPU per relayed event.

Three processes besides this one: a fake upstream that holds every stream open and sends one
SSE event per ``--interval`` to each (one ticker for all streams; each event carries its send
time), the gateway (``python -m onwards_trio``, one process, access log on, written to a file)
and a client, which opens ``--streams`` streaming chat requests and records, per event, how
long after its send time it arrived. The upstream and the client are plain ``selectors`` loops
over non-blocking sockets, not Trio: at 10,000 streams and one event per 100 ms that is
100,000 events a second on each side, and the load generator must not be what saturates the
two cores. The same client first measures the upstream directly, so the "added" delay is the
gateway's share.

The gateway's CPU per relayed event (its own CPU time while the client reads, over the events
the client got) says how many such streams one core can carry at all: a gateway that needs
``c`` µs per event saturates a core at ``1e6 / c`` events a second, i.e. ``1e5 / c`` streams
at one event per 100 ms. Past that point the added delay is queueing, whatever the code.

The process file limit here is 20,000 descriptors and cannot be raised; the gateway holds two
per stream (client side and upstream side), so one gateway process can hold about 9,900
streams. ``--streams`` takes a comma-separated sweep (default ``1000,3000,9000``); each count
gets a fresh gateway.

Run: ``nox -s bench -- streams`` or ``python bench/streams.py [--streams N,M] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import cpu_seconds, free_port, load_average, wait_port

_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def upstream_main(port: int, interval: float) -> None:
    """Hold every stream; every ``interval`` send each one event stamped with the send time."""
    sel = selectors.DefaultSelector()
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    pending: dict[socket.socket, bytes] = {}
    streams: list[socket.socket] = []
    n = 0
    next_tick = time.monotonic() + interval
    while True:
        for key, _ in sel.select(max(0.0, next_tick - time.monotonic())):
            if key.fileobj is listener:
                for _ in range(256):
                    try:
                        conn, _addr = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    pending[conn] = b""
                    sel.register(conn, selectors.EVENT_READ, None)
                continue
            conn = key.fileobj  # type: ignore[assignment]
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                pending.pop(conn, None)
                if conn in streams:
                    streams.remove(conn)
                conn.close()
                continue
            if conn in pending:
                buf = pending[conn] + data
                if b"\r\n\r\n" in buf:
                    del pending[conn]
                    conn.send(_HEAD)
                    streams.append(conn)
                else:
                    pending[conn] = buf
        if time.monotonic() >= next_tick:
            next_tick += interval
            n += 1
            payload = json.dumps(
                {"choices": [{"index": 0, "delta": {"content": "x"}}], "t": time.time(), "n": n}
            ).encode()
            event = b"data: " + payload + b"\n\n"
            chunk = b"%x\r\n%s\r\n" % (len(event), event)
            for conn in streams:
                try:
                    conn.send(chunk)  # a few dozen bytes: the socket buffer always has room
                except OSError:
                    continue  # closed: its read side unregisters it


def client_main(port: int, n: int, seconds: float) -> None:
    """Open ``n`` streams, then read them for ``seconds``; print the delays' summary as JSON."""
    body = json.dumps({"model": "bench", "stream": True, "messages": []}).encode()
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    sel = selectors.DefaultSelector()
    bufs: dict[socket.socket, bytes] = {}
    broken = 0
    opening_ends = time.monotonic() + 60  # a saturated gateway accepts slowly: stop opening
    for i in range(n):
        if time.monotonic() > opening_ends:
            broken += n - i  # never opened: counted as broken
            break
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            conn.sendall(raw)
        except OSError:
            broken += 1
            continue
        conn.setblocking(False)
        bufs[conn] = b""
        sel.register(conn, selectors.EVENT_READ, None)
    delays: list[float] = []
    warm = time.monotonic() + min(2.0, seconds / 5)  # let every stream get its head first
    end = warm + seconds
    while (now_m := time.monotonic()) < end:
        counting = now_m >= warm
        for key, _ in sel.select(end - now_m):
            conn = key.fileobj  # type: ignore[assignment]
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                conn.close()
                del bufs[conn]
                broken += 1
                continue
            now = time.time()
            buf = bufs[conn] + data
            i = buf.find(b'"t": ')
            while i >= 0:
                j = buf.find(b",", i)
                if j < 0:
                    break
                if counting:
                    delays.append(now - float(buf[i + 5 : j]))
                buf = buf[j:]
                i = buf.find(b'"t": ')
            bufs[conn] = buf[-64:]
    delays.sort()

    def q(f: float) -> float:
        return delays[min(len(delays) - 1, int(len(delays) * f))] * 1000 if delays else -1.0

    print(
        json.dumps(
            {
                "events": len(delays),
                "p50": statistics.median(delays) * 1000 if delays else -1.0,
                "p99": q(0.99),
                "broken": broken,
            }
        )
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_client(port: int, n: int, seconds: float, gateway: int | None = None) -> dict[str, float]:
    """Run the client process; while it reads, sample the gateway's RSS and CPU time."""
    client = subprocess.Popen(
        [sys.executable, __file__, "--client", str(port), str(n), str(seconds)],
        stdout=subprocess.PIPE,
    )
    peak = cpu0 = 0.0
    if gateway is not None:
        t_read = time.monotonic() + min(2.0, seconds / 5)
        while client.poll() is None:
            peak = max(peak, rss_kib(gateway))
            if not cpu0 and time.monotonic() >= t_read:
                cpu0 = cpu_seconds(gateway)
            time.sleep(0.25)
    out, _ = client.communicate(timeout=seconds + 600)
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    if gateway is not None:
        result["cpu"] = cpu_seconds(gateway) - cpu0
        result["peak"] = peak
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1000,3000,9000")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    counts = [int(c) for c in args.streams.split(",")]
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, __file__, "--upstream", str(up_port), str(args.interval)]
    )
    workdir = tempfile.mkdtemp(prefix="onwards-streams-")
    cfg = Path(workdir) / "config.json"
    cfg.write_text(json.dumps({"targets": {"bench": {"url": f"http://127.0.0.1:{up_port}/v1"}}}))
    before = load_average()
    rows = []
    try:
        wait_port(up_port)
        for n in counts:
            direct = run_client(up_port, n, args.seconds)
            port = free_port()
            cmd = [sys.executable, "-m", "onwards_trio", "-f", str(cfg), "--port", str(port),
                   "--host", "127.0.0.1", "--no-watch", "--no-metrics"]  # fmt: skip
            with open(Path(workdir) / f"gateway-{n}.log", "wb") as log:
                gateway = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=workdir)
            try:
                wait_port(port)
                idle = rss_kib(gateway.pid)
                through = run_client(port, n, args.seconds, gateway.pid)
            finally:
                gateway.terminate()
                gateway.wait(timeout=30)
            rows.append((n, direct, through, idle))
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)

    print(
        f"\none event per {args.interval * 1000:.0f} ms per stream, {args.seconds:.0f} s read; "
        f"load average before {before}, after {load_average()}"
    )
    print(
        f"{'streams':>8} {'events/s':>9} {'direct p99':>11} {'gw p50':>8} {'gw p99':>8} "
        f"{'added p99':>10} {'broken':>7} {'gw CPU/event':>13} {'KiB/stream':>11}"
    )
    for n, direct, through, idle in rows:
        events = max(through["events"], 1)
        print(
            f"{n:8d} {through['events'] / args.seconds:9.0f} {direct['p99']:9.1f}ms "
            f"{through['p50']:6.1f}ms {through['p99']:6.1f}ms "
            f"{through['p99'] - direct['p99']:8.1f}ms {int(through['broken']):7d} "
            f"{through['cpu'] / events * 1e6:11.1f}µs {(through['peak'] - idle) / n:11.1f}"
        )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--upstream":
        upstream_main(int(sys.argv[2]), float(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
