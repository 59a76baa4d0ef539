"""Sans-io Server-Sent Events codec (h11 style: bytes in, events out, no I/O).

Two views of one stream, because the gateway needs both:

* :class:`SSEFramer` cuts a byte stream into *raw event blocks* (the exact bytes of one event,
  terminator included). Sanitisers work per block and can forward untouched blocks verbatim.
* :class:`SSEDecoder` parses blocks into :class:`SSEEvent` values (field parsing per the WHATWG
  spec) for code that needs the data: the loop's streaming model calls, the adapter, tests.

Both accept ``\\r\\n``, ``\\n`` and ``\\r`` line endings, any network fragmentation (a UTF-8
character split across chunks is kept: lines are cut on bytes and decoded whole), and events of
any size up to ``max_event_size``; past it :class:`SSEEventTooLarge` is raised so the caller can
end the stream with a visible error instead of silently truncating it (SPEC §2.5).
"""

from __future__ import annotations

import attrs

__all__ = [
    "DEFAULT_MAX_EVENT_SIZE",
    "SSEDecoder",
    "SSEEvent",
    "SSEEventTooLarge",
    "SSEFramer",
    "encode_event",
]

DEFAULT_MAX_EVENT_SIZE = 16 * 1024 * 1024


class SSEEventTooLarge(ValueError):
    """One event grew past the configured ``max_event_size``."""


@attrs.frozen
class SSEEvent:
    """One dispatched event. ``event`` is ``""`` when the stream gave no ``event:`` field."""

    data: str
    event: str = ""
    id: str | None = None
    retry: int | None = None


class SSEFramer:
    """Split bytes into raw event blocks, each ending with its blank-line terminator.

    ``feed`` returns the complete blocks seen so far; ``close`` returns what is left at end of
    stream (an unterminated trailing block, possibly empty).
    """

    __slots__ = ("_buf", "_line", "_max", "_too_large")

    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self._buf = bytearray()
        self._max = max_event_size
        self._line = 0  # offset in _buf of the first line not yet seen whole
        self._too_large = False  # an oversized event is pending: raise on the next call

    def _check(self) -> None:
        if self._too_large:
            raise SSEEventTooLarge(f"SSE event larger than {self._max} bytes")

    def feed(self, chunk: bytes) -> list[bytes]:
        self._check()
        buf = self._buf
        buf += chunk
        out: list[bytes] = []
        n = len(buf)
        start = 0  # start of the current block
        pos = self._line
        while pos < n:
            lf = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos, lf if lf >= 0 else n)
            j = cr if cr >= 0 else lf
            if j < 0:
                break
            if j == cr:
                if j + 1 >= n:
                    break  # CR at the very end: CR or CRLF? wait for more bytes
                end = j + 2 if buf[j + 1] == 0x0A else j + 1
            else:
                end = j + 1
            empty = j == pos
            pos = end
            if empty:  # a blank line ends the block
                out.append(bytes(buf[start:end]))
                start = end
        if start:
            del buf[:start]
        self._line = pos - start
        if len(buf) > self._max:
            # The complete events before the oversized one are still delivered; the error
            # comes with the next call, so output never depends on how bytes were chunked.
            self._too_large = True
            if not out:
                self._check()
        return out

    def close(self) -> bytes:
        self._check()
        rest = bytes(self._buf)
        self._buf.clear()
        self._line = 0
        return rest


def _split_lines(block: bytes) -> list[bytes]:
    return block.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")


class SSEDecoder:
    """Parse an SSE byte stream into :class:`SSEEvent` values (WHATWG event-stream rules)."""

    __slots__ = ("_framer", "_last_id")

    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self._framer = SSEFramer(max_event_size)
        self._last_id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        for block in self._framer.feed(chunk):
            ev = self.parse_block(block)
            if ev is not None:
                events.append(ev)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream. Per the spec an unterminated final event is discarded; we dispatch it
        anyway when it has data, because upstreams that forget the last blank line are common."""
        rest = self._framer.close()
        if not rest.strip():
            return []
        ev = self.parse_block(rest)
        return [ev] if ev is not None else []

    def parse_block(self, block: bytes) -> SSEEvent | None:
        if block[:6] == b"data: " and block[-2:] == b"\n\n":
            # What nearly every upstream sends per chunk — one data line, then the blank
            # line — without the general line walk (it is a third of a translated event).
            only = block[6:-2]
            if b"\n" not in only and b"\r" not in only:
                return SSEEvent(data=only.decode("utf-8", "replace"), id=self._last_id)
        data: list[str] = []
        event = ""
        retry: int | None = None
        has_data = False
        for raw in _split_lines(block):
            if not raw or raw[:1] == b":":
                continue
            line = raw.decode("utf-8", "replace")
            name, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
                has_data = True
            elif name == "event":
                event = value
            elif name == "id":
                if "\x00" not in value:
                    self._last_id = value
            elif name == "retry" and value.isdigit():
                retry = int(value)
        if not has_data:
            return None
        return SSEEvent(data="\n".join(data), event=event, id=self._last_id, retry=retry)


def encode_event(
    data: str | bytes, *, event: str | None = None, id: str | int | None = None
) -> bytes:
    """Serialise one event. Multi-line data becomes several ``data:`` lines."""
    parts: list[bytes] = []
    if event:
        parts.append(b"event: " + event.encode())
    if id is not None:
        parts.append(b"id: " + str(id).encode())
    raw = data.encode() if isinstance(data, str) else data
    if b"\n" in raw or b"\r" in raw:
        for line in _split_lines(raw):
            parts.append(b"data: " + line)
    else:
        parts.append(b"data: " + raw)
    return b"\n".join(parts) + b"\n\n"
