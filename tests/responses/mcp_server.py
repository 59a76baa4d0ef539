"""A real MCP server for the tests: the official SDK's ``MCPServer`` over streamable HTTP.

Run as ``python tests/responses/mcp_server.py``: it binds 127.0.0.1 port 0, prints
``PORT <n>`` and serves ``/mcp`` until killed. Its tools cover what the gateway must handle:
a structured result, a tool error (``isError``), a slow call, a call that kills the server,
the headers a call came with, and a call that adds a tool and says ``tools/list_changed``.
"""

from __future__ import annotations

import os
import socket

import anyio
import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.context import Context
from mcp_types import ToolAnnotations

server = MCPServer("onwards-test")


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def boom(reason: str) -> str:
    """Always fails."""
    raise ValueError(f"boom: {reason}")


@server.tool()
async def slow(seconds: float) -> str:
    """Answer after a while."""
    await anyio.sleep(seconds)
    return "slept"


@server.tool()
def die() -> str:
    """End the server's process in the middle of the call."""
    os._exit(3)


@server.tool()
def whoami(ctx: Context) -> str:
    """The Authorization header the call came with."""
    headers = ctx.headers or {}
    return headers.get("authorization", "anonymous")


@server.tool()
def session(ctx: Context) -> str:
    """The Mcp-Session-Id the call came with (2025-era sessions only)."""
    headers = ctx.headers or {}
    return headers.get("mcp-session-id", "none")


@server.tool()
async def grow(ctx: Context) -> str:
    """Add a tool named ``extra`` and tell the client its tool list changed."""

    @server.tool(name="extra")
    def extra() -> str:
        return "extra"

    await ctx.session.send_tool_list_changed()
    return "grown"


def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    app = server.streamable_http_app()
    serve = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    anyio.run(lambda: serve.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
