"""Cassettes: recorded model exchanges, one JSON file per test, replayed offline.

The file is meant to be read and reviewed like code::

    {"version": 1, "interactions": [
      {"alias": "gpt", "request": {"method": "POST", "path": "/chat/completions",
                                   "headers": {...}, "body": {...}},
       "response": {"status": 200, "headers": {...}, "body": {...}}},
      {"alias": "gpt", "request": {...},
       "response": {"status": 200, "headers": {...},
                    "events": [{"at_ms": 212.4, "data": "data: {...}\\n\\n"}, ...]}}]}

A streamed answer keeps each SSE event as it arrived with its offset from the request; the
replay sends them as separate chunks. Secrets never reach the file: credential headers are
dropped, and the upstream key is replaced wherever it would appear in a body.

Matching (replay): a request matches an interaction when the alias is the same and the
*normalised* bodies are equal — parsed JSON, so key order and whitespace do not matter, minus the
top-level keys the test names in ``ignore``; ``match=`` replaces the normaliser altogether. Each
interaction plays once, in recorded order among equals. An unmatched request is answered with a
400 whose message shows the closest recorded request and a diff, and fails the test.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson

from onwards_trio.testing._records import is_secret_header, pretty

__all__ = ["Cassette", "Interaction", "Matcher", "body_matcher"]

VERSION = 1
SCRUBBED = "<scrubbed>"
# Response headers worth keeping (the rest is transport noise that changes on every call).
_KEPT_RESPONSE_HEADERS = frozenset(
    {"content-type", "retry-after", "retry-after-ms", "x-request-id", "openai-processing-ms"}
)

Matcher = Callable[[str, Any], Any]


def body_matcher(ignore: Sequence[str] = ()) -> Matcher:
    """The default rule: alias + the JSON body without the ``ignore`` top-level keys."""
    dropped = frozenset(ignore)

    def key(alias: str, body: Any) -> Any:
        if isinstance(body, dict) and dropped:
            body = {k: v for k, v in body.items() if k not in dropped}
        return alias, orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    return key


@attrs.define
class Interaction:
    alias: str
    request: dict[str, Any]
    response: dict[str, Any]
    used: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"alias": self.alias, "request": self.request, "response": self.response}


def scrub(value: Any, secrets: Sequence[str]) -> Any:
    """``value`` with every occurrence of a secret string replaced (deep)."""
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, SCRUBBED)
        return value
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    return value


def request_headers(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Request headers worth keeping in a cassette: no credentials, no transport framing."""
    skip = {"host", "content-length", "connection", "accept-encoding", "transfer-encoding"}
    return {k.lower(): v for k, v in headers if k.lower() not in skip and not is_secret_header(k)}


def response_headers(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers if k.lower() in _KEPT_RESPONSE_HEADERS}


class Cassette:
    """The interactions of one test: loaded for replay, or collected while recording."""

    def __init__(self, path: Path, interactions: list[Interaction] | None = None) -> None:
        self.path = path
        self.interactions = interactions or []

    @classmethod
    def load(cls, path: Path) -> Cassette:
        if not path.exists():
            return cls(path)
        data = orjson.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError(f"{path}: not an onwards_trio cassette (version {VERSION})")
        return cls(
            path,
            [
                Interaction(i["alias"], i["request"], i["response"])
                for i in data.get("interactions", [])
            ],
        )

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": VERSION, "interactions": [i.to_json() for i in self.interactions]}
        self.path.write_bytes(
            orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
        )

    def find(self, alias: str, body: Any, matcher: Matcher) -> Interaction | None:
        """The first unplayed interaction matching ``(alias, body)``; it is marked played."""
        wanted = matcher(alias, body)
        for interaction in self.interactions:
            if (
                not interaction.used
                and matcher(interaction.alias, interaction.request.get("body")) == wanted
            ):
                interaction.used = True
                return interaction
        return None

    def explain_miss(self, alias: str, body: Any) -> str:
        """Why nothing matched: the closest recorded request and a diff against it."""
        where = f"cassette {self.path}"
        if not self.interactions:
            return (
                f"{where} has no recorded interactions (is it missing? record it with "
                "`pytest --onwards-record`)"
            )
        mine = pretty(body)
        best: Interaction | None = None
        best_ratio = -1.0
        for interaction in self.interactions:
            theirs = pretty(interaction.request.get("body"))
            ratio = difflib.SequenceMatcher(None, mine, theirs).ratio()
            if interaction.alias != alias:
                ratio -= 1.0
            if ratio > best_ratio:
                best, best_ratio = interaction, ratio
        assert best is not None
        diff = "\n".join(
            difflib.unified_diff(
                pretty(best.request.get("body")).splitlines(),
                mine.splitlines(),
                f"recorded ({best.alias}{', already played' if best.used else ''})",
                f"this request ({alias})",
                lineterm="",
            )
        )
        diff = diff or "(nothing: it was already played)"
        return (
            f"no recorded interaction in {where} matches this request to {alias!r}; "
            f"the closest recorded request differs by:\n{diff}"
        )


def events_of(chunks: Sequence[tuple[float, bytes]]) -> list[dict[str, Any]]:
    """Network chunks (offset seconds, bytes) cut into SSE events with their arrival offsets."""
    events: list[dict[str, Any]] = []
    buffer = b""
    for at, chunk in chunks:
        buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            events.append({"at_ms": round(at * 1000, 1), "data": (event + b"\n\n").decode()})
    if buffer:
        last = chunks[-1][0] if chunks else 0.0
        events.append({"at_ms": round(last * 1000, 1), "data": buffer.decode("utf-8", "replace")})
    return events


def header_pairs(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]
