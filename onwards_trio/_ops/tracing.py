"""OpenTelemetry traces of requests, upstream attempts and agent loops (the ``otel`` extra).

Imported only when tracing is on (:func:`~onwards_trio._ops.telemetry.create_telemetry`), so a
gateway without it never loads the SDK. Spans and their attributes:

* ``{method} {route}`` (server): every HTTP request. ``http.request.method``, ``http.route``
  (a bounded route template), ``http.response.status_code``, ``onwards.alias`` and
  ``gen_ai.request.model`` (the alias asked for), ``onwards.key_label`` (the name of the key's
  definition: never the key), ``onwards.provider`` and ``onwards.attempts``, the token usage.
  An incoming ``traceparent``/``tracestate`` makes it a child of the caller's span.
* ``{operation} {model}`` (client): every upstream attempt. ``gen_ai.operation.name``
  (``chat``, ``text_completion``, ``embeddings``, ...), ``gen_ai.request.model`` (the model
  sent upstream), ``server.address``/``server.port``,
  ``onwards.provider``, ``onwards.attempt`` (1, 2, ...), ``onwards.retry_reason`` (why the
  attempt before failed: ``rate_limited``, ``timeout``, ``network_error``, ``status``),
  ``gen_ai.response.time_to_first_chunk`` (seconds from send to the first body byte),
  ``error.type`` on a failed attempt (``timeout``, ``network_error``, a 5xx status, ...), the
  usage. It ends when the upstream body has been relayed.
* ``invoke_agent {model}`` (internal): one loop run (a response, or a sub-agent's loop nested
  under the step that called it). ``gen_ai.conversation.id`` (the response id), ``onwards.depth``,
  the summed usage. A background response is a new trace, *linked* to the request that made it.
* ``chat {model}`` / ``execute_tool {name}`` (internal): one loop step, with ``onwards.step.id``,
  ``onwards.step.kind``, ``onwards.step.outcome``, ``gen_ai.tool.name``/``gen_ai.tool.call.id``.

Prompts, completions, tool arguments and results are recorded only with
``telemetry.record_content`` (as ``gen_ai.input.messages``, ``gen_ai.output.messages``,
``gen_ai.tool.call.arguments``, ``gen_ai.tool.call.result``, each cut at 16 KiB).

Export is Trio-correct: a finished span is appended to a bounded queue (full: the span is
dropped and counted); :meth:`Telemetry.run`, a task in the gateway's service nursery, hands
batches to the OTLP/HTTP exporter in a worker thread (``trio.to_thread``, one at a time, each
bounded by the export timeout). A collector that is down or slow therefore costs requests
nothing beyond the span bookkeeping: spans queue, then drop.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar, Token
from typing import Any, Final

import orjson
import trio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["AttemptSpan", "SpanScope", "Telemetry", "operation_for"]

log = logging.getLogger("onwards_trio.telemetry")

_CONTENT_LIMIT: Final = 16 * 1024
_ALIAS_LIMIT: Final = 128
_FLUSH_ON_EXIT: Final = 5.0  # seconds spent exporting the last spans when the gateway stops
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_TRACE_HEADERS: Final = frozenset({b"traceparent", b"tracestate"})
# The request path names the GenAI operation of an upstream call.
_OPERATIONS: Final = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
    "messages": "chat",
}
# The request span a background response was created by (linked from the response's trace).
_origin: ContextVar[SpanContext | None] = ContextVar("onwards_trio_trace_origin", default=None)


class SpanScope:
    """A started span and, when it was made current, the token that restores the context."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span, token: Token[Context] | None) -> None:
        self.span = span
        self.token = token


class AttemptSpan:
    """The client span of one upstream attempt, as the pipeline drives it. What it learns on
    the way is set on the span in one call when it ends (each call takes the span's lock)."""

    __slots__ = ("attributes", "error", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.attributes: dict[str, Any] = {}
        self.error = False

    def trace_headers(
        self, headers: list[tuple[bytes, bytes]], propagate: bool
    ) -> list[tuple[bytes, bytes]]:
        """``headers`` without the client's trace headers, plus this attempt's own when the
        provider opted in (``propagate_trace_context``): an upstream that did not opt in learns
        nothing of the trace."""
        out = [(k, v) for k, v in headers if k not in _TRACE_HEADERS]
        if propagate:
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier, trace.set_span_in_context(self.span))
            out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items())
        return out

    def answered(self, status: int) -> None:
        """The response head arrived."""
        self.attributes["http.response.status_code"] = status
        if status >= 500:
            self.attributes["error.type"] = str(status)
            self.error = True

    def first_byte(self, seconds: float) -> None:
        self.attributes["gen_ai.response.time_to_first_chunk"] = seconds

    def usage(self, usage: Any) -> None:
        self.attributes.update(_usage_attributes(usage))

    def end(self, failure: str | None = None) -> None:
        """End the span; ``failure`` says why the attempt failed (``timeout``,
        ``network_error``, ``cancelled``, ``rejected``)."""
        span = self.span
        if failure is not None:
            self.attributes["error.type"] = failure
            self.error = True
        if span.is_recording():
            span.set_attributes(self.attributes)
            if self.error:
                span.set_status(Status(StatusCode.ERROR))
        span.end()


class _SpanQueue(SpanProcessor):
    """A bounded queue of finished spans: ``on_end`` is a deque append on the caller's thread.

    The SDK's batch processor costs tens of microseconds per span on the caller's thread and
    blocks in ``force_flush``/``shutdown``; this one does nothing but queue, and the Trio task
    in :meth:`Telemetry.run` does the exporting.
    """

    def __init__(self, max_queue: int, batch: int) -> None:
        self.spans: collections.deque[ReadableSpan] = collections.deque()
        self.max_queue = max_queue
        self.batch = batch
        self.dropped = 0
        self.ready = trio.Event()
        self._trio_thread: int | None = None

    def on_end(self, span: ReadableSpan) -> None:
        spans = self.spans
        if len(spans) >= self.max_queue:
            self.dropped += 1
            return
        spans.append(span)
        if len(spans) >= self.batch and threading.get_ident() == self._trio_thread:
            self.ready.set()  # a full batch: export now rather than at the next tick

    def take(self) -> list[ReadableSpan]:
        spans = self.spans
        n = min(len(spans), self.batch)
        return [spans.popleft() for _ in range(n)]


def _content(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return text if len(text) <= _CONTENT_LIMIT else text[:_CONTENT_LIMIT] + "..."


def _usage_attributes(usage: Any) -> dict[str, int]:
    out = {
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
    }
    if usage.cached_tokens:
        out["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
    if usage.reasoning_tokens:
        out["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
    return out


def operation_for(path: bytes) -> str:
    """The GenAI operation name of a request path (``/v1/chat/completions`` → ``chat``)."""
    text = path.decode("latin-1").split("?", 1)[0].strip("/")
    if text.startswith("v1/"):
        text = text[3:]
    return _OPERATIONS.get(text, "chat" if text.endswith("chat/completions") else "other")


class Telemetry:
    """Live tracing for one gateway: the span hooks the request path calls, and the export task.

    Build it with :func:`~onwards_trio._ops.telemetry.create_telemetry`; run :meth:`run` in a
    nursery for as long as spans should be exported.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        service_name: str | None = None,
        sampler: Sampler | None = None,
        record_content: bool = False,
        max_queue: int = 2048,
        batch: int = 512,
        interval: float = 5.0,
        export_timeout: float = 10.0,
    ) -> None:
        attributes = {"service.name": service_name} if service_name else {}
        # Resource.create reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES; an explicit
        # service name wins, and without either the SDK's "unknown_service" becomes ours.
        resource = Resource.create(attributes)
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "onwards-trio"}))
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        self.queue = _SpanQueue(max_queue, batch)
        self.provider.add_span_processor(self.queue)
        self.tracer = self.provider.get_tracer("onwards_trio")
        self.exporter = exporter
        self.record_content = record_content
        self.interval = interval
        self.export_timeout = export_timeout
        self._limiter = trio.CapacityLimiter(1)

    # -- export ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Export queued spans until cancelled, then flush what is left (bounded) and shut the
        exporter down. Each export runs in a worker thread, so the event loop never waits."""
        queue = self.queue
        queue._trio_thread = threading.get_ident()
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self.interval):
                    await queue.ready.wait()
                queue.ready = trio.Event()
                while queue.spans:
                    await self._export(queue.take())
        finally:
            # What is left goes out now, within a bound: shutting down must not hang on a
            # collector that is down (the SDK's own shutdown can block for 30 s).
            with trio.CancelScope(shield=True), trio.move_on_after(_FLUSH_ON_EXIT):
                while queue.spans:
                    await self._export(queue.take())
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await trio.to_thread.run_sync(
                    self.exporter.shutdown, abandon_on_cancel=True, limiter=self._limiter
                )

    async def _export(self, batch: Sequence[ReadableSpan]) -> None:
        # The exporter bounds its own request (and retries) by its timeout; the margin covers
        # encoding. Past it the thread is abandoned: its result no longer matters.
        with trio.move_on_after(self.export_timeout + 1.0):
            try:
                await trio.to_thread.run_sync(
                    self.exporter.export, batch, abandon_on_cancel=True, limiter=self._limiter
                )
            except Exception:
                log.warning("span export failed", exc_info=True)

    # -- the HTTP request (server span) ---------------------------------------------------------

    def start_request(
        self, method: str, route: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> SpanScope:
        """Start the request's server span (a child of the caller's ``traceparent``, if any) and
        make it current."""
        carrier: dict[str, str] | None = None
        for k, v in headers:
            if k in _TRACE_HEADERS:
                if carrier is None:
                    carrier = {}
                carrier[k.decode("latin-1")] = v.decode("latin-1")
        parent = _PROPAGATOR.extract(carrier) if carrier is not None else Context()
        name = f"{method} {route}" if route != "other" else method
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return SpanScope(span, token)

    def end_request(
        self,
        scope: SpanScope,
        status: int,
        *,
        alias: str | None = None,
        key_label: str | None = None,
        provider: int | None = None,
        attempts: int | None = None,
        usage: Any = None,
    ) -> None:
        span = scope.span
        if span.is_recording():
            attributes: dict[str, Any] = {"http.response.status_code": status}
            if alias is not None:
                if len(alias) > _ALIAS_LIMIT:  # what the client sent, configured or not
                    alias = alias[:_ALIAS_LIMIT] + "..."
                attributes["onwards.alias"] = alias
                attributes["gen_ai.request.model"] = alias
            if key_label is not None:
                attributes["onwards.key_label"] = key_label
            if provider is not None:
                attributes["onwards.provider"] = provider
            if attempts:
                attributes["onwards.attempts"] = attempts
            if usage is not None:
                attributes.update(_usage_attributes(usage))
            if status >= 500:
                attributes["error.type"] = str(status)
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)
        span.end()
        if scope.token is not None:
            otel_context.detach(scope.token)

    # -- upstream attempts (client spans) -------------------------------------------------------

    def start_attempt(
        self,
        path: bytes,
        model: str,
        provider: Any,
        attempt: int,
        retry_reason: str | None,
    ) -> AttemptSpan:
        """A client span for one try at one provider (a child of the current span)."""
        operation = operation_for(path)
        port = provider.port or (443 if provider.scheme == b"https" else 80)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "server.address": provider.host.decode("ascii", "replace"),
            "server.port": port,
            "onwards.provider": provider.index,
            "onwards.attempt": attempt,
        }
        if retry_reason is not None:
            attributes["onwards.retry_reason"] = retry_reason
        span = self.tracer.start_span(
            f"{operation} {model}", kind=SpanKind.CLIENT, attributes=attributes
        )
        return AttemptSpan(span)

    # -- the loop -------------------------------------------------------------------------------

    def start_response(
        self, response_id: str, model: str | None, depth: int, agent: str | None = None
    ) -> SpanScope:
        """A loop run: a child of the current span, or — for a background response, whose
        context was detached — a new trace linked to the request that created it."""
        current = trace.get_current_span().get_span_context()
        links: list[Link] = []
        if not current.is_valid:
            origin = _origin.get()
            if origin is not None:
                links.append(Link(origin, {"onwards.link": "created_by"}))
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.conversation.id": response_id,
            "onwards.depth": depth,
        }
        if model:
            attributes["gen_ai.request.model"] = model
        if agent:
            attributes["gen_ai.agent.name"] = agent
        span = self.tracer.start_span(
            f"invoke_agent {agent or model or ''}".rstrip(), attributes=attributes, links=links
        )
        return SpanScope(span, otel_context.attach(trace.set_span_in_context(span)))

    def end_response(
        self, scope: SpanScope, status: str, usage: Any = None, error: str | None = None
    ) -> None:
        span = scope.span
        if span.is_recording():
            span.set_attribute("onwards.response.status", status)
            if usage is not None:
                span.set_attributes(_usage_attributes(usage))
            if error is not None:
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR))
        span.end()
        if scope.token is not None:
            otel_context.detach(scope.token)

    def start_step(self, step_id: str, kind: str, payload: Any) -> SpanScope:
        """A loop step (model call or tool call), child of its loop run's span."""
        attributes: dict[str, Any] = {"onwards.step.id": step_id, "onwards.step.kind": kind}
        record = self.record_content and isinstance(payload, Mapping)
        if kind == "tool_call":
            name = payload.get("name") if isinstance(payload, Mapping) else None
            call_id = payload.get("call_id") if isinstance(payload, Mapping) else None
            attributes["gen_ai.operation.name"] = "execute_tool"
            if isinstance(name, str):
                attributes["gen_ai.tool.name"] = name
            if isinstance(call_id, str):
                attributes["gen_ai.tool.call.id"] = call_id
            if record:
                args = payload.get("arguments", payload.get("args"))
                if args is not None:
                    attributes["gen_ai.tool.call.arguments"] = _content(args)
            title = f"execute_tool {name}" if isinstance(name, str) else "execute_tool"
        else:
            model = payload.get("model") if isinstance(payload, Mapping) else None
            attributes["gen_ai.operation.name"] = "chat"
            if isinstance(model, str):
                attributes["gen_ai.request.model"] = model
            if record and "messages" in payload:
                attributes["gen_ai.input.messages"] = _content(payload["messages"])
            title = f"chat {model}" if isinstance(model, str) else "chat"
        span = self.tracer.start_span(title, attributes=attributes)
        return SpanScope(span, otel_context.attach(trace.set_span_in_context(span)))

    def end_step(
        self, scope: SpanScope, kind: str, outcome: str, result: Any = None, usage: Any = None
    ) -> None:
        span = scope.span
        if span.is_recording():
            span.set_attribute("onwards.step.outcome", outcome)
            if usage is not None:
                span.set_attributes(_usage_attributes(usage))
            if isinstance(result, Mapping):
                model = result.get("model")
                if isinstance(model, str):
                    span.set_attribute("gen_ai.response.model", model)
            if self.record_content and result is not None:
                key = "gen_ai.tool.call.result" if kind == "tool_call" else "gen_ai.output.messages"
                span.set_attribute(key, _content(result))
            if outcome != "completed":
                span.set_attribute("error.type", outcome)
                span.set_status(Status(StatusCode.ERROR))
        span.end()
        if scope.token is not None:
            otel_context.detach(scope.token)

    # -- background responses -------------------------------------------------------------------

    @staticmethod
    def detach() -> None:
        """Leave the current trace, for the rest of this task (one that outlives the request
        that started it): the next loop run starts a new trace linked to the current span."""
        current = trace.get_current_span().get_span_context()
        _origin.set(current if current.is_valid else None)
        otel_context.attach(Context())
