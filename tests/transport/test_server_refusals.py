"""The built-in server's own refusals read as any HTTP client reads them, over real loopback
sockets: a status line, a content-length that frames the body exactly, and a JSON error
envelope that parses (h11 as the client's parser, not a substring search)."""

from __future__ import annotations

from typing import Any

import h11
import orjson
import pytest
import trio

from tests.transport.raw import connect, echo_app, start


async def refusal(port: int, request: bytes) -> tuple[h11.Response, Any]:
    client = h11.Connection(h11.CLIENT)
    body = b""
    async with await connect(port) as s:
        await s.send_all(request)
        response: h11.Response | None = None
        with trio.fail_after(10):
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await s.receive_some())
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
    assert response is not None
    return response, orjson.loads(body)


@pytest.mark.parametrize(
    ("request_", "status", "message", "code"),
    [
        (
            b"GET / HTTP/1.1\r\nhost: h\r\nbad name: 1\r\n\r\n",
            400,
            "Malformed HTTP request.",
            "bad_request",
        ),
        (
            b"GET / HTTP/1.1\r\nhost: h\r\nx-big: " + b"v" * 70_000 + b"\r\n\r\n",
            431,
            "The request head is too large.",
            "request_header_fields_too_large",
        ),
    ],
    ids=["malformed", "head too large"],
)
async def test_a_refusal_is_a_framed_json_error_envelope(
    nursery: trio.Nursery, request_: bytes, status: int, message: str, code: str
) -> None:
    port = await start(nursery, echo_app([]))
    response, error = await refusal(port, request_)
    assert response.status_code == status
    assert (b"content-type", b"application/json") in response.headers
    assert (b"connection", b"close") in response.headers
    assert error == {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": code,
        }
    }
