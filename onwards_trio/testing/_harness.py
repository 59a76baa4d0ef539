"""The harness a test gets: a real gateway on loopback in front of scripted or recorded models.

:class:`Harness` builds the gateway's config from what the test declares (aliases, Python
tools, extra config) and serves two things on ``127.0.0.1`` port 0 in one Trio run: the
:class:`~._upstream.UpstreamApp` that plays every provider, and the gateway in front of it. The
run is either the test's own (``onwards_trio`` fixture: the test's nursery under pytest-trio) or
one in a background thread (``onwards`` fixture: any other test, sync or asyncio). Every alias is
in Open Responses adapter mode, so ``/v1/responses`` runs the real loop over the same scripts.

Declarations made while serving reload the gateway's config (a whole-table swap, in the Trio
run), so a test may declare an alias after it built its client.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from onwards_trio._app.gateway import Gateway
from onwards_trio._config import PoolSpec, ProviderSpec, parse_config
from onwards_trio._loop.steps import RecordedStep, StepDescriptor
from onwards_trio._stores.memory import MemoryResponseStore, MemoryStore
from onwards_trio.testing._cassette import Cassette, Matcher, body_matcher
from onwards_trio.testing._records import ModelCall, Step, ToolCall, assert_subset
from onwards_trio.testing._upstream import (
    PythonTool,
    RealUpstream,
    RecordedModel,
    ScriptedModel,
    UpstreamApp,
)

__all__ = ["Harness", "call_in_run", "serve_in_thread"]

F = TypeVar("F", bound=Callable[..., Any])

_START_TIMEOUT = 60.0  # generous: a loaded 2-core CI machine
_STOP_TIMEOUT = 30.0
# Target keys that belong to the provider (the rest are the pool's: fallback, limits, keys, ...).
_PROVIDER_KEYS = frozenset(
    f.name
    for f in attrs.fields(ProviderSpec)
    if f.name not in {a.name for a in attrs.fields(PoolSpec)}
)
_JSON_TYPES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    dict: "object",
}


class _StepRecorder(MemoryStore):
    """The in-memory step store, also noting each step where the test thread can read it."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        self._lock = lock
        self.by_response: dict[str, list[dict[str, Any]]] = {}
        self._rows: dict[str, dict[str, Any]] = {}

    async def record_step(
        self,
        request_id: str,
        scope_parent: str | None,
        prev_step_id: str | None,
        descriptor: StepDescriptor,
    ) -> RecordedStep:
        recorded = await super().record_step(request_id, scope_parent, prev_step_id, descriptor)
        row = {
            "sequence": recorded.sequence,
            "kind": descriptor.kind.value,
            "state": "pending",
            "request": copy.deepcopy(descriptor.request_payload),
        }
        with self._lock:
            self._rows[recorded.id] = row
            self.by_response.setdefault(request_id, []).append(row)
        return recorded

    def _note(self, step_id: str, **fields: Any) -> None:
        with self._lock:
            row = self._rows.get(step_id)
            if row is not None:
                row.update(fields)

    async def mark_step_processing(self, step_id: str) -> None:
        await super().mark_step_processing(step_id)
        self._note(step_id, state="processing")

    async def complete_step(self, step_id: str, payload: Any) -> None:
        await super().complete_step(step_id, payload)
        self._note(step_id, state="completed", result=copy.deepcopy(payload))

    async def fail_step(self, step_id: str, error: Any) -> None:
        await super().fail_step(step_id, error)
        self._note(step_id, state="failed", error=copy.deepcopy(error))

    async def cancel_step(self, step_id: str, reason: Any = None) -> bool:
        done = await super().cancel_step(step_id, reason)
        if done:
            self._note(step_id, state="canceled", error=copy.deepcopy(reason))
        return done


def _parameters(fn: Callable[..., Any]) -> dict[str, Any]:
    """A JSON schema for ``fn``'s keyword parameters, from its annotations (simple types)."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    hints: Mapping[str, Any]
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception:
        hints = {}
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        kind = _JSON_TYPES.get(hints.get(name))  # type: ignore[arg-type]
        properties[name] = {"type": kind} if kind else {}
        if param.default is param.empty:
            required.append(name)
    return {"type": "object", "properties": properties, "required": required}


class Harness:
    """A gateway under test: its address, what the models answer, and what reached them.

    Declare models with :meth:`model` (scripted) or :meth:`recorded` (cassette), Python tools
    with :meth:`tool`; point any client at :attr:`base_url`; read back :meth:`calls`,
    :meth:`tool_calls` and :meth:`steps`.
    """

    def __init__(
        self,
        *,
        cassette: Path | None = None,
        recording: bool = False,
        upstreams: Mapping[str, RealUpstream] | None = None,
    ) -> None:
        self.upstream = UpstreamApp()
        self.upstream.recording = recording
        self._cassette_path = cassette
        self._upstreams = dict(upstreams or {})
        self._targets: dict[str, dict[str, Any]] = {}
        self._extra: dict[str, Any] = {}
        self._steps = _StepRecorder(self.upstream.lock)
        self._gateway: Gateway | None = None
        self._upstream_url: str | None = None
        self._url: str | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None

    # -- addresses -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The gateway's origin, ``http://127.0.0.1:<port>``."""
        if self._url is None:
            raise RuntimeError("the gateway is not serving yet")
        return self._url

    @property
    def base_url(self) -> str:
        """What OpenAI-style SDKs take as ``base_url`` (``<url>/v1``)."""
        return self.url + "/v1"

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise RuntimeError("the gateway is not serving yet")
        return self._gateway

    # -- declarations ----------------------------------------------------------------------------

    def model(self, alias: str, script: Any, *, target: Mapping[str, Any] | None = None) -> None:
        """Serve ``alias`` from ``script`` (see :mod:`onwards_trio.testing`); ``target`` adds
        keys to the alias's target config (``fallback``, ``keys``, ``rate_limit``, ...)."""
        if script is None:
            raise TypeError(f"model {alias!r} needs a script (or use recorded())")
        self._declare(alias, ScriptedModel(script), target)

    def recorded(
        self,
        alias: str,
        *,
        upstream: RealUpstream | Mapping[str, Any] | None = None,
        ignore: Sequence[str] = (),
        match: Matcher | None = None,
        realtime: bool = False,
        target: Mapping[str, Any] | None = None,
    ) -> None:
        """Serve ``alias`` from the test's cassette (or, with ``--onwards-record``, from the real
        provider ``upstream``, writing the cassette). Requests match by alias and JSON body
        without the ``ignore`` keys, unless ``match(alias, body)`` gives the key. ``realtime``
        replays stream events at their recorded offsets instead of at once."""
        if isinstance(upstream, Mapping):
            upstream = RealUpstream(**upstream)
        real = upstream or self._upstreams.get(alias)
        matcher = match or body_matcher(ignore)
        self._declare(alias, RecordedModel(matcher, real, realtime), target)

    def _declare(
        self, alias: str, model: ScriptedModel | RecordedModel, target: Mapping[str, Any] | None
    ) -> None:
        def apply() -> None:
            self.upstream.models[alias] = model
            self._targets[alias] = dict(target or {})
            self._reload()

        self._in_trio(apply)

    def tool(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> Any:
        """Declare a Python function as a server-side tool of every alias (usable as a
        decorator). It is called with the model's JSON arguments as keyword arguments; its
        JSON-able return value (or an exception's text) goes back to the model."""

        def register(fn: F) -> F:
            tool = PythonTool(
                name=name or fn.__name__,
                fn=fn,
                description=description or inspect.getdoc(fn) or "",
                parameters=dict(parameters) if parameters is not None else _parameters(fn),
            )

            def apply() -> None:
                self.upstream.tools[tool.name] = tool
                self._reload()

            self._in_trio(apply)
            return fn

        return register(fn) if fn is not None else register

    def configure(self, extra: Mapping[str, Any]) -> None:
        """Merge top-level keys into the gateway's config (``auth``, ``strict_mode``, ...)."""

        def apply() -> None:
            self._extra.update(extra)
            self._reload()

        self._in_trio(apply)

    # -- what happened ---------------------------------------------------------------------------

    def calls(self, alias: str | None = None) -> list[ModelCall]:
        """The requests the models received (of ``alias``, or all), oldest first."""
        with self.upstream.lock:
            return [c for c in self.upstream.calls if alias is None or c.alias == alias]

    def tool_calls(self, name: str | None = None) -> list[ToolCall]:
        """The Python tool calls the gateway's loop made (of tool ``name``, or all)."""
        with self.upstream.lock:
            return [c for c in self.upstream.tool_calls if name is None or c.name == name]

    def steps(self, response_id: str) -> list[Step]:
        """The loop's steps for a ``/v1/responses`` response, in order."""
        with self.upstream.lock:
            rows = [dict(r) for r in self._steps.by_response.get(response_id, [])]
        return [Step(**r) for r in rows]

    def assert_called(self, alias: str, times: int | None = None, **body: Any) -> ModelCall:
        """Assert ``alias`` was called (exactly ``times`` times, when given) and that its last
        request body contains ``body``; returns that call."""
        calls = self.calls(alias)
        if not calls:
            others = sorted({c.alias for c in self.calls()})
            raise AssertionError(f"model {alias!r} was never called (called: {others or 'none'})")
        if times is not None and len(calls) != times:
            raise AssertionError(f"model {alias!r} was called {len(calls)} times, not {times}")
        last = calls[-1]
        if body:
            assert_subset(last.body, body, f"the last request {alias!r} received")
        return last

    @property
    def problems(self) -> list[str]:
        """Requests the harness could not answer as the test meant (exhausted script, script
        error, unmatched cassette request); the fixtures fail the test when any remain."""
        with self.upstream.lock:
            return list(self.upstream.problems)

    # -- serving ---------------------------------------------------------------------------------

    def _in_trio(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the serving Trio run (at once when that is the current thread)."""
        if self._token is None or threading.get_ident() == self._trio_thread:
            fn()
        else:
            call_in_run(self._token, fn)

    def config_dict(self) -> dict[str, Any]:
        """The gateway config the declarations make (before parsing)."""
        assert self._upstream_url is not None
        targets = {}
        for alias, extra in self._targets.items():
            provider = {k: v for k, v in extra.items() if k in _PROVIDER_KEYS}
            pool = {k: v for k, v in extra.items() if k not in _PROVIDER_KEYS}
            targets[alias] = {
                # Every adapter on: /v1/responses runs the loop, /v1/messages is translated.
                "open_responses": {"adapter": True},
                "anthropic": {"adapter": True},
                **pool,
                "providers": [{**provider, "url": f"{self._upstream_url}/m/{alias}"}],
            }
        tools = {
            t.name: {
                "url": f"{self._upstream_url}/tools/{t.name}",
                "description": t.description,
                "parameters": dict(t.parameters),
            }
            for t in self.upstream.tools.values()
        }
        return {"store": {"kind": "memory"}, **self._extra, "targets": targets, "tools": tools}

    def _reload(self) -> None:
        if self._gateway is not None:
            self._gateway.update_config(parse_config(self.config_dict()))

    async def run(
        self, *, task_status: trio.TaskStatus[Harness] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the upstream and the gateway until cancelled (``task_status`` gets ``self``)."""
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        if self._cassette_path is not None:
            self.upstream.cassette = (
                Cassette(self._cassette_path)
                if self.upstream.recording
                else Cassette.load(self._cassette_path)
            )
        try:
            async with trio.open_nursery() as nursery:
                cfg = HypercornConfig()
                cfg.bind = ["127.0.0.1:0"]
                cfg.accesslog = None
                cfg.errorlog = None
                cfg.graceful_timeout = 0
                binds = await nursery.start(hypercorn_serve, self.upstream, cfg)
                self._upstream_url = str(binds[0])
                if self.upstream.recording:
                    import httpx

                    self.upstream.client = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30))
                gateway = Gateway(parse_config(self.config_dict()))
                gateway.responses.step_store = self._steps
                gateway.responses.response_store = MemoryResponseStore()
                self._gateway = gateway
                info = await nursery.start(gateway.serve, "127.0.0.1", 0)
                self._url = info.url
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                if self.upstream.client is not None:
                    await self.upstream.client.aclose()
            self._token = None

    def save_cassette(self) -> None:
        """Write the cassette when recording produced one (never an empty file), once the
        recordings still in flight have ended (called from the test's thread)."""
        cassette = self.upstream.cassette
        running = self._token is not None and threading.get_ident() != self._trio_thread
        if self.upstream.recording and running:
            self.upstream.wait_for_recordings(timeout=30)
        if self.upstream.recording and cassette is not None and cassette.interactions:
            cassette.save()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Harness]:
        """Serve in the current Trio run for the duration of the block."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()


def call_in_run(token: trio.lowlevel.TrioToken, fn: Callable[[], None]) -> None:
    """Run ``fn`` in the Trio run of ``token`` from another thread, and wait for it.

    ``trio.from_thread`` refuses a caller that runs a Trio loop of its own (an anyio test on
    the trio backend), so the hand-over is a plain event.
    """
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    token.run_sync_soon(run)
    if not done.wait(_STOP_TIMEOUT):
        raise RuntimeError("the test gateway's Trio run did not answer")
    if failure:
        raise failure[0]


@contextmanager
def serve_in_thread(harness: Harness) -> Iterator[Harness]:
    """Serve ``harness`` from a background thread running its own Trio run.

    The one thread of the plugin: a sync or asyncio test cannot host a Trio nursery, and the
    gateway must answer while the test blocks in its client.
    """
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        stop = trio.Event()
        state["stop"] = stop
        async with trio.open_nursery() as nursery:
            await nursery.start(harness.run)
            state["token"] = trio.lowlevel.current_trio_token()
            ready.set()
            await stop.wait()
            nursery.cancel_scope.cancel()

    def target() -> None:
        try:
            trio.run(main)
        except BaseException as exc:
            state["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=target, name="onwards-trio-testing", daemon=True)
    thread.start()
    if not ready.wait(_START_TIMEOUT) or "error" in state:
        raise RuntimeError("the test gateway did not start") from state.get("error")
    try:
        yield harness
    finally:
        token = state.get("token")
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                call_in_run(token, state["stop"].set)
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"the test gateway did not stop within {_STOP_TIMEOUT:g}s")
        if "error" in state:
            raise RuntimeError("the test gateway failed") from state["error"]
