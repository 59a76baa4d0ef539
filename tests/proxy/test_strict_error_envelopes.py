"""Strict mode's request errors carry the whole OpenAI error envelope, over real sockets:
the type, the code and the message a client's SDK branches on, not only the status."""

from __future__ import annotations

import orjson
import trio

from tests.proxy.test_strict_http import CHAT, body, plain


async def test_a_wrong_content_type_is_a_415_naming_the_expected_type(
    nursery: trio.Nursery,
) -> None:
    client, _ = await plain(nursery)
    async with client:
        r = await client.post(
            CHAT, content=orjson.dumps(body()), headers={"content-type": "text/plain"}
        )
    assert r.status_code == 415
    assert r.json() == {
        "error": {
            "message": "Unsupported content type: expected 'application/json'.",
            "type": "invalid_request_error",
            "param": None,
            "code": "unsupported_media_type",
        }
    }


async def test_malformed_json_is_a_400_with_the_bad_request_code(nursery: trio.Nursery) -> None:
    client, _ = await plain(nursery)
    async with client:
        r = await client.post(CHAT, content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith("Malformed JSON body: ")
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        None,
        "bad_request",
    )


async def test_a_schema_error_is_a_422_with_the_unprocessable_request_code(
    nursery: trio.Nursery,
) -> None:
    client, _ = await plain(nursery)
    async with client:
        r = await client.post(CHAT, json={"model": "gpt-4", "messages": [{"content": "x"}]})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["message"].startswith("Invalid request: ")
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "messages[0].role",
        "unprocessable_request",
    )
