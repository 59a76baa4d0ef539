"""Embedding the library in a Trio application, through the public names only."""

from __future__ import annotations

from functools import partial

import httpx
import pytest
import trio

import onwards_trio as ot
from tests.responses.test_responses_api import text_reply
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, start_gateway


def test_every_public_name_is_exported() -> None:
    for name in ot.__all__:
        assert getattr(ot, name) is not None, name
    assert {"Gateway", "run_response_loop", "ChannelSink", "MemoryStore", "SqliteStore"} <= set(
        ot.__all__
    )


async def test_a_loop_runs_its_model_calls_through_the_gateway_pipeline(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream(Reply(body=chat_completion("from the pool", model="real")))
    gateway, _ = await start_gateway(
        nursery,
        {
            "targets": {
                "assistant": {
                    "url": await serve_app(nursery, up),
                    "onwards_key": "sk-upstream",
                    "onwards_model": "real",
                    "keys": ["sk-client"],
                }
            }
        },
    )
    store = ot.MemoryStore()
    await store.begin_response(
        "r1", {"model": "assistant", "messages": [{"role": "user", "content": "hi"}]}
    )
    send, receive = trio.open_memory_channel[ot.LoopEvent](64)
    result = await ot.run_response_loop(
        store,
        ot.NoOpToolExecutor(),
        ot.RequestContext(model="assistant"),
        gateway.model_transport(api_key="sk-client"),
        request_id="r1",
        sink=ot.ChannelSink(send),
    )
    send.close()
    kinds = [event.kind async for event in receive]
    # routed by alias with upstream auth and model rewrite, like any proxied request
    assert up.requests[0].headers["authorization"] == "Bearer sk-upstream"
    assert up.requests[0].json()["model"] == "real"
    assert kinds[0] == ot.LoopEventKind.CREATED
    assert kinds[-1] == ot.LoopEventKind.COMPLETED
    assert "from the pool" in str(result)
    steps = await store.list_chain("r1", None)
    assert [s.state for s in steps] == [ot.StepState.COMPLETED]


async def test_a_loop_without_the_key_fails_at_the_gateway_auth(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    gateway, _ = await start_gateway(
        nursery, {"targets": {"a": {"url": await serve_app(nursery, up), "keys": ["k"]}}}
    )
    store = ot.MemoryStore()
    await store.begin_response("r2", {"model": "a", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(ot.LoopError):
        await ot.run_response_loop(
            store,
            ot.NoOpToolExecutor(),
            ot.RequestContext(model="a"),
            gateway.model_transport(),
            request_id="r2",
        )
    steps = await store.list_chain("r2", None)
    assert steps and steps[0].state == ot.StepState.FAILED
    assert up.requests == []


async def test_under_hypercorn_background_responses_just_work(nursery: trio.Nursery) -> None:
    # A plain ASGI app under an ASGI server: the lifespan protocol opens the service nursery
    # that detached (background) responses run in; no `gateway.running()` needed.
    up = FakeUpstream(lambda rec: text_reply(rec, "done in the background"))
    config = {
        "targets": {
            "m": {"url": await serve_app(nursery, up), "open_responses": {"adapter": True}}
        },
        "store": {"kind": "memory"},
    }
    gateway = ot.Gateway(ot.parse_config(config))
    url = await serve_app(nursery, gateway)  # hypercorn, with its lifespan startup
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        body = {"model": "m", "input": "x", "background": True}
        queued = (await client.post("/v1/responses", json=body)).json()
        with trio.fail_after(10):
            while True:
                got = (await client.get(f"/v1/responses/{queued['id']}")).json()
                if got["status"] != "queued" and got["status"] != "in_progress":
                    break
                await trio.sleep(0.05)
    assert queued["status"] == "queued"
    assert got["status"] == "completed"
    assert got["output"][0]["content"][0]["text"] == "done in the background"


async def test_serve_with_a_metrics_port_reports_a_scrape_url(nursery: trio.Nursery) -> None:
    gateway = ot.Gateway(ot.parse_config({"targets": {"m": {"url": "http://127.0.0.1:9"}}}))
    serve = partial(gateway.serve, "127.0.0.1", 0, metrics_port=0, metrics=ot.Metrics("embed"))
    info: ot.ServeInfo = await nursery.start(serve)
    assert info.metrics_url is not None
    async with httpx.AsyncClient(timeout=10) as client:
        await client.get(f"{info.url}/v1/models")
        scrape = await client.get(info.metrics_url)
    assert 'embed_http_requests_total{endpoint="/v1/models",method="GET",status="200"} 1.0' in (
        scrape.text
    )
