"""The access log off the hot path: records into a bounded buffer, formatted and written in
batches by a Trio task.

One access line per request through ``logging`` cost about a quarter of the gateway's CPU per
proxied request (a ``LogRecord``, the filter chain, a formatter and one ``write`` + ``flush``
system call per line). Here a request pays for appending its record and the time to a list. A
task in the gateway's service nursery formats whatever has accumulated (the redaction guard
runs there; formatting a batch in one loop costs a fraction of formatting each line between
two requests, when that code is cold) and writes it as one ``write``, under the logging
handler's lock so lines from other loggers never interleave mid-line. A pipe or a terminal can
block: there the write runs in a worker thread (``trio.to_thread``: a slow terminal or a full
pipe never stalls the event loop). A regular file takes it at once (the page cache), so a
batch costs no thread hop (about 90 µs of CPU each).

A full buffer drops the line and counts it (``dropped``; the next batch says how many were
lost): a request never waits for the log. While no flush task runs (a host that did not call
:func:`~onwards_trio.configure_logging`, or a gateway not started with ``running()``/
``serve()``), access lines go through ``logging`` as before.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any, ClassVar, Final, Protocol, TypeAlias

import orjson
import trio

if TYPE_CHECKING:
    from onwards_trio._ops.logs import RequestRecord

__all__ = [
    "AccessWriter",
    "Fields",
    "LaterUsage",
    "UsageParts",
    "WholeBodies",
    "bounded_alias",
    "clean_path",
    "logfmt",
    "read_now",
]

_SAFE_VALUE: Final = re.compile(r"^[A-Za-z0-9._~:/{}\[\]@+-]*$")


def logfmt(value: Any) -> str:
    """A ``key=value`` value: as is when plain, else JSON-quoted."""
    text = str(value)
    if text and _SAFE_VALUE.match(text):
        return text
    return orjson.dumps(text).decode()


def _json_inner(text: str) -> str:
    """``text`` as it appears between the quotes of a JSON string."""
    return orjson.dumps(text).decode()[1:-1]


class LaterUsage:
    """A relayed body whose token usage is read later, by the writer, with the rest of its
    batch (``_proxy.usage.UsageKeeper``: this layer cannot import it).

    ``read_all`` fills in ``found`` (the counts: input, output, cached, reasoning; ``None``:
    the body had none) for many at once; :attr:`usage` reads one at once. ``found`` is unset
    until then: a request's span, which waits for this writer's read, tells read bodies from
    unread ones by it (``_ops.tracing._SpanQueue.settle``)."""

    __slots__ = ("found",)

    found: tuple[int, ...] | None

    #: How many times :func:`read_now` read bodies for another reader (the tracer): the
    #: writer's batches may then hold bodies already read, which it skips.
    early: ClassVar[int] = 0

    @classmethod
    def read_all(cls, bodies: list[LaterUsage]) -> None:
        raise NotImplementedError

    @property
    def usage(self) -> tuple[int, ...] | None:
        raise NotImplementedError


class WholeBodies:
    """How the token usage of a whole body handed over as its ``bytes`` is read: the usual
    answer, whose body came in one piece with its head, when only the access line wants its
    usage (no keeper, no tap on the relay). Set by ``_proxy.usage`` (this layer cannot
    import it)."""

    #: One body's usage, now (a ``Usage``; ``None``: none).
    usage: ClassVar[Callable[[bytes], Any]]
    #: Many bodies' counts, read together, in their order (each as ``LaterUsage.found``).
    counts: ClassVar[Callable[[list[bytes]], Sequence[tuple[int, ...] | None]]]


#: A request's token usage as the access line gets it: ``None`` (none), one body's counts (a
#: ``Usage``), a :class:`LaterUsage`, a whole body (``bytes``: :class:`WholeBodies`), or a list
#: of these (summed: a ``/v1/responses`` request makes several model calls).
UsageParts: TypeAlias = (
    "tuple[int, ...] | LaterUsage | bytes | list[tuple[int, ...] | LaterUsage | bytes] | None"
)


class Guard(Protocol):
    """The redaction guard as the writer uses it: what it lets through, and a number that
    changes whenever it learns a new secret (so that lines built before are built again)."""

    generation: int

    def clean(self, text: str) -> str: ...


# Seconds a line may wait for others to share its write. A batch costs a fixed ~170k
# instructions (the expiring sleep's scope, two task wake-ups, the write, the batch's set-up):
# the longer the wait, the more lines share it. A traced request's span may read a kept body
# before this writer does (it holds at most 128 unread: _ops/tracing.py); it reads it through
# read_now, and the writer then skips it (no body is read twice).
_BATCH_DELAY: Final = 0.1
_MAX_LINES: Final = 10_000  # lines held at most; past it new lines are dropped and counted
_MAX_PARTS: Final = 1024  # (method, path, status, alias) whose line parts are kept
_LOGGER_TEXT: Final = " INFO onwards_trio.access "
_LOGGER_JSON: Final = '","level":"info","logger":"onwards_trio.access","msg":"'
_FRACTIONS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))  # a timestamp's end, per ms

#: One access line as queued: method, path, status, duration (s), alias, provider, bytes_in,
#: bytes_out, attempts, stream (the :class:`~onwards_trio.RequestRecord` fields, in its
#: order; ``None``: not known), the token usage (:data:`UsageParts`, or a record's
#: ``(input_tokens, output_tokens, cached_tokens)``) and the ``time.time()`` of the
#: request's end.
Fields: TypeAlias = tuple[
    str,
    str,
    int,
    float,
    "str | None",
    "int | None",
    "int | None",
    "int | None",
    "int | None",
    "bool | None",
    "UsageParts | tuple[Any, Any, Any]",
    float,
]
# The text of the counts up to 4095 (sizes, token figures, indexes): a lookup costs about a
# third of an int's conversion. Keys are exact ints only: push() turns any other number (a
# bool, a float, an int subclass: equal to an int key but printed otherwise) into its text.
_NUMBERS: Final = {i: str(i) for i in range(4096)}
_MAX_PATH: Final = 256
_MAX_ALIAS: Final = 128


def clean_path(path: str) -> str:
    """The path part only (a query string may hold credentials), bounded in length."""
    path = path.split("?", 1)[0]
    return path if len(path) <= _MAX_PATH else path[:_MAX_PATH] + "..."


def bounded_alias(alias: str) -> str:
    """An alias as logged: bounded in length (a client chooses it)."""
    return alias if len(alias) <= _MAX_ALIAS else alias[:_MAX_ALIAS] + "..."


class AccessWriter:
    """Formats access lines as the configured handler would and writes them in batches.

    A line is its time, a part that depends only on (method, path, status, alias) -- built
    once, through the redaction guard, and kept -- and the numbers, formatted as they come.
    """

    __slots__ = (
        "_buf",
        "_early",
        "_generation",
        "_guard",
        "_handler",
        "_inline",
        "_json",
        "_parts",
        "_second",
        "_stamp",
        "_stream",
        "_wake",
        "dropped",
        "max_lines",
        "running",
    )

    def __init__(
        self,
        handler: logging.StreamHandler[Any],
        *,
        json: bool,
        guard: Guard,
        max_lines: int = _MAX_LINES,
    ) -> None:
        self._handler = handler
        self._stream: IO[str] = handler.stream
        self._inline = _regular_file(self._stream)  # a write that cannot block for long
        self._json = json
        self._guard = guard
        self._generation = guard.generation
        self._early = (LaterUsage.early, LaterUsage.early)
        self._parts: dict[tuple[str, str, int, str | None], tuple[str, ...]] = {}
        self._buf: list[Fields] = []  # formatted when written
        self._wake = trio.Event()
        self._second = -1
        self._stamp = ""
        self.max_lines = max_lines
        self.dropped = 0
        self.running = False

    def push(self, record: RequestRecord) -> None:
        """Queue one access line of a :class:`RequestRecord` (formatted with its batch)."""
        tokens = (record.input_tokens, record.output_tokens, record.cached_tokens)
        self.add(
            (
                record.method,
                record.path,
                record.status,
                record.duration,
                record.alias,
                _exact(record.provider),
                _exact(record.bytes_in),
                _exact(record.bytes_out),
                _exact(record.attempts),
                record.stream,
                tuple(map(_exact, tokens)),
                time.time(),
            )
        )

    def add(self, fields: Fields) -> None:
        """Queue one access line's fields, the time last (:data:`Fields`): a request pays for
        one tuple and one ``append``; the path and alias are bounded, cleaned and formatted
        with the batch."""
        buf = self._buf
        if len(buf) >= self.max_lines:
            self.dropped += 1
            return
        buf.append(fields)
        if len(buf) == 1:
            self._wake.set()

    def _day(self, second: int) -> str:
        """``2026-11-30T07:00:00`` of a time in seconds: strftime once a second."""
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._stamp

    def _timestamp(self, ms: int) -> str:
        """``2026-11-30T07:00:00.123Z`` of a time in milliseconds."""
        second, fraction = divmod(ms, 1000)
        return self._day(second) + _FRACTIONS[fraction]

    def _parts_of(self, key: tuple[str, str, int, str | None]) -> tuple[str, ...]:
        """What a line of this (method, path, status, alias) always holds. Only the
        client-chosen strings (path, alias) can carry anything secret: they pass the guard."""
        method, path, status, alias = key
        clean = self._guard.clean
        path = clean(clean_path(path))
        if alias is not None:
            alias = bounded_alias(alias)
        head = f"method={method} path={logfmt(path)} status={status} duration_ms="
        named = "" if alias is None else f" alias={logfmt(clean(alias))}"
        if len(self._parts) >= _MAX_PARTS:
            self._parts.clear()  # many distinct paths: start over rather than grow
        if not self._json:
            parts: tuple[str, ...] = (head, named)
        else:
            fields = orjson.dumps({"method": method, "path": path, "status": status}).decode()
            parts = (
                _json_inner(head),
                _json_inner(named),
                f'{fields[1:-1]},"duration_ms":',
                "" if alias is None else ',"alias":' + orjson.dumps(clean(alias)).decode(),
            )
        self._parts[key] = parts
        return parts

    def _text(self, queued: list[Fields]) -> str:
        """The batch's lines as one text (the usage left for later read first, all at once)."""
        if self._guard.generation != self._generation:  # a new secret: build the parts again
            self._generation = self._guard.generation
            self._parts.clear()
        # Bodies read early (read_now) since the batch before last: this batch may hold some
        # (a line may be queued a moment after its span read the body), so it skips the read.
        early = LaterUsage.early
        read = _read_later(queued, unread_only=early != self._early[0])
        self._early = (self._early[1], early)
        lines = self._lines(queued, read)
        return "\n".join(lines) + "\n" if lines else ""

    def _lines(self, queued: list[Fields], read: _Read) -> list[str]:
        """Lines one by one: one pass, the constant parts looked up, the numbers formatted.
        ``read``: the counts of the whole bodies (``bytes``) among them, by their ``id``."""
        known = self._parts
        built = self._parts_of
        json = self._json
        n = _NUMBERS.get  # str() of a small count: a lookup, not a conversion
        base = top = 0.0  # the second being formatted: [base, top)
        day = stamp = ""
        last = -1
        lines: list[str] = []
        for (
            method,
            path,
            status,
            seconds,
            alias,
            provider,
            bytes_in,
            bytes_out,
            attempts,
            flag,
            usage,
            now,
        ) in queued:
            key = (method, path, status, alias)
            parts = known.get(key)
            if parts is None:
                parts = built(key)
            # The time as logging's msecs: int(now), and int((now - int(now)) * 1000), which
            # is exact (now * 1000 would round up to the next millisecond at times). Lines
            # come many to a second and to a millisecond: each is formatted once.
            if not base <= now < top:
                second = int(now)
                base, top = float(second), second + 1.0
                day = self._day(second)
                last = -1
            fraction = int((now - base) * 1000)
            if fraction != last:
                last = fraction
                stamp = day + _FRACTIONS[fraction]
            # str(round(x, 3)) without its two float conversions: the same digits
            duration = f"{seconds * 1000.0:.3f}".rstrip("0")
            if duration[-1] == ".":
                duration += "0"
            # The numbers: the usual groups in one format each (a proxied request has all
            # four sizes and counts, an answer with usage all three token figures).
            if (
                provider is not None
                and bytes_in is not None
                and bytes_out is not None
                and attempts is not None
            ):
                tail = (
                    f" provider={n(provider) or provider} bytes_in={n(bytes_in) or bytes_in}"
                    f" bytes_out={n(bytes_out) or bytes_out} attempts={n(attempts) or attempts}"
                )
            else:
                tail = _members(
                    ("provider", "bytes_in", "bytes_out", "attempts"),
                    (provider, bytes_in, bytes_out, attempts),
                )
            if flag is not None:
                tail += f" stream={flag}"
            counts: Any = usage
            if counts is not None:
                if type(counts) is bytes:
                    counts = read[id(counts)]  # read with the batch
                elif isinstance(counts, LaterUsage):
                    counts = counts.found
                elif type(counts) is list:
                    counts = _sum(counts, read)
            if counts is None:
                tokens_in = tokens_out = cached = None
            else:
                tokens_in, tokens_out, cached = counts[0], counts[1], counts[2]
            if tokens_in is not None and tokens_out is not None and cached is not None:
                tail += (
                    f" input_tokens={n(tokens_in) or tokens_in}"
                    f" output_tokens={n(tokens_out) or tokens_out}"
                    f" cached_tokens={n(cached) or cached}"
                )
            elif tokens_in is not None or tokens_out is not None or cached is not None:
                tail += _members(
                    ("input_tokens", "output_tokens", "cached_tokens"),
                    (tokens_in, tokens_out, cached),
                )
            if not json:
                lines.append(f"{stamp}{_LOGGER_TEXT}{parts[0]}{duration}{parts[1]}{tail}")
                continue
            # The same numbers as JSON members: ' provider=0 stream=True' becomes
            # ',"provider":0,"stream":true' (names and numbers hold no space, '=' or quote).
            members = tail.replace(" ", ',"').replace("=", '":')
            if flag is not None:
                members = members.replace(":True", ":true").replace(":False", ":false")
            lines.append(
                f'{{"ts":"{stamp}{_LOGGER_JSON}{parts[0]}{duration}{parts[1]}{tail}",'
                f"{parts[2]}{duration}{parts[3]}{members}}}"
            )
        return lines

    def _write(self, data: str, dropped: int) -> None:
        if dropped:
            data += (
                f"{self._timestamp(_millis(time.time()))} WARNING onwards_trio.access "
                f"{dropped} access lines dropped (the log could not keep up)\n"
            )
        with self._handler.lock or _NO_LOCK:
            self._stream.write(data)
            self._stream.flush()

    def _take(self) -> tuple[str, int]:
        """The queued lines, formatted, and how many were dropped since the last batch."""
        queued, self._buf = self._buf, []
        dropped, self.dropped = self.dropped, 0
        return self._text(queued), dropped

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until cancelled, then what is left. One writer at a time: a second
        gateway in the same process shares the first one's task."""
        if self.running:
            task_status.started()
            return
        self.running = True
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                await trio.sleep(_BATCH_DELAY)
                self._wake = trio.Event()
                lines, dropped = self._take()
                if not (lines or dropped):
                    continue
                if self._inline:
                    self._write(lines, dropped)
                else:
                    await trio.to_thread.run_sync(self._write, lines, dropped)
        finally:
            self.running = False
            lines, dropped = self._take()
            if lines or dropped:
                # The last lines, at shutdown: synchronously. A stream closed at exit: nothing
                # left to tell.
                with contextlib.suppress(OSError, ValueError):
                    self._write(lines, dropped)


def read_now(bodies: list[LaterUsage]) -> None:
    """Read these bodies now, for a reader that cannot wait for the access writer (a span):
    each kind together. The writer skips them in its batch (:attr:`LaterUsage.early`)."""
    LaterUsage.early += 1
    _read_kinds(bodies)


def _read_kinds(bodies: list[LaterUsage]) -> None:
    for kind in {type(body) for body in bodies}:
        kind.read_all([body for body in bodies if type(body) is kind])


#: The counts of a batch's whole bodies (``bytes``), by their ``id`` (:func:`_read_later`).
_Read: TypeAlias = dict[int, "tuple[int, ...] | None"]


def _read_later(queued: list[Fields], *, unread_only: bool = False) -> _Read:
    """Read the usage of every body of the batch left for later, all at once; with
    ``unread_only`` (some may have been read already, by :func:`read_now`) only the unread.
    Returns the counts of the whole bodies (``bytes``), by their ``id``."""
    parts = list(filter(None, map(_USAGE, queued)))  # the lines with usage
    if not parts:
        return {}
    kinds = set(map(type, parts))
    if len(kinds) == 1 and list not in kinds:  # the usual batch: all of one kind
        (kind,) = kinds
        if kind is bytes:
            return dict(zip(map(id, parts), WholeBodies.counts(parts), strict=True))
        if not unread_only:
            if issubclass(kind, LaterUsage):
                kind.read_all(parts)
            return {}
    later: list[LaterUsage] = []
    whole: list[bytes] = []
    for usage in parts:
        if type(usage) is bytes:
            whole.append(usage)
        elif isinstance(usage, LaterUsage):
            later.append(usage)
        elif type(usage) is list:
            for part in usage:
                if type(part) is bytes:
                    whole.append(part)
                elif isinstance(part, LaterUsage):
                    later.append(part)
    if unread_only:
        later = [body for body in later if not hasattr(body, "found")]
    _read_kinds(later)
    return dict(zip(map(id, whole), WholeBodies.counts(whole), strict=True)) if whole else {}


def _sum(parts: list[Any], read: _Read) -> tuple[int, ...] | None:
    """The counts of several bodies' usage (read), summed."""
    total: tuple[int, ...] | None = None
    for part in parts:
        if type(part) is bytes:
            got = read[id(part)]  # read with the batch
        else:
            got = part.found if isinstance(part, LaterUsage) else part
        if got is not None:
            total = got if total is None else tuple(a + b for a, b in zip(total, got, strict=True))
    return total


_USAGE: Final = operator.itemgetter(10)


def _members(names: tuple[str, ...], values: tuple[object, ...]) -> str:
    """`` name=value`` for each of ``names`` whose value is known (the less usual shapes)."""
    return "".join(
        f" {name}={value}" for name, value in zip(names, values, strict=True) if value is not None
    )


def _exact(value: Any) -> Any:
    """A record's count as the batch formats it: an exact int (or ``None``) as is, anything
    else as the text an f-string would give it (so no number table lookup can misprint it)."""
    return value if value is None or type(value) is int else f"{value}"


def _millis(now: float) -> int:
    """``now`` (``time.time()``) truncated to milliseconds, as logging's ``msecs`` (``now -
    int(now)`` is exact; ``now * 1000`` would round up to the next millisecond at times)."""
    second = int(now)
    return second * 1000 + int((now - second) * 1000)


def _regular_file(stream: IO[str]) -> bool:
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        return False


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK: Final = _NoLock()
