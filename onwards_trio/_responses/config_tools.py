"""Server-side tools declared in the config (SPEC §3.3): a :class:`ToolExecutor` with no code.

``"tools": {name: {...}}`` at the top level applies to every alias; ``open_responses.tools`` on a
pool (or its first provider) adds or overrides tools for that alias. The routing table already
merges both into ``Pool.tools``; this executor reads the *live* table on every call, so a config
reload changes the tools offered to the next request without restarting anything.

* ``kind: http`` — the JSON arguments are POSTed to ``url`` (with the configured ``headers``);
  the JSON answer is the tool output (a non-JSON answer is returned as text). Non-2xx, transport
  errors and ``timeout_secs`` become :class:`ToolError`, which the loop hands back to the model
  as the tool's output — a broken tool never breaks the response.
* ``kind: agent`` — listed with ``ToolKind.AGENT``: the loop runs a sub-agent loop under the tool
  step instead of calling :meth:`ConfigToolExecutor.execute`. :meth:`ConfigToolExecutor.agent`
  tells the sub-loop's transition which alias and instructions to use. A host that does not
  recurse can pass ``run_agent`` to make ``execute`` run the sub-agent itself.
* ``kind: mcp`` — every tool the MCP server at ``url`` lists (``allowed_tools`` applied), named
  ``<name>__<tool>``. Listings come from the gateway's :class:`McpToolCache`; a server that
  cannot list is left out of the offer (logged), not an error. A call goes through the
  response's MCP session (:class:`McpSessions` in the request context), or a session of its
  own for hosts that run the loop without one; ``isError`` and failures become
  :class:`ToolError`, so the model sees the server's text.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import httpx
import orjson
import trio

from onwards_trio._config import ToolSpec
from onwards_trio._loop.tools import RequestContext, ToolError, ToolKind, ToolSchema
from onwards_trio._responses.mcp_client import (
    McpServer,
    McpSessions,
    McpTool,
    McpToolCache,
    McpUnavailable,
    qualified_name,
)
from onwards_trio._responses.mcp_tools import run_call
from onwards_trio._responses.mcp_tools import tool_schema as mcp_tool_schema

__all__ = ["AgentSpec", "ConfigToolExecutor", "ToolTable", "tool_schema"]

log = logging.getLogger("onwards_trio.tools")

_ANSWER_LIMIT = 8 * 1024 * 1024
_ERROR_TEXT_LIMIT = 500


class ToolTable(Protocol):
    """Where the declared tools come from: ``alias → {name → ToolSpec}`` plus the globals."""

    def tools_for(self, alias: str | None) -> Mapping[str, ToolSpec]: ...


@attrs.frozen
class AgentSpec:
    """How to run a ``kind: agent`` tool: on ``model`` (an alias), with ``instructions``."""

    name: str
    model: str
    instructions: str | None


AgentRunner = Callable[[AgentSpec, Any, RequestContext], Awaitable[Any]]


def mcp_server(name: str, spec: ToolSpec) -> McpServer:
    """The MCP server behind a ``kind: mcp`` tool entry."""
    assert spec.url is not None  # checked when the config was loaded
    return McpServer(
        label=name,
        url=spec.url,
        headers=tuple(sorted(spec.headers.items())),
        timeout=spec.timeout_secs,
        protocol=spec.protocol,
        allowed_tools=frozenset(spec.allowed_tools) if spec.allowed_tools is not None else None,
    )


def tool_schema(name: str, spec: ToolSpec) -> ToolSchema:
    """The loop's view of a declared tool."""
    return ToolSchema(
        name=name,
        description=spec.description,
        parameters=dict(spec.parameters),
        strict=spec.strict,
        kind=ToolKind.AGENT if spec.kind == "agent" else ToolKind.HTTP,
        idempotent=spec.idempotent,
    )


class ConfigToolExecutor:
    """Runs config-declared tools for the alias in ``ctx.model``.

    ``table`` is anything with ``tools_for(alias)``; :meth:`from_targets` adapts the gateway's
    live :class:`~onwards_trio._proxy.targets.Targets`. ``client`` is borrowed when given (the
    caller closes it); otherwise the executor owns one and :meth:`aclose` closes it.
    """

    def __init__(
        self,
        table: ToolTable,
        *,
        client: httpx.AsyncClient | None = None,
        run_agent: AgentRunner | None = None,
        mcp_cache: McpToolCache | None = None,
    ) -> None:
        self._table = table
        self.mcp_cache = mcp_cache if mcp_cache is not None else McpToolCache()
        self._owns_client = client is None
        # Timeouts are enforced per tool with trio.fail_after; httpx's own must not cut first.
        self._client = client or httpx.AsyncClient(timeout=None, follow_redirects=False)
        self._run_agent = run_agent

    @classmethod
    def from_targets(cls, targets: Any, **kw: Any) -> ConfigToolExecutor:
        """An executor over a live ``Targets`` (reads ``targets.table`` on every call)."""
        return cls(_TargetsTools(targets), **kw)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def _spec(self, name: str, ctx: RequestContext) -> ToolSpec:
        spec = self._table.tools_for(ctx.model).get(name)
        if spec is None:
            raise ToolError.not_found(name)
        return spec

    async def tools(self, ctx: RequestContext) -> Sequence[ToolSchema]:
        await trio.lowlevel.checkpoint_if_cancelled()  # a listing, no I/O: no task switch
        out: list[ToolSchema] = []
        for name, spec in self._table.tools_for(ctx.model).items():
            if spec.kind == "mcp":
                out.extend(mcp_tool_schema(t) for t in await self._mcp_tools(name, spec, ctx))
            else:
                out.append(tool_schema(name, spec))
        return out

    def has_mcp(self, ctx: RequestContext) -> bool:
        """Whether this request's alias has MCP servers among its tools."""
        return any(s.kind == "mcp" for s in self._table.tools_for(ctx.model).values())

    async def _mcp_tools(self, name: str, spec: ToolSpec, ctx: RequestContext) -> list[McpTool]:
        try:
            return await self.mcp_cache.tools(mcp_server(name, spec), ctx.extension(McpSessions))
        except McpUnavailable as exc:
            log.warning("%s; its tools are not offered", exc)
            return []

    async def _mcp_tool(self, name: str, ctx: RequestContext) -> McpTool | None:
        """The MCP tool a qualified ``name`` stands for, if any."""
        for server, spec in self._table.tools_for(ctx.model).items():
            if spec.kind == "mcp" and name.startswith(qualified_name(server, "")):
                for tool in await self._mcp_tools(server, spec, ctx):
                    if tool.qualified == name:
                        return tool
        return None

    def agent(self, name: str, ctx: RequestContext) -> AgentSpec | None:
        """The sub-agent behind tool ``name`` for this request, or ``None`` if not an agent."""
        spec = self._table.tools_for(ctx.model).get(name)
        if spec is None or spec.kind != "agent" or spec.model is None:
            return None
        return AgentSpec(name=name, model=spec.model, instructions=spec.instructions)

    async def execute(self, name: str, tool_call_id: str, args: Any, ctx: RequestContext) -> Any:
        spec = self._table.tools_for(ctx.model).get(name)
        mcp = await self._mcp_tool(name, ctx) if spec is None or spec.kind == "mcp" else None
        if mcp is None:
            spec = self._spec(name, ctx)
            if spec.kind == "mcp":
                raise ToolError.not_found(name)  # a server's name is not one of its tools
        if isinstance(args, str):
            try:
                args = orjson.loads(args) if args.strip() else {}
            except orjson.JSONDecodeError as exc:
                raise ToolError.invalid_arguments(str(exc)) from None
        if mcp is not None:
            if not isinstance(args, Mapping):
                raise ToolError.invalid_arguments("the arguments must be a JSON object")
            result = await run_call(ctx.extension(McpSessions), mcp, args)
            return result.output()
        assert spec is not None
        if spec.kind == "agent":
            agent = self.agent(name, ctx)
            if self._run_agent is None or agent is None:
                raise ToolError.execution(f"agent tool {name!r} runs as a sub-loop")
            return await self._run_agent(agent, args, ctx)
        return await self._http(name, spec, tool_call_id, args)

    async def _http(self, name: str, spec: ToolSpec, tool_call_id: str, args: Any) -> Any:
        assert spec.url is not None  # checked when the config was loaded
        headers = {
            "content-type": "application/json",
            "accept": "application/json",
            # A stable id per call: tool servers can use it to make retries idempotent.
            "x-tool-call-id": tool_call_id,
            **spec.headers,
        }
        try:
            with trio.fail_after(spec.timeout_secs):
                status, content = await self._post(spec.url, orjson.dumps(args), headers)
        except trio.TooSlowError:
            raise ToolError.timeout(
                f"{name} did not answer within {spec.timeout_secs:g}s"
            ) from None
        except httpx.HTTPError as exc:
            raise ToolError.execution(f"{name}: {type(exc).__name__}") from None
        if content is None:
            raise ToolError.execution(f"{name} answered more than {_ANSWER_LIMIT} bytes")
        text = content.decode("utf-8", "replace")
        if not 200 <= status < 300:
            raise ToolError.execution(f"{name} returned HTTP {status}: {text[:_ERROR_TEXT_LIMIT]}")
        if not content:
            return None
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            return text

    async def _post(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, bytes | None]:
        """POST and read the answer, refusing (``None``) past ``_ANSWER_LIMIT`` bytes: a tool's
        answer goes back into the model's context, and a runaway one must not fill memory."""
        async with self._client.stream("POST", url, content=body, headers=headers) as response:
            parts: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > _ANSWER_LIMIT:
                    return response.status_code, None
                parts.append(chunk)
            return response.status_code, b"".join(parts)


class _TargetsTools:
    """Tools per alias from the live routing table (``Pool.tools`` merges global + alias)."""

    def __init__(self, targets: Any) -> None:
        self._targets = targets

    def tools_for(self, alias: str | None) -> Mapping[str, ToolSpec]:
        table = self._targets.table
        if alias is not None:
            pool = table.pools.get(alias)
            if pool is not None:
                tools: Mapping[str, ToolSpec] = pool.tools
                return tools
        return dict(table.config.tools)
