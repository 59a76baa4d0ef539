"""The config file: onwards 0.27's ``config.json`` schema as attrs classes, plus our additions.

Loading is two steps: cattrs structures the JSON into these frozen classes (errors name the JSON
path of the bad value, e.g. ``$.targets.gpt-4.providers[1].url``), then all three target shapes
(single, legacy list, pool with ``providers``) are normalised into one :class:`PoolSpec`, so the
rest of the gateway only ever sees pools. Unknown keys are ignored, as onwards does, but a key
that looks like a misspelling of a known one is reported in ``Config.warnings``.
"""

import decimal
import difflib
import importlib
import logging
import os
import re
import typing
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import cattrs
import orjson
from cattrs.cols import list_structure_factory
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from onwards_trio._errors import ConfigError

_log = logging.getLogger("onwards_trio.config")

__all__ = [
    "HASHED_KEY",
    "REASONING_EFFORTS",
    "AnthropicSpec",
    "Auth",
    "BackgroundSpec",
    "Backoff",
    "BudgetSpec",
    "ConcurrencyLimitSpec",
    "Config",
    "Fallback",
    "HttpPool",
    "IdempotencySpec",
    "KeyDefinition",
    "LabelBudgetSpec",
    "McpSpec",
    "OpenResponsesSpec",
    "PoolSpec",
    "PriceSpec",
    "ProviderSpec",
    "RateLimitSpec",
    "ReasoningSpec",
    "RoutingAction",
    "RoutingRule",
    "SharedLimitsSpec",
    "StoreSpec",
    "TelemetrySpec",
    "TokenLimitSpec",
    "ToolSpec",
    "UsageSpec",
    "load_config",
    "load_token_counter",
    "parse_config",
]

DEFAULT_BODY_LIMIT = 32 * 1024 * 1024
DEFAULT_SSE_EVENT_LIMIT = 16 * 1024 * 1024


def _positive(_inst: object, attr: "attrs.Attribute[Any]", value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attr.name} must be > 0, got {value}")


def _non_negative(_inst: object, attr: "attrs.Attribute[Any]", value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value}")


@attrs.frozen
class RateLimitSpec:
    """Token bucket: ``requests_per_second`` refill rate (float > 0), ``burst_size`` capacity."""

    requests_per_second: float = attrs.field(validator=_positive)
    burst_size: int | None = attrs.field(default=None, validator=_positive)

    @property
    def capacity(self) -> int:
        if self.burst_size is not None:
            return self.burst_size
        return max(1, int(self.requests_per_second))


@attrs.frozen
class TokenLimitSpec:
    """At most ``tokens`` LLM tokens (input + output) per ``window_secs``, refilled
    continuously. ``default_output_tokens`` is what admission reserves for the answer of a
    request that names no ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``."""

    tokens: int = attrs.field(validator=_positive)
    window_secs: float = attrs.field(default=60.0, validator=_positive)
    default_output_tokens: int = attrs.field(default=1024, validator=_non_negative)


def _price(_inst: object, attr: "attrs.Attribute[Any]", value: float | None) -> None:
    if value is None:
        return
    if not value >= 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value}")
    # Costs are counted in integer micro-units (_proxy/pricing.py): a price finer than a
    # micro-unit per million tokens would be silently rounded, so it is refused instead.
    micros = decimal.Decimal(repr(value)).scaleb(6)
    if micros != micros.to_integral_value():
        raise ValueError(f"{attr.name} has more than 6 decimal places, got {value}")


@attrs.frozen
class PriceSpec:
    """What a million tokens cost, in the operator's currency (docs/governance.md, "Pricing"):
    ``input`` (uncached prompt), ``output`` (answer, reasoning included) and ``cached_input``
    (prompt served from a cache; default: ``input``). At most 6 decimal places each."""

    input: float = attrs.field(validator=_price)
    output: float = attrs.field(validator=_price)
    cached_input: float | None = attrs.field(default=None, validator=_price)


@attrs.frozen
class BudgetSpec:
    """At most ``amount`` (currency units, priced by ``pricing``) spent per ``window``: a UTC
    calendar ``day`` or ``month``, or ``total`` (never resets). ``default_output_tokens`` is
    what admission prices for the answer of a request that names no ``max_tokens``
    (docs/governance.md, "Budgets")."""

    amount: float = attrs.field(validator=_price)
    window: Literal["day", "month", "total"] = "month"
    default_output_tokens: int = attrs.field(default=1024, validator=_non_negative)


def _some_labels(_inst: object, attr: "attrs.Attribute[Any]", value: dict[str, str]) -> None:
    if not value:
        raise ValueError(f"{attr.name} must name at least one label")


@attrs.frozen
class LabelBudgetSpec(BudgetSpec):
    """One budget shared by every key whose ``labels`` include all of ``match_labels``."""

    match_labels: dict[str, str] = attrs.field(kw_only=True, validator=_some_labels)


@attrs.frozen
class ConcurrencyLimitSpec:
    max_concurrent_requests: int = attrs.field(validator=_non_negative)


@attrs.frozen
class KeyDefinition:
    key: str
    rate_limit: RateLimitSpec | None = None
    concurrency_limit: ConcurrencyLimitSpec | None = None
    labels: dict[str, str] = attrs.field(factory=dict)
    token_limit: TokenLimitSpec | None = None
    budget: BudgetSpec | None = None


@attrs.frozen
class Auth:
    global_keys: list[str] = attrs.field(factory=list)
    key_definitions: dict[str, KeyDefinition] = attrs.field(factory=dict)
    label_budgets: list[LabelBudgetSpec] = attrs.field(factory=list)


@attrs.frozen
class HttpPool:
    max_idle_per_host: int = attrs.field(default=100, validator=_non_negative)
    idle_timeout_secs: float = attrs.field(default=90, validator=_non_negative)
    max_connections: int | None = attrs.field(default=None, validator=_positive)


@attrs.frozen
class Backoff:
    """Delay before attempt n+1: ``min(max_ms, initial_ms * factor**n)``, full jitter by default."""

    initial_ms: float = attrs.field(default=100, validator=_non_negative)
    max_ms: float = attrs.field(default=5000, validator=_non_negative)
    factor: float = attrs.field(default=2.0, validator=_positive)
    jitter: Literal["full", "none"] = "full"


@attrs.frozen
class Fallback:
    enabled: bool = False
    on_status: list[int] = attrs.field(factory=list)
    on_rate_limit: bool = False
    with_replacement: bool = False
    max_attempts: int | None = attrs.field(default=None, validator=_positive)
    backoff: Backoff | None = None
    max_total_backoff_ms: float | None = attrs.field(default=None, validator=_non_negative)


def _check_url(_inst: object, _attr: "attrs.Attribute[Any]", value: str) -> None:
    if not (value.startswith("http://") or value.startswith("https://")):
        raise ValueError(f"url must start with http:// or https://, got {value!r}")
    rest = value.split("://", 1)[1]
    if not rest or rest.startswith("/"):
        raise ValueError(f"url has no host: {value!r}")


@attrs.frozen
class ToolSpec:
    """A server-side tool declared in the config (SPEC §3.3).

    ``kind: http`` POSTs the JSON arguments to ``url`` and returns its JSON answer;
    ``kind: agent`` runs a sub-agent loop on the alias named by ``model``;
    ``kind: mcp`` offers every tool of the MCP server at ``url`` (streamable HTTP), named
    ``<name>__<tool>``, limited to ``allowed_tools`` when given; ``protocol`` picks the MCP
    revision (``auto``: the current one, falling back to the 2025 handshake; ``legacy``: the
    handshake only).
    """

    kind: Literal["http", "agent", "mcp"] = "http"
    url: str | None = attrs.field(default=None, validator=attrs.validators.optional(_check_url))
    model: str | None = None
    description: str = ""
    parameters: dict[str, Any] = attrs.field(factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False
    timeout_secs: float = attrs.field(default=30.0, validator=_positive)
    headers: dict[str, str] = attrs.field(factory=dict)
    instructions: str | None = None
    allowed_tools: list[str] | None = None
    protocol: Literal["auto", "legacy"] = "auto"
    # Safe to call twice with the same arguments: a background response resumed after a crash
    # re-runs a call of this tool that was in flight; otherwise that call is recorded failed.
    idempotent: bool = False

    def __attrs_post_init__(self) -> None:
        if self.kind in ("http", "mcp") and not self.url:
            raise ValueError(f"an {self.kind} tool needs a 'url'")
        if self.kind == "agent" and not self.model:
            raise ValueError("an agent tool needs a 'model' (the alias it runs on)")


@attrs.frozen
class McpSpec:
    """MCP servers named by Responses requests (``tools: [{"type": "mcp", ...}]``).

    ``allowed_server_urls`` lists the URL prefixes a request may name (none by default, so a
    client cannot make the gateway reach internal hosts); ``timeout_secs`` bounds connecting,
    listing and each call of those servers; ``tools_ttl_secs`` is how long any server's
    ``tools/list`` is reused (config servers too) unless it says its list changed.
    """

    allowed_server_urls: list[str] = attrs.field(factory=list)
    timeout_secs: float = attrs.field(default=30.0, validator=_positive)
    tools_ttl_secs: float = attrs.field(default=300.0, validator=_non_negative)


@attrs.frozen
class OpenResponsesSpec:
    adapter: bool = False
    tools: dict[str, ToolSpec] = attrs.field(factory=dict)


@attrs.frozen
class AnthropicSpec:
    """``"anthropic": {"adapter": true}``: serve ``/v1/messages`` by translating to Chat
    Completions (without it, ``/v1/messages`` passes through to the upstream)."""

    adapter: bool = False


# Every effort a client may name, in rising order (OpenAI's plus Anthropic's ``max``).
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


@attrs.frozen
class ReasoningSpec:
    """How a provider takes a reasoning effort (docs/config.md, "Reasoning").

    ``style``: ``reasoning_effort`` (the Chat field), ``field`` (a vendor field at the dotted
    path ``field``) or ``thinking_token_budget`` (an absolute token budget, at ``field`` or
    ``thinking_token_budget``). ``efforts`` maps each effort to what is sent (a string, or null
    for nothing; a token count for budgets); an effort it does not list is refused.
    """

    style: Literal["reasoning_effort", "field", "thinking_token_budget"] = "reasoning_effort"
    field: str | None = None
    efforts: dict[str, Any] | None = None

    def __attrs_post_init__(self) -> None:
        if self.style == "field" and not self.field:
            raise ValueError(
                "style 'field' needs a 'field' (a dotted path such as "
                "'chat_template_kwargs.reasoning_effort')"
            )
        if self.field is not None and not all(self.field.split(".")):
            raise ValueError(f"field must be a dotted path of names, got {self.field!r}")
        budget = self.style == "thinking_token_budget"
        for effort, value in (self.efforts or {}).items():
            if effort not in REASONING_EFFORTS:
                raise ValueError(
                    f"unknown effort {effort!r} in efforts "
                    f"(expected one of {', '.join(REASONING_EFFORTS)})"
                )
            if budget and (type(value) is not int or value < 0):
                raise ValueError(f"efforts.{effort} must be a token budget (an integer >= 0)")
            if not budget and value is not None and type(value) is not str:
                raise ValueError(f"efforts.{effort} must be a string, or null to send nothing")


@attrs.frozen
class RoutingAction:
    type: Literal["deny", "redirect"]
    target: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.type == "redirect" and not self.target:
            raise ValueError("a redirect action needs a 'target'")


@attrs.frozen
class RoutingRule:
    action: RoutingAction
    match_labels: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class ProviderSpec:
    url: str = attrs.field(validator=_check_url)
    onwards_key: str | None = None
    onwards_model: str | None = None
    rate_limit: RateLimitSpec | None = None
    concurrency_limit: ConcurrencyLimitSpec | None = None
    upstream_auth_header_name: str | None = None
    upstream_auth_header_prefix: str | None = None
    response_headers: dict[str, str] | None = None
    weight: int = attrs.field(default=1, validator=_non_negative)
    sanitize_response: bool = False
    open_responses: OpenResponsesSpec | None = None
    request_timeout_secs: float | None = attrs.field(default=None, validator=_positive)
    trusted: bool | None = None
    anthropic: AnthropicSpec | None = None
    reasoning: ReasoningSpec | None = None
    # Send this provider the W3C trace context of the upstream attempt (tracing on only).
    propagate_trace_context: bool = False
    pricing: PriceSpec | None = None  # overrides the pool's
    token_limit: TokenLimitSpec | None = None  # this upstream's own tokens per window


@attrs.frozen
class _SingleTarget(ProviderSpec):
    """The single-target shape: a provider plus pool-level ``keys``."""

    keys: list[str] | None = None


@attrs.frozen
class PoolSpec:
    providers: list[ProviderSpec]
    keys: list[str] | None = None
    rate_limit: RateLimitSpec | None = None
    concurrency_limit: ConcurrencyLimitSpec | None = None
    response_headers: dict[str, str] | None = None
    fallback: Fallback | None = None
    strategy: Literal["weighted_random", "priority"] = "weighted_random"
    sanitize_response: bool = False
    open_responses: OpenResponsesSpec | None = None
    trusted: bool = False
    routing_rules: list[RoutingRule] = attrs.field(factory=list)
    anthropic: AnthropicSpec | None = None
    reasoning: ReasoningSpec | None = None  # the default of its providers
    token_limit: TokenLimitSpec | None = None
    pricing: PriceSpec | None = None  # the default of its providers


@attrs.frozen
class StoreSpec:
    """Where responses and loop steps are persisted: ``sqlite`` (default, one file),
    ``memory``, or ``postgres`` (shared by many gateway replicas; ``dsn`` is a libpq
    connection string, ``pool_size`` its connection pool). ``synchronous`` is SQLite's:
    ``full`` (default) flushes the log at each commit, so an answered response survives a
    power loss (group commit shares one flush among the writes that queue); ``normal``
    flushes only at checkpoints (a commit survives a crash of the process, not of the
    machine) — an operator's explicit trade of durability for a little latency."""

    kind: Literal["sqlite", "memory", "postgres"] = "sqlite"
    path: str = "onwards_trio.sqlite3"
    dsn: str | None = None
    pool_size: int = attrs.field(default=8, validator=_positive)
    synchronous: Literal["normal", "full"] = "full"

    def __attrs_post_init__(self) -> None:
        if self.kind == "postgres" and not self.dsn:
            raise ValueError("a postgres store needs a 'dsn'")


@attrs.frozen
class SharedLimitsSpec:
    """Rate and concurrency limits shared by every replica through Redis (docs/shared-limits.md).

    ``timeout_ms`` bounds each Redis call (past it the request falls back to in-process limits);
    ``lease_secs`` is how long a dead replica's concurrency slots can outlive it.
    """

    redis_url: str
    key_prefix: str = "onwards"
    timeout_ms: float = attrs.field(default=50.0, validator=_positive)
    lease_secs: float = attrs.field(default=300.0, validator=_positive)


def _ratio(_inst: object, attr: "attrs.Attribute[Any]", value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{attr.name} must be between 0 and 1, got {value}")


@attrs.frozen
class TelemetrySpec:
    """OpenTelemetry traces and token usage (docs/operations.md, "Telemetry").

    ``enabled`` unset: traces are on when an OTLP endpoint is configured (``endpoint`` or the
    ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` variables). ``endpoint`` is a base URL, as the
    variable is (``/v1/traces`` is added). Fields left unset fall back to the standard
    ``OTEL_*`` variables. ``record_content`` puts prompts, completions and tool arguments and
    results on spans (off: never). ``stream_usage`` asks upstreams for the usage chunk of chat
    streams the client did not ask it for (the client's stream stays as it would have been).
    Read at start-up, but for ``stream_usage`` (read per request): a reload that changes
    anything else logs that it takes effect after a restart.
    """

    enabled: bool | None = None
    endpoint: str | None = None
    service_name: str | None = None
    sample_ratio: float | None = attrs.field(default=None, validator=_ratio)
    record_content: bool = False
    export_timeout_secs: float | None = attrs.field(default=None, validator=_positive)
    max_queue_size: int | None = attrs.field(default=None, validator=_positive)
    stream_usage: bool = False


@attrs.frozen
class BackgroundSpec:
    """Durable background responses (docs/responses.md): each running one is owned by a
    process holding a lease of ``lease_secs`` (renewed every third of it); every
    ``recovery_interval_secs`` a gateway claims responses whose lease expired and resumes them,
    at most ``max_recovery_attempts`` times each before it is ``failed``. ``on_shutdown``:
    ``handover`` releases the responses still running when the gateway stops (another replica
    or the restarted process finishes them), ``cancel`` stores them ``cancelled``. ``recover:
    false`` turns leases and recovery off (a ``memory`` store never recovers)."""

    recover: bool = True
    lease_secs: float = attrs.field(default=15.0, validator=_positive)
    recovery_interval_secs: float = attrs.field(default=1.0, validator=_positive)
    max_recovery_attempts: int = attrs.field(default=3, validator=_non_negative)
    on_shutdown: Literal["handover", "cancel"] = "handover"


@attrs.frozen
class IdempotencySpec:
    """``Idempotency-Key`` on POST /v1/responses, /v1/chat/completions and /v1/messages: a
    result is replayed for ``ttl_secs``; a request still in flight after
    ``in_flight_timeout_secs`` (its process died) no longer blocks a retry."""

    ttl_secs: float = attrs.field(default=86400.0, validator=_positive)
    in_flight_timeout_secs: float = attrs.field(default=600.0, validator=_positive)


@attrs.frozen
class UsageSpec:
    """The usage ledger (docs/governance.md, "Usage ledger"). With ``ledger`` on, every
    proxied request and every model call of a loop leaves one row in the ``store``: rows wait
    in a buffer of ``buffer_rows`` (full: dropped and counted, never waited for) and are
    written by a background task every ``flush_interval_secs``, at most ``batch_rows`` per
    transaction. Rows older than ``retention_days`` are deleted (null: kept for ever)."""

    ledger: bool = False
    retention_days: float | None = attrs.field(default=90.0, validator=_positive)
    buffer_rows: int = attrs.field(default=10_000, validator=_positive)
    batch_rows: int = attrs.field(default=1_000, validator=_positive)
    flush_interval_secs: float = attrs.field(default=1.0, validator=_positive)


@attrs.frozen
class Config:
    targets: dict[str, PoolSpec]
    auth: Auth | None = None
    strict_mode: bool = False
    http_pool: HttpPool | None = None
    tools: dict[str, ToolSpec] = attrs.field(factory=dict)
    body_limit_bytes: int = attrs.field(default=DEFAULT_BODY_LIMIT, validator=_positive)
    # All request bodies being read at once, together (a crowd of slow uploads must not fill
    # memory); past it a body gets a 503 to retry.
    body_buffer_limit_bytes: int = attrs.field(default=8 * DEFAULT_BODY_LIMIT, validator=_positive)
    # The whole read of one request body (a body trickled in slower gets a 408); null: none.
    body_timeout_secs: float | None = attrs.field(default=120.0, validator=_positive)
    # The built-in server treats a client that takes no response bytes this long as gone.
    client_write_timeout_secs: float = attrs.field(default=60.0, validator=_positive)
    # The wait for an upstream's response head when a provider sets no request_timeout_secs
    # (a silent upstream must not hold a client and its permits forever); null: no limit.
    default_request_timeout_secs: float | None = attrs.field(default=300.0, validator=_positive)
    # Pass the client's Forwarded / X-Forwarded-For / X-Real-IP headers upstream: only behind
    # a reverse proxy that sets them (else any client could claim any address).
    trust_forwarded_headers: bool = False
    sse_max_event_bytes: int = attrs.field(default=DEFAULT_SSE_EVENT_LIMIT, validator=_positive)
    store: StoreSpec = attrs.field(factory=StoreSpec)
    shared_limits: SharedLimitsSpec | None = None
    mcp: McpSpec = attrs.field(factory=McpSpec)
    background: BackgroundSpec = attrs.field(factory=BackgroundSpec)
    idempotency: IdempotencySpec = attrs.field(factory=IdempotencySpec)
    telemetry: TelemetrySpec = attrs.field(factory=TelemetrySpec)
    usage: UsageSpec = attrs.field(factory=UsageSpec)
    # "package.module:function" counting a request's prompt tokens for token limits and budgets
    # (docs/governance.md, "Counting the prompt"); null: the body's bytes over four.
    token_counter: str | None = None
    warnings: tuple[str, ...] = attrs.field(default=(), eq=False)


# --- structuring -------------------------------------------------------------------------------


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)

    # The default primitive hooks coerce ("8080" -> 8080, 1 -> "1"); a config file deserves
    # the truth, so each primitive must arrive as itself.
    def strict(tp: type, name: str) -> Any:
        def hook(value: Any, _t: Any) -> Any:
            if tp is float:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"expected a number, got {json_type_name(value)}")
                return float(value)
            if tp is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    if isinstance(value, float) and value.is_integer():
                        return int(value)
                    raise ValueError(f"expected an integer, got {json_type_name(value)}")
                return value
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise ValueError(f"expected {name}, got {json_type_name(value)}")
            return value

        return hook

    conv.register_structure_hook(str, strict(str, "a string"))
    conv.register_structure_hook(bool, strict(bool, "a boolean"))
    conv.register_structure_hook(int, strict(int, "an integer"))
    conv.register_structure_hook(float, strict(float, "a number"))

    def any_hook(value: Any, _t: Any) -> Any:
        return value

    conv.register_structure_hook(Any, any_hook)

    def list_factory(tp: Any, converter: cattrs.Converter) -> Any:
        inner = list_structure_factory(tp, converter)

        def hook(value: Any, t: Any) -> Any:
            if not isinstance(value, list):  # a string is iterable, but not a list of keys
                raise ValueError(f"expected an array, got {json_type_name(value)}")
            return inner(value, t)

        return hook

    def is_list(t: Any) -> bool:
        return typing.get_origin(t) is list

    conv.register_structure_hook_factory(is_list, list_factory)
    return conv


def json_type_name(value: Any) -> str:
    """How an error message names a JSON value's type ("a string", "an array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_CONVERTER = _make_converter()


def _format_errors(exc: BaseException, path: str) -> list[str]:
    """Flatten a cattrs exception tree into ``message @ $.path`` lines.

    cattrs' own formatter hides validator messages ("invalid value") and calls unknown literals
    "unknown error"; an operator needs the reason, so we render the leaves ourselves.
    """
    lines: list[str] = []
    if isinstance(exc, ClassValidationError | IterableValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            if isinstance(exc, IterableValidationError):
                index = getattr(note, "index", None)
                sub_path = (
                    f"{path}[{index}]" if isinstance(index, int) else _join_key(path, str(index))
                )
            else:
                sub_path = _join_key(path, str(getattr(note, "name", "?")))
            lines.extend(_format_errors(sub, sub_path))
        for leaf in without:
            lines.extend(_format_errors(leaf, path))
        return lines
    if isinstance(exc, BaseExceptionGroup):
        for member in exc.exceptions:
            lines.extend(_format_errors(member, path))
        return lines
    if isinstance(exc, KeyError):
        return [f"required field missing @ {path}"]
    if isinstance(exc, ForbiddenExtraKeysError):
        return [f"unknown keys {sorted(exc.extra_fields)} @ {path}"]
    msg = str(exc)
    if "Literal" in msg or "not in literal" in msg:
        choices = msg.split("Literal[", 1)[-1].rstrip("]")
        return [f"must be one of {choices} @ {path}"]
    if isinstance(exc, TypeError) and "missing" in msg and "required" in msg:
        return [f"{msg} @ {path}"]
    return [f"{msg} @ {path}"]


def _join_key(path: str, key: str) -> str:
    if key.replace("_", "").replace("-", "").isalnum():
        return f"{path}.{key}"
    return f"{path}[{orjson.dumps(key).decode()}]"


def _structure(data: Any, tp: Any, path: str) -> Any:
    try:
        return _CONVERTER.structure(data, tp)
    except Exception as exc:
        raise ConfigError(_format_errors(exc, path) or [f"{exc} @ {path}"]) from None


def _known_keys_warnings(cls: type, data: Any, path: str, out: list[str]) -> None:
    """Warn about keys that are unknown here but close to a known one (likely typos)."""
    if not isinstance(data, Mapping) or not attrs.has(cls):
        return
    hints = typing.get_type_hints(cls)
    known = {f.name for f in attrs.fields(cls) if not f.name.startswith("_")}
    known.discard("warnings")
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.8)
            if close:
                out.append(f"unknown key {key!r} @ {path} (did you mean {close[0]!r}?)")
            continue
        _walk_type(hints.get(key), value, _join_key(path, key), out)


def _walk_type(tp: Any, value: Any, path: str, out: list[str]) -> None:
    if tp is None:
        return
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            if arg is not type(None) and attrs.has(arg):
                _known_keys_warnings(arg, value, path, out)
        return
    if origin is list and args and isinstance(value, list):
        for i, item in enumerate(value):
            _walk_type(args[0], item, f"{path}[{i}]", out)
        return
    if origin is dict and len(args) == 2 and isinstance(value, Mapping):
        for k, item in value.items():
            _walk_type(args[1], item, _join_key(path, str(k)), out)
        return
    if isinstance(tp, type) and attrs.has(tp):
        _known_keys_warnings(tp, value, path, out)


# Pool-level keys the single-target and list forms do not have (as in onwards): written there,
# they are ignored, which a user would not guess, so each gets a warning.
_POOL_ONLY = ("fallback", "routing_rules", "strategy")


def _pool_only_warnings(raw: Any, path: str, out: list[str]) -> None:
    if isinstance(raw, Mapping):
        for key in _POOL_ONLY:
            if key in raw:
                out.append(
                    f"{key!r} is a pool setting, ignored in the single-target form "
                    f'(list the provider under "providers" to use it) @ {path}'
                )


def _target_to_pool(alias: str, raw: Any, warnings: list[str]) -> PoolSpec:
    path = _join_key("$.targets", alias)
    if isinstance(raw, list):
        if not raw:
            raise ConfigError([f"a target list must not be empty @ {path}"])
        singles: list[_SingleTarget] = []
        for i, item in enumerate(raw):
            _known_keys_warnings(_SingleTarget, item, f"{path}[{i}]", warnings)
            _pool_only_warnings(item, f"{path}[{i}]", warnings)
            singles.append(_structure(item, _SingleTarget, f"{path}[{i}]"))
        trusted = {bool(s.trusted) for s in singles}
        if len(trusted) > 1:
            raise ConfigError(
                [f"all providers of a target list must have the same 'trusted' value @ {path}"]
            )
        return PoolSpec(
            providers=[_provider_of(s) for s in singles],
            keys=singles[0].keys,
            trusted=trusted.pop(),
        )
    if isinstance(raw, Mapping) and "providers" in raw:
        _known_keys_warnings(PoolSpec, raw, path, warnings)
        pool: PoolSpec = _structure(raw, PoolSpec, path)
        return pool
    if isinstance(raw, Mapping):
        _known_keys_warnings(_SingleTarget, raw, path, warnings)
        _pool_only_warnings(raw, path, warnings)
        single: _SingleTarget = _structure(raw, _SingleTarget, path)
        return PoolSpec(
            providers=[_provider_of(single, keep_trust=False)],
            keys=single.keys,
            sanitize_response=single.sanitize_response,
            trusted=bool(single.trusted),
        )
    raise ConfigError([f"expected an object or an array, got {json_type_name(raw)} @ {path}"])


def _provider_of(single: _SingleTarget, keep_trust: bool = True) -> ProviderSpec:
    fields = {f.name: getattr(single, f.name) for f in attrs.fields(ProviderSpec)}
    if not keep_trust:
        fields["trusted"] = None  # a single target's `trusted` is pool-level
    return ProviderSpec(**fields)


def parse_config(data: bytes | str | Mapping[str, Any]) -> Config:
    """Validate a config document (JSON bytes/str or an already-parsed mapping)."""
    if isinstance(data, bytes | str):
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ConfigError([f"invalid JSON: {exc}"]) from None
    else:
        raw = data
    if not isinstance(raw, Mapping):
        raise ConfigError([f"expected an object, got {json_type_name(raw)} @ $"])
    warnings: list[str] = []
    targets_raw = raw.get("targets")
    if not isinstance(targets_raw, Mapping):
        raise ConfigError(
            ["required field missing @ $.targets"]
            if targets_raw is None
            else [f"expected an object, got {json_type_name(targets_raw)} @ $.targets"]
        )
    problems: list[str] = []
    targets: dict[str, PoolSpec] = {}
    for alias, spec in targets_raw.items():
        try:
            targets[alias] = _target_to_pool(alias, spec, warnings)
        except ConfigError as exc:
            problems.extend(exc.problems)
    rest = {k: v for k, v in raw.items() if k != "targets"}
    rest["targets"] = {}
    _known_keys_warnings(Config, rest, "$", warnings)
    try:
        config: Config = _structure(rest, Config, "$")
    except ConfigError as exc:
        problems.extend(exc.problems)
        raise ConfigError(problems) from None
    problems += _malformed_hashes(config, targets)
    if config.token_counter is not None:
        try:
            load_token_counter(config.token_counter)
        except ValueError as exc:
            problems.append(f"{exc} @ $.token_counter")
    if problems:
        raise ConfigError(problems)
    for alias, pool in targets.items():
        for i, rule in enumerate(pool.routing_rules):
            if rule.action.type == "redirect" and rule.action.target not in targets_raw:
                # Not fatal (onwards answers 502 at request time), but worth telling.
                warnings.append(
                    f"redirect target {rule.action.target!r} is not a configured alias "
                    f"@ {_join_key('$.targets', alias)}.routing_rules[{i}]"
                )
    for path, name, tool in _every_tool(config.tools, targets, targets_raw):
        if tool.kind == "agent" and tool.model not in targets:
            # Not fatal (a call to it fails at request time, as a redirect does), but worth telling.
            warnings.append(
                f"agent tool {name!r} runs on {tool.model!r}, which is not a configured alias "
                f"@ {_join_key(path, name)}.model"
            )
    warnings += _short_keys(targets, targets_raw)
    return attrs.evolve(config, targets=targets, warnings=tuple(warnings))


def load_token_counter(path: str) -> typing.Callable[[Any], object]:
    """The callable a ``token_counter`` path (``"package.module:function"``) names; a
    :class:`ValueError` naming the path when it cannot be imported or is not callable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"token_counter {path!r} is not 'package.module:function'")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            found = getattr(found, part)
    except Exception as exc:  # an import runs arbitrary code: any failure is a config error
        raise ValueError(
            f"token_counter {path!r} cannot be imported ({type(exc).__name__}: {exc})"
        ) from None
    if not callable(found):
        raise ValueError(f"token_counter {path!r} is not callable")
    return typing.cast("typing.Callable[[Any], object]", found)


# A client key may be configured as its hash (``sha256:`` + 64 hex digits, see _proxy/auth).
HASHED_KEY = re.compile(r"sha256:[0-9a-fA-F]{64}")


def _malformed_hashes(config: Config, targets: Mapping[str, PoolSpec]) -> list[str]:
    """Keys that start like a hash but are not one: a typo there would otherwise turn a hash
    into a plain-text key nobody holds, and lock every client out without a word."""
    found: list[tuple[str, str]] = []
    if config.auth is not None:
        found += [(k, f"$.auth.global_keys[{i}]") for i, k in enumerate(config.auth.global_keys)]
        found += [
            (d.key, f"{_join_key('$.auth.key_definitions', name)}.key")
            for name, d in config.auth.key_definitions.items()
        ]
    for alias, pool in targets.items():
        found += [
            (k, f"{_join_key('$.targets', alias)}.keys[{i}]") for i, k in enumerate(pool.keys or ())
        ]
    return [
        f"a hashed key is 'sha256:' and 64 hex digits (`onwards-trio hash-key` prints one) @ {path}"
        for key, path in found
        if key.lower().startswith("sha256:") and HASHED_KEY.fullmatch(key) is None
    ]


def _every_tool(
    tools: Mapping[str, ToolSpec], targets: Mapping[str, PoolSpec], raw: Mapping[str, Any]
) -> list[tuple[str, str, ToolSpec]]:
    """Every tool the config declares, with the JSON path of the ``tools`` object holding it."""
    out = [("$.tools", name, tool) for name, tool in tools.items()]
    for alias, pool in targets.items():
        base = _join_key("$.targets", alias)
        shape = raw[alias]
        if pool.open_responses is not None:
            where = f"{base}.open_responses.tools"
            out += [(where, n, t) for n, t in pool.open_responses.tools.items()]
        for i, provider in enumerate(pool.providers):
            if provider.open_responses is not None:
                where = _provider_path(base, shape, i) + ".open_responses.tools"
                out += [(where, n, t) for n, t in provider.open_responses.tools.items()]
    return out


def _provider_path(base: str, shape: Any, i: int) -> str:
    """The JSON path of provider ``i`` of the target at ``base`` written as ``shape``."""
    if isinstance(shape, list):
        return f"{base}[{i}]"
    if "providers" in shape:
        return f"{base}.providers[{i}]"
    return base  # the single-target shape: the provider is the target


# An upstream key is masked in relayed bodies only from this length: a shorter one (a local
# server's "none" or "EMPTY") would star innocent text in every answer, and guards nothing.
MIN_MASKED_KEY_LENGTH = 8


def _short_keys(targets: Mapping[str, PoolSpec], raw: Mapping[str, Any]) -> list[str]:
    return [
        f"onwards_key is shorter than {MIN_MASKED_KEY_LENGTH} characters, so it is not masked "
        f"where an upstream body quotes it @ "
        f"{_provider_path(_join_key('$.targets', alias), raw[alias], i)}.onwards_key"
        for alias, pool in targets.items()
        for i, provider in enumerate(pool.providers)
        if provider.onwards_key is not None and len(provider.onwards_key) < MIN_MASKED_KEY_LENGTH
    ]


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; :class:`ConfigError` lists every problem found, and
    each of ``Config.warnings`` is logged (``onwards_trio.config`` logger, level warning)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError([f"Config file '{os.fspath(path)}' does not exist"]) from None
    except OSError as exc:
        raise ConfigError(
            [f"cannot read config file '{os.fspath(path)}': {exc.strerror}"]
        ) from None
    config = parse_config(data)
    for warning in config.warnings:
        # Logged here, so an embedding program sees a misspelt key without reading
        # ``config.warnings`` (parse_config stays silent: it may be a probe, not a load).
        _log.warning("config %s: %s", os.fspath(path), warning)
    return config
