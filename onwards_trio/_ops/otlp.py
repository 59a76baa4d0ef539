"""OTLP/HTTP trace export: our own protobuf encoding of the spans we record, and the POST.

Why not the SDK's exporter: it builds a protobuf message object for every span, attribute and
value and then serialises them, 53-120 µs per span here; at 100 % sampling that was more CPU
than proxying the request (docs/benchmarks.md, "Tracing"). The wire format of
``ExportTraceServiceRequest`` is small and stable, and our spans use a fixed part of it, so a
span is encoded once, when it ends, into a few hundred bytes (a few µs): ids as raw bytes,
times as fixed64, attributes appended as ``KeyValue`` fields. The resource and the scope are
encoded once and reused for every batch. ``tests/ops/test_otlp.py`` checks that what we write
decodes (with ``opentelemetry-proto``) to the message the SDK's encoder makes of the same
spans.

The POST goes over the gateway's own HTTP/1.1 client in a Trio task: no worker thread, no
``requests``. It follows the OTLP/HTTP exporter's settings and behaviour: the same ``OTEL_*``
variables (endpoint, headers, timeout, compression, certificates), retries of 429/502/503/504
and of connection failures with exponential backoff (or ``Retry-After``), all within the export
timeout; a batch that cannot be delivered in time is dropped.
"""

from __future__ import annotations

import gzip
import logging
import random
import ssl
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import httpcore
import trio

from onwards_trio._transport.pool import UpstreamClient

__all__ = [
    "FIRST_CHUNK",
    "KIND_CLIENT",
    "KIND_INTERNAL",
    "KIND_SERVER",
    "ExportSettings",
    "Exporter",
    "PairPacker",
    "PairParts",
    "TracesRequest",
    "encode_frame",
    "encode_known",
    "encode_span",
    "export_settings",
    "float_attribute",
    "int_attribute",
    "known_parts",
    "name_and_kind",
    "pair_packer",
    "pair_parts",
    "pair_with",
    "span_attributes",
]

log = logging.getLogger("onwards_trio.telemetry")

# Span.SpanKind in the protocol (the SDK's SpanKind enum counts from 0).
KIND_INTERNAL: Final = 1
KIND_SERVER: Final = 2
KIND_CLIENT: Final = 3

# SpanFlags: the encoder always says whether the parent was remote (as the SDK's does).
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200

_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack
_fixed32 = struct.Struct("<I").pack
_VARINTS: Final = tuple(bytes((i,)) for i in range(128))
_CACHED: Final = 4096  # entries in each encoding cache
_CACHED_TEXT: Final = 256  # longer attributes are not cached


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _VARINTS[n]
    if 0 < n < 16384:  # lengths of spans and most token counts: two bytes
        return bytes((n & 127 | 128, n >> 7))
    if n < 0:
        n += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while n > 127:
        out.append(n & 127 | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string(tag: bytes, text: str) -> bytes:
    data = text.encode()
    return tag + _varint(len(data)) + data


def _any_value(value: Any) -> bytes:
    """The fields of an ``AnyValue`` holding ``value`` (the SDK's type order)."""
    if value is None:
        return b""
    if value is True:
        return b"\x10\x01"
    if value is False:
        return b"\x10\x00"
    if isinstance(value, str):
        return _string(b"\x0a", value)
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, bytes):
        return b"\x3a" + _varint(len(value)) + value
    if isinstance(value, Sequence):
        array = b"".join(_message(b"\x0a", _any_value(v)) for v in value)
        return _message(b"\x2a", array)
    if isinstance(value, Mapping):
        kvlist = b"".join(_message(b"\x0a", _key_value(str(k), v)) for k, v in value.items())
        return _message(b"\x32", kvlist)
    raise TypeError(f"cannot encode a {type(value).__name__} attribute")


def _message(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


_keys: dict[str, bytes] = {}
# Encoded span attributes (tag included) by (key, value), with the value's type: a request's
# spans repeat most of theirs (method, route, alias, provider, status, small counts), so most
# cost one dict lookup with the item ``dict.items()`` yields anyway.
_fields: dict[tuple[str, Any], tuple[type, bytes]] = {}
_names: dict[str, bytes] = {}


def _key_value(key: str, value: Any) -> bytes:
    head = _keys.get(key)
    if head is None:
        head = _string(b"\x0a", key) if key else b""
        if len(_keys) < _CACHED:  # attribute names are a small fixed set
            _keys[key] = head
    return head + _message(b"\x12", _any_value(value))


def _key_values(tag: bytes, attributes: Mapping[str, Any]) -> bytes:
    """Repeated ``KeyValue`` fields numbered ``tag``; a value that cannot be encoded is left
    out (and logged), as the SDK's encoder does."""
    out = []
    for key, value in attributes.items():
        try:
            kv = _key_value(key, value)
        except (TypeError, UnicodeEncodeError) as exc:
            log.warning("span attribute %s not exported: %s", key, exc)
            continue
        out.append(tag + _varint(len(kv)) + kv)
    return b"".join(out)


def _span_attributes(attributes: Mapping[str, Any]) -> bytes:
    """:func:`_key_values` for ``Span.attributes`` (9), through the cache."""
    out = []
    cache = _fields
    for item in attributes.items():
        try:
            hit = cache.get(item)
        except TypeError:  # an unhashable value (a list)
            hit = None
        value = item[1]
        kind = type(value)
        if hit is not None and hit[0] is kind:  # 1 == True == 1.0: the type must match too
            out.append(hit[1])
            continue
        field = _key_values(b"\x4a", {item[0]: value})
        out.append(field)
        if (kind is int or kind is str) and len(cache) < _CACHED and len(field) < _CACHED_TEXT:
            cache[item] = (kind, field)
    return b"".join(out)


_head = struct.Struct(">BBQQBBQ").pack  # Span.trace_id (1) and .span_id (2), raw bytes
_parent = struct.Struct(">BBQ").pack  # Span.parent_span_id (4)
_head_parent = struct.Struct(">BBQQBBQBBQ").pack  # both, without a trace_state (3) between
_times = struct.Struct("<BQBQ").pack  # Span.start_time_unix_nano (7), .end_time_unix_nano (8)
_KINDS: Final = tuple(b"\x30" + _VARINTS[i] for i in range(6))  # Span.kind (6)
_M64: Final = (1 << 64) - 1
# Span.status (15) and .flags (16, fixed32: whether the parent is remote, as the SDK says it),
# by [error][parent remote]
_TAILS: Final = tuple(
    tuple(
        (b"\x7a\x02\x18\x02" if error else b"\x7a\x00")
        + b"\x85\x01"
        + _fixed32(_HAS_IS_REMOTE | _IS_REMOTE if remote else _HAS_IS_REMOTE)
        for remote in (False, True)
    )
    for error in (False, True)
)
_TIMES_SIZE: Final = 18  # both times of a span
_varint2 = struct.Struct("<H").pack  # a varint of 128 <= n < 16384: (n & 127 | 128) + (n >> 7 << 8)


def name_and_kind(name: str, kind: int) -> bytes:
    """``Span.name`` (5) and ``.kind`` (6), encoded (the name's encoding cached by value)."""
    encoded = _names.get(name)
    if encoded is None:
        encoded = _string(b"\x2a", name) if name else b""
        if len(_names) < _CACHED:
            _names[name] = encoded
    return encoded + _KINDS[kind]


def span_attributes(attributes: Mapping[str, Any]) -> bytes:
    """``Span.attributes`` (9) fields of ``attributes`` (each ``(key, value)`` encoding
    cached by value, for the short ones)."""
    return _span_attributes(attributes) if attributes else b""


# Per attribute name, the head of an int/float ``Span.attributes`` field by the value's length.
_number_heads: dict[str, tuple[bytes, ...]] = {}


def _number_heads_of(key: str) -> tuple[bytes, ...]:
    heads = _number_heads.get(key)
    if heads is None:
        name = (_string(b"\x0a", key) if key else b"") + b"\x12"  # KeyValue.key, .value
        # AnyValue of n bytes: its own length byte and the n bytes follow the head
        heads = tuple(b"\x4a" + _varint(len(name) + 1 + n) + name + _VARINTS[n] for n in range(12))
        if len(_number_heads) < _CACHED:
            _number_heads[key] = heads
    return heads


_INT_VALUES: Final = tuple(b"\x18" + _VARINTS[i] for i in range(128))  # AnyValue.int_value (3)


def int_attribute(key: str, value: int) -> bytes:
    """One ``Span.attributes`` field of an int value, not cached (token counts vary): the same
    bytes as :func:`span_attributes` makes of ``{key: value}``."""
    heads = _number_heads.get(key) or _number_heads_of(key)
    if 0 <= value < 128:
        return heads[2] + _INT_VALUES[value]
    number = b"\x18" + _varint(value)
    return heads[len(number)] + number


def float_attribute(key: str, value: float) -> bytes:
    """:func:`int_attribute` for a float (``AnyValue.double_value``, 4)."""
    return (_number_heads.get(key) or _number_heads_of(key))[9] + b"\x21" + _double(value)


def encode_frame(
    trace_id: int,
    span_id: int,
    trace_state: str,
    parent_id: int,
    parent_remote: bool,
    head: bytes,
    start: int,
    end: int,
    attributes: bytes,
    links: bytes,
    error: bool,
) -> bytes:
    """One ``Span`` as a ``ScopeSpans.spans`` field, from parts encoded already: ``head`` from
    :func:`name_and_kind`, ``attributes`` from :func:`span_attributes` (and
    :func:`int_attribute`), ``links`` the ``Span.links`` fields. Fields in the SDK encoder's
    order, so the bytes are its bytes."""
    if trace_state:
        ids = _head(0x0A, 16, trace_id >> 64, trace_id & _M64, 0x12, 8, span_id)
        ids += _string(b"\x1a", trace_state)
        if parent_id:
            ids += _parent(0x22, 8, parent_id)
    elif parent_id:
        ids = _head_parent(
            0x0A, 16, trace_id >> 64, trace_id & _M64, 0x12, 8, span_id, 0x22, 8, parent_id
        )
    else:
        ids = _head(0x0A, 16, trace_id >> 64, trace_id & _M64, 0x12, 8, span_id)
    if start and end:
        times = _times(0x39, start, 0x41, end)
        size = _TIMES_SIZE
    else:
        times = (b"\x39" + _fixed64(start) if start else b"") + (
            b"\x41" + _fixed64(end) if end else b""
        )
        size = len(times)
    tail = _TAILS[error][parent_remote]
    size += len(ids) + len(head) + len(attributes) + len(links) + len(tail)
    if 127 < size < 16384:  # most spans: the length in two bytes
        length = _varint2(size & 127 | 128 | size >> 7 << 8)
    else:
        length = _varint(size)
    return b"".join((b"\x12", length, ids, head, times, attributes, links, tail))


# ScopeSpans.spans (2) with a two-byte length, Span.trace_id (1), .span_id (2)
# [, .parent_span_id (4)]
# (each field's tag and length byte packed as one "H")
_lead = struct.Struct(">BBBHQQHQ").pack
_lead_parent = struct.Struct(">BBBHQQHQHQ").pack
# A span's repeated parts, for encode_known: name/kind, attributes + status + flags, the size
# of both plus the times, and what encode_frame needs of them when a span takes the long way.
KnownParts = tuple[bytes, bytes, int, bytes, bool, bool]


def known_parts(head: bytes, attributes: bytes, error: bool, parent_remote: bool) -> KnownParts:
    """The parts of a span that repeat across requests, prepared once for :func:`encode_known`:
    ``head`` from :func:`name_and_kind`, ``attributes`` from :func:`span_attributes`."""
    rest = attributes + _TAILS[error][parent_remote]
    return head, rest, len(head) + len(rest) + _TIMES_SIZE, attributes, error, parent_remote


def encode_known(
    trace_id: int,
    span_id: int,
    trace_state: str,
    parent_id: int,
    start: int,
    end: int,
    parts: KnownParts,
    extra: bytes,
) -> bytes:
    """:func:`encode_frame` of a span whose repeated parts are prepared (:func:`known_parts`),
    with ``extra`` attributes (usage, timings) *before* the prepared ones: the server and
    client spans of every request, so the common case is two packs and one join. A trace
    state, a missing time or an unusual size takes :func:`encode_frame`; the bytes are the
    same either way."""
    head, rest, size, attributes, error, parent_remote = parts
    size += len(extra) + (38 if parent_id else 28)  # the id fields (with a parent's: 10 more)
    if trace_state or not (127 < size < 16384 and start and end):
        return encode_frame(
            trace_id,
            span_id,
            trace_state,
            parent_id,
            parent_remote,
            head,
            start,
            end,
            extra + attributes,
            b"",
            error,
        )
    if parent_id:
        lead = _lead_parent(
            0x12,
            size & 127 | 128,
            size >> 7,
            0x0A10,
            trace_id >> 64,
            trace_id & 0xFFFFFFFFFFFFFFFF,  # a constant, not a global
            0x1208,
            span_id,
            0x2208,
            parent_id,
        )
    else:
        lead = _lead(
            0x12,
            size & 127 | 128,
            size >> 7,
            0x0A10,
            trace_id >> 64,
            trace_id & 0xFFFFFFFFFFFFFFFF,
            0x1208,
            span_id,
        )
    return b"".join((lead, head, _times(0x39, start, 0x41, end), extra, rest))


# A request's server span and its one client span, encoded together (pair_with): the
# server span's length and times (little-endian) with what follows them, both spans' ids
# (big-endian, with the client span's length between them), the client span's times and time
# to its first chunk with what follows them (each of the two a pack per length: pair_packer).
_pair_ids = struct.Struct(">HQQHQBHHQQHQHQ").pack
# gen_ai.response.time_to_first_chunk: the attribute's head (its double follows)
FIRST_CHUNK: Final = float_attribute("gen_ai.response.time_to_first_chunk", 0.0)[:-8]
# Two-byte varints of 128 <= n < 2048 (a span's usual length) as the "<H" and ">H" that write
# them: looked up, not computed, for each span.
_PAIR_LIMIT: Final = 2048
_V2_LE: Final = tuple(n & 127 | 128 | n >> 7 << 8 for n in range(_PAIR_LIMIT))
_V2_BE: Final = tuple((n & 127 | 128) << 8 | n >> 7 for n in range(_PAIR_LIMIT))
# What pair_packer needs of both spans' prepared parts: the server span's name/kind and
# attributes + status + flags, its size without the usage; the same of the client span.
PairParts = tuple[bytes, bytes, int, bytes, bytes, int]


def pair_parts(server: KnownParts, client: KnownParts) -> PairParts:
    """:func:`pair_packer`'s parts, from each span's :func:`known_parts` (the server span a
    root, the client span its child)."""
    return (
        server[0],
        server[1],
        server[2] + 28,
        client[0],
        client[1],
        client[2] + 38 + len(FIRST_CHUNK) + 8,
    )


# What pair_with needs to encode requests of one combination of parts and usage: the
# packs of the server span's opening and of the client span's times, each with the prepared
# bytes that follow it (server: name, kind, usage, attributes; client: the same) as its last
# field, and the two spans' lengths as the two-byte varints that write them.
PairPacker = tuple[Callable[..., bytes], int, bytes, int, Callable[..., bytes], bytes]
_packs: dict[str, Callable[..., bytes]] = {}


def _pack(fmt: str) -> Callable[..., bytes]:
    pack = _packs.get(fmt)
    if pack is None:
        if len(_packs) >= 256:  # bounded: the lengths of few combinations are seen
            _packs.clear()
        pack = _packs[fmt] = struct.Struct(fmt).pack
    return pack


def pair_packer(parts: PairParts, usage: bytes) -> PairPacker | None:
    """What :func:`pair_with` encodes a request of these parts and ``usage`` attributes with
    (built once per combination); ``None``: an unusual size (encode each span alone)."""
    head, rest, size, child_head, child_rest, child_size = parts
    n = len(usage)
    size += n
    child_size += n
    if not (127 < size < _PAIR_LIMIT and 127 < child_size < _PAIR_LIMIT):
        return None
    middle = head + usage + rest
    child_middle = child_head + usage + child_rest
    return (
        _pack(f"<BHBQBQ{len(middle)}s"),
        _V2_LE[size],
        middle,
        _V2_BE[child_size],
        _pack(f"<BQBQ{len(FIRST_CHUNK)}sd{len(child_middle)}s"),
        child_middle,
    )


def pair_with(
    out: list[bytes],
    trace_id: int,
    span_id: int,
    child_id: int,
    start: int,
    end: int,
    child_start: int,
    child_end: int,
    first: float,
    packer: PairPacker,
) -> None:
    """Two ``ScopeSpans.spans`` fields, as three pieces appended to ``out`` (a batch joins
    them once): a request's server span (a root: no parent, no trace state) and its client
    span (``child_id``, with the time to its first chunk, ``first`` seconds), both with the
    usage attributes before their prepared ones. The server span's ids are its last fields
    and the client span's its first, so that both spans' ids are one pack. (Fields in another
    order than the SDK encoder's: any protobuf parser reads them alike.)"""
    opening, size, middle, child_size, times, child_middle = packer
    hi = trace_id >> 64
    lo = trace_id & 0xFFFFFFFFFFFFFFFF  # a constant, not a global
    out += (
        opening(0x12, size, 0x39, start, 0x41, end, middle),
        _pair_ids(
            0x0A10,
            hi,
            lo,
            0x1208,
            span_id,
            0x12,
            child_size,
            0x0A10,
            hi,
            lo,
            0x1208,
            child_id,
            0x2208,
            span_id,
        ),
        times(0x39, child_start, 0x41, child_end, FIRST_CHUNK, first, child_middle),
    )


def encode_span(
    trace_id: int,
    span_id: int,
    trace_state: str,
    parent_id: int,
    parent_remote: bool,
    name: str,
    kind: int,
    start: int,
    end: int,
    attributes: Mapping[str, Any],
    links: Sequence[tuple[int, int, bool, Mapping[str, Any]]],
    error: bool,
) -> bytes:
    """One ``Span`` as a ``ScopeSpans.spans`` field: what :meth:`TracesRequest.encode` joins.
    ``parent_id`` 0: a root span. ``links``: (trace id, span id, remote, attributes)."""
    encoded_links = []
    for link_trace, link_span, remote, link_attributes in links:
        link = _head(0x0A, 16, link_trace >> 64, link_trace & _M64, 0x12, 8, link_span)
        if link_attributes:
            link += _key_values(b"\x22", link_attributes)
        link += b"\x35" + _fixed32(_HAS_IS_REMOTE | _IS_REMOTE if remote else _HAS_IS_REMOTE)
        encoded_links.append(_message(b"\x6a", link))
    return encode_frame(
        trace_id,
        span_id,
        trace_state,
        parent_id,
        parent_remote,
        name_and_kind(name, kind),
        start,
        end,
        span_attributes(attributes),
        b"".join(encoded_links),
        error,
    )


class TracesRequest:
    """``ExportTraceServiceRequest`` for spans of one resource and one instrumentation scope:
    both are encoded here once; :meth:`encode` wraps a batch of :func:`encode_span` results."""

    def __init__(
        self,
        resource: Mapping[str, Any],
        scope: str,
        scope_version: str | None = None,
        resource_schema_url: str = "",
    ) -> None:
        encoded_scope = _string(b"\x0a", scope) if scope else b""
        if scope_version:
            encoded_scope += _string(b"\x12", scope_version)
        self._scope = _message(b"\x0a", encoded_scope)  # ScopeSpans.scope (1)
        self._resource = _message(b"\x0a", _key_values(b"\x0a", resource))  # .resource (1)
        self._schema = _string(b"\x1a", resource_schema_url) if resource_schema_url else b""

    def encode(self, spans: Sequence[bytes]) -> bytes:
        # One copy of the spans (a batch is up to hundreds of KiB): the lengths first.
        scope_length = len(self._scope) + sum(map(len, spans))
        scope_head = b"\x12" + _varint(scope_length)  # ResourceSpans.scope_spans (2)
        length = len(self._resource) + len(scope_head) + scope_length + len(self._schema)
        head = b"\x0a" + _varint(length) + self._resource + scope_head + self._scope
        return b"".join([head, *spans, self._schema])


# -- sending -----------------------------------------------------------------------------------

_RETRYABLE: Final = frozenset({429, 502, 503, 504})
_MAX_RETRIES: Final = 6
_JITTER: Final = 0.2
_TRANSIENT: Final = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.TimeoutException,
    OSError,
)
_jitter = random.Random()  # not the global generator: tests that seed it see no export draws


@attrs.frozen
class ExportSettings:
    """Where and how spans are sent (:func:`export_settings` reads them as the SDK does)."""

    endpoint: str  # the full URL, …/v1/traces
    headers: Mapping[str, str] = attrs.field(factory=dict)
    timeout: float = 10.0
    compression: str = "none"  # none, gzip, deflate
    certificate: str | None = None  # CA bundle for an https collector
    client_certificate: str | None = None
    client_key: str | None = None


def _env(environ: Mapping[str, str], name: str) -> str | None:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>``."""
    return (
        environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
        or environ.get(f"OTEL_EXPORTER_OTLP_{name}")
        or None
    )


def export_settings(
    endpoint: str | None, timeout: float, environ: Mapping[str, str]
) -> ExportSettings:
    """The exporter's settings from the ``OTEL_EXPORTER_OTLP_(TRACES_)*`` variables, as the SDK's
    OTLP/HTTP exporter reads them; ``endpoint`` (a full URL) wins over the variables."""
    from opentelemetry.util.re import parse_env_headers

    if endpoint is None:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not endpoint:
        base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318/"
        endpoint = base.removesuffix("/") + "/v1/traces"
    compression = (_env(environ, "COMPRESSION") or "none").strip().lower()
    if compression not in ("none", "gzip", "deflate"):
        log.warning("unsupported OTLP compression %r: sending uncompressed", compression)
        compression = "none"
    return ExportSettings(
        endpoint=endpoint,
        headers=dict(parse_env_headers(_env(environ, "HEADERS") or "", liberal=True)),
        timeout=timeout,
        compression=compression,
        certificate=_env(environ, "CERTIFICATE"),
        client_certificate=_env(environ, "CLIENT_CERTIFICATE"),
        client_key=_env(environ, "CLIENT_KEY"),
    )


@attrs.frozen
class _Collector:
    """The collector as the transport's ``Origin``."""

    scheme: bytes
    host: bytes
    port: int | None
    host_header: bytes
    base_path: bytes = b"/"
    prefix: bytes = b""
    auth_header: tuple[bytes, bytes] | None = None


class _Client(UpstreamClient):
    """The gateway's pooled HTTP/1.1 client, with the collector's TLS settings."""

    def __init__(self, settings: ExportSettings) -> None:
        super().__init__()
        self._settings = settings

    def ssl_context(self) -> ssl.SSLContext:
        s = self._settings
        if self._ssl is None and (s.certificate or s.client_certificate):
            ctx = ssl.create_default_context(cafile=s.certificate)
            if s.client_certificate:
                ctx.load_cert_chain(s.client_certificate, s.client_key)
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return super().ssl_context()


def _retry_after(headers: Sequence[tuple[bytes, bytes]]) -> float | None:
    for name, value in headers:
        if name.lower() == b"retry-after":
            text = value.decode("latin-1").strip()
            try:
                return max(float(text), 0.0)
            except ValueError:
                pass
            try:
                when = parsedate_to_datetime(text)
            except (TypeError, ValueError):
                return None
            return max(when.timestamp() - time.time(), 0.0)
    return None


class Exporter:
    """POSTs encoded ``ExportTraceServiceRequest`` bodies to one collector, one at a time."""

    def __init__(self, settings: ExportSettings) -> None:
        self.settings = settings
        url = urlsplit(settings.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("not an http(s) URL")  # the URL itself may hold credentials
        host = url.hostname.encode("idna")
        netloc = url.netloc.rpartition("@")[2].encode("idna")
        self._origin = _Collector(url.scheme.encode(), host, url.port, netloc)
        self._target = (url.path or "/").encode() + (
            b"?" + url.query.encode() if url.query else b""
        )
        # For log lines: never the URL's user info or query (they may hold credentials).
        self.where = f"{url.scheme}://{netloc.decode()}{url.path}"
        headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in settings.headers.items()
        ]
        headers += [(b"host", netloc), (b"content-type", b"application/x-protobuf")]
        if settings.compression != "none":
            headers.append((b"content-encoding", settings.compression.encode()))
        self._headers = headers
        self._client = _Client(settings)

    async def export(self, body: bytes) -> bool:
        """Send one request body, retrying transient failures within the export timeout.
        ``True``: the collector took it."""
        settings = self.settings
        if settings.compression == "gzip":
            body = await trio.to_thread.run_sync(gzip.compress, body)
        elif settings.compression == "deflate":
            body = await trio.to_thread.run_sync(zlib.compress, body)
        headers = [*self._headers, (b"content-length", str(len(body)).encode())]
        deadline = trio.current_time() + settings.timeout
        problem = ""
        with trio.move_on_at(deadline) as scope:
            for retry in range(_MAX_RETRIES):
                wait: float | None = None
                try:
                    status, wait = await self._post(headers, body)
                except _TRANSIENT as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                else:
                    if 200 <= status < 400:
                        return True
                    problem = f"status {status}"
                    if status not in _RETRYABLE:
                        break
                if wait is None:
                    wait = 2**retry * _jitter.uniform(1 - _JITTER, 1 + _JITTER)
                if retry + 1 == _MAX_RETRIES or trio.current_time() + wait >= deadline:
                    break
                await trio.sleep(wait)
        if scope.cancelled_caught:
            problem = f"no answer within {settings.timeout:g} s"
        log.warning("span export to %s failed (%s): spans dropped", self.where, problem)
        return False

    async def _post(
        self, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, float | None]:
        response = await self._client.send(self._origin, b"POST", self._target, headers, body)
        try:
            async for _ in response.aiter_stream():
                pass  # the answer (an ExportTraceServiceResponse) is not used
        finally:
            await response.aclose()
        return response.status, _retry_after(response.headers)

    async def aclose(self) -> None:
        await self._client.aclose()
