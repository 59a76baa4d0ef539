"""A lean HTTP/1.1 server for ASGI apps on Trio: the gateway's default listener.

Why our own: hypercorn's Trio worker (h11 events, a task and several shielded, locked writes per
request) was most of the gateway's CPU. This server tokenises with llhttp (``httptools``: the
parser behind Node and uvicorn, strict by default and faster than any parser written in
Python), writes a response head together with its first body chunk, and keeps the ASGI
semantics the gateway relies on:

* ``receive()`` streams the request body, then blocks until the client disconnects (or the
  response is complete) and returns ``http.disconnect`` — so disconnects are seen at once;
  ``receive.cancel_on_disconnect(scope)`` (our extension, used through
  :class:`~onwards_trio._transport.asgi.CancelOnDisconnect`) has the connection's reader task
  cancel a scope instead, with no task per request; ``receive.end_on_disconnect()`` (also
  ours) has it cancel the connection's own scope, for a handler with nothing left to do once
  its client has gone (no cancel scope per request at all); ``receive.whole_body()`` (ours)
  hands over a body that has all arrived without a message (read by ``asgi.read_body``);
* sends after a disconnect are dropped silently (the app is told through ``receive``); a client
  that stops reading for ``write_timeout`` seconds counts as gone;
* graceful shutdown: when ``shutdown_trigger`` returns, stop accepting, close idle keep-alive
  connections, give requests in flight ``grace`` seconds, then cancel them.

llhttp refuses bare CR/LF, obs-fold, control characters, spaces around header names, malformed
chunk sizes, extensions and trailers, repeated or overflowing content-lengths and
content-length with transfer-encoding. Our policy on top, because whatever passes is forwarded
upstream: HTTP/1.0 and 1.1 only; exactly one ``host`` in 1.1; transfer-encoding only a lone
``chunked``, never in 1.0; no CONNECT or authority-form targets; no upgrade carrying a body. A
malformed request gets a JSON 400 and the connection closes; a head over 64 KiB or 200 fields
gets a 431. Trailers are bounded and dropped; bytes read ahead of a pipelined request are
bounded (then TCP backpressure). A response is held to the content-length the app declared; a
request body the app left unread ends the connection with a lingering close (FIN, then discard
for a moment) so the client still reads the answer.

Scope, deliberately: keep-alive, ``Expect: 100-continue``, pipelined requests served in order,
no HTTP/2 (hypercorn remains available for that: ``Gateway.serve(server=...)``). A WebSocket
upgrade is handed to :mod:`.websocket` (an ASGI ``websocket`` scope); any other upgrade
request is served as plain HTTP and the connection closes after it.
"""

from __future__ import annotations

import logging
import math
import socket
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import httptools
import trio

from onwards_trio._transport.asgi import ASGIApp, Message
from onwards_trio._transport.heads import clean_head
from onwards_trio._transport.sockio import SocketIO
from onwards_trio._transport.websocket import is_websocket_upgrade, serve_websocket

__all__ = ["serve"]

log = logging.getLogger("onwards_trio.server")

_READ = 64 * 1024
_MAX_HEAD = 64 * 1024  # request line + header fields (and, separately, trailer fields)
_MAX_HEADERS = 200
# The raw bytes of a head run past its counted size (the method, the version, line ends,
# whitespace around values): the backstop against a field llhttp would grow unfinished
# allows that much more before it refuses, so a head at the bound is never cut short by where
# a read happened to end.
_HEAD_FRAMING = 1024
_HEAD_TIMEOUT = 30.0  # from the first byte of a request to the end of its head
_BODY_READ_TIMEOUT = 60.0  # between pieces of a request body
_MAX_PIPELINED = 64 * 1024  # bytes read ahead while a request is served; then backpressure
_LINGER = 2.0  # after a response, how long to discard an unread request body before closing
_NO_BODY = frozenset({204, 304})
_ASGI = {"version": "3.0", "spec_version": "2.3"}  # every scope's (the same: read, never written)
# Request header fields our policy reads (_serve); the others pass as they are.
_POLICED = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect"})
# Response header fields the server writes itself (from what the app says in them).
_FRAMING = frozenset({b"content-length", b"connection", b"transfer-encoding"})
_REASONS = {
    200: b"OK",
    201: b"Created",
    204: b"No Content",
    304: b"Not Modified",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def _refusal(status: bytes, message: bytes, code: bytes) -> bytes:
    body = b'{"error":{"message":"%s","type":"invalid_request_error","param":null,"code":"%s"}}' % (
        message,
        code,
    )
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (status, len(body), body)
    )


_BAD_REQUEST = _refusal(b"400 Bad Request", b"Malformed HTTP request.", b"bad_request")
_HEAD_TOO_LARGE = _refusal(
    b"431 Request Header Fields Too Large",
    b"The request head is too large.",
    b"request_header_fields_too_large",
)
_SERVER_ERROR_BODY = (
    b'{"error":{"message":"An internal error occurred. Please try again later.",'
    b'"type":"internal_error","param":null,"code":"internal_error"}}'
)


class _Refused(Exception):
    """The request breaks our policy; ``answer`` is the bytes to reply with before closing."""

    def __init__(self, answer: bytes = _BAD_REQUEST) -> None:
        self.answer = answer


class _HeadTooLarge(Exception):
    pass


class _Request:
    """One request as llhttp reports it: the head, then body pieces as they are parsed."""

    __slots__ = (
        "body",
        "complete",
        "head_done",
        "headers",
        "keep_alive",
        "method",
        "size",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.size = 0  # bytes of the head so far; after it, of the trailers
        self.method = ""
        self.version = ""
        self.keep_alive = False
        self.upgrade = False
        self.head_done = False
        self.body: list[bytes] = []  # pieces parsed but not yet handed to the app
        self.complete = False


_TAKEN = _Request()  # _next_request: the reader serves the request that arrived (roles swap)


class _Parser:
    """llhttp's callbacks: queue the requests found in the bytes fed, in order.

    ``error`` is the answer owed for the first malformed request: it belongs to the last queued
    request when that one is incomplete, else to one that never got a head.
    """

    __slots__ = ("_llhttp", "current", "error", "requests", "rest", "stopped")

    def __init__(self) -> None:
        self.requests: deque[_Request] = deque()
        self.current = _Request()
        self.error: bytes | None = None
        self.stopped = False  # after an error or an upgrade: nothing more is HTTP
        self.rest = b""  # the bytes after an upgrade request's head
        self._llhttp = httptools.HttpRequestParser(self)

    def feed(self, data: bytes) -> None:
        if self.stopped:
            return
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.stopped = True
            self.rest = data[exc.args[0] :]
        except httptools.HttpParserError as exc:
            self.stopped = True
            too_large = isinstance(exc.__context__, _HeadTooLarge)
            self.error = (
                _HEAD_TOO_LARGE if too_large and not self.current.head_done else (_BAD_REQUEST)
            )

    def on_message_begin(self) -> None:
        self.current = _Request()
        self.requests.append(self.current)

    def on_url(self, url: bytes) -> None:
        req = self.current
        req.target += url
        req.size += len(url)
        if req.size > _MAX_HEAD:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        size = req.size = req.size + len(name) + len(value) + 4
        headers = req.headers
        if size > _MAX_HEAD or len(headers) >= _MAX_HEADERS:
            raise _HeadTooLarge
        if not req.head_done:  # trailers are checked by llhttp, bounded here, dropped
            headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        req = self.current
        llhttp = self._llhttp
        req.method = llhttp.get_method().decode("ascii")
        req.version = llhttp.get_http_version()
        req.keep_alive = llhttp.should_keep_alive()
        req.upgrade = llhttp.should_upgrade()
        req.head_done = True
        req.size = 0

    def on_body(self, body: bytes) -> None:
        self.current.body.append(body)

    def on_message_complete(self) -> None:
        self.current.complete = True


class _Server:
    def __init__(self, app: ASGIApp, keep_alive_timeout: float, write_timeout: float) -> None:
        self.app = app
        self.keep_alive_timeout = keep_alive_timeout
        self.write_timeout = write_timeout
        self.draining = False
        self.connections: set[_Connection] = set()
        self.idle_done = trio.Event()
        self.idle_done.set()

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = _Connection(self, stream)
        self.connections.add(conn)
        self.idle_done = trio.Event() if self.idle_done.is_set() else self.idle_done
        try:
            await conn.run()
        except Exception:  # one connection's bug must not take the listener down
            log.exception("unhandled error on an HTTP connection")
        finally:
            self.connections.discard(conn)
            if not self.connections:
                self.idle_done.set()
            await trio.aclose_forcefully(stream)

    async def watch_deadlines(self) -> None:
        """Enforce every connection's timeouts from one task: ``write_timeout`` on a blocked
        write, the keep-alive idle timeout and the head timeout on reads. A cancel scope per
        read or write would cost more than most of them (a few per request, dozens for a
        stream); a connection past its deadline is closed, which wakes its blocked call."""
        period = min(1.0, self.write_timeout / 4, self.keep_alive_timeout / 4)
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            late = now - self.write_timeout
            for conn in list(self.connections):
                since = conn.io.blocked_since
                if since is not None and since < late:
                    conn.abort_write()
                elif conn.read_deadline < now:
                    conn.close()

    def drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.wake_if_idle()


class _Connection:
    """One client connection: two tasks, a handler serving requests in order and a reader
    that owns every read of the socket.

    The reader feeds llhttp and wakes the handler when a head or body piece it waits for has
    arrived. While an app runs with the request's body complete, the reader keeps reading
    ahead (bounded by ``_MAX_PIPELINED``), so it sees at once when the client leaves: it then
    cancels the scope the app registered (:meth:`cancel_on_disconnect`) — one task per
    connection instead of a watcher task, a nursery and cancel scopes per request — and the
    bytes of the client's next request are already parsed when the response is done.

    The two tasks swap roles when a request arrives on an idle connection: the reader that
    parsed its head serves it at once, and the idle handler is woken to read in its place.
    Waking the handler instead would put a whole scheduler pass (an ``epoll_wait`` and the
    reader's next wait) between the request's bytes and its handling, on every request.
    """

    __slots__ = (
        "_ahead",
        "_body_delivered",
        "_client",
        "_clock",
        "_continue",
        "_disconnected",
        "_fed",
        "_finished",
        "_on_disconnect",
        "_reader_wake",
        "_req",
        "_response",
        "_response_done",
        "_server_addr",
        "_take_over",
        "_tasks",
        "_wake",
        "io",
        "linger",
        "parser",
        "read_deadline",
        "receive",
        "scope",
        "server",
        "stream",
        "waiting_for_head",
    )

    def __init__(self, server: _Server, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.io = SocketIO(stream.socket)
        self.parser = _Parser()
        self.receive = _Receive(self)
        self._disconnected = False
        self._client = _address(stream, peer=True)
        self._server_addr = _address(stream, peer=False)
        self._req = _Request()
        self._continue = False
        self._body_delivered = False
        self._response_done = False
        self._response: _Response | None = None
        self._fed = 0  # bytes the reader has fed to llhttp
        self._ahead = 0  # bytes read past the last complete request (pipelined)
        self._on_disconnect: trio.CancelScope | None = None
        # The handler, while it waits for the reader (woken by it): a parked task rather than
        # a trio.Event, which would be an object (and a set) per wait, once per request.
        self._wake: trio.lowlevel.Task | None = None
        self._take_over = False  # the handler is woken to become the reader (roles swap)
        self._tasks: trio.Nursery | None = None
        self.linger = False  # the connection ends with a lingering close
        self._reader_wake: trio.Event | None = None  # set by the handler: the reader waits
        self._finished: trio.Event | None = None  # set when the response ends or the client left
        self.read_deadline = math.inf  # when a read still waiting counts as timed out
        # The run's clock, read directly for the deadlines: trio.current_time() finds it
        # through two more calls and a thread-local lookup, once per request.
        self._clock = trio.lowlevel.current_clock()
        self.waiting_for_head = False
        # Round the connection's requests: what end_on_disconnect registers (see run()).
        self.scope = trio.CancelScope()

    def wake_if_idle(self) -> None:
        if self.waiting_for_head and not self.parser.requests:
            self.close()

    def close(self) -> None:
        """End the connection from outside its task: a call blocked on the socket wakes with
        an error, later ones fail."""
        self._gone()
        self.stream.socket.close()

    def cancel_on_disconnect(self, scope: trio.CancelScope | None) -> trio.CancelScope | None:
        """Cancel ``scope`` when the client disconnects (at once if it already has), instead of
        the scope registered before, which is returned: registering it again when ``scope``
        is done keeps nested registrations right. The app's side:
        :class:`~onwards_trio._transport.asgi.CancelOnDisconnect`."""
        previous, self._on_disconnect = self._on_disconnect, scope
        if scope is not None and self._disconnected:
            scope.cancel()
        return previous

    def end_on_disconnect(self) -> trio.CancelScope | None:
        """Cancel the rest of the current request, and end the connection, when the client
        disconnects: for a handler that has nothing left to do then but synchronous
        bookkeeping (the cancellation reaches it, then :meth:`run`'s scope, which catches it).
        Returns the registration it replaces, to be restored with
        :meth:`cancel_on_disconnect` when the handler is done."""
        scope = self.scope  # cancel_on_disconnect(self.scope), inline: once per request
        previous, self._on_disconnect = self._on_disconnect, scope
        if self._disconnected:
            scope.cancel()
        return previous

    # -- the reader task --------------------------------------------------------------------

    def _wants_bytes(self) -> bool:
        if self._disconnected or self.parser.stopped:
            return False
        if self._wake is not None:
            return True  # the handler waits for a head or a body piece
        # Read ahead while the request at hand is whole: a disconnect shows at once, the next
        # request is parsed early; bounded (then TCP backpressure, and a disconnect goes
        # unseen until the response is done).
        return self.parser.current.complete and self._ahead < _MAX_PIPELINED

    def _kick_reader(self) -> None:
        wake = self._reader_wake
        if wake is not None and self._wants_bytes():
            self._reader_wake = None
            wake.set()

    def _wake_handler(self) -> None:
        task = self._wake
        if task is not None:
            self._wake = None
            trio.lowlevel.reschedule(task)

    async def _reader(self) -> bool:
        """Read until the client is gone (False) or a request's head arrives while the handler
        idles (True): this task then serves it, the handler reads."""
        parser = self.parser
        requests = parser.requests
        io = self.io
        idle = parser.current.complete  # a whole request came: the client waits for its answer
        while True:
            while not self._wants_bytes():
                if self._disconnected:
                    return False
                wake = self._reader_wake = trio.Event()
                await wake.wait()
            ahead = parser.current.complete
            try:  # b"": the client is gone (closed, reset, or closed by the watchdog)
                if idle:  # the client sent a whole request and waits: wait for the socket first
                    data = await io.receive_when_ready(_READ)
                else:
                    data = await io.receive_some(_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self._gone()
                self._wake_handler()
                return False
            if ahead:
                self._ahead += len(data)
            self._fed += len(data)
            parser.feed(data)
            idle = parser.current.complete
            task = self._wake
            if task is not None and self.waiting_for_head and requests and requests[0].head_done:
                self._wake = None
                self._take_over = True
                self.waiting_for_head = False
                self.read_deadline = math.inf
                trio.lowlevel.reschedule(task)
                return True
            self._wake_handler()

    async def _wait(self) -> None:
        """Wait until the reader has fed more bytes or the client left (or, waiting for a
        head, took the request over: ``_take_over``)."""
        task = self._wake = trio.lowlevel.current_task()
        self._kick_reader()  # never wakes the handler itself: no reschedule before the park
        try:
            await trio.lowlevel.wait_task_rescheduled(self._abort_wait)
        finally:
            if self._wake is task:  # after a swap it may be the other task's already
                self._wake = None

    def _abort_wait(self, _: object) -> trio.lowlevel.Abort:
        self._wake = None  # cancelled: nobody may reschedule the handler now
        return trio.lowlevel.Abort.SUCCEEDED

    # -- the handler ------------------------------------------------------------------------

    async def run(self) -> None:
        with self.scope:  # cancelled only when a handler said end_on_disconnect: client gone
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                tasks.start_soon(self._part, True)
                await self._part(False)
        if self.linger:
            await self._linger()

    async def _part(self, reading: bool) -> None:
        """One of the connection's two tasks: read or serve, as the roles swap (see the class);
        the one that ends the connection stops the other."""
        me = trio.lowlevel.current_task()  # read once: the roles swap, the tasks stay
        while True:
            if reading and not await self._reader():
                return  # the client is gone: the handler sees it
            linger = await self._serve_all(me)
            if linger is not None:
                break
            reading = True  # the reader took the request over: read in its place
        self.linger = linger
        assert self._tasks is not None
        self._tasks.cancel_scope.cancel()

    async def _serve_all(self, me: trio.lowlevel.Task) -> bool | None:
        """Serve requests until the connection should close (True: linger first, a request
        body was left unread) or the reader takes a request over (None). ``me``: the task
        running it."""
        while not self.server.draining:
            req = await self._next_request(me)
            if req is None:
                return False
            if req is _TAKEN:
                return None
            try:
                keep = await self._serve(req)
            except _Refused as exc:
                await self._write(exc.answer)
                keep = False
            if not keep:
                return not req.complete and not self._disconnected
        return False

    async def _linger(self) -> None:
        """Close without losing the response: closing a socket with unread request bytes
        makes the kernel answer with a reset, which can destroy the response (say a 413) in
        the client before it was read. Send our FIN, discard what still arrives for a moment."""
        try:
            await self.stream.send_eof()
            with trio.move_on_after(_LINGER):
                while await self.stream.receive_some(_READ):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _next_request(self, me: trio.lowlevel.Task) -> _Request | None:
        """The next request whose head is complete, or None when the connection should close
        (idle timeout, client gone, server draining, a malformed head answered), or
        ``_TAKEN`` when the reader serves it (it reset the wait's state). The timeouts are
        deadlines the server's watchdog enforces (:meth:`_Server.watch_deadlines`)."""
        parser = self.parser
        requests = parser.requests
        if not (requests and requests[0].head_done):
            self.read_deadline = self._clock.current_time() + self.server.keep_alive_timeout
            self.waiting_for_head = True
            head_started = False
            fed = self._fed
            taken = False
            try:
                while not (requests and requests[0].head_done):
                    if parser.stopped:
                        if parser.error is not None:
                            await self._write(parser.error)
                        return None
                    if self._disconnected:
                        return None
                    if requests and not head_started:  # the first bytes: the head timeout runs
                        head_started = True
                        self.read_deadline = self._clock.current_time() + _HEAD_TIMEOUT
                    if self._fed - fed > _MAX_HEAD + _HEAD_FRAMING:  # llhttp would grow a field
                        await self._write(_HEAD_TOO_LARGE)
                        return None
                    # _wait, inline (once per request: no coroutine of its own), as this task
                    self._wake = me
                    self._kick_reader()  # never wakes the handler itself: no reschedule first
                    try:
                        await trio.lowlevel.wait_task_rescheduled(self._abort_wait)
                    finally:
                        if self._wake is me:  # after a swap it may be the other task's already
                            self._wake = None
                    if self._take_over:
                        self._take_over = False
                        taken = True  # the connection's state is the other task's now
                        return _TAKEN
            finally:
                if not taken:
                    self.waiting_for_head = False
                    self.read_deadline = math.inf
        req = requests.popleft()
        self._ahead = 0
        self._kick_reader()  # it may have stopped at the read-ahead bound
        return req

    async def _serve(self, req: _Request) -> bool:
        method = req.method
        http11 = req.version == "1.1"
        if not http11 and req.version != "1.0":
            raise _Refused  # llhttp also reads 0.9 and 2.0 heads
        if method == "CONNECT":
            raise _Refused  # no tunnels: a 2xx would turn the upstream link into one
        length = 0
        chunked = False
        expect_continue = False
        hosts = 0
        for name, value in req.headers:
            if name not in _POLICED:  # one set lookup for the usual field, not four tests
                continue
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                length = int(value)  # llhttp allows digits only, once, below 2**64
            elif name == b"transfer-encoding":
                # only a lone "chunked" once, and never in HTTP/1.0 (RFC 9112 §6.1)
                if chunked or value.lower() != b"chunked" or not http11:
                    raise _Refused
                chunked = True
            elif name == b"expect" and http11:
                expect_continue = value.lower() == b"100-continue"
        if hosts > 1 or (http11 and not hosts):
            raise _Refused  # RFC 9112 §3.2: exactly one host in HTTP/1.1
        if req.upgrade and (chunked or length):
            raise _Refused  # llhttp does not frame an upgrade's body: it would go unread
        if self.parser.error is not None and not req.complete:
            raise _Refused(self.parser.error)  # its body is malformed: answer before the app
        raw_path, _, query = req.target.partition(b"?")
        if raw_path[:1] != b"/":
            lowered = raw_path[:8].lower()
            if lowered.startswith((b"http://", b"https://")):  # absolute-form: keep the path
                parts = raw_path.split(b"/", 3)
                raw_path = b"/" + parts[3] if len(parts) == 4 else b"/"
            elif raw_path != b"*" or method != "OPTIONS":
                raise _Refused  # no authority-form or other shapes
        path = raw_path.decode("latin-1")
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": req.version,
            "method": method,
            "scheme": "http",
            "path": path if "%" not in path else urllib.parse.unquote(path),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": req.headers,
            "client": self._client,
            "server": self._server_addr,
        }
        if req.upgrade and is_websocket_upgrade(method, req.headers):
            # The connection is the socket's from here; llhttp stopped at the head and left
            # the bytes after it (early frames) unparsed.
            await serve_websocket(self.server.app, self.stream, scope, self.parser.rest)
            self._disconnected = True
            return False
        self._req = req
        self._body_delivered = False
        self._continue = expect_continue and not req.complete
        self._response_done = False
        self._on_disconnect = None
        response = self._response = _Response(self, method == "HEAD", http11, req.keep_alive)
        try:
            await self.server.app(scope, self.receive, response.send)
        except Exception:
            log.exception("unhandled error in the ASGI app")
            if not response.committed:
                await response.send_error()
            return False
        if not response.finished:
            if not response.committed:
                await response.send_error()
            return False
        if self._disconnected or response.close or not req.complete or req.upgrade:
            return False  # an unread request body leaves the stream unusable
        return req.keep_alive and not self.server.draining

    def _body_pending(self, req: _Request) -> bool:
        """The app waits for body bytes that have not arrived yet, and still can."""
        return not (req.body or req.complete or self.parser.stopped or self._disconnected)

    async def _receive(self) -> Message:
        if self._response_done:
            return {"type": "http.disconnect"}  # the exchange is over (ASGI)
        req = self._req
        if not self._body_delivered and not self._disconnected:
            if not req.body and not req.complete:
                if self._continue:
                    self._continue = False
                    await self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
                parser = self.parser
                try:
                    with trio.fail_after(_BODY_READ_TIMEOUT):
                        while self._body_pending(req):
                            await self._wait()
                except trio.TooSlowError:
                    self._gone()  # a stalled body: the request is over
                    return {"type": "http.disconnect"}
                if not req.body and not req.complete:
                    if not parser.stopped:  # the client left mid-body: the request is over
                        return {"type": "http.disconnect"}
                    # Malformed (llhttp stopped): answer 400 unless the app began its answer,
                    # then drop whatever the app still sends, as for a client gone.
                    if self._response is None or not self._response.started:
                        await self._write(parser.error or _BAD_REQUEST)
                    self._gone()
                    return {"type": "http.disconnect"}
            pieces = req.body
            body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            self._body_delivered = req.complete
            return {"type": "http.request", "body": body, "more_body": not req.complete}
        # The body is read: wait for the client to leave (the reader reads ahead, bounded) or
        # the response to finish.
        while not self._disconnected and not self._response_done:
            wake = self._finished = trio.Event()
            self._kick_reader()
            await wake.wait()
        return {"type": "http.disconnect"}

    def _wake_finished(self) -> None:
        wake = self._finished
        if wake is not None:
            self._finished = None
            wake.set()

    def response_finished(self) -> None:
        self._response_done = True
        self._wake_finished()

    async def _write(self, data: bytes) -> None:
        if self._disconnected:
            await trio.lowlevel.checkpoint()  # an app that streams on regardless still yields
            return
        try:
            await self.io.send_all(data)  # a blocked write shows in io.blocked_since
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._gone()  # later sends are dropped; receive() reports it

    def abort_write(self) -> None:
        """The client took no bytes for the write timeout: it counts as gone. Closing the
        socket wakes the blocked ``send_all`` with an error."""
        self.close()

    def _gone(self) -> None:
        """The client is gone (or counts as gone): cancel what the app registered, wake
        whoever waits on the connection."""
        self._disconnected = True
        scope = self._on_disconnect
        if scope is not None:
            scope.cancel()
        self._wake_finished()
        self._wake_handler()


class _Receive:
    """The ASGI ``receive`` of one connection. ``cancel_on_disconnect`` is the built-in
    server's extension: :class:`~onwards_trio._transport.asgi.CancelOnDisconnect` registers a
    cancel scope through it instead of running a watcher task per request."""

    __slots__ = ("_conn", "cancel_on_disconnect", "end_on_disconnect")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.cancel_on_disconnect = conn.cancel_on_disconnect
        self.end_on_disconnect = conn.end_on_disconnect

    @property
    def client_gone(self) -> bool:
        """The client has disconnected (or counts as gone)."""
        return self._conn._disconnected

    def __call__(self) -> Awaitable[Message]:
        return self._conn._receive()

    def whole_body(self) -> bytes | None:
        """The request's whole body, when all of it has arrived and none of it was received
        yet: what the first ``receive()`` would return as its one message (our extension:
        :func:`~onwards_trio._transport.asgi.read_body` takes it without the message and the
        timer a read in pieces needs); ``None``: ``receive()`` it."""
        conn = self._conn
        req = conn._req
        if not req.complete or conn._body_delivered or conn._disconnected or conn._response_done:
            return None
        pieces = req.body
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        conn._body_delivered = True
        return body

    def send_more(self, body: bytes) -> Awaitable[None]:
        """``send({"type": "http.response.body", "body": body, "more_body": True})`` for the
        response being sent, without the message (our extension: the gateway's stream relay
        writes each event this way, see :meth:`_Response.more`)."""
        response = self._conn._response
        assert response is not None
        return response.more(body)


class _Response:
    """ASGI ``send`` for one response: the head waits for the first body chunk so both go out
    in one write; without a content-length, HTTP/1.1 bodies are chunked. A declared
    content-length is held to: excess bytes are dropped and a short body closes the
    connection, so a wrong length can never desynchronise the client's next response."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_head",
        "_head_only",
        "_http11",
        "_keep_alive",
        "_left",
        "_no_body",
        "close",
        "finished",
        "started",
    )

    def __init__(self, conn: _Connection, head_only: bool, http11: bool, keep_alive: bool) -> None:
        self._conn = conn
        self._head_only = head_only
        self._http11 = http11
        self._keep_alive = keep_alive
        self._head: list[bytes] | None = None
        self._chunked = False
        self._no_body = head_only
        self._left = -1  # bytes the declared content-length still expects; -1: none declared
        self.started = False
        self.finished = False
        self.close = False

    @property
    def committed(self) -> bool:
        """True once bytes of the response head have been written."""
        return self.started and self._head is None

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            status = message["status"]
            if type(status) is not int:  # int() of an int is a call for nothing
                status = int(status)
            head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
            length = -1
            for name, value in message.get("headers", ()):
                lname = (name if type(name) is bytes else bytes(name)).lower()
                if type(value) is not bytes:
                    value = bytes(value)
                if lname in _FRAMING:  # one set lookup for the usual header, not three tests
                    if lname == b"content-length":
                        if not value.isdigit() or len(value) > 19:  # int() of thousands: slow
                            raise RuntimeError("invalid content-length from the ASGI app")
                        declared = int(value)
                        if length >= 0 and declared != length:
                            raise RuntimeError("invalid content-length from the ASGI app")
                        length = declared
                    elif lname == b"connection" and b"close" in value.lower():
                        self.close = True
                    continue  # framing is ours: written below
                head += (lname, b": ", value, b"\r\n")
            lines = 1 + (len(head) - 1) // 4  # the status line, then four pieces per field
            if length >= 0 and status >= 200 and status != 204:  # RFC 9110 §8.6
                head.append(b"content-length: %d\r\n" % length)
                lines += 1
            joined = b"".join(head)
            if not clean_head(joined, lines):  # a relayed value must not split the response
                raise RuntimeError("a control character in a header from the ASGI app")
            self.started = True
            self._head = [joined]
            self._no_body = self._head_only or status in _NO_BODY or status < 200
            self._left = length
            return
        if kind != "http.response.body" or self.finished:
            if self.finished:
                return
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.started:
            raise RuntimeError("http.response.body before http.response.start")
        body: bytes = message.get("body", b"")
        if type(body) is not bytes:  # bytes() of bytes is a call for nothing
            body = bytes(body)
        more = message.get("more_body", False)
        if not self._no_body and self._left >= 0:
            if len(body) > self._left:
                log.error("the ASGI app sent more body bytes than it declared; dropped")
                body = body[: self._left]
                self.close = True
            self._left -= len(body)
            if not more and self._left:
                log.error("the ASGI app sent fewer body bytes than it declared")
                self.close = True  # the client sees the body end early: an honest signal
        out = self._head  # the held head goes out with this piece
        if out is None:
            out = []
        else:
            self._head = None
            self._conn._continue = False  # never a 100 Continue after a final status
            if self._left < 0 and not self._no_body:
                if not more:
                    out.append(b"content-length: %d\r\n" % len(body))
                elif self._http11:
                    out.append(b"transfer-encoding: chunked\r\n")
                    self._chunked = True
                else:
                    self.close = True  # HTTP/1.0: the body ends with the connection
            if self.close or self._conn.server.draining or not self._keep_alive:
                out.append(b"connection: close\r\n")
                self.close = True
            elif not self._http11:
                out.append(b"connection: keep-alive\r\n")
            out.append(b"\r\n")
        if not self._no_body and body:
            if self._chunked:
                out += (b"%x\r\n" % len(body), body, b"\r\n")
            else:
                out.append(body)
        if not more:
            if self._chunked and not self._no_body:
                out.append(b"0\r\n\r\n")
            self.finished = True
        conn = self._conn
        if out:
            if conn._disconnected:  # dropped, as _write does
                await trio.lowlevel.checkpoint()
            else:  # _write's send, inline: no coroutine of its own for every response
                try:
                    await conn.io.send_all(b"".join(out))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    conn._gone()
        if self.finished:
            conn.response_finished()

    async def more(self, body: bytes) -> None:
        """A body piece with more to follow. Once the head is out and the body has no declared
        length, the piece is framed and written at once: none of the checks and joins a
        message takes (the cost that counts for a stream of small events); otherwise it goes
        as the message."""
        if self._head is not None or self._left >= 0 or self._no_body or self.finished:
            await self.send({"type": "http.response.body", "body": body, "more_body": True})
        elif body:
            await self._conn._write(b"%x\r\n%s\r\n" % (len(body), body) if self._chunked else body)

    async def send_error(self) -> None:
        self.started = True
        self.finished = True
        self.close = True
        self._head = None
        await self._conn._write(
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n"
            % len(_SERVER_ERROR_BODY)
            + _SERVER_ERROR_BODY
        )


def _address(stream: trio.SocketStream, *, peer: bool) -> tuple[str, int] | None:
    try:
        addr = stream.socket.getpeername() if peer else stream.socket.getsockname()
    except OSError:
        return None
    return (str(addr[0]), int(addr[1]))


async def _reuse_port_listeners(host: str, port: int) -> list[trio.SocketListener]:
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    socks = []
    try:
        for family, kind, proto, _, addr in infos:
            sock = trio.socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(addr)
            sock.listen(socket.SOMAXCONN)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return [trio.SocketListener(sock) for sock in socks]


async def serve(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    grace: float = 30.0,
    keep_alive_timeout: float = 75.0,
    write_timeout: float = 60.0,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[Sequence[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled, or until ``shutdown_trigger`` returns
    and the drain is over. ``task_status.started`` receives the bound URLs. A client that
    accepts no response bytes for ``write_timeout`` seconds is treated as disconnected.
    ``reuse_port`` lets several processes listen on one port (``SO_REUSEPORT``: the kernel
    spreads the connections), as ``--workers`` does."""
    if reuse_port:
        listeners = await _reuse_port_listeners(host, port)
    else:
        listeners = await trio.open_tcp_listeners(port, host=host)  # backlog: the OS maximum
    urls = []
    for listener in listeners:
        bound = listener.socket.getsockname()
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
        urls.append(f"http://{shown}:{bound[1]}")
    server = _Server(app, keep_alive_timeout, write_timeout)
    async with trio.open_nursery() as connections:
        connections.start_soon(server.watch_deadlines)
        async with trio.open_nursery() as acceptor:
            await acceptor.start(
                partial(trio.serve_listeners, server.handle, listeners, handler_nursery=connections)
            )
            task_status.started(urls)
            if shutdown_trigger is None:
                await trio.sleep_forever()
            await shutdown_trigger()
            acceptor.cancel_scope.cancel()  # stop accepting; the listeners close
        server.drain()
        with trio.move_on_after(grace):
            await server.idle_done.wait()
        connections.cancel_scope.cancel()
