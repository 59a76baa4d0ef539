"""Token usage of an LLM response, read from the bytes the upstream sends.

Pure (no I/O, no gateway state): the proxy taps upstream bodies with it for the token counters,
the access line and spans; quota and budget code can reuse it as is.

Where usage lives:

* a non-streamed body carries one ``usage`` object (chat completions, completions, embeddings,
  Open Responses, Anthropic messages);
* a stream carries it in its last events: the chat-completions usage chunk (``choices: []``,
  sent when the request had ``stream_options.include_usage``), Open Responses'
  ``response.completed``, Anthropic's ``message_start`` (input) and ``message_delta`` (output).
  Later objects override earlier ones field by field, so every shape comes out whole.

Reading is cheap on purpose: bytes are searched for ``"usage"`` (a C-speed ``find``) and only
the small ``usage`` object itself is parsed, never the whole body or every event. A ``"usage"``
inside a JSON string is always escaped (``\\"usage\\"``), so the search only meets keys (or a
string value that is exactly ``usage``, which is skipped because no object follows it).

Field mapping (every figure is a count of tokens; absent figures are 0):

* ``input_tokens``: ``prompt_tokens`` / ``input_tokens``; Anthropic's cache reads and writes
  are added, so it always means *all* input (as OpenAI counts it);
* ``output_tokens``: ``completion_tokens`` / ``output_tokens``;
* ``cached_tokens``: input served from a prompt cache (``prompt_tokens_details.cached_tokens``,
  ``input_tokens_details.cached_tokens``, Anthropic ``cache_read_input_tokens``);
* ``reasoning_tokens``: the part of the output spent on reasoning, where reported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from itertools import chain, compress, repeat
from operator import attrgetter
from typing import Any, Final, NamedTuple, Protocol, cast

import orjson

from onwards_trio._ops.access import LaterUsage, WholeBodies

__all__ = [
    "MAX_KEPT",
    "StreamUsageStripper",
    "Usage",
    "UsageKeeper",
    "UsageScanner",
    "UsageTap",
    "find_usage",
    "kept_usages",
    "stream_usage_requested",
    "usage_from_object",
    "with_stream_usage",
]

_KEY: Final = b'"usage"'
_WS: Final = b" \t\r\n"
# A usage object larger than this is not a usage object (bounds what a scanner keeps).
_MAX_OBJECT: Final = 16 * 1024
# What a stream scanner keeps of a chunk with no usage in it: enough to find a key split
# across two chunks.
_OVERLAP: Final = len(_KEY) - 1


class Usage(NamedTuple):
    """Token counts of one response (or a sum of several, with ``+``).

    A named tuple, not a frozen attrs class: every relayed answer with usage builds one, and a
    frozen class's ``__init__`` (one ``object.__setattr__`` per field) cost about 5k
    instructions of the access line's budget; a tuple is built in one C call."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:  # type: ignore[override]  # a sum, not a concatenation
        return _usage(
            (
                self.input_tokens + other.input_tokens,
                self.output_tokens + other.output_tokens,
                self.cached_tokens + other.cached_tokens,
                self.reasoning_tokens + other.reasoning_tokens,
            )
        )


def _usage(figures: tuple[int, int, int, int]) -> Usage:
    """A :class:`Usage` of four figures without the generated ``__new__``'s argument handling."""
    return tuple.__new__(Usage, figures)


def _int(value: Any) -> int:
    if type(value) is int:  # what JSON gives: the common case, without the checks below
        return value if value > 0 else 0
    # bool is an int subclass; a usage figure never is one
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _detail(raw: Mapping[str, Any], name: str, field: str) -> int:
    details = raw.get(name)
    if details is None:  # mostly absent: skip the (slow) abstract Mapping check
        return 0
    return _int(details.get(field)) if isinstance(details, Mapping) else 0


def usage_from_object(raw: Any) -> Usage | None:
    """A parsed ``usage`` object (any of the shapes above) as :class:`Usage`; ``None`` if it
    is not one (not a mapping, or no token figure in it)."""
    # A dict (what JSON gives) first: the abstract Mapping check costs a few microseconds.
    if not isinstance(raw, dict) and not isinstance(raw, Mapping):
        return None
    get = raw.get
    prompt, completion = get("prompt_tokens"), get("completion_tokens")
    if (
        prompt is not None
        or completion is not None
        or "prompt_tokens" in raw
        or "completion_tokens" in raw
    ):
        if (
            type(prompt) is int  # the usual answer: two plain counts and no details
            and type(completion) is int
            and prompt >= 0
            and completion >= 0
            and "prompt_tokens_details" not in raw
            and "completion_tokens_details" not in raw
        ):
            return _usage((prompt, completion, 0, 0))
        return _usage(
            (
                _int(prompt),
                _int(completion),
                _detail(raw, "prompt_tokens_details", "cached_tokens"),
                _detail(raw, "completion_tokens_details", "reasoning_tokens"),
            )
        )
    if "input_tokens" in raw or "output_tokens" in raw:
        cache_read = _int(get("cache_read_input_tokens"))
        cache_write = _int(get("cache_creation_input_tokens"))
        return _usage(
            (
                _int(get("input_tokens")) + cache_read + cache_write,
                _int(get("output_tokens")),
                _detail(raw, "input_tokens_details", "cached_tokens") + cache_read,
                _detail(raw, "output_tokens_details", "reasoning_tokens"),
            )
        )
    return None


def _object_end(data: bytes, start: int) -> int:
    """Index just past the ``}`` closing the object that opens at ``data[start]`` (``-1``:
    not complete in ``data``). Usage objects hold numbers and nested objects, no strings with
    braces, so counting braces is exact for them."""
    depth = 0
    i = start
    while True:
        close = data.find(b"}", i)
        if close < 0:
            return -1
        opens = data.count(b"{", i, close)
        depth += opens - 1
        if depth <= 0:
            return close + 1
        i = close + 1


# A complete ``"usage": {...}`` whose object nests at most one level (every usage shape above):
# one C-speed match instead of the byte-by-byte walk below, which handles the rest (deeper
# nesting, an object cut by a chunk boundary). ``[^{}]`` counts braces as _object_end does.
_SHALLOW: Final = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')


def _objects(data: bytes, pos: int) -> tuple[list[dict[str, Any]], int]:
    """Every complete ``"usage": {...}`` object in ``data`` from the key at ``pos`` (``-1``:
    none; the caller's ``find``, not repeated here), in order, and where an incomplete one
    starts (``-1``: none)."""
    found: list[dict[str, Any]] = []
    while pos >= 0:
        shallow = _SHALLOW.match(data, pos)
        if shallow is not None:
            try:
                obj = orjson.loads(shallow.group(1))
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                found.append(obj)
            pos = data.find(_KEY, shallow.end())
            continue
        i = pos + len(_KEY)
        n = len(data)
        while i < n and data[i] in _WS:
            i += 1
        if i < n and data[i] == 0x3A:  # ':'
            i += 1
            while i < n and data[i] in _WS:
                i += 1
            if i >= n:
                return found, pos
            if data[i] == 0x7B:  # '{'
                end = _object_end(data, i)
                if end < 0:
                    return found, pos if n - pos <= _MAX_OBJECT else -1
                try:
                    obj = orjson.loads(data[i:end])
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    found.append(obj)
                pos = data.find(_KEY, end)
                continue
        elif i >= n:
            return found, pos
        pos = data.find(_KEY, pos + 1)
    return found, -1


def _merged(objs: list[dict[str, Any]], into: dict[str, Any] | None = None) -> dict[str, Any]:
    out = into if into is not None else {}
    for obj in objs:
        out.update(obj)
    return out


def find_usage(body: bytes) -> Usage | None:
    """The usage in a whole body (JSON or a complete SSE stream); ``None`` if there is none."""
    objs, _ = _objects(body, body.find(_KEY))
    return usage_from_object(_merged(objs)) if objs else None


class UsageScanner:
    """Finds the usage in a body fed to it chunk by chunk, without holding the body.

    ``feed`` each chunk as it passes (it is returned unchanged), ``close`` at the end, then read
    :attr:`usage`. A chunk with
    no ``"usage"`` in it costs one ``find``; only an object cut by a chunk boundary is kept
    (bounded) until its end arrives.
    """

    __slots__ = ("_raw", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._raw: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Look at ``chunk``; return it unchanged (the same protocol as the stripper)."""
        data = self._tail + chunk if self._tail else chunk
        pos = data.find(_KEY)
        if pos < 0:
            self._tail = data[-_OVERLAP:]
            return chunk
        objs, partial = _objects(data, pos)
        if objs:
            raw = self._raw
            # one object and nothing before it (a whole JSON body): it is the usage as parsed
            self._raw = objs[0] if raw is None and len(objs) == 1 else _merged(objs, raw)
        self._tail = data[partial:] if partial >= 0 else data[-_OVERLAP:]
        return chunk

    def close(self) -> bytes:
        """The body ended (nothing is held back, so nothing is left to pass on)."""
        self._tail = b""
        return b""

    @property
    def usage(self) -> Usage | None:
        return usage_from_object(self._raw) if self._raw is not None else None


# How much of a body a keeper holds on to (a usual answer is well under it); past it, it scans
# as it goes, as a :class:`UsageScanner` does, and holds nothing.
_KEEP: Final = 4096
#: The largest body handed to the access line whole (``_ops.access.WholeBodies``), as a keeper
#: keeps it.
MAX_KEPT: Final = _KEEP


class UsageKeeper(LaterUsage):
    """A tap that only keeps the body's chunks (references, bounded), so that its usage is
    read later, with many others (:func:`kept_usages`), off the request's path.

    When only the access line wants a body's usage, scanning each body on its own (a scanner
    object, a ``find``, a match, a parse and a report per body) cost about half of what the
    access line adds to a request; a request now only appends its chunks to a list. A body
    larger than ``_KEEP`` is scanned as it passes instead (what it finds is the same: the
    scanner reads the same chunks). :attr:`usage` reads it at once (a slow path).
    """

    __slots__ = ("chunks", "scanner", "size")

    # set by read_all, unset until then (LaterUsage): its Usage, or the same four counts as
    # a plain tuple (read with a batch)
    found: tuple[int, int, int, int] | None

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.scanner: UsageScanner | None = None

    def feed(self, chunk: bytes) -> bytes:
        scanner = self.scanner
        if scanner is not None:
            scanner.feed(chunk)
            return chunk
        self.chunks.append(chunk)
        self.size += len(chunk)
        if self.size > _KEEP:  # too much to hold: scan what is held, and the rest as it comes
            self.scanner = scanner = UsageScanner()
            for held in self.chunks:
                scanner.feed(held)
            self.chunks = []
        return chunk

    def close(self) -> bytes:
        return b""

    @property
    def usage(self) -> Usage | None:
        return _kept_usage(self)

    @classmethod
    def read_all(cls, bodies: list[LaterUsage]) -> None:
        keepers = cast("list[UsageKeeper]", bodies)  # read_all is called on one kind at a time
        if len(keepers) < _FEW:  # body by body: the batch reading's fixed cost exceeds it
            for keeper in keepers:
                keeper.found = _kept_usage(keeper)
            return
        found: Sequence[tuple[int, ...] | None] | None = None
        whole = not any(map(_SCANNER, keepers))
        if whole:  # the usual: all kept whole, all plain
            found = _usual_counts(list(map(b"".join, map(_CHUNKS, keepers))))
        if found is None:  # not read again the way that just failed
            found = kept_usages(keepers, plain_tried=whole)
        for _ in map(setattr, keepers, repeat("found"), found):
            pass


# Below this many bodies, reading each alone costs less than reading them together: the
# C-level passes over a batch cost ~30k instructions whatever its size, ~11k per body after
# that; one body alone costs ~17k (callgrind).
_FEW: Final = 8


def _kept_usage(keeper: UsageKeeper) -> Usage | None:
    """What a :class:`UsageScanner` fed the keeper's chunks reports: the usual body (its only
    ``"usage"`` key, followed by OpenAI's three plain counts) with two searches and one
    match, any other by a scanner fed the same chunks.

    Exact: with one key, the scanner parses the object after it (from at most ``_KEEP``
    bytes, well under ``_MAX_OBJECT``: a chunk boundary never loses it), and an object
    ``_PLAIN`` matches is three JSON integers (at most 18 digits: exact ints), which
    :func:`usage_from_object` reads as ``(prompt, completion, 0, 0)``."""
    scanner = keeper.scanner
    if scanner is not None:
        return scanner.usage
    return _chunks_usage(keeper.chunks)


def _chunks_usage(chunks: list[bytes]) -> Usage | None:
    """:func:`_kept_usage` of chunks held whole (no scanner)."""
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    key = body.find(_KEY)
    if key < 0:
        return None  # no key in the body: none in any of its chunks either
    if body.find(_KEY, key + 1) < 0:  # the only key (the search sees overlapping ones too)
        plain = _PLAIN.match(body, key)
        if plain is not None:
            return _usage((int(plain[1]), int(plain[2]), 0, 0))
    scanner = UsageScanner()
    for chunk in chunks:
        scanner.feed(chunk)
    return scanner.usage


_PLAIN: Final = re.compile(
    rb'"usage"[ \t\r\n]*:[ \t\r\n]*\{[ \t\r\n]*'
    rb'"prompt_tokens"[ \t\r\n]*:[ \t\r\n]*(0|[1-9][0-9]{0,17})[ \t\r\n]*,[ \t\r\n]*'
    rb'"completion_tokens"[ \t\r\n]*:[ \t\r\n]*(0|[1-9][0-9]{0,17})[ \t\r\n]*,[ \t\r\n]*'
    rb'"total_tokens"[ \t\r\n]*:[ \t\r\n]*(?:0|[1-9][0-9]{0,17})[ \t\r\n]*\}'
)


# The usual usage object after its key, up to its "}", as upstreams write it compact or spaced
# (as Python's json.dumps does): OpenAI's three plain counts in their order. Each as its
# template (the counts as ``%d``) and the three texts between the counts.
_TEMPLATES: Final = tuple(
    (b"%d".join(parts), parts)
    for parts in (
        (b': {"prompt_tokens": ', b', "completion_tokens": ', b', "total_tokens": ', b""),
        (b':{"prompt_tokens":', b',"completion_tokens":', b',"total_tokens":', b""),
    )
)


def _template_counts(bodies: list[bytes]) -> list[tuple[int, int, int, int] | None] | None:
    """The usage counts of each body when every body that has any has the usual object (one
    ``"usage"`` key, then one of ``_TEMPLATES`` and its ``}``), read for the whole batch by a
    few C-level passes: no regular expression and no Python step per body. ``None``: some
    body is not like that (read otherwise).

    Exact: the part of a body before its last key holds no key (so the only other key could
    overlap that last one from the left, ``"usage"usage"``, which a scanner skips: no ``:``
    follows it), so a scanner parses that one object alone. The objects are the template
    with the numbers JSON reads in them, written back as plain decimals (so each is three
    JSON integers, none negative), which :func:`usage_from_object` reads as ``(prompt,
    completion, 0, 0)``."""
    heads, keys, tails = zip(*map(bytes.rpartition, bodies, repeat(_KEY)), strict=True)
    if b"\x00".join(heads).count(_KEY):  # NUL: no key across two bodies
        return None
    keyed = len(bodies) - keys.count(b"")
    if keyed < len(bodies):
        if not keyed:
            return [None] * len(bodies)
        tails = tuple(compress(tails, keys))
    objects, ends, _ = zip(*map(bytes.partition, tails, repeat(b"}")), strict=True)
    if b"" in ends:
        return None  # an object not closed in its body
    joined = b"\x00".join(objects)
    for template, (start, prompt, completion, _) in _TEMPLATES:
        if not joined.startswith(start):
            continue
        text = joined.replace(start, b"").replace(prompt, b",").replace(completion, b",")
        try:
            numbers = orjson.loads(b"[" + text.replace(b"\x00", b",") + b"]")
        except orjson.JSONDecodeError:
            return None
        if (
            len(numbers) != 3 * keyed
            or joined.find(b"-") >= 0
            or not set(map(type, numbers)) <= {int}  # a string, a float (above 2**64), ...
            or b"\x00".join(repeat(template, keyed)) % tuple(numbers) != joined
        ):
            return None
        break
    else:
        return None
    found: list[tuple[int, int, int, int] | None] = list(
        zip(numbers[0::3], numbers[1::3], repeat(0), repeat(0))
    )
    if keyed == len(bodies):
        return found
    it = iter(found)
    return [next(it) if key else None for key in keys]


def _whole_usage(body: bytes) -> Usage | None:
    """``WholeBodies.usage``: what a keeper fed this one chunk reads."""
    return _chunks_usage([body])


def _usual_counts(bodies: list[bytes]) -> list[tuple[int, int, int, int] | None] | None:
    """The counts of whole bodies read together when all are usual (one template, else all
    plain); ``None``: they are not, read them another way."""
    found = _template_counts(bodies)
    return found if found is not None else _plain_counts(bodies)


def _whole_counts(bodies: list[bytes]) -> Sequence[tuple[int, ...] | None]:
    """``WholeBodies.counts``: what keepers fed one of these chunks each read together."""
    if len(bodies) >= _FEW:
        found = _usual_counts(bodies)
        if found is not None:
            return found
    return list(map(_whole_usage, bodies))


WholeBodies.usage = _whole_usage
WholeBodies.counts = _whole_counts

_SCANNER: Final = attrgetter("scanner")
_CHUNKS: Final = attrgetter("chunks")

# A flat usage object (the usual one: counts only) after its key: a match whose object holds
# no other ``}``; ``[^}]`` is matched far faster than the scanner's ``[^{}]``.
_FLAT: Final = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*(\{[^}]*\})')


def kept_usages(keepers: Sequence[UsageKeeper], plain_tried: bool = False) -> list[Usage | None]:
    """The usage of each keeper's body: exactly what a :class:`UsageScanner` fed the same
    chunks reports, read for many bodies at once.

    The usual body has one ``"usage"`` key, followed by a flat object: for those, one count
    over all the bodies (no body has a second key), one match per body from its last key and
    one parse of all the objects. Any other body (two keys, a nested or unfinished object, a
    parse error) is fed to a scanner, chunk by chunk, as before. ``plain_tried``: the caller
    already found that these bodies are not all plain (``_plain_counts`` is not run again).
    """
    out: list[Usage | None] = [None] * len(keepers)
    bodies: list[bytes] = []
    where: list[int] = []  # the keeper each of ``bodies`` belongs to
    slow: list[int] = []
    for i, keeper in enumerate(keepers):
        scanner = keeper.scanner
        if scanner is not None:
            out[i] = scanner.usage
        else:
            chunks = keeper.chunks
            bodies.append(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            where.append(i)
    if bodies and not plain_tried:
        plain = _plain_counts(bodies)
        if plain is not None:
            for i, counts in zip(where, plain, strict=True):
                out[i] = None if counts is None else _usage(counts)
            bodies = []
    if bodies:
        ends = list(map(bytes.rfind, bodies, repeat(_KEY)))
        keyed = len(ends) - ends.count(-1)
        # NUL cannot be part of a key: the join makes none across two bodies
        if keyed and b"\x00".join(bodies).count(_KEY) != keyed:
            for j, count in enumerate(map(bytes.count, bodies, repeat(_KEY))):
                if count > 1:
                    slow.append(where[j])
                    ends[j] = -1
        found: list[bytes] = []
        owners: list[int] = []
        for j, end in enumerate(ends):
            if end < 0:
                continue  # no key (or one for the scanner): no usage here
            match = _FLAT.match(bodies[j], end)
            if match is None:
                slow.append(where[j])
                continue
            obj = match.group(1)
            # one level of braces only, and small enough that a scanner keeps it whole
            if obj.count(b"{") != 1 or match.end() - end > _MAX_OBJECT:
                slow.append(where[j])
                continue
            found.append(obj)
            owners.append(where[j])
        if found:
            try:
                parsed = orjson.loads(b"[" + b",".join(found) + b"]")
            except orjson.JSONDecodeError:
                parsed = None
            if parsed is None or len(parsed) != len(found):  # one is not JSON: each alone
                parsed = list(map(_loads_or_none, found))
            for i, obj in zip(owners, parsed, strict=True):
                if type(obj) is dict:
                    out[i] = usage_from_object(obj)
    for i in slow:
        scanner = UsageScanner()
        for chunk in keepers[i].chunks:
            scanner.feed(chunk)
        out[i] = scanner.usage
    return out


def _plain_counts(bodies: list[bytes]) -> list[tuple[int, int, int, int] | None] | None:
    """The usage counts of each body when every body that has any has the usual plain usage
    -- one key, a flat object with two plain counts (``prompt_tokens``, ``completion_tokens``;
    no details) -- read with a few calls over all of them (no Python step per body). ``None``:
    some body is not like that (the caller reads them one by one)."""
    # Every key of each body, each with the flat object after it (b"": none follows)
    keys = list(map(_KEYS.findall, bodies))
    per_body = set(map(len, keys))
    if not per_body <= {0, 1}:
        return None  # a body with two keys
    found: list[bytes] = list(chain.from_iterable(keys))
    if b"" in found or max(map(len, found), default=0) > _MAX_OBJECT - 2 * _MAX_WS - 16:
        return None  # a key without a flat object after it, or one a scanner could lose
    if b"".join(found).count(b"{") != len(found):
        return None  # a "{" inside (in a string): the scanner reads such an object otherwise
    try:
        # Each is one member only if each is a whole object: a string running from one into
        # the next would merge two, so the count tells.
        objs = orjson.loads(b"[" + b",".join(found) + b"]")
    except orjson.JSONDecodeError:
        return None
    if len(objs) != len(found) or not set(map(type, objs)) <= {dict}:
        return None
    prompt: list[Any] = list(map(dict.get, objs, repeat("prompt_tokens")))
    completion: list[Any] = list(map(dict.get, objs, repeat("completion_tokens")))
    if (
        not set(map(type, prompt)) <= {int}
        or not set(map(type, completion)) <= {int}
        or min(prompt, default=0) < 0
        or min(completion, default=0) < 0
        or any(map(dict.__contains__, objs, repeat("prompt_tokens_details")))
        or any(map(dict.__contains__, objs, repeat("completion_tokens_details")))
    ):
        return None
    # usage_from_object's answer for such an object
    counts: list[tuple[int, int, int, int] | None] = list(
        zip(prompt, completion, repeat(0), repeat(0))
    )
    if 0 not in per_body:
        return counts
    it = iter(counts)
    return [next(it) if got else None for got in keys]


_MAX_WS: Final = 64  # white space around a key's ':' that the plain reading accepts
_KEYS: Final = re.compile(rb'"usage"(?:[ \t\r\n]{0,64}:[ \t\r\n]{0,64}(\{[^}]*\}))?')


def _loads_or_none(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class UsageTap(Protocol):
    """What the proxy threads an upstream body through: :class:`UsageScanner` (bytes pass
    unchanged) or :class:`StreamUsageStripper` (the usage the client did not ask for is cut)."""

    def feed(self, chunk: bytes) -> bytes: ...

    def close(self) -> bytes: ...

    @property
    def usage(self) -> Usage | None: ...


# -- asking a streaming upstream for usage ---------------------------------------------------------


def stream_usage_requested(body: Any) -> bool:
    """Whether a parsed chat/completions request asked for the usage chunk itself."""
    options = body.get("stream_options") if isinstance(body, Mapping) else None
    return isinstance(options, Mapping) and options.get("include_usage") is True


def with_stream_usage(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request body with ``stream_options.include_usage`` turned on (other options kept)."""
    options = body.get("stream_options")
    merged = {**options, "include_usage": True} if isinstance(options, Mapping) else {}
    merged["include_usage"] = True
    return {**body, "stream_options": merged}


_NULL_USAGE: Final = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')


class StreamUsageStripper:
    """Undoes ``stream_options.include_usage`` that the client did not ask for.

    With it, an upstream adds ``"usage": null`` to every chunk and one last chunk with
    ``choices: []`` and the usage. This passes the stream on event by event without either, and
    keeps the usage for :attr:`usage`. ``feed`` returns the bytes to pass on now (complete
    events; a partial event waits for its end), ``close`` what is left at the end.
    """

    __slots__ = ("_buf", "_raw")

    def __init__(self) -> None:
        self._buf = b""
        self._raw: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        data = self._buf + chunk if self._buf else chunk
        end = _last_boundary(data)
        if end < 0:
            self._buf = data
            return b""
        self._buf = data[end:]
        return self._events(data[:end])

    def close(self) -> bytes:
        rest, self._buf = self._buf, b""
        return self._events(rest) if rest else b""

    @property
    def usage(self) -> Usage | None:
        return usage_from_object(self._raw) if self._raw is not None else None

    def _events(self, data: bytes) -> bytes:
        if data.find(_KEY) < 0:
            return data
        out: list[bytes] = []
        for event in _split_events(data):
            pos = event.find(_KEY)
            if pos < 0:
                out.append(event)
                continue
            objs, _ = _objects(event, pos)
            if objs:
                self._raw = _merged(objs, self._raw)
                if b'"choices":[]' in event or b'"choices": []' in event:
                    continue  # the usage-only chunk the client did not ask for
            for pattern in _NULL_USAGE:
                event = event.replace(pattern, b"")
            out.append(event)
        return b"".join(out)


def _last_boundary(data: bytes) -> int:
    """Index just past the last blank line (event end) in ``data``; ``-1`` if none."""
    best = -1
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = data.rfind(sep)
        if i >= 0:
            best = max(best, i + len(sep))
    return best


def _split_events(data: bytes) -> list[bytes]:
    """Complete events, each with its terminating blank line (bytes kept as they came)."""
    events: list[bytes] = []
    start = 0
    n = len(data)
    while start < n:
        ends = [
            i + len(sep)
            for sep in (b"\n\n", b"\r\n\r\n", b"\r\r")
            if (i := data.find(sep, start)) >= 0
        ]
        if not ends:
            events.append(data[start:])
            break
        end = min(ends)
        events.append(data[start:end])
        start = end
    return events
