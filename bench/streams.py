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
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import cpu_times, free_port, machine_state, wait_port

_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def upstream_main(port: int, interval: float, stagger: bool = False) -> None:
    """Hold every stream; every ``interval`` send each one event stamped with the send time:
    all at once (a burst, as many model streams in step would), or with ``stagger`` spread
    evenly over the interval, so that a relay meets each event on its own (one wake-up per
    event, whatever its speed: what makes instruction counts comparable)."""
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
            n += 1
            if stagger and streams:
                next_tick += interval / len(streams)
                turn = streams[n % len(streams) : n % len(streams) + 1]
            else:
                next_tick += interval
                turn = streams
            payload = json.dumps(
                {"choices": [{"index": 0, "delta": {"content": "x"}}], "t": time.time(), "n": n}
            ).encode()
            event = b"data: " + payload + b"\n\n"
            chunk = b"%x\r\n%s\r\n" % (len(event), event)
            for conn in turn:
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
    counting = False
    while (now_m := time.monotonic()) < end:
        if not counting and now_m >= warm:
            counting = True
            print("counting", flush=True)  # the parent's CPU (or instruction) window opens
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


def relay_main(port: int, up_port: int, lean: bool) -> None:
    """The floor: a bare Trio relay with no gateway in it. Per connection: read the request
    (head and content-length body), connect to the upstream, send it the request, then loop
    ``receive_some``/``send_all`` from the upstream to the client, bytes untouched (the
    upstream's chunked framing passes through). Nothing is parsed, counted or watched, so its
    CPU per event is what any Trio process pays to relay one event: a task woken from epoll,
    one read, one write. ``lean``: the gateway's own socket calls (``SocketIO``: wait for the
    upstream socket, then read; a write the kernel takes at once costs no schedule point)
    instead of ``trio.SocketStream``'s (a read tried first, and a schedule point per call)."""
    import trio  # only this process runs Trio

    from onwards_trio._transport.sockio import SocketIO

    async def handle(client: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await client.receive_some(65536)
            if not data:
                return
            buf += data
        head, _, body = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(body) < length:
            data = await client.receive_some(65536)
            if not data:
                return
            body += data
        upstream = await trio.open_tcp_stream("127.0.0.1", up_port)
        async with upstream:
            await upstream.send_all(buf)
            receive: Callable[[int], Awaitable[bytes]] = upstream.receive_some
            send: SocketIO | trio.SocketStream = client
            if lean:
                receive = SocketIO(upstream.socket).receive_when_ready
                send = SocketIO(client.socket)
            try:
                while data := await receive(65536):
                    await send.send_all(data)
            except (trio.BrokenResourceError, OSError):
                return  # the client left

    trio.run(partial(trio.serve_tcp, handle, port, host="127.0.0.1", backlog=4096))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_client(
    port: int, n: int, seconds: float, relay: int | None = None, callgrind: bool = False
) -> dict[str, float]:
    """Run the client process; while it counts events, sample the relay's RSS and CPU time
    (``callgrind``: the relay runs under callgrind, which counts its instructions only then)."""
    client = subprocess.Popen(
        [sys.executable, __file__, "--client", str(port), str(n), str(seconds)],
        stdout=subprocess.PIPE,
    )
    assert client.stdout is not None
    peak = 0.0
    cpu0 = (0.0, 0.0)
    if relay is not None:
        client.stdout.readline()  # "counting": every stream is open and warm
        cpu0 = cpu_times(relay)
        if callgrind:
            subprocess.run(["callgrind_control", "-i", "on", str(relay)], capture_output=True)
        while client.poll() is None:
            peak = max(peak, rss_kib(relay))
            time.sleep(0.25)
        if callgrind:
            subprocess.run(["callgrind_control", "-i", "off", str(relay)], capture_output=True)
    out, _ = client.communicate(timeout=seconds + 600)
    lines = out.decode().strip().splitlines()
    if client.returncode or not lines or not lines[-1].startswith("{"):
        return {}  # the client failed (its error is on stderr)
    result: dict[str, float] = json.loads(lines[-1])
    if relay is not None:
        user, system = cpu_times(relay)
        result["cpu"] = user + system - sum(cpu0)
        result["system"] = system - cpu0[1]
        result["peak"] = peak
    return result


def instructions(path: Path) -> int:
    """The instructions a callgrind output file counted (its ``totals:`` or ``summary:``)."""
    total = 0
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            total = max(total, int(line.split()[1]))
    return total


VARIANTS = ("bare trio relay", "bare relay (SocketIO)", "gateway")


def start_variant(
    variant: str, up_port: int, port: int, workdir: str, before: str | None, prefix: list[str]
) -> subprocess.Popen[bytes]:
    """One relay under test, listening on ``port``: a bare relay, or the gateway (from
    ``before``, another checkout, for the ``before:`` variant); ``prefix`` runs it under a
    tool (callgrind)."""
    if variant.startswith("bare"):
        mode = "lean" if "SocketIO" in variant else "trio"
        cmd = [*prefix, sys.executable, __file__, "--relay", str(port), str(up_port), mode]
        return subprocess.Popen(cmd)
    cfg = Path(workdir) / "config.json"
    cfg.write_text(json.dumps({"targets": {"bench": {"url": f"http://127.0.0.1:{up_port}/v1"}}}))
    cmd = [*prefix, sys.executable, "-m", "onwards_trio", "-f", str(cfg), "--port", str(port),
           "--host", "127.0.0.1", "--no-watch", "--no-metrics"]  # fmt: skip
    env = None
    if variant.startswith("before"):
        env = {**os.environ, "PYTHONPATH": os.path.abspath(before or ".")}
    name = variant.replace(" ", "-").replace(":", "")
    with open(Path(workdir) / f"{name}-{port}.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=log, cwd=workdir, env=env)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1000,3000,9000")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, of: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--before", help="a checkout of the code to compare with (same counts)")
    parser.add_argument(
        "--stagger",
        action="store_true",
        help="spread each stream's events over the interval instead of one burst per interval",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="run each relay under callgrind and report instructions per event (user space "
        "only; a figure independent of the machine's load, for a few streams: callgrind is "
        "~50x slower); implies --stagger",
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.streams.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.before:
        variants.append("before: gateway")
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, __file__, "--upstream", str(up_port), str(args.interval)]
        + (["stagger"] if args.callgrind or args.stagger else [])
    )
    workdir = tempfile.mkdtemp(prefix="onwards-streams-")
    before = machine_state()
    print(
        f"one event per {args.interval * 1000:.0f} ms per stream"
        f"{', staggered' if args.callgrind or args.stagger else ', in one burst'}, "
        f"{args.seconds:.0f} s read; "
        f"{'CPU/event: thousands of instructions (callgrind); ' if args.callgrind else ''}"
        f"machine before: {before}",
        flush=True,
    )
    print(
        f"{'streams':>8} {'relay':22} {'events/s':>9} {'direct p99':>11} {'p50':>8} "
        f"{'p99':>8} {'added p99':>10} {'broken':>7} {'CPU/event':>10} {'kernel':>7} "
        f"{'KiB/stream':>11}",
        flush=True,
    )
    cpu: dict[tuple[int, str], list[float]] = {}
    try:
        wait_port(up_port)
        for turn, n in enumerate(counts):
            direct = run_client(up_port, n, args.seconds)
            shift = turn % len(variants)  # the order rotates from one count to the next
            for variant in variants[shift:] + variants[:shift]:
                port = free_port()
                out = Path(workdir) / f"callgrind-{port}.out"
                prefix = []
                if args.callgrind:
                    prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                              f"--callgrind-out-file={out}"]  # fmt: skip
                relay = start_variant(variant, up_port, port, workdir, args.before, prefix)
                try:
                    wait_port(port, timeout=600)
                    idle = rss_kib(relay.pid)
                    through = run_client(port, n, args.seconds, relay.pid, args.callgrind)
                finally:
                    relay.terminate()
                    relay.wait(timeout=120)
                if not through or not direct:
                    print(f"{n:8d} {variant:22} (a client failed: no figures)", flush=True)
                    continue
                events = max(through["events"], 1)
                per_event = through["cpu"] / events * 1e6
                if args.callgrind:  # thousands of instructions per event, in place of CPU µs
                    per_event = instructions(out) / events / 1000
                cpu.setdefault((n, variant), []).append(per_event)
                print(
                    f"{n:8d} {variant:22} {through['events'] / args.seconds:9.0f} "
                    f"{direct['p99']:9.1f}ms {through['p50']:6.1f}ms {through['p99']:6.1f}ms "
                    f"{through['p99'] - direct['p99']:8.1f}ms {int(through['broken']):7d} "
                    f"{per_event:8.1f}µs {through['system'] / events * 1e6:5.1f}µs "
                    f"{(through['peak'] - idle) / n:11.1f}",
                    flush=True,
                )
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)

    print(f"machine after: {machine_state()}")
    med = {key: statistics.median(values) for key, values in cpu.items()}
    floor = next((v for v in variants if v.startswith("bare")), None)
    for n in sorted(set(counts)):
        ratios = []
        if floor is not None and (n, "gateway") in med and (n, floor) in med:
            ratios.append(f"gateway / {floor} {med[n, 'gateway'] / med[n, floor]:.2f}x")
        if (n, "before: gateway") in med and (n, "gateway") in med:
            ratios.append(f"gateway / before {med[n, 'gateway'] / med[n, 'before: gateway']:.2f}x")
        if ratios:
            print(f"{n:8d} CPU per event (median of {counts.count(n)}): " + ", ".join(ratios))


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--upstream":
        upstream_main(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:] == ["stagger"])
    elif len(sys.argv) == 5 and sys.argv[1] == "--relay":
        relay_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "lean")
    elif len(sys.argv) == 5 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
