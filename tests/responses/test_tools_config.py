"""Config-declared tools: the executor over the live routing table, HTTP tools on loopback."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from onwards_trio import Targets, parse_config
from onwards_trio._loop.tools import RequestContext, ToolError, ToolErrorKind, ToolKind
from onwards_trio._responses.config_tools import ConfigToolExecutor
from tests.support import FakeUpstream, Reply, serve_app


def config(tool_url: str, **tool: Any) -> dict[str, Any]:
    return {
        "tools": {
            "lookup": {"url": tool_url, "description": "finds things", **tool},
            "helper": {"kind": "agent", "model": "small", "instructions": "be terse"},
        },
        "targets": {
            "big": {
                "url": "http://127.0.0.1:9/v1",
                "open_responses": {
                    "adapter": True,
                    "tools": {"only_big": {"url": tool_url, "parameters": {"type": "object"}}},
                },
            },
            "small": {"url": "http://127.0.0.1:9/v1"},
        },
    }


def executor(cfg: dict[str, Any]) -> tuple[Targets, ConfigToolExecutor]:
    targets = Targets(parse_config(cfg))
    return targets, ConfigToolExecutor.from_targets(targets)


async def tool_error(
    ex: ConfigToolExecutor, name: str, args: Any, *, model: str = "big"
) -> ToolError:
    """Run one call that must fail; close the executor; return the error."""
    try:
        with pytest.raises(ToolError) as info:
            await ex.execute(name, "c", args, RequestContext(model=model))
    finally:
        await ex.aclose()
    return info.value


async def test_tools_are_global_plus_alias_specific() -> None:
    _, ex = executor(config("http://127.0.0.1:9/tool"))
    try:
        big = {t.name: t for t in await ex.tools(RequestContext(model="big"))}
        small = {t.name for t in await ex.tools(RequestContext(model="small"))}
    finally:
        await ex.aclose()
    assert set(big) == {"lookup", "helper", "only_big"}
    assert small == {"lookup", "helper"}
    assert big["helper"].kind is ToolKind.AGENT
    assert big["lookup"].kind is ToolKind.HTTP
    assert big["lookup"].description == "finds things"


async def test_agent_spec_names_alias_and_instructions() -> None:
    _, ex = executor(config("http://127.0.0.1:9/tool"))
    try:
        spec = ex.agent("helper", RequestContext(model="big"))
        assert ex.agent("lookup", RequestContext(model="big")) is None
    finally:
        await ex.aclose()
    assert spec is not None
    assert (spec.model, spec.instructions) == ("small", "be terse")


async def test_http_tool_posts_arguments_and_returns_json(nursery: trio.Nursery) -> None:
    tool = FakeUpstream(Reply(body=b'{"answer": 42}'))
    url = await serve_app(nursery, tool)
    _, ex = executor(config(url + "/tool", headers={"x-secret": "s"}))
    try:
        out = await ex.execute("lookup", "call_1", {"q": "life"}, RequestContext(model="big"))
    finally:
        await ex.aclose()
    assert out == {"answer": 42}
    (req,) = tool.requests
    assert (req.method, req.path) == ("POST", "/tool")
    assert req.json() == {"q": "life"}
    assert req.headers["x-secret"] == "s"
    assert req.headers["x-tool-call-id"] == "call_1"


async def test_string_arguments_are_parsed(nursery: trio.Nursery) -> None:
    tool = FakeUpstream(Reply(body=b"{}"))
    url = await serve_app(nursery, tool)
    _, ex = executor(config(url + "/tool"))
    try:
        await ex.execute("lookup", "c", '{"a": 1}', RequestContext(model="big"))
    finally:
        await ex.aclose()
    assert tool.requests[0].json() == {"a": 1}


async def test_invalid_string_arguments_are_a_tool_error() -> None:
    err = await tool_error(executor(config("http://127.0.0.1:9/tool"))[1], "lookup", "{nope")
    assert err.kind is ToolErrorKind.INVALID_ARGUMENTS


async def test_non_json_answer_is_text(nursery: trio.Nursery) -> None:
    tool = FakeUpstream(Reply(body=b"plain words", headers=[(b"content-type", b"text/plain")]))
    url = await serve_app(nursery, tool)
    _, ex = executor(config(url + "/tool"))
    try:
        out = await ex.execute("lookup", "c", {}, RequestContext(model="big"))
    finally:
        await ex.aclose()
    assert out == "plain words"


async def test_http_error_status_is_an_execution_error(nursery: trio.Nursery) -> None:
    tool = FakeUpstream(Reply(status=503, body=b"down"))
    url = await serve_app(nursery, tool)
    err = await tool_error(executor(config(url + "/tool"))[1], "lookup", {})
    assert err.kind is ToolErrorKind.EXECUTION
    assert "HTTP 503" in str(err)


async def test_slow_tool_times_out(nursery: trio.Nursery) -> None:
    tool = FakeUpstream(Reply(body=b"{}", delay=5))
    url = await serve_app(nursery, tool)
    with trio.fail_after(3):
        err = await tool_error(executor(config(url + "/tool", timeout_secs=0.2))[1], "lookup", {})
    assert err.kind is ToolErrorKind.TIMEOUT


async def test_unreachable_tool_is_an_execution_error() -> None:
    err = await tool_error(executor(config("http://127.0.0.1:9/tool"))[1], "lookup", {})
    assert err.kind is ToolErrorKind.EXECUTION


async def test_unknown_tool_is_not_found() -> None:
    err = await tool_error(
        executor(config("http://127.0.0.1:9/tool"))[1], "only_big", {}, model="small"
    )
    assert err.kind is ToolErrorKind.NOT_FOUND


async def test_agent_tool_without_runner_is_an_execution_error() -> None:
    err = await tool_error(executor(config("http://127.0.0.1:9/tool"))[1], "helper", {})
    assert err.kind is ToolErrorKind.EXECUTION


async def test_agent_tool_with_runner_runs_it() -> None:
    seen: list[Any] = []

    async def run_agent(spec: Any, args: Any, ctx: RequestContext) -> Any:
        seen.append((spec.model, args, ctx.model))
        return {"sub": "result"}

    targets = Targets(parse_config(config("http://127.0.0.1:9/tool")))
    ex = ConfigToolExecutor.from_targets(targets, run_agent=run_agent)
    try:
        out = await ex.execute("helper", "c", {"task": "x"}, RequestContext(model="big"))
    finally:
        await ex.aclose()
    assert out == {"sub": "result"}
    assert seen == [("small", {"task": "x"}, "big")]


async def test_reload_changes_the_offered_tools() -> None:
    cfg = config("http://127.0.0.1:9/tool")
    targets, ex = executor(cfg)
    try:
        cfg2 = orjson.loads(orjson.dumps(cfg))
        del cfg2["tools"]["lookup"]
        targets.update(parse_config(cfg2))
        names = {t.name for t in await ex.tools(RequestContext(model="small"))}
    finally:
        await ex.aclose()
    assert names == {"helper"}


async def test_an_oversized_answer_is_an_execution_error(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("onwards_trio._responses.config_tools._ANSWER_LIMIT", 1000)
    tool = FakeUpstream(Reply(body=b'"' + b"x" * 5000 + b'"'))
    _, ex = executor(config(await serve_app(nursery, tool)))
    err = await tool_error(ex, "lookup", {})
    assert err.kind is ToolErrorKind.EXECUTION
    assert "more than 1000 bytes" in str(err)
