"""A lean HTTP/1.1 client connection for the proxy's hot path, on Trio streams.

Why our own: a proxied request is one request line, a few headers and a body out, then a head
and body bytes back. httpcore (h11 underneath) spends about 250 µs of CPU per request on
events, state machines, locks and tracing around that; this module does the same work with
``bytes.find`` and one ``send_all`` — the upstream side was half of the gateway's CPU.

Scope, deliberately small: requests are written whole (the gateway has read the body already);
responses are framed by ``content-length``, ``transfer-encoding: chunked`` or end of
connection; 1xx interim answers are skipped; no pipelining, no upgrades. Errors are raised as
httpcore's exception types, so callers handle one family whichever client is underneath.
"""

from __future__ import annotations

import re
import ssl

import httpcore
import trio

__all__ = ["Connection", "NoResponse", "Response"]

_MAX_HEAD = 64 * 1024
_READ = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class NoResponse(httpcore.RemoteProtocolError):
    """The connection failed before a single byte of the response arrived (typically a
    kept-alive connection the server had just closed): the request may be retried once on a
    fresh connection."""


class Connection:
    """One keep-alive connection to an origin. Not safe for concurrent requests (the pool
    hands a connection to one request at a time)."""

    __slots__ = ("_buf", "_stream", "expires_at", "reusable")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buf = b""
        self.reusable = False  # set when a response was read to its end on a kept-alive link
        self.expires_at = 0.0

    @classmethod
    async def connect(
        cls,
        scheme: bytes,
        host: str,
        port: int,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None,
    ) -> Connection:
        try:
            with trio.fail_after(connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                if scheme == b"https":
                    assert ssl_context is not None
                    tls = trio.SSLStream(stream, ssl_context, server_hostname=host)
                    try:
                        await tls.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
                    stream = tls
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"connect to {host}:{port} timed out") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise httpcore.ConnectError(f"cannot connect to {host}:{port}: {exc}") from None
        return cls(stream)

    def is_healthy(self) -> bool:
        """An idle connection is reusable only if nothing arrived on it (a FIN or stray bytes
        mean the server closed or broke it) and it has not expired."""
        if trio.current_time() >= self.expires_at or self._buf:
            return False
        sock = getattr(self._stream, "socket", None)
        if sock is None:
            transport = getattr(self._stream, "transport_stream", None)
            sock = getattr(transport, "socket", None)
        return sock is not None and not sock.is_readable()

    async def aclose(self) -> None:
        self.reusable = False
        await trio.aclose_forcefully(self._stream)

    async def _receive(self) -> bytes:
        try:
            return bytes(await self._stream.receive_some(_READ))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpcore.ReadError(str(exc) or "connection broken") from None

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> Response:
        """Write the request; return once the response head arrived (body still to read).

        ``headers`` must already hold ``host`` and, when there is a body, ``content-length``.
        """
        self.reusable = False
        out = [method, b" ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            out += (name, b": ", value, b"\r\n")
        out.append(b"\r\n")
        out.append(body)
        try:
            await self._stream.send_all(b"".join(out))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise NoResponse(f"connection broken while sending: {exc}") from None
        status, response_headers, keep_alive = await self._read_head(first=True)
        while 100 <= status < 200 and status != 101:
            # 1xx answers (100 Continue, 103 Early Hints) precede the real one
            status, response_headers, keep_alive = await self._read_head(first=False)
        if status == 101:
            keep_alive = False  # no longer HTTP on this connection
        return Response(self, method, status, response_headers, keep_alive)

    async def _read_head(self, first: bool) -> tuple[int, list[tuple[bytes, bytes]], bool]:
        """The next response head. Only when ``first`` and not a byte of it arrived is a
        failure :class:`NoResponse` (safe to retry): once the server answered anything, the
        request may have been acted on."""
        buf = self._buf
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", max(0, start - 3))
            if end >= 0:
                break
            if len(buf) > _MAX_HEAD:
                raise httpcore.RemoteProtocolError("response head too large")
            start = len(buf)
            try:
                data = await self._receive()
            except httpcore.ReadError as exc:
                if first and not buf:
                    raise NoResponse(str(exc)) from None
                raise
            if not data:
                if first and not buf:
                    raise NoResponse("server disconnected without sending a response")
                raise httpcore.RemoteProtocolError("server disconnected in the response head")
            buf += data
        self._buf = buf[end + 4 :]
        lines = buf[:end].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if (
            version not in (b"HTTP/1.1", b"HTTP/1.0")
            or not code.isdigit()
            or not b"100" <= code <= b"599"  # relayed to the client as the status line
            or rest[3:4] not in (b"", b" ")
        ):
            raise httpcore.RemoteProtocolError("malformed response status line")
        headers: list[tuple[bytes, bytes]] = []
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or _BAD_VALUE.search(line):
                # a bare CR/LF or NUL would be relayed to the client: response splitting
                raise httpcore.RemoteProtocolError("malformed response header")
            value = value.strip()
            headers.append((name, value))
            if name.lower() == b"connection":
                tokens = value.lower()
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
        return int(code), headers, keep_alive


class Response:
    """A response whose body is read on demand by :meth:`aiter_stream` (once)."""

    __slots__ = (
        "_chunk_left",
        "_conn",
        "_done",
        "_keep_alive",
        "_mode",
        "_remaining",
        "headers",
        "status",
    )

    def __init__(
        self,
        conn: Connection,
        method: bytes,
        status: int,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        self._keep_alive = keep_alive
        self._remaining = 0
        self._chunk_left = -1  # chunked: bytes left in the current chunk; -1 = read a size line
        self._done = False
        length: int | None = None
        codings: list[bytes] = []
        for name, value in headers:
            lname = name.lower()
            if lname == b"transfer-encoding":
                codings += (c.strip() for c in value.lower().split(b","))
            elif lname == b"content-length":
                # digits only (int() would take "-1", "+1", " 1", "1_0"); repeats must agree
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise httpcore.RemoteProtocolError("malformed content-length")
                length = int(value)
        chunked = False
        if codings:
            # RFC 9112 §6.3: transfer-encoding overrides content-length, which is dropped so it
            # is never relayed beside a body of another length; such a message is suspect, so
            # the connection is not reused. Unless chunked is the final coding, the body runs
            # to the end of the connection.
            chunked = codings[-1] == b"chunked"
            if length is not None:
                length = None
                self._keep_alive = False
                self.headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        if method == b"CONNECT" and 200 <= status < 300:
            self._mode = "close"  # a tunnel now (RFC 9112 §6.3): never reused
            self._keep_alive = False
        elif method == b"HEAD" or status in _NO_BODY_STATUS or status < 200:
            self._mode = "none"
        elif chunked:
            self._mode = "chunked"
        elif length is not None:
            self._mode = "length"
            self._remaining = length
        else:
            self._mode = "close"  # the body runs to the end of the connection
            self._keep_alive = False
        if self._mode == "none" or (self._mode == "length" and length == 0):
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self._conn.reusable = self._keep_alive

    def aiter_stream(self) -> Response:
        return self

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        conn = self._conn
        mode = self._mode
        if mode == "length":
            data = conn._buf
            if data:
                conn._buf = b""
            else:
                data = await conn._receive()
                if not data:
                    raise httpcore.RemoteProtocolError("server disconnected mid-body")
            if len(data) >= self._remaining:
                data, conn._buf = data[: self._remaining], data[self._remaining :]
                self._remaining = 0
                self._finish()
            else:
                self._remaining -= len(data)
            return data
        if mode == "chunked":
            return await self._next_chunk()
        data = conn._buf or await conn._receive()  # mode "close"
        conn._buf = b""
        if not data:
            self._done = True
            raise StopAsyncIteration
        return data

    async def _next_chunk(self) -> bytes:
        conn = self._conn
        while True:
            if self._chunk_left > 0:
                data = conn._buf or await conn._receive()
                if not data:
                    raise httpcore.RemoteProtocolError("server disconnected mid-chunk")
                take = min(len(data), self._chunk_left)
                conn._buf = data[take:]
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._chunk_left = -2  # the CRLF after the chunk data is next
                return data[:take]
            line = await self._line()
            if self._chunk_left == -2:  # the CRLF closing a chunk
                if line:
                    raise httpcore.RemoteProtocolError("malformed chunk terminator")
                self._chunk_left = -1
                continue
            if self._chunk_left == -3:  # trailers until the empty line
                if not line:
                    self._finish()
                    raise StopAsyncIteration
                continue
            size = line.split(b";", 1)[0].rstrip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size):  # int() would take "-1", "0x5", "+5", "1_0"
                raise httpcore.RemoteProtocolError("malformed chunk size")
            self._chunk_left = int(size, 16)
            if self._chunk_left == 0:
                self._chunk_left = -3

    async def _line(self) -> bytes:
        conn = self._conn
        while True:
            end = conn._buf.find(b"\r\n")
            if end >= 0:
                line, conn._buf = conn._buf[:end], conn._buf[end + 2 :]
                return line
            if len(conn._buf) > _MAX_HEAD:
                raise httpcore.RemoteProtocolError("chunk header too large")
            data = await conn._receive()
            if not data:
                raise httpcore.RemoteProtocolError("server disconnected mid-chunk")
            conn._buf += data

    async def aclose(self) -> None:
        """Stop reading. A body left unread makes the connection unusable: it is closed."""
        if not self._done:
            self._done = True
            self._conn.reusable = False
