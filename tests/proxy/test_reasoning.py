"""Per-provider reasoning translation: a provider's ``reasoning`` config decides how an effort
(Chat ``reasoning_effort``, Responses ``reasoning.effort``, Anthropic ``thinking``) reaches it;
the config is validated at load."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from onwards_trio import ConfigError, parse_config

from ..support import FakeUpstream, serve_app, start_gateway

CHAT = "/v1/chat/completions"


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


async def post(
    nursery: trio.Nursery, target: dict[str, Any], path: str, body: dict[str, Any]
) -> tuple[httpx.Response, FakeUpstream]:
    upstream = FakeUpstream()
    url = await serve_app(nursery, upstream)
    spec = {**target}
    spec["providers"] = [{"url": url + "/v1", **p} for p in target["providers"]]
    _, gw_url = await start_gateway(nursery, {"targets": {"m": spec}, "store": {"kind": "memory"}})
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(gw_url + path, json=body)
    return r, upstream


# -- config ---------------------------------------------------------------------------------------


AT = "@ $.targets.m.providers[0].reasoning"


@pytest.mark.parametrize(
    ("reasoning", "problem", "where"),
    [
        ({"efforts": {"huge": "high"}}, "unknown effort 'huge'", AT),
        ({"style": "field"}, "style 'field' needs a 'field'", AT),
        ({"style": "thinking_token_budget", "efforts": {"low": "1k"}}, "efforts.low must be", AT),
        ({"style": "field", "field": "a..b"}, "dotted path of names, got 'a..b'", AT),
        ({"style": "sometimes"}, "must be one of 'reasoning_effort'", AT + ".style"),
    ],
)
def test_invalid_reasoning_config_is_refused_naming_the_path(
    reasoning: dict[str, Any], problem: str, where: str
) -> None:
    config = {"targets": {"m": {"providers": [{"url": "http://x", "reasoning": reasoning}]}}}
    with pytest.raises(ConfigError) as info:
        parse_config(config)
    (line,) = info.value.problems
    assert problem in line
    assert line.endswith(where)


# -- chat completions -----------------------------------------------------------------------------


async def test_vendor_field_receives_the_effort(nursery: trio.Nursery) -> None:
    field = {"style": "field", "field": "chat_template_kwargs.reasoning_effort"}
    r, upstream = await post(
        nursery,
        {"providers": [{"reasoning": field}]},
        CHAT,
        chat_body(reasoning_effort="high", chat_template_kwargs={"enable_thinking": True}),
    )
    assert r.status_code == 200
    sent = upstream.requests[0].json()
    assert "reasoning_effort" not in sent
    assert sent["chat_template_kwargs"] == {"enable_thinking": True, "reasoning_effort": "high"}


async def test_efforts_map_values_and_null_sends_nothing(nursery: trio.Nursery) -> None:
    efforts = {"efforts": {"none": None, "xhigh": "high"}}
    target = {"providers": [{"reasoning": efforts}]}
    _, upstream = await post(nursery, target, CHAT, chat_body(reasoning_effort="xhigh"))
    assert upstream.requests[0].json()["reasoning_effort"] == "high"
    _, upstream = await post(nursery, target, CHAT, chat_body(reasoning_effort="none"))
    assert "reasoning_effort" not in upstream.requests[0].json()


async def test_effort_the_provider_does_not_take_is_a_400(nursery: trio.Nursery) -> None:
    target = {"providers": [{"reasoning": {"efforts": {"low": "low", "high": "high"}}}]}
    r, upstream = await post(nursery, target, CHAT, chat_body(reasoning_effort="medium"))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "reasoning_effort"
    assert upstream.requests == []


async def test_budget_style_gets_a_token_budget_for_an_effort(nursery: trio.Nursery) -> None:
    target = {"providers": [{"reasoning": {"style": "thinking_token_budget"}}]}
    _, upstream = await post(nursery, target, CHAT, chat_body(reasoning_effort="medium"))
    sent = upstream.requests[0].json()
    assert (sent.get("reasoning_effort"), sent["thinking_token_budget"]) == (None, 8192)


async def test_pool_reasoning_is_the_default_of_its_providers(nursery: trio.Nursery) -> None:
    pool = {
        "reasoning": {"style": "field", "field": "reasoning.effort"},
        "providers": [{}],
    }
    _, upstream = await post(nursery, pool, CHAT, chat_body(reasoning_effort="low"))
    assert upstream.requests[0].json()["reasoning"] == {"effort": "low"}


async def test_providers_without_reasoning_config_get_the_body_verbatim(
    nursery: trio.Nursery,
) -> None:
    raw = b'{"model":"m",  "messages":[], "reasoning_effort":"turbo"}'
    upstream = FakeUpstream()
    url = await serve_app(nursery, upstream)
    _, gw_url = await start_gateway(nursery, {"targets": {"m": {"url": url + "/v1"}}})
    async with httpx.AsyncClient(timeout=10) as http:
        await http.post(gw_url + CHAT, content=raw, headers={"content-type": "application/json"})
    assert upstream.requests[0].body == raw


# -- responses ------------------------------------------------------------------------------------


async def test_responses_effort_goes_through_the_provider_mapping(nursery: trio.Nursery) -> None:
    target = {
        "open_responses": {"adapter": True},
        "providers": [{"reasoning": {"style": "field", "field": "chat_template_kwargs.effort"}}],
    }
    body = {"model": "m", "input": "hi", "reasoning": {"effort": "high"}, "store": False}
    r, upstream = await post(nursery, target, "/v1/responses", body)
    assert r.status_code == 200
    sent = upstream.requests[0].json()
    assert sent["chat_template_kwargs"] == {"effort": "high"}
    assert "reasoning_effort" not in sent


async def test_responses_unknown_effort_is_a_400_naming_it(nursery: trio.Nursery) -> None:
    target = {"open_responses": {"adapter": True}, "providers": [{}]}
    body = {"model": "m", "input": "hi", "reasoning": {"effort": "enormous"}}
    r, upstream = await post(nursery, target, "/v1/responses", body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "reasoning.effort"
    assert upstream.requests == []
