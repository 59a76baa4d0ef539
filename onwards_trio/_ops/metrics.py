"""Prometheus metrics: the onwards names plus what an operator of an LLM gateway needs.

Every :class:`Metrics` owns its own :class:`prometheus_client.CollectorRegistry`: the global
registry raises "Duplicated timeseries" as soon as a second gateway (or test) registers the same
names, and a library must not leak state into its host's registry.

Label values are bounded by construction, because an unbounded label is a memory leak and a
privacy leak at once: ``endpoint`` is one of a fixed set of known routes (anything else is
``"other"``), ``method`` one of the standard methods (else ``"OTHER"``), ``alias`` a configured
alias (else ``"unknown"``), ``provider`` a provider index. Keys, prompts and raw paths never
become label values.

Names (``<p>`` is the configurable prefix, ``onwards`` by default)::

    <p>_http_requests_total{method,status,endpoint}             counter   (onwards)
    <p>_http_requests_duration_seconds{method,status,endpoint}  histogram (onwards)
    <p>_http_requests_pending{method,endpoint}                  gauge     (onwards)
    onwards_requests_inflight                                   gauge     (onwards; no prefix)
    <p>_upstream_requests_total{alias,provider,status}          counter   (status: HTTP code,
                                                                           "timeout", "error")
    <p>_upstream_request_duration_seconds{alias,provider}       histogram (send -> response head)
    <p>_upstream_time_to_first_byte_seconds{alias,provider}     histogram (streams only)
    <p>_upstream_inflight{alias,provider}                       gauge     (read from the table)
    <p>_alias_inflight{alias}                                   gauge     (read from the table)
    <p>_limit_rejections_total{alias,limit,scope}               counter   (limit: rate|
                                                                           concurrency|tokens|budget;
                                                                           scope: pool|key|provider|
                                                                           label)
    <p>_fallback_attempts_total{alias,provider,reason}          counter   (reason: rate_limited,
                                                                           timeout, network_error,
                                                                           status)
    <p>_config_reloads_total{result}                            counter   (result: ok|failed)
    <p>_config_last_reload_success_timestamp_seconds            gauge
    <p>_loop_steps_total{alias,kind,outcome}                    counter
    <p>_tool_calls_total{alias,outcome}                         counter
    <p>_input_tokens_total{alias,provider,key}                  counter   (all input tokens)
    <p>_output_tokens_total{alias,provider,key}                 counter
    <p>_cached_input_tokens_total{alias,provider,key}           counter   (input tokens served
                                                                           from a prompt cache)
    <p>_cost_total{alias,provider,key}                          counter   (what relayed responses
                                                                           cost at the price table,
                                                                           in its currency)
    <p>_usage_ledger_dropped_total                              counter   (ledger rows dropped:
                                                                           buffer full, or not
                                                                           written at shutdown)

``key`` is the name of the caller's key in ``auth.key_definitions`` (``"none"`` without a key,
``"other"`` for a key that has no definition): never the key itself.

The methods the core calls (all synchronous and cheap: label children are bound once and cached,
so the hot path is a dict lookup plus the child's own update)::

    token = metrics.http_started(method, path)      # pending +1, onwards_requests_inflight +1
    metrics.http_finished(token, status, seconds)   # count, duration; pending/inflight -1
    metrics.observe_http(method, path, status, seconds)  # count, duration (no start seen)
    metrics.upstream_response(alias, provider, status, seconds)
    metrics.upstream_failure(alias, provider, "timeout" | "error")
    metrics.first_byte(alias, provider, seconds)
    metrics.rejected(alias, "rate" | "concurrency", "pool" | "key" | "provider")
    metrics.fallback(alias, provider, reason)
    metrics.reload(ok=True | False)
    metrics.loop_step(alias, kind, outcome)
    metrics.tool_call(alias, outcome)
    metrics.tokens(alias, provider, key, usage)     # a relayed body's usage (_proxy.usage)
    metrics.cost(alias, provider, key, micros)      # what it cost (micro-units, _proxy.pricing)
    metrics.ledger_dropped(count)                   # usage ledger rows lost

In-flight counts per alias and provider cost nothing on the hot path: they are read at scrape
time from the live routing table (the concurrency counters the proxy keeps anyway), once
:meth:`Metrics.bind_targets` has been called. :func:`install_metrics` does that and hands the
object to a gateway. :func:`metrics_app` is the ASGI app for the metrics port.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app
from prometheus_client.core import GaugeMetricFamily

from onwards_trio._transport.asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    send_response,
    serve_lifespan,
)

if TYPE_CHECKING:
    from onwards_trio._proxy.targets import Targets

__all__ = [
    "KNOWN_ENDPOINTS",
    "OTHER_ENDPOINT",
    "HttpToken",
    "Metrics",
    "endpoint_label",
    "fallback_reason",
    "install_metrics",
    "metrics_app",
    "serve_metrics",
]

#: Request paths that are their own ``endpoint`` label value; every other path is ``"other"``.
KNOWN_ENDPOINTS: Final = frozenset(
    {
        "/models",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/moderations",
        "/v1/rerank",
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/usage",
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/responses",
        "/healthz",
        "/metrics",
    }
)
#: Templates for routes with an id in them (``/v1/responses/resp_1/cancel`` → this template).
_TEMPLATED: Final = {
    ("v1", "responses", None): "/v1/responses/{id}",
    ("v1", "responses", None, "cancel"): "/v1/responses/{id}/cancel",
    ("v1", "responses", None, "input_items"): "/v1/responses/{id}/input_items",
    ("v1", "models", None): "/v1/models/{model}",
}
OTHER_ENDPOINT: Final = "other"
_PREFIX: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
UNKNOWN_ALIAS: Final = "unknown"
_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
_LIMITS: Final = frozenset({"rate", "concurrency", "tokens", "budget"})
_SCOPES: Final = frozenset({"pool", "key", "provider", "label"})
_FALLBACK_REASONS: Final = frozenset({"rate_limited", "timeout", "network_error", "status"})
_UPSTREAM_FAILURES: Final = frozenset({"timeout", "error"})
_STEP_KINDS: Final = frozenset({"model_call", "tool_call", "other"})
_OUTCOMES: Final = frozenset(
    {"completed", "failed", "canceled", "cancelled", "incomplete", "error", "ok", "unhandled"}
)

# LLM requests are long: buckets reach minutes, not the client-library default of 10 s.
DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
TTFB_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip


def endpoint_label(path: str) -> str:
    """The bounded ``endpoint`` label for a request path (never the raw path of unknown routes)."""
    if path in KNOWN_ENDPOINTS:
        return path
    parts = path.strip("/").split("/")
    if 3 <= len(parts) <= 4 and parts[2]:
        key = (parts[0], parts[1], None, *parts[3:])
        template = _TEMPLATED.get(key)
        if template is not None:
            return template
    return OTHER_ENDPOINT


def fallback_reason(outcome: Any) -> str:
    """Why the pipeline moved on from an attempt: its ``HTTPError`` (429 ``rate_limited``, 504
    ``timeout``, else ``network_error``), or an upstream answer that matched ``on_status``."""
    status = getattr(outcome, "status", None)
    if status == 429:
        return "rate_limited"
    if status == 504:
        return "timeout"
    if status is not None:
        return "network_error"
    return "status"


def _bounded(value: str, allowed: frozenset[str], fallback: str = "other") -> str:
    return value if value in allowed else fallback


class HttpToken:
    """What :meth:`Metrics.http_started` bound for one request; pass it to ``http_finished``."""

    __slots__ = ("endpoint", "method", "pending")

    def __init__(self, method: str, endpoint: str, pending: Any) -> None:
        self.method = method
        self.endpoint = endpoint
        self.pending = pending


class _TableCollector:
    """In-flight gauges read from the live routing table at scrape time (free on the hot path)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # dynamic: nothing to check for duplicates at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        p = self._metrics.prefix
        by_provider = GaugeMetricFamily(
            f"{p}_upstream_inflight",
            "Requests holding a provider slot (until the response body ends).",
            labels=["alias", "provider"],
        )
        by_alias = GaugeMetricFamily(
            f"{p}_alias_inflight",
            "Requests in flight per configured alias.",
            labels=["alias"],
        )
        targets = self._metrics.targets
        if targets is not None:
            for alias, pool in targets.table.pools.items():
                total = 0
                for provider in pool.providers:
                    active = provider.concurrency.active
                    total += active
                    by_provider.add_metric([alias, str(provider.index)], active)
                by_alias.add_metric([alias], total)
        yield by_provider
        yield by_alias


class Metrics:
    """The gateway's metrics in their own registry. See the module docstring for the API."""

    def __init__(self, prefix: str = "onwards", registry: CollectorRegistry | None = None) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"invalid metrics prefix {prefix!r}: use [a-zA-Z_][a-zA-Z0-9_]*")
        self.prefix = prefix
        self.registry = registry if registry is not None else CollectorRegistry()
        self.targets: Targets | None = None
        r = self.registry

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"{prefix}_{name}", doc, labels, registry=r)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(f"{prefix}_{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
            return Histogram(f"{prefix}_{name}", doc, labels, buckets=buckets, registry=r)

        http = ("method", "status", "endpoint")
        self._http_total = counter(
            "http_requests_total", "HTTP requests served, by method, status and endpoint.", *http
        )
        self._http_duration = histogram(
            "http_requests_duration_seconds",
            "Time from request start to the end of the response body.",
            DURATION_BUCKETS,
            *http,
        )
        self._http_pending = gauge(
            "http_requests_pending", "HTTP requests being served right now.", "method", "endpoint"
        )
        # Fixed name, no prefix: as onwards.
        self._inflight = Gauge(
            "onwards_requests_inflight", "Requests in flight through the gateway.", registry=r
        )
        self._upstream_total = counter(
            "upstream_requests_total",
            "Upstream attempts by alias, provider index and upstream status "
            "(or 'timeout' / 'error' when no status arrived).",
            "alias",
            "provider",
            "status",
        )
        self._upstream_latency = histogram(
            "upstream_request_duration_seconds",
            "Time from sending an upstream request to its response head.",
            DURATION_BUCKETS,
            "alias",
            "provider",
        )
        self._ttfb = histogram(
            "upstream_time_to_first_byte_seconds",
            "Streaming responses: time from request start to the first body byte.",
            TTFB_BUCKETS,
            "alias",
            "provider",
        )
        self._rejections = counter(
            "limit_rejections_total",
            "Requests refused by a rate or concurrency limit, by the scope of the limit.",
            "alias",
            "limit",
            "scope",
        )
        self._fallbacks = counter(
            "fallback_attempts_total",
            "Failed attempts that moved on to another attempt, by why.",
            "alias",
            "provider",
            "reason",
        )
        self._reloads = counter("config_reloads_total", "Config reloads by result.", "result")
        self._reload_ok = self._reloads.labels("ok")
        self._reload_failed = self._reloads.labels("failed")
        self._last_reload = gauge(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last config that was applied (start-up counts).",
        )
        self._last_reload.set(time.time())
        self._steps = counter(
            "loop_steps_total",
            "Multi-step loop steps by alias, kind and outcome.",
            "alias",
            "kind",
            "outcome",
        )
        self._tools = counter(
            "tool_calls_total", "Server-side tool calls by alias and outcome.", "alias", "outcome"
        )
        tokens = ("alias", "provider", "key")
        self._input_tokens = counter(
            "input_tokens_total", "Input tokens of relayed upstream responses.", *tokens
        )
        self._output_tokens = counter(
            "output_tokens_total", "Output tokens of relayed upstream responses.", *tokens
        )
        self._cached_tokens = counter(
            "cached_input_tokens_total",
            "Input tokens served from a prompt cache (part of the input tokens).",
            *tokens,
        )
        self._cost = counter(
            "cost_total",
            "What relayed upstream responses cost at the configured prices (currency units).",
            *tokens,
        )
        self._ledger_dropped = counter(
            "usage_ledger_dropped_total",
            "Usage ledger rows dropped (its buffer was full, or they could not be written at "
            "shutdown).",
        )
        r.register(_TableCollector(self))
        # Label children, bound once per metric and distinct label values.
        self._children: dict[tuple[Any, ...], Any] = {}

    # -- bounding -------------------------------------------------------------------------

    def bind_targets(self, targets: Targets) -> None:
        """Read in-flight gauges from, and bound ``alias`` labels by, this live table."""
        self.targets = targets

    def alias_label(self, alias: str | None) -> str:
        """``alias`` if it is configured now (or no table is bound), else ``"unknown"``."""
        if alias is None:
            return UNKNOWN_ALIAS
        targets = self.targets
        if targets is not None and alias not in targets.table.pools:
            return UNKNOWN_ALIAS
        return alias

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, bound once and cached (the hot path is a dict lookup)."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # -- HTTP layer -----------------------------------------------------------------------

    def http_started(self, method: str, path: str) -> HttpToken:
        """A request arrived: pending and ``onwards_requests_inflight`` go up."""
        method = _bounded(method, _METHODS, "OTHER")
        endpoint = endpoint_label(path)
        pending = self._child(self._http_pending, method, endpoint)
        pending.inc()
        self._inflight.inc()
        return HttpToken(method, endpoint, pending)

    def http_finished(self, token: HttpToken, status: int, seconds: float) -> None:
        """The response ended (or the client left): count it and time it."""
        token.pending.dec()
        self._inflight.dec()
        self._count(token, status, seconds)

    def observe_http(self, method: str, path: str, status: int, seconds: float) -> None:
        """Count and time a finished request that :meth:`http_started` never saw."""
        method = _bounded(method, _METHODS, "OTHER")
        token = HttpToken(method, endpoint_label(path), None)
        self._count(token, status, seconds)

    def _count(self, token: HttpToken, status: int, seconds: float) -> None:
        labels = (token.method, str(status), token.endpoint)
        self._child(self._http_total, *labels).inc()
        self._child(self._http_duration, *labels).observe(seconds)

    # -- upstream, per alias and provider ------------------------------------------------

    def upstream_response(self, alias: str, provider: int, status: int, seconds: float) -> None:
        """An attempt got a response head with ``status`` after ``seconds``."""
        alias, index = self.alias_label(alias), str(provider)
        self._child(self._upstream_total, alias, index, str(status)).inc()
        self._child(self._upstream_latency, alias, index).observe(seconds)

    def upstream_failure(self, alias: str, provider: int, kind: str) -> None:
        """An attempt got no response head: ``"timeout"`` or ``"error"`` (network, protocol)."""
        kind = _bounded(kind, _UPSTREAM_FAILURES, "error")
        self._child(self._upstream_total, self.alias_label(alias), str(provider), kind).inc()

    def first_byte(self, alias: str, provider: int, seconds: float) -> None:
        """A streamed response sent its first body byte ``seconds`` after the request began."""
        self._child(self._ttfb, self.alias_label(alias), str(provider)).observe(seconds)

    def rejected(self, alias: str | None, limit: str, scope: str) -> None:
        """A limit refused a request: ``limit`` rate|concurrency|tokens|budget, ``scope``
        pool|key|provider|label."""
        self._child(
            self._rejections,
            self.alias_label(alias),
            _bounded(limit, _LIMITS),
            _bounded(scope, _SCOPES),
        ).inc()

    def fallback(self, alias: str, provider: int, reason: str) -> None:
        """An attempt at ``provider`` failed and the pipeline moves on (``reason`` bounded)."""
        self._child(
            self._fallbacks,
            self.alias_label(alias),
            str(provider),
            _bounded(reason, _FALLBACK_REASONS),
        ).inc()

    # -- operations and the loop ----------------------------------------------------------

    def reload(self, ok: bool) -> None:
        """A config reload was applied (``ok``) or rejected."""
        if ok:
            self._reload_ok.inc()
            self._last_reload.set(time.time())
        else:
            self._reload_failed.inc()

    def loop_step(self, alias: str, kind: str, outcome: str) -> None:
        """A multi-step loop step ended (``kind`` model_call|tool_call, ``outcome`` its state)."""
        self._child(
            self._steps,
            self.alias_label(alias),
            _bounded(kind, _STEP_KINDS),
            _bounded(outcome, _OUTCOMES),
        ).inc()

    def tool_call(self, alias: str, outcome: str) -> None:
        """A server-side tool call ended with ``outcome`` (completed, failed, ...)."""
        self._child(self._tools, self.alias_label(alias), _bounded(outcome, _OUTCOMES)).inc()

    def tokens(self, alias: str, provider: int, key: str, usage: Any) -> None:
        """The token usage (a :class:`~onwards_trio._proxy.usage.Usage`) of one relayed body."""
        labels = (self.alias_label(alias), str(provider), key)
        if usage.input_tokens:
            self._child(self._input_tokens, *labels).inc(usage.input_tokens)
        if usage.output_tokens:
            self._child(self._output_tokens, *labels).inc(usage.output_tokens)
        if usage.cached_tokens:
            self._child(self._cached_tokens, *labels).inc(usage.cached_tokens)

    def cost(self, alias: str, provider: int, key: str, micros: int) -> None:
        """What one relayed body cost, in micro-units of the price table's currency."""
        if micros:
            labels = (self.alias_label(alias), str(provider), key)
            self._child(self._cost, *labels).inc(micros / 1_000_000)

    def ledger_dropped(self, count: int) -> None:
        """``count`` usage ledger rows were lost."""
        self._ledger_dropped.inc(count)

    # -- exposition -----------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition (what ``GET /metrics`` answers)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def install_metrics(gateway: Any, metrics: Metrics) -> Metrics:
    """Attach ``metrics`` to a :class:`~onwards_trio.Gateway` (and its proxy) and bind its table.

    Without this call a gateway records nothing and pays nothing.
    """
    metrics.bind_targets(gateway.targets)
    gateway.metrics = metrics
    proxy = getattr(gateway, "proxy", None)
    if proxy is not None:
        proxy.metrics = metrics
    return metrics


_NOT_FOUND = b"Not Found: the metrics are at /metrics\n"
_METHOD_NOT_ALLOWED = b"Method Not Allowed\n"


def metrics_app(metrics: Metrics) -> ASGIApp:
    """The ASGI app for the metrics port: ``GET /metrics`` (gzip and OpenMetrics negotiated).

    Only http scopes reach ``prometheus_client``'s app (it asserts on the scope type); lifespan
    is answered here, because hypercorn-trio crashes on an app that returns from lifespan.
    """
    exposition = make_asgi_app(metrics.registry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"] not in ("/metrics", "/metrics/"):
                await send_response(send, 404, [(b"content-type", b"text/plain")], _NOT_FOUND)
            elif scope["method"] not in ("GET", "HEAD"):
                await send_response(
                    send,
                    405,
                    [(b"content-type", b"text/plain"), (b"allow", b"GET, HEAD")],
                    _METHOD_NOT_ALLOWED,
                )
            else:
                await exposition(scope, receive, send)
        elif kind == "lifespan":
            await serve_lifespan(receive, send)
        else:
            raise RuntimeError(f"unsupported ASGI scope type {kind!r}")

    return app


async def serve_metrics(
    metrics: Metrics,
    host: str = "0.0.0.0",
    port: int = 9090,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve :func:`metrics_app` until cancelled; ``task_status.started`` gets the base URL.

    Run it in the gateway's service nursery (``await nursery.start(serve_metrics, m, host, port)``).
    """
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve as hypercorn_serve

    cfg = HypercornConfig()
    cfg.bind = [f"{host}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.graceful_timeout = 1  # a scrape is short; never hold up a shutdown for it
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn_serve, metrics_app(metrics), cfg)
        task_status.started(str(binds[0]) if binds else f"http://{host}:{port}")
