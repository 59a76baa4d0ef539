"""A request observer (``_ops.logs.request_observers``) gets every finished request's
access-line fields, its token usage included, even when nothing else reads that usage: no
access log, no metrics, no tracing."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import httpx
import pytest
import trio

from onwards_trio._ops import logs as _logging
from onwards_trio._ops.logs import RequestRecord, configure_logging
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, start_gateway

USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


@pytest.fixture
def quiet_logging() -> Iterator[None]:
    """Access lines off (level ``error``), the logging set-up restored afterwards."""
    root = logging.getLogger("onwards_trio")
    saved = (list(root.handlers), root.level, root.propagate, _logging._installed, _logging._writer)
    configure_logging("error", stream=io.StringIO())
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]
    _logging._installed, _logging._writer = saved[3], saved[4]


@pytest.mark.usefixtures("quiet_logging")
async def test_an_observer_gets_the_tokens_with_the_access_log_off(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[RequestRecord] = []
    monkeypatch.setattr(_logging, "request_observers", [seen.append])
    upstream = FakeUpstream(Reply(body=chat_completion(usage=USAGE)))
    _, url = await start_gateway(
        nursery, {"targets": {"m": {"url": await serve_app(nursery, upstream)}}}
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    with trio.fail_after(10):
        while not seen:  # the record is made once the answer is out
            await trio.sleep(0.01)
    (record,) = seen
    assert (record.input_tokens, record.output_tokens) == (3, 5)
