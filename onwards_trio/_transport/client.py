"""A lean HTTP/1.1 client connection for the proxy's hot path, on Trio streams.

Why our own: a proxied request is one request line, a few headers and a body out, then a head
and body bytes back. httpcore (h11 underneath) spends about 250 µs of CPU per request on
events, state machines, locks and tracing around that; this module writes the request with one
``send_all`` and tokenises the response with llhttp (``httptools``, as the server does), which
refuses what a lenient parser would relay: bare CR/LF or control characters in headers, names
with spaces, content-length with transfer-encoding, overflowing lengths, malformed chunks.

Our policy on top: a final status of 200 to 599 only (it is relayed as our status line; no 101,
we never ask for an upgrade); a head over 64 KiB or 200 fields is an error; 1xx interim answers
are skipped; a response to HEAD has no body (a fresh parser takes over, as llhttp would wait
for the body the headers describe); bytes arriving after a response ended mean the connection
is broken (an upstream answering twice would hand the stray answer to the next request), so
it is not reused. Requests are written whole (the
gateway has read the body already) and refused if their head holds a control character. No
pipelining, no upgrades. Errors are raised as httpcore's exception types, so callers handle one
family whichever client is underneath.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Awaitable, Callable

import httpcore
import httptools
import trio

from onwards_trio._transport.heads import clean_head
from onwards_trio._transport.sockio import SocketIO

__all__ = ["Connection", "NoResponse", "Response"]

_MAX_HEAD = 64 * 1024
_MAX_HEADERS = 200
_READ = 64 * 1024


class NoResponse(httpcore.RemoteProtocolError):
    """The connection failed before a single byte of the response arrived (typically a
    kept-alive connection the server had just closed): the request may be retried once on a
    fresh connection."""


class _HeadTooLarge(Exception):
    pass


class _Parser:
    """llhttp's callbacks for one connection's responses (one at a time: no pipelining)."""

    __slots__ = (
        "_llhttp",
        "body",
        "complete",
        "head_done",
        "headers",
        "keep_alive",
        "size",
        "status",
        "stray",
        "waiting",
    )

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0  # the status of the last head read (llhttp's, read once per head)
        self.body: list[bytes] = []
        self.size = 0
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.waiting = False  # a request is out and its final response not yet complete
        self.stray = False  # a message began while none was expected
        self._llhttp = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise httpcore.RemoteProtocolError("unexpected upgrade response") from None
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                raise httpcore.RemoteProtocolError("response head too large") from None
            if not self.waiting:
                self.stray = True  # garbage after a complete response: never reuse
                return
            raise httpcore.RemoteProtocolError(f"malformed response: {exc}") from None

    def on_message_begin(self) -> None:
        if not self.waiting:
            self.stray = True  # an answer nobody asked for: ignored, and the link not reused
            return
        self.headers = []
        self.size = 0
        self.head_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.stray:
            return
        size = self.size = self.size + len(name) + len(value) + 4
        headers = self.headers
        if size > _MAX_HEAD or len(headers) >= _MAX_HEADERS:
            raise _HeadTooLarge
        if not self.head_done:  # trailers are checked by llhttp, bounded here, dropped
            headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        if self.stray:
            return
        self.head_done = True
        self.size = 0
        llhttp = self._llhttp
        self.keep_alive = llhttp.should_keep_alive()
        self.status = llhttp.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self.stray:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.stray:
            return
        status = self.status
        if 100 <= status < 200 and status != 101:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self.complete = True
        self.waiting = False


def _runs_to_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """True when neither content-length nor a final ``chunked`` coding frames the body."""
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            return False
        if lname == b"transfer-encoding":
            return not value.lower().endswith(b"chunked")
    return True


class Connection:
    """One keep-alive connection to an origin. Not safe for concurrent requests (the pool
    hands a connection to one request at a time)."""

    __slots__ = (
        "_clock",
        "_io",
        "_parser",
        "_poll",
        "_stream",
        "expires_at",
        "reusable",
        "timed_out",
    )

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        # The run's clock, read directly: trio.current_time() finds it through two more calls
        # and a thread-local lookup, on every health check.
        self._clock = trio.lowlevel.current_clock()
        # Plain TCP (the usual upstream on a private network or loopback): the lean socket
        # calls; TLS goes through the stream.
        self._io: SocketIO | trio.abc.Stream = (
            SocketIO(stream.socket) if isinstance(stream, trio.SocketStream) else stream
        )
        self._parser = _Parser()
        self._poll: select.poll | None = None  # for is_healthy
        self.reusable = False  # set when a response was read to its end on a kept-alive link
        self.expires_at = 0.0
        self.timed_out = False  # aborted by the pool's watchdog: its deadline passed

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
        if self._clock.current_time() >= self.expires_at or self._parser.stray:
            return False
        poll = self._poll
        if poll is None:  # made once per connection: a check is then one poll(2)
            sock = getattr(self._stream, "socket", None)
            if sock is None:
                transport = getattr(self._stream, "transport_stream", None)
                sock = getattr(transport, "socket", None)
            if sock is None:
                return False
            poll = self._poll = select.poll()
            poll.register(sock.fileno(), select.POLLIN)
        return not poll.poll(0)

    def abort(self) -> None:
        """Close the socket from outside the task using the connection (the watchdog): a call
        waiting on it wakes with an error, later ones fail; :meth:`aclose` still follows."""
        self.reusable = False
        sock = getattr(self._stream, "socket", None)
        if sock is None:
            sock = getattr(getattr(self._stream, "transport_stream", None), "socket", None)
        if sock is not None:
            sock.close()

    async def aclose(self) -> None:
        self.reusable = False
        await trio.aclose_forcefully(self._stream)

    async def _receive(self) -> bytes:
        """The next bytes of a response's body."""
        try:
            return bytes(await self._io.receive_some(_READ))
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
        if method == b"CONNECT":
            raise httpcore.UnsupportedProtocol("CONNECT is not proxied")
        out = [method, b" ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            out += (name, b": ", value, b"\r\n")
        out.append(b"\r\n")
        head = b"".join(out)
        if not clean_head(head, len(headers) + 2):  # a value must not split the request
            raise httpcore.LocalProtocolError("a control character in the request head")
        parser = self._parser
        parser.waiting = True
        parser.complete = False
        parser.head_done = False
        try:
            io = self._io
            await io.send_all(head + body if len(body) < _READ else head)
            if len(body) >= _READ:
                await io.send_all(body)  # no copy of a large body
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise NoResponse(f"connection broken while sending: {exc}") from None
        first = True
        status = 0
        # plain TCP: the request was just written, so the first read waits for the socket
        # first (see SocketIO.receive_when_ready); read here, not through _receive (one
        # coroutine less while the upstream answers)
        lean = type(io) is SocketIO
        while True:
            if parser.head_done:
                status = parser.status
                if not 100 <= status < 200 or status == 101:
                    break  # a final answer's head (an interim one's is skipped: the next follows)
            try:
                if first and lean:
                    data = await io.receive_when_ready(_READ)  # type: ignore[union-attr]
                else:
                    data = bytes(await io.receive_some(_READ))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if first:
                    raise NoResponse(str(exc) or "connection broken") from None
                raise httpcore.ReadError(str(exc) or "connection broken") from None
            if not data:
                if first:
                    raise NoResponse("server disconnected without sending a response")
                raise httpcore.RemoteProtocolError("server disconnected in the response head")
            first = False
            parser.feed(data)
        if not 200 <= status <= 599:  # relayed as our status line; 101: not asked for
            raise httpcore.RemoteProtocolError("unexpected response status")
        return Response(self, method == b"HEAD", status, parser.headers)


class Response:
    """A response whose body is read on demand by :meth:`aiter_stream` (once)."""

    __slots__ = ("_conn", "_done", "_until_close", "headers", "status")

    def __init__(
        self, conn: Connection, head_only: bool, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        self._done = False
        parser = conn._parser
        # Without content-length or chunked framing the body runs to the end of the
        # connection (llhttp cannot tell that end from a cut: we do, and never reuse it).
        self._until_close = not parser.complete and _runs_to_close(headers)
        if head_only:
            # llhttp would wait for the body the headers describe: a fresh parser takes over,
            # unless body bytes came anyway (then the link is not reused).
            self._done = True
            conn.reusable = parser.keep_alive and not parser.body and not parser.stray
            conn._parser = _Parser()
        elif parser.complete and not parser.body:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        parser = self._conn._parser
        self._conn.reusable = parser.keep_alive and not parser.stray and not self._until_close

    def ended(self) -> bool:
        """True (and the connection done with) when the body is over: what the next
        :meth:`__anext__` would end with, without its coroutine and ``StopAsyncIteration``
        (the usual answer, whose whole body came with its head)."""
        parser = self._conn._parser
        if parser.body or not (self._done or parser.complete):
            return False
        if not self._done:
            self._finish()
        return True

    def at_hand(self) -> bytes | None:
        """The body bytes already read, when there are any: what the next :meth:`__anext__`
        returns without reading, without its coroutine (``None``: await that)."""
        parser = self._conn._parser
        pieces = parser.body
        if not pieces:
            return None
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        if parser.complete:
            self._finish()
        return data

    def aiter_stream(self) -> Response:
        return self

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        parser = self._conn._parser
        while True:
            ready = self.at_hand()
            if ready is not None:
                return ready
            if self._done or parser.complete:
                if not self._done:
                    self._finish()
                raise StopAsyncIteration
            data = await self._conn._receive()
            if not data:
                if self._until_close:
                    self._done = True
                    raise StopAsyncIteration
                raise httpcore.RemoteProtocolError("server disconnected mid-body")
            parser.feed(data)

    async def relay(
        self,
        write: Callable[[bytes], Awaitable[object]],
        transform: Callable[[bytes], bytes] | None,
    ) -> None:
        """Read the rest of the body, passing each piece to ``write`` as it arrives, until the
        body ends; ``transform`` (if any) rewrites each piece first, and a piece it empties is
        not written. Raises as :meth:`__anext__` does.

        Why: a stream's pieces come one at a time, so iterating costs a trip through every
        layer above this one per event; this loop costs one wait for the socket, one read
        and one ``write``. The connection is done with (:meth:`_finish`) before the last piece
        is written, as iterating would have it."""
        conn = self._conn
        parser = conn._parser
        io = conn._io
        # plain TCP: wait, then read (events come one at a time); TLS: the stream's own read
        receive = io.receive_when_ready if isinstance(io, SocketIO) else io.receive_some
        pieces = parser.body
        while True:
            if pieces:
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                if parser.complete:
                    self._finish()
                if transform is not None:
                    data = transform(data)
                if data:
                    await write(data)
                continue
            if self._done or parser.complete:
                if not self._done:
                    self._finish()
                return
            try:
                data = bytes(await receive(_READ))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpcore.ReadError(str(exc) or "connection broken") from None
            if not data:
                if self._until_close:
                    self._done = True
                    return
                raise httpcore.RemoteProtocolError("server disconnected mid-body")
            parser.feed(data)

    def close(self) -> None:
        """Stop reading. A body left unread makes the connection unusable: it is closed."""
        if not self._done:
            self._done = True
            self._conn.reusable = False

    async def aclose(self) -> None:
        self.close()
