"""Responses ``tools`` entries of ``type: "mcp"``: one response's MCP servers, as in OpenAI's
Responses API.

* :func:`parse_request_tools` validates the entries and checks each ``server_url`` against the
  gateway's allow-list (none allowed by default), so a client cannot make the gateway reach
  hosts the operator did not list.
* :class:`McpPlan` is one response's view: the servers' tools (listed before the response
  starts, so a server that cannot list fails the request with 424, as OpenAI does), which of
  them need approval, the calls approved by ``mcp_approval_response`` input items, and the
  outcome of every call.
* :meth:`McpPlan.events` wraps the response's event sink. The loop sees MCP tools as ordinary
  function tools; the wrapper turns what it emits for them into the Responses MCP items —
  ``mcp_list_tools`` first, each call's ``function_call`` + ``function_call_output`` pair into
  one ``mcp_call`` (with the ``response.mcp_call*`` events), and a call that needs approval
  into an ``mcp_approval_request`` (the response then ends, as a client function call ends
  it) — renumbering ``output_index`` and ``sequence_number`` so the client sees a gap-free
  stream. :meth:`McpPlan.output` does the same to a finished response's ``output``.
"""

from __future__ import annotations

import re
import secrets
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson
import trio

from onwards_trio._config import McpSpec
from onwards_trio._errors import HTTPError, error_body, invalid_request
from onwards_trio._loop.events import EventSink, LoopEvent, LoopEventKind
from onwards_trio._loop.steps import MultiStepStore, StepDescriptor, StepKind
from onwards_trio._loop.tools import ToolError, ToolSchema
from onwards_trio._responses.mcp_client import (
    McpCallError,
    McpResult,
    McpServer,
    McpSessions,
    McpTool,
    McpToolCache,
    open_mcp_sessions,
    qualified_name,
)

__all__ = ["McpPlan", "RequestMcpTool", "parse_request_tools", "url_allowed"]

_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_K = LoopEventKind


def url_allowed(url: str, allowed: Sequence[str]) -> bool:
    """Whether ``url`` is under one of the ``allowed`` URL prefixes: the same scheme, host and
    port, and a path at or below the prefix's path (``https://h/mcp`` allows ``/mcp`` and
    ``/mcp/x``, not ``/mcpx``). No userinfo is accepted (it would hide the real host)."""
    try:
        target = urllib.parse.urlsplit(url)
        port = target.port
    except ValueError:
        return False
    if target.scheme not in ("http", "https") or not target.hostname or "@" in target.netloc:
        return False
    for entry in allowed:
        try:
            rule = urllib.parse.urlsplit(entry)
            rule_port = rule.port
        except ValueError:
            continue
        default = 443 if rule.scheme == "https" else 80
        if (
            rule.scheme == target.scheme
            and (rule.hostname or "").lower() == target.hostname.lower()
            and (rule_port or default) == (port or default)
        ):
            prefix = rule.path.rstrip("/")
            path = target.path or "/"
            if path == prefix or path.startswith(prefix + "/") or not prefix:
                return True
    return False


@attrs.frozen
class RequestMcpTool:
    """One validated ``type: "mcp"`` tools entry."""

    server: McpServer
    always: frozenset[str] | None  # tool names that need approval (None: all but ``never``)
    never: frozenset[str]  # tool names that run without approval
    read_only: bool = False  # offer only tools the server marks ``readOnlyHint``

    def needs_approval(self, tool: str) -> bool:
        if tool in self.never:
            return False
        return self.always is None or tool in self.always


def _names(value: Any, where: str) -> frozenset[str] | None:
    """``allowed_tools`` / ``tool_names``: an array of names or ``{"tool_names": [...]}``."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("tool_names")
        where += ".tool_names"
        if value is None:
            return None
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise invalid_request(f"'{where}' must be an array of tool names.", where)
    return frozenset(value)


def _approval(value: Any, where: str) -> tuple[frozenset[str] | None, frozenset[str]]:
    """(names that need approval or None for "all", names that never do)."""
    if value is None or value == "always":
        return None, frozenset()
    if value == "never":
        return frozenset(), frozenset()
    if isinstance(value, dict):
        always = _names(value.get("always"), f"{where}.always")
        never = _names(value.get("never"), f"{where}.never") or frozenset()
        return always, never
    raise invalid_request(
        f"'{where}' must be 'always', 'never' or an object with 'always' / 'never'.", where
    )


def parse_request_tools(
    tools: Sequence[Mapping[str, Any]], allowed_urls: Sequence[str], timeout: float
) -> tuple[list[RequestMcpTool], list[dict[str, Any]]]:
    """The request's ``mcp`` entries, and its ``tools`` as a Response echoes them (the
    ``headers`` and ``authorization`` of MCP entries left out: they are credentials)."""
    found: list[RequestMcpTool] = []
    echo: list[dict[str, Any]] = []
    labels: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.get("type") != "mcp":
            echo.append(dict(tool))
            continue
        where = f"tools[{i}]"
        label = tool.get("server_label")
        if not isinstance(label, str) or not _LABEL.match(label):
            raise invalid_request(
                f"'{where}.server_label' must be a name of letters, digits, '_' and '-'.",
                f"{where}.server_label",
            )
        if label in labels:
            raise invalid_request(f"Duplicate MCP server_label '{label}'.", f"{where}.server_label")
        labels.add(label)
        url = tool.get("server_url")
        if tool.get("connector_id") is not None or not isinstance(url, str):
            raise invalid_request(
                f"'{where}.server_url' must be a string (connectors are not supported).",
                f"{where}.server_url",
            )
        if not url_allowed(url, allowed_urls):
            raise invalid_request(
                f"MCP server '{label}': its server_url is not allowed by this gateway.",
                f"{where}.server_url",
            )
        headers = tool.get("headers") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise invalid_request(
                f"'{where}.headers' must be an object of strings.", f"{where}.headers"
            )
        authorization = tool.get("authorization")
        if authorization is not None:
            if not isinstance(authorization, str):
                raise invalid_request(
                    f"'{where}.authorization' must be a string.", f"{where}.authorization"
                )
            headers = {**headers, "Authorization": f"Bearer {authorization}"}
        always, never = _approval(tool.get("require_approval"), f"{where}.require_approval")
        allowed = tool.get("allowed_tools")
        server = McpServer(
            label=label,
            url=url,
            headers=tuple(sorted(headers.items())),
            timeout=timeout,
            allowed_tools=_names(allowed, f"{where}.allowed_tools"),
        )
        read_only = isinstance(allowed, dict) and allowed.get("read_only") is True
        found.append(RequestMcpTool(server, always=always, never=never, read_only=read_only))
        shown = {k: v for k, v in tool.items() if k not in ("headers", "authorization")}
        echo.append({**shown, "headers": None})
    return found, echo


def _failed_dependency(label: str, reason: str) -> HTTPError:
    return HTTPError(
        424,
        error_body(
            f"Error retrieving tool list from MCP server '{label}': {reason}",
            "external_connector_error",
            "http_error",
            "tools",
        ),
    )


def tool_schema(tool: McpTool) -> ToolSchema:
    """An MCP tool as the loop (and the model) sees it."""
    schema = tool.input_schema if isinstance(tool.input_schema, Mapping) else {}
    return ToolSchema(
        name=tool.qualified,
        description=tool.description,
        parameters=dict(schema) or {"type": "object", "properties": {}},
        strict=False,
    )


def _suffix(item_id: str) -> str:
    return item_id.split("_", 1)[1] if "_" in item_id else item_id


@attrs.define
class _Call:
    """A model's call of a request MCP tool, as the client sees it."""

    tool: McpTool
    item_id: str
    call_id: str
    output_index: int
    approval: bool
    arguments: str = ""
    approval_request_id: str | None = None


@attrs.define
class _Approved:
    tool: McpTool
    approval_request_id: str
    arguments: str


class McpPlan:
    """One response's request MCP tools (see the module docstring)."""

    def __init__(self, tools: Sequence[RequestMcpTool]) -> None:
        self.requested = list(tools)
        self.tools: dict[str, McpTool] = {}  # qualified name → tool
        self.approval: dict[str, bool] = {}  # qualified name → needs approval
        self.list_items: list[dict[str, Any]] = []
        self.approved: list[_Approved] = []
        self.outcomes: dict[str, tuple[str | None, dict[str, Any] | None]] = {}
        self.prior: list[dict[str, Any]] = []  # mcp_call items of approved calls, run first

    def __bool__(self) -> bool:
        return bool(self.requested)

    @classmethod
    async def for_request(
        cls, tools: Sequence[Mapping[str, Any]], spec: McpSpec, cache: McpToolCache
    ) -> tuple[McpPlan, list[dict[str, Any]]]:
        """The plan for a request's ``tools`` (servers checked against ``spec``'s allow-list
        and listed), and ``tools`` as the Response echoes them. A listed tool whose name the
        model would see twice (a client function of that name) is a 400."""
        requested, echo = parse_request_tools(tools, spec.allowed_server_urls, spec.timeout_secs)
        plan = cls(requested)
        if requested:
            await plan.list_tools(cache)
            functions = {t.get("name") for t in tools if t.get("type") == "function"}
            clash = sorted(n for n in plan.tools if n in functions)
            if clash:
                raise invalid_request(
                    "Tool name collision: the following tools are provided by both the client "
                    f"and an MCP server: {', '.join(clash)}",
                    "tools",
                )
        return plan, echo

    # -- before the response -----------------------------------------------------------------

    async def list_tools(self, cache: McpToolCache) -> None:
        """List every server's tools (through the gateway's cache). A server that cannot list
        fails the request (424)."""
        for entry in self.requested:
            try:
                tools = await cache.tools(entry.server)
            except Exception as exc:
                raise _failed_dependency(entry.server.label, str(exc)) from None
            if entry.read_only:
                tools = [t for t in tools if (t.annotations or {}).get("readOnlyHint") is True]
            for tool in tools:
                self.tools[tool.qualified] = tool
                self.approval[tool.qualified] = entry.needs_approval(tool.name)
            self.list_items.append(
                {
                    "type": "mcp_list_tools",
                    "id": f"mcpl_{secrets.token_hex(16)}",
                    "server_label": entry.server.label,
                    "tools": [t.listing() for t in tools],
                    "error": None,
                }
            )

    def offered(self) -> list[ToolSchema]:
        """Every tool, for the model's request."""
        return [tool_schema(t) for t in self.tools.values()]

    def runnable(self) -> list[ToolSchema]:
        """The tools the loop runs itself (those that need no approval). A call of any other
        ends the response, which then asks for approval."""
        return [tool_schema(t) for q, t in self.tools.items() if not self.approval[q]]

    def history(
        self, history: Sequence[dict[str, Any]], inputs: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """``history`` for the model: MCP items as the function calls they were, and the
        ``mcp_approval_response`` items of ``inputs`` applied (a denied call is answered with
        the denial; an approved one runs before the loop starts, see :meth:`run_approved`)."""
        if not any(str(i.get("type", "")).startswith("mcp_") for i in (*history, *inputs)):
            return list(history)  # nothing to translate (the common case)
        now: dict[Any, Mapping[str, Any]] = {}
        for n, i in enumerate(inputs):
            if i.get("type") != "mcp_approval_response":
                continue
            if not isinstance(i.get("approval_request_id"), str):
                raise invalid_request(
                    f"'input[{n}].approval_request_id' must be a string.",
                    f"input[{n}].approval_request_id",
                )
            if not isinstance(i.get("approve"), bool):
                raise invalid_request(
                    f"'input[{n}].approve' must be a boolean.", f"input[{n}].approve"
                )
            now[i["approval_request_id"]] = i
        before = {
            i.get("approval_request_id"): i
            for i in history
            if i.get("type") == "mcp_approval_response"
        }
        requests = {i.get("id") for i in history if i.get("type") == "mcp_approval_request"}
        ran = {i.get("approval_request_id") for i in history if i.get("type") == "mcp_call"}
        for request_id in now:
            if request_id not in requests or request_id in ran or request_id in before:
                raise invalid_request(
                    f"No open mcp_approval_request with id '{request_id}' in the conversation.",
                    "input",
                )
        out: list[dict[str, Any]] = []
        for item in history:
            kind = item.get("type")
            if kind in ("mcp_list_tools", "mcp_approval_response"):
                continue
            if kind == "mcp_approval_request":
                request_id = item.get("id")
                if request_id in ran:
                    out.append(_function_call(item, str(request_id)))  # its mcp_call answers
                elif request_id in now:
                    out.extend(self._answered(item, now[request_id]))
                else:
                    answer = before.get(request_id)
                    text = "Error: the call was not approved"
                    if answer is not None and answer.get("approve") is True:
                        text = "Error: the call did not run"
                    out.extend(self._answered(item, {"approve": False}, text))
            elif kind == "mcp_call":
                call_id = item.get("approval_request_id")
                if call_id not in requests:
                    call_id = item.get("id")
                    out.append(_function_call(item, str(call_id)))
                error = item.get("error")
                text = str(item.get("output") or "")
                if error is not None:
                    text = f"Error: {_error_text(error)}"
                out.append(_function_output(str(call_id), text))
            else:
                out.append(item)
        return out

    def _answered(
        self, item: Mapping[str, Any], answer: Mapping[str, Any], denial: str = ""
    ) -> list[dict[str, Any]]:
        """The model messages for an approval request and its answer (see :meth:`history`)."""
        request_id = str(item.get("id", ""))
        out = [_function_call(item, request_id)]
        if answer.get("approve") is not True:
            reason = answer.get("reason")
            text = denial or "Error: the user denied this call" + (f": {reason}" if reason else "")
            out.append(_function_output(request_id, text))
        else:
            label = str(item.get("server_label", ""))
            tool = self.tools.get(qualified_name(label, str(item.get("name", ""))))
            if tool is None:
                raise invalid_request(
                    f"The approved call '{request_id}' is for MCP server '{label}', which this "
                    "request does not list in 'tools'.",
                    "input",
                )
            self.approved.append(_Approved(tool, request_id, str(item.get("arguments") or "")))
        return out

    async def run_approved(
        self, steps: MultiStepStore, response_id: str, sessions: McpSessions
    ) -> None:
        """Run the approved calls as the response's first steps (their outputs follow the
        approval requests in the model's next request). Each step ends terminal, whatever
        happens: a cancellation closes it ``canceled``."""
        prev: str | None = None
        for approved in self.approved:
            payload = {
                "name": approved.tool.qualified,
                "arguments": approved.arguments or "{}",
                "call_id": approved.approval_request_id,
            }
            rec = await steps.record_step(
                response_id, None, prev, StepDescriptor(StepKind.TOOL_CALL, payload)
            )
            prev = rec.id
            try:
                await steps.mark_step_processing(rec.id)
                try:
                    args = orjson.loads(approved.arguments or "{}")
                    output = await self.call(
                        sessions, approved.tool, approved.approval_request_id, args
                    )
                except ToolError as exc:
                    await steps.fail_step(
                        rec.id,
                        {"type": "executor_error", "message": str(exc), "detail": str(exc)},
                    )
                except orjson.JSONDecodeError as exc:
                    error = {"type": "executor_error", "message": f"Invalid arguments: {exc}"}
                    self.outcomes[approved.approval_request_id] = (
                        None,
                        _protocol_error(error["message"]),
                    )
                    await steps.fail_step(rec.id, {**error, "detail": error["message"]})
                else:
                    await steps.complete_step(rec.id, output)
            except BaseException:
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await steps.cancel_step(rec.id, {"type": "canceled"})
                raise
            out, err = self.outcomes.get(approved.approval_request_id, (None, None))
            self.prior.append(
                {
                    "type": "mcp_call",
                    "id": f"mcp_{_suffix(approved.approval_request_id)}",
                    "server_label": approved.tool.server.label,
                    "name": approved.tool.name,
                    "arguments": approved.arguments,
                    "approval_request_id": approved.approval_request_id,
                    "output": out,
                    "error": err,
                    "status": "completed" if err is None else "failed",
                }
            )

    # -- during the response ------------------------------------------------------------------

    def owns(self, name: str) -> bool:
        return name in self.tools

    async def call(
        self, sessions: McpSessions | None, tool: McpTool, call_id: str, args: Any
    ) -> Any:
        """Run one call; remember its outcome for the ``mcp_call`` item; return the step's
        output or raise :class:`ToolError` (the model is told)."""
        if not isinstance(args, Mapping):
            self.outcomes[call_id] = (None, _protocol_error("arguments must be an object"))
            raise ToolError.invalid_arguments("arguments must be a JSON object")
        result = await run_call(sessions, tool, args, self.outcomes, call_id)
        return result.output()

    async def execute(
        self, name: str, call_id: str, args: Any, sessions: McpSessions | None
    ) -> Any:
        return await self.call(sessions, self.tools[name], call_id, args)

    def events(self, sink: EventSink) -> EventSink:
        """``sink`` as the client must see this response's events (``sink`` itself when the
        request has no MCP tools: nothing to rewrite)."""
        return _McpEvents(self, sink) if self.requested else sink

    def output(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """A finished response's ``output`` as the client sees it (see the module docstring)."""
        outputs = {i.get("call_id"): i for i in items if i.get("type") == "function_call_output"}
        prior_ids = {p["approval_request_id"] for p in self.prior}
        merged: set[Any] = set(prior_ids)
        out: list[dict[str, Any]] = [*self.list_items, *self.prior]
        for item in items:
            kind = item.get("type")
            name = item.get("name")
            if kind == "function_call" and isinstance(name, str) and name in self.tools:
                call_id = item.get("call_id")
                if self.approval[name]:
                    out.append(self._approval_item(item))
                else:
                    merged.add(call_id)
                    out.append(self._call_item(item, outputs.get(call_id)))
            elif kind == "function_call_output" and item.get("call_id") in merged:
                continue
            else:
                out.append(dict(item))
        return out

    def _item(self, fc: Mapping[str, Any], kind: str, prefix: str) -> dict[str, Any]:
        """The MCP item of kind ``kind`` that stands for the function call ``fc``; its id is
        ``fc``'s with ``prefix``, so streamed and final items agree."""
        tool = self.tools[str(fc["name"])]
        return {
            "type": kind,
            "id": f"{prefix}_{_suffix(str(fc.get('id', '')))}",
            "server_label": tool.server.label,
            "name": tool.name,
            "arguments": str(fc.get("arguments") or ""),
        }

    def _approval_item(self, fc: Mapping[str, Any]) -> dict[str, Any]:
        return self._item(fc, "mcp_approval_request", "mcpr")

    def _call_item(
        self, fc: Mapping[str, Any], output_item: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        call_id = fc.get("call_id")
        out, err = self.outcomes.get(str(call_id), (None, None))
        if output_item is None:
            status = "incomplete"
        elif call_id in self.outcomes:
            status = "completed" if err is None else "failed"
        elif output_item.get("status") == "completed":
            # A call finished by another process (a resumed response): its text is all we have.
            status, out = "completed", str(output_item.get("output") or "")
        else:
            status = "failed"
            err = _protocol_error(str(output_item.get("output") or "the call did not finish"))
        return {**self._item(fc, "mcp_call", "mcp"), "output": out, "error": err, "status": status}


def _function_call(item: Mapping[str, Any], call_id: str) -> dict[str, Any]:
    label, name = str(item.get("server_label", "")), str(item.get("name", ""))
    return {
        "type": "function_call",
        "call_id": call_id,
        "name": qualified_name(label, name),
        "arguments": str(item.get("arguments") or "{}"),
    }


def _function_output(call_id: str, text: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": text}


def _protocol_error(message: str, code: int = -32000) -> dict[str, Any]:
    return {"type": "mcp_protocol_error", "code": code, "message": message}


def _error_text(error: Any) -> str:
    if isinstance(error, Mapping):
        if isinstance(error.get("message"), str):
            return str(error["message"])
        content = error.get("content")
        if isinstance(content, list):
            return "\n".join(str(c.get("text", "")) for c in content if isinstance(c, Mapping))
    return str(error)


async def run_call(
    sessions: McpSessions | None,
    tool: McpTool,
    args: Mapping[str, Any],
    outcomes: dict[str, tuple[str | None, dict[str, Any] | None]] | None = None,
    call_id: str = "",
) -> McpResult:
    """``tools/call`` on the response's session with ``tool``'s server (or a session of its
    own when there is no group). ``isError`` and failures to get a result raise
    :class:`ToolError` with the server's text, so the model sees it."""
    try:
        if sessions is not None:
            result = await sessions.call(tool.server, tool.name, args)
        else:
            async with open_mcp_sessions() as own:
                assert own is not None
                result = await own.call(tool.server, tool.name, args)
    except McpCallError as exc:
        if outcomes is not None:
            outcomes[call_id] = (None, exc.error)
        if exc.error.get("code") == -32001:
            raise ToolError.timeout(str(exc)) from None
        raise ToolError.execution(str(exc)) from None
    if result.is_error:
        if outcomes is not None:
            outcomes[call_id] = (
                None,
                {"type": "mcp_tool_execution_error", "content": result.content},
            )
        raise ToolError.execution(f"{tool.name}: {result.text}")
    if outcomes is not None:
        outcomes[call_id] = (result.output(), None)
    return result


class _McpEvents:
    """The event sink wrapper of :meth:`McpPlan.events`."""

    def __init__(self, plan: McpPlan, inner: EventSink) -> None:
        self.plan = plan
        self.inner = inner
        self.sequence: int | None = None  # the loop's first (a resumed response goes on)
        self.visible = 0  # next output_index the client sees
        self.index: dict[int, int] = {}  # the loop's output_index → the client's
        self.by_item: dict[str, _Call] = {}  # function_call item id → call
        self.by_call: dict[str, _Call] = {}  # call_id → call (runnable ones)

    async def _send(self, kind: LoopEventKind, data: Mapping[str, Any]) -> None:
        assert self.sequence is not None
        await self.inner.emit(LoopEvent(self.sequence, kind, data))
        self.sequence += 1

    def _next_index(self) -> int:
        n = self.visible
        self.visible += 1
        return n

    async def _whole_item(
        self, item: dict[str, Any], begin: LoopEventKind, end: LoopEventKind
    ) -> None:
        """An item that is finished before the client hears of it (tool listings, approved
        calls run before the loop): added, its progress events, done."""
        index = self._next_index()
        ref = {"item_id": item["id"], "output_index": index}
        shell = {**item, "status": "in_progress"} if item["type"] == "mcp_call" else item
        await self._send(_K.OUTPUT_ITEM_ADDED, {"output_index": index, "item": shell})
        await self._send(begin, ref)
        await self._send(end, ref)
        await self._send(_K.OUTPUT_ITEM_DONE, {"output_index": index, "item": item})

    async def emit(self, event: LoopEvent) -> None:
        if self.sequence is None:
            self.sequence = event.sequence
        kind, data = event.kind, event.data
        if kind.is_terminal:
            await self._close_open_calls()
            response = dict(data.get("response") or {})
            response["output"] = self.plan.output(response.get("output") or [])
            await self._send(kind, {**data, "response": response})
            return
        if kind is _K.IN_PROGRESS:
            await self._send(kind, data)
            for listing in self.plan.list_items:
                await self._whole_item(
                    listing, _K.MCP_LIST_TOOLS_IN_PROGRESS, _K.MCP_LIST_TOOLS_COMPLETED
                )
            for prior in self.plan.prior:
                end = _K.MCP_CALL_COMPLETED
                if prior["status"] != "completed":
                    end = _K.MCP_CALL_FAILED
                await self._whole_item(prior, _K.MCP_CALL_IN_PROGRESS, end)
            return
        item = data.get("item")
        if kind is _K.OUTPUT_ITEM_ADDED and isinstance(item, Mapping):
            await self._added(event, item)
            return
        if kind is _K.OUTPUT_ITEM_DONE and isinstance(item, Mapping):
            await self._done(event, item)
            return
        call = self.by_item.get(str(data.get("item_id")))
        if call is not None:
            if call.approval:
                return  # an approval request has no argument events: done carries them
            ref = {"item_id": call.item_id, "output_index": call.output_index}
            if kind is _K.FUNCTION_CALL_ARGUMENTS_DELTA:
                await self._send(
                    _K.MCP_CALL_ARGUMENTS_DELTA,
                    {**ref, "delta": data.get("delta", "")},
                )
            elif kind is _K.FUNCTION_CALL_ARGUMENTS_DONE:
                call.arguments = str(data.get("arguments", ""))
                await self._send(
                    _K.MCP_CALL_ARGUMENTS_DONE,
                    {**ref, "arguments": call.arguments},
                )
            return
        index = data.get("output_index")
        if isinstance(index, int) and index in self.index:
            data = {**data, "output_index": self.index[index]}
        await self._send(kind, data)

    async def _added(self, event: LoopEvent, item: Mapping[str, Any]) -> None:
        loop_index = event.data.get("output_index")
        name = item.get("name")
        if item.get("type") == "function_call" and isinstance(name, str) and self.plan.owns(name):
            tool = self.plan.tools[name]
            approval = self.plan.approval[name]
            suffix = _suffix(str(item.get("id", "")))
            call = _Call(
                tool=tool,
                item_id=f"{'mcpr' if approval else 'mcp'}_{suffix}",
                call_id=str(item.get("call_id", "")),
                output_index=self._next_index(),
                approval=approval,
            )
            self.by_item[str(item.get("id"))] = call
            if approval:
                shell = self.plan._approval_item({**item, "arguments": ""})
            else:
                self.by_call[call.call_id] = call
                shell = {
                    "type": "mcp_call",
                    "id": call.item_id,
                    "server_label": tool.server.label,
                    "name": tool.name,
                    "arguments": "",
                    "output": None,
                    "error": None,
                    "status": "in_progress",
                }
            await self._send(
                _K.OUTPUT_ITEM_ADDED, {"output_index": call.output_index, "item": shell}
            )
            return
        if item.get("type") == "function_call_output":
            running = self.by_call.get(str(item.get("call_id")))
            if running is not None:
                ref = {"item_id": running.item_id, "output_index": running.output_index}
                await self._send(_K.MCP_CALL_IN_PROGRESS, ref)
                return
        index = self._next_index()
        if isinstance(loop_index, int):
            self.index[loop_index] = index
        await self._send(_K.OUTPUT_ITEM_ADDED, {**event.data, "output_index": index})

    async def _done(self, event: LoopEvent, item: Mapping[str, Any]) -> None:
        call = self.by_item.get(str(item.get("id")))
        if call is not None:
            call.arguments = str(item.get("arguments") or call.arguments)
            if call.approval:
                done = self.plan._approval_item(item)
                await self._send(
                    _K.OUTPUT_ITEM_DONE, {"output_index": call.output_index, "item": done}
                )
            return
        if item.get("type") == "function_call_output":
            call = self.by_call.pop(str(item.get("call_id")), None)
            if call is not None:
                await self._finish(call, item)
                return
        index = event.data.get("output_index")
        data = dict(event.data)
        if isinstance(index, int) and index in self.index:
            data["output_index"] = self.index[index]
        await self._send(_K.OUTPUT_ITEM_DONE, data)

    async def _finish(self, call: _Call, output_item: Mapping[str, Any] | None) -> None:
        fc = {
            "id": f"fc_{_suffix(call.item_id)}",
            "name": call.tool.qualified,
            "call_id": call.call_id,
            "arguments": call.arguments,
        }
        item = self.plan._call_item(fc, output_item)
        ref = {"item_id": call.item_id, "output_index": call.output_index}
        if item["status"] == "completed":
            await self._send(_K.MCP_CALL_COMPLETED, ref)
        elif output_item is not None:
            await self._send(_K.MCP_CALL_FAILED, ref)
        await self._send(_K.OUTPUT_ITEM_DONE, {"output_index": call.output_index, "item": item})

    async def _close_open_calls(self) -> None:
        """Calls the response ended without running (it ended for another reason): their
        items end ``incomplete``."""
        for call in list(self.by_call.values()):
            await self._finish(call, None)
        self.by_call.clear()
