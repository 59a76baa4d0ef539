"""A real OTLP/HTTP trace receiver on loopback, for the telemetry tests.

It speaks the protocol an OpenTelemetry collector speaks (``POST /v1/traces`` with a protobuf
``ExportTraceServiceRequest``), decodes every span with ``opentelemetry-proto`` and keeps it as
a :class:`ReceivedSpan`. ``mode="slow"`` never answers (a hung collector). A span carrying bytes
that OTLP does not define (a collector would skip them as unknown fields) fails
:meth:`OTLPReceiver.wait_for`: the gateway encodes spans itself, and stray bytes are a bug.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from onwards_trio._transport.server import serve

_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which is not None else None


@attrs.frozen
class ReceivedSpan:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)
    error: bool
    service: str
    start: int  # nanoseconds since the epoch
    end: int = 0  # nanoseconds since the epoch (0: the span has no end time)
    trace_state: str = ""  # the W3C tracestate the span carries

    def children(self, spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.parent_span_id == self.span_id]


class OTLPReceiver:
    def __init__(self, mode: Literal["ok", "slow"] = "ok") -> None:
        self.mode = mode
        self.spans: list[ReceivedSpan] = []
        self.malformed: list[str] = []  # names of spans with bytes OTLP does not define
        self.requests = 0
        self.url = ""
        self._arrived = trio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests += 1
        if self.mode == "slow":
            await trio.sleep_forever()
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for rs in request.resource_spans:
            service = next(
                (_value(a.value) for a in rs.resource.attributes if a.key == "service.name"), ""
            )
            for ss in rs.scope_spans:
                for s in ss.spans:
                    size = s.ByteSize()
                    s.DiscardUnknownFields()
                    if s.ByteSize() != size:
                        self.malformed.append(s.name)
                    self.spans.append(
                        ReceivedSpan(
                            name=s.name,
                            kind=_KINDS.get(s.kind, "?"),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            links=[(x.trace_id.hex(), x.span_id.hex()) for x in s.links],
                            error=s.status.code == 2,
                            service=service,
                            start=s.start_time_unix_nano,
                            end=s.end_time_unix_nano,
                            trace_state=s.trace_state,
                        )
                    )
        self._arrived.set()
        self._arrived = trio.Event()
        payload = ExportTraceServiceResponse().SerializeToString()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/x-protobuf"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def wait_for(self, count: int, name: str | None = None) -> list[ReceivedSpan]:
        """Wait until ``count`` spans (named ``name``, if given) have arrived; return all."""
        while len([s for s in self.spans if name is None or s.name == name]) < count:
            await self._arrived.wait()
        assert not self.malformed, f"spans with bytes OTLP does not define: {self.malformed}"
        return self.spans


@asynccontextmanager
async def otlp_receiver(mode: Literal["ok", "slow"] = "ok") -> AsyncIterator[OTLPReceiver]:
    receiver = OTLPReceiver(mode)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, receiver, "127.0.0.1", 0)
        receiver.url = binds[0]
        yield receiver
        nursery.cancel_scope.cancel()
