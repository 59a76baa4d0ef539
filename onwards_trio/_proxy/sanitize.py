"""Response sanitisation: the non-strict ``sanitize_response`` filter and the machinery strict
mode shares with it (per-event SSE sanitiser, body decoding, reply rewriting).

Why it exists: a provider's answer can carry fields the gateway's clients must not see (cost,
provider names, trace ids), a model name that reveals the upstream deployment, and error bodies
with internals. A pool or provider with ``sanitize_response: true`` gets its chat completions
reduced to the OpenAI schema with ``model`` rewritten to the alias the client asked for, and its
upstream errors replaced by generic bodies (status kept, account-class statuses masked for
untrusted providers, SPEC §2.8).

Hot path: targets without sanitisation never reach this module (the filter factory returns
``None`` and the proxy relays bytes untouched). With sanitisation, SSE streams are cut into
events by :class:`~onwards_trio._transport.sse.SSEFramer` and only ``data:`` payloads are parsed.

Compressed upstream bodies (the client's ``accept-encoding`` is forwarded in non-strict mode):
``gzip``/``x-gzip`` and ``deflate`` (zlib-wrapped or raw) are decoded with the standard library,
incrementally for streams, and the rewritten answer goes out uncompressed with
``content-encoding`` removed. Brotli, zstd and other codings cannot be inspected without extra
dependencies: a success body in such a coding is refused with 502 (never relayed unsanitised);
error bodies are replaced without being read, so they need no decoding.
"""

from __future__ import annotations

import logging
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import orjson
import trio

from onwards_trio import _errors as errors
from onwards_trio._errors import HTTPError, error_body
from onwards_trio._proxy.pipeline import (
    UPSTREAM_ERRORS,
    FilterContext,
    ResponseFilter,
    UpstreamReply,
)
from onwards_trio._proxy.strict_schemas import SchemaError
from onwards_trio._transport.sse import DEFAULT_MAX_EVENT_SIZE, SSEFramer

__all__ = [
    "MAX_BODY",
    "STREAM_MALFORMED_EVENT",
    "StreamSanitizer",
    "UnsupportedEncoding",
    "account_class_mask",
    "decode_body",
    "error_code",
    "generic_error_body",
    "is_json_type",
    "json_reply",
    "read_body",
    "replace_error",
    "sanitize_chat_chunk",
    "sanitize_chat_completion",
    "sanitize_filter",
    "sse_reply",
    "stream_decoder",
    "stream_error_formatter",
    "upstream_error",
]

log = logging.getLogger("onwards_trio.sanitize")

MAX_BODY = 64 * 1024 * 1024  # largest upstream body (decoded) a sanitiser will buffer
_ERROR_PEEK = 64 * 1024  # error bodies are read this far only to log their length
_ERROR_PEEK_SECONDS = 2.0

UPSTREAM_REJECTED = error_body(
    "The upstream provider rejected the request.", "invalid_request_error", "upstream_error"
)
_INTERNAL = error_body(errors.INTERNAL_MESSAGE, "internal_error", "internal_error")
_JSON_CT = (b"content-type", b"application/json")
# What reading an upstream body can raise when the upstream breaks off (as in the proxy).


def _event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


STREAM_MALFORMED_EVENT = _event(
    error_body(
        "The upstream sent a malformed stream event.", "internal_error", "upstream_stream_error"
    )
)
STREAM_TOO_LARGE_EVENT = _event(
    error_body(
        "An upstream stream event exceeded the size limit.",
        "internal_error",
        "upstream_stream_error",
    )
)
_DONE = b"data: [DONE]\n\n"
_KEEPALIVE = b":\n\n"  # an empty comment: keeps idle connections open, carries nothing


# --- status rules ---------------------------------------------------------------------------

_MASK = {401: 502, 402: 502, 403: 502, 451: 502, 408: 504}


def account_class_mask(status: int) -> int:
    """An untrusted provider's account-class status would tell the client something false
    about *its own* credentials or quota (the gateway's key failed, not theirs): 401/402/403/451
    become 502 and 408 becomes 504 (v0.29.1, SPEC §2.8)."""
    return _MASK.get(status, status)


def generic_error_body(status: int) -> bytes:
    """The non-strict replacement body: 4xx says the provider rejected the request, anything
    else is an internal error."""
    return UPSTREAM_REJECTED if 400 <= status < 500 else _INTERNAL


# --- non-strict OpenAI chat sanitiser (reference §1.15.1) ------------------------------------


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    exc = SchemaError("expected a string")
    exc.segments.append(key)
    raise exc


def _count(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if value is None:
        return 0
    if type(value) is int and value >= 0:
        return value
    exc = SchemaError("expected a non-negative integer")
    exc.segments.append(key)
    raise exc


def _details(value: Any, keys: tuple[str, ...]) -> dict[str, Any] | None:
    if type(value) is not dict:
        return None
    return {k: value[k] for k in keys if k in value}


_PROMPT_DETAIL_KEYS = ("cached_tokens", "audio_tokens")
_COMPLETION_DETAIL_KEYS = (
    "reasoning_tokens",
    "audio_tokens",
    "accepted_prediction_tokens",
    "rejected_prediction_tokens",
)


def _usage(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if type(value) is not dict:
        exc = SchemaError("expected an object")
        exc.segments.append("usage")
        raise exc
    return {
        "prompt_tokens": _count(value, "prompt_tokens"),
        "completion_tokens": _count(value, "completion_tokens"),
        "total_tokens": _count(value, "total_tokens"),
        "prompt_tokens_details": _details(value.get("prompt_tokens_details"), _PROMPT_DETAIL_KEYS),
        "completion_tokens_details": _details(
            value.get("completion_tokens_details"), _COMPLETION_DETAIL_KEYS
        ),
    }


def _envelope(obj: Any, alias: str | None, object_name: str) -> tuple[dict[str, Any], list[Any]]:
    if type(obj) is not dict:
        raise SchemaError("expected an object")
    model = obj.get("model")
    if type(model) is not str:
        exc = SchemaError("expected a string" if model is not None else "required field missing")
        exc.segments.append("model")
        raise exc
    choices = obj.get("choices")
    if type(choices) is not list:
        exc = SchemaError("expected an array" if choices is not None else "required field missing")
        exc.segments.append("choices")
        raise exc
    created = obj.get("created")
    if type(created) is not int or not 0 <= created < 2**32:
        created = int(time.time())
    out = {
        "id": _opt_str(obj, "id") or "chatcmpl-unknown",
        "object": _opt_str(obj, "object") or object_name,
        "created": created,
        "model": alias if alias is not None else model,
        "choices": [],
        "usage": _usage(obj.get("usage")),
        "system_fingerprint": _opt_str(obj, "system_fingerprint"),
        "service_tier": _opt_str(obj, "service_tier"),
    }
    return out, choices


def _choice_index(choice: Any, i: int) -> int:
    if type(choice) is not dict:
        exc = SchemaError("expected an object")
        exc.segments += [i, "choices"]
        raise exc
    index = choice.get("index", 0)
    if type(index) is not int or index < 0:
        exc = SchemaError("expected a non-negative integer")
        exc.segments += ["index", i, "choices"]
        raise exc
    return index


def _sanitize_chat(obj: Any, alias: str | None, object_name: str, body: str) -> dict[str, Any]:
    out, choices = _envelope(obj, alias, object_name)
    out["choices"] = [
        {
            "index": _choice_index(c, i),
            body: c.get(body),
            "finish_reason": c.get("finish_reason"),
            "logprobs": c.get("logprobs"),
        }
        for i, c in enumerate(choices)
    ]
    return out


def sanitize_chat_completion(obj: Any, alias: str | None) -> dict[str, Any]:
    """A chat completion reduced to the OpenAI keys; missing optionals come out as ``null``.

    The message is copied verbatim (tool calls, refusals, reasoning fields stay usable).
    Raises :class:`SchemaError` when ``model`` or ``choices`` is missing.
    """
    return _sanitize_chat(obj, alias, "chat.completion", "message")


def sanitize_chat_chunk(obj: Any, alias: str | None) -> dict[str, Any]:
    """One streamed chunk, same rules as :func:`sanitize_chat_completion` (``delta`` verbatim)."""
    return _sanitize_chat(obj, alias, "chat.completion.chunk", "delta")


# --- the per-event SSE sanitiser (sans-io) --------------------------------------------------

Coerce = Callable[[dict[str, Any]], Any]
FormatError = Callable[[dict[str, Any]], bytes]


class StreamSanitizer:
    """Rewrites an SSE byte stream event by event.

    * ``data: [DONE]`` is kept; each other ``data:`` payload is parsed as JSON and re-emitted
      through ``coerce`` (several ``data:`` lines of one event are one payload, per the SSE
      spec; if that payload is not JSON but each line is, each line is treated as an event);
    * an object carrying ``error`` is detected *before* coercion and re-emitted through
      ``format_error`` (so an error inside a 200 stream is never coerced away);
    * comments, ``event:``, ``id:`` and ``retry:`` lines are dropped (an event made only of
      comments becomes an empty comment, so keep-alives still flow);
    * a payload that is neither a chunk nor an error (bad JSON, wrong shape), or an event past
      ``max_event_size``, ends the stream with one error event: :attr:`finished` turns true
      and later input is ignored.

    Output depends only on the bytes, never on how they were chunked.
    """

    __slots__ = ("_coerce", "_format_error", "_framer", "_max", "_pending", "finished")

    def __init__(
        self,
        coerce: Coerce,
        format_error: FormatError,
        *,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
    ) -> None:
        self._coerce = coerce
        self._format_error = format_error
        # The size cap is applied here, not by the framer: a framer that raises would take the
        # complete events of the same chunk down with it (and the output would then depend on
        # how the bytes were chunked).
        self._framer = SSEFramer(sys.maxsize)
        self._max = max_event_size
        self._pending = 0  # bytes the framer holds: fed minus framed
        self.finished = False

    def feed(self, chunk: bytes) -> bytes:
        if self.finished:
            return b""
        blocks = self._framer.feed(chunk)
        self._pending += len(chunk)
        out: list[bytes] = []
        for block in blocks:
            self._pending -= len(block)
            if len(block) > self._max:  # whole but oversized: the same limit applies
                return b"".join(self._too_large(out))
            out.append(self._block(block))
            if self._stopped():  # a malformed event ended the stream
                return b"".join(out)
        if self._pending > self._max:
            self._too_large(out)
        return b"".join(out)

    def _too_large(self, out: list[bytes]) -> list[bytes]:
        self.finished = True
        log.warning("upstream SSE event over the size limit; stream ended")
        out.append(STREAM_TOO_LARGE_EVENT)
        return out

    def _stopped(self) -> bool:
        # A method, not the attribute: the type checker would take ``finished`` to be still
        # false after ``_block`` (it cannot see the assignment in there).
        return self.finished

    def close(self) -> bytes:
        """End of the upstream stream: an unterminated last event is still processed."""
        if self.finished:
            return b""
        rest = self._framer.close()
        out = self._block(rest) if rest.strip() else b""
        self.finished = True
        return out

    def _block(self, block: bytes) -> bytes:
        values: list[bytes] = []
        comment = False
        for line in block.splitlines():
            if line[:5] == b"data:":
                value = line[5:]
                values.append(value[1:] if value[:1] == b" " else value)
            elif line[:1] == b":":
                comment = True
        if not values:
            return _KEEPALIVE if comment else b""
        payload = values[0] if len(values) == 1 else b"\n".join(values)
        out = self._payload(payload)
        if out is None and len(values) > 1:
            parts = [self._payload(v) for v in values]
            if all(p is not None for p in parts):
                return b"".join(p for p in parts if p is not None)
        if out is None:
            return self._malformed(len(payload))
        return out

    def _payload(self, payload: bytes) -> bytes | None:
        if payload == b"[DONE]" or payload.strip() == b"[DONE]":
            return _DONE
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if type(obj) is not dict:
            return None
        try:
            if obj.get("error") is not None:
                return _event(self._format_error(obj))
            return _event(orjson.dumps(self._coerce(obj)))
        except (SchemaError, TypeError):  # TypeError: also orjson.JSONEncodeError (too deep)
            return None

    def _malformed(self, size: int) -> bytes:
        self.finished = True
        log.warning("malformed upstream SSE event (%d bytes); stream ended", size)
        return STREAM_MALFORMED_EVENT


# --- body decoding --------------------------------------------------------------------------


class UnsupportedEncoding(ValueError):
    """The upstream used a content coding the gateway cannot decode (e.g. ``br``)."""


class _Inflater:
    """Incremental gzip / deflate decoder with a bound on the decoded size."""

    __slots__ = ("_d", "_fed", "_gzip", "_limit", "_size")

    def __init__(self, coding: str, limit: int) -> None:
        self._gzip = coding != "deflate"
        self._d: Any = zlib.decompressobj(31) if self._gzip else None
        self._fed = False
        self._limit = limit
        self._size = 0

    def feed(self, data: bytes) -> bytes:
        if data:
            self._fed = True
        if self._d is None:
            if not data:
                return b""
            # "deflate" should be zlib-wrapped; some servers send raw deflate. The zlib header
            # is recognisable: CM=8 in the low nibble and the two bytes a multiple of 31.
            zlib_wrapped = (
                len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            )
            self._d = zlib.decompressobj(15 if zlib_wrapped else -15)
        out = self._d.decompress(data)
        while self._gzip and self._d.eof and self._d.unused_data:  # concatenated gzip members
            rest = self._d.unused_data
            self._d = zlib.decompressobj(31)
            out += self._d.decompress(rest)
        self._size += len(out)
        if self._size > self._limit:
            raise zlib.error("decoded body too large")
        return bytes(out)

    def flush(self) -> bytes:
        """The rest; ``zlib.error`` when the compressed data stopped before its end marker
        (a cut body must not pass for a complete one)."""
        if self._d is None:
            return b""
        out = bytes(self._d.flush())
        if self._fed and not self._d.eof:
            raise zlib.error("compressed body ended early")
        return out


class StreamDecoder:
    """Decodes a body encoded with one or more codings (applied in order)."""

    __slots__ = ("_stages",)

    def __init__(self, codings: list[str], limit: int = MAX_BODY) -> None:
        self._stages = [_Inflater(c, limit) for c in reversed(codings)]

    def feed(self, data: bytes) -> bytes:
        for stage in self._stages:
            data = stage.feed(data)
        return data

    def flush(self) -> bytes:
        out = b""
        for stage in self._stages:
            out = (stage.feed(out) if out else b"") + stage.flush()
        return out


_INFLATABLE = frozenset({"gzip", "x-gzip", "deflate"})


def _codings(headers: list[tuple[bytes, bytes]]) -> list[str]:
    codings: list[str] = []
    for k, v in headers:
        if k == b"content-encoding":
            for part in v.decode("latin-1").split(","):
                coding = part.strip().lower()
                if coding and coding != "identity":
                    codings.append(coding)
    return codings


def stream_decoder(headers: list[tuple[bytes, bytes]]) -> StreamDecoder | None:
    """A decoder for the reply's ``content-encoding``, ``None`` when it is not encoded.

    Raises :class:`UnsupportedEncoding` for codings the standard library cannot decode.
    """
    codings = _codings(headers)
    if not codings:
        return None
    for c in codings:
        if c not in _INFLATABLE:
            raise UnsupportedEncoding(c)
    return StreamDecoder(codings)


def decode_body(body: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The decoded body (raises :class:`UnsupportedEncoding` or ``zlib.error``)."""
    decoder = stream_decoder(headers)
    if decoder is None:
        return body
    return decoder.feed(body) + decoder.flush()


# --- reply rewriting ------------------------------------------------------------------------

_CONTENT_HEADERS = frozenset(
    {
        b"content-type",
        b"content-length",
        b"content-encoding",
        b"transfer-encoding",
        b"content-md5",
        b"etag",
    }
)


def _rewritten_headers(
    headers: list[tuple[bytes, bytes]], content_type: bytes, length: int | None
) -> list[tuple[bytes, bytes]]:
    """Upstream headers minus those that described the upstream's bytes; the content type and
    (for a whole body) the length of what the sanitiser produced."""
    out = [(k, v) for k, v in headers if k not in _CONTENT_HEADERS]
    out.append((b"content-type", content_type))
    if length is not None:
        out.append((b"content-length", str(length).encode()))
    return out


def is_json_type(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the (first) ``content-type`` is ``application/json`` or ``*/*+json``."""
    for k, v in headers:
        if k == b"content-type":
            media = v.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


class _Once:
    """A body of one chunk."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


async def read_body(body: AsyncIterator[bytes], limit: int = MAX_BODY) -> bytes | None:
    """The whole body, or ``None`` past ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def replace_error(
    reply: UpstreamReply, status: int, body: bytes, ctx: FilterContext
) -> UpstreamReply:
    """Answer ``status`` with ``body`` instead of the upstream's error.

    The upstream body is read (up to 64 KiB) only to log its length and leave the connection
    reusable; it never reaches the client or the logs. Upstream headers go too; the headers
    the operator configured for the provider (``response_headers``) stay (§5.3 item 5).
    """
    size = 0
    with trio.move_on_after(_ERROR_PEEK_SECONDS):  # a dribbling error body must not hang us
        try:
            async for chunk in reply.body:
                size += len(chunk)
                if size >= _ERROR_PEEK:
                    break
        except UPSTREAM_ERRORS:
            pass  # only its length was wanted: a broken error body is still replaced
    log.warning(
        "upstream error replaced: alias=%s status=%d body_bytes=%d%s",
        ctx.alias,
        reply.status,
        size,
        "+" if size >= _ERROR_PEEK else "",
    )
    extra = ctx.provider.response_headers if ctx.provider is not None else []
    headers = [_JSON_CT, *extra, (b"content-length", str(len(body)).encode())]
    return attrs.evolve(reply, status=status, headers=headers, body=_Once(body))


async def json_reply(
    reply: UpstreamReply,
    transform: Callable[[Any], Any],
    failure: Callable[[], HTTPError],
) -> UpstreamReply:
    """Buffer, decode, parse, ``transform`` and re-serialise a JSON body.

    Anything that prevents sanitising (unknown coding, oversize, bad JSON, schema mismatch)
    raises ``failure()``: an unsanitised body is never relayed.
    """
    try:
        decoder = stream_decoder(reply.headers)
    except UnsupportedEncoding as exc:
        log.warning("cannot sanitise a %s-encoded upstream body", exc)
        raise failure() from None
    try:
        raw = await read_body(reply.body)
    except UPSTREAM_ERRORS as exc:
        log.warning("upstream body broke off (%s); cannot sanitise", type(exc).__name__)
        raise failure() from None
    if raw is None:
        log.warning("upstream body over %d bytes; cannot sanitise", MAX_BODY)
        raise failure()
    try:
        body = raw if decoder is None else decoder.feed(raw) + decoder.flush()
        out = orjson.dumps(transform(orjson.loads(body)))
    except (zlib.error, orjson.JSONDecodeError, SchemaError, TypeError) as exc:
        reason = exc.message if isinstance(exc, SchemaError) else type(exc).__name__
        log.warning("upstream body could not be sanitised (%d bytes): %s", len(raw), reason)
        raise failure() from None
    headers = _rewritten_headers(reply.headers, b"application/json", len(out))
    return attrs.evolve(reply, headers=headers, body=_Once(out))


class _SanitizedStream:
    """The upstream body through a :class:`StreamSanitizer` (and a decoder if encoded)."""

    __slots__ = ("_decoder", "_done", "_sanitizer", "_src")

    def __init__(
        self,
        src: AsyncIterator[bytes],
        sanitizer: StreamSanitizer,
        decoder: StreamDecoder | None,
    ) -> None:
        self._src = src
        self._sanitizer = sanitizer
        self._decoder = decoder
        self._done = False

    def __aiter__(self) -> _SanitizedStream:
        return self

    async def __anext__(self) -> bytes:
        sanitizer = self._sanitizer
        decoder = self._decoder
        while not self._done:
            try:
                chunk = await self._src.__anext__()
            except StopAsyncIteration:
                self._done = True
                out = b""
                if decoder is not None:
                    try:
                        out = sanitizer.feed(decoder.flush())
                    except zlib.error:
                        return self._undecodable()
                out += sanitizer.close()
                if out:
                    return out
                break
            if decoder is not None:
                try:
                    chunk = decoder.feed(chunk)
                except zlib.error:
                    return self._undecodable()
            out = sanitizer.feed(chunk)
            if sanitizer.finished:
                self._done = True
            if out:
                return out
        raise StopAsyncIteration

    def _undecodable(self) -> bytes:
        self._done = self._sanitizer.finished = True
        log.warning("upstream SSE body failed to decode; stream ended")
        return STREAM_MALFORMED_EVENT


def sse_reply(
    reply: UpstreamReply, sanitizer: StreamSanitizer, failure: Callable[[], HTTPError]
) -> UpstreamReply:
    """Stream the reply through ``sanitizer`` as ``text/event-stream``. The length is unknown,
    so ``content-length`` goes; a decoded body loses ``content-encoding``."""
    try:
        decoder = stream_decoder(reply.headers)
    except UnsupportedEncoding as exc:
        log.warning("cannot sanitise a %s-encoded upstream stream", exc)
        raise failure() from None
    headers = _rewritten_headers(reply.headers, b"text/event-stream", None)
    body = _SanitizedStream(reply.body, sanitizer, decoder)
    return attrs.evolve(reply, headers=headers, body=body)


# --- upstream errors (both modes) ----------------------------------------------------------


def error_code(obj: dict[str, Any]) -> int:
    """The numeric ``error.code`` of an error object inside a stream (500 when it has none)."""
    err = obj.get("error")
    code = err.get("code") if type(err) is dict else None
    if type(code) is int and code >= 0:
        return code
    return 500


def stream_error_formatter(trusted: bool, body_for: Callable[[int], bytes]) -> FormatError:
    """An error object inside a 200 stream: verbatim from a trusted provider, otherwise
    ``body_for`` its numeric ``code`` (500 when it has none), account-class codes masked."""

    def format_error(obj: dict[str, Any]) -> bytes:
        if trusted:
            return orjson.dumps(obj)
        return body_for(account_class_mask(error_code(obj)))

    return format_error


async def upstream_error(
    reply: UpstreamReply,
    ctx: FilterContext,
    untrusted_body: Callable[[int], bytes],
    trusted_body: Callable[[int], bytes] | None,
) -> UpstreamReply:
    """An upstream error reply: an untrusted provider's is replaced by ``untrusted_body`` of its
    status (account-class statuses masked first); a trusted provider's by ``trusted_body`` of
    its status, or relayed as it is when that is ``None``."""
    status = reply.status
    if not ctx.trusted:
        status = account_class_mask(status)
        return await replace_error(reply, status, untrusted_body(status), ctx)
    if trusted_body is None:
        return reply
    return await replace_error(reply, status, trusted_body(status), ctx)


# --- the non-strict filter ------------------------------------------------------------------


@attrs.frozen
class _NonStrictFilter:
    ctx: FilterContext

    async def __call__(self, reply: UpstreamReply) -> UpstreamReply:
        ctx = self.ctx
        if not 200 <= reply.status < 300:
            return await upstream_error(reply, ctx, generic_error_body, generic_error_body)
        request = ctx.request
        if request.method != b"POST" or not request.path.rstrip("/").endswith("/chat/completions"):
            return reply  # not a completion (e.g. the stored-completions list API): as is
        alias = ctx.alias
        if reply.is_sse:
            sanitizer = StreamSanitizer(
                lambda o: sanitize_chat_chunk(o, alias),
                stream_error_formatter(ctx.trusted, generic_error_body),
                max_event_size=ctx.max_event_size,
            )
            return sse_reply(reply, sanitizer, errors.bad_gateway)
        return await json_reply(
            reply, lambda o: sanitize_chat_completion(o, alias), errors.bad_gateway
        )


def sanitize_filter(ctx: FilterContext) -> ResponseFilter | None:
    """Filter factory for non-strict ``sanitize_response`` (``None``: relay untouched)."""
    provider = ctx.provider
    if ctx.strict or provider is None or not provider.sanitize:
        return None
    return _NonStrictFilter(ctx)
