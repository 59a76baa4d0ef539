"""Durable background responses with real processes: a gateway (the CLI) is killed in the middle
of an agent loop and a new one on the same SQLite file finishes the response — every completed
step ran exactly once (the fake model and tool count their calls) and the event log has no gap.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import psycopg
import pytest
import trio

from tests.responses.gateway_process import (
    GatewayProcess,
    ToolServer,
    agent_upstream,
    events_of,
    model_calls,
    wait_until,
    write_config,
)
from tests.stores.test_store_postgres import fresh_schema, needs_postgres
from tests.support import FakeUpstream, serve_app

BODY = {"model": "m", "input": "what is it?", "background": True}


async def servers(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream, tool: ToolServer, **extra: Any
) -> Path:
    up_url = await serve_app(nursery, upstream)
    tool_url = await serve_app(nursery, tool)
    store = {"kind": "sqlite", "path": str(tmp_path / "store.sqlite3")}
    return write_config(tmp_path / "config.json", up_url, tool_url, store, **extra)


async def start_background(gateway: GatewayProcess) -> str:
    created = await gateway.post("/v1/responses", BODY)
    assert created.status_code == 200, created.text
    return str(created.json()["id"])


class InAToolCall(NamedTuple):
    """A gateway process whose background response ``rid`` is inside a (held) tool call."""

    upstream: FakeUpstream
    tool: ToolServer
    config: Path
    first: GatewayProcess
    rid: str


async def in_a_tool_call(
    nursery: trio.Nursery, tmp_path: Path, *, grace: float = 1.0, **extra: Any
) -> InAToolCall:
    upstream, tool = agent_upstream(), ToolServer()
    config = await servers(nursery, tmp_path, upstream, tool, **extra)
    tool.hold = True
    first = await GatewayProcess(config, grace=grace).start(nursery)
    rid = await start_background(first)
    with trio.fail_after(30):
        await tool.called.wait()
    return InAToolCall(upstream, tool, config, first, rid)


async def assert_gapless_events(gateway: GatewayProcess, response_id: str) -> list[str]:
    """The whole stored stream: sequence numbers 0, 1, 2, … and exactly one start and end."""
    replay = await gateway.get(f"/v1/responses/{response_id}?stream=true&starting_after=-1")
    events = events_of(replay.text)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds.count("response.created") == 1 and kinds[0] == "response.created"
    assert kinds[-1] == "response.completed" and kinds.count("response.completed") == 1
    return kinds


async def test_killed_in_a_model_call_the_restarted_gateway_finishes_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    upstream, tool = agent_upstream(slow_answers=1), ToolServer()
    config = await servers(nursery, tmp_path, upstream, tool)
    first = await GatewayProcess(config).start(nursery)
    rid = await start_background(first)
    # The answer is streaming (slowly) when the process dies.
    await wait_until(lambda: model_calls(upstream) == (1, 1) and upstream.active == 1)
    await first.stop(signal.SIGKILL)

    second = await GatewayProcess(config).start(nursery)
    final = await second.wait_finished(rid)
    assert final["status"] == "completed", second.log()
    assert final["output"][-1]["content"][0]["text"] == "the answer is 42 indeed"
    # The tool call and the first model call completed before the kill: never again. The
    # interrupted answer was asked again, once.
    assert tool.calls == 1
    assert model_calls(upstream) == (1, 2)
    await assert_gapless_events(second, rid)


@pytest.mark.parametrize("idempotent", [False, True])
async def test_killed_in_a_tool_call_it_is_rerun_only_when_idempotent(
    nursery: trio.Nursery, tmp_path: Path, idempotent: bool
) -> None:
    upstream, tool, config, first, rid = await in_a_tool_call(
        nursery, tmp_path, idempotent=idempotent
    )
    await first.stop(signal.SIGKILL)
    tool.hold = False

    second = await GatewayProcess(config).start(nursery)
    final = await second.wait_finished(rid)
    assert final["status"] == "completed", second.log()
    assert model_calls(upstream) == (1, 1)
    tool_output = next(i for i in final["output"] if i["type"] == "function_call_output")
    sent_to_model = upstream.requests[-1].json()["messages"][-1]
    if idempotent:
        assert tool.calls == 2
        assert orjson.loads(tool_output["output"]) == {"answer": 42}
    else:
        # Not safe to repeat: recorded failed, and the model is told so.
        assert tool.calls == 1
        assert tool_output["status"] == "incomplete"
        assert "interrupted" in sent_to_model["content"]
        assert "not declared idempotent" in sent_to_model["content"]
    await assert_gapless_events(second, rid)


async def test_killed_between_steps_no_completed_step_runs_again(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    upstream, tool = agent_upstream(), ToolServer()
    config = await servers(nursery, tmp_path, upstream, tool)
    first = await GatewayProcess(config).start(nursery)
    rid = await start_background(first)
    with trio.fail_after(30):
        await tool.answered.wait()  # the tool step is done (or being recorded as done)
    await first.stop(signal.SIGKILL)

    second = await GatewayProcess(config).start(nursery)
    final = await second.wait_finished(rid)
    assert final["status"] == "completed", second.log()
    assert tool.calls == 1
    assert model_calls(upstream)[0] == 1
    await assert_gapless_events(second, rid)


async def test_sigterm_hands_the_response_over_to_the_restarted_gateway(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    upstream, tool, config, first, rid = await in_a_tool_call(nursery, tmp_path, idempotent=True)
    assert await first.stop(signal.SIGTERM) == 0
    assert "handed over" in first.log()
    tool.hold = False

    second = await GatewayProcess(config).start(nursery)
    final = await second.wait_finished(rid)
    assert final["status"] == "completed", second.log()
    assert model_calls(upstream) == (1, 1)
    await assert_gapless_events(second, rid)


async def test_on_shutdown_cancel_stores_the_response_cancelled(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    _, tool, config, first, rid = await in_a_tool_call(nursery, tmp_path, on_shutdown="cancel")
    assert await first.stop(signal.SIGTERM) == 0

    second = await GatewayProcess(config).start(nursery)
    final = await second.wait_finished(rid)
    assert final["status"] == "cancelled"
    assert tool.calls == 1


async def test_a_response_interrupted_too_often_is_failed_with_a_clear_error(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    _, tool, config, first, rid = await in_a_tool_call(nursery, tmp_path, max_recovery_attempts=0)
    await first.stop(signal.SIGKILL)

    second = await GatewayProcess(config).start(nursery)
    final = await second.wait_finished(rid)
    assert final["status"] == "failed"
    assert final["error"]["code"] == "recovery_failed"
    assert "interrupted 1 times" in final["error"]["message"]
    replay = await second.get(f"/v1/responses/{rid}?stream=true&starting_after=-1")
    events = events_of(replay.text)
    assert events[-1]["type"] == "response.failed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert tool.calls == 1


# -- two gateways on one PostgreSQL database ------------------------------------------------------


def _owners(dsn: str) -> dict[str, str | None]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT response_id, owner FROM oresp_leases").fetchall()
    return {str(r[0]): r[1] for r in rows}


@needs_postgres
async def test_two_gateways_on_postgres_the_survivor_claims_and_finishes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    upstream, tool = agent_upstream(), ToolServer()
    async with fresh_schema() as dsn:
        up_url = await serve_app(nursery, upstream)
        tool_url = await serve_app(nursery, tool)
        config = write_config(
            tmp_path / "config.json",
            up_url,
            tool_url,
            {"kind": "postgres", "dsn": dsn},
            idempotent=True,
        )
        tool.hold = True
        a = await GatewayProcess(config).start(nursery)
        b = await GatewayProcess(config).start(nursery)
        on_a = [await start_background(a) for _ in range(3)]
        on_b = [await start_background(b) for _ in range(2)]
        await wait_until(lambda: tool.calls == 5)  # every response is in its tool call
        owners = await trio.to_thread.run_sync(_owners, dsn)
        owner_a = owners[on_a[0]]
        assert {owners[r] for r in on_a} == {owner_a} and owner_a not in {owners[r] for r in on_b}
        tool.hold = False
        await a.stop(signal.SIGKILL)
        killed = trio.current_time()
        with trio.fail_after(30):
            while any(o == owner_a for o in (await trio.to_thread.run_sync(_owners, dsn)).values()):
                await trio.sleep(0.05)
        claimed_after = trio.current_time() - killed
        assert claimed_after <= 2.0 + 1.0  # lease_secs + 1 s
        for rid in on_a + on_b:
            final = await b.wait_finished(rid)
            assert final["status"] == "completed", b.log()
        # Never both: each response made its first model call once, its final one once, and
        # its (idempotent) tool call once more only if its owner died in it.
        assert model_calls(upstream) == (5, 5)
        assert tool.calls == 5 + len(on_a)
        for rid in on_a:
            await assert_gapless_events(b, rid)


async def test_a_recovered_response_is_cancelled_like_a_fresh_one(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    upstream, tool, config, first, rid = await in_a_tool_call(nursery, tmp_path, idempotent=True)
    await first.stop(signal.SIGKILL)

    second = await GatewayProcess(config).start(nursery)
    await wait_until(lambda: tool.calls == 2)  # resumed: the idempotent call is made again
    cancelled = await second.post(f"/v1/responses/{rid}/cancel", {})
    assert cancelled.json()["status"] == "cancelled"
    assert (await second.wait_finished(rid))["status"] == "cancelled"
    assert model_calls(upstream) == (1, 0)


async def test_sigterm_lets_a_response_finish_within_the_grace(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    upstream, tool, config, first, rid = await in_a_tool_call(nursery, tmp_path, grace=30)
    first.signal(signal.SIGTERM)
    await wait_until(lambda: "draining" in first.log())
    tool.release()  # the response finishes during the drain
    assert await first.exited() == 0
    assert "handed over" not in first.log()

    second = await GatewayProcess(config).start(nursery)
    final = await second.wait_finished(rid)
    assert final["status"] == "completed"
    assert (tool.calls, model_calls(upstream)) == (1, (1, 1))
