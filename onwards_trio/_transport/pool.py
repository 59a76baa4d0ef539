"""Talking to upstreams: one pooled HTTP client, URL joining, request header filtering.

The hot path uses a lean HTTP/1.1 client of our own (``client.py``): it adds no default headers
(httpx would add ``accept-encoding`` and so silently ask upstreams for compression the client
never asked for), does not decompress, and costs a fraction of httpx/httpcore per request.
Connections are pooled per origin and reused last-in first-out (``http_pool`` sets the
keep-alive size and expiry); an idle connection the server closed is detected before reuse,
and a request that met such a connection before any response byte is tried once more.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from onwards_trio._config import HttpPool
from onwards_trio._transport.client import Connection, NoResponse, Response

__all__ = [
    "Origin",
    "UpstreamClient",
    "UpstreamResponse",
    "dot_segments",
    "forward_headers",
    "upstream_target",
]


class Origin(Protocol):
    """Where a request goes: what the transport needs of a provider (``_proxy.targets.Provider``
    has these fields; the transport does not know about routing)."""

    @property
    def scheme(self) -> bytes: ...
    @property
    def host(self) -> bytes: ...
    @property
    def port(self) -> int | None: ...
    @property
    def host_header(self) -> bytes: ...
    @property
    def base_path(self) -> bytes: ...  # always ends with "/"
    @property
    def prefix(self) -> bytes: ...  # without slashes ("v1"); b"" for a root base
    @property
    def auth_header(self) -> tuple[bytes, bytes] | None: ...


# Hop-by-hop, client-credential, browser-context and conditional headers never go upstream
# (onwards' list), plus the ones the transport computes itself (host, content-length, te).
_DROP = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"authorization",
        b"x-api-key",
        b"api-key",
        b"sec-fetch-site",
        b"sec-fetch-mode",
        b"sec-fetch-dest",
        b"sec-fetch-user",
        b"origin",
        b"referer",
        b"cookie",
        b"if-modified-since",
        b"if-none-match",
        b"if-match",
        b"if-unmodified-since",
        b"if-range",
        b"model-override",
    }
)
# What the client claims about the path it came by: only a proxy in front of us that the
# operator trusts (``trust_forwarded_headers``) may pass it on; our own x-forwarded-proto wins.
_CLIENT_FORWARDING = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip"}
)
_DROP_UNTRUSTED = _DROP | _CLIENT_FORWARDING | {b"x-forwarded-proto"}
_DROP = _DROP | {b"x-forwarded-proto"}
_FORWARDED_PROTO = (b"x-forwarded-proto", b"https")


def forward_headers(
    headers: list[tuple[bytes, bytes]],
    provider: Origin,
    body_length: int | None,
    *,
    trust_forwarded: bool = False,
) -> list[tuple[bytes, bytes]]:
    """The client's headers minus the dropped ones, plus host, content-length, upstream auth
    and x-forwarded-proto. Names with an underscore are dropped too: some servers read
    ``transfer_encoding`` as ``transfer-encoding`` (nginx and others refuse them by default)."""
    auth = provider.auth_header
    auth_name = auth[0] if auth else None
    drop = _DROP if trust_forwarded else _DROP_UNTRUSTED
    out = [(b"host", provider.host_header)]
    named = False
    for field in headers:  # one pass; a loop, not a generator: no resumption per field
        name = field[0]
        if name in drop:
            if name == b"connection":
                named = True
        # find, not ``in``: ``b"_" in name`` first tries b"_" as an integer (a TypeError,
        # built and dropped: several times the cost of the search)
        elif name != auth_name and name.find(b"_") < 0 and not name.startswith(b"sec-ch-ua"):
            out.append(field)
    if named:  # it names more hop-by-hop headers (RFC 9110 §7.6.1), wherever they stand
        for name, value in headers:
            if name == b"connection":
                drop = drop.union(t.strip().lower() for t in value.split(b","))
        out[1:] = [field for field in out[1:] if field[0] not in drop]
    if body_length is not None:
        out.append((b"content-length", b"%d" % body_length))
    if auth is not None:
        out.append(auth)
    out.append(_FORWARDED_PROTO)
    return out


def dot_segments(path: bytes) -> bool:
    """True if a request path holds ``.``/``..`` segments: plain, percent-encoded (also more
    than once, ``%252e``, for upstreams that decode twice), or delimited by a backslash (which
    some servers read as ``/``)."""
    if path.find(b".") < 0 and path.find(b"%") < 0:  # find: see forward_headers
        return False  # the common case (``/v1/chat/completions``): nothing to split
    lowered = path.split(b"?", 1)[0].lower()
    while b"%25" in lowered:
        lowered = lowered.replace(b"%25", b"%")
    lowered = lowered.replace(b"%2e", b".").replace(b"%5c", b"/").replace(b"\\", b"/")
    return any(seg in (b".", b"..") for seg in lowered.split(b"/"))


def upstream_target(provider: Origin, raw_path: bytes, query: bytes) -> bytes:
    """Join the provider's base path and the request path by string concatenation.

    The request path can only ever extend the base path, never change the host. A leading
    segment equal to the base path (``/v1`` against ``https://api.openai.com/v1``) is dropped
    at a segment boundary so it is not doubled.
    """
    rel = raw_path[1:] if raw_path.startswith(b"/") else raw_path
    prefix = provider.prefix
    if prefix and rel.startswith(prefix):
        rest = rel[len(prefix) :]
        if not rest or rest.startswith(b"/"):
            rel = rest[1:]
    target = provider.base_path + rel
    if query:
        target += b"?" + query
    return target


class UpstreamResponse:
    """A response on a pooled connection; closing it (idempotent, shielded) hands the
    connection back to the pool when it can carry another request, or closes it."""

    __slots__ = ("_conn", "_pool", "_response", "headers", "status")

    def __init__(self, response: Response, conn: Connection, pool: _HostPool) -> None:
        self._response = response
        self._conn: Connection | None = conn
        self._pool = pool
        self.status = response.status
        self.headers = response.headers

    def aiter_stream(self) -> Response:
        """The body's iterator: the connection's response itself (no call of this class's
        own per chunk); closing this response still hands the connection back."""
        return self._response

    def __aiter__(self) -> UpstreamResponse:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._response.__anext__()  # no coroutine of its own per chunk

    def ended(self) -> bool:
        """:meth:`Response.ended <onwards_trio._transport.client.Response.ended>`."""
        return self._response.ended()

    def relay(
        self,
        write: Callable[[bytes], Awaitable[object]],
        transform: Callable[[bytes], bytes] | None,
    ) -> Awaitable[None]:
        """:meth:`Response.relay <onwards_trio._transport.client.Response.relay>`: the rest of
        the body to ``write``, piece by piece (no frame of its own while it waits)."""
        return self._response.relay(write, transform)

    def close_now(self) -> Awaitable[None] | None:
        """:meth:`aclose` without a coroutine for the usual case: the connection is handed
        back (or closed) now; returns what is left to wait for (connections to close), or
        ``None`` when nothing is (also when the response was closed already)."""
        conn = self._conn
        if conn is None:
            return None
        self._conn = None
        pool = self._pool
        try:
            self._response.close()
            doomed = pool.park(conn)
        except BaseException:
            pool.done()
            raise
        if not doomed:
            pool.done()
            return None
        return self._close_doomed(doomed)

    async def _close_doomed(self, doomed: list[Connection]) -> None:
        try:
            # Shielded: this runs on the way out of cancelled requests too, and a
            # connection that is neither returned nor closed would leak its socket.
            with trio.CancelScope(shield=True):
                for old in doomed:
                    await old.aclose()
        finally:
            self._pool.done()

    async def aclose(self) -> None:
        pending = self.close_now()
        if pending is not None:
            await pending


class _HostPool:
    """Idle keep-alive connections to one origin, reused last-in first-out. With
    ``http_pool.max_connections``, at most that many connections (idle or busy) are open at
    once; a request beyond waits for one to be handed back."""

    __slots__ = ("_client", "_clock", "_idle", "_slots", "host", "port", "scheme")

    def __init__(self, scheme: bytes, host: bytes, port: int, client: UpstreamClient) -> None:
        self.scheme = scheme
        self.host = host.decode("ascii").strip("[]")
        self.port = port
        self._client = client
        # made in a run (by send): its clock, read directly on every hand-back (cheaper than
        # trio.current_time(), which finds it through two more calls and a thread-local)
        self._clock = trio.lowlevel.current_clock()
        self._idle: list[Connection] = []
        limit = client.max_connections
        self._slots = trio.Semaphore(limit) if limit is not None else None

    def done(self) -> None:
        """A request's connection went back to the pool or was closed."""
        if self._slots is not None:
            self._slots.release()

    async def _idle_connection(self) -> Connection | None:
        """A healthy idle connection (the ones the server closed meanwhile are closed)."""
        while self._idle:
            conn = self._idle.pop()
            if conn.is_healthy():
                return conn
            await conn.aclose()
        return None

    def _idle_at_hand(self) -> Connection | None:
        """The last idle connection if it is healthy: the usual case, without the coroutine
        of :meth:`_idle_connection` (which closes the dead ones)."""
        idle = self._idle
        if idle and idle[-1].is_healthy():
            return idle.pop()
        return None

    async def _connect(self) -> Connection:
        client = self._client
        return await Connection.connect(
            self.scheme,
            self.host,
            self.port,
            client.connect_timeout,
            client.ssl_context() if self.scheme == b"https" else None,
        )

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        watch: _Watchdog | None = None,
        deadline: float = math.inf,
    ) -> UpstreamResponse:
        """With ``watch``, the exchange on a connection is aborted at ``deadline`` by the
        watchdog (then ``trio.TooSlowError``); waiting for a slot or a new connection is
        bounded by a cancel scope (the rare case)."""
        slots = self._slots
        if slots is not None:
            if watch is None:
                await slots.acquire()
            else:
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    with trio.CancelScope(deadline=deadline) as scope:
                        await slots.acquire()
                    if scope.cancelled_caught:
                        raise trio.TooSlowError from None
        try:
            for _ in range(2):
                conn = self._idle_at_hand()
                if conn is None and self._idle:
                    conn = await self._idle_connection()
                reused = conn is not None
                if conn is None:
                    if watch is None:
                        conn = await self._connect()
                    else:
                        with trio.CancelScope(deadline=deadline) as scope:
                            conn = await self._connect()
                        if scope.cancelled_caught or conn is None:
                            raise trio.TooSlowError
                if watch is not None:
                    watch.add(conn, deadline)
                try:
                    response = await conn.request(method, target, headers, body)
                except BaseException as exc:
                    if watch is not None:
                        watch.conns.pop(conn, None)
                    await conn.aclose()
                    if conn.timed_out and isinstance(exc, Exception):
                        raise trio.TooSlowError from None
                    if reused and isinstance(exc, NoResponse):
                        continue  # the server had closed that idle connection: one fresh try
                    raise
                if watch is not None:
                    watch.conns.pop(conn, None)
                return UpstreamResponse(response, conn, self)
            raise NoResponse("no response on a fresh connection")  # pragma: no cover
        except BaseException:
            self.done()
            raise

    def park(self, conn: Connection) -> list[Connection]:
        """Keep ``conn`` for reuse if it can carry another request; return the connections to
        close (it, when it cannot, and expired idle ones). Synchronous: the usual hand-back
        costs no checkpoint and no shielded scope."""
        now = self._clock.current_time()
        idle = self._idle
        doomed: list[Connection] = []
        # Idle connections are stacked in expiry order; under steady traffic only the top is
        # reused, so the expired ones at the bottom are closed here, not left open for good.
        while idle and idle[0].expires_at <= now:
            doomed.append(idle.pop(0))
        if conn.reusable and len(idle) < self._client.max_idle:
            conn.expires_at = now + self._client.keepalive_expiry
            idle.append(conn)
        else:
            doomed.append(conn)
        return doomed

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


_TICK = 1.0  # the watchdog's longest sleep: later deadlines need no wake-up when added


class _Watchdog:
    """Aborts the connections whose request is past its deadline, from one task.

    Why: a cancel scope per upstream request (``trio.fail_after``) costs about a tenth of a
    proxied request's CPU. Here a request adds its connection and deadline to a dict and
    removes it when the response head is in; the task wakes at the earliest deadline or every
    ``_TICK`` seconds, whichever is first, so only a deadline under a second away moves its
    wake-up (a deadline change on one scope, not a scope per request).
    """

    __slots__ = ("_sleep", "conns", "wake_at")

    def __init__(self) -> None:
        self.conns: dict[Connection, float] = {}
        self.wake_at = math.inf
        self._sleep: trio.CancelScope | None = None

    def add(self, conn: Connection, deadline: float) -> None:
        self.conns[conn] = deadline
        if deadline < self.wake_at:
            self.wake_at = deadline
            if self._sleep is not None:
                self._sleep.deadline = deadline

    async def run(self) -> None:
        conns = self.conns
        while True:
            now = trio.current_time()
            wake = now + _TICK
            for conn, deadline in list(conns.items()):
                if deadline <= now:
                    del conns[conn]
                    conn.timed_out = True
                    conn.abort()
                elif deadline < wake:
                    wake = deadline
            self.wake_at = wake
            with trio.CancelScope(deadline=wake) as self._sleep:
                await trio.sleep_forever()


class UpstreamClient:
    """Pooled HTTP/1.1 connections to the upstreams. Create once per gateway; close with
    :meth:`aclose`. While :meth:`watch_deadlines` runs, :meth:`send` enforces its deadline
    without a cancel scope per request."""

    def __init__(self, http_pool: HttpPool | None = None) -> None:
        spec = http_pool or HttpPool()
        self.max_idle = spec.max_idle_per_host
        self.keepalive_expiry = spec.idle_timeout_secs
        self.max_connections = spec.max_connections  # per origin; None: no limit
        self.connect_timeout = 30.0
        self._pools: dict[tuple[bytes, bytes, int | None], _HostPool] = {}
        self._ssl: ssl.SSLContext | None = None
        self._watch: _Watchdog | None = None
        # The run's clock while :meth:`watch_deadlines` runs (None otherwise): a caller reads
        # the time for a ``deadline`` from it directly, cheaper than trio.current_time().
        self.clock: trio.abc.Clock | None = None

    async def watch_deadlines(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Enforce :meth:`send` deadlines until cancelled (the gateway runs this in its
        service nursery)."""
        watch = _Watchdog()
        self._watch = watch
        self.clock = trio.lowlevel.current_clock()
        try:
            task_status.started()
            await watch.run()
        finally:
            self._watch = None
            self.clock = None

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return self._ssl

    def send(
        self,
        provider: Origin,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        deadline: float | None = None,
    ) -> Awaitable[UpstreamResponse]:
        """Send a request; returns once the response head arrived (body still streaming).
        Past ``deadline`` (trio time; only while :attr:`watching`) without the head:
        ``trio.TooSlowError``."""
        key = (provider.scheme, provider.host, provider.port)
        pool = self._pools.get(key)
        if pool is None:
            port = provider.port or (443 if provider.scheme == b"https" else 80)
            pool = self._pools[key] = _HostPool(provider.scheme, provider.host, port, self)
        # The pool's coroutine is returned, not awaited here: one coroutine less per request.
        if deadline is None:
            return pool.request(method, target, headers, body)
        watch = self._watch
        if watch is None:
            raise RuntimeError("a deadline needs watch_deadlines() running")
        return pool.request(method, target, headers, body, watch, deadline)

    async def aclose(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.aclose()
