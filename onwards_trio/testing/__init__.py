"""``onwards_trio.testing``: test code that calls LLM APIs offline, against a real gateway.

The pytest plugin (installed with the package, entry point ``pytest11``) gives two fixtures
that return a :class:`Harness`: ``onwards`` (served from a background thread: sync, asyncio and
anyio tests) and ``onwards_trio`` (served from the test's nursery: pytest-trio tests). Declare
what each model alias answers — plain data, :func:`text`, :func:`tool_calls`, :func:`refusal`,
:func:`error`, :func:`rate_limited`, or a callable that sees the request — or replay a
recorded cassette with :meth:`Harness.recorded`; point any client at ``harness.base_url``; then
assert on :meth:`Harness.calls`, :meth:`Harness.tool_calls` and :meth:`Harness.steps`.
docs/testing.md is the guide.

Layer: above ``_app`` (it serves a whole :class:`~onwards_trio._app.gateway.Gateway`); nothing in
the package imports it.
"""

from onwards_trio.testing._cassette import Cassette as Cassette
from onwards_trio.testing._harness import Harness as Harness
from onwards_trio.testing._harness import serve_in_thread as serve_in_thread
from onwards_trio.testing._records import ModelCall as ModelCall
from onwards_trio.testing._records import Step as Step
from onwards_trio.testing._records import ToolCall as ToolCall
from onwards_trio.testing._script import Call as Call
from onwards_trio.testing._script import Reply as Reply
from onwards_trio.testing._script import Usage as Usage
from onwards_trio.testing._script import call as call
from onwards_trio.testing._script import error as error
from onwards_trio.testing._script import rate_limited as rate_limited
from onwards_trio.testing._script import refusal as refusal
from onwards_trio.testing._script import text as text
from onwards_trio.testing._script import tool_calls as tool_calls
from onwards_trio.testing._upstream import RealUpstream as RealUpstream

__all__ = [
    "Call",
    "Cassette",
    "Harness",
    "ModelCall",
    "RealUpstream",
    "Reply",
    "Step",
    "ToolCall",
    "Usage",
    "call",
    "error",
    "rate_limited",
    "refusal",
    "serve_in_thread",
    "text",
    "tool_calls",
]
