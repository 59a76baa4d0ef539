"""The gateway: an ASGI app over the proxy pipeline, its resources, and ``serve()``.

:class:`Gateway` owns the upstream connection pool and the live routing table. Long-lived
tasks (the HTTP listener, the config watcher, the metrics listener, detached response loops)
live in the gateway's *service nursery*, opened by :meth:`Gateway.running` or
:meth:`Gateway.serve`; cancelling the nursery that runs ``serve()`` stops all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import attrs
import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from onwards_trio import _errors as errors
from onwards_trio._anthropic.service import (
    ROUTES as ANTHROPIC_ROUTES,
)
from onwards_trio._anthropic.service import (
    AnthropicService,
    client_key,
    models_page,
    wants_anthropic,
)
from onwards_trio._app.idempotency import IDEMPOTENT_PATHS, Idempotency, idempotency_key
from onwards_trio._app.usage import USAGE_PATH, UsageAPI
from onwards_trio._config import Config
from onwards_trio._errors import HTTPError
from onwards_trio._ops.logs import (
    Exchange,
    access_writer,
    add_usage,
    begin_exchange,
    current_status,
    direct_writer,
    finish_exchange,
    note_request,
)
from onwards_trio._ops.metrics import Metrics, endpoint_label, install_metrics, serve_metrics
from onwards_trio._ops.telemetry import create_telemetry
from onwards_trio._proxy.auth import bearer_token
from onwards_trio._proxy.ledger import UsageLedger
from onwards_trio._proxy.pipeline import (
    UPSTREAM_ERRORS,
    Proxy,
    ProxyRequest,
    UpstreamReply,
    parse_json_body,
    parse_json_off_loop,
)
from onwards_trio._proxy.strict import handle_strict, response_filter
from onwards_trio._proxy.targets import Targets, build_table
from onwards_trio._responses.model_transport import ProxyModelTransport
from onwards_trio._responses.service import ResponsesService
from onwards_trio._stores import open_usage_store
from onwards_trio._transport.asgi import (
    OFF_LOOP_JSON_BYTES,
    ASGIApp,
    BodyBudget,
    CancelOnDisconnect,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    read_body,
    send_error,
    send_json,
    serve_lifespan,
)
from onwards_trio._transport.pool import UpstreamClient, dot_segments
from onwards_trio._transport.server import serve as serve_http

if TYPE_CHECKING:
    from onwards_trio._ops.tracing import RequestSpan, Telemetry
    from onwards_trio._proxy.shared_limits import SharedLimits
    from onwards_trio._proxy.targets import Provider
    from onwards_trio._proxy.usage import Usage

__all__ = ["Gateway", "ServeInfo"]

log = logging.getLogger("onwards_trio")

_MODELS_PATHS = frozenset({"/v1/models", "/models"})
# An upstream that echoes TRACE/TRACK would hand the client our upstream key; CONNECT would
# make a tunnel of a pooled upstream connection. Methods are case-sensitive in HTTP, but
# upstreams differ in what they accept: refused in any case.
_REFUSED_METHODS = {
    name: HTTPError(
        405,
        errors.error_body(
            f"{name} is not supported.", "invalid_request_error", "method_not_allowed"
        ),
        [(b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")],
    )
    for name in ("TRACE", "TRACK", "CONNECT")
}
_USUAL_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"})
_AMBIGUOUS_FRAMING = HTTPError(
    400,
    errors.error_body(
        "A request must not carry both content-length and transfer-encoding.",
        "invalid_request_error",
        "bad_request",
    ),
    [(b"connection", b"close")],
)
_STREAM_BROKEN = (
    b"data: "
    + orjson.dumps(
        {
            "error": {
                "message": "The upstream stream ended unexpectedly.",
                "type": "internal_error",
                "param": None,
                "code": "upstream_stream_error",
            }
        }
    )
    + b"\n\n"
)


@attrs.frozen
class ServeInfo:
    """Where a served gateway listens: ``url`` is ``http://host:port``; ``metrics_url`` the
    Prometheus scrape URL (``http://host:port/metrics``) when ``serve`` was given a
    ``metrics_port``, else ``None``."""

    url: str
    metrics_url: str | None = None


def hypercorn_config(host: str, port: int) -> HypercornConfig:
    cfg = HypercornConfig()
    cfg.bind = [f"{host}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.keep_alive_max_requests = 1_000_000  # the default (1000) drops busy keep-alive clients
    cfg.keep_alive_timeout = 75
    cfg.backlog = 1024
    cfg.graceful_timeout = 30
    return cfg


class Gateway:
    """An OpenAI-compatible gateway. Call it as an ASGI app, or run it with :meth:`serve`."""

    def __init__(self, config: Config) -> None:
        self.targets = Targets(config)
        # Limits shared with other replicas through Redis (SPEC §3.6), when configured; its
        # client opens in running(). Absent: in-process limits, at no extra cost.
        self.shared_limits: SharedLimits | None = None
        if config.shared_limits is not None:
            from onwards_trio._proxy.shared_limits import (
                SharedLimits,  # coredis is an optional extra
            )

            self.shared_limits = SharedLimits(config.shared_limits)
            self.targets.table = build_table(config, shared=self.shared_limits)
        self.client = UpstreamClient(config.http_pool)
        self.body_budget = BodyBudget(config.body_buffer_limit_bytes)
        self.proxy = Proxy(self.targets, self.client)
        # Sanitisation and strict mode: one factory that answers None (zero cost per chunk)
        # for targets that need neither.
        self.proxy.filters.append(response_filter)
        self._nursery: trio.Nursery | None = None
        # SEAM: metrics (gateway-level Metrics object)
        self.metrics: Any = None
        # OpenTelemetry traces (None: off, and the SDK is never imported); token usage
        self.telemetry: Telemetry | None = create_telemetry(config.telemetry)
        self.proxy.telemetry = self.telemetry
        self.proxy.usage_observer = self._usage
        # /v1/responses: stores, tool executor and background loops live here
        self.responses = ResponsesService(self)
        # /v1/messages for aliases with the Anthropic adapter
        self.anthropic = AnthropicService(self)
        # Idempotency-Key on the POST routes that cost money (records in the responses' store)
        self.idempotency = Idempotency(self)
        # The usage ledger (config.usage, read at start): rows noted by the proxy, written to
        # the store by a task in the service nursery; GET /v1/usage reads them.
        self.ledger: UsageLedger | None = None
        if config.usage.ledger:
            self.ledger = UsageLedger(
                config.usage, open_usage_store(config.store), on_drop=self._ledger_dropped
            )
            self.proxy.ledger = self.ledger
        self.usage_api = UsageAPI(self.ledger)

    @property
    def config(self) -> Config:
        return self.targets.config

    @property
    def nursery(self) -> trio.Nursery:
        """The service nursery (only while :meth:`running`/:meth:`serve` is active)."""
        if self._nursery is None:
            raise RuntimeError("the gateway is not running; use `async with gateway.running()`")
        return self._nursery

    def model_transport(self, api_key: str | None = None) -> ProxyModelTransport:
        """A :class:`ModelTransport` for :func:`run_response_loop` through this gateway: each
        model call is routed by its payload's ``model`` with the full pipeline (auth with
        ``api_key``, limits, balancing, failover, upstream auth, filters)."""
        headers = [(b"authorization", b"Bearer " + api_key.encode())] if api_key else []
        return ProxyModelTransport(self.proxy, headers)

    def update_config(self, config: Config) -> None:
        """Swap in a new config (whole table, atomically); in-flight requests are unaffected."""
        self.targets.update(config)
        self.body_budget.limit = config.body_buffer_limit_bytes

    # -- lifecycle ------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        """Open the service nursery and the resources; close them all on exit."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    # upstream header timeouts without a cancel scope per request
                    await nursery.start(self.client.watch_deadlines)
                    writer = access_writer()
                    if writer is not None:  # access lines written in batches, off the hot path
                        await nursery.start(writer.run)
                    if self.shared_limits is not None:
                        await nursery.start(self.shared_limits.run)
                    # Background responses a dead process left: resumed from the start.
                    nursery.start_soon(self.responses.recover_at_start)
                    if self.telemetry is not None:
                        await nursery.start(self.telemetry.run)
                        nursery.start_soon(self.telemetry.warn_dropped)
                    if self.ledger is not None:
                        await nursery.start(self.ledger.run)
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                if self.ledger is not None:
                    # Every request has ended (the nursery is closed): all their rows are in.
                    await self.ledger.aclose()
                await self.client.aclose()

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 3000,
        *,
        shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
        grace: float = 30.0,
        server: Literal["onwards", "hypercorn"] = "onwards",
        reuse_port: bool = False,
        metrics_port: int | None = None,
        metrics: Metrics | None = None,
        task_status: trio.TaskStatus[ServeInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled, or until ``shutdown_trigger`` returns and in-flight requests
        had ``grace`` seconds to finish. Background responses get the same grace; those still
        running after it are handed over or cancelled (``background.on_shutdown``).
        ``task_status.started`` receives a :class:`ServeInfo`. ``server="hypercorn"`` uses
        hypercorn (HTTP/2, h2c) instead of the lean built-in HTTP/1.1 server. ``reuse_port``
        (built-in server only) lets several processes serve one port (``--workers``).

        With ``metrics_port``, Prometheus metrics (``metrics``, else the gateway's installed
        ones, else a fresh ``Metrics()``) are served on ``host:metrics_port`` in the service
        nursery and ``ServeInfo.metrics_url`` is their scrape URL."""
        if reuse_port and server == "hypercorn":
            raise ValueError("reuse_port needs the built-in server")
        if metrics_port is not None and (metrics is not None or self.metrics is None):
            install_metrics(self, metrics if metrics is not None else Metrics())
        done = trio.Event()
        drain_started: float | None = None
        if shutdown_trigger is not None:
            trigger = shutdown_trigger

            async def noted_trigger() -> None:
                nonlocal drain_started
                await trigger()
                drain_started = trio.current_time()

            shutdown_trigger = noted_trigger

        async def listener(task_status: trio.TaskStatus[Sequence[str]]) -> None:
            try:
                if server == "hypercorn":
                    cfg = hypercorn_config(host, port)
                    cfg.graceful_timeout = grace
                    # hypercorn's app type is narrower than raw ASGI typing
                    app: Any = partial(_framing_guard, self)
                    await hypercorn_serve(
                        app, cfg, shutdown_trigger=shutdown_trigger, task_status=task_status
                    )
                else:
                    await serve_http(
                        self._dispatch,
                        host,
                        port,
                        shutdown_trigger=shutdown_trigger,
                        grace=grace,
                        write_timeout=self.config.client_write_timeout_secs,
                        reuse_port=reuse_port,
                        task_status=task_status,
                    )
            finally:
                done.set()

        async with self.running():
            binds: Sequence[str] = await self.nursery.start(listener)
            url = binds[0] if binds else f"http://{host}:{port}"
            log.info("onwards-trio listening on %s", url)
            metrics_url = None
            if metrics_port is not None:
                base = await self.nursery.start(serve_metrics, self.metrics, host, metrics_port)
                metrics_url = f"{base}/metrics"
            task_status.started(ServeInfo(url=url, metrics_url=metrics_url))
            await done.wait()
            if drain_started is not None:
                with trio.move_on_at(drain_started + grace):
                    await self.responses.drain()

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":  # Open Responses' WebSocket mode (any other path: refused)
            await self.responses.websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:  # hypercorn-trio needs an exception, not a return
            raise RuntimeError(f"unsupported ASGI scope type {kind!r}")

    def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """:meth:`__call__` for the built-in server: an HTTP request's handler coroutine is
        returned to be awaited, not awaited in a coroutine of its own (one frame less on
        every suspension and resumption of the request)."""
        if scope["type"] == "http":
            return self._http(scope, receive, send)
        return self(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """ASGI lifespan: under an ASGI server (hypercorn, …) startup opens the service nursery
        (:meth:`running`) and shutdown closes it, so background responses work with no extra
        code. Under :meth:`serve` or an explicit ``running()`` it is already open: only answer.
        """
        if self._nursery is not None:
            await serve_lifespan(receive, send)
            return
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        started = False
        try:
            async with self.running():
                await send({"type": "lifespan.startup.complete"})
                started = True
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
        except Exception as exc:  # the server reports it and does not serve (startup)
            kind = "shutdown" if started else "startup"
            log.exception("gateway %s failed", kind)
            await send({"type": f"lifespan.{kind}.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path: str = scope["path"]
        method: str = scope["method"]
        # metrics (pending, in flight, bytes, time to first byte) and the access line
        exchange = begin_exchange(self.metrics, method, path, started, send)
        tel = self.telemetry
        span: RequestSpan | None = None
        if tel is not None:
            span = tel.start_request(method, endpoint_label(path), scope["headers"])
        status = 500
        try:
            refused = None if method in _USUAL_METHODS else _REFUSED_METHODS.get(method.upper())
            if refused is not None:
                status = 405
                await send_error(exchange, refused)
            elif path in _MODELS_PATHS and method in ("GET", "HEAD"):
                status = await self._models(scope, exchange)
            elif path == USAGE_PATH:
                status = await self.usage_api.handle(
                    scope, exchange, self.targets.table, time.time()
                )
            elif (
                method == "POST"
                and path in IDEMPOTENT_PATHS
                and idempotency_key(scope["headers"]) is not None
            ):
                status = await self.idempotency.handle(scope, receive, exchange, self._route)
            else:
                status = await self._route(scope, receive, exchange, last=True)
        except trio.Cancelled:
            if getattr(receive, "client_gone", False):
                status = 499  # the client left: see relay(last=True)
            raise
        except Exception:
            # A bug must still end as a JSON error, never a traceback or a hung client.
            log.exception("unhandled error in %s %s", method, endpoint_label(path))
            if current_status() is not None:
                raise  # the head is out: let the server abort the connection
            status = 500
            await send_error(exchange, errors.internal_error())
        finally:
            done = finish_exchange(
                self.metrics, method, path, status, time.perf_counter() - started
            )
            if span is not None and tel is not None:
                self._end_span(tel, span, done, status, scope)

    def _end_span(
        self, tel: Telemetry, span: RequestSpan, done: Exchange, status: int, scope: Scope
    ) -> None:
        if not span.sampled:  # nothing to record: the key's label need not be looked up
            tel.end_request(span, status)
            return
        request = done.request
        sent = done.sent_status
        table = self.targets.table
        if request is None:
            label = table.key_label(bearer_token(scope["headers"]))
            tel.end_request(
                span, status if sent is None else sent, None, label, usage=done.usage_parts
            )
            return
        alias = request.alias
        if alias is not None:  # the pipeline hashed the key
            label = table.key_label_of(request.key_id)
        else:
            label = table.key_label(bearer_token(scope["headers"]))
        tel.end_request(
            span,
            status if sent is None else sent,
            alias,
            label,
            request.provider_index,
            request.attempts,
            # as relayed: a body left for later is read with the span's export batch, not now
            done.usage_parts,
        )

    def _usage(self, request: ProxyRequest, alias: str, provider: Provider, usage: Usage) -> None:
        """A relayed upstream body's token usage: counters, the access line (and the spans,
        which the pipeline tags itself)."""
        metrics = self.metrics
        if metrics is not None:
            label = self.targets.table.key_label_of(request.key_id)
            metrics.tokens(alias, provider.index, label, usage)
            if request.cost:
                metrics.cost(alias, provider.index, label, request.cost)
        add_usage(usage)

    def _ledger_dropped(self, count: int) -> None:
        if self.metrics is not None:
            self.metrics.ledger_dropped(count)

    def _route(
        self, scope: Scope, receive: Receive, send: Send, *, last: bool = False
    ) -> Awaitable[int]:
        """Serve a request by its path: ``/v1/messages``, strict routes, ``/v1/responses``, or
        the proxy (``last``: see :meth:`relay`). The handler's coroutine is returned, to be
        awaited by the caller (no coroutine of this method's own per request)."""
        path: str = scope["path"]
        if path in ANTHROPIC_ROUTES:
            return self.anthropic.handle(scope, receive, send)
        if self.targets.table.config.strict_mode and not path.startswith("/v1/responses/"):
            # typed routes only; POST /v1/responses goes to the adapter first
            return handle_strict(self, scope, receive, send, responses=self.responses.create)
        if path == "/v1/responses" or path.startswith("/v1/responses/"):
            return self.responses.handle(scope, receive, send)
        return self._proxy_http(scope, receive, send, last)

    async def _models(self, scope: Scope, send: Send) -> int:
        headers = scope["headers"]
        if wants_anthropic(headers):  # an Anthropic client: its shape, its key header
            aliases = self.targets.table.visible_aliases(client_key(headers))
            await send_json(send, 200, models_page(aliases, time.time()))
            return 200
        token = bearer_token(headers)
        created = int(time.time())
        data = [
            {"id": alias, "created": created, "object": "model", "owned_by": "None"}
            for alias in self.targets.table.visible_aliases(token)
        ]
        await send_json(send, 200, {"object": "list", "data": data})
        return 200

    def read_bounded_body(self, scope: Scope, receive: Receive) -> Awaitable[bytes]:
        """The request body within every bound: the size limit (a declared length over it is
        refused before a byte is read), the global body budget and the read deadline. (The
        reading coroutine is returned: no coroutine of this method's own per request.)"""
        config = self.targets.table.config  # not the property: one call less
        return read_body(
            receive,
            config.body_limit_bytes,
            headers=scope["headers"],
            budget=self.body_budget,
            deadline=config.body_timeout_secs,
        )

    async def read_request(self, scope: Scope, receive: Receive) -> ProxyRequest:
        """Read and frame one request for the pipeline (413 past the body limit)."""
        body = await self.read_bounded_body(scope, receive)
        small = len(body) < OFF_LOOP_JSON_BYTES
        request = self._frame(scope, body, small)
        if not small:
            request.json = await parse_json_off_loop(body)
        note_request(request)  # alias, provider, attempts and sizes on the access line
        return request

    def _frame(self, scope: Scope, body: bytes, parse: bool) -> ProxyRequest:
        """The pipeline's request for ``body``; ``parse``: its JSON is parsed here (the usual
        small body, without the coroutines of the off-loop path)."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if dot_segments(raw_path):
            raise errors.invalid_request("The request path must not contain '.' or '..' segments.")
        return ProxyRequest(
            method=scope["method"].encode(),
            raw_path=raw_path,
            query=scope.get("query_string", b""),
            headers=list(scope["headers"]),
            body=body,
            json=parse_json_body(body) if parse else None,
        )

    async def _proxy_http(
        self, scope: Scope, receive: Receive, send: Send, last: bool = False
    ) -> int:
        try:
            # read_request's steps, here: no coroutine of its own per request
            body = await self.read_bounded_body(scope, receive)
            small = len(body) < OFF_LOOP_JSON_BYTES
            request = self._frame(scope, body, small)
            if not small:
                request.json = await parse_json_off_loop(body)
            note_request(request)
        except HTTPError as exc:
            await send_error(send, exc)
            return exc.status
        except ClientDisconnected:
            return 499
        return await self.relay(request, receive, send, last=last)

    async def relay(
        self,
        request: ProxyRequest,
        receive: Receive,
        send: Send,
        *,
        answer: Callable[[UpstreamReply, Send], Awaitable[int]] | None = None,
        error: Callable[[Send, HTTPError], Awaitable[object]] = send_error,
        last: bool = False,
    ) -> int:
        """Run the pipeline for ``request`` and relay the reply, watching for disconnects.

        ``answer`` replaces the verbatim relay (a translating ingress such as
        ``/v1/messages`` sends its own answer and returns its status); ``error`` sends a
        gateway error in the route's envelope. Anything unexpected propagates to the
        handler's safety net (a JSON 500 while no head was sent, an aborted connection after).

        A disconnect ends the relay quietly (499), unless ``last``: the caller has nothing
        left to do for the request but synchronous bookkeeping, so under the built-in server
        the disconnect cancels the connection's scope instead (no cancel scope of its own per
        request) and the cancellation propagates.
        """
        status = 499
        end = getattr(receive, "end_on_disconnect", None) if last else None
        # The watch is entered and left by hand, not with ``async with``: the usual request
        # (``last`` under the built-in server) then costs no context manager object and no
        # two coroutines, about 1.5 % of its instructions.
        server: Any = receive  # the built-in server's receive, when ``end`` is set
        watch: CancelOnDisconnect | None = None
        previous: trio.CancelScope | None = None
        if end is not None:
            previous = end()
        else:
            watch = CancelOnDisconnect(receive)
            await watch.__aenter__()
        try:
            try:
                async with self.proxy.open_upstream(request) as reply:
                    status = reply.status
                    if answer is None:
                        await _send_reply(reply, send, receive)
                    else:
                        status = await answer(reply, send)
            except HTTPError as exc:
                status = exc.status
                await error(send, exc)
        except BaseException as exc:
            if watch is None:
                server.cancel_on_disconnect(previous)  # an enclosing one is watched again
                raise
            if not await watch.__aexit__(type(exc), exc, exc.__traceback__):
                raise
            return status  # the client left: the watch ended the relay quietly
        if watch is None:
            server.cancel_on_disconnect(previous)
        else:
            await watch.__aexit__(None, None, None)
        return status


async def _send_reply(reply: UpstreamReply, send: Send, receive: Receive) -> None:
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
    # With a known length, the chunk that completes it closes the response at once, and the
    # body is then iterated to its end (no I/O: the length was read), which hands the upstream
    # connection back to the pool and reports the usage: that bookkeeping comes after the
    # client's answer instead of delaying it (the client's next request on this connection is
    # served after it, so it still finds the upstream connection free).
    remaining = _content_length(reply.headers)
    held = b""
    ended = False
    try:
        write = _stream_writer(reply, send, receive) if remaining is None else None
        if write is not None:
            # A stream (no length) that no filter rewrites, under the built-in server: one loop
            # from the upstream socket to the client's (_Body.relay), not an ASGI message
            # through every layer per event.
            held = await reply.body.relay(write)  # type: ignore[attr-defined]
        else:
            body = reply.body
            # The pipeline's body hands over its first chunk without a coroutine (the usual
            # answer's whole body came with its head); then it is iterated.
            take = getattr(body, "take_first", None)
            chunk: bytes | None = take() if take is not None else None
            chunks = body if take is not None else body.__aiter__()  # (the pipeline's: itself)
            while True:
                if chunk is None:
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                if chunk and remaining != 0:
                    if remaining is not None:
                        remaining = max(0, remaining - len(chunk))
                        if remaining == 0:
                            ended = True
                            await send({"type": "http.response.body", "body": chunk})
                            drain = getattr(body, "drain", None)
                            if drain is not None:  # the pipeline's body: ended without a chunk
                                await drain()
                                return
                            chunk = None
                            continue
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = None
            if ended:
                return
    except UPSTREAM_ERRORS as exc:
        if ended:
            return  # the answer was complete; the upstream connection is not reused
        if not reply.is_sse:
            # Left unfinished, the response ends with the connection: a truncated body is the
            # honest signal. One line, not a traceback: the upstream's fault, not ours.
            log.warning("upstream body for %r cut short (%s); response truncated", reply.alias, exc)
            return
        # SPEC §2.5: a stream the upstream breaks ends with an error event the client can see.
        await send({"type": "http.response.body", "body": _STREAM_BROKEN, "more_body": True})
        held = b""
    await send({"type": "http.response.body", "body": held, "more_body": False})


def _stream_writer(
    reply: UpstreamReply, send: Send, receive: Receive
) -> Callable[[bytes], Awaitable[None]] | None:
    """The direct writer for a streamed reply's body, when every piece may skip the ASGI
    message: the body is the pipeline's own (no filter wraps it), the server takes pieces
    directly (``send_more``, the built-in server's) and ``send`` is the request's own."""
    more = getattr(receive, "send_more", None)
    if more is None or not hasattr(reply.body, "relay"):
        return None
    return direct_writer(send, more)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _framing_guard(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """hypercorn (h11) accepts a request with both content-length and transfer-encoding and
    passes it on: behind a front end that frames by the other header, that is request
    smuggling. The built-in server refuses such requests itself; under hypercorn, this does."""
    if scope["type"] == "http":
        names = [name for name, _ in scope["headers"]]
        if b"content-length" in names and b"transfer-encoding" in names:
            await send_error(send, _AMBIGUOUS_FRAMING)
            return
    await app(scope, receive, send)
