"""Logging setup, the access line and the redaction guard (unit level, no sockets)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import trio

import onwards_trio
from onwards_trio._ops import logs as _logging
from onwards_trio._ops.logs import (
    RedactionFilter,
    RequestRecord,
    collect_secrets,
    configure_logging,
    log_request,
    parse_level,
    redact,
)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger("onwards_trio")
    saved = (list(root.handlers), root.level, root.propagate, _logging._installed, _logging._writer)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]
    _logging._installed, _logging._writer = saved[3], saved[4]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("authorization: Bearer abc.DEF-123_xyz", "abc.DEF-123_xyz"),
        ("key sk-proj-AbCdEf0123456789 used", "sk-proj-AbCdEf0123456789"),
        ("calling https://bob:hunter2pass@api.example/v1", "hunter2pass"),
        ('{"api_key": "k3y-value-42"}', "k3y-value-42"),
        ("onwards_key=zzz-secret-zzz", "zzz-secret-zzz"),
        ("x-api-key: 0123abcdXYZ", "0123abcdXYZ"),
    ],
)
def test_redact_masks_credential_shapes(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert "***" in out


def test_redact_masks_exact_secrets_of_any_shape() -> None:
    assert redact("model said plainsecret99 twice", ["plainsecret99"]) == "model said *** twice"


def test_redact_masks_secrets_with_delimiters_inside() -> None:
    assert redact("token was abc/DEF+ghi=jk!", ["abc/DEF+ghi=jk"]) == "token was ***!"


def test_redact_masks_a_secret_among_thousands() -> None:
    secrets = [f"key-{i:05d}-private" for i in range(5000)]
    assert redact("url /v1/x?k=key-04321-private&y=1", secrets) == "url /v1/x?k=***&y=1"


def test_redact_ignores_too_short_secrets() -> None:
    assert redact("a b c", ["a"]) == "a b c"


def test_collect_secrets_finds_every_key_in_a_config() -> None:
    doc = {
        "auth": {"global_keys": ["g-key-1111"], "key_definitions": {"n": {"key": "def-key-2222"}}},
        "targets": {
            "a": {"url": "https://a", "onwards_key": "up-key-3333", "keys": ["lit-key-4444"]},
            "b": {"providers": [{"url": "https://b", "onwards_key": "up-key-5555"}]},
        },
        "tools": {"t": {"url": "https://t", "headers": {"authorization": "tool-cred-6666"}}},
    }
    assert collect_secrets(orjson.dumps(doc)) == {
        "g-key-1111",
        "def-key-2222",
        "up-key-3333",
        "lit-key-4444",
        "up-key-5555",
        "tool-cred-6666",
    }


def test_collect_secrets_of_broken_json_is_empty() -> None:
    assert collect_secrets(b"{nope") == set()


def test_filter_masks_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactionFilter(["very-private-key"]))
    logger = logging.getLogger("test_logging.filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("upstream said %s", "Bearer very-private-key")
        try:
            raise ValueError("bad very-private-key")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "very-private-key" not in out
    assert out.count("***") >= 2


@pytest.mark.parametrize(
    ("value", "level"),
    [
        (None, logging.INFO),
        ("DEBUG", logging.DEBUG),
        ("warning", logging.WARNING),
        ("onwards=debug,error", logging.ERROR),
    ],
)
def test_parse_level(value: str | None, level: int) -> None:
    assert parse_level(value) == level


def test_parse_level_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        parse_level("loud")


def test_level_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    monkeypatch.setenv("ONWARDS_LOG", "warning")
    configure_logging(stream=io.StringIO())
    assert logging.getLogger("onwards_trio").level == logging.WARNING


def test_explicit_level_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    monkeypatch.setenv("ONWARDS_LOG", "error")
    configure_logging("debug", stream=io.StringIO())
    assert logging.getLogger("onwards_trio").level == logging.DEBUG


def test_access_line_is_one_logfmt_line(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("info", fmt="text", stream=stream)
    log_request(
        RequestRecord(
            "POST", "/v1/chat/completions?key=qs-secret-123", 200, 0.0125, "gpt-4", 1, 120, 450
        )
    )
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(
        "INFO onwards_trio.access method=POST path=/v1/chat/completions status=200 "
        "duration_ms=12.5 alias=gpt-4 provider=1 bytes_in=120 bytes_out=450"
    )
    assert "qs-secret-123" not in lines[0]


def test_access_line_as_json(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("info", fmt="json", stream=stream)
    log_request(RequestRecord("GET", "/v1/models", 200, 0.001))
    record = orjson.loads(stream.getvalue())
    assert record["logger"] == "onwards_trio.access"
    assert (record["method"], record["path"], record["status"]) == ("GET", "/v1/models", 200)


def test_access_line_is_off_at_warning(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("warning", stream=stream)
    log_request(RequestRecord("GET", "/v1/models", 200, 0.001))
    assert stream.getvalue() == ""


def test_observers_see_every_record_even_when_logging_is_off(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[RequestRecord] = []
    monkeypatch.setattr(_logging, "request_observers", [seen.append])
    configure_logging("error", stream=io.StringIO())
    record = RequestRecord("GET", "/v1/models", 200, 0.001)
    log_request(record)
    assert seen == [record]


def test_observers_get_a_bounded_path_even_when_logging_is_off(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[RequestRecord] = []
    monkeypatch.setattr(_logging, "request_observers", [seen.append])
    configure_logging("error", stream=io.StringIO())
    log_request(RequestRecord("GET", "/v1/x?api_key=k" + "a" * 1000, 404, 0.001))
    assert seen[0].path == "/v1/x"


def test_a_failing_observer_does_not_break_the_request(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_record: RequestRecord) -> None:
        raise RuntimeError("observer bug")

    stream = io.StringIO()
    monkeypatch.setattr(_logging, "request_observers", [broken])
    configure_logging("info", stream=stream)
    log_request(RequestRecord("GET", "/v1/models", 200, 0.001))
    assert "a request observer failed" in stream.getvalue()


def test_protect_before_configure_logging_still_masks(restore_logging: None) -> None:
    onwards_trio.protect(["early-secret-41c9"])  # an embedding program may protect first
    out = io.StringIO()
    onwards_trio.configure_logging("info", stream=out)
    logging.getLogger("onwards_trio").warning("the key is early-secret-41c9")
    assert "early-secret-41c9" not in out.getvalue()
    assert "the key is" in out.getvalue()


def test_configuring_twice_keeps_one_handler(restore_logging: None) -> None:
    configure_logging("info", stream=io.StringIO())
    configure_logging("info", stream=io.StringIO())
    root = logging.getLogger("onwards_trio")
    assert sum(isinstance(h, logging.StreamHandler) for h in root.handlers) == 1


# -- the per-request exchange (what Gateway._http calls) ----------------------------------------


class _FakeRequest:
    alias = "gpt-4"
    provider_index = 1
    attempts = 2
    body = b"x" * 42


async def test_exchange_records_what_went_on_the_wire(restore_logging: None) -> None:
    from onwards_trio._ops.logs import begin_exchange, finish_exchange, note_request
    from onwards_trio._ops.metrics import Metrics

    stream = io.StringIO()
    configure_logging("info", stream=stream)
    metrics = Metrics()
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    wrapped = begin_exchange(metrics, "POST", "/v1/chat/completions", 0.0, send)
    pending = {"method": "POST", "endpoint": "/v1/chat/completions"}
    assert metrics.registry.get_sample_value("onwards_http_requests_pending", pending) == 1
    note_request(_FakeRequest())
    sse = [(b"content-type", b"text/event-stream")]
    await wrapped({"type": "http.response.start", "status": 200, "headers": sse})
    await wrapped({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    await wrapped({"type": "http.response.body", "body": b"", "more_body": False})
    finish_exchange(metrics, "POST", "/v1/chat/completions", 500, 0.5)  # failed after the head
    assert len(sent) == 3
    done = {"method": "POST", "status": "200", "endpoint": "/v1/chat/completions"}
    assert metrics.registry.get_sample_value("onwards_http_requests_total", done) == 1
    assert metrics.registry.get_sample_value("onwards_http_requests_pending", pending) == 0
    ttfb = {"alias": "gpt-4", "provider": "1"}
    count = "onwards_upstream_time_to_first_byte_seconds_count"
    assert metrics.registry.get_sample_value(count, ttfb) == 1
    line = stream.getvalue().strip()
    assert line.endswith(
        "status=200 duration_ms=500.0 alias=gpt-4 provider=1 bytes_in=42 bytes_out=9 "
        "attempts=2 stream=True"
    )


async def test_a_body_relayed_after_its_request_finished_is_not_kept_for_its_line(
    restore_logging: None,
) -> None:
    """A task the request started (a background response's model calls) runs in a copy of
    its context: a body it relays after the request's line was queued is not held for it."""
    from onwards_trio._ops.logs import begin_exchange, defer_usage, finish_exchange
    from onwards_trio._proxy.usage import UsageKeeper

    configure_logging("info", stream=io.StringIO())

    async def send(message: Any) -> None:
        pass

    kept = UsageKeeper()
    kept.feed(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}')
    later, relayed = trio.Event(), trio.Event()

    async def model_call() -> None:
        await later.wait()
        defer_usage(kept)
        relayed.set()

    async with trio.open_nursery() as nursery:
        begin_exchange(None, "POST", "/v1/responses", 0.0, send)
        nursery.start_soon(model_call)  # started while the request is current
        exchange = finish_exchange(None, "POST", "/v1/responses", 200, 0.1)
        later.set()
        with trio.fail_after(5):
            await relayed.wait()
    assert exchange.usage is None


def test_finish_without_begin_still_counts_and_logs(restore_logging: None) -> None:
    from onwards_trio._ops.logs import finish_exchange
    from onwards_trio._ops.metrics import Metrics

    stream = io.StringIO()
    configure_logging("info", stream=stream)
    metrics = Metrics()
    finish_exchange(metrics, "GET", "/v1/models", 200, 0.01)
    done = {"method": "GET", "status": "200", "endpoint": "/v1/models"}
    assert metrics.registry.get_sample_value("onwards_http_requests_total", done) == 1
    assert "method=GET path=/v1/models status=200" in stream.getvalue()
