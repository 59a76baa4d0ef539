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

Recording is lean: the SDK's ``Tracer``/``Span`` cost tens of microseconds per span on the
request's own path (sampler call, locked attribute maps, processor hooks), and its OTLP encoder
53-120 µs more per span. Here a span is a small object that gathers its attributes in a plain
dict and, when it ends sampled, is encoded straight into OTLP protobuf bytes (``otlp.py``, a
few µs). The sampler (the SDK's, from ``OTEL_TRACES_SAMPLER``) decides once per trace, at its
root, and children follow; ids are drawn as the SDK draws them. The current span is kept in
OpenTelemetry's context (as a non-recording span), so code that uses the OpenTelemetry API in
the same task sees it, and a caller's own span is the parent of ours.

Export is Trio-correct: a finished span's bytes are appended to a bounded queue (full: the
span is dropped and counted); :meth:`Telemetry.run`, a task in the gateway's service nursery,
joins a batch into one ``ExportTraceServiceRequest`` and POSTs it over the gateway's HTTP
client (one export at a time, retries bounded by the export timeout). A collector that is
down or slow therefore costs requests nothing beyond the span bookkeeping: spans queue, then
drop.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar, Token
from typing import Any, Final

import orjson
import trio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from onwards_trio._ops.otlp import (
    KIND_CLIENT,
    KIND_INTERNAL,
    KIND_SERVER,
    Exporter,
    TracesRequest,
    encode_span,
)

__all__ = ["AttemptSpan", "SpanScope", "Telemetry", "operation_for"]

log = logging.getLogger("onwards_trio.telemetry")

_CONTENT_LIMIT: Final = 16 * 1024
_ALIAS_LIMIT: Final = 128
_FLUSH_ON_EXIT: Final = 5.0  # seconds spent exporting the last spans when the gateway stops
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_TRACE_HEADERS: Final = frozenset({b"traceparent", b"tracestate"})
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
_NO_STATE: Final = TraceState()
_SCOPE: Final = "onwards_trio"
# What the sampler is told a span's kind is (our kinds are the protocol's numbers).
_SDK_KINDS: Final = {
    KIND_INTERNAL: SpanKind.INTERNAL,
    KIND_SERVER: SpanKind.SERVER,
    KIND_CLIENT: SpanKind.CLIENT,
}
_CREATED_BY: Final = {"onwards.link": "created_by"}
# The request path names the GenAI operation of an upstream call.
_OPERATIONS: Final = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
    "messages": "chat",
}
# A span link's target: (trace id, span id, remote).
_Link = tuple[int, int, bool]
# The span a background response's trace is linked to (the request that created it).
_origin: ContextVar[_Link | None] = ContextVar("onwards_trio_trace_origin", default=None)
# Ids as the SDK's RandomIdGenerator makes them (the global generator, reseeded after a fork).
_bits: Final = random.getrandbits


class _Span(NonRecordingSpan):
    """A span being recorded, and the current span in OpenTelemetry's context while it runs
    (to the OpenTelemetry API it is a non-recording span: others see its context, nothing
    more). Attributes go to a plain dict; a sampled span is encoded for export
    (:func:`~onwards_trio._ops.otlp.encode_span`) when it finishes. Its ``SpanContext`` is made
    only when someone asks for it: our own code reads the ids directly."""

    __slots__ = (
        "_span_context",
        "attributes",
        "error",
        "kind",
        "links",
        "name",
        "parent_id",
        "parent_remote",
        "sampled",
        "span_id",
        "start",
        "telemetry",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        name: str,
        kind: int,
        trace_id: int,
        sampled: bool,
        trace_state: TraceState,
        parent_id: int,
        parent_remote: bool,
        attributes: dict[str, Any],
        links: Sequence[_Link] = (),
    ) -> None:
        self.telemetry = telemetry
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = _bits(64) or _bits(64) or 1
        self.sampled = sampled
        self.trace_state = trace_state
        self.parent_id = parent_id
        self.parent_remote = parent_remote
        self.attributes = attributes
        self.links = links
        self.error = False
        self._span_context: SpanContext | None = None
        self.start = time.time_ns()

    def get_span_context(self) -> SpanContext:
        context = self._span_context
        if context is None:
            context = self._span_context = SpanContext(
                self.trace_id,
                self.span_id,
                is_remote=False,
                trace_flags=_SAMPLED if self.sampled else _NOT_SAMPLED,
                trace_state=self.trace_state,
            )
        return context

    def __repr__(self) -> str:
        return f"_Span({self.name!r}, {self.trace_id:032x}, {self.span_id:016x})"

    def finish(self) -> None:
        """Ended: a sampled span is encoded and queued for export. (Not ``end``: that is the
        OpenTelemetry API's, a no-op on a span someone else owns.)"""
        if self.sampled:
            state = self.trace_state
            self.telemetry.queue.put(
                encode_span(
                    self.trace_id,
                    self.span_id,
                    ",".join(f"{k}={v}" for k, v in state.items()) if state else "",
                    self.parent_id,
                    self.parent_remote,
                    self.name,
                    self.kind,
                    self.start,
                    time.time_ns(),
                    self.attributes,
                    [(t, s, r, _CREATED_BY) for t, s, r in self.links],
                    self.error,
                )
            )


class SpanScope:
    """A started span and the token that restores the context it was made current in."""

    __slots__ = ("span", "token")

    def __init__(self, span: _Span, token: Token[Context] | None) -> None:
        self.span = span
        self.token = token

    @property
    def sampled(self) -> bool:
        """Whether the span is recorded (not: what it would be told need not be worked out)."""
        return self.span.sampled


class AttemptSpan:
    """The client span of one upstream attempt, as the pipeline drives it."""

    __slots__ = ("span",)

    def __init__(self, span: _Span) -> None:
        self.span = span

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

    @property
    def sampled(self) -> bool:
        """Whether the attempt's trace is recorded (not: nothing need be read for it)."""
        return self.span.sampled

    def answered(self, status: int) -> None:
        """The response head arrived."""
        span = self.span
        span.attributes["http.response.status_code"] = status
        if status >= 500:
            span.attributes["error.type"] = str(status)
            span.error = True

    def first_byte(self, seconds: float) -> None:
        self.span.attributes["gen_ai.response.time_to_first_chunk"] = seconds

    def usage(self, usage: Any) -> None:
        self.span.attributes.update(_usage_attributes(usage))

    def end(self, failure: str | None = None) -> None:
        """End the span; ``failure`` says why the attempt failed (``timeout``,
        ``network_error``, ``cancelled``, ``rejected``)."""
        span = self.span
        if failure is not None:
            span.attributes["error.type"] = failure
            span.error = True
        span.finish()


class _SpanQueue:
    """A bounded queue of finished spans, encoded: ``put`` is a deque append on the caller's thread;
    the Trio task in :meth:`Telemetry.run` does the exporting."""

    def __init__(self, max_queue: int, batch: int) -> None:
        self.spans: collections.deque[bytes] = collections.deque()
        self.max_queue = max_queue
        self.batch = batch
        self.dropped = 0
        self.ready = trio.Event()
        self._trio_thread: int | None = None

    def put(self, span: bytes) -> None:
        spans = self.spans
        if len(spans) >= self.max_queue:
            self.dropped += 1
            return
        spans.append(span)
        if len(spans) >= self.batch and threading.get_ident() == self._trio_thread:
            self.ready.set()  # a full batch: export now rather than at the next tick

    def take(self) -> list[bytes]:
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


def _current() -> _Span | SpanContext | None:
    """The span current in this task: one of ours, or another's context (a caller's span
    through the OpenTelemetry API); ``None``: no valid one."""
    span = trace.get_current_span()
    if type(span) is _Span:
        return span
    context = span.get_span_context()
    return context if context.is_valid else None


def _link_to(parent: _Span | SpanContext) -> _Link:
    if type(parent) is _Span:
        return (parent.trace_id, parent.span_id, False)
    assert isinstance(parent, SpanContext)
    return (parent.trace_id, parent.span_id, parent.is_remote)


class Telemetry:
    """Live tracing for one gateway: the span hooks the request path calls, and the export task.

    Build it with :func:`~onwards_trio._ops.telemetry.create_telemetry`; run :meth:`run` in a
    nursery for as long as spans should be exported.
    """

    def __init__(
        self,
        exporter: Exporter,
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
        self.resource = resource
        # Encoded once: every export request starts with the same resource and scope.
        self.request = TracesRequest(resource.attributes, _SCOPE, None, resource.schema_url)
        # The provider resolves the sampler as the SDK does (OTEL_TRACES_SAMPLER[_ARG]).
        self.sampler: Sampler = TracerProvider(resource=resource, sampler=sampler).sampler
        self.queue = _SpanQueue(max_queue, batch)
        self.exporter = exporter
        self.record_content = record_content
        self.interval = interval
        self.export_timeout = export_timeout

    def _span(
        self,
        name: str,
        kind: int,
        attributes: dict[str, Any],
        parent: _Span | SpanContext | None,
        links: Sequence[_Link] = (),
    ) -> _Span:
        """A new span under ``parent``. The sampler decides at a trace's root (or under a
        remote parent, whose decision a parent-based sampler follows); children follow."""
        if type(parent) is _Span:
            return _Span(
                self,
                name,
                kind,
                parent.trace_id,
                parent.sampled,
                parent.trace_state,
                parent.span_id,
                False,
                attributes,
                links,
            )
        assert parent is None or isinstance(parent, SpanContext)
        if parent is None or parent.is_remote:
            if parent is None:
                trace_id = _bits(128) or _bits(128) or 1
                context = None
            else:
                trace_id = parent.trace_id
                context = trace.set_span_in_context(NonRecordingSpan(parent))
            result = self.sampler.should_sample(
                context, trace_id, name, _SDK_KINDS[kind], attributes
            )
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            state = result.trace_state or _NO_STATE
        else:  # a local span of someone else's (the OpenTelemetry API)
            trace_id, sampled, state = (
                parent.trace_id,
                parent.trace_flags.sampled,
                parent.trace_state,
            )
        parent_id = parent.span_id if parent is not None else 0
        remote = parent is not None and parent.is_remote
        return _Span(
            self, name, kind, trace_id, sampled, state, parent_id, remote, attributes, links
        )

    @staticmethod
    def _enter(span: _Span) -> SpanScope:
        return SpanScope(span, otel_context.attach(trace.set_span_in_context(span)))

    @staticmethod
    def _exit(scope: SpanScope) -> None:
        scope.span.finish()
        if scope.token is not None:
            otel_context.detach(scope.token)

    # -- export ---------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Export queued spans until cancelled, then flush what is left (bounded) and close the
        exporter. Spans are encoded already; a batch is joined and POSTed by this task."""
        queue = self.queue
        queue._trio_thread = threading.get_ident()
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self.interval):
                    await queue.ready.wait()
                queue.ready = trio.Event()
                # What is queued now, in batches; spans that end meanwhile wait for the next
                # tick or a full batch (draining until empty would, under steady traffic,
                # export a few spans at a time, back to back).
                due = len(queue.spans)
                while due > 0:
                    batch = queue.take()
                    if not batch:
                        break
                    due -= len(batch)
                    await self._export(batch)
        finally:
            # What is left goes out now, within a bound: shutting down must not hang on a
            # collector that is down.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(_FLUSH_ON_EXIT):
                    while queue.spans:
                        await self._export(queue.take())
                with trio.move_on_after(1.0):
                    await self.exporter.aclose()

    async def _export(self, batch: Sequence[bytes]) -> None:
        # The exporter bounds its request and retries by the export timeout; this is a margin.
        with trio.move_on_after(self.export_timeout + 1.0):
            try:
                await self.exporter.export(self.request.encode(batch))
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
        parent = None
        if carrier is not None:
            remote = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
            parent = remote if remote.is_valid else None
        name = f"{method} {route}" if route != "other" else method
        attributes = {"http.request.method": method, "http.route": route}
        return self._enter(self._span(name, KIND_SERVER, attributes, parent))

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
        if span.sampled:
            attributes = span.attributes
            attributes["http.response.status_code"] = status
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
                span.error = True
        self._exit(scope)

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
        name = f"{operation} {model}"
        return AttemptSpan(self._span(name, KIND_CLIENT, attributes, _current()))

    # -- the loop -------------------------------------------------------------------------------

    def start_response(
        self, response_id: str, model: str | None, depth: int, agent: str | None = None
    ) -> SpanScope:
        """A loop run: a child of the current span, or — for a background response, whose
        context was detached — a new trace linked to the request that created it."""
        parent = _current()
        links: list[_Link] = []
        if parent is None:
            origin = _origin.get()
            if origin is not None:
                links.append(origin)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.conversation.id": response_id,
            "onwards.depth": depth,
        }
        if model:
            attributes["gen_ai.request.model"] = model
        if agent:
            attributes["gen_ai.agent.name"] = agent
        name = f"invoke_agent {agent or model or ''}".rstrip()
        return self._enter(self._span(name, KIND_INTERNAL, attributes, parent, links))

    def end_response(
        self, scope: SpanScope, status: str, usage: Any = None, error: str | None = None
    ) -> None:
        span = scope.span
        span.attributes["onwards.response.status"] = status
        if usage is not None:
            span.attributes.update(_usage_attributes(usage))
        if error is not None:
            span.attributes["error.type"] = error
            span.error = True
        self._exit(scope)

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
        return self._enter(self._span(title, KIND_INTERNAL, attributes, _current()))

    def end_step(
        self, scope: SpanScope, kind: str, outcome: str, result: Any = None, usage: Any = None
    ) -> None:
        span = scope.span
        attributes = span.attributes
        attributes["onwards.step.outcome"] = outcome
        if usage is not None:
            attributes.update(_usage_attributes(usage))
        if isinstance(result, Mapping):
            model = result.get("model")
            if isinstance(model, str):
                attributes["gen_ai.response.model"] = model
        if self.record_content and result is not None:
            key = "gen_ai.tool.call.result" if kind == "tool_call" else "gen_ai.output.messages"
            attributes[key] = _content(result)
        if outcome != "completed":
            attributes["error.type"] = outcome
            span.error = True
        self._exit(scope)

    # -- background responses -------------------------------------------------------------------

    @staticmethod
    def detach() -> None:
        """Leave the current trace, for the rest of this task (one that outlives the request
        that started it): the next loop run starts a new trace linked to the current span."""
        current = _current()
        if current is not None:
            _origin.set(_link_to(current))
        otel_context.attach(Context())

    @staticmethod
    def traceparent() -> str | None:
        """The W3C ``traceparent`` of the current span (``None``: there is none): what a
        background response keeps, so that a process resuming it can link to its request."""
        current = _current()
        if current is None:
            return None
        if isinstance(current, _Span):
            trace_id, span_id, sampled = current.trace_id, current.span_id, current.sampled
        else:
            trace_id, span_id = current.trace_id, current.span_id
            sampled = current.trace_flags.sampled
        return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"

    @staticmethod
    def adopt(traceparent: str | None) -> None:
        """For a task that resumes a response another process started: leave whatever trace
        the task was in; the next loop run starts a new trace, linked to ``traceparent`` (the
        request that created the response) when it is a valid one."""
        origin: _Link | None = None
        if traceparent:
            extracted = _PROPAGATOR.extract({"traceparent": traceparent})
            context = trace.get_current_span(extracted).get_span_context()
            if context.is_valid:
                origin = (context.trace_id, context.span_id, True)
        _origin.set(origin)
        otel_context.attach(Context())
