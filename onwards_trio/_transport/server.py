"""A lean HTTP/1.1 server for ASGI apps on Trio: the gateway's default listener.

Why our own: with the upstream side made cheap, hypercorn's Trio worker (h11 events, a task
and several shielded, locked writes per request) was most of the gateway's CPU. This server
parses with ``bytes.find``, writes a response head together with its first body chunk, and
keeps the ASGI semantics the gateway relies on:

* ``receive()`` streams the request body, then blocks until the client disconnects (or the
  response is complete) and returns ``http.disconnect`` — so disconnects are seen at once;
* sends after a disconnect are dropped silently (the app is told through ``receive``);
* graceful shutdown: when ``shutdown_trigger`` returns, stop accepting, close idle keep-alive
  connections, give requests in flight ``grace`` seconds, then cancel them.

Scope, deliberately: HTTP/1.1 and 1.0, keep-alive, content-length and chunked request bodies,
``Expect: 100-continue``, no pipelining concurrency (pipelined requests are served in order),
no HTTP/2 (hypercorn remains available for it: ``Gateway.serve(server=...)``); a WebSocket
upgrade is handed to :mod:`.websocket` (an ASGI ``websocket`` scope), no other upgrade.
Requests with both ``content-length`` and ``transfer-encoding`` are refused (smuggling), as are
a repeated or non-``chunked`` transfer-encoding, transfer-encoding in HTTP/1.0, chunk sizes that
are not plain hex, HTTP/1.1 requests without exactly one ``host``, and CONNECT. Chunk lines,
extensions, trailers and bytes read ahead of a pipelined request are bounded. A response is held
to the content-length the app declared; a request body the app left unread ends the connection
with a lingering close (FIN, then discard for a moment) so the client still reads the answer.
"""

from __future__ import annotations

import logging
import re
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import trio

from onwards_trio._transport.asgi import ASGIApp, Message
from onwards_trio._transport.websocket import is_websocket_upgrade, serve_websocket

__all__ = ["serve"]

log = logging.getLogger("onwards_trio.server")

_READ = 64 * 1024
_MAX_HEAD = 64 * 1024
_MAX_HEADERS = 200
_HEAD_TIMEOUT = 30.0  # from the first byte of a request to the end of its head
_BODY_READ_TIMEOUT = 60.0  # between pieces of a request body
_MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
_MAX_PIPELINED = 64 * 1024  # bytes read ahead while a request is served; then backpressure
_LINGER = 2.0  # after a response, how long to discard an unread request body before closing
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_NO_BODY = frozenset({204, 304})
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
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
_BAD_REQUEST_BODY = (
    b'{"error":{"message":"Malformed HTTP request.","type":"invalid_request_error",'
    b'"param":null,"code":"bad_request"}}'
)
_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n" % len(_BAD_REQUEST_BODY) + _BAD_REQUEST_BODY
)
_SERVER_ERROR_BODY = (
    b'{"error":{"message":"An internal error occurred. Please try again later.",'
    b'"type":"internal_error","param":null,"code":"internal_error"}}'
)


class _BadRequest(Exception):
    pass


class _Closed(Exception):
    """The client went away."""


class _Server:
    def __init__(self, app: ASGIApp, keep_alive_timeout: float) -> None:
        self.app = app
        self.keep_alive_timeout = keep_alive_timeout
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

    def drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.wake_if_idle()


class _Connection:
    __slots__ = (
        "_body_delivered",
        "_body_left",
        "_chunked",
        "_client",
        "_continue",
        "_disconnected",
        "_idle_scope",
        "_overhead",
        "_receive_scope",
        "_request_done",
        "_response_done",
        "_server_addr",
        "buf",
        "server",
        "stream",
    )

    def __init__(self, server: _Server, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.buf = b""
        self._idle_scope: trio.CancelScope | None = None
        self._receive_scope: trio.CancelScope | None = None
        self._disconnected = False
        self._client = _address(stream, peer=True)
        self._server_addr = _address(stream, peer=False)
        self._body_left = 0
        self._chunked = False
        self._continue = False
        self._request_done = False
        self._body_delivered = False
        self._response_done = False
        self._overhead = 0

    def wake_if_idle(self) -> None:
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    async def _read(self) -> bytes:
        try:
            data = await self.stream.receive_some(_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            self._disconnected = True
            raise _Closed
        return bytes(data)

    async def run(self) -> None:
        try:
            while not self.server.draining:
                try:
                    head = await self._next_head()
                    if head is None:
                        return
                    method, raw_target, version, headers = _parse_head(head)
                    keep = await self._serve(method, raw_target, version, headers)
                except _BadRequest:
                    await self._write(_BAD_REQUEST)
                    return
                if not keep:
                    if not self._request_done and not self._disconnected:
                        await self._linger()
                    return
        except _Closed:
            return

    async def _linger(self) -> None:
        """Close without losing the response: closing a socket with unread request bytes
        makes the kernel answer with a reset, which can destroy the response (say a 413) in
        the client before it was read. Send our FIN, discard what still arrives for a moment."""
        self._request_done = True
        try:
            await self.stream.send_eof()
            with trio.move_on_after(_LINGER):
                while await self.stream.receive_some(_READ):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _next_head(self) -> bytes | None:
        """The next request head, or None when the connection should close (idle timeout,
        client gone, server draining)."""
        if not self.buf:
            with trio.move_on_after(self.server.keep_alive_timeout) as idle:
                self._idle_scope = idle
                try:
                    self.buf = await self._read()
                finally:
                    self._idle_scope = None
            if idle.cancelled_caught:
                return None
        with trio.move_on_after(_HEAD_TIMEOUT) as timer:
            start = 0
            while True:
                end = self.buf.find(b"\r\n\r\n", max(0, start - 3))
                if end >= 0:
                    head, self.buf = self.buf[:end], self.buf[end + 4 :]
                    return head
                if len(self.buf) > _MAX_HEAD:
                    raise _BadRequest
                start = len(self.buf)
                self.buf += await self._read()
        if timer.cancelled_caught:
            return None
        return None  # pragma: no cover

    async def _serve(
        self,
        method: str,
        raw_target: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> bool:
        length: int | None = None
        chunked = False
        http11 = version == b"HTTP/1.1"
        keep_alive = http11
        expect_continue = False
        hosts = 0
        for name, value in headers:
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    raise _BadRequest
                length = int(value)
            elif name == b"transfer-encoding":
                # only a lone "chunked" once, and never in HTTP/1.0 (RFC 9112 §6.1)
                if chunked or value.lower() != b"chunked" or not http11:
                    raise _BadRequest
                chunked = True
            elif name == b"host":
                hosts += 1
            elif name == b"connection":
                tokens = value.lower()
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
            elif name == b"expect" and value.lower() == b"100-continue":
                expect_continue = http11
        if chunked and length is not None:
            raise _BadRequest  # both framings: the classic request-smuggling shape
        if hosts > 1 or (http11 and not hosts):
            raise _BadRequest  # RFC 9112 §3.2: exactly one host in HTTP/1.1
        self._chunked = chunked
        self._body_left = length or 0
        self._request_done = not chunked and not length
        self._body_delivered = False
        self._continue = expect_continue and not self._request_done
        self._response_done = False
        self._overhead = 0
        raw_path, _, query = raw_target.partition(b"?")
        if raw_path[:1] != b"/":
            lowered = raw_path[:8].lower()
            if lowered.startswith((b"http://", b"https://")):  # absolute-form: keep the path
                parts = raw_path.split(b"/", 3)
                raw_path = b"/" + parts[3] if len(parts) == 4 else b"/"
            elif raw_path != b"*" or method != "OPTIONS":
                raise _BadRequest  # no authority-form (CONNECT) or other shapes
        if method == "CONNECT":
            raise _BadRequest  # no tunnels: a 2xx would turn the upstream link into one
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version[5:].decode(),
            "method": method,
            "scheme": "http",
            "path": urllib.parse.unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": self._client,
            "server": self._server_addr,
        }
        if is_websocket_upgrade(method, headers):  # the connection is the socket's from here
            await serve_websocket(self.server.app, self.stream, scope, self.buf)
            self._disconnected = True
            return False
        response = _Response(self, method == "HEAD", http11, keep_alive)
        try:
            await self.server.app(scope, self._receive, response.send)
        except Exception:
            log.exception("unhandled error in the ASGI app")
            if not response.committed:
                await response.send_error()
            return False
        if not response.finished:
            if not response.committed:
                await response.send_error()
            return False
        if self._disconnected or response.close or not self._request_done:
            return False  # an unread request body leaves the stream unusable
        return keep_alive and not self.server.draining

    async def _receive(self) -> Message:
        if self._response_done:
            return {"type": "http.disconnect"}  # the exchange is over (ASGI)
        if not self._body_delivered and not self._disconnected:
            body = b""
            if not self._request_done:
                if self._continue:
                    self._continue = False
                    await self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
                try:
                    with trio.fail_after(_BODY_READ_TIMEOUT):
                        piece = self._chunk_piece() if self._chunked else self._length_piece()
                        body = await piece
                except (_Closed, trio.TooSlowError, _BadRequest):
                    self._disconnected = True  # a broken or stalled body: the request is over
                    return {"type": "http.disconnect"}
            self._body_delivered = self._request_done
            return {"type": "http.request", "body": body, "more_body": not self._request_done}
        # The body is read: wait for the client to leave (or the response to finish).
        while not self._disconnected and not self._response_done:
            with trio.CancelScope() as scope:
                self._receive_scope = scope
                try:
                    if len(self.buf) >= _MAX_PIPELINED:
                        # Enough read ahead: stop reading (TCP backpressure) until the
                        # response is done; a disconnect goes unseen until then.
                        await trio.sleep_forever()
                    self.buf += await self._read()  # pipelined bytes wait for their turn
                except _Closed:
                    pass
                finally:
                    self._receive_scope = None
        return {"type": "http.disconnect"}

    def response_finished(self) -> None:
        self._response_done = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def _length_piece(self) -> bytes:
        data = self.buf or await self._read()
        take = min(len(data), self._body_left)
        piece, self.buf = data[:take], data[take:]
        self._body_left -= take
        if self._body_left == 0:
            self._request_done = True
        return piece

    async def _chunk_piece(self) -> bytes:
        while True:
            if self._body_left > 0:
                data = self.buf or await self._read()
                take = min(len(data), self._body_left)
                piece, self.buf = data[:take], data[take:]
                self._body_left -= take
                if self._body_left == 0 and await self._line() != b"":
                    raise _BadRequest  # chunk data must end with CRLF
                return piece
            line = await self._line()
            size, _, extensions = line.partition(b";")
            size = size.rstrip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size):  # no sign, 0x, _, or spaces int() would take
                raise _BadRequest
            self._count_overhead(len(extensions))
            self._body_left = int(size, 16)
            if self._body_left == 0:
                while trailer := await self._line():
                    self._count_overhead(len(trailer))
                self._request_done = True
                return b""

    def _count_overhead(self, n: int) -> None:
        """Chunk extensions and trailers are read and dropped; bound them per request."""
        self._overhead += n
        if self._overhead > _MAX_HEAD:
            raise _BadRequest

    async def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                if end > _MAX_CHUNK_LINE:
                    raise _BadRequest
                line, self.buf = self.buf[:end], self.buf[end + 2 :]
                return line
            if len(self.buf) > _MAX_CHUNK_LINE:
                raise _BadRequest
            self.buf += await self._read()

    async def _write(self, data: bytes) -> None:
        if self._disconnected:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._disconnected = True  # later sends are dropped; receive() reports it


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
            status = int(message["status"])
            head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
            length = -1
            for name, value in message.get("headers", ()):
                lname = bytes(name).lower()
                value = bytes(value)
                if lname == b"content-length":
                    if not value.isdigit() or (length >= 0 and int(value) != length):
                        raise RuntimeError("invalid content-length from the ASGI app")
                    length = int(value)
                    continue  # written once, below
                elif lname == b"connection":
                    if b"close" in value.lower():
                        self.close = True
                    continue  # written by us below
                elif lname == b"transfer-encoding":
                    continue  # framing is ours
                head += (lname, b": ", value, b"\r\n")
            if length >= 0:
                head.append(b"content-length: %d\r\n" % length)
            self.started = True
            self._head = head
            self._no_body = self._head_only or status in _NO_BODY or status < 200
            self._left = length
            return
        if kind != "http.response.body" or self.finished:
            if self.finished:
                return
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.started:
            raise RuntimeError("http.response.body before http.response.start")
        body: bytes = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        out: list[bytes] = []
        if not self._no_body and self._left >= 0:
            if len(body) > self._left:
                log.error("the ASGI app sent more body bytes than it declared; dropped")
                body = body[: self._left]
                self.close = True
            self._left -= len(body)
            if not more and self._left:
                log.error("the ASGI app sent fewer body bytes than it declared")
                self.close = True  # the client sees the body end early: an honest signal
        if self._head is not None:
            head, self._head = self._head, None
            self._conn._continue = False  # never a 100 Continue after a final status
            if self._left < 0 and not self._no_body:
                if not more:
                    head.append(b"content-length: %d\r\n" % len(body))
                elif self._http11:
                    head.append(b"transfer-encoding: chunked\r\n")
                    self._chunked = True
                else:
                    self.close = True  # HTTP/1.0: the body ends with the connection
            if self.close or self._conn.server.draining or not self._keep_alive:
                head.append(b"connection: close\r\n")
                self.close = True
            elif not self._http11:
                head.append(b"connection: keep-alive\r\n")
            head.append(b"\r\n")
            out += head
        if not self._no_body and body:
            if self._chunked:
                out += (b"%x\r\n" % len(body), body, b"\r\n")
            else:
                out.append(body)
        if not more:
            if self._chunked and not self._no_body:
                out.append(b"0\r\n\r\n")
            self.finished = True
        if out:
            await self._conn._write(b"".join(out))
        if self.finished:
            self._conn.response_finished()

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


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")


def _parse_head(head: bytes) -> tuple[str, bytes, bytes, list[tuple[bytes, bytes]]]:
    """Parse a request head strictly: whatever passes here is forwarded upstream, so a bare CR
    or LF, a NUL, a control byte in the target or a malformed name must not get through."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _BadRequest
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not method.isalpha() or not target:
        raise _BadRequest
    if _BAD_TARGET.search(target) or len(lines) - 1 > _MAX_HEADERS:
        raise _BadRequest
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise _BadRequest  # no obs-fold, no whitespace before the colon, no bare CR/LF
        headers.append((name.lower(), value.strip(b" \t")))
    return method.decode("ascii"), target, version, headers


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
    reuse_port: bool = False,
    task_status: trio.TaskStatus[Sequence[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled, or until ``shutdown_trigger`` returns
    and the drain is over. ``task_status.started`` receives the bound URLs. ``reuse_port``
    lets several processes listen on one port (``SO_REUSEPORT``: the kernel spreads the
    connections), as ``--workers`` does."""
    if reuse_port:
        listeners = await _reuse_port_listeners(host, port)
    else:
        listeners = await trio.open_tcp_listeners(port, host=host)  # backlog: the OS maximum
    urls = []
    for listener in listeners:
        bound = listener.socket.getsockname()
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
        urls.append(f"http://{shown}:{bound[1]}")
    server = _Server(app, keep_alive_timeout)
    async with trio.open_nursery() as connections:
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
