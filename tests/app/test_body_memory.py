"""The slow-body attack against a real gateway process: many connections each send most of a
large body and then stall. The global budget for buffered bodies (``body_buffer_limit_bytes``)
refuses the crowd past it (503 + ``Retry-After``), so the process's RSS stays under the
budget plus 100 MB, and what the crowd held is given back when it leaves.

Scaled down to run in seconds: a 32 MiB budget, 8 MiB bodies, 16 connections (128 MiB would
be held without the budget). The peak is the kernel's high-water mark of the process
(``VmHWM`` in ``/proc/<pid>/status``): no sampling can miss it, however loaded the machine."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import orjson
import pytest
import trio

MIB = 1 << 20
BUDGET = 32 * MIB
BODY = 8 * MIB
HELD_AT_MOST = 4  # four bodies of BODY - STALL bytes fit the budget, a fifth does not
CROWD = 16
STALL = 1000  # bytes of each body held back

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


def body_of(size: int) -> bytes:
    prefix = b'{"model":"m","messages":[],"pad":"'
    return prefix + b"x" * (size - len(prefix) - 2) + b'"}'


def head(length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % length
    )


def status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, text
    return int(match.group(1))


def open_client_sockets(port: int) -> int:
    """The gateway's sockets of clients on ``port`` still open on its side (established, or
    closed by the client and not yet by the gateway)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if int(local.rsplit(":", 1)[1], 16) == port and state in ("01", "08"):
            count += 1
    return count


async def sink(nursery: trio.Nursery) -> str:
    """An upstream that reads each request body and answers 200 (fake upstreams served
    through h11 take seconds per tens of MiB)."""

    async def handler(stream: trio.SocketStream) -> None:
        data = bytearray()
        with contextlib.suppress(trio.BrokenResourceError):
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return
                    data += chunk
                end = data.index(b"\r\n\r\n") + 4
                declared = re.search(rb"content-length: *(\d+)", data[:end].lower())
                assert declared is not None
                length = int(declared[1])
                while len(data) < end + length:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return
                    data += chunk
                del data[: end + length]
                answer = b'{"ok":true}'
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(answer), answer)
                )

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


class Gateway:
    """``onwards-trio serve`` in a child process (the config allows one body as large as
    the whole budget); its output is drained into ``output``."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.output = bytearray()
        self.port = 0

    @classmethod
    async def start(cls, nursery: trio.Nursery, tmp_path: Path) -> Gateway:
        config = {
            "targets": {"m": {"url": await sink(nursery)}},
            "body_limit_bytes": BUDGET,
            "body_buffer_limit_bytes": BUDGET,
            "store": {"kind": "memory"},
        }
        (tmp_path / "config.json").write_bytes(orjson.dumps(config))
        argv = [sys.executable, "-m", "onwards_trio", "serve", "-f", "config.json"]
        argv += ["--host", "127.0.0.1", "--port", "0", "--no-metrics", "--no-watch"]
        proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path
        )
        gateway = cls(proc)
        await nursery.start(gateway._drain)
        return gateway

    async def _drain(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.proc.stdout is not None
        with trio.fail_after(60):
            while not self.port:
                chunk = await self.proc.stdout.receive_some()
                assert chunk, f"the gateway exited: {bytes(self.output)!r}"
                self.output += chunk
                found = re.search(rb"listening on http://127\.0\.0\.1:(\d+)", self.output)
                self.port = int(found.group(1)) if found else 0
        task_status.started()
        with contextlib.suppress(trio.ClosedResourceError):
            while chunk := await self.proc.stdout.receive_some():
                self.output += chunk

    async def stop(self) -> None:
        """Ctrl-C, as an operator would; killed if it does not exit in time."""
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                self.proc.send_signal(signal.SIGINT)
            with trio.move_on_after(30):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
            assert self.proc.stdout is not None
            await self.proc.stdout.aclose()

    def peak_bytes(self) -> int:
        return status_kib(self.proc.pid, "VmHWM") * 1024


async def status_of(stream: trio.SocketStream) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head_bytes = data.partition(b"\r\n\r\n")[0].lower()
    return int(head_bytes.split()[1]), head_bytes


class Crowd:
    """``CROWD`` connections, each sending all of a ``BODY`` but its last ``STALL`` bytes."""

    def __init__(self) -> None:
        self.streams: list[trio.SocketStream] = []
        self.answers: dict[int, tuple[int, bytes]] = {}
        self.sent: set[int] = set()
        self._scope = trio.CancelScope()
        self._gone = trio.Event()

    async def attack(self, nursery: trio.Nursery, port: int) -> None:
        """Start the crowd; return once it settled: at least ``CROWD - HELD_AT_MOST`` are
        refused (the budget cannot hold more) and every other one has sent its bytes."""
        for _ in range(CROWD):
            self.streams.append(await trio.open_tcp_stream("127.0.0.1", port))
        nursery.start_soon(self._run)
        with trio.fail_after(120):
            while (
                len(self.answers) < CROWD - HELD_AT_MOST
                or len(self.sent | set(self.answers)) < CROWD
            ):
                await trio.sleep(0.02)

    async def _run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for i in range(CROWD):
                        nursery.start_soon(self._one, i)
        finally:
            self._gone.set()

    async def _one(self, i: int) -> None:
        stream = self.streams[i]
        async with trio.open_nursery() as inner:
            inner.start_soon(self._send, i)
            try:
                self.answers[i] = await status_of(stream)
            except trio.BrokenResourceError:
                self.answers[i] = (0, b"reset")
            inner.cancel_scope.cancel()

    async def _send(self, i: int) -> None:
        try:
            await self.streams[i].send_all(head(BODY) + body_of(BODY)[:-STALL])
        except trio.BrokenResourceError:
            return  # refused: the gateway stopped reading
        self.sent.add(i)

    @property
    def held(self) -> list[int]:
        return [i for i in range(CROWD) if i not in self.answers]

    async def close(self) -> None:
        """Stop the crowd's tasks, then hang up every connection (mid-body for the held)."""
        self._scope.cancel()
        if self.streams:
            await self._gone.wait()
        for stream in self.streams:
            await stream.aclose()


async def test_a_crowd_of_stalled_bodies_is_refused_past_the_budget_and_rss_stays_under_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    gateway = await Gateway.start(nursery, tmp_path)
    crowd = Crowd()
    try:
        await crowd.attack(nursery, gateway.port)
        refused = list(crowd.answers.values())
        assert all(s == 503 and b"\r\nretry-after: 1\r\n" in h + b"\r\n" for s, h in refused)
        # The stalled ones end one after the other: each is answered (the budget held them).
        for i in crowd.held:
            await crowd.streams[i].send_all(body_of(BODY)[-STALL:])
            with trio.fail_after(60):
                while i not in crowd.answers:
                    await trio.sleep(0.02)
        assert 1 <= sum(s == 200 for s, _ in crowd.answers.values()) <= HELD_AT_MOST
        peak = gateway.peak_bytes()
        assert peak < BUDGET + 100_000_000, f"peak RSS {peak / MIB:.0f} MiB"
    finally:
        try:
            await crowd.close()
        finally:
            await gateway.stop()  # also when closing the crowd failed: no gateway outlives it


async def test_a_crowd_that_leaves_mid_body_gives_back_its_budget_and_sockets(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    gateway = await Gateway.start(nursery, tmp_path)
    crowd = Crowd()
    try:
        await crowd.attack(nursery, gateway.port)
        assert crowd.held
        await crowd.close()
        with trio.fail_after(60):
            while open_client_sockets(gateway.port):
                await trio.sleep(0.05)
        # One body as large as the whole budget fits only if none of it is still counted.
        async with await trio.open_tcp_stream("127.0.0.1", gateway.port) as stream:
            await stream.send_all(head(BUDGET) + body_of(BUDGET))
            with trio.fail_after(60):
                status, _ = await status_of(stream)
        assert status == 200
    finally:
        try:
            await crowd.close()
        finally:
            await gateway.stop()  # also when closing the crowd failed: no gateway outlives it
