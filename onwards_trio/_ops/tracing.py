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

Why it is built this way: tracing at 100 % sampling may cost a proxied request less than 15 %
of its CPU (a few tens of µs for its two spans), and a trace that is not sampled next to
nothing. The SDK's ``Tracer``/``Span`` cost tens of µs per span on the request's own path, its
OTLP encoder 53-120 µs more, and even the OpenTelemetry API's context attach/detach and the
SDK sampler's call cost a few µs each per request (docs/benchmarks.md, "Tracing"). So:

* A span is a slotted object holding raw values while it runs. When it ends it is encoded
  (``otlp.py``) and its bytes go to the export queue: a span object waiting seconds for its
  batch would survive young collections and be promoted, which at 100 % sampling doubled the
  collector's work. The parts a request's spans repeat (name, method, route, status, alias,
  key label, provider, model, attempt, with the status and flags fields) are encoded once per
  distinct combination, so ending a span is mostly two ``struct`` packs and a join. A
  request's server span and the first of its client spans to end are queued together when
  the request ends, as plain values (one look-up of both spans' parts, first compared with
  the last request's, which most repeat, before any hashing), and encoded with their batch
  by the export task (three packs for both). Their token usage, when only the access line and
  the spans want it, is read off the request path too: the body is kept, and read with a few
  others' before the values are queued (most often the access writer has read it already).
* The request's server span and its client spans are tracked in a context variable of our own
  (the pipeline finds its parent there), not in OpenTelemetry's context. Loop spans are *also*
  made current in OpenTelemetry's context (as non-recording spans), so code that uses the
  OpenTelemetry API inside a loop step (a tool) sees the step as its parent; outside any span
  of ours, a caller's own OpenTelemetry span is the parent of ours.
* The standard samplers (``always_on``/``always_off``, ``traceidratio`` and their
  ``parentbased_*`` forms, as resolved by the SDK from ``OTEL_TRACES_SAMPLER[_ARG]`` or the
  config's ``sample_ratio``) are decided here with the SDK's own rule (the trace id's low 64
  bits against a bound), without calling it; any other sampler is called as the SDK would.
  The sampler decides once per trace, at its root or under a remote parent; children follow.
* An incoming ``traceparent`` is parsed with the W3C propagator's own pattern and rules; a
  ``tracestate`` by the SDK's parser. Ids are random bits of the global generator, as the
  SDK's ``RandomIdGenerator`` draws them (reseeded after a fork); a request's trace id and its
  server span's id come from one draw.

Export is Trio-correct: the bounded queue is filled on the request path (full: the span is
dropped and counted, and not encoded); :meth:`Telemetry.run`, a task in the gateway's service
nursery, wraps a batch into one ``ExportTraceServiceRequest`` and POSTs it over the gateway's
HTTP client (one export at a time, retries bounded by the export timeout). A collector that
is down or slow therefore costs requests nothing beyond the span bookkeeping: spans queue,
then drop. :meth:`Telemetry.warn_dropped`, another task, says how many once a minute at most.
"""

from __future__ import annotations

import collections
import logging
import random
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar, Token
from typing import Any, Final, TypeVar, cast

import orjson
import trio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
)

from onwards_trio._ops.access import LaterUsage, read_now
from onwards_trio._ops.logs import total_usage
from onwards_trio._ops.otlp import (
    FIRST_CHUNK,
    KIND_CLIENT,
    KIND_INTERNAL,
    KIND_SERVER,
    Exporter,
    KnownParts,
    PairPacker,
    PairParts,
    TracesRequest,
    encode_known,
    encode_span,
    int_attribute,
    known_parts,
    name_and_kind,
    pair_packer,
    pair_parts,
    pair_with,
    span_attributes,
)
from onwards_trio._ops.telemetry import _current as _telemetry

__all__ = ["AttemptSpan", "LoopSpan", "RequestSpan", "Telemetry", "operation_for"]

log = logging.getLogger("onwards_trio.telemetry")

_CONTENT_LIMIT: Final = 16 * 1024
_ALIAS_LIMIT: Final = 128
_CACHED: Final = 4096  # combinations of a request's repeated span fields kept encoded
_FLUSH_ON_EXIT: Final = 5.0  # seconds spent exporting the last spans when the gateway stops
_DROPS_WARN_EVERY: Final = 60.0  # seconds: at most one "spans dropped" warning per minute
_TRACE_HEADERS: Final = frozenset({b"traceparent", b"tracestate"})
# The W3C propagator's pattern and limits (opentelemetry.trace.propagation.tracecontext).
_TRACEPARENT: Final = re.compile(
    r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$"
)
_TRACEPARENT_LIMIT: Final = 512
_TRACESTATE_LIMIT: Final = 8192
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
_SCOPE: Final = "onwards_trio"
_M64: Final = (1 << 64) - 1
_ALWAYS: Final = 1 << 64  # a sampling bound every trace id is under
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
# A remote parent (an incoming traceparent): trace id, span id, sampled, tracestate header.
_Remote = tuple[int, int, bool, str]
# Ids as the SDK's RandomIdGenerator makes them (the global generator, reseeded after a fork).
_bits: Final = random.getrandbits
_new: Final = object.__new__
# gen_ai.response.time_to_first_chunk: the field's head; the double follows.
_FIRST_CHUNK: Final = FIRST_CHUNK
_double: Final = struct.Struct("<d").pack


class _Span:
    """What every span of ours holds: its ids, where it sits, whether it is sampled."""

    __slots__ = (
        "clean",
        "parent_id",
        "parent_remote",
        "sampled",
        "span_id",
        "start",
        "state",
        "stop",
        "trace_id",
    )
    trace_id: int
    span_id: int
    parent_id: int  # 0: a root
    parent_remote: bool
    sampled: bool
    state: str  # the tracestate header ("": none)
    # True: the HTTP request this span is part of came without trace headers, so the headers
    # sent upstream (made from its headers) have none to take out
    clean: bool
    start: int  # ns since the epoch (set only when sampled, as is all that follows)
    stop: int

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        parent_id: int,
        parent_remote: bool,
        sampled: bool,
        state: str,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.parent_remote = parent_remote
        self.sampled = sampled
        self.state = state
        self.clean = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.trace_id:032x}, {self.span_id:016x})"

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"


_P = TypeVar("_P")


def _new_id() -> int:
    return _bits(64) or _bits(64) or 1


def _built(cache: dict[Any, _P], key: Any, build: Callable[..., _P]) -> _P:
    """The encoded repeated parts of a span for ``key``, built on a cache miss and kept (the
    cache starts over when full: client-chosen aliases cannot grow it without bound, and
    providers replaced by a reload do not stay in it for good)."""
    parts = build(*key)
    if len(cache) >= _CACHED:
        cache.clear()
    cache[key] = parts
    return parts


# The current span of ours (None: none). Loop spans are also current in OpenTelemetry's context.
_active: ContextVar[_Span | None] = ContextVar("onwards_trio_span", default=None)
# The span a background response's trace is linked to (the request that created it).
_origin: ContextVar[_Link | None] = ContextVar("onwards_trio_trace_origin", default=None)


# The last usage encoded (a request's spans share it), and encoded token counts by value: a
# bounded table each, for the counts under 16384 (most of them).
_last_usage: tuple[Any, bytes] = (None, b"")
_COUNTS: Final = 16384
_input_fields: dict[int, bytes] = {}
_output_fields: dict[int, bytes] = {}


def _count_field(cache: dict[int, bytes], key: str, value: int) -> bytes:
    field = int_attribute(key, value)
    if 0 <= value < _COUNTS:
        cache[value] = field
    return field


def _usage_fields(usage: Any) -> bytes:
    """A ``Usage``'s span attributes (the last one's kept: a request's spans share it)."""
    global _last_usage
    last = _last_usage
    if usage is last[0]:
        return last[1]
    out = _encoded_usage(usage)
    _last_usage = (usage, out)  # one store: a span ending on another thread sees a pair
    return out


def _encoded_usage(usage: Any) -> bytes:
    n, m, cached, reasoning = usage  # a Usage: a named tuple
    out = (_input_fields.get(n) or _count_field(_input_fields, "gen_ai.usage.input_tokens", n)) + (
        _output_fields.get(m) or _count_field(_output_fields, "gen_ai.usage.output_tokens", m)
    )
    if cached:
        out += int_attribute("gen_ai.usage.cache_read.input_tokens", cached)
    if reasoning:
        out += int_attribute("gen_ai.usage.reasoning.output_tokens", reasoning)
    return out


class RequestSpan(_Span):
    """The server span of one HTTP request (what the gateway holds between start and end)."""

    __slots__ = ("method", "outer", "pending", "route")
    outer: _Span | None  # the span current before this one
    method: str
    route: str
    # Its client span that ended first, encoded with it when it ends (None: none yet;
    # _CLOSED: this span has ended, so a client span ending now is encoded alone).
    pending: AttemptSpan | None


def _request_parts_of(
    method: str,
    route: str,
    status: int,
    alias: str | None,
    key_label: str | None,
    provider: int | None,
    attempts: int | None,
    parent_remote: bool = False,
) -> KnownParts:
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "http.route": route,
        "http.response.status_code": status,
    }
    if alias is not None:
        attributes["onwards.alias"] = alias
        attributes["gen_ai.request.model"] = alias
    if key_label is not None:
        attributes["onwards.key_label"] = key_label
    if provider is not None:
        attributes["onwards.provider"] = provider
    if attempts:
        attributes["onwards.attempts"] = attempts
    if status >= 500:
        attributes["error.type"] = str(status)
    name = f"{method} {route}" if route != "other" else method
    head = name_and_kind(name, KIND_SERVER)
    return known_parts(head, span_attributes(attributes), status >= 500, parent_remote)


class AttemptSpan(_Span):
    """The client span of one upstream attempt, as the pipeline drives it. Not sampled, it
    only carries the ids an opted-in provider is told."""

    __slots__ = (
        "attempt",
        "error",
        "first",
        "model",
        "parts",
        "path",
        "provider",
        "queue",
        "request",
        "retry_reason",
        "status",
        "tokens",
    )
    path: bytes
    model: str
    provider: Any
    attempt: int
    retry_reason: str | None
    status: int | None
    first: int | None  # when the first body byte came (ns since the epoch, as start)
    tokens: Any
    queue: _SpanQueue
    parts: dict[tuple[Any, ...], KnownParts]  # its telemetry's encoded client span parts
    request: RequestSpan | None  # its parent, when that is a request's server span
    error: str | None  # why it failed (set when it ends)

    def trace_headers(
        self, headers: list[tuple[bytes, bytes]], propagate: bool
    ) -> list[tuple[bytes, bytes]]:
        """``headers`` without the client's trace headers, plus this attempt's own when the
        provider opted in (``propagate_trace_context``): an upstream that did not opt in learns
        nothing of the trace."""
        if not self.clean:
            for k, _ in headers:
                if k in _TRACE_HEADERS:
                    headers = [(k, v) for k, v in headers if k not in _TRACE_HEADERS]
                    break
        if propagate:
            headers = headers + self._context_headers()
        return headers

    def _context_headers(self) -> list[tuple[bytes, bytes]]:
        out = [(b"traceparent", self.traceparent().encode())]
        if self.state:
            out.append((b"tracestate", self.state.encode("latin-1")))
        return out

    def answered(self, status: int) -> None:
        """The response head arrived."""
        self.status = status

    def first_byte(self) -> None:
        """The first body byte arrived (the span's own clock: ``trio.current_time()`` costs
        a few Python calls)."""
        self.first = time.time_ns()

    def usage(self, usage: Any) -> None:
        """The attempt's usage: a ``Usage``, or a body whose usage is read later (a
        :class:`LaterUsage`: read with the export batch when the span is queued with its
        request, else when the span is encoded)."""
        self.tokens = usage

    def end(self, failure: str | None = None) -> None:
        """End the span; ``failure`` says why the attempt failed (``timeout``,
        ``network_error``, ``cancelled``, ``rejected``). The first to end under a request's
        server span still open is queued with it, when it ends (one cache look-up for both,
        encoded together by the export task); any other is encoded now (see
        :meth:`Telemetry.end_request`)."""
        if not self.sampled:
            return
        self.stop = time.time_ns()
        if failure is None:
            status = self.status
            if status is not None and status >= 500:
                failure = str(status)
        self.error = failure
        request = self.request
        if request is not None:
            self.request = None
            if request.pending is None:
                request.pending = self
                return
        self.encode()

    def encode(self) -> None:
        """Encode the ended span into the export queue (unless the queue is full)."""
        queue = self.queue
        if queue.refuses():
            return
        status = self.status
        error = self.error
        key = (
            self.provider,  # by identity: a reload makes new ones
            self.path,
            self.model,
            self.attempt,
            self.retry_reason,
            status,
            error,
            self.parent_remote,
        )
        try:
            parts = self.parts.get(key) or _built(self.parts, key, _attempt_parts_of)
            first = self.first
            extra = b"" if first is None else _FIRST_CHUNK + _double((first - self.start) / 1e9)
            tokens = self.tokens
            if isinstance(tokens, LaterUsage):  # a body to read: read now (the rare path)
                tokens = tokens.usage
            if tokens is not None:
                extra += _usage_fields(tokens)
            frame = encode_known(
                self.trace_id,
                self.span_id,
                self.state,
                self.parent_id,
                self.start,
                self.stop,
                parts,
                extra,
            )
        except Exception:  # a bug in tracing must not fail the request
            log.exception("span %r not exported", self)
            return
        queue.append(frame)


def _attempt_parts_of(
    provider: Any,
    path: bytes,
    model: str,
    attempt: int,
    retry_reason: str | None,
    status: int | None,
    error: str | None,
    parent_remote: bool = False,
) -> KnownParts:
    operation = operation_for(path)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": model,
        "server.address": provider.host.decode("ascii", "replace"),
        "server.port": provider.port or (443 if provider.scheme == b"https" else 80),
        "onwards.provider": provider.index,
        "onwards.attempt": attempt,
    }
    if retry_reason is not None:
        attributes["onwards.retry_reason"] = retry_reason
    if status is not None:
        attributes["http.response.status_code"] = status
    if error is not None:
        attributes["error.type"] = error
    head = name_and_kind(f"{operation} {model}", KIND_CLIENT)
    return known_parts(head, span_attributes(attributes), error is not None, parent_remote)


class _UnsampledAttempt(AttemptSpan):
    """Every attempt under a request span that is not sampled (one shared object: there is
    nothing to record). An opted-in provider is still told the trace, with an id of its own for
    the attempt, made when the headers are."""

    __slots__ = ()

    def trace_headers(
        self, headers: list[tuple[bytes, bytes]], propagate: bool
    ) -> list[tuple[bytes, bytes]]:
        parent = _active.get()  # the request's span: the pipeline sends from its task
        if not propagate and parent is not None and parent.clean:
            return headers  # no trace header came in, none goes out
        return AttemptSpan.trace_headers(self, headers, propagate)

    def _context_headers(self) -> list[tuple[bytes, bytes]]:
        parent = _active.get()  # the request's span: the pipeline sends from its task
        if parent is None:
            return []
        attempt = f"00-{parent.trace_id:032x}-{_bits(64) or 1:016x}-00"
        out = [(b"traceparent", attempt.encode())]
        if parent.state:
            out.append((b"tracestate", parent.state.encode("latin-1")))
        return out

    def answered(self, status: int) -> None:
        pass

    def first_byte(self) -> None:
        pass

    def usage(self, usage: Any) -> None:
        pass

    def end(self, failure: str | None = None) -> None:
        pass


_UNSAMPLED_ATTEMPT: Final = _UnsampledAttempt(1, 1, 0, False, False, "")
# RequestSpan.pending of an ended request span: a client span ending later is encoded alone.
_CLOSED: Final = _UnsampledAttempt(1, 1, 0, False, False, "")


# A request's two spans' parts: encoded together (pair_parts), and each alone (known_parts)
# for a pair of an unusual size.
_Pair = tuple[PairParts, KnownParts, KnownParts]
# A request's two spans as queued: both trace and span ids, both spans' start and end, the
# client span's first byte (ns since the epoch), their parts, the usage's four counts.
_Queued = tuple[int, int, int, int, int, int, int, int, _Pair, int, int, int, int]
_NO_USAGE: Final = (-1, 0, 0, 0)  # a request without usage, as queued
# A request whose usage is a body read later (a LaterUsage): its values but the counts, and
# the body, until a few of them are read together (_SpanQueue.settle).
_Later = tuple[tuple[int, int, int, int, int, int, int, int, _Pair], LaterUsage]
_SETTLE: Final = 32  # such requests settled together (_SpanQueue.settle)
_HOLD: Final = 128  # at most this many wait for the access writer to read their bodies


def _pair_of(*fields: Any) -> _Pair:
    """The parts of a request's server span (the first seven fields: ``_request_parts_of``'s
    but the last) and its client span's (the rest: ``_attempt_parts_of``'s), neither with a
    remote parent."""
    server = _request_parts_of(*fields[:7])
    client = _attempt_parts_of(*fields[7:])
    return pair_parts(server, client), server, client


def _frames(batch: Sequence[bytes | _Queued]) -> list[bytes]:
    """A batch's spans as bytes (``ScopeSpans.spans`` fields, to be joined): requests queued
    as plain values (:meth:`Telemetry.end_request`) are encoded here, off the request path,
    into one list the export request joins once."""
    out: list[bytes] = []
    last: Any = _NO_USAGE
    encoded = b""
    last_pair: Any = None
    packer: PairPacker | None = None
    for entry in batch:
        if isinstance(entry, bytes):
            if entry:
                out.append(entry)
            continue
        try:
            trace_id, span_id, child_id, start, end, child_start, child_end, first, pair = entry[:9]
            usage = entry[9:]
            if usage != last:  # most requests repeat the last one's parts and counts
                last = usage
                encoded = b"" if usage[0] < 0 else _encoded_usage(usage)
                last_pair = None
            if pair is not last_pair:
                last_pair = pair
                packer = pair_packer(pair[0], encoded)
            seconds = (first - child_start) / 1e9  # the client span's first byte, from its start
            if packer is not None:
                pair_with(
                    out, trace_id, span_id, child_id, start, end, child_start, child_end, seconds,
                    packer,
                )  # fmt: skip
                continue
            # an unusual size: each span alone
            out.append(encode_known(trace_id, span_id, "", 0, start, end, pair[1], encoded))
            extra = _FIRST_CHUNK + _double(seconds) + encoded
            child = encode_known(
                trace_id, child_id, "", span_id, child_start, child_end, pair[2], extra
            )
            out.append(child)
        except Exception:  # a bug in tracing loses these spans, not the batch
            log.exception("spans of trace %032x not exported", entry[0])
    return out


class LoopSpan(_Span):
    """A loop run or step: rarer than requests, so attributes in a dict, encoded as they are;
    also current in OpenTelemetry's context while it runs."""

    __slots__ = ("attributes", "error", "kind", "links", "name", "outer", "token")
    name: str
    kind: int
    attributes: dict[str, Any]
    links: Sequence[_Link]
    error: bool
    outer: _Span | None
    token: Token[Context]

    def encode(self) -> bytes:
        return encode_span(
            self.trace_id,
            self.span_id,
            self.state,
            self.parent_id,
            self.parent_remote,
            self.name,
            self.kind,
            self.start,
            self.stop,
            self.attributes,
            [(t, s, r, _CREATED_BY) for t, s, r in self.links],
            self.error,
        )

    def span_context(self) -> SpanContext:
        return SpanContext(
            self.trace_id,
            self.span_id,
            is_remote=False,
            trace_flags=_SAMPLED if self.sampled else _NOT_SAMPLED,
            trace_state=TraceState.from_header([self.state]) if self.state else None,
        )


class _SpanQueue:
    """A bounded queue of ended spans, encoded: ``put`` is a deque append on the caller's
    thread; the Trio task in :meth:`Telemetry.run` exports them in batches."""

    def __init__(self, max_queue: int, batch: int) -> None:
        # Each entry one span, or two (a request's server and client span, queued as values
        # and encoded with the batch: _frames) and then an empty entry, so that the entries
        # count the spans.
        self.spans: collections.deque[bytes | _Queued] = collections.deque()
        # Requests whose usage is still a body (two spans each, counted in the queue's size
        # too), queued in ``spans`` once their bodies are read, a few together (settle).
        self.later: list[_Later] = []
        self.settle_at = _SETTLE  # settle when this many wait
        self.max_queue = max_queue
        self.batch = batch
        # Below this many entries, two spans encoded as one fit (a batch never splits them, so
        # a batch of one span takes them one by one).
        self.pair_room = max_queue - 1 if batch >= 2 else 0
        self.dropped = 0
        self.ready = trio.Event()
        self._trio_thread: int | None = None

    def put(self, span: bytes) -> None:
        if not self.refuses():
            self.append(span)

    def refuses(self) -> bool:
        """Whether a span ending now is dropped (the queue is full; counted): asked before
        any work is spent encoding it."""
        if len(self.spans) + 2 * len(self.later) >= self.max_queue:
            self.dropped += 1
            return True
        return False

    def settle(self, force: bool = False) -> None:
        """Queue the requests whose usage was a body, as plain values (ints and cached
        parts: the collector untracks the tuple at once, and the body is not held until the
        export). Those whose body the access writer has read (it reads each within
        milliseconds of its request, in the order they ended) go first; the rest wait for the
        next call, unless ``force`` (a batch to export) or too many wait (the access log is
        off, say): then the tracer reads the unread ones itself, together."""
        later = self.later
        ready = 0
        for _, body in later:
            if not hasattr(body, "found"):  # set when read
                break
            ready += 1
        if ready < len(later) and (force or len(later) >= _HOLD):
            unread = [body for _, body in later[ready:] if not hasattr(body, "found")]
            try:
                read_now(unread)  # the access writer skips them
            except Exception:  # a bug in tracing loses these spans, not the request
                log.exception("usage of %d requests not read for their spans", len(unread))
                del later[ready:]
            ready = len(later)
        self.settle_at = len(later) - ready + _SETTLE
        if not ready:
            return
        spans = self.spans
        for values, body in later[:ready]:
            counts = body.found
            spans.append(cast("_Queued", values + (_NO_USAGE if counts is None else counts)))
            spans.append(b"")
        del later[:ready]
        if len(spans) >= self.batch:
            self.batch_full()

    def append(self, span: bytes) -> None:
        """Queue an encoded span whose room :meth:`refuses` checked."""
        spans = self.spans
        spans.append(span)
        if len(spans) >= self.batch:
            self.batch_full()

    def batch_full(self) -> None:
        if threading.get_ident() == self._trio_thread:
            self.ready.set()  # a full batch: export now rather than at the next tick

    def take(self) -> list[bytes | _Queued]:
        if self.later:
            self.settle(force=True)
        spans = self.spans
        n = min(len(spans), self.batch)
        if n < len(spans) and not spans[n]:
            n -= 1  # a pair's empty entry would be next: the pair goes in the next batch
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


def _remote(traceparent: str, tracestate: str | None) -> _Remote | None:
    """A caller's span from its ``traceparent``/``tracestate``, by the W3C propagator's rules
    (``None``: no valid one)."""
    if len(traceparent) > _TRACEPARENT_LIMIT:
        return None
    match = _TRACEPARENT.search(traceparent)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    if (version == "00" and rest) or version == "ff":
        return None
    state = ""
    if tracestate is not None and len(tracestate) <= _TRACESTATE_LIMIT:
        state = TraceState.from_header([tracestate]).to_header()
    return int(trace_id, 16), int(span_id, 16), bool(int(flags, 16) & 1), state


def _remote_of(headers: Iterable[tuple[bytes, bytes]]) -> _Remote | None:
    traceparent = tracestate = None
    for k, v in headers:
        if k == b"traceparent":
            traceparent = v.decode("latin-1")
        elif k == b"tracestate":
            tracestate = v.decode("latin-1")
    return _remote(traceparent, tracestate) if traceparent else None


def _current() -> _Span | SpanContext | None:
    """The current span: ours, else another's through the OpenTelemetry API (a caller's span
    around a loop run as a library); ``None``: no valid one."""
    span = _active.get()
    if span is not None:
        return span
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def _leaf_bound(sampler: Sampler) -> int | None:
    """The bound a standard sampler compares the trace id's low 64 bits with (always on: every
    id is under it; off: none), or ``None`` for a sampler that must be asked."""
    method = type(sampler).should_sample
    if method is StaticSampler.should_sample:
        decision = getattr(sampler, "_decision", None)
        return _ALWAYS if decision is Decision.RECORD_AND_SAMPLE else 0
    if method is TraceIdRatioBased.should_sample:
        return getattr(sampler, "bound", None)
    return None


def _bounds(sampler: Sampler) -> tuple[int, int, int] | None:
    """A standard sampler as bounds for (a root, under a sampled remote parent, under a
    non-sampled one), or ``None``: the sampler is called for each decision."""
    if type(sampler).should_sample is ParentBased.should_sample:
        parts = [
            _leaf_bound(getattr(sampler, name, None))  # type: ignore[arg-type]
            for name in ("_root", "_remote_parent_sampled", "_remote_parent_not_sampled")
        ]
        root, sampled, not_sampled = parts
        if root is None or sampled is None or not_sampled is None:
            return None
        return root, sampled, not_sampled
    bound = _leaf_bound(sampler)
    return None if bound is None else (bound, bound, bound)


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
        self.bounds = _bounds(self.sampler)
        self.always = self.bounds == (_ALWAYS, _ALWAYS, _ALWAYS)  # every root trace sampled
        self.queue = _SpanQueue(max_queue, batch)
        # The encoded name, kind and repeated attributes of server and client spans, by their
        # values: each gateway its own (its providers are its own objects, and a test's spans
        # are built from its own gateway's values, not from a cache another one filled).
        self.request_parts: dict[tuple[Any, ...], KnownParts] = {}
        self.attempt_parts: dict[tuple[Any, ...], KnownParts] = {}
        # A request's server and client span together (_pair_of), and the last of them
        # (compared before the key is hashed: most requests repeat the last one's values).
        self.pair_parts: dict[tuple[Any, ...], _Pair] = {}
        no_parts: KnownParts = (b"", b"", 0, b"", False, False)
        self.last_pair: tuple[tuple[Any, ...], _Pair] = (
            (),
            ((b"", b"", 0, b"", b"", 0), no_parts, no_parts),
        )
        self.exporter = exporter
        self.record_content = record_content
        self.interval = interval
        self.export_timeout = export_timeout

    def _decide(
        self,
        trace_id: int,
        remote: _Remote | None,
        name: str,
        kind: int,
        attributes: Mapping[str, Any],
    ) -> tuple[bool, str]:
        """The sampler's decision for a new trace (``remote``: under a caller's span), and the
        trace state it keeps."""
        bounds = self.bounds
        if bounds is not None:  # the SDK's rule for the standard samplers; state: the parent's
            if remote is None:
                return trace_id & _M64 < bounds[0], ""
            return trace_id & _M64 < bounds[1 if remote[2] else 2], remote[3]
        context = None
        if remote is not None:
            parent = SpanContext(
                trace_id,
                remote[1],
                is_remote=True,
                trace_flags=_SAMPLED if remote[2] else _NOT_SAMPLED,
                trace_state=TraceState.from_header([remote[3]]) if remote[3] else None,
            )
            context = trace.set_span_in_context(NonRecordingSpan(parent))
        result = self.sampler.should_sample(context, trace_id, name, _SDK_KINDS[kind], attributes)
        state = result.trace_state
        return result.decision is Decision.RECORD_AND_SAMPLE, state.to_header() if state else ""

    # -- export ---------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Export queued spans until cancelled, then flush what is left (bounded) and close the
        exporter. A batch is encoded and POSTed by this task."""
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
                queue.settle(force=True)
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
                    while queue.spans or queue.later:
                        await self._export(queue.take())
                with trio.move_on_after(1.0):
                    await self.exporter.aclose()

    async def _export(self, batch: Sequence[bytes | _Queued]) -> None:
        # The exporter bounds its request and retries by the export timeout; this is a margin.
        with trio.move_on_after(self.export_timeout + 1.0):
            try:
                await self.exporter.export(self.request.encode(_frames(batch)))
            except Exception:
                log.warning("span export failed", exc_info=True)

    async def warn_dropped(self, every: float = _DROPS_WARN_EVERY) -> None:
        """Every ``every`` seconds, until cancelled: a warning with the number of spans a full
        queue dropped meanwhile, if any. The request path only counts them (``refuses``)."""
        queue = self.queue
        reported = 0
        while True:
            await trio.sleep(every)
            dropped = queue.dropped
            if dropped != reported:
                log.warning(
                    "%d spans dropped in the last %gs, %d since start: the export queue "
                    "(max_queue_size %d) was full, the collector is down or slow",
                    dropped - reported,
                    every,
                    dropped,
                    queue.max_queue,
                )
                reported = dropped

    # -- the HTTP request (server span) ---------------------------------------------------------

    def start_request(
        self, method: str, route: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> RequestSpan:
        """Start the request's server span (a child of the caller's ``traceparent``, if any) and
        make it current, and this tracer the current one (see
        :func:`~onwards_trio._ops.telemetry.current_telemetry`: the loop's spans find it there)."""
        if _telemetry.get() is not self:  # a connection's requests run in one task
            _telemetry.set(self)
        remote: _Remote | None = None
        clean = True
        for k, _ in headers:
            if k in _TRACE_HEADERS:
                remote = _remote_of(headers)
                clean = False
                break
        bounds = self.bounds
        if remote is None:
            ids = _bits(192)  # the trace id and the span's id in one draw
            trace_id = ids >> 64 or _bits(128) or 1
            span_id = ids & _M64 or _new_id()
            parent_id = 0
            if self.always:
                sampled, state = True, ""
            elif bounds is not None:
                sampled, state = trace_id & _M64 < bounds[0], ""
            else:
                sampled, state = self._request_decision(trace_id, None, method, route)
        else:
            trace_id, parent_id = remote[0], remote[1]
            span_id = _new_id()
            if bounds is not None:
                sampled, state = trace_id & _M64 < bounds[1 if remote[2] else 2], remote[3]
            else:
                sampled, state = self._request_decision(trace_id, remote, method, route)
        span = _new(RequestSpan)  # no __init__ call: the fields are set here
        span.trace_id = trace_id
        span.span_id = span_id
        span.parent_id = parent_id
        span.parent_remote = remote is not None
        span.sampled = sampled
        span.state = state
        span.clean = clean
        span.outer = _active.get()
        if sampled:
            span.method = method
            span.route = route
            span.pending = None
            span.start = time.time_ns()
        _active.set(span)
        return span

    def _request_decision(
        self, trace_id: int, remote: _Remote | None, method: str, route: str
    ) -> tuple[bool, str]:
        name = f"{method} {route}" if route != "other" else method
        attributes = {"http.request.method": method, "http.route": route}
        return self._decide(trace_id, remote, name, KIND_SERVER, attributes)

    def end_request(
        self,
        span: RequestSpan,
        status: int,
        alias: str | None = None,
        key_label: str | None = None,
        provider: int | None = None,
        attempts: int | None = None,
        usage: Any = None,
    ) -> None:
        """End the request's server span. ``usage``: the request's token usage as the access
        line gets it (``_ops.access.UsageParts``: a body left for later is read with the
        export batch when the span is queued with its client span, else now)."""
        _active.set(span.outer)
        span.outer = None
        if not span.sampled:
            return
        stop = time.time_ns()
        attempt = span.pending
        span.pending = _CLOSED
        if alias is not None and len(alias) > _ALIAS_LIMIT:
            alias = alias[:_ALIAS_LIMIT] + "..."  # what the client sent, configured or not
        # Into the queue as bytes or plain values, not as span objects: one waiting seconds for
        # its batch would survive young collections and be promoted (at 100 % sampling that
        # doubled the collector's work); the parts every request repeats are encoded once per
        # combination.
        queue = self.queue
        head = (span.method, span.route, status, alias, key_label, provider, attempts)
        if attempt is not None:
            spans = queue.spans
            if (
                attempt.tokens is usage
                and attempt.first is not None
                and span.clean  # no trace headers came: a root span
                and not span.state  # (a sampler may still have given it one)
                and len(spans) + 2 * len(queue.later) < queue.pair_room
            ):
                # The usual request: its span and its one client span, queued together.
                both = (
                    *head,
                    attempt.provider,  # by identity: a reload makes new ones
                    attempt.path,
                    attempt.model,
                    attempt.attempt,
                    attempt.retry_reason,
                    attempt.status,
                    attempt.error,
                )
                last = self.last_pair
                if both == last[0]:  # the same as the last request's: no hashing
                    pair = last[1]
                else:
                    try:
                        pair = self.pair_parts.get(both) or _built(self.pair_parts, both, _pair_of)
                    except Exception:  # a bug in tracing must not fail the request
                        log.exception("span %r not exported", span)
                        return
                    self.last_pair = (both, pair)
                values = (
                    span.trace_id,
                    span.span_id,
                    attempt.span_id,
                    span.start,
                    stop,
                    attempt.start,
                    attempt.stop,
                    attempt.first,
                    pair,
                )
                if isinstance(usage, LaterUsage):  # a body: read with a few others (settle)
                    later = queue.later
                    later.append((values, usage))
                    if len(spans) + 2 * len(later) >= queue.batch:
                        queue.settle(force=True)  # a full batch is exported at once
                    elif len(later) >= queue.settle_at:
                        queue.settle()
                    return
                # Plain values (ints and the cached parts: the collector untracks the tuple at
                # once), encoded with their batch (_frames), then an empty entry: the entries
                # count the spans.
                spans.append(values + (_NO_USAGE if usage is None else usage))
                spans.append(b"")
                if len(spans) >= queue.batch:
                    queue.batch_full()
                return
            attempt.encode()
        if queue.refuses():
            return
        key = (*head, span.parent_remote)
        try:
            tokens = total_usage(usage)
            parts = self.request_parts.get(key) or _built(
                self.request_parts, key, _request_parts_of
            )
            frame = encode_known(
                span.trace_id,
                span.span_id,
                span.state,
                span.parent_id,
                span.start,
                stop,
                parts,
                b"" if tokens is None else _usage_fields(tokens),
            )
        except Exception:  # a bug in tracing must not fail the request
            log.exception("span %r not exported", span)
            return
        queue.append(frame)

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
        parent = _active.get()
        if parent is not None:
            if not parent.sampled:
                return _UNSAMPLED_ATTEMPT
            span = _new(AttemptSpan)  # no __init__ call: the fields are set here
            span.trace_id = parent.trace_id
            span.span_id = _bits(64) or _new_id()
            span.parent_id = parent.span_id
            span.parent_remote = False
            span.sampled = True
            span.state = parent.state
            span.clean = parent.clean
            span.request = parent if type(parent) is RequestSpan else None
        else:  # not under a request of ours (the pipeline run as a library)
            trace_id, parent_id, remote, sampled, state = self._placed(
                f"{operation_for(path)} {model}", KIND_CLIENT, {}, _current()
            )
            span = AttemptSpan(trace_id, _new_id(), parent_id, remote, sampled, state)
            span.request = None
        if span.sampled:
            span.path = path
            span.model = model
            span.provider = provider
            span.attempt = attempt
            span.retry_reason = retry_reason
            span.status = span.first = span.tokens = None
            span.queue = self.queue
            span.parts = self.attempt_parts
            span.start = time.time_ns()
        return span

    def _placed(
        self,
        name: str,
        kind: int,
        attributes: Mapping[str, Any],
        parent: _Span | SpanContext | None,
    ) -> tuple[int, int, bool, bool, str]:
        """Where a new span under ``parent`` sits: (trace id, parent span id (0: a root),
        parent remote, sampled, trace state). The sampler decides at a trace's root or under a
        remote parent; under a local one, the span follows its parent."""
        if isinstance(parent, _Span):
            return parent.trace_id, parent.span_id, False, parent.sampled, parent.state
        if parent is None:
            trace_id = _bits(128) or _bits(128) or 1
            sampled, state = self._decide(trace_id, None, name, kind, attributes)
            return trace_id, 0, False, sampled, state
        state = parent.trace_state.to_header() if parent.trace_state else ""
        sampled = parent.trace_flags.sampled
        if parent.is_remote:
            remote = (parent.trace_id, parent.span_id, sampled, state)
            sampled, state = self._decide(parent.trace_id, remote, name, kind, attributes)
        return parent.trace_id, parent.span_id, parent.is_remote, sampled, state

    # -- the loop -------------------------------------------------------------------------------

    def _start_loop_span(
        self,
        name: str,
        attributes: dict[str, Any],
        parent: _Span | SpanContext | None,
        links: Sequence[_Link] = (),
    ) -> LoopSpan:
        trace_id, parent_id, remote, sampled, state = self._placed(
            name, KIND_INTERNAL, attributes, parent
        )
        span = LoopSpan(trace_id, _new_id(), parent_id, remote, sampled, state)
        span.name = name
        span.kind = KIND_INTERNAL
        span.attributes = attributes
        span.links = links
        span.error = False
        span.start = time.time_ns()
        span.outer = _active.get()
        _active.set(span)
        span.token = otel_context.attach(
            trace.set_span_in_context(NonRecordingSpan(span.span_context()))
        )
        return span

    def _end_loop_span(self, span: LoopSpan) -> None:
        _active.set(span.outer)
        span.outer = None
        otel_context.detach(span.token)
        if span.sampled:
            span.stop = time.time_ns()
            try:
                frame = span.encode()
            except Exception:  # a bug in tracing must not fail the loop
                log.exception("span %r not exported", span)
                return
            self.queue.put(frame)

    def start_response(
        self, response_id: str, model: str | None, depth: int, agent: str | None = None
    ) -> LoopSpan:
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
        return self._start_loop_span(name, attributes, parent, links)

    def end_response(
        self, span: LoopSpan, status: str, usage: Any = None, error: str | None = None
    ) -> None:
        span.attributes["onwards.response.status"] = status
        if usage is not None:
            span.attributes.update(_usage_attributes(usage))
        if error is not None:
            span.attributes["error.type"] = error
            span.error = True
        self._end_loop_span(span)

    def start_step(self, step_id: str, kind: str, payload: Any) -> LoopSpan:
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
        return self._start_loop_span(title, attributes, _current())

    def end_step(
        self, span: LoopSpan, kind: str, outcome: str, result: Any = None, usage: Any = None
    ) -> None:
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
        self._end_loop_span(span)

    # -- background responses -------------------------------------------------------------------

    @staticmethod
    def _leave(origin: _Link | None) -> None:
        _origin.set(origin)
        _active.set(None)
        otel_context.attach(Context())

    @staticmethod
    def detach() -> None:
        """Leave the current trace, for the rest of this task (one that outlives the request
        that started it): the next loop run starts a new trace linked to the current span."""
        current = _current()
        if isinstance(current, _Span):
            Telemetry._leave((current.trace_id, current.span_id, False))
        elif current is not None:
            Telemetry._leave((current.trace_id, current.span_id, current.is_remote))
        else:
            Telemetry._leave(_origin.get())

    @staticmethod
    def traceparent() -> str | None:
        """The W3C ``traceparent`` of the current span (``None``: there is none): what a
        background response keeps, so that a process resuming it can link to its request."""
        current = _current()
        if current is None:
            return None
        if isinstance(current, _Span):
            return current.traceparent()
        sampled = "01" if current.trace_flags.sampled else "00"
        return f"00-{current.trace_id:032x}-{current.span_id:016x}-{sampled}"

    @staticmethod
    def adopt(traceparent: str | None) -> None:
        """For a task that resumes a response another process started: leave whatever trace
        the task was in; the next loop run starts a new trace, linked to ``traceparent`` (the
        request that created the response) when it is a valid one."""
        remote = _remote(traceparent, None) if traceparent else None
        Telemetry._leave((remote[0], remote[1], True) if remote is not None else None)
