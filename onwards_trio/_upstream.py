"""Talking to upstreams: one pooled HTTP client, URL joining, request header filtering.

The hot path uses httpcore's HTTP/1.1 connection (the transport under httpx) directly: it adds
no default headers (httpx would add ``accept-encoding`` and so silently ask upstreams for
compression the client never asked for), does not decompress, and skips httpx's per-request
URL/cookie/auth machinery. Connections are pooled per origin and reused (``http_pool`` sets the
keep-alive size and expiry); the pool is ours because httpcore's rescans all connections on
every request.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpcore
import trio
from httpcore._async.http11 import AsyncHTTP11Connection
from httpcore._backends.trio import TrioBackend

from ._config import HttpPool
from ._targets import Provider

__all__ = [
    "UpstreamClient",
    "dot_segments",
    "forward_headers",
    "upstream_target",
]

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
_FORWARDED_PROTO = (b"x-forwarded-proto", b"https")


def forward_headers(
    headers: list[tuple[bytes, bytes]], provider: Provider, body_length: int | None
) -> list[tuple[bytes, bytes]]:
    """The client's headers minus the dropped ones, plus host, content-length, upstream auth
    and x-forwarded-proto."""
    auth = provider.auth_header
    auth_name = auth[0] if auth else None
    out = [(b"host", provider.host_header)]
    out.extend(
        (k, v)
        for k, v in headers
        if k not in _DROP and k != auth_name and not k.startswith(b"sec-ch-ua")
    )
    if body_length is not None:
        out.append((b"content-length", str(body_length).encode()))
    if auth is not None:
        out.append(auth)
    out.append(_FORWARDED_PROTO)
    return out


def dot_segments(path: str) -> bool:
    """True if a request path holds ``.``/``..`` segments (plain or percent-encoded)."""
    lowered = path.lower().replace("%2e", ".")
    return any(seg in (".", "..") for seg in lowered.split("?", 1)[0].split("/"))


def upstream_target(provider: Provider, raw_path: bytes, query: bytes) -> bytes:
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


class _ReturningStream:
    """The response body stream; closing it hands the connection back to its host pool."""

    __slots__ = ("_conn", "_inner", "_pool")

    def __init__(self, inner: Any, conn: AsyncHTTP11Connection, pool: _HostPool) -> None:
        self._inner = inner
        self._conn: AsyncHTTP11Connection | None = conn
        self._pool = pool

    def __aiter__(self) -> AsyncIterator[bytes]:
        it: AsyncIterator[bytes] = self._inner.__aiter__()
        return it

    async def aclose(self) -> None:
        # Idempotent (the body's end and the request's exit both close it) and shielded: this
        # runs on the way out of cancelled requests too, and a connection that is neither
        # returned nor closed would leak its socket.
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        with trio.CancelScope(shield=True):
            await self._inner.aclose()
            await self._pool.release(conn)


class _HostPool:
    """Idle keep-alive connections to one origin, reused last-in first-out.

    httpcore's general pool rescans every connection for every request (quadratic under
    load); one origin's idle list needs only a pop and a health check.
    """

    __slots__ = ("_client", "_idle", "origin")

    def __init__(self, origin: httpcore.Origin, client: UpstreamClient) -> None:
        self.origin = origin
        self._client = client
        self._idle: list[AsyncHTTP11Connection] = []

    async def _connect(self) -> AsyncHTTP11Connection:
        origin = self.origin
        host = origin.host.decode("ascii")
        stream = await self._client.backend.connect_tcp(
            host, origin.port, timeout=self._client.connect_timeout
        )
        try:
            if origin.scheme == b"https":
                stream = await stream.start_tls(
                    self._client.ssl_context(),
                    server_hostname=host,
                    timeout=self._client.connect_timeout,
                )
        except BaseException:
            await stream.aclose()
            raise
        return AsyncHTTP11Connection(origin, stream, self._client.keepalive_expiry)

    async def request(self, request: httpcore.Request) -> httpcore.Response:
        conn: AsyncHTTP11Connection | None = None
        while self._idle:
            candidate = self._idle.pop()
            if candidate.is_idle() and not candidate.has_expired():
                conn = candidate
                break
            await candidate.aclose()
        if conn is None:
            conn = await self._connect()
        response = await conn.handle_async_request(request)
        response.stream = _ReturningStream(response.stream, conn, self)
        return response

    async def release(self, conn: AsyncHTTP11Connection) -> None:
        if conn.is_idle() and len(self._idle) < self._client.max_idle:
            self._idle.append(conn)
        else:
            await conn.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


class UpstreamClient:
    """Pooled HTTP/1.1 connections to the upstreams. Create once per gateway; close with
    :meth:`aclose`."""

    def __init__(self, http_pool: HttpPool | None = None) -> None:
        spec = http_pool or HttpPool()
        self.max_idle = spec.max_idle_per_host
        self.keepalive_expiry = spec.idle_timeout_secs
        self.connect_timeout = 30.0
        self.backend = TrioBackend()
        self._pools: dict[tuple[bytes, bytes, int | None], _HostPool] = {}
        self._ssl: ssl.SSLContext | None = None

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return self._ssl

    async def send(
        self,
        provider: Provider,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> httpcore.Response:
        """Send a request; returns once the response head arrived (body still streaming)."""
        key = (provider.scheme, provider.host, provider.port)
        pool = self._pools.get(key)
        if pool is None:
            port = provider.port or (443 if provider.scheme == b"https" else 80)
            pool = self._pools[key] = _HostPool(
                httpcore.Origin(provider.scheme, provider.host, port), self
            )
        url = httpcore.URL(
            scheme=provider.scheme, host=provider.host, port=provider.port, target=target
        )
        request = httpcore.Request(
            method,
            url,
            headers=headers,
            content=body,
            extensions={"timeout": {"connect": 30.0, "read": None, "write": 60.0, "pool": None}},
        )
        return await pool.request(request)

    async def aclose(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.aclose()
