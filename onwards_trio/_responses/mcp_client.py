"""MCP servers over streamable HTTP, through the official ``mcp`` SDK (an optional extra).

The SDK is built on anyio and runs on Trio as it is. What this module adds is the shape the
gateway needs around it:

* :class:`McpSessions` — the sessions of one response loop: one connection per server, opened
  on first use and closed when the loop ends (completion, failure or cancellation). Each
  connection is owned by a task in the group's own nursery, shielded from the loop's
  cancellation so that it can still end its session cleanly (``DELETE`` with the
  ``Mcp-Session-Id`` of a 2025-era server); every close is bounded by ``_CLOSE_TIMEOUT``.
* :class:`McpToolCache` — ``tools/list`` per server for the whole gateway, kept ``ttl`` seconds
  and dropped early when a server sends ``notifications/tools/list_changed``.
* Errors: a server that is slow, down or dies mid-call fails only the call that used it
  (:class:`McpCallError`), within that server's timeout.

The SDK is imported when a connection is first opened, so a gateway without MCP tools never
loads it (nor pydantic, httpx2, …).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import attrs
import orjson
import trio

from onwards_trio._errors import OnwardsError

if TYPE_CHECKING:
    from mcp import Client

__all__ = [
    "McpCallError",
    "McpResult",
    "McpServer",
    "McpSessions",
    "McpTool",
    "McpToolCache",
    "McpUnavailable",
    "open_mcp_sessions",
    "qualified_name",
]

log = logging.getLogger("onwards_trio.mcp")

_CLOSE_TIMEOUT = 5.0  # ending a session (DELETE) may take this long, then it is cut
_RETRY_AFTER = 10.0  # a server that could not list is not asked again before this
_PRUNE_ABOVE = 256  # cached listings kept before expired ones are dropped
_MAX_PAGES = 20  # tools/list pages followed per listing: a server cannot make us loop
_NAME_LIMIT = 64  # the longest function name OpenAI-compatible upstreams accept
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def qualified_name(label: str, tool: str) -> str:
    """The name the model sees for ``tool`` of server ``label``: ``<label>__<tool>``, limited
    to the characters and length function names may have, so two servers cannot collide."""
    return _UNSAFE.sub("_", f"{label}__{tool}")[:_NAME_LIMIT]


@attrs.frozen
class McpServer:
    """One MCP server as the gateway reaches it.

    ``label`` names it in tool names and items; ``headers`` go with every request (auth);
    ``timeout`` bounds connecting, listing and each call; ``protocol`` is ``auto`` (the
    SDK's default: the 2026-07-28 revision, falling back to the 2025 ``initialize``
    handshake for servers that do not know it) or ``legacy`` (the handshake only)."""

    label: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 30.0
    protocol: Literal["auto", "legacy"] = "auto"
    allowed_tools: frozenset[str] | None = None

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...], str]:
        """What makes two servers the same server (the same URL seen with other credentials
        may list other tools)."""
        return (self.url, self.headers, self.protocol)


@attrs.frozen
class McpTool:
    """A tool a server listed: ``name`` as the server knows it, ``qualified`` as the model
    sees it."""

    server: McpServer
    name: str
    qualified: str
    description: str
    input_schema: Mapping[str, Any]
    annotations: Mapping[str, Any] | None = None

    def listing(self) -> dict[str, Any]:
        """The tool as an ``mcp_list_tools`` item lists it."""
        return {
            "name": self.name,
            "description": self.description or None,
            "input_schema": dict(self.input_schema),
            "annotations": dict(self.annotations) if self.annotations is not None else None,
        }


@attrs.frozen
class McpResult:
    """A ``tools/call`` result: the text the model gets, and what a client may want."""

    text: str
    content: list[Any]
    structured: Any = None
    is_error: bool = False

    def output(self) -> str:
        """What a tool step records, an ``mcp_call`` item shows and the model reads: the text
        content (servers put their structured content there too, as the MCP spec asks), or
        the structured content as JSON when there is no text."""
        if self.text or self.structured is None:
            return self.text
        return orjson.dumps(self.structured).decode()


class McpUnavailable(OnwardsError):
    """A server could not be reached, or did not answer a listing in time."""


class McpCallError(OnwardsError):
    """A call did not produce a result. ``error`` is the Responses ``mcp_call.error`` object
    (``mcp_protocol_error`` / ``http_error``); ``str()`` is what the model is told."""

    def __init__(self, message: str, error: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.error = dict(error)


def _describe(exc: BaseException) -> str:
    """A short, secret-free account of why a connection failed (no URLs, no headers)."""
    if isinstance(exc, ImportError):
        return "the MCP SDK is not installed: pip install 'onwards-trio[mcp]'"
    if isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        if len(leaves) == 1:
            return _describe(leaves[0])
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return f"HTTP {status}"
    return type(exc).__name__


def _error_of(exc: BaseException, label: str) -> McpCallError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        message = f"MCP server {label!r} answered HTTP {status}"
        return McpCallError(message, {"type": "http_error", "code": status, "message": message})
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        message = f"MCP server {label!r}: {getattr(exc, 'message', '') or type(exc).__name__}"
        return McpCallError(
            message, {"type": "mcp_protocol_error", "code": code, "message": message}
        )
    message = f"MCP server {label!r} failed: {_describe(exc)}"
    return McpCallError(message, {"type": "mcp_protocol_error", "code": -32000, "message": message})


def _block_text(block: Mapping[str, Any]) -> str:
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "resource":
        resource = block.get("resource") or {}
        if isinstance(resource, Mapping) and isinstance(resource.get("text"), str):
            return str(resource["text"])
    return f"[{kind}]"


def _result(raw: Any) -> McpResult:
    data = raw.model_dump(mode="json", by_alias=True, exclude_none=True)
    content = [c for c in data.get("content") or [] if isinstance(c, Mapping)]
    text = "\n".join(_block_text(c) for c in content)
    structured = data.get("structuredContent")
    return McpResult(
        text=text, content=content, structured=structured, is_error=bool(data.get("isError"))
    )


class _Connection:
    """One session with one server, held open by :meth:`run` (a task of the group)."""

    def __init__(self, server: McpServer, on_tools_changed: Callable[[McpServer], None]) -> None:
        self.server = server
        self._on_tools_changed = on_tools_changed
        self._client: Client | None = None
        self._ready = trio.Event()
        self._stop = trio.Event()
        self._ended = trio.Event()
        self._failure = ""
        self.scope = trio.CancelScope(shield=True)

    async def _notified(self, message: Any) -> None:
        from mcp_types import ToolListChangedNotification

        await trio.lowlevel.checkpoint()
        if isinstance(message, ToolListChangedNotification):
            self._on_tools_changed(self.server)

    async def run(self) -> None:
        """Open the session, hold it until :meth:`stop`, close it. Shielded: the loop's
        cancellation does not cut the close short (it is bounded by the group instead).
        Never raises: a session that fails only fails the calls that wait for it."""
        try:
            with self.scope:
                await self._hold()
        except Exception as exc:  # an ExceptionGroup too (the SDK's transport task group)
            self._failure = _describe(exc)
            log.info("MCP server %r: session ended: %s", self.server.label, self._failure)
        finally:
            self._client = None
            self._ready.set()
            self._ended.set()

    async def _hold(self) -> None:
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        server = self.server
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(
                httpx2.AsyncClient(
                    headers=dict(server.headers),
                    # A call's own deadline is ours (trio.fail_after); httpx2's must not cut
                    # a long call short, only a connection that never opens.
                    timeout=httpx2.Timeout(server.timeout, read=None),
                )
            )
            client = Client(
                streamable_http_client(server.url, http_client=http),
                mode=server.protocol,
                message_handler=self._notified,
                cache=None,
            )
            # Not bounded here (the SDK's task group must not be entered inside a scope that
            # ends first): a caller waits at most the server's timeout in client().
            await stack.enter_async_context(client)
            self._client = client
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    async def wait_ended(self) -> None:
        await self._ended.wait()

    async def client(self) -> Client:
        """The open session, waiting for it to open (within the server's timeout)."""
        with trio.move_on_after(self.server.timeout):
            await self._ready.wait()
        if self._client is None:
            reason = self._failure or f"no session within {self.server.timeout:g}s"
            raise McpUnavailable(f"MCP server {self.server.label!r} is unavailable ({reason})")
        return self._client

    async def list_tools(self) -> list[McpTool]:
        """Every tool the server lists (all pages), unqualified and unfiltered: the cache keeps
        this and applies each server's view (:func:`_view`)."""
        server = self.server
        try:
            with trio.fail_after(server.timeout):
                client = await self.client()
                tools: list[McpTool] = []
                cursor: str | None = None
                for _ in range(_MAX_PAGES):
                    page = await client.list_tools(cursor=cursor)
                    for tool in page.tools:
                        annotations = tool.annotations
                        tools.append(
                            McpTool(
                                server=server,
                                name=tool.name,
                                qualified=tool.name,
                                description=tool.description or "",
                                input_schema=tool.input_schema,
                                annotations=(
                                    annotations.model_dump(
                                        mode="json", by_alias=True, exclude_none=True
                                    )
                                    if annotations is not None
                                    else None
                                ),
                            )
                        )
                    cursor = page.next_cursor
                    if cursor is None:
                        break
                return tools
        except McpUnavailable:
            raise
        except trio.TooSlowError:
            raise McpUnavailable(
                f"MCP server {server.label!r} did not list its tools within {server.timeout:g}s"
            ) from None
        except Exception as exc:
            raise McpUnavailable(
                f"MCP server {server.label!r} could not list its tools ({_describe(exc)})"
            ) from None

    async def call(self, name: str, arguments: Mapping[str, Any]) -> McpResult:
        server = self.server
        try:
            with trio.fail_after(server.timeout):
                client = await self.client()
                raw = await client.call_tool(name, dict(arguments))
        except McpUnavailable as exc:
            raise McpCallError(
                str(exc), {"type": "mcp_protocol_error", "code": -32000, "message": str(exc)}
            ) from None
        except trio.TooSlowError:
            message = f"MCP server {server.label!r} did not answer within {server.timeout:g}s"
            raise McpCallError(
                message, {"type": "mcp_protocol_error", "code": -32001, "message": message}
            ) from None
        except Exception as exc:
            raise _error_of(exc, server.label) from None
        return _result(raw)


class McpSessions:
    """The MCP sessions of one response loop: one per server, opened on first use. Create it
    with :func:`open_mcp_sessions`."""

    def __init__(
        self, nursery: trio.Nursery, on_tools_changed: Callable[[McpServer], None]
    ) -> None:
        self._nursery = nursery
        self._on_tools_changed = on_tools_changed
        self._connections: dict[Any, _Connection] = {}

    def _connection(self, server: McpServer) -> _Connection:
        conn = self._connections.get(server.key)
        if conn is None:
            conn = _Connection(server, self._on_tools_changed)
            self._connections[server.key] = conn
            self._nursery.start_soon(conn.run)
        return conn

    async def list_tools(self, server: McpServer) -> list[McpTool]:
        return await self._connection(server).list_tools()

    async def call(self, server: McpServer, name: str, arguments: Mapping[str, Any]) -> McpResult:
        """Run ``tools/call``; a server-side failure comes back as ``is_error``, anything that
        kept the call from a result raises :class:`McpCallError`."""
        return await self._connection(server).call(name, arguments)

    async def _close(self) -> None:
        conns = list(self._connections.values())
        for conn in conns:
            conn.stop()
        with trio.move_on_after(_CLOSE_TIMEOUT):
            for conn in conns:
                await conn.wait_ended()
        for conn in conns:
            conn.scope.cancel()  # one that did not end in time is cut


@asynccontextmanager
async def open_mcp_sessions(
    on_tools_changed: Callable[[McpServer], None] | None = None, *, needed: bool = True
) -> AsyncIterator[McpSessions | None]:
    """The sessions of one response loop; all of them are closed when the block ends, however
    it ends (the close is shielded and bounded). With ``needed=False`` (a response that cannot
    reach an MCP server) it yields ``None`` and costs nothing: no nursery."""
    if not needed:
        yield None
        return
    try:
        async with trio.open_nursery() as nursery:
            sessions = McpSessions(nursery, on_tools_changed or (lambda _server: None))
            try:
                yield sessions
            finally:
                with trio.CancelScope(shield=True):
                    await sessions._close()
    except BaseExceptionGroup as group:
        # The connections never raise (they end quietly): a group holds what the block
        # raised, which its caller expects as it is, not wrapped by our nursery.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _view(server: McpServer, listed: Sequence[McpTool]) -> list[McpTool]:
    """``server``'s view of a listing: ``allowed_tools`` applied, names qualified with its
    label (a name that collides after qualification is skipped, and logged)."""
    out: list[McpTool] = []
    seen: set[str] = set()
    for tool in listed:
        if server.allowed_tools is not None and tool.name not in server.allowed_tools:
            continue
        qualified = qualified_name(server.label, tool.name)
        if qualified in seen:
            log.warning("MCP server %r: tool %r skipped (name collision)", server.label, tool.name)
            continue
        seen.add(qualified)
        out.append(attrs.evolve(tool, server=server, qualified=qualified))
    return out


class McpToolCache:
    """``tools/list`` per server, shared by every response of a gateway.

    An entry lives ``ttl`` seconds, or until the server says ``tools/list_changed`` on any
    session (:meth:`invalidate`). A server that could not list is not asked again for
    ``_RETRY_AFTER`` seconds (each request would otherwise wait out its timeout). Concurrent
    misses for one server share one listing."""

    def __init__(self, ttl: float = 300.0) -> None:
        self.ttl = ttl
        self._entries: dict[Any, tuple[float, list[McpTool] | McpUnavailable]] = {}
        self._locks: dict[Any, trio.Lock] = {}

    def invalidate(self, server: McpServer) -> None:
        self._entries.pop(server.key, None)

    async def tools(self, server: McpServer, sessions: McpSessions | None = None) -> list[McpTool]:
        """The server's tools as ``server`` sees them, listed through ``sessions`` on a miss
        (or through a short session of its own). Raises :class:`McpUnavailable`."""
        listed = self._fresh(server)
        if listed is None:
            lock = self._locks.setdefault(server.key, trio.Lock())
            async with lock:
                listed = self._fresh(server)
                if listed is None:
                    listed = await self._list(server, sessions)
        if isinstance(listed, McpUnavailable):
            raise McpUnavailable(str(listed))
        return _view(server, listed)

    async def _list(
        self, server: McpServer, sessions: McpSessions | None
    ) -> list[McpTool] | McpUnavailable:
        now = trio.current_time()
        try:
            if sessions is not None:
                listed: list[McpTool] | McpUnavailable = await sessions.list_tools(server)
            else:
                async with open_mcp_sessions(self.invalidate) as own:
                    assert own is not None
                    listed = await own.list_tools(server)
        except McpUnavailable as exc:
            self._entries[server.key] = (now + min(self.ttl, _RETRY_AFTER), exc)
            self._prune(now)
            return exc
        self._entries[server.key] = (now + self.ttl, listed)
        self._prune(now)
        return listed

    def _prune(self, now: float) -> None:
        """Forget expired entries once there are many (request servers differ by their
        credentials, so their number is not bounded by the config)."""
        if len(self._entries) <= _PRUNE_ABOVE:
            return
        for key, (expires, _) in list(self._entries.items()):
            lock = self._locks.get(key)
            if expires <= now and (lock is None or not lock.locked()):
                del self._entries[key]
                self._locks.pop(key, None)

    def _fresh(self, server: McpServer) -> list[McpTool] | McpUnavailable | None:
        entry = self._entries.get(server.key)
        if entry is None or entry[0] <= trio.current_time():
            return None
        return entry[1]
