"""Talking to upstreams: one pooled HTTP client, URL joining, request header filtering.

The hot path uses httpcore (the transport under httpx) directly: it adds no default headers
(httpx would add ``accept-encoding`` and so silently ask upstreams for compression the client
never asked for), does not decompress, and skips httpx's per-request URL/cookie/auth machinery.
Connections are pooled and reused (``http_pool`` sets the keep-alive size and expiry).
"""

from __future__ import annotations

import httpcore

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


class UpstreamClient:
    """The shared connection pool. Create once per gateway; close with :meth:`aclose`."""

    def __init__(self, http_pool: HttpPool | None = None) -> None:
        spec = http_pool or HttpPool()
        self.pool = httpcore.AsyncConnectionPool(
            max_connections=spec.max_connections,
            max_keepalive_connections=spec.max_idle_per_host,
            keepalive_expiry=spec.idle_timeout_secs,
            http1=True,
            http2=False,
        )

    async def send(
        self,
        provider: Provider,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> httpcore.Response:
        """Send a request; returns once the response head arrived (body still streaming)."""
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
        return await self.pool.handle_async_request(request)

    async def aclose(self) -> None:
        await self.pool.aclose()
