"""Logging: structured lines, one access line per request, and a guard that keeps secrets out.

What is logged (SPEC §2.8): never a key, a prompt or a completion -- lengths only. The access
line carries method, path (without the query string, which may hold credentials), alias,
provider index, status, duration, byte counts and token usage. Two layers keep it that way:

1. The gateway only ever passes lengths and labels to the logger (:func:`log_request`).
2. :class:`RedactionFilter`, installed on the handler by :func:`configure_logging`, masks
   anything that still looks like a credential in any record from any logger (``Bearer ...``,
   ``sk-...``-style keys, ``user:password@`` in URLs, ``api_key=...`` pairs) plus the exact keys
   the current config holds (:meth:`RedactionFilter.add_secrets`).

Formats: ``text`` (``ts level logger message``, where the access line is ``key=value`` pairs) or
``json`` (one object per line, the access fields as top-level keys). Level and format come from
the arguments, else ``ONWARDS_LOG`` / ``ONWARDS_LOG_FORMAT``, else ``info`` / ``text``.

Observer seam: every finished request is a :class:`RequestRecord` handed to
:func:`log_request`, which logs it and then calls each function in :data:`request_observers`
(traces have their own, richer hooks: ``_ops/telemetry.py``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import IO, TYPE_CHECKING, Any, Final

import attrs
import orjson

from onwards_trio._ops.access import (
    AccessWriter,
    LaterUsage,
    UsageParts,
    WholeBodies,
    bounded_alias,
    clean_path,
    logfmt,
)

if TYPE_CHECKING:
    from onwards_trio._ops.metrics import Metrics
    from onwards_trio._proxy.usage import Usage
    from onwards_trio._transport.asgi import Send

__all__ = [
    "ACCESS_LOGGER",
    "Exchange",
    "JsonFormatter",
    "RedactionFilter",
    "RequestRecord",
    "SecretSet",
    "TextFormatter",
    "access_logged",
    "access_writer",
    "add_usage",
    "begin_exchange",
    "collect_secrets",
    "configure_logging",
    "current_status",
    "defer_usage",
    "direct_writer",
    "finish_exchange",
    "log_request",
    "logfmt",
    "note_request",
    "protect",
    "redact",
    "request_observers",
]

ACCESS_LOGGER: Final = "onwards_trio.access"
_access = logging.getLogger(ACCESS_LOGGER)
MASK: Final = "***"
_MIN_SECRET: Final = 6  # shorter "secrets" would mask ordinary words

# Credential shapes that must never reach a log, whatever the logger.
_PATTERNS: Final = (
    # Authorization-style values: "Bearer <token>", "Basic <b64>"
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + MASK),
    # provider key shapes: sk-..., sk-proj-..., sk-ant-..., pk-..., rk-..., xai-..., gsk_...
    (re.compile(r"\b(?:sk|pk|rk|xai|gsk)[-_][A-Za-z0-9_-]{6,}"), MASK),
    # credentials in URLs: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), r"\1" + MASK + "@"),
    # key=value / "key": "value" pairs with a credential-ish name
    (
        re.compile(
            r"(?i)(\b(?:api[_-]?key|onwards_key|access[_-]?token|secret|password|x-api-key|"
            r"authorization)\b[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&}]+"
        ),
        r"\1" + MASK,
    ),
)

_SECRET_FIELDS: Final = frozenset(
    {"onwards_key", "key", "api_key", "global_keys", "keys", "authorization", "x-api-key"}
)


# Substrings without which no pattern above can match: most lines contain none, and one
# search costs far less than four substitutions.
_TRIGGER: Final = re.compile(
    r"bearer|basic|[sprk]k[-_]|xai|gsk|@|key|token|secret|password|authorization", re.IGNORECASE
)
# Keys are matched as whole tokens between these characters (a set lookup per token, so a
# config with thousands of keys costs no more per line than one with three).
_DELIMITERS: Final = re.compile(r"[\s\"'=:,;&/?@()\[\]{}<>]+")


class SecretSet:
    """Exact strings to mask, prepared for a fast check per log line."""

    __slots__ = ("others", "tokens")

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        usable = {s for s in secrets if len(s) >= _MIN_SECRET}
        self.tokens: frozenset[str] = frozenset(s for s in usable if not _DELIMITERS.search(s))
        # Secrets that contain a delimiter cannot be found by token; check them by substring,
        # longest first so that a secret containing another is masked whole.
        self.others: tuple[str, ...] = tuple(sorted(usable - self.tokens, key=len, reverse=True))

    def __bool__(self) -> bool:
        return bool(self.tokens or self.others)

    def union(self, secrets: Iterable[str]) -> SecretSet:
        return SecretSet([*self.tokens, *self.others, *secrets])

    def mask(self, text: str) -> str:
        for secret in self.others:
            if secret in text:
                text = text.replace(secret, MASK)
        if self.tokens:
            found = {t for t in _DELIMITERS.split(text) if t in self.tokens}
            for secret in sorted(found, key=len, reverse=True):
                text = text.replace(secret, MASK)
        return text


def redact(text: str, secrets: Iterable[str] | SecretSet = ()) -> str:
    """``text`` with credential shapes and the given exact ``secrets`` masked."""
    prepared = secrets if isinstance(secrets, SecretSet) else SecretSet(secrets)
    if prepared:
        text = prepared.mask(text)
    if _TRIGGER.search(text):
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
    return text


def collect_secrets(data: bytes | str | Any) -> set[str]:
    """Every string in a config document under a key that holds credentials.

    Takes raw JSON (unparseable JSON yields nothing) or a parsed mapping. Also collects the
    values of any ``headers`` mapping (tool endpoints often carry an ``Authorization`` there).
    """
    if isinstance(data, bytes | str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError:
            return set()
    out: set[str] = set()

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, str):
            if secret:
                out.add(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                name = k.lower() if isinstance(k, str) else ""
                walk(v, secret or name in _SECRET_FIELDS or name == "headers")
        elif isinstance(value, list):
            for v in value:
                walk(v, secret)

    walk(data, False)
    return out


_MEMO_SIZE: Final = 1024  # strings RedactionFilter.clean remembers (paths and aliases, bounded)


class RedactionFilter(logging.Filter):
    """Masks credentials in every record that passes (message, arguments and traceback).

    Put it on *handlers* (as :func:`configure_logging` does): a filter on a logger does not see
    records from its child loggers.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = SecretSet(secrets)
        self._cleaned: dict[str, str] = {}  # clean()'s answers: access lines repeat paths
        #: Changes with every :meth:`add_secrets`: whoever keeps cleaned text builds it again.
        self.generation = 0

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Also mask these exact strings (e.g. every key of a config that was just loaded)."""
        self._secrets = self._secrets.union(secrets)
        self._cleaned = {}
        self.generation += 1

    def clean(self, text: str) -> str:
        """``text`` as this filter would let it through (remembered: the access line asks
        about the same few paths and aliases for every request)."""
        cleaned = self._cleaned.get(text)
        if cleaned is None:
            cleaned = redact(text, self._secrets)
            if len(self._cleaned) >= _MEMO_SIZE:
                self._cleaned = {}  # many distinct strings: start over rather than grow
            self._cleaned[text] = cleaned
        return cleaned

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, self._secrets)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self._secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self._secrets)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {
                k: redact(v, self._secrets) if isinstance(v, str) else v for k, v in fields.items()
            }
        return True


class TextFormatter(logging.Formatter):
    """``2026-11-25T13:40:00.123Z INFO onwards_trio.access method=POST path=/v1/... status=200``."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; an access record's fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": TextFormatter().formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


_LEVELS: Final = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}


def parse_level(value: str | None) -> int:
    """``debug``/``info``/... (case-insensitive; a ``RUST_LOG``-like ``a=debug,info`` takes the
    last bare level). Raises ``ValueError`` for anything else."""
    text = (value or "info").strip().lower()
    bare = [part for part in text.split(",") if part and "=" not in part]
    level = bare[-1] if bare else "info"
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {value!r} (use debug, info, warning or error)")
    return _LEVELS[level]


_installed: logging.Handler | None = None
_guard: RedactionFilter | None = None
_protected: set[str] = set()  # every string protect() was given, for the next guard too
_writer: AccessWriter | None = None


def access_writer() -> AccessWriter | None:
    """The buffered access-log writer of the handler :func:`configure_logging` installed; the
    gateway runs its task in the service nursery (``None``: access lines go through logging)."""
    return _writer


def configure_logging(
    level: str | None = None,
    *,
    fmt: str | None = None,
    stream: IO[str] | None = None,
    secrets: Iterable[str] = (),
) -> RedactionFilter:
    """Set up the ``onwards_trio`` loggers: one handler, a format, the redaction guard.

    ``level`` falls back to ``ONWARDS_LOG`` (default ``info``), ``fmt`` to ``ONWARDS_LOG_FORMAT``
    (``text`` or ``json``). Calling it again replaces the previous handler. Returns the filter
    so the caller can add the config's keys (:meth:`RedactionFilter.add_secrets`).
    """
    global _installed, _guard, _writer
    numeric = parse_level(level if level is not None else os.environ.get("ONWARDS_LOG"))
    kind = (fmt or os.environ.get("ONWARDS_LOG_FORMAT") or "text").strip().lower()
    if kind not in ("text", "json"):
        raise ValueError(f"unknown log format {kind!r} (use text or json)")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if kind == "json" else TextFormatter())
    guard = RedactionFilter([*_protected, *secrets])
    handler.addFilter(guard)
    root = logging.getLogger("onwards_trio")
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(numeric)
    root.propagate = False
    _installed = handler
    _guard = guard
    _writer = AccessWriter(handler, json=kind == "json", guard=guard)
    for name in (
        "hypercorn.error",
        "hypercorn.access",
        "httpx",
        "httpcore",
        "httpx2",
        "httpcore2",
        "mcp",
    ):
        # Their debug output includes request headers (keys); keep them quiet unless asked.
        # (httpx2/httpcore2/mcp: the MCP SDK, which sends MCP servers' credentials.)
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    return guard


@attrs.define(slots=True)
class RequestRecord:
    """One finished request, as the access log and observers see it (no bodies, no keys)."""

    method: str
    path: str
    status: int
    duration: float  # seconds
    alias: str | None = None
    provider: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    attempts: int | None = None
    stream: bool | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None

    def fields(self) -> dict[str, Any]:
        """The access-line fields in order; the optional ones only when known."""
        out: dict[str, Any] = {
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_ms": round(self.duration * 1000.0, 3),
        }
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


_OPTIONAL_FIELDS: Final = (
    "alias",
    "provider",
    "bytes_in",
    "bytes_out",
    "attempts",
    "stream",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
)


#: Called with every finished :class:`RequestRecord` (the OpenTelemetry seam). An observer
#: must be quick and must not raise; one that raises is logged and skipped.
request_observers: list[Callable[[RequestRecord], None]] = []


def access_logged() -> bool:
    """Whether a request's access-line fields are read: access lines are written, or request
    observers get them (then the token usage on them is worth reading)."""
    return bool(request_observers) or _access.isEnabledFor(logging.INFO)


def log_request(record: RequestRecord) -> None:
    """Log one access line at info (if enabled) and hand the record to the observers."""
    # Observers get the same bounded, query-free values as the log, whatever the log level.
    record.path = clean_path(record.path)
    if record.alias is not None:
        record.alias = bounded_alias(record.alias)
    if _access.isEnabledFor(logging.INFO):
        writer = _writer
        if writer is not None and writer.running:
            writer.push(record)  # formatted there, written in batches by its task
        else:
            fields = record.fields()
            message = " ".join(f"{k}={logfmt(v)}" for k, v in fields.items())
            _access.info(message, extra={"fields": fields})
    for observer in request_observers:
        try:
            observer(record)
        except Exception:
            logging.getLogger("onwards_trio").exception("a request observer failed")


# -- per-request observation (the seam the gateway calls) ---------------------------------------

_exchange: ContextVar[Exchange | None] = ContextVar("onwards_trio_exchange", default=None)


class Exchange:
    """One HTTP request as metrics and the access log see it.

    :func:`begin_exchange` makes it current (a context variable: each ASGI request runs in its
    own Trio task, so no request sees another's) and wraps ``send`` to learn the status, count
    body bytes and stamp the first body byte. :func:`note_request` attaches the proxy's
    :class:`~onwards_trio.ProxyRequest` (alias, provider index, attempts, body length);
    :func:`finish_exchange` records and logs it. Nothing here sees a header value or a body.
    """

    __slots__ = (
        "_reset",
        "bytes_out",
        "first_byte",
        "method",
        "metrics",
        "path",
        "request",
        "send",
        "sent_status",
        "started",
        "stream",
        "token",
        "usage_parts",
    )

    def __init__(self, metrics: Metrics | None, method: str, path: str, started: float) -> None:
        self.metrics = metrics
        self.method = method
        self.path = path
        self.started = started
        self.token = metrics.http_started(method, path) if metrics is not None else None
        self.bytes_out = 0
        self.first_byte: float | None = None
        self.stream = False
        self.sent_status: int | None = None
        self.request: Any = None
        # Every upstream body's usage relayed for it (to be summed): a Usage, a body whose
        # usage is read later (LaterUsage), or a list of them. Read as they are by the
        # access line and the request's span, which sum them off the request's path.
        self.usage_parts: UsageParts = None
        self._reset: Any = None
        self.send: Send | None = None  # the counting send (wrap_send), until finished

    @property
    def usage(self) -> Usage | None:
        """The token usage of every upstream body relayed for this request, summed."""
        return total_usage(self.usage_parts)  # type: ignore[return-value]  # a sum of Usage

    def wrap_send(self, send: Send) -> Send:
        # Not a coroutine: it returns the server's send, awaited by the caller (one coroutine
        # less per message).
        def counted(message: Any) -> Awaitable[None]:
            kind = message["type"]
            if kind == "http.response.body":
                size = len(message.get("body", b""))
                if size:
                    if self.first_byte is None:
                        self.first_byte = time.perf_counter()
                    self.bytes_out += size
            elif kind == "http.response.start":
                self.sent_status = message["status"]
                for k, v in message.get("headers", ()):
                    # find: ``in`` first tries an int (and builds its TypeError)
                    if k.lower() == b"content-type" and v.lower().find(b"text/event-stream") >= 0:
                        self.stream = True
            return send(message)

        self.send = counted
        return counted

    def finish(self, status: int, seconds: float) -> None:
        # What went on the wire wins: a handler that fails after its head was sent still
        # answered with that status (the client saw a truncated body, not a 500).
        if self.sent_status is not None:
            status = self.sent_status
        metrics = self.metrics
        request = self.request
        alias = provider = attempts = bytes_in = None
        if request is not None:
            alias, provider = request.alias, request.provider_index
            attempts = request.attempts or None
            bytes_in = len(request.body)
        if metrics is not None:
            if self.token is not None:
                metrics.http_finished(self.token, status, seconds)
            else:
                metrics.observe_http(self.method, self.path, status, seconds)
            if self.stream and self.first_byte is not None and alias and provider is not None:
                metrics.first_byte(alias, provider, self.first_byte - self.started)
        if not request_observers and not _access.isEnabledFor(logging.INFO):
            return  # nobody reads the line: no fields, no record
        fields = (
            self.method,
            self.path,
            status,
            seconds,
            alias,
            provider,
            bytes_in,
            self.bytes_out if self._reset is not None else None,
            attempts,
            self.stream or None,
        )
        if not request_observers:
            writer = _writer
            if writer is not None and writer.running:
                # Only the writer reads it: the fields as one tuple, the usage as it was
                # relayed (read with the batch), bounded and formatted with its batch (no
                # record, no per-request formatting).
                writer.add(fields + (self.usage_parts, time.time()))  # noqa: RUF005 (one C concat)
                return
        usage = total_usage(self.usage_parts)
        tokens_in = tokens_out = cached = None
        if usage is not None:
            tokens_in, tokens_out, cached = usage[0], usage[1], usage[2]
        log_request(RequestRecord(*fields, tokens_in, tokens_out, cached))


def begin_exchange(
    metrics: Metrics | None, method: str, path: str, started: float, send: Send
) -> Send:
    """Start observing the current request; returns the ``send`` to use from now on."""
    exchange = Exchange(metrics, method, path, started)
    exchange._reset = _exchange.set(exchange)
    return exchange.wrap_send(send)


def note_request(request: Any) -> None:
    """Attach the proxy's request (alias, provider index, attempts, body length) to the log."""
    exchange = _exchange.get()
    if exchange is not None:
        exchange.request = request


def add_usage(usage: Usage) -> None:
    """Add an upstream body's token usage to the current request's access line (a
    ``/v1/responses`` request sums the usage of every model call it made)."""
    exchange = _exchange.get()
    if exchange is not None:
        had = exchange.usage_parts
        if isinstance(had, tuple):
            exchange.usage_parts = had + usage  # two Usage (a tuple here is one): their sum
        else:
            _add_part(exchange, usage)


def defer_usage(body: LaterUsage | bytes) -> None:
    """Add an upstream body whose usage is read later to the current request's access line
    (only the line wants it: its writer reads it with the rest of its batch). Not once the
    request is finished (``send`` is cleared then): a task it started that runs on (a
    background response's model calls) must not keep bodies for a line already written."""
    exchange = _exchange.get()
    if exchange is not None and exchange.send is not None:
        _add_part(exchange, body)


def _add_part(exchange: Exchange, part: Usage | LaterUsage | bytes) -> None:
    """One more part of the request's usage (the first alone, then a list of them)."""
    had = exchange.usage_parts
    if had is None:
        exchange.usage_parts = part
    elif type(had) is list:
        exchange.usage_parts = [*had, part]  # a new list: a queued line keeps the old one
    else:
        exchange.usage_parts = [had, part]  # type: ignore[list-item]


def total_usage(usage: UsageParts) -> tuple[int, ...] | None:
    """The sum of a request's usage parts, each read now if it was left for later (the
    slow path: observers, spans, no running writer)."""
    if usage is None:
        return None
    if type(usage) is not list:
        return _read_one(usage)  # type: ignore[arg-type,no-any-return]
    total: Any = None
    for part in usage:
        got = _read_one(part)
        if got is not None:
            total = got if total is None else total + got
    return total  # type: ignore[no-any-return]


def _read_one(part: tuple[int, ...] | LaterUsage | bytes) -> Any:
    """One usage part's figures (a ``Usage``), read now if it was left for later."""
    if isinstance(part, LaterUsage):
        return part.usage
    if type(part) is bytes:
        return WholeBodies.usage(part)
    return part


def direct_writer(
    send: Send, write_more: Callable[[bytes], Awaitable[None]]
) -> Callable[[bytes], Awaitable[None]] | None:
    """For a stream relayed to ``send`` whose head is sent: a writer of body pieces through
    ``write_more`` (a server's extension that takes the piece without an ASGI message), still
    counted here. ``None`` unless ``send`` is the current request's own counting send: a
    wrapper in between (a recorder, a translator) must see every byte."""
    exchange = _exchange.get()
    if exchange is None or exchange.send is not send:
        return None

    async def write(body: bytes) -> None:
        if exchange.first_byte is None:
            exchange.first_byte = time.perf_counter()
        exchange.bytes_out += len(body)
        await write_more(body)

    return write


def current_status() -> int | None:
    """The status already sent for the current request (``None``: no response head yet)."""
    exchange = _exchange.get()
    return exchange.sent_status if exchange is not None else None


def finish_exchange(
    metrics: Metrics | None, method: str, path: str, status: int, seconds: float
) -> Exchange:
    """Record and log the current request (works whether or not it was begun); return it."""
    exchange = _exchange.get()
    if exchange is None:
        exchange = Exchange(None, method, path, time.perf_counter() - seconds)
        exchange.metrics = metrics
    else:
        if exchange._reset is not None:
            _exchange.reset(exchange._reset)
        exchange.send = None  # it refers back to the exchange: no cycle keeps the request alive
    exchange.finish(status, seconds)
    return exchange


def protect(secrets: Iterable[str]) -> None:
    """Mask these exact strings in every log line from now on (e.g. a config's keys,
    :func:`~onwards_trio.config_secrets`), also in a handler :func:`configure_logging` installs
    later: the order of the two calls must not decide whether a key leaks."""
    secrets = [s for s in secrets if s]
    _protected.update(secrets)
    if _guard is not None:
        _guard.add_secrets(secrets)
