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
    <p>_trace_spans_dropped_total                               counter   (spans a full export
                                                                           queue dropped; only
                                                                           while tracing is on)

``key`` is the name of the caller's key in ``auth.key_definitions`` (``"none"`` without a key,
``"other"`` for a key that has no definition): never the key itself.

The methods the core calls (all synchronous and cheap: a dict lookup and a ``+=`` on a plain
list, no lock, no prometheus-client object per label set)::

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
:meth:`Metrics.bind_targets` has been called. Dropped spans likewise: read at scrape time from
the count the tracer's full-queue check keeps anyway (:meth:`Metrics.bind_span_drops`).
:func:`install_metrics` does both and hands the object to a gateway. :func:`metrics_app` is
the ASGI app for the metrics port.

Why not prometheus-client's ``Counter`` / ``Histogram`` objects: each update takes a lock and a
histogram walks its buckets in Python, together about a tenth of a traffic-controlled request's
CPU. The values live in plain lists here instead, updated only on the Trio thread (every caller
above runs there), and one collector turns them into the very families, samples (``_created``
included) and order those objects would have produced. prometheus-client still owns the
registry and the text and OpenMetrics exposition.
"""

from __future__ import annotations

import os
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client import utils as client_utils
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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


#: How prometheus-client writes a bucket bound (``le``): ``0.005``, ``10.0``, ``+Inf``.
_go_float: Callable[[float], str] = client_utils.floatToGoString


def _created_series() -> bool:
    """Whether counters and histograms show ``_created`` samples: prometheus-client's own switch
    (``PROMETHEUS_DISABLE_CREATED_SERIES``, ``disable_created_metrics()``), read at each scrape
    as its metric objects read it."""
    from prometheus_client import metrics as client_metrics

    use = getattr(client_metrics, "_use_created", None)
    if isinstance(use, bool):
        return use
    return os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
        "true",
        "1",
        "t",
    )


class _Family:
    """One metric's values: a plain list per label set, in the order the label sets first
    appeared (the order prometheus-client lists a metric's children in).

    A cell is ``[value, created]`` for a counter, ``[value]`` for a gauge and ``[sum, created,
    count of bucket 0, ..., count of +Inf]`` for a histogram (per bucket, not cumulative: an
    observation adds to one bucket; the scrape sums them up).
    """

    __slots__ = ("bounds", "cells", "counts", "doc", "kind", "labelnames", "les", "name")

    def __init__(
        self,
        name: str,
        doc: str,
        kind: str,
        labelnames: tuple[str, ...] = (),
        bounds: tuple[float, ...] = (),
        counts: _Family | None = None,
    ) -> None:
        # A counter's family name has no "_total" (its samples do), as prometheus-client names it.
        self.name = name[: -len("_total")] if kind == "counter" else name
        self.doc = doc
        self.kind = kind
        self.labelnames = labelnames
        self.bounds = bounds
        self.les = [_go_float(b) for b in (*bounds, float("inf"))]
        #: A counter that is the ``_count`` of this histogram (same labels, same updates).
        self.counts = counts
        self.cells: dict[tuple[str, ...], list[float]] = {}
        if not labelnames:
            self.new(())  # an unlabelled metric exists (at 0) from the start

    def new(self, key: tuple[str, ...]) -> list[float]:
        if self.kind == "histogram":
            cell = [0.0, time.time(), *([0.0] * (len(self.bounds) + 1))]
        elif self.kind == "counter":
            cell = [0.0, time.time()]
        else:
            cell = [0.0]
        self.cells[key] = cell
        return cell

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        cell = self.cells.get(key) or self.new(key)
        cell[0] += amount

    def observe(self, key: tuple[str, ...], value: float) -> None:
        cell = self.cells.get(key) or self.new(key)
        cell[0] += value
        cell[2 + bisect_left(self.bounds, value)] += 1

    def describe(self) -> Metric:
        return Metric(self.name, self.doc, self.kind)

    def collect(self, created: bool) -> Metric:
        """The family as prometheus-client's own metric object would have produced it."""
        metric = Metric(self.name, self.doc, self.kind)
        add, name, names = metric.add_sample, self.name, self.labelnames
        if self.counts is not None:  # a counter read off its histogram's cells
            for key, cell in list(self.counts.cells.items()):
                add(f"{name}_total", dict(zip(names, key, strict=True)), sum(cell[2:], 0.0))
                if created:
                    add(f"{name}_created", dict(zip(names, key, strict=True)), cell[1])
            return metric
        for key, cell in list(self.cells.items()):
            if self.kind == "gauge":
                add(name, dict(zip(names, key, strict=True)), cell[0])
            elif self.kind == "counter":
                add(f"{name}_total", dict(zip(names, key, strict=True)), cell[0])
                if created:
                    add(f"{name}_created", dict(zip(names, key, strict=True)), cell[1])
            else:
                series = list(zip(names, key, strict=True))
                acc = 0.0
                for le, count in zip(self.les, cell[2:], strict=True):
                    acc += count
                    add(f"{name}_bucket", dict([*series, ("le", le)]), acc)
                add(f"{name}_count", dict(series), acc)
                add(f"{name}_sum", dict(series), cell[0])  # every bucket bound here is >= 0
                if created:
                    add(f"{name}_created", dict(series), cell[1])
        return metric


class _Collector:
    """The registry's view of a :class:`Metrics`: its families, built at scrape time."""

    def __init__(self, families: list[_Family]) -> None:
        self._families = families

    def describe(self) -> list[Metric]:
        return [family.describe() for family in self._families]

    def collect(self) -> Iterator[Metric]:
        created = _created_series()
        for family in self._families:
            yield family.collect(created)


class HttpToken:
    """What :meth:`Metrics.http_started` bound; pass it to ``http_finished``.

    One per method and endpoint label, shared by their requests: it holds their pending gauge
    and their duration cells per status, so finishing a request is a dict lookup by ``status``.
    """

    __slots__ = ("endpoint", "method", "pending", "statuses")

    def __init__(self, method: str, endpoint: str) -> None:
        self.method = method
        self.endpoint = endpoint
        #: The ``http_requests_pending`` cell, once a request was started (not only observed).
        self.pending: list[float] | None = None
        self.statuses: dict[int, list[float]] = {}


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


class _SpanDropsCollector:
    """``<p>_trace_spans_dropped_total``, read from the tracer's queue at scrape time (the
    request path only counts, as it did anyway); absent while no tracer is bound."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # dynamic: nothing to check for duplicates at registration

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        count = m.span_drops
        if count is None:
            return
        family = CounterMetricFamily(
            f"{m.prefix}_trace_spans_dropped",
            "Spans dropped, not exported: the export queue was full (the collector is down or "
            "slow).",
        )
        family.add_metric([], count(), created=m.span_drops_since if _created_series() else None)
        yield family


class Metrics:
    """The gateway's metrics in their own registry. See the module docstring for the API.

    Record from the Trio thread (every caller in the gateway does): an update is a plain
    ``+=`` without a lock. ``reload`` and ``ledger_dropped``, which are rare, take one anyway.
    """

    def __init__(self, prefix: str = "onwards", registry: CollectorRegistry | None = None) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"invalid metrics prefix {prefix!r}: use [a-zA-Z_][a-zA-Z0-9_]*")
        self.prefix = prefix
        self.registry = registry if registry is not None else CollectorRegistry()
        self.targets: Targets | None = None
        #: The tracer's count of spans dropped at a full queue, and since when it counts.
        self.span_drops: Callable[[], int] | None = None
        self.span_drops_since = 0.0
        self._lock = threading.Lock()
        families: list[_Family] = []

        def family(
            name: str,
            doc: str,
            kind: str,
            *labels: str,
            bounds: tuple[float, ...] = (),
            counts: _Family | None = None,
        ) -> _Family:
            made = _Family(name, doc, kind, labels, bounds, counts)
            families.append(made)
            return made

        # The order of the families is the order of the exposition.
        p = prefix
        http = ("method", "status", "endpoint")
        http_total = family(
            f"{p}_http_requests_total",
            "HTTP requests served, by method, status and endpoint.",
            "counter",
            *http,
        )
        self._http_duration = family(
            f"{p}_http_requests_duration_seconds",
            "Time from request start to the end of the response body.",
            "histogram",
            *http,
            bounds=DURATION_BUCKETS,
        )
        http_total.counts = self._http_duration  # counted and timed together, always
        self._http_pending = family(
            f"{p}_http_requests_pending",
            "HTTP requests being served right now.",
            "gauge",
            "method",
            "endpoint",
        )
        # Fixed name, no prefix: as onwards.
        self._inflight = family(
            "onwards_requests_inflight", "Requests in flight through the gateway.", "gauge"
        ).cells[()]
        self._upstream_total = family(
            f"{p}_upstream_requests_total",
            "Upstream attempts by alias, provider index and upstream status "
            "(or 'timeout' / 'error' when no status arrived).",
            "counter",
            "alias",
            "provider",
            "status",
        )
        self._upstream_latency = family(
            f"{p}_upstream_request_duration_seconds",
            "Time from sending an upstream request to its response head.",
            "histogram",
            "alias",
            "provider",
            bounds=DURATION_BUCKETS,
        )
        self._ttfb = family(
            f"{p}_upstream_time_to_first_byte_seconds",
            "Streaming responses: time from request start to the first body byte.",
            "histogram",
            "alias",
            "provider",
            bounds=TTFB_BUCKETS,
        )
        self._rejections = family(
            f"{p}_limit_rejections_total",
            "Requests refused by a rate or concurrency limit, by the scope of the limit.",
            "counter",
            "alias",
            "limit",
            "scope",
        )
        self._fallbacks = family(
            f"{p}_fallback_attempts_total",
            "Failed attempts that moved on to another attempt, by why.",
            "counter",
            "alias",
            "provider",
            "reason",
        )
        reloads = family(
            f"{p}_config_reloads_total", "Config reloads by result.", "counter", "result"
        )
        self._reload_ok = reloads.new(("ok",))
        self._reload_failed = reloads.new(("failed",))
        self._last_reload = family(
            f"{p}_config_last_reload_success_timestamp_seconds",
            "Unix time of the last config that was applied (start-up counts).",
            "gauge",
        ).cells[()]
        self._last_reload[0] = time.time()
        self._steps = family(
            f"{p}_loop_steps_total",
            "Multi-step loop steps by alias, kind and outcome.",
            "counter",
            "alias",
            "kind",
            "outcome",
        )
        self._tools = family(
            f"{p}_tool_calls_total",
            "Server-side tool calls by alias and outcome.",
            "counter",
            "alias",
            "outcome",
        )
        tokens = ("alias", "provider", "key")
        self._input_tokens = family(
            f"{p}_input_tokens_total",
            "Input tokens of relayed upstream responses.",
            "counter",
            *tokens,
        )
        self._output_tokens = family(
            f"{p}_output_tokens_total",
            "Output tokens of relayed upstream responses.",
            "counter",
            *tokens,
        )
        self._cached_tokens = family(
            f"{p}_cached_input_tokens_total",
            "Input tokens served from a prompt cache (part of the input tokens).",
            "counter",
            *tokens,
        )
        self._cost = family(
            f"{p}_cost_total",
            "What relayed upstream responses cost at the configured prices (currency units).",
            "counter",
            *tokens,
        )
        self._ledger_dropped = family(
            f"{p}_usage_ledger_dropped_total",
            "Usage ledger rows dropped (its buffer was full, or they could not be written at "
            "shutdown).",
            "counter",
        ).cells[()]
        self.registry.register(_Collector(families))
        self.registry.register(_TableCollector(self))
        self.registry.register(_SpanDropsCollector(self))
        #: One token per (method, endpoint label) pair seen.
        self._tokens: dict[tuple[str, str], HttpToken] = {}
        #: The same tokens by (method, path), for the known methods and endpoint paths.
        self._known_tokens: dict[tuple[str, str], HttpToken] = {}
        # The cells an upstream answer and a body's usage add to, by their arguments, for
        # the table they were labelled under (an alias's label can change on reload): one
        # dict lookup per update instead of labels, tuples and two lookups per family.
        self._cells_table: object = None
        self._upstream_cells: dict[tuple[str, int, int], tuple[list[float], list[float]]] = {}
        # (labels, then the input, output and cached tokens' cells once made)
        self._token_cells: dict[tuple[str, int, str], list[Any]] = {}

    # -- bounding -------------------------------------------------------------------------

    def bind_targets(self, targets: Targets) -> None:
        """Read in-flight gauges from, and bound ``alias`` labels by, this live table."""
        self.targets = targets

    def bind_span_drops(self, count: Callable[[], int]) -> None:
        """Serve ``<p>_trace_spans_dropped_total`` from ``count()`` (a running total)."""
        self.span_drops = count
        self.span_drops_since = time.time()

    def alias_label(self, alias: str | None) -> str:
        """``alias`` if it is configured now (or no table is bound), else ``"unknown"``."""
        if alias is None:
            return UNKNOWN_ALIAS
        targets = self.targets
        if targets is not None and alias not in targets.table.pools:
            return UNKNOWN_ALIAS
        return alias

    # -- HTTP layer -----------------------------------------------------------------------

    def _token(self, method: str, path: str) -> HttpToken:
        token = self._known_tokens.get((method, path))
        if token is not None:  # a known method on a known endpoint: its labels need no work
            return token
        key = (method if method in _METHODS else "OTHER", endpoint_label(path))
        token = self._tokens.get(key)
        if token is None:
            token = self._tokens[key] = HttpToken(*key)
        if method in _METHODS and path in KNOWN_ENDPOINTS:  # bounded: never a client's path
            self._known_tokens[(method, path)] = token
        return token

    def http_started(self, method: str, path: str) -> HttpToken:
        """A request arrived: pending and ``onwards_requests_inflight`` go up."""
        token = self._token(method, path)
        pending = token.pending
        if pending is None:
            pending = token.pending = self._http_pending.new((token.method, token.endpoint))
        pending[0] += 1
        self._inflight[0] += 1
        return token

    def http_finished(self, token: HttpToken, status: int, seconds: float) -> None:
        """The response ended (or the client left): count it and time it."""
        pending = token.pending
        if pending is not None:
            pending[0] -= 1
        self._inflight[0] -= 1
        self._count(token, status, seconds)

    def observe_http(self, method: str, path: str, status: int, seconds: float) -> None:
        """Count and time a finished request that :meth:`http_started` never saw."""
        self._count(self._token(method, path), status, seconds)

    def _count(self, token: HttpToken, status: int, seconds: float) -> None:
        cell = token.statuses.get(status)
        if cell is None:
            key = (token.method, str(status), token.endpoint)
            duration = self._http_duration
            cell = token.statuses[status] = duration.cells.get(key) or duration.new(key)
        cell[0] += seconds
        cell[2 + bisect_left(DURATION_BUCKETS, seconds)] += 1

    # -- upstream, per alias and provider ------------------------------------------------

    def _cell_cache_for_table(self) -> None:
        """Forget the cached cells when the routing table changed (see ``_upstream_cells``)."""
        targets = self.targets
        table = targets.table if targets is not None else None
        if table is not self._cells_table:
            self._cells_table = table
            self._upstream_cells = {}
            self._token_cells = {}

    def upstream_response(self, alias: str, provider: int, status: int, seconds: float) -> None:
        """An attempt got a response head with ``status`` after ``seconds``."""
        targets = self.targets
        if targets is None or targets.table is not self._cells_table:  # (no call when not)
            self._cell_cache_for_table()
        key = (alias, provider, status)
        cells = self._upstream_cells.get(key)
        if cells is None:
            label, index = self.alias_label(alias), str(provider)
            total, latency = self._upstream_total, self._upstream_latency
            count_key, time_key = (label, index, str(status)), (label, index)
            cells = self._upstream_cells[key] = (
                total.cells.get(count_key) or total.new(count_key),
                latency.cells.get(time_key) or latency.new(time_key),
            )
        count, timing = cells
        count[0] += 1
        timing[0] += seconds
        timing[2 + bisect_left(self._upstream_latency.bounds, seconds)] += 1

    def upstream_failure(self, alias: str, provider: int, kind: str) -> None:
        """An attempt got no response head: ``"timeout"`` or ``"error"`` (network, protocol)."""
        kind = _bounded(kind, _UPSTREAM_FAILURES, "error")
        self._upstream_total.inc((self.alias_label(alias), str(provider), kind))

    def first_byte(self, alias: str, provider: int, seconds: float) -> None:
        """A streamed response sent its first body byte ``seconds`` after the request began."""
        self._ttfb.observe((self.alias_label(alias), str(provider)), seconds)

    def rejected(self, alias: str | None, limit: str, scope: str) -> None:
        """A limit refused a request: ``limit`` rate|concurrency|tokens|budget, ``scope``
        pool|key|provider|label."""
        self._rejections.inc(
            (self.alias_label(alias), _bounded(limit, _LIMITS), _bounded(scope, _SCOPES))
        )

    def fallback(self, alias: str, provider: int, reason: str) -> None:
        """An attempt at ``provider`` failed and the pipeline moves on (``reason`` bounded)."""
        self._fallbacks.inc(
            (self.alias_label(alias), str(provider), _bounded(reason, _FALLBACK_REASONS))
        )

    # -- operations and the loop ----------------------------------------------------------

    def reload(self, ok: bool) -> None:
        """A config reload was applied (``ok``) or rejected."""
        with self._lock:
            if ok:
                self._reload_ok[0] += 1
                self._last_reload[0] = time.time()
            else:
                self._reload_failed[0] += 1

    def loop_step(self, alias: str, kind: str, outcome: str) -> None:
        """A multi-step loop step ended (``kind`` model_call|tool_call, ``outcome`` its state)."""
        self._steps.inc(
            (self.alias_label(alias), _bounded(kind, _STEP_KINDS), _bounded(outcome, _OUTCOMES))
        )

    def tool_call(self, alias: str, outcome: str) -> None:
        """A server-side tool call ended with ``outcome`` (completed, failed, ...)."""
        self._tools.inc((self.alias_label(alias), _bounded(outcome, _OUTCOMES)))

    def tokens(self, alias: str, provider: int, key: str, usage: Any) -> None:
        """The token usage (a :class:`~onwards_trio._proxy.usage.Usage`) of one relayed body.

        A counter never goes down: a negative count (an upstream's nonsense) is not added."""
        targets = self.targets
        if targets is None or targets.table is not self._cells_table:  # (no call when not)
            self._cell_cache_for_table()
        cells = self._token_cells.get((alias, provider, key))
        if cells is None:  # a family's cell is made when first added to, as inc() makes it
            labels = (self.alias_label(alias), str(provider), key)
            cells = self._token_cells[(alias, provider, key)] = [labels, None, None, None]
        if usage.input_tokens > 0:
            cell = cells[1] or self._token_cell(cells, 1, self._input_tokens)
            cell[0] += usage.input_tokens
        if usage.output_tokens > 0:
            cell = cells[2] or self._token_cell(cells, 2, self._output_tokens)
            cell[0] += usage.output_tokens
        if usage.cached_tokens > 0:
            cell = cells[3] or self._token_cell(cells, 3, self._cached_tokens)
            cell[0] += usage.cached_tokens

    @staticmethod
    def _token_cell(cells: list[Any], at: int, family: _Family) -> list[float]:
        labels = cells[0]
        cell = cells[at] = family.cells.get(labels) or family.new(labels)
        return cell

    def cost(self, alias: str, provider: int, key: str, micros: int) -> None:
        """What one relayed body cost, in micro-units of the price table's currency."""
        if micros > 0:
            labels = (self.alias_label(alias), str(provider), key)
            self._cost.inc(labels, micros / 1_000_000)

    def ledger_dropped(self, count: int) -> None:
        """``count`` usage ledger rows were lost."""
        if count > 0:
            with self._lock:
                self._ledger_dropped[0] += count

    # -- exposition -----------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition (what ``GET /metrics`` answers)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def install_metrics(gateway: Any, metrics: Metrics) -> Metrics:
    """Attach ``metrics`` to a :class:`~onwards_trio.Gateway` (and its proxy) and bind its table
    and, when tracing is on, its tracer's count of dropped spans.

    Without this call a gateway records nothing and pays nothing.
    """
    metrics.bind_targets(gateway.targets)
    telemetry = getattr(gateway, "telemetry", None)
    if telemetry is not None:
        queue = telemetry.queue
        metrics.bind_span_drops(lambda: queue.dropped)
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
