"""The proxy pipeline: decide whether and where a request goes, then relay the answer.

Order (the first failing step answers): model → pool → auth → routing rules → empty pool →
pool and key rate limits → pool and key concurrency permits → provider attempts (selection,
provider rate limit, ``onwards_model`` rewrite, send with header timeout, fallback with
backoff). :meth:`Proxy.open_upstream` is an async context manager: everything it acquires
(permits, the upstream connection) is held until the caller leaves it, so a streamed response
keeps its permits until the stream ends or the client goes away (SPEC §2.9), and every exit
path — error, timeout, cancellation, disconnect — releases them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import httpcore
import orjson
import trio

from onwards_trio import _errors as errors
from onwards_trio._config import DEFAULT_SSE_EVENT_LIMIT, Fallback
from onwards_trio._errors import HTTPError
from onwards_trio._ops.logs import access_logged, defer_usage
from onwards_trio._ops.metrics import fallback_reason
from onwards_trio._proxy.admission import (
    Hold,
    PendingGate,
    admit,
    admit_at_once,
    flush,
    reserve_provider,
)
from onwards_trio._proxy.auth import evaluate_rules, key_id, token_of
from onwards_trio._proxy.balance import backoff_delays, plan_attempts, select, status_matches
from onwards_trio._proxy.ledger import LedgerNote, cost_of
from onwards_trio._proxy.limits import Permit, Reservation
from onwards_trio._proxy.releases import Releases
from onwards_trio._proxy.targets import Pool, Provider, Table, Targets
from onwards_trio._proxy.usage import (
    MAX_KEPT,
    StreamUsageStripper,
    Usage,
    UsageKeeper,
    UsageScanner,
    UsageTap,
    stream_usage_requested,
    with_stream_usage,
)
from onwards_trio._transport.asgi import loads_off_loop
from onwards_trio._transport.client import Response
from onwards_trio._transport.pool import (
    UpstreamClient,
    UpstreamResponse,
    forward_headers,
    upstream_target,
)

if TYPE_CHECKING:
    from onwards_trio._ops.tracing import AttemptSpan, Telemetry
    from onwards_trio._proxy.ledger import UsageLedger
    from onwards_trio._proxy.shared_limits import SharedLimits, SharedPermit

__all__ = [
    "UPSTREAM_ERRORS",
    "FilterContext",
    "FilterFactory",
    "Proxy",
    "ProxyRequest",
    "ResponseFilter",
    "UpstreamReply",
    "extract_model",
    "parse_json_body",
    "parse_json_off_loop",
]

log = logging.getLogger("onwards_trio")

_ERROR_BODY_LIMIT = 64 * 1024
# Response headers that describe the upstream hop, not the content; the server sets its own.
_HOP_RESPONSE = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",  # challenges for the proxy hop: the client never reached it
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_BODYLESS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})
# Request paths (of up to 256 bytes) whose upstream target a provider keeps (Provider.targets)
_KNOWN_TARGETS = 64
# What an upstream connection raises when it fails (refused, reset, cut, timed out).
UPSTREAM_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException)


@attrs.define(eq=False)
class ProxyRequest:
    """One client request as the pipeline sees it. ``headers`` names are lower-case."""

    method: bytes
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    json: Any = None  # the parsed body, when it was JSON (parsed once, reused)
    # filled in as the request moves through the pipeline (for logs and metrics)
    alias: str | None = None
    provider_index: int | None = None
    attempts: int = 0
    # An absolute thinking budget the client gave (Anthropic's ``thinking.budget_tokens``),
    # for providers that take one; the body carries the matching ``reasoning_effort``.
    reasoning_budget: int | None = None
    # the pipeline asked the upstream for a stream's usage chunk the client did not ask for
    strip_usage: bool = False
    # the identity of the client's key (auth.key_id), hashed once by resolve for every lookup
    key_id: str | None = None
    # tokens and budget reserved on admission, settled with the usage the upstream reports
    hold: Hold | None = None
    # (body, its prompt tokens) as admission counted them (_proxy.admission.prompt_tokens)
    prompt_count: tuple[bytes, int] | None = None
    # a shared admission waiting to go to Redis with the first provider's checks
    gate: PendingGate | None = None
    # For the usage ledger: the usage of the relayed body, the id its row is filed under
    # (a loop's response id; None: one is made up) and the client's route (None: the path).
    usage: Usage | None = None
    cost: int | None = None  # of ``usage``, in micro-units (_proxy.ledger.cost_of)
    request_id: str | None = None
    route: str | None = None

    @property
    def path(self) -> str:
        return self.raw_path.decode("latin-1")

    @property
    def wants_stream(self) -> bool:
        return isinstance(self.json, dict) and self.json.get("stream") is True


class _Body:
    """The upstream body as an async iterator: the pre-read first chunk, then the rest.

    When the upstream body ends, ``permit`` (the provider's concurrency permit) is released and
    ``on_end`` runs (it hands the connection back to the pool; what it returns, if anything, is
    awaited) — before the caller is done
    with the request, so a client's next request finds the provider as free as it is
    (weighted least-connections counts permits) and can reuse that connection. With a usage
    ``tap``, every chunk passes through it and the usage found is handed to ``on_usage`` when
    the body ends. ``secret`` (the provider's key) is
    masked wherever the body quotes it (an upstream error message or an echo would otherwise
    hand it to the client); the mask has its length, so a content-length stays true. A key
    split across two chunks is masked too: a chunk that ends with the start of the key keeps
    that tail back (at most ``len(key) - 1`` bytes) until the next chunk shows whether the key
    follows; chunks that end otherwise (every SSE event ends in a blank line) pass at once.
    """

    __slots__ = (
        "_first",
        "_held",
        "_it",
        "_on_end",
        "_on_usage",
        "_permit",
        "_scan",
        "_secret",
        "_tap",
        "_unseen",
    )

    def __init__(
        self,
        first: bytes | None,
        it: AsyncIterator[bytes] | None,
        on_end: Callable[[], Awaitable[None] | None] | None = None,
        tap: UsageTap | None = None,
        on_usage: Callable[[UsageTap], None] | None = None,
        secret: bytes | None = None,
        permit: Permit | None = None,
    ) -> None:
        self._first = first
        self._permit = permit
        self._it = it
        self._on_end = on_end
        self._tap = tap
        self._on_usage = on_usage
        self._secret = secret
        self._held = b""
        # A tap that passes bytes unchanged (the usage scanner) looks at a chunk only when the
        # next one is asked for (or the body ends): after the caller has sent it on, so the
        # scan is not between the upstream's answer and the client's.
        self._scan = type(tap) is UsageScanner
        self._unseen: bytes | None = None  # the chunk the scanner has yet to look at

    def __aiter__(self) -> _Body:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        # The usual body (no key to mask) is read without a coroutine of its own per chunk.
        return self._next() if self._secret is None else self._masked()

    async def _masked(self) -> bytes:
        while True:
            try:
                chunk = await self._next()
            except StopAsyncIteration:
                if not self._held:
                    raise
                chunk, self._held = self._held, b""
                return chunk  # the body ended on a start of the key, not the key
            chunk = self._mask(chunk)
            if chunk:
                return chunk

    def _mask(self, chunk: bytes) -> bytes:
        """``chunk`` with the key masked; a tail that may be the start of the key is held
        back (prepended to the next chunk)."""
        secret = self._secret
        assert secret is not None
        if self._held:
            chunk, self._held = self._held + chunk, b""
        if chunk.find(secret) >= 0:  # find: ``in`` first tries an int (and its TypeError)
            chunk = chunk.replace(secret, b"*" * len(secret))
        keep = _key_start_at_end(chunk, secret)
        if keep:
            chunk, self._held = chunk[:-keep], chunk[-keep:]
        return chunk

    def _pass(self, chunk: bytes) -> bytes:
        """What the client gets of an upstream chunk: through the usage tap, then masked."""
        tap = self._tap
        if tap is not None:
            chunk = tap.feed(chunk)
        return self._mask(chunk) if self._secret is not None and chunk else chunk

    def _tapped(self, chunk: bytes) -> bytes:
        """``chunk`` through the tap (a scanner sees it on the next call, see ``_scan``)."""
        tap = self._tap
        if tap is None:
            return chunk
        if self._scan:
            self._unseen = chunk
            return chunk
        return tap.feed(chunk)

    def _see(self) -> None:
        """Let the scanner look at the chunk last returned."""
        unseen, self._unseen = self._unseen, None
        if unseen is not None and self._tap is not None:
            self._tap.feed(unseen)

    async def _next(self) -> bytes:
        if self._unseen is not None:
            self._see()
        if self._first is not None:
            first, self._first = self._first, None
            return self._tapped(first)
        it = self._it
        if it is not None:
            if type(it) is Response and it.ended():
                self._it = None  # the usual end: no read, no StopAsyncIteration to catch
            else:
                try:
                    chunk = await it.__anext__()
                except StopAsyncIteration:
                    self._it = None
                else:
                    return self._tapped(chunk)
        rest = self._close_tap()
        if rest:
            return rest  # the next call ends the body
        await self._end()
        raise StopAsyncIteration

    def take_first(self) -> bytes | None:
        """The first chunk when it is at hand and needs no masking: what the first
        ``__anext__`` returns, without its coroutine (``None``: iterate)."""
        first = self._first
        if first is None or self._secret is not None:
            return None
        self._first = None
        return self._tapped(first)

    async def drain(self) -> None:
        """Read the rest of the body and end it, discarding what is left: what iterating to
        the end does, for a caller that has sent all it wanted. The usual rest (the body ended
        with its first chunk) is ended with no chunk to return and no ``StopAsyncIteration``."""
        it = self._it
        if self._first is None and (it is None or (type(it) is Response and it.ended())):
            self._it = None
            self._close_tap()
            pending = self._release()  # _end without a coroutine of its own: the usual end
            if pending is not None:
                await pending
            return
        async for _ in self:
            pass

    def _close_tap(self) -> bytes:
        """The upstream body ended: report the usage the tap found; return what it held."""
        tap = self._tap
        if tap is None:
            return b""
        self._see()
        self._tap = None
        rest = tap.close()
        if self._on_usage is not None:
            self._on_usage(tap)
        return rest

    async def _end(self) -> None:
        """Release the provider's permit and hand the connection back (``on_end``)."""
        pending = self._release()
        if pending is not None:
            await pending

    def _release(self) -> Awaitable[None] | None:
        """:meth:`_end`'s work, at once: what is left to wait for (None: done at once, as our
        client's usual hand-back is)."""
        if self._permit is not None:
            self._permit.release()
            self._permit = None
        on_end = self._on_end
        if on_end is None:
            return None
        self._on_end = None
        return on_end()

    async def relay(self, write: Callable[[bytes], Awaitable[object]]) -> bytes:
        """Pass the rest of the body to ``write`` as it arrives; return what is left to send
        with the end of the response (a held tail that turned out not to be the key).

        The streamed reply's path: iterating costs a trip through four layers per event, this
        is one loop over the upstream socket (:meth:`Response.relay`), with the same
        bytes, usage, masking and end-of-body steps as iterating. A body not from our
        upstream client is iterated."""
        it = self._it
        relay = getattr(it, "relay", None)
        if relay is None:
            async for chunk in self:
                await write(chunk)
            return b""
        self._see()
        transform = self._pass if self._tap is not None or self._secret is not None else None
        if self._first is not None:
            first, self._first = self._first, None
            if transform is not None:
                first = transform(first)
            if first:
                await write(first)
        await relay(write, transform)
        self._it = None
        rest = self._close_tap()
        if rest and self._secret is not None:
            rest = self._mask(rest)
        if rest:
            await write(rest)
        await self._end()
        held, self._held = self._held, b""
        return held

    def report_seen(self) -> None:
        """The relay ended before the body did (typically a client that left as soon as it had
        the last event, before the upstream's end of body was read): report the usage the tap
        has seen, if any, as the end of the body would have."""
        self._see()
        tap, self._tap = self._tap, None
        if tap is not None and self._on_usage is not None:
            self._on_usage(tap)


def _key_start_at_end(data: bytes, key: bytes) -> int:
    """The length of the longest tail of ``data`` that the key begins with (0: none). Only
    places where the key's first byte occurs among the last ``len(key) - 1`` bytes are tried."""
    end = len(data)
    pos = data.find(key[:1], max(0, end - len(key) + 1))
    while pos != -1:
        if key.startswith(data[pos:]):
            return end - pos
        pos = data.find(key[:1], pos + 1)
    return 0


@attrs.define(eq=False)
class UpstreamReply:
    """What goes back to the client: status, headers and a body iterator."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: AsyncIterator[bytes]
    request: ProxyRequest
    alias: str  # the alias the client asked for (responses are rewritten to it)
    pool: Pool
    provider: Provider | None

    @property
    def content_type(self) -> bytes:
        for k, v in self.headers:
            if k == b"content-type":
                return v
        return b""

    @property
    def is_sse(self) -> bool:
        return b"text/event-stream" in self.content_type.lower()


@attrs.frozen
class FilterContext:
    """What a response filter factory may decide on."""

    request: ProxyRequest
    alias: str
    pool: Pool
    provider: Provider | None
    strict: bool
    max_event_size: int = DEFAULT_SSE_EVENT_LIMIT  # a sanitised SSE event larger ends the stream

    @property
    def trusted(self) -> bool:
        return self.provider.trusted if self.provider is not None else self.pool.trusted


class ResponseFilter(Protocol):
    """Rewrites an upstream reply (status, headers, body stream) before it reaches the client.

    A filter that needs the whole body reads ``reply.body`` itself; one that works per chunk
    wraps the iterator. It must keep ``content-length`` truthful.
    """

    async def __call__(self, reply: UpstreamReply) -> UpstreamReply: ...


FilterFactory = Callable[[FilterContext], ResponseFilter | None]


def extract_model(headers: list[tuple[bytes, bytes]], body_json: Any) -> str | None:
    """``model-override`` header first, else the JSON body's string ``model``."""
    for k, v in headers:
        if k == b"model-override":
            return _model_of(v, body_json)
    return _model_of(None, body_json)


def _model_of(override: bytes | None, body_json: Any) -> str | None:
    """:func:`extract_model` for the first ``model-override`` value (``None``: there is none)."""
    if override is not None:
        try:
            text = override.decode("ascii")
        except UnicodeDecodeError:
            return None
        return text if text and text.isprintable() else None
    if isinstance(body_json, dict):
        model = body_json.get("model")
        if isinstance(model, str) and model:
            return model
    return None


# Bounds on a JSON request body (400 past either). Containers: counted in the raw bytes before
# parsing (C speed), so a body of 900,000 input items is refused without building 900,000
# dicts on the event loop. Depth: orjson reads 1024 levels but writes only 254, so a deeper
# value would fail later, as a 500, wherever it is re-serialised or stored; 128 leaves room
# for the levels the gateway wraps around a request (store records, chat conversions).
MAX_JSON_CONTAINERS = 100_000
MAX_JSON_DEPTH = 128
_ORJSON_WRITE_DEPTH = 254
# JSON nested deeper than MAX_JSON_DEPTH needs that many openers and as many closers: a body
# shorter holds neither too deep a value nor too many containers, and needs no count.
_SHORTEST_TOO_DEEP = 2 * (MAX_JSON_DEPTH + 1)


def parse_json_body(body: bytes) -> Any:
    """The body as JSON, or None when it is not JSON (such bodies are proxied untouched).
    Raises a 400 :class:`HTTPError` for a JSON body over the bounds above."""
    if not body:
        return None
    if len(body) < _SHORTEST_TOO_DEEP:  # within both bounds, whatever it holds: not counted
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    openers = 0
    start = body[:1]
    if start.isspace():
        start = body.lstrip()[:1]
    if start == b"{" or start == b"[":  # an upload of other bytes is not counted
        openers = body.count(b"{") + body.count(b"[")
        if openers > MAX_JSON_CONTAINERS:
            raise errors.too_many_json_values(MAX_JSON_CONTAINERS)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if openers > MAX_JSON_DEPTH and _nests_deeper(value, MAX_JSON_DEPTH):
        raise errors.too_deeply_nested(MAX_JSON_DEPTH)
    return value


async def parse_json_off_loop(body: bytes) -> Any:
    """:func:`parse_json_body`, in a worker thread for a large body (see
    :func:`~onwards_trio._transport.asgi.loads_off_loop`)."""
    return await loads_off_loop(body, parse_json_body)


def _nests_deeper(value: Any, limit: int) -> bool:
    """Inside ``254 - limit`` lists, ``value`` can be written by orjson only if it nests at most
    ``limit`` levels deep: the check runs at C speed, with no walk of the value in Python."""
    for _ in range(_ORJSON_WRITE_DEPTH - limit):
        value = [value]
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return True
    return False


async def _read_limited(response: UpstreamResponse, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_stream():
        parts.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


class _Upstream:
    """:meth:`Proxy.open_upstream`'s context manager: a class, because a generator-based one
    and its exit stack cost more than the rest of the pipeline's bookkeeping."""

    __slots__ = ("_proxy", "_releases", "_request")

    def __init__(self, proxy: Proxy, request: ProxyRequest) -> None:
        self._proxy = proxy
        self._request = request
        self._releases = Releases()

    def __aenter__(self) -> Coroutine[Any, Any, UpstreamReply]:
        # The pipeline's coroutine, awaited by ``async with`` (no coroutine of this method's
        # own: one frame less under every wait of the request); it releases what it took
        # when it fails.
        return self._proxy._open(self._request, self._releases)

    def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> Coroutine[Any, Any, None]:
        return self._releases.run(exc)  # its coroutine, awaited by ``async with``


class Proxy:
    """The pipeline over a live :class:`Targets` table and a shared upstream client."""

    def __init__(
        self,
        targets: Targets,
        client: UpstreamClient,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.targets = targets
        self.client = client
        self.rng = rng or random.Random()
        self.filters: list[FilterFactory] = []
        self.sleep: Callable[[float], Awaitable[None]] = trio.sleep
        # SEAM: metrics (upstream/provider metrics object, set by the gateway)
        self.metrics: Any = None
        # Tracing (client spans per attempt, trace context to opted-in providers); None: off.
        self.telemetry: Telemetry | None = None
        # Called with the usage of every relayed 2xx upstream body (token counters, the
        # access line), while metrics or tracing want it; when only the access log does, the
        # body goes to the access line unread (_ops.logs.defer_usage), not through this.
        self.usage_observer: Callable[[ProxyRequest, str, Provider, Usage], None] | None = None
        # The usage ledger: a row per pipeline run that got past routing and auth; None: off.
        self.ledger: UsageLedger | None = None

    # -- routing --------------------------------------------------------------------------

    def resolve(self, table: Table, request: ProxyRequest) -> tuple[str, Pool, str | None]:
        """Model → pool → auth → routing rules. Returns (requested alias, pool, token)."""
        override = authorization = None
        for name, value in request.headers:  # extract_model's and bearer_token's, one pass
            if name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"model-override" and override is None:
                override = value
        alias = _model_of(override, request.json)
        if alias is None:
            raise errors.missing_model()
        request.alias = alias
        token = token_of(authorization)
        ident = request.key_id = key_id(token) if token is not None else None
        pool = table.pools.get(alias)
        if pool is None:
            # With keys in play, a stranger must not learn which aliases exist (SPEC §2.2).
            if table.protected and (ident is None or not table.all_keys.has_id(ident)):
                raise errors.unauthenticated(invalid=token is not None)
            raise errors.model_not_found(alias)
        if pool.keys is not None:
            if ident is None:
                raise errors.unauthenticated()
            if not pool.keys.has_id(ident):
                if table.all_keys.has_id(ident):
                    raise errors.forbidden()
                raise errors.unauthenticated(invalid=True)
        if pool.rules and ident is not None:
            action = evaluate_rules(pool.rules, table.key_labels.get(ident, {}))
            if action is not None:
                if action.type == "deny":
                    raise errors.forbidden()
                target = table.pools.get(action.target or "")
                if target is None or not target.providers:
                    raise errors.bad_gateway()
                pool = target
        if not pool.providers:
            raise errors.service_unavailable()
        return alias, pool, token

    async def _shared_provider(
        self,
        shared: SharedLimits,
        pool: Pool,
        index: int,
        permit: Permit,
        full: set[int],
    ) -> tuple[int, Permit, SharedPermit | None] | None:
        """Add the shared slot to the provider :func:`select` chose with its local permit.

        A provider full across replicas counts as at capacity: the next free candidate is
        tried; ``None`` when none is left. ``full`` collects them for the whole request.
        """
        from onwards_trio._proxy.shared_limits import provider_scope

        while True:
            limit = pool.providers[index].concurrency.limit
            if limit is None:
                return index, permit, None
            try:
                got = await shared.provider_slot(provider_scope(pool.alias, index), limit)
            except BaseException:
                permit.release()
                raise
            if got is not None:
                return index, permit, None if isinstance(got, bool) else got
            permit.release()
            full.add(index)
            choice = select(pool.providers, pool.strategy, full, self.rng)
            if choice is None:
                return None
            index, permit = choice

    # -- one attempt ----------------------------------------------------------------------

    def _body_for(self, request: ProxyRequest, provider: Provider) -> bytes:
        """The body this provider is sent: its ``onwards_model``, its spelling of a
        reasoning request (``_proxy.reasoning``), and ``stream_options.include_usage`` when the
        pipeline asks for a stream's usage; untouched when none applies."""
        reasoning = provider.reasoning
        strip = request.strip_usage
        if (provider.model is None and reasoning is None and not strip) or not request.body:
            return request.body
        data = request.json
        if reasoning is not None and isinstance(data, dict):
            mapped = reasoning.apply(data, request.reasoning_budget)
            if provider.model is None and not strip:
                return request.body if mapped is data else orjson.dumps(mapped)
            data = mapped
        if provider.model is not None:
            if not isinstance(data, dict) or "model" not in data:
                raise errors.missing_model()
            data = {**data, "model": provider.model.decode()}
        elif not strip:
            return request.body
        if strip:
            data = with_stream_usage(data)
        return orjson.dumps(data)

    def _send(
        self, request: ProxyRequest, provider: Provider, span: AttemptSpan | None = None
    ) -> Awaitable[UpstreamResponse]:
        """The upstream request, as the client's coroutine to await (no coroutine of this
        method's own per attempt)."""
        body = (
            request.body  # the usual provider rewrites nothing (no call for that)
            if provider.model is None and provider.reasoning is None and not request.strip_usage
            else self._body_for(request, provider)
        )
        raw_path = request.raw_path
        query = request.query
        known = provider.targets
        target = None if query else known.get(raw_path)
        if target is None:
            target = upstream_target(provider, raw_path, query)
            if not query and len(known) < _KNOWN_TARGETS and len(raw_path) <= 256:
                known[raw_path] = target
        length = None if not body and request.method in _BODYLESS else len(body)
        config = self.targets.table.config
        trusted = config.trust_forwarded_headers
        headers = forward_headers(request.headers, provider, length, trust_forwarded=trusted)
        if span is not None:
            headers = span.trace_headers(headers, provider.spec.propagate_trace_context)
        timeout = provider.timeout or config.default_request_timeout_secs
        client = self.client
        if timeout is None:
            return client.send(provider, request.method, target, headers, body)
        clock = getattr(client, "clock", None)  # set while its watchdog task runs
        if clock is not None:  # the watchdog enforces the deadline: no cancel scope per request
            deadline = clock.current_time() + timeout
            return client.send(provider, request.method, target, headers, body, deadline)
        deadline = trio.current_time() + timeout
        return _send_by(deadline, client.send(provider, request.method, target, headers, body))

    # -- the pipeline ---------------------------------------------------------------------

    def open_upstream(self, request: ProxyRequest) -> AbstractAsyncContextManager[UpstreamReply]:
        """``async with proxy.open_upstream(request) as reply``: run the pipeline, give the
        reply to relay. Gateway errors raise :class:`HTTPError`.

        Leaving the context closes the upstream response and releases every permit.
        """
        return _Upstream(self, request)

    async def _open(self, request: ProxyRequest, stack: Releases) -> UpstreamReply:
        try:
            table = self.targets.table  # one snapshot for the whole request
            alias, pool, _ = self.resolve(table, request)
            note: LedgerNote | None = None
            if self.ledger is not None:  # its row is noted last, with the outcome
                note = stack.push(LedgerNote(self.ledger, table, pool, request))
            hold = (
                None
                if admit_at_once(self.metrics, table, pool, request, stack)
                else await admit(self.metrics, table, pool, request, stack)
            )
            if (
                (
                    hold is not None
                    or pool.provider_tokens
                    or table.config.telemetry.stream_usage
                    or note is not None
                )
                and request.wants_stream
                and request.raw_path.endswith(b"completions")
                and not stream_usage_requested(request.json)
            ):
                request.strip_usage = True
            reply = await self._attempts(request, alias, pool, stack)
            hold = request.hold  # also made by a provider's token limit
            if hold is not None:
                hold.answered = 200 <= reply.status < 300
                reply.headers.extend(hold.headers())
            filters = self.filters
            if filters:
                strict = table.config.strict_mode
                ctx: FilterContext | None = None
                for factory in filters:
                    # A factory that says when it applies (``applies(strict, provider)``) is not
                    # asked, nor a context built, for a reply it would leave alone.
                    applies = getattr(factory, "applies", None)
                    if applies is not None and not applies(strict, reply.provider):
                        continue
                    if ctx is None:
                        ctx = FilterContext(
                            request,
                            alias,
                            pool,
                            reply.provider,
                            strict,
                            table.config.sse_max_event_bytes,
                        )
                    flt = factory(ctx)
                    if flt is not None:
                        reply = await flt(reply)
                        break
            if note is not None:
                note.reply = reply
            return reply
        except BaseException as exc:
            await stack.run(exc)  # what the run took, released before the error goes on
            raise

    async def _attempts(
        self, request: ProxyRequest, alias: str, pool: Pool, stack: Releases
    ) -> UpstreamReply:
        fallback = pool.fallback if pool.fallback is not None and pool.fallback.enabled else None
        delays = (
            backoff_delays(fallback.backoff, self.rng)
            if fallback is not None and fallback.backoff is not None
            else None
        )
        budget = (
            fallback.max_total_backoff_ms / 1000.0
            if fallback is not None and fallback.max_total_backoff_ms is not None
            else None
        )
        last_error: HTTPError | None = None
        last_upstream: tuple[int, list[tuple[bytes, bytes]], bytes, Provider] | None = None
        retry_reason: str | None = None  # why the attempt before failed
        shared = self.targets.table.shared
        full: set[int] | None = None  # providers at capacity across replicas (shared limits)
        for index, permit in plan_attempts(pool.providers, pool.strategy, fallback, self.rng):
            if request.attempts and delays is not None:
                delay = next(delays)
                if budget is not None:
                    if delay > budget:
                        permit.release()
                        break
                    budget -= delay
                try:
                    await self.sleep(delay)
                except BaseException:
                    permit.release()
                    raise
            shared_permit: SharedPermit | None = None
            if shared is not None:
                if full is None:
                    full = set()
                chosen = await self._shared_provider(shared, pool, index, permit, full)
                if chosen is None:
                    continue
                index, permit, shared_permit = chosen
            provider = pool.providers[index]
            request.attempts += 1
            request.provider_index = index
            try:
                outcome = await self._attempt(
                    request, alias, pool, provider, permit, stack, fallback, retry_reason
                )
            except BaseException:
                if shared_permit is not None:
                    await shared_permit.release()
                raise
            if shared_permit is not None:
                if isinstance(outcome, UpstreamReply):
                    stack.push_async_callback(shared_permit.release)
                else:
                    await shared_permit.release()
            if isinstance(outcome, UpstreamReply):
                return outcome
            if isinstance(outcome, HTTPError):
                if fallback is None:
                    raise outcome
                last_error, last_upstream = outcome, None
            else:
                last_error, last_upstream = None, (*outcome, provider)
            retry_reason = fallback_reason(outcome)
            # SEAM: metrics (fallback attempt for alias/provider)
            if self.metrics is not None:
                self.metrics.fallback(alias, index, retry_reason)
            if log.isEnabledFor(logging.DEBUG):  # off the success path: failures only
                log.debug(
                    "%s: attempt %d on provider %d failed (%s); %s",
                    alias,
                    request.attempts,
                    index,
                    f"no usable answer, {outcome.status}"
                    if isinstance(outcome, HTTPError)
                    else f"upstream status {outcome[0]}",
                    "trying the next" if fallback is not None else "no fallback",
                )
        if last_upstream is not None:
            # Every attempt failed on status: report the last upstream answer honestly.
            status, headers, body, provider = last_upstream
            reply_body = _Body(body, None, secret=provider.secret)
            return UpstreamReply(status, headers, reply_body, request, alias, pool, provider)
        if last_error is not None:
            raise last_error
        # No provider could even be tried: the request's own refusal (402, 429) comes first.
        await flush(self.metrics, self.targets.table, pool, request)
        if self.metrics is not None:
            self.metrics.rejected(alias, "concurrency", "provider")
        raise errors.concurrency_limited()

    async def _attempt(
        self,
        request: ProxyRequest,
        alias: str,
        pool: Pool,
        provider: Provider,
        permit: Permit,
        stack: Releases,
        fallback: Fallback | None,
        retry_reason: str | None = None,
    ) -> UpstreamReply | HTTPError | tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One try at one provider (``fallback``: the pool's, when enabled). Returns the reply
        to relay, or why to try the next one."""
        keep = False
        tel = self.telemetry
        span: AttemptSpan | None = None
        failure: str | None = None  # why this attempt failed, for its span
        held: Reservation | None = None  # tokens under the provider's own token limit
        try:
            if request.gate is not None or provider.rate is not None or provider.tokens is not None:
                table = self.targets.table
                got = await reserve_provider(self.metrics, table, pool, provider, request)
                if isinstance(got, HTTPError):
                    if fallback is not None and fallback.on_rate_limit:
                        return got
                    raise got
                held = got
            m = self.metrics
            if tel is not None:
                span = tel.start_attempt(
                    request.raw_path,
                    provider.spec.onwards_model or alias,
                    provider,
                    request.attempts,
                    retry_reason,
                )
            # the clock is read only for the metrics (a span times itself, more cheaply): our
            # client's, directly, while its watchdog runs
            clock: Any = None
            t0 = 0.0
            if m is not None:
                clock = getattr(self.client, "clock", None) or trio.lowlevel.current_clock()
                t0 = clock.current_time()
            failure = "cancelled"
            try:
                response = await self._send(request, provider, span)
            except trio.TooSlowError:
                failure = "timeout"
                if m is not None:
                    m.upstream_failure(alias, provider.index, "timeout")
                return errors.gateway_timeout()
            except UPSTREAM_ERRORS:
                failure = "network_error"
                if m is not None:
                    m.upstream_failure(alias, provider.index, "error")
                return errors.bad_gateway()
            except HTTPError:
                failure = "rejected"
                raise
            failure = None
            if m is not None:
                elapsed = clock.current_time() - t0
                m.upstream_response(alias, provider.index, response.status, elapsed)
            if span is not None:
                span.answered(response.status)
            try:
                headers = self._response_headers(response, provider)
                if fallback is not None and status_matches(fallback.on_status, response.status):
                    # Kept (bounded) in case this turns out to be the last answer to report.
                    try:
                        body = await _read_limited(response, _ERROR_BODY_LIMIT)
                    except UPSTREAM_ERRORS:
                        failure = "network_error"
                        return errors.bad_gateway()
                    headers = [(k, v) for k, v in headers if k != b"content-length"]
                    headers.append((b"content-length", str(len(body)).encode()))
                    return (response.status, headers, body)
                # Read the first chunk before answering: if the upstream dies before its first
                # byte, nothing has reached the client yet and another attempt is still honest.
                stream: Any = response.aiter_stream()  # a test client's may be the response itself
                try:
                    # our client's response hands over what it has read without a coroutine
                    first: bytes | None = stream.at_hand() if type(stream) is Response else None
                    if first is None:
                        first = await stream.__anext__()
                except StopAsyncIteration:
                    first = None
                except UPSTREAM_ERRORS:
                    failure = "network_error"
                    await _aclose_shielded(stream)
                    return errors.bad_gateway()
                except BaseException:
                    failure = "cancelled"
                    await _aclose_shielded(stream)
                    raise
                if held is not None:  # from here the request's hold settles or refunds it
                    self._hold(request, stack).reservations.append(held)
                    held = None
                tap: UsageTap | None = None
                on_usage: Callable[[UsageTap], None] | None = None
                if 200 <= response.status < 300:
                    if span is not None:
                        span.first_byte()
                    tap, on_usage = self._usage_tap(
                        request, alias, pool, provider, span, headers, first, stream
                    )
                reply_body = _Body(
                    first,
                    stream if first is not None else None,
                    response.close_now if type(response) is UpstreamResponse else response.aclose,
                    tap,
                    on_usage,
                    provider.secret,
                    permit,
                )
                reply = UpstreamReply(
                    response.status,
                    headers,
                    reply_body,
                    request,
                    alias,
                    pool,
                    provider,
                )
                # The upstream client's close is idempotent and shields itself, so it is safe
                # (and cheap) on the way out of a cancelled relay too.
                if type(response) is UpstreamResponse:  # usually closed by then: no coroutine
                    stack.push_maybe_async(response.close_now)
                else:
                    stack.push_async_callback(response.aclose)
                if stream is not response and type(stream) is not Response:
                    # (our client's body is its connection's response, closed with it)
                    stack.push_async_callback(_aclose_shielded, stream)
                stack.callback(permit.release)
                if span is not None:
                    stack.callback(span.end)
                if on_usage is not None:  # runs first: the span and the ledger still see the usage
                    stack.callback(reply_body.report_seen)
                keep = True
                return reply
            finally:
                if not keep:
                    await _aclose_shielded(response)
        finally:
            if not keep:
                permit.release()
                if held is not None:
                    held.refund()
                if span is not None:
                    span.end(failure)

    @staticmethod
    def _hold(request: ProxyRequest, stack: Releases) -> Hold:
        """The request's hold, made for a provider's token reservation if admission made none."""
        hold = request.hold
        if hold is None:
            hold = request.hold = Hold()
            stack.push(hold)
        return hold

    def _usage_tap(
        self,
        request: ProxyRequest,
        alias: str,
        pool: Pool,
        provider: Provider,
        span: AttemptSpan | None,
        headers: list[tuple[bytes, bytes]],
        first: bytes | None,
        stream: Any,
    ) -> tuple[UsageTap | None, Callable[[UsageTap], None] | None]:
        """What reads the usage of a 2xx body, and whom it tells (``None``: nobody wants it,
        and the body is relayed untouched). When only the access line and a sampled span
        read it, the body's chunks are kept and handed to both as they are: the line's writer
        reads them with many others, off the request's path (``UsageKeeper``), and the span
        takes what it read. When the line alone reads it and the body's ``first`` chunk is all
        of it (the usual answer: it came with its head; ``stream`` has ended), the line takes
        those bytes: no keeper, no tap on the relay."""
        if span is not None and not span.sampled:
            span = None  # an unsampled trace records no usage
        observer = self.usage_observer
        if observer is not None and not (
            self.metrics is not None or span is not None or access_logged()
        ):
            observer = None
        strip = request.strip_usage and any(
            k == b"content-type" and b"text/event-stream" in v for k, v in headers
        )
        hold = request.hold
        ledger = self.ledger
        if not strip and hold is None and ledger is None and self.metrics is None:
            if observer is None and span is None:
                return None, None
            # Only the access line and the span want it (the observer's only use of it
            # without metrics: the line): they get the body now and read what it holds later,
            # the line when it is written, the span after that (what has passed by then: all
            # of it, unless the relay ended early).
            if (
                span is None
                and first is not None
                and len(first) <= MAX_KEPT
                and type(stream) is Response
                and stream.ended()
            ):
                defer_usage(first)  # read with the line's batch, as a keeper of it would be
                return None, None
            keeper = UsageKeeper()
            defer_usage(keeper)  # the request's usage, as the server span also reads it
            if span is not None:
                span.usage(keeper)
            return keeper, None
        if span is None and not strip and hold is None and ledger is None and observer is None:
            return None, None

        priced = ledger is not None or self.metrics is not None

        def report(tap: UsageTap) -> None:
            usage = tap.usage
            if usage is None:
                return
            request.usage = usage
            if priced or hold is not None:
                request.cost = cost_of(pool, provider, usage)
            if hold is not None:
                hold.settle(usage, request.cost)
            if span is not None:
                span.usage(usage)
            if observer is not None:
                observer(request, alias, provider, usage)

        return (StreamUsageStripper() if strip else UsageScanner()), report

    @staticmethod
    def _response_headers(
        response: UpstreamResponse, provider: Provider
    ) -> list[tuple[bytes, bytes]]:
        """Upstream headers minus the hop-by-hop ones (and any the upstream names in its
        ``Connection``), with the provider's configured headers overriding."""
        out: list[tuple[bytes, bytes]] = []
        connection = None
        for k, v in response.headers:  # one pass, each name lowered once
            k = k.lower()
            if k in _HOP_RESPONSE:
                if k == b"connection":
                    connection = v  # the last one's names count
            else:
                out.append((k, v))
        extra = provider.response_headers
        if connection is not None or extra:  # names dropped wherever they stand
            drop: set[bytes] | frozenset[bytes] = _HOP_RESPONSE
            if connection is not None:
                drop = drop | {t.strip() for t in connection.lower().split(b",")}
            if extra:
                drop = drop | {k for k, _ in extra}
            out = [field for field in out if field[0] not in drop]
            out.extend(extra)
        return out


async def _send_by(deadline: float, sending: Awaitable[UpstreamResponse]) -> UpstreamResponse:
    """``sending`` bounded by ``deadline`` (``trio.TooSlowError`` past it): trio.fail_after
    without its generator context manager, which cost as much as the scope."""
    with trio.CancelScope(deadline=deadline):
        return await sending
    raise trio.TooSlowError  # only the deadline can end the scope without a return


async def _aclose_shielded(resource: Any) -> None:
    """Close an upstream resource even while being cancelled (it frees a pooled connection)."""
    with trio.CancelScope(shield=True):
        await resource.aclose()
