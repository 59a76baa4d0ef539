"""The redaction guard at its edges: secrets that contain other secrets, the shortest secret
it masks, parts of a log record other than its message, and many distinct lines.

Each test kills a mutant of ``_ops/logs.py`` that survived the rest of the suite
(docs/testing-quality.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from onwards_trio import ConfigWatcher, RedactionFilter, parse_config


class Capture(logging.Handler):
    """Keeps every record that passed its filters, as the formatter would receive it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, Capture]]:
    handler = Capture()
    logger = logging.getLogger("test_redaction_edges")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


def test_a_secret_containing_another_secret_is_masked_whole() -> None:
    # Secrets with delimiters inside are masked by substring; the longer one must go first,
    # or masking the shorter leaves the rest of the longer one in the line.
    guard = RedactionFilter(["zz/zzzz", "aa/zz/zzzz"])
    assert guard.clean("key aa/zz/zzzz end") == "key *** end"


def test_a_key_containing_another_key_is_masked_whole() -> None:
    # Keys without delimiters are found as whole words; one may still contain another.
    guard = RedactionFilter(["zzzzzz", "aazzzzzz"])
    assert guard.clean("keys aazzzzzz and zzzzzz") == "keys *** and ***"


def test_a_six_character_key_is_masked() -> None:
    guard = RedactionFilter(["k3y-42"])
    assert guard.clean("used k3y-42 today") == "used *** today"


def test_the_guard_masks_every_line_past_the_lines_it_remembers() -> None:
    # The guard remembers the lines it cleaned, up to a bound; past it, it starts over.
    guard = RedactionFilter(["private-key-777"])
    for i in range(3000):
        assert guard.clean(f"/v1/{i}/private-key-777") == f"/v1/{i}/***"


def test_a_stack_trace_in_a_record_is_masked(
    captured: tuple[logging.Logger, Capture],
) -> None:
    logger, handler = captured
    handler.addFilter(RedactionFilter(["stack-secret-31337"]))
    logger.info("where", stack_info=True)  # this source line, stack-secret-31337, is in it
    (record,) = handler.records
    assert record.stack_info is not None
    assert "test_a_stack_trace_in_a_record_is_masked" in record.stack_info
    assert "stack-secret-31337" not in record.stack_info
    assert "# this source line, ***, is in it" in record.stack_info


def test_a_traceback_reaches_the_handler_already_masked(
    captured: tuple[logging.Logger, Capture],
) -> None:
    # The guard formats the traceback itself and masks it: a handler's formatter then uses
    # that text instead of formatting the exception again, unmasked.
    logger, handler = captured
    handler.addFilter(RedactionFilter(["trace-secret-1618"]))
    try:
        raise ValueError("refused trace-secret-1618")
    except ValueError:
        logger.exception("failed")
    (record,) = handler.records
    assert record.exc_text is not None
    assert "ValueError: refused ***" in record.exc_text
    assert "trace-secret-1618" not in record.exc_text


def test_the_access_fields_of_a_record_are_masked(
    captured: tuple[logging.Logger, Capture],
) -> None:
    # The access line's fields (``extra={"fields": ...}``) become top-level keys of a JSON
    # line, so they are masked like the message.
    logger, handler = captured
    handler.addFilter(RedactionFilter(["field-secret-2718"]))
    fields = {"path": "/v1/field-secret-2718/chat", "status": 200}
    logger.info("access", extra={"fields": fields})
    (record,) = handler.records
    assert record.__dict__["fields"] == {"path": "/v1/***/chat", "status": 200}


async def test_a_tool_header_is_a_secret_whatever_its_name(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Tool endpoints carry credentials in headers of any name; a rejected reload that echoes
    # one back (here pasted into a url) must not log it.
    path = tmp_path / "config.json"
    path.write_bytes(orjson.dumps({"targets": {"a": {"url": "https://a.example/v1"}}}))
    watcher = ConfigWatcher(path, lambda config: None, current=parse_config(path.read_bytes()))
    await nursery.start(watcher.run)
    credential = "tenant-cred-7f3a9c"
    bad = {
        "targets": {"a": {"url": credential}},
        "tools": {"t": {"url": "https://t.example", "headers": {"X-Tenant": credential}}},
    }
    with caplog.at_level(logging.INFO, logger="onwards_trio"):
        path.write_bytes(orjson.dumps(bad))
        await trio.sleep(2)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "url must start with" in text
    assert credential not in text
