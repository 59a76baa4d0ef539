"""Socket reads and writes for the HTTP hot path that wait (and yield) only when they must.

Why: trio's ``SocketStream.send_all``/``receive_some`` make every call a full checkpoint — a
schedule point even when the kernel had the bytes ready — plus a conflict detector and a
context manager per call. That is many times the system call itself, and a proxied request
makes five or six of them (two on the client's socket, three or four on the upstream's).
Here a call tries the system call first and waits (``wait_readable``/``wait_writable``, a
real checkpoint) only when the kernel says it would block.

Trio's guarantees are kept where they matter: cancellation is checked on every call
(``checkpoint_if_cancelled``), a socket closed by another task wakes a waiting call with
``ClosedResourceError`` (and a later call fails with ``OSError``), and every ``_FAIR``-th call
in a row that did not wait yields anyway, so a connection whose peer is always ready cannot
starve the others. Two tasks waiting on one socket in the same direction still raise
``BusyResourceError``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

import trio

__all__ = ["SocketIO"]

_FAIR = 16  # calls in a row that found the socket ready before one yields anyway


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


class SocketIO:
    """``receive_some``/``send_all`` (the ``trio.abc.Stream`` names) on one connected trio
    socket (plain TCP), without a schedule point when the socket was ready."""

    __slots__ = ("_raw", "_ready", "blocked_since", "socket")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.socket = sock
        # The standard socket inside trio's: its fileno() is the C method, where trio's is a
        # Python call that forwards to it (about six a request). Still asked each time, never
        # kept: a descriptor closed meanwhile reads as -1, not as a number reused since.
        self._raw: _HasFileno = getattr(sock, "_sock", sock)
        self._ready = 0  # calls in a row that did not wait
        self.blocked_since: float | None = None  # trio time a send_all began to wait

    async def _yield(self) -> None:
        """The ``_FAIR``-th call in a row that found the socket ready: a schedule point. (The
        count is kept inline by the callers: a coroutine per call would cost more.)"""
        self._ready = 0
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes``; ``b""`` at end of stream. Raises ``OSError`` (reset, closed) or
        ``trio.ClosedResourceError`` (closed while waiting)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self._raw
        try:
            data = os.read(sock.fileno(), max_bytes)
        except BlockingIOError:  # nothing yet: wait for the socket (it resets the count)
            return await self.receive_when_ready(max_bytes)
        self._ready += 1
        if self._ready >= _FAIR:
            await self._yield()
        return data

    async def receive_when_ready(self, max_bytes: int) -> bytes:
        """:meth:`receive_some` for a read that would find nothing yet (the peer was just sent a
        request, or just sent one and now waits for the answer): it waits for the socket
        first instead of trying the system call, which would fail with ``EAGAIN`` (and
        build an exception) almost every time."""
        sock = self._raw
        self._ready = 0
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return os.read(sock.fileno(), max_bytes)
            except BlockingIOError:
                continue

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data``. Raises ``OSError`` (reset, closed) or
        ``trio.ClosedResourceError`` (closed while waiting). While it waits for the socket,
        :attr:`blocked_since` says since when (a watchdog's write timeout)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self._raw
        total = len(data)
        try:
            sent = os.write(sock.fileno(), data)
        except BlockingIOError:
            sent = 0
        if sent >= total:
            self._ready += 1
            if self._ready >= _FAIR:
                await self._yield()
            return
        self._ready = 0
        self.blocked_since = trio.current_time()
        try:
            while True:
                await trio.lowlevel.wait_writable(sock)
                with contextlib.suppress(BlockingIOError):
                    sent += os.write(sock.fileno(), memoryview(data)[sent:])
                if sent >= total:
                    return
        finally:
            self.blocked_since = None
