"""The gateway's proxy pipeline as the loop's model transport: each model call of a response
loop is a proxied ``/v1/chat/completions`` (routing, auth, limits, failover, filters)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType

from onwards_trio._errors import HTTPError
from onwards_trio._loop.model import ModelResponse
from onwards_trio._proxy.pipeline import Proxy, ProxyRequest, UpstreamReply
from onwards_trio._transport.asgi import loads_off_loop

__all__ = ["MODEL_CALL_DROP", "ProxyModelTransport"]

# Client headers that describe the client's own request, not the model call made for it.
# idempotency-key: the client's key names its whole request, not each model call of its loop
# (an upstream honouring it would answer every later call with the first one's result).
MODEL_CALL_DROP = frozenset(
    {
        b"content-length",
        b"content-type",
        b"accept",
        b"accept-encoding",
        b"model-override",
        b"idempotency-key",
    }
)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


class ProxyModelTransport:
    """A :class:`ModelTransport` through the gateway's proxy pipeline, as the client.

    The payload's ``model`` picks the alias (so a sub-agent on another alias is routed there);
    the client's headers go along, so its key is checked and forwarded exactly as for a proxied
    ``/v1/chat/completions``. A gateway error (limits, auth, no upstream) becomes a reply with
    that status and error body, which the loop records as a failed model step. The first
    non-2xx reply is remembered so a non-streaming caller can be answered with it.
    """

    def __init__(
        self,
        proxy: Proxy,
        headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        request_id: str | None = None,
        route: str | None = None,
    ) -> None:
        self.proxy = proxy
        self.headers = [(k, v) for k, v in headers if k not in MODEL_CALL_DROP]
        # what the usage ledger files each model call under (the response id, its route)
        self.request_id = request_id
        self.route = route
        self.first_error: tuple[int, bytes] | None = None

    def open(self, payload: bytes, *, stream: bool) -> _ModelCall:
        return _ModelCall(self, payload, stream)


class _ModelCall:
    """One model call as an async context manager (a class rather than a generator manager
    over an exit stack: this is on every response's path). Entering runs the pipeline;
    leaving closes the upstream response and releases every permit."""

    __slots__ = ("payload", "stream", "transport", "upstream")

    def __init__(self, transport: ProxyModelTransport, payload: bytes, stream: bool) -> None:
        self.transport = transport
        self.payload = payload
        self.stream = stream
        self.upstream: AbstractAsyncContextManager[UpstreamReply] | None = None

    async def __aenter__(self) -> ModelResponse:
        transport = self.transport
        accept = b"text/event-stream" if self.stream else b"application/json"
        request = ProxyRequest(
            method=b"POST",
            raw_path=b"/v1/chat/completions",
            query=b"",
            headers=[
                *transport.headers,
                (b"content-type", b"application/json"),
                (b"accept", accept),
            ],
            body=self.payload,
            json=await loads_off_loop(self.payload),
            request_id=transport.request_id,
            route=transport.route,
        )
        upstream = transport.proxy.open_upstream(request)
        try:
            reply = await upstream.__aenter__()
        except HTTPError as exc:
            if transport.first_error is None:
                transport.first_error = (exc.status, exc.body)
            return ModelResponse(
                exc.status, [(b"content-type", b"application/json")], _once(exc.body)
            )
        self.upstream = upstream
        if not 200 <= reply.status < 300 and transport.first_error is None:
            try:
                body = b"".join([chunk async for chunk in reply.body])
            except BaseException as exc:
                self.upstream = None
                await upstream.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            transport.first_error = (reply.status, body)
            return ModelResponse(reply.status, reply.headers, _once(body))
        return ModelResponse(reply.status, reply.headers, reply.body)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return False
        return await upstream.__aexit__(exc_type, exc, tb)
