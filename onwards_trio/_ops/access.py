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
import os
import re
import stat
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Final

import orjson
import trio

if TYPE_CHECKING:
    from onwards_trio._ops.logs import RequestRecord

__all__ = ["AccessWriter", "logfmt"]

# RequestRecord's optional fields after ``alias``, in access-line order (numbers and flags).
_OPTIONAL_NUMBERS: Final = (
    "provider",
    "bytes_in",
    "bytes_out",
    "attempts",
    "stream",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
)

_SAFE_VALUE: Final = re.compile(r"^[A-Za-z0-9._~:/{}\[\]@+-]*$")


def logfmt(value: Any) -> str:
    """A ``key=value`` value: as is when plain, else JSON-quoted."""
    text = str(value)
    if text and _SAFE_VALUE.match(text):
        return text
    return orjson.dumps(text).decode()


_FORMATTED: dict[str, str] = {}  # logfmt of the (cleaned) paths and aliases seen: they repeat
_FORMATTED_SIZE: Final = 1024


def _logfmt_text(text: str) -> str:
    out = _FORMATTED.get(text)
    if out is None:
        if len(_FORMATTED) >= _FORMATTED_SIZE:
            _FORMATTED.clear()
        out = _FORMATTED[text] = logfmt(text)
    return out


_BATCH_DELAY: Final = 0.02  # seconds a line may wait for others to share its write
_MAX_LINES: Final = 10_000  # lines held at most; past it new lines are dropped and counted


class AccessWriter:
    """Formats access lines as the configured handler would and writes them in batches."""

    __slots__ = (
        "_buf",
        "_handler",
        "_inline",
        "_json",
        "_prefix",
        "_redact",
        "_second",
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
        redact: Callable[[str], str],
        max_lines: int = _MAX_LINES,
    ) -> None:
        self._handler = handler
        self._stream: IO[str] = handler.stream
        self._inline = _regular_file(self._stream)  # a write that cannot block for long
        self._json = json
        self._redact = redact
        self._buf: list[tuple[RequestRecord, float]] = []  # formatted when written
        self._wake = trio.Event()
        self._second = -1
        self._prefix = ""
        self.max_lines = max_lines
        self.dropped = 0
        self.running = False

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # strftime once per second, not once per line
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"

    def push(self, record: RequestRecord) -> None:
        """Queue one access line: the record and the time (formatted with its batch)."""
        buf = self._buf
        if len(buf) >= self.max_lines:
            self.dropped += 1
            return
        buf.append((record, time.time()))
        if len(buf) == 1:
            self._wake.set()

    def _line(self, record: RequestRecord, now: float) -> str:
        """One access line. Only the client-chosen strings (path, alias) can carry anything
        secret; they pass the redaction guard, the rest are numbers and tokens."""
        clean = self._redact
        path = clean(record.path)
        alias = None if record.alias is None else clean(record.alias)
        duration_ms = round(record.duration * 1000.0, 3)
        message = (
            f"method={record.method} path={_logfmt_text(path)} status={record.status} "
            f"duration_ms={duration_ms}"
        )
        if alias is not None:
            message += f" alias={_logfmt_text(alias)}"
        extra = [(n, v) for n in _OPTIONAL_NUMBERS if (v := getattr(record, n)) is not None]
        for name, value in extra:
            message += f" {name}={value}"
        ts = self._timestamp(now)
        if not self._json:
            return f"{ts} INFO onwards_trio.access {message}"
        out: dict[str, Any] = {
            "ts": ts,
            "level": "info",
            "logger": "onwards_trio.access",
            "msg": message,
            "method": record.method,
            "path": path,
            "status": record.status,
            "duration_ms": duration_ms,
        }
        if alias is not None:
            out["alias"] = alias
        out.update(extra)
        return orjson.dumps(out).decode()

    def _write(self, lines: list[str], dropped: int) -> None:
        if dropped:
            lines.append(
                f"{self._timestamp(time.time())} WARNING onwards_trio.access "
                f"{dropped} access lines dropped (the log could not keep up)"
            )
        data = "\n".join(lines) + "\n"
        with self._handler.lock or _NO_LOCK:
            self._stream.write(data)
            self._stream.flush()

    def _take(self) -> tuple[list[str], int]:
        """The queued lines, formatted, and how many were dropped since the last batch."""
        queued, self._buf = self._buf, []
        dropped, self.dropped = self.dropped, 0
        line = self._line
        return [line(record, now) for record, now in queued], dropped

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
