"""The buffered access-log writer: same lines as the logging path, bounded, redacted, flushed."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import cast

import orjson
import pytest
import trio

from onwards_trio._ops.access import AccessWriter, Fields, UsageParts, logfmt
from onwards_trio._ops.logs import RedactionFilter, RequestRecord
from onwards_trio._proxy.usage import Usage, UsageKeeper

RECORDS = [
    RequestRecord("POST", "/v1/chat/completions", 200, 0.0123456, "gpt-4", 0, 120, 800, 1),
    RequestRecord("GET", "/v1/models", 401, 0.0001),
    RequestRecord("POST", '/v1/odd path/"x"', 502, 1.5, "a b", 2, 10, None, 3, True),
    # counts that are not plain ints (or past the writer's table of small ones) print as str()
    RequestRecord(
        "POST", "/v1/x", 200, 0.1, "a", True, cast(int, 3.0), -5, 1, False, 4095, 4096, 0
    ),
]


def _writer(
    json: bool = False, max_lines: int = 100, secrets: tuple[str, ...] = ()
) -> tuple[AccessWriter, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    guard = RedactionFilter(secrets)
    return AccessWriter(handler, json=json, guard=guard, max_lines=max_lines), out


async def _flushed(writer: AccessWriter, out: io.StringIO | Path) -> list[str]:
    read = out.getvalue if isinstance(out, io.StringIO) else out.read_text
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with trio.fail_after(5):
            while not read():
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return read().splitlines()


@pytest.mark.parametrize("record", RECORDS)
async def test_text_line_is_the_logging_paths_message(record: RequestRecord) -> None:
    writer, out = _writer()
    writer.push(record)
    (line,) = await _flushed(writer, out)
    expected = " ".join(f"{k}={logfmt(v)}" for k, v in record.fields().items())
    ts, level, logger, message = line.split(" ", 3)
    assert ts.endswith("Z") and len(ts) == len("2026-11-30T07:00:00.000Z")
    assert (level, logger, message) == ("INFO", "onwards_trio.access", expected)


@pytest.mark.parametrize("record", RECORDS)
async def test_json_line_has_the_fields_at_top_level(record: RequestRecord) -> None:
    writer, out = _writer(json=True)
    writer.push(record)
    (line,) = await _flushed(writer, out)
    data = orjson.loads(line)
    assert {k: data[k] for k in record.fields()} == record.fields()
    assert data["logger"] == "onwards_trio.access" and data["level"] == "info"


async def test_json_line_has_the_time_and_message_of_every_json_log_line() -> None:
    # The same keys as the logging path's JsonFormatter: log shippers parse one schema.
    record = RECORDS[0]
    writer, out = _writer(json=True)
    writer.push(record)
    (line,) = await _flushed(writer, out)
    data = orjson.loads(line)
    message = " ".join(f"{k}={logfmt(v)}" for k, v in record.fields().items())
    assert data["msg"] == message
    assert data["ts"].endswith("Z") and len(data["ts"]) == len("2026-11-30T07:00:00.000Z")


async def test_a_full_buffer_drops_and_counts_without_blocking() -> None:
    writer, out = _writer(max_lines=2)
    for _ in range(5):
        writer.push(RECORDS[1])  # returns at once every time
    lines = await _flushed(writer, out)
    assert len(lines) == 3
    assert lines[-1].endswith(
        " WARNING onwards_trio.access 3 access lines dropped (the log could not keep up)"
    )


async def test_client_chosen_strings_are_redacted() -> None:
    writer, out = _writer(secrets=("client-secret-123",))
    writer.push(RequestRecord("POST", "/v1/client-secret-123/sk-abcdefghij", 200, 0.1, "x"))
    writer.push(RequestRecord("POST", "/v1/chat", 404, 0.1, "client-secret-123"))
    text = "\n".join(await _flushed(writer, out))
    assert "client-secret-123" not in text and "sk-abcdefghij" not in text
    assert text.count("***") == 3


async def test_lines_left_at_cancellation_are_written() -> None:
    writer, out = _writer()
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.push(RECORDS[0])
        nursery.cancel_scope.cancel()  # before the batch delay has passed
    assert "path=/v1/chat/completions" in out.getvalue()


async def test_lines_reach_a_regular_file(tmp_path: Path) -> None:
    # A regular file is written from the writer task itself (no thread hop): the same lines.
    path = tmp_path / "access.log"
    with path.open("w") as fh:
        handler = logging.StreamHandler(fh)
        writer = AccessWriter(handler, json=False, guard=RedactionFilter())
        for record in RECORDS:
            writer.push(record)
        lines = await _flushed(writer, path)
    messages = [line.split(" ", 3)[3] for line in lines]
    assert messages == [
        " ".join(f"{k}={logfmt(v)}" for k, v in record.fields().items()) for record in RECORDS
    ]


async def test_a_secret_added_later_is_masked_on_a_path_seen_before() -> None:
    # The guard remembers what it cleaned (paths repeat); a new secret must still be masked.
    guard = RedactionFilter()
    lines = []
    for secrets in ([], ["late-secret-456"]):
        guard.add_secrets(secrets)
        out = io.StringIO()
        writer = AccessWriter(logging.StreamHandler(out), json=False, guard=guard)
        writer.push(RequestRecord("POST", "/v1/late-secret-456/chat", 200, 0.1, "m"))
        lines += await _flushed(writer, out)
    first, second = lines
    assert "late-secret-456" in first  # not a secret yet when the first line was written
    assert "late-secret-456" not in second and "/v1/***/chat" in second


async def test_a_secret_learned_by_the_guard_is_masked_by_a_running_writer() -> None:
    # The writer keeps each path's line parts; a secret the guard learns later must still be
    # masked on the next line for that path.
    guard = RedactionFilter()
    out = io.StringIO()
    writer = AccessWriter(logging.StreamHandler(out), json=True, guard=guard)
    path = "/v1/later-secret-789/chat"
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.push(RequestRecord("POST", path, 200, 0.1, "later-secret-789"))
        with trio.fail_after(5):
            while not out.getvalue():
                await trio.sleep(0.01)
        guard.add_secrets(["later-secret-789"])
        writer.push(RequestRecord("POST", path, 200, 0.1, "later-secret-789"))
        with trio.fail_after(5):
            while out.getvalue().count("\n") < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    first, second = out.getvalue().splitlines()
    assert "later-secret-789" in first  # not a secret yet
    assert "later-secret-789" not in second and second.count("***") == 4  # msg (2), path, alias


_WHOLE = (
    b'{"id":"c","usage":{"prompt_tokens":%d,"completion_tokens":2,"total_tokens":9}}',
    b'{"id": "c", "usage": {"prompt_tokens": %d, "completion_tokens": 1, "total_tokens": 5}}',
    b'{"usage": {"input_tokens": %d, "output_tokens": 2, "cache_read_input_tokens": 3}}',
    b'{"data": [%d]}',
)


def _kept(body: bytes) -> UsageKeeper:
    keeper = UsageKeeper()
    keeper.feed(body)
    return keeper


@pytest.mark.parametrize("json", [False, True], ids=["text", "json"])
# read alone / together, with other parts of their requests / all whole bodies
@pytest.mark.parametrize("size", [3, 12, 40], ids=["few", "many-summed", "many"])
async def test_a_whole_body_handed_as_bytes_gives_the_line_a_kept_body_gives(
    json: bool, size: int
) -> None:
    """A body that came whole is handed to the line as its bytes, not a keeper: the lines
    are byte-identical, alone or summed with other parts of a request."""
    bodies = [_WHOLE[n % len(_WHOLE)] % n for n in range(size)]

    def batch(whole: bool) -> list[Fields]:
        out: list[Fields] = []
        for n, body in enumerate(bodies):
            one: bytes | UsageKeeper = body if whole else _kept(body)
            part: UsageParts = one
            if size == 12 and n % 3 == 2:  # a /v1/responses line: several parts, summed
                part = [Usage(1, 1, 1, 0), one, body if whole else _kept(body)]
            out.append(("POST", "/v1/x", 200, 0.01, "a", 0, 10, 20, 1, None, part, 1e9 + n))
        return out

    texts = []
    for whole in (False, True):
        writer, out = _writer(json=json)
        for fields in batch(whole):
            writer.add(fields)
        texts.append(await _flushed(writer, out))
    assert texts[0] == texts[1]
    assert len(texts[1]) == size and sum("input_tokens=" in line for line in texts[1]) > size // 2
