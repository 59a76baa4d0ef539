"""Our OTLP encoding (``_ops/otlp.py``) against the reference: the SDK's own encoder.

For any spans, the bytes we write decode (with ``opentelemetry-proto``) to exactly the message
the SDK's OTLP encoder makes of the same spans as ``ReadableSpan``s.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from onwards_trio._ops.otlp import (
    TracesRequest,
    encode_known,
    encode_span,
    float_attribute,
    int_attribute,
    known_parts,
    name_and_kind,
    pair_packer,
    pair_parts,
    pair_with,
    span_attributes,
)
from onwards_trio._ops.tracing import _frames

_INT64 = st.integers(-(2**63), 2**63 - 1)
_PRIMITIVES = st.one_of(st.text(max_size=30), st.booleans(), _INT64, st.floats(allow_nan=False))
# Attribute values as the SDK accepts them: primitives and homogeneous sequences of them.
_VALUES = st.one_of(
    _PRIMITIVES,
    st.lists(st.text(max_size=10), max_size=4),
    st.lists(_INT64, max_size=4),
    st.lists(st.floats(allow_nan=False), max_size=4),
    st.lists(st.booleans(), max_size=4),
)
_ATTRIBUTES = st.dictionaries(st.text(max_size=20), _VALUES, max_size=8)
_STATE = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
    st.from_regex(r"[a-zA-Z0-9.]{1,8}", fullmatch=True),
    max_size=3,
)


@attrs.frozen
class _Link:
    trace_id: int
    span_id: int
    remote: bool
    attributes: dict[str, Any]


@attrs.frozen
class _Record:
    """A span as tracing.py records it."""

    trace_id: int
    span_id: int
    state: dict[str, str]
    parent_id: int  # 0: a root
    parent_remote: bool
    name: str
    kind: SpanKind
    start: int
    end: int
    attributes: dict[str, Any]
    links: list[_Link]
    error: bool


_LINKS = st.builds(
    _Link,
    st.integers(1, 2**128 - 1),
    st.integers(1, 2**64 - 1),
    st.booleans(),
    _ATTRIBUTES,
)


@st.composite
def _records(draw: st.DrawFn) -> _Record:
    parent_id = draw(st.one_of(st.just(0), st.integers(1, 2**64 - 1)))
    return _Record(
        trace_id=draw(st.integers(1, 2**128 - 1)),
        span_id=draw(st.integers(1, 2**64 - 1)),
        state=draw(_STATE),
        parent_id=parent_id,
        parent_remote=bool(parent_id) and draw(st.booleans()),
        name=draw(st.text(max_size=40)),
        kind=draw(st.sampled_from(list(SpanKind))),
        start=draw(st.integers(0, 2**64 - 1)),
        end=draw(st.integers(0, 2**64 - 1)),
        attributes=draw(_ATTRIBUTES),
        links=draw(st.lists(_LINKS, max_size=2)),
        error=draw(st.booleans()),
    )


def _ours(resource: Resource, records: list[_Record]) -> bytes:
    request = TracesRequest(resource.attributes, "onwards_trio", None, resource.schema_url)
    return request.encode(
        [
            encode_span(
                r.trace_id,
                r.span_id,
                ",".join(f"{k}={v}" for k, v in r.state.items()),
                r.parent_id,
                r.parent_remote,
                r.name,
                r.kind.value + 1,  # the protocol counts from 1 (INTERNAL)
                r.start,
                r.end,
                r.attributes,
                [(x.trace_id, x.span_id, x.remote, x.attributes) for x in r.links],
                r.error,
            )
            for r in records
        ]
    )


def _reference(resource: Resource, records: list[_Record]) -> ExportTraceServiceRequest:
    scope = InstrumentationScope("onwards_trio")
    spans = [
        ReadableSpan(
            name=r.name,
            context=SpanContext(
                r.trace_id,
                r.span_id,
                is_remote=False,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
                trace_state=TraceState(list(r.state.items())),
            ),
            parent=(
                SpanContext(r.trace_id, r.parent_id, is_remote=r.parent_remote)
                if r.parent_id
                else None
            ),
            resource=resource,
            attributes=r.attributes,
            links=[
                Link(SpanContext(x.trace_id, x.span_id, is_remote=x.remote), x.attributes)
                for x in r.links
            ],
            kind=r.kind,
            status=Status(StatusCode.ERROR) if r.error else Status(),
            start_time=r.start,
            end_time=r.end,
            instrumentation_scope=scope,
        )
        for r in records
    ]
    return encode_spans(spans)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.text(max_size=20), _PRIMITIVES, max_size=5),
    st.sampled_from(["", "https://opentelemetry.io/schemas/1.24.0"]),
    st.lists(_records(), min_size=1, max_size=4),
)
def test_our_bytes_decode_to_what_the_sdk_encoder_makes(
    resource_attributes: dict[str, Any], schema_url: str, records: list[_Record]
) -> None:
    resource = Resource(resource_attributes, schema_url)
    reference = _reference(resource, records)
    ours = ExportTraceServiceRequest.FromString(_ours(resource, records))
    assert ours == reference


@given(st.lists(_records(), min_size=1, max_size=3))
def test_our_bytes_are_the_sdk_encoders_bytes(records: list[_Record]) -> None:
    """Field for field in the same order: a collector sees no difference at all."""
    resource = Resource({"service.name": "gateway"})
    assert _ours(resource, records) == _reference(resource, records).SerializeToString()


def test_an_attribute_that_cannot_be_encoded_is_left_out() -> None:
    span = encode_span(1, 2, "", 0, False, "s", 1, 1, 2, {"bad": object(), "ok": 1}, [], False)
    decoded = ExportTraceServiceRequest.FromString(TracesRequest({}, "x").encode([span]))
    (received,) = decoded.resource_spans[0].scope_spans[0].spans
    assert [a.key for a in received.attributes] == ["ok"]


@given(st.text(max_size=200), _INT64)
def test_an_int_attribute_is_encoded_as_in_any_span(key: str, value: int) -> None:
    """Token counts are encoded by a shortcut (they are not cached): the same bytes."""
    assert int_attribute(key, value) == span_attributes({key: value})


@given(st.text(max_size=200), st.floats(allow_nan=False))
def test_a_float_attribute_is_encoded_as_in_any_span(key: str, value: float) -> None:
    assert float_attribute(key, value) == span_attributes({key: value})


@given(_records(), st.dictionaries(st.text(max_size=20), _PRIMITIVES, max_size=3))
def test_a_span_with_prepared_parts_is_encoded_as_any_span(
    record: _Record, extra: dict[str, Any]
) -> None:
    """The server and client spans' shortcut (their repeated parts encoded once, other
    attributes first) writes the bytes :func:`encode_span` writes of the same span."""
    extra = {k: v for k, v in extra.items() if k not in record.attributes}
    state = ",".join(f"{k}={v}" for k, v in record.state.items())
    kind = record.kind.value + 1
    parts = known_parts(
        name_and_kind(record.name, kind),
        span_attributes(record.attributes),
        record.error,
        record.parent_remote,
    )
    ours = encode_known(
        record.trace_id,
        record.span_id,
        state,
        record.parent_id,
        record.start,
        record.end,
        parts,
        span_attributes(extra),
    )
    expected = encode_span(
        record.trace_id,
        record.span_id,
        state,
        record.parent_id,
        record.parent_remote,
        record.name,
        kind,
        record.start,
        record.end,
        {**extra, **record.attributes},
        [],
        record.error,
    )
    assert ours == expected


_FIRST = "gen_ai.response.time_to_first_chunk"
_NAMES = st.dictionaries(st.text(max_size=20), _PRIMITIVES, max_size=4)


_IDS = st.integers(1, 2**64 - 1)
_TIMES = st.integers(0, 2**64 - 1)


@settings(max_examples=300, deadline=None)
def _request_spans(
    trace_id: int,
    ids: tuple[int, int],
    times: tuple[int, int, int, int],
    names: tuple[str, str],
    attributes: tuple[dict[str, Any], dict[str, Any]],
    errors: tuple[bool, bool],
) -> list[bytes]:
    """A request's server span and its client span, each encoded alone by encode_span."""
    span_id, child_id = ids
    start, end, child_start, child_end = times
    return [
        encode_span(
            trace_id, span_id, "", 0, False, names[0], 2, start, end, attributes[0], [], errors[0]
        ),
        encode_span(
            trace_id,
            child_id,
            "",
            span_id,
            False,
            names[1],
            3,
            child_start,
            child_end,
            attributes[1],
            [],
            errors[1],
        ),
    ]


@given(
    st.integers(1, 2**128 - 1),
    st.tuples(_IDS, _IDS),
    st.tuples(_TIMES, _TIMES, _TIMES, _TIMES),
    st.floats(0, 1e6),
    st.tuples(st.text(max_size=40), st.text(max_size=40)),
    st.tuples(st.booleans(), st.booleans()),
    st.tuples(_NAMES, _NAMES),
    st.dictionaries(st.sampled_from(["gen_ai.usage.input_tokens", "x"]), _INT64, max_size=2),
)
def test_a_request_and_its_attempt_encoded_together_decode_as_two_spans(
    trace_id: int,
    ids: tuple[int, int],
    times: tuple[int, int, int, int],
    first: float,
    names: tuple[str, str],
    errors: tuple[bool, bool],
    attributes: tuple[dict[str, Any], dict[str, Any]],
    usage: dict[str, int],
) -> None:
    """A request's server span and its client span (pair_with, fields in another order)
    decode to the same spans as each encoded alone by :func:`encode_span`."""
    server, client = ({k: v for k, v in a.items() if k not in usage} for a in attributes)
    client.pop(_FIRST, None)
    parts = pair_parts(
        known_parts(name_and_kind(names[0], 2), span_attributes(server), errors[0], False),
        known_parts(name_and_kind(names[1], 3), span_attributes(client), errors[1], False),
    )
    span_id, child_id = ids
    start, end, child_start, child_end = times
    usage_fields = span_attributes(usage)
    packer = pair_packer(parts, usage_fields)
    assume(packer is not None)  # an unusual size: each is encoded alone
    assert packer is not None
    pieces: list[bytes] = []
    pair_with(
        pieces, trace_id, span_id, child_id, start, end, child_start, child_end, first, packer
    )
    ours = b"".join(pieces)
    alone = _request_spans(
        trace_id,
        ids,
        times,
        names,
        ({**usage, **server}, {_FIRST: first, **usage, **client}),
        errors,
    )
    request = TracesRequest({}, "x")
    decoded = ExportTraceServiceRequest.FromString(request.encode([ours]))
    assert decoded == ExportTraceServiceRequest.FromString(request.encode(alone))


_USAGE_KEYS = (
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.reasoning.output_tokens",
)


@settings(max_examples=150)
@given(
    st.integers(1, 2**128 - 1),
    st.tuples(_IDS, _IDS),
    st.tuples(_TIMES, _TIMES, _TIMES, _TIMES),
    st.tuples(st.text(max_size=1200), st.text(max_size=40)),
    st.lists(st.one_of(st.none(), st.tuples(*[st.integers(0, 2**40)] * 4)), min_size=1, max_size=3),
)
def test_requests_queued_as_values_decode_as_their_spans_in_any_size(
    trace_id: int,
    ids: tuple[int, int],
    times: tuple[int, int, int, int],
    names: tuple[str, str],
    usages: list[tuple[int, int, int, int] | None],
) -> None:
    """Requests' two spans queued as plain values (the export task encodes a batch of them,
    each request's together or, at an unusual size, each span alone) decode as
    :func:`encode_span` makes them."""
    span_id, child_id = ids
    start, end, child_start, child_end = times
    first = child_start + 1_500_000
    server = {"http.route": names[0], "http.response.status_code": 200}
    client = {"onwards.attempt": 1}
    alone = (
        known_parts(name_and_kind(names[0], 2), span_attributes(server), False, False),
        known_parts(name_and_kind(names[1], 3), span_attributes(client), False, False),
    )
    pair = (pair_parts(*alone), *alone)
    queued: list[Any] = []
    expected: list[bytes] = []
    for usage in usages:
        counts = (-1, 0, 0, 0) if usage is None else usage
        queued += [
            (trace_id, span_id, child_id, start, end, child_start, child_end, first, pair, *counts),
            b"",
        ]
        used = {
            k: v for i, (k, v) in enumerate(zip(_USAGE_KEYS, counts, strict=True)) if i < 2 or v
        }
        if usage is None:
            used = {}
        expected += _request_spans(
            trace_id,
            ids,
            times,
            names,
            ({**used, **server}, {_FIRST: (first - child_start) / 1e9, **used, **client}),
            (False, False),
        )
    request = TracesRequest({}, "x")
    decoded = ExportTraceServiceRequest.FromString(request.encode(_frames(queued)))
    assert decoded == ExportTraceServiceRequest.FromString(request.encode(expected))
