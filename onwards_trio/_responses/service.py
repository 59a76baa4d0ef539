"""``/v1/responses`` over any Chat Completions upstream: the Open Responses adapter on the loop,
stored responses and background responses (SPEC §3.1 to §3.5).

Routes (served by :class:`ResponsesService`, which the gateway owns):

* ``POST /v1/responses`` for aliases in adapter mode — validated (:mod:`.input`),
  converted to a chat request and driven by :func:`~onwards_trio._loop.run.run_response_loop`. Model
  calls go through the gateway's proxy pipeline (routing, balancing, failover, limits, upstream
  auth, sanitisation); server-side tools are tool steps; client-side function calls end the
  response with their ``function_call`` items. Other aliases pass through to the upstream.
* ``GET /v1/responses/{id}`` (``?stream=true&starting_after=N`` or ``Last-Event-ID`` replays a
  background response's events, then follows it live), ``GET …/input_items``,
  ``DELETE /v1/responses/{id}``, ``POST …/cancel``.

Execution shapes: a *foreground* response runs in the request's task (streamed as SSE or
answered as one JSON object); a *background* one runs in the gateway's service nursery, its
events kept in memory for live followers and logged in the :class:`ResponseStore` for resumes.
On a store shared by several replicas (:class:`SharedResponseStore`), the replica running a
background response polls its status, so a cancel or ``DELETE`` sent to another replica stops it.
Whatever ends a loop — completion, failure, cancel, shutdown — the stored response is rewritten
inside a shielded, bounded scope with what happened (``completed``/``incomplete``/``failed``/
``cancelled`` plus the output produced so far). A foreground client that disconnects does not
stop its loop (onwards' policy, :class:`~onwards_trio._loop.run.DisconnectPolicy`): the work
finishes and the stored response holds the full result for a later ``GET``.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

import attrs
import orjson
import trio

from onwards_trio import _errors as errors
from onwards_trio._errors import HTTPError, error_body
from onwards_trio._loop.events import LoopEvent, LoopEventKind
from onwards_trio._loop.run import DisconnectPolicy, LoopConfig, LoopError, run_response_loop
from onwards_trio._loop.steps import ChainStep, MultiStepStore, ResponseStatus, StepKind
from onwards_trio._loop.tools import RequestContext, ToolError, ToolKind, ToolSchema
from onwards_trio._ops.reload import config_secrets
from onwards_trio._ops.telemetry import current_telemetry
from onwards_trio._proxy.auth import bearer_token
from onwards_trio._proxy.pipeline import ProxyRequest, extract_model
from onwards_trio._responses.compact import compact_conversation, compaction_request
from onwards_trio._responses.config_tools import AgentSpec, ConfigToolExecutor
from onwards_trio._responses.durable import Durability, api_key_for, resume_headers
from onwards_trio._responses.input import (
    OFF_LOOP_ITEMS,
    ResponsesRequest,
    assign_item_ids,
    check_call_ids,
    parse_request,
    previous_response_not_found,
    resolve_references,
    resolve_server_tools,
    to_chat_request,
    tool_schema_to_chat,
)
from onwards_trio._responses.mcp_client import McpSessions, McpToolCache, open_mcp_sessions
from onwards_trio._responses.mcp_tools import McpPlan
from onwards_trio._responses.model_transport import MODEL_CALL_DROP, ProxyModelTransport
from onwards_trio._responses.socket import serve_socket
from onwards_trio._stores import open_backend
from onwards_trio._stores.base import (
    TERMINAL_STATUSES,
    Claim,
    DurableStore,
    FinishedResponse,
    FinishedWriter,
    ResponseStore,
    SharedResponseStore,
    StoreBackend,
    StoredEvent,
    StoredResponse,
)
from onwards_trio._stores.memory import MemoryStore, new_response_id
from onwards_trio._transport.asgi import (
    JSON_HEADERS,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    send_error,
    send_json,
    send_response,
    watch_disconnect,
)
from onwards_trio._transport.sse import encode_event

if TYPE_CHECKING:
    from onwards_trio._app.gateway import Gateway

__all__ = ["ResponsesService", "response_object"]

log = logging.getLogger("onwards_trio.responses")

_STORED_ROUTE = re.compile(r"/v1/responses/([^/]+)(/input_items|/cancel)?/?")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_FLUSH_EVERY = 32  # background event-log batch size
_FLUSH_INTERVAL = 0.2  # … or at most this old (seconds)
_POLL_INTERVAL = 0.25  # following a response another process runs
_POLL_IDLE_LIMIT = 600.0  # give up following a response that shows no sign of life
# A replica running a background response on a shared store (PostgreSQL) reads its status this
# often, to stop the loop once another replica cancelled or deleted it; a read that takes longer
# than the timeout is abandoned and tried again at the next interval.
_REMOTE_CANCEL_INTERVAL = 0.5
_REMOTE_CANCEL_READ_TIMEOUT = 5.0


_Deliver: TypeAlias = Callable[[StoredEvent], Awaitable[None]]
T = TypeVar("T")
# The spec's end of an SSE stream, after the terminal event. (Events also carry ``id:``, which
# the spec advises against: it is the Last-Event-ID cursor that resumes a background stream.)
DONE_LINE = b"data: [DONE]\n\n"
# The error of a response whose final state could not be stored: its client is not told it
# completed (a later GET could not show that).
_NOT_STORED = {"code": "server_error", "message": "The response could not be stored."}


def _without_status(response: dict[str, Any]) -> dict[str, Any]:
    out = response.copy()
    out.pop("status", None)
    return out


_NO_SESSIONS: contextlib.nullcontext[None] = contextlib.nullcontext()


def _persisting(timeout: float) -> trio.CancelScope:
    """A shielded scope that gives up after ``timeout``: clean-up that must not be cut short
    by a cancellation, nor hang (``CancelScope(shield=True)`` in ``move_on_after``, as one
    scope)."""
    return trio.CancelScope(shield=True, deadline=trio.current_time() + timeout)


def _now() -> int:
    return int(time.time())


def _echo_text(text: dict[str, Any] | None) -> dict[str, Any]:
    """``text`` as the Response reports it: a ``json_schema`` format with every field the
    schema requires (``description``, ``strict`` nullable)."""
    if text is None:
        return {"format": {"type": "text"}}
    fmt = text.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fmt = {
            "name": "response",
            **fmt,
            "description": fmt.get("description"),
            "strict": fmt.get("strict"),
        }
        return {**text, "format": fmt}
    return {"format": {"type": "text"}, **text}


def _echo_server_tool(tool: ToolSchema) -> dict[str, Any]:
    """A server-side tool the model was offered, as the Response's ``tools`` lists it."""
    chat = tool_schema_to_chat(tool)["function"]
    return {
        "type": "function",
        "name": chat["name"],
        "description": chat.get("description"),
        "parameters": chat.get("parameters"),
        "strict": chat.get("strict"),
    }


def response_object(
    request: ResponsesRequest,
    response_id: str,
    created_at: int,
    server_tools: Sequence[ToolSchema] = (),
) -> dict[str, Any]:
    """The Response object's echo fields for ``request`` (no ``status``; ``output`` empty).
    ``tools`` lists every tool the model was offered: the client's and the server's."""
    reasoning = request.reasoning
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": request.background,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": request.max_tool_calls,
        "model": request.model,
        "output": [],
        "parallel_tool_calls": (
            request.parallel_tool_calls if request.parallel_tool_calls is not None else True
        ),
        "previous_response_id": request.previous_response_id,
        "reasoning": (
            {"effort": reasoning.get("effort"), "summary": reasoning.get("summary"), **reasoning}
            if reasoning is not None
            else {"effort": None, "summary": None}
        ),
        "service_tier": request.service_tier or "default",
        "store": request.store,
        "temperature": request.temperature if request.temperature is not None else 1.0,
        "text": _echo_text(request.text),
        "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
        "tools": request.echoed_tools + [_echo_server_tool(t) for t in server_tools],
        "top_logprobs": request.top_logprobs or 0,
        "top_p": request.top_p if request.top_p is not None else 1.0,
        "truncation": request.truncation or "disabled",
        "usage": None,
        "user": request.user,
        "metadata": request.metadata if request.metadata is not None else {},
        "presence_penalty": request.presence_penalty or 0.0,
        "frequency_penalty": request.frequency_penalty or 0.0,
        "safety_identifier": request.safety_identifier,
        "prompt_cache_key": request.prompt_cache_key,
    }


def _not_found(response_id: str) -> HTTPError:
    return HTTPError(
        404,
        error_body(
            f"Response with id '{response_id}' not found.",
            "invalid_request_error",
            "not_found",
            "response_id",
        ),
    )


def _owner_of(token: str | None, gateway: Gateway) -> str | None:
    """A digest of the caller's key when it is one the gateway knows (else no owner)."""
    if token is None or token not in gateway.targets.table.all_keys:
        return None
    return hashlib.sha256(token.encode()).hexdigest()


def _sse(event: StoredEvent) -> bytes:
    return encode_event(event.data, event=event.type, id=event.sequence)


def _stored_event(event: LoopEvent) -> StoredEvent:
    return StoredEvent(event.sequence, event.kind.value, orjson.dumps(event.wire()))


# -- tools for one request ----------------------------------------------------------------------


@attrs.frozen
class _AgentDepth:
    depth: int


class _RequestTools:
    """The tools one response may run: exactly those offered to its model.

    Config ``kind: agent`` tools are presented to the loop as ordinary tools and run here as a
    separate loop on *their own* alias (with that alias's tools and the tool's instructions);
    the loop's built-in AGENT recursion would reuse the parent's model. Depth is carried in the
    context and capped by ``max_response_step_depth``.
    """

    def __init__(
        self,
        service: ResponsesService,
        offered: Sequence[ToolSchema],
        headers: Sequence[tuple[bytes, bytes]],
        steps: MultiStepStore,
        mcp: McpPlan | None = None,
    ) -> None:
        self.service = service
        self.offered = {t.name: t for t in offered}
        self.headers = headers
        self.steps = steps  # the response's step store: sub-agents keep their steps there too
        self.mcp = mcp  # the request's own MCP servers

    async def tools(self, ctx: RequestContext) -> Sequence[ToolSchema]:
        await trio.lowlevel.checkpoint_if_cancelled()  # a listing, no I/O: no task switch
        return [
            attrs.evolve(t, kind=ToolKind.HTTP) if t.kind is ToolKind.AGENT else t
            for t in self.offered.values()
        ]

    async def execute(self, name: str, tool_call_id: str, args: Any, ctx: RequestContext) -> Any:
        if name not in self.offered:
            raise ToolError.not_found(name)
        if self.mcp is not None and self.mcp.owns(name):
            return await self.mcp.execute(name, tool_call_id, args, ctx.extension(McpSessions))
        executor = self.service.executor
        agent = executor.agent(name, ctx)
        if agent is not None:
            return await self.service.run_agent(agent, args, ctx, self.headers, self.steps)
        return await executor.execute(name, tool_call_id, args, ctx)


# -- event delivery -----------------------------------------------------------------------------


class _Live:
    """The in-memory event log of a running background response, for live followers.

    Sequence numbers start at 0 and grow by one, so an event's index is its sequence. Events
    are also written to the response store in batches (every ``_FLUSH_EVERY`` events, at most
    ``_FLUSH_INTERVAL`` old, and at the end) so another process — or this one after the loop
    ended — can replay them.
    """

    def __init__(
        self,
        response_id: str,
        store: ResponseStore,
        *,
        leased: bool = False,
        handover: bool = False,
    ) -> None:
        self.response_id = response_id
        self.store = store
        # Durable responses (docs/responses.md): ``leased`` while this process holds its lease;
        # ``release`` says why the loop stops without writing its end: "lost" (another process
        # owns it now) or "handover" (shutting down; another process resumes it).
        self.leased = leased
        self.handover = handover
        self.release: str | None = None
        self.events: list[StoredEvent] = []
        self.done = False
        self.finished = trio.Event()  # set once the final state is persisted
        self.scope = trio.CancelScope()
        self._changed = trio.Event()
        self._pending: list[StoredEvent] = []
        self._last_flush = trio.current_time()
        self._flush_lock = trio.Lock()

    def handed_over(self) -> bool:
        """Whether the loop, now cancelled, is left for another process: its lease was lost,
        or the gateway is stopping (a cancel from outside, not from ``scope``) with
        ``on_shutdown: handover``."""
        if self.release is None and self.handover and not self.scope.cancel_called:
            self.release = "handover"
        return self.release is not None

    def append(self, event: StoredEvent) -> None:
        self.events.append(event)
        self._pending.append(event)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def close(self) -> None:
        self.done = True
        self._wake()

    async def wait_beyond(self, known: int) -> None:
        """Wait until there are more than ``known`` events or the log is closed."""
        changed = self._changed
        if len(self.events) > known or self.done:
            return
        await changed.wait()

    async def maybe_flush(self, force: bool = False) -> None:
        """Write the pending events when a batch is due. Never raises (but ``Cancelled``): a
        batch the store refused (or a cancelled write) stays pending and goes with the next
        flush, and the loop (whose event sink calls this) is never broken by its event log.
        Flushes are serialised, so batches reach the store in order."""
        due = (
            len(self._pending) >= _FLUSH_EVERY
            or trio.current_time() - self._last_flush >= _FLUSH_INTERVAL
        )
        if not (self._pending and (force or due)):
            return
        async with self._flush_lock:
            batch, self._pending = self._pending, []
            if not batch:
                return  # another flush took them while we waited
            self._last_flush = trio.current_time()
            try:
                await self.store.append_events(self.response_id, batch)
            except BaseException as exc:
                self._pending = batch + self._pending
                if not isinstance(exc, Exception):
                    raise
                log.exception("response %s: could not store its events", self.response_id)

    async def flush_while_running(self) -> None:
        """Flush on a timer, so events do not wait in memory while the loop is quiet (a slow
        model or tool): another process following the response sees them within
        ``_FLUSH_INTERVAL``."""
        while True:
            await trio.sleep(_FLUSH_INTERVAL)
            await self.maybe_flush()


class _ResponseSink:
    """The loop's :class:`~onwards_trio._loop.events.EventSink` for one response.

    Forwards events to a foreground SSE writer (``channel``) and/or a background log
    (``live``); remembers the terminal snapshot and every finished output item, so a response
    that ends without a terminal event (cancelled) can still be stored with its partial output.
    """

    def __init__(
        self,
        job: _Job,
        channel: trio.MemorySendChannel[LoopEvent] | None = None,
        live: _Live | None = None,
    ) -> None:
        self.job = job
        self.channel = channel
        self.live = live
        self.terminal: dict[str, Any] | None = None
        self.items: dict[int, dict[str, Any]] = {}
        self.loop_error: LoopError | None = None
        self.crashed = False
        self.sequence = -1  # of the last event seen
        # A stored response's terminal event reaches a foreground client only once its final
        # state is stored (:meth:`ResponsesService._execute` releases it).
        self.hold_terminal = job.stored and live is None
        # Nobody follows the events (a non-streamed answer): the loop sends only those used
        # here, the items (a cancelled response's partial output) and the terminal one.
        self.quiet = channel is None and live is None
        self.held: LoopEvent | None = None
        self.stored = not job.stored  # the final state is stored (nothing to store: True)

    async def emit(self, event: LoopEvent) -> None:
        self.sequence = event.sequence
        if event.kind.is_terminal:
            snapshot = dict(event.data.get("response") or {})
            if snapshot.get("status") in ("completed", "incomplete"):
                snapshot["completed_at"] = _now()
            self.terminal = snapshot
            event = LoopEvent(event.sequence, event.kind, {**event.data, "response": snapshot})
        elif event.kind is LoopEventKind.OUTPUT_ITEM_DONE:
            index = event.data.get("output_index")
            item = event.data.get("item")
            if isinstance(index, int) and isinstance(item, Mapping):
                self.items[index] = dict(item)
        if self.live is not None:
            self.live.append(_stored_event(event))
            # At each step boundary (an item done, a tool about to run) the log is written,
            # so a process that dies loses at most the deltas of the step it was in.
            boundary = event.kind is LoopEventKind.OUTPUT_ITEM_DONE or (
                event.kind is LoopEventKind.OUTPUT_ITEM_ADDED
                and event.data.get("item", {}).get("type") == "function_call_output"
            )
            await self.live.maybe_flush(force=event.kind.is_terminal or boundary)
        if event.kind.is_terminal and self.hold_terminal:
            self.held = event
            return
        await self._deliver(event)

    async def _deliver(self, event: LoopEvent) -> None:
        if self.channel is not None:
            try:
                await self.channel.send(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.channel = None

    async def release_terminal(self, stored: bool) -> None:
        """Deliver the terminal event held back until the final state was stored; when it
        could not be stored (``stored`` false), a ``response.failed`` saying so instead."""
        event, self.held = self.held, None
        if event is None:
            return
        if not stored:
            failed = {**event.data.get("response", {}), "status": "failed"}
            failed["error"] = _NOT_STORED
            event = LoopEvent(event.sequence, LoopEventKind.FAILED, {"response": failed})
        await self._deliver(event)

    async def close_stream(self) -> None:
        """End the event stream with a terminal event when the loop sent none (cancelled,
        crashed): followers of a stream must always see one. A cancelled response ends with
        ``response.incomplete`` in status ``cancelled`` (Open Responses has no
        ``response.cancelled``), a crash with ``response.failed``."""
        if self.terminal is not None or (self.live is None and self.channel is None):
            return
        if self.live is not None and self.live.handed_over():
            return  # another process continues the response, and its stream

        final = self.final_response()
        kind = LoopEventKind.INCOMPLETE if final["status"] == "cancelled" else LoopEventKind.FAILED
        await self.emit(LoopEvent(self.sequence + 1, kind, {"response": final}))

    def final_response(self) -> dict[str, Any]:
        """The Response object to store once the loop has ended, however it ended."""
        if self.terminal is not None:
            return self.terminal
        base = {**self.job.base}
        base["output"] = [self.items[i] for i in sorted(self.items)]
        if self.loop_error is not None:
            base["status"] = "failed"
            base["error"] = self.loop_error.error_object()
        elif self.crashed:
            base["status"] = "failed"
            base["error"] = {"code": "server_error", "message": errors.INTERNAL_MESSAGE}
        else:
            base["status"] = "cancelled"
        return base


@attrs.define(eq=False)
class _Job:
    """Everything one response's loop needs (independent of the HTTP request that made it)."""

    response_id: str
    request: ResponsesRequest
    base: dict[str, Any]
    chat: dict[str, Any]
    ctx: RequestContext
    tools: _RequestTools
    transport: ProxyModelTransport
    steps: MultiStepStore
    stored: bool
    mcp: McpPlan
    mcp_sessions: bool  # whether the loop may reach an MCP server (config or request)
    body: Any = None  # the request as sent (a background response keeps it for resuming)
    # A foreground stored response on a backend that writes it whole at the end: its steps
    # are kept in memory (``steps``) and written with its final state in one call.
    writer: FinishedWriter | None = None
    record: StoredResponse | None = None  # as created; not in the store yet when ``unwritten``
    unwritten: bool = False
    first_sequence: int = 0  # a resumed response's event stream continues here
    history: list[dict[str, Any]] = attrs.field(factory=list)  # previous_response_id's
    final_json: bytes | None = None  # the final Response object as stored: the answer reuses it


# -- the service --------------------------------------------------------------------------------


class ResponsesService:
    """``/v1/responses`` for one gateway: stores, tools, running background responses.

    Stores are opened lazily from ``config.store`` (SQLite file by default, ``memory`` on
    request); tests and hosts may assign :attr:`response_store` / :attr:`step_store` first.
    """

    def __init__(self, gateway: Gateway, *, loop_config: LoopConfig | None = None) -> None:
        self.gateway = gateway
        self.loop_config = loop_config or LoopConfig()
        self.response_store: ResponseStore | None = None
        self.step_store: MultiStepStore | None = None
        self.durable_store: DurableStore | None = None
        self._executor: ConfigToolExecutor | None = None
        # MCP tool listings, shared by every response (config and request servers alike).
        self.mcp_cache = McpToolCache(gateway.config.mcp.tools_ttl_secs)
        self._live: dict[str, _Live] = {}
        self._keeper_started = False
        self._backend: object = None  # what ``config.store`` opened
        self._writer_checked: object = None  # the backend _backend_writes is about
        self._backend_writes = False
        self.durability = Durability(self)

    @property
    def running(self) -> Mapping[str, _Live]:
        """The background responses this process runs, by id."""
        return self._live

    @property
    def persist_timeout(self) -> float:
        """How long a shielded final write may take (the loop config's, kept in step with it)."""
        return self.loop_config.persist_timeout

    # -- resources -------------------------------------------------------------------------------

    @property
    def executor(self) -> ConfigToolExecutor:
        if self._executor is None:
            self._executor = ConfigToolExecutor.from_targets(
                self.gateway.targets, mcp_cache=self.mcp_cache
            )
            self._ensure_keeper()
        return self._executor

    def _ensure_keeper(self) -> None:
        """Tie our resources to the gateway's service nursery: when it closes, so do we."""
        if self._keeper_started:
            return
        try:
            nursery = self.gateway.nursery
        except RuntimeError:
            return  # not running (an embedding host calls aclose itself)
        self._keeper_started = True
        nursery.start_soon(self._keeper)

    async def _keeper(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._keeper_started = False
            await self.aclose()

    def _stores(self) -> tuple[ResponseStore, MultiStepStore]:
        self._ensure_keeper()
        if self.response_store is None or self.step_store is None:
            backend = open_backend(self.gateway.config.store)
            self._backend = backend
            self.response_store = self.response_store or backend.responses
            self.step_store = self.step_store or backend.steps
            self.durable_store = self.durable_store or backend.durable
        self.durability.ensure_running()
        return self.response_store, self.step_store

    def _writer(self) -> FinishedWriter | None:
        """The backend, when it writes a finished response in one call and both stores in use
        are still its own (a host may have replaced one)."""
        backend = self._backend
        if backend is not self._writer_checked:
            # isinstance against a runtime-checkable Protocol is slow: once per backend
            self._writer_checked = backend
            self._backend_writes = isinstance(backend, FinishedWriter) and isinstance(
                backend, StoreBackend
            )
        if (
            self._backend_writes
            and isinstance(backend, StoreBackend)
            and backend.responses is self.response_store
            and backend.steps is self.step_store
        ):
            return cast(FinishedWriter, backend)
        return None

    def durable(self) -> DurableStore | None:
        """The store of leases and ``Idempotency-Key`` records (opened on first use)."""
        self._stores()
        return self.durable_store

    async def check_store(self) -> None:
        """Open the stores and write to them once (a no-op delete), so that an unusable store
        (an unwritable SQLite path, an unreachable database) is a clear error at start rather
        than a 500 on every ``/v1/responses`` request. Raises :class:`StoreError`."""
        store, _ = self._stores()
        await store.delete("resp_onwards_trio_start_check")

    async def recover_at_start(self) -> None:
        """Resume what a dead process left, as soon as the gateway runs (when there may be
        any: an SQLite file that does not exist yet holds nothing)."""
        spec = self.gateway.config.store
        if not self.durability.enabled:
            return
        if spec.kind == "sqlite" and not await trio.Path(spec.path).exists():
            return
        self._stores()

    async def drain(self) -> None:
        """Wait until no background response runs here (the caller bounds the wait: a
        graceful shutdown lets them finish within its grace)."""
        while self._live:
            await next(iter(self._live.values())).finished.wait()

    async def aclose(self) -> None:
        """Stop background responses — handed over (``on_shutdown: handover``, leases released
        for another process) or stored ``cancelled`` — and close the stores."""
        for live in list(self._live.values()):
            if live.handover and live.release is None:
                live.release = "handover"
            live.scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(self.persist_timeout * 2):
            for live in list(self._live.values()):
                await live.finished.wait()
            executor, self._executor = self._executor, None
            if executor is not None:
                await executor.aclose()
            if self.response_store is not None:
                await self.response_store.aclose()
            closer = getattr(self.step_store, "aclose", None)
            if closer is not None:
                await closer()

    # -- routing ---------------------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Serve any request under ``/v1/responses`` (what is not ours goes to the proxy)."""
        path: str = scope["path"]
        if path.rstrip("/") == "/v1/responses":
            if scope["method"] != "POST":
                return await self._passthrough(scope, receive, send)
            request = await self._read(scope, receive, send)
            if isinstance(request, int):
                return request
            status = await self.create(request, receive, send)
            if status is None:
                relayed: int = await self.gateway.relay(request, receive, send)
                return relayed
            return status
        if path.rstrip("/") == "/v1/responses/compact" and scope["method"] == "POST":
            request = await self._read(scope, receive, send)
            if isinstance(request, int):
                return request
            status = await self.compact(request, send)
            if status is None:
                relayed = await self.gateway.relay(request, receive, send)
                return relayed
            return status
        handled = await self.stored(scope, receive, send)
        if handled is None:
            return await self._passthrough(scope, receive, send)
        return handled

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> ProxyRequest | int:
        """The request, or the status already answered (a bad body) or 499 (client gone)."""
        try:
            request: ProxyRequest = await self.gateway.read_request(scope, receive)
        except HTTPError as exc:
            await send_error(send, exc)
            return exc.status
        except ClientDisconnected:
            return 499
        return request

    async def _passthrough(self, scope: Scope, receive: Receive, send: Send) -> int:
        request = await self._read(scope, receive, send)
        if isinstance(request, int):
            return request
        status: int = await self.gateway.relay(request, receive, send)
        return status

    # -- POST /v1/responses ---------------------------------------------------------------------

    async def create(self, request: ProxyRequest, receive: Receive, send: Send) -> int | None:
        """Answer ``POST /v1/responses`` for an adapter-mode alias; ``None`` if not ours.

        Usable as strict mode's responses hook: ``request`` is already read (and validated).
        """
        try:
            adapted = self.adapter_alias(request)
            if adapted is None:
                return None
            body = request.json
            answer_only = isinstance(body, dict) and not (
                body.get("stream") is True or body.get("background") is True
            )
            job = await self.prepare(request, *adapted, answer_only=answer_only)
        except HTTPError as exc:
            await send_error(send, exc)
            return exc.status
        if job.request.background:
            return await self._start_background(job, receive, send)
        if job.request.stream:
            return await self._stream_foreground(job, receive, send)
        return await self._answer_foreground(job, send)

    def adapter_alias(self, request: ProxyRequest) -> tuple[str, str | None] | None:
        """``(alias, client key)`` when the request's alias is served in adapter mode, ``None``
        when it is not ours (the proxy gives the standard 400/401/404 or passes it on).
        Raises :class:`HTTPError` for a caller the alias refuses or a body that is not JSON."""
        table = self.gateway.targets.table
        alias = extract_model(request.headers, request.json)
        if alias is None or alias not in table.pools:
            return None
        _, pool, token = self.gateway.proxy.resolve(table, request)
        if not pool.adapter:
            return None
        if request.json is None and request.body:
            raise errors.invalid_request("The request body is not valid JSON.", "body")
        return alias, token

    async def compact(self, request: ProxyRequest, send: Send) -> int | None:
        """Answer ``POST /v1/responses/compact`` for an adapter-mode alias (``None`` if the
        alias is not ours); a body without ``model`` is a 400 here, whoever serves it."""
        try:
            if extract_model(request.headers, request.json) is None:
                compaction_request(request.json)  # raises the 400 naming the field
            adapted = self.adapter_alias(request)
            if adapted is None:
                return None
            alias, token = adapted
            _, items, previous_id = compaction_request(request.json)
            history: list[dict[str, Any]] = []
            if previous_id is not None:
                previous = await self._stores()[0].get(previous_id)
                owner = _owner_of(token, self.gateway)
                if previous is None or (previous.owner is not None and previous.owner != owner):
                    raise previous_response_not_found(previous_id)
                history = previous.conversation()
            assert isinstance(request.json, dict)  # compaction_request checked it
            result = await compact_conversation(
                ProxyModelTransport(self.gateway.proxy, request.headers),
                {**request.json, "model": alias},
                [*history, *items],
                self.loop_config.max_model_body,
            )
        except HTTPError as exc:
            await send_error(send, exc)
            return exc.status
        await send_json(send, 200, result)
        return 200

    async def prepare(
        self,
        request: ProxyRequest,
        alias: str,
        token: str | None,
        recent: Mapping[str, list[dict[str, Any]]] | None = None,
        *,
        answer_only: bool = False,
    ) -> _Job:
        """Validate and convert the request, load what ``previous_response_id`` names (from
        ``recent``, a WebSocket's connection-local conversations, then the store) and
        record the new response. Raises :class:`HTTPError` for a request it refuses.

        ``answer_only``: the client learns the response's id only from the answer (a
        foreground request without a stream), so nobody can ask for it before it ends; on a
        :class:`FinishedWriter` backend it is then not written now but with its final state."""
        body = request.json
        big = isinstance(body, dict) and _long(body.get("input"))
        # A long input is converted in a worker thread: the event loop keeps serving others.
        req = await _off_loop(big, partial(parse_request, body))
        # The alias the client named (model-override may differ from the body's model).
        # (``attrs.evolve`` costs ~18 µs on this 30-field class: only when something changes.)
        if req.model != alias:
            req = attrs.evolve(req, model=alias)
        response_store, step_store = self._stores()
        owner = _owner_of(token, self.gateway)
        history: list[dict[str, Any]] = []
        previous_id = req.previous_response_id
        if previous_id is not None and recent is not None and previous_id in recent:
            history = list(recent[previous_id])
        elif previous_id is not None:
            previous = await response_store.get(previous_id)
            if previous is None or (previous.owner is not None and previous.owner != owner):
                raise previous_response_not_found(previous_id)
            if previous.status not in TERMINAL_STATUSES:
                raise errors.invalid_request(
                    f"Previous response with id '{req.previous_response_id}' is still "
                    f"{previous.status}; wait for it to finish.",
                    "previous_response_id",
                )
            history = previous.conversation()
        mcp, echo = await McpPlan.for_request(req.tools, self.gateway.config.mcp, self.mcp_cache)
        if echo != req.tools:
            req = attrs.evolve(req, tools=echo)  # MCP credentials are not echoed
        # Resolving and checking the items is work per item too: with the conversion below, in
        # a worker thread for a long input or history.
        off_loop = big or _long(history)
        req = await _off_loop(off_loop, partial(_resolve_items, req, history))
        ctx = RequestContext(model=alias)
        available = list(await self.executor.tools(ctx))
        chosen = {t.name for t in resolve_server_tools(req, available)}
        offered = [t for t in available if t.name in chosen]

        def convert() -> dict[str, Any]:
            return to_chat_request(
                req,
                history=mcp.history(history, req.input_items),
                server_tools=offered + mcp.offered(),
                # Background responses stream upstream too: resumed clients get the deltas.
                stream=req.stream or req.background,
            )

        chat = await _off_loop(off_loop, convert)
        response_id = new_response_id()
        base = response_object(req, response_id, _now(), offered)
        headers = [(k, v) for k, v in request.headers if k not in MODEL_CALL_DROP]
        # A foreground response's steps are only read by its own loop (nobody resumes it), so
        # on a backend that can write them all at the end they stay in memory until then.
        writer = self._writer() if req.store and not req.background else None
        # store: false keeps nothing
        steps = step_store if req.store and writer is None else MemoryStore(private=True)
        job = _Job(
            response_id=response_id,
            request=req,
            base=base,
            chat=chat,
            ctx=ctx,
            tools=_RequestTools(self, offered + mcp.runnable(), headers, steps, mcp),
            transport=ProxyModelTransport(
                self.gateway.proxy, headers, request_id=response_id, route="/v1/responses"
            ),
            steps=steps,
            stored=req.store,
            mcp=mcp,
            mcp_sessions=bool(mcp) or self.executor.has_mcp(ctx),
            body=request.json,
            history=history,
            writer=writer,
        )
        await job.steps.begin_response(response_id, chat)
        if req.store:
            status = "queued" if req.background else "in_progress"
            job.record = StoredResponse(
                id=response_id,
                response={**base, "status": status},
                input_items=assign_item_ids(req.input_items),
                context_items=history,
                background=req.background,
                owner=owner,
            )
            job.unwritten = answer_only and writer is not None
            if not job.unwritten:
                await response_store.create(job.record)
        return job

    async def _execute(self, job: _Job, sink: _ResponseSink) -> dict[str, Any]:
        """Run the loop to its end and store the outcome (shielded, bounded); return it."""
        try:
            try:
                # One MCP session per server for this response, closed when the loop ends.
                sessions_cm: contextlib.AbstractAsyncContextManager[McpSessions | None] = (
                    open_mcp_sessions(self.mcp_cache.invalidate)
                    if job.mcp_sessions
                    else _NO_SESSIONS  # no generator manager for a response without MCP
                )
                async with sessions_cm as sessions:
                    ctx = job.ctx
                    if sessions is not None:
                        await job.mcp.run_approved(job.steps, job.response_id, sessions)
                        ctx = ctx.with_extension(sessions)
                    await run_response_loop(
                        job.steps,
                        job.tools,
                        ctx,
                        job.transport,
                        request_id=job.response_id,
                        sink=job.mcp.events(sink),
                        config=self.loop_config,
                        response=_without_status(job.base),
                        first_sequence=job.first_sequence,
                        handed_over=sink.live.handed_over if sink.live is not None else None,
                        queued=job.request.background and job.first_sequence == 0,
                    )
            except LoopError as exc:
                sink.loop_error = exc  # already reported as response.failed when it could be
        except Exception:
            log.exception("response %s: the loop crashed", job.response_id)
            sink.crashed = True
        finally:
            # Each part shielded and bounded (one scope: shield and deadline), and only entered
            # when it has something to do (a foreground response that ended with its terminal
            # event has no stream to close; store: false without metrics writes nothing).
            if sink.terminal is None or sink.live is not None:
                with _persisting(self.persist_timeout):
                    await sink.close_stream()
                    if sink.live is not None:  # a retried batch lands before the final status
                        await sink.live.maybe_flush(force=True)
            final = sink.final_response()
            live = sink.live
            store = job.stored and not (live is not None and live.release is not None)
            if store and job.writer is not None and job.record is not None:
                # One call that the store shields and bounds itself (FinishedResponse
                # .start_within): no cancel scope here, which cost as much as the rest of the
                # write's work on this thread (_stores/batching.py).
                store = False
                await self._store_checked(job, sink, final)
            counted = self._count_steps_now(job)
            if store or not counted:
                with _persisting(self.persist_timeout):
                    if store:
                        await self._store_checked(job, sink, final)
                    if not counted:
                        await self._count_steps(job)
        await sink.release_terminal(sink.stored)
        return final

    async def _store_checked(self, job: _Job, sink: _ResponseSink, final: dict[str, Any]) -> None:
        """:meth:`_store_final`; whether it worked in ``sink.stored`` (logged when not)."""
        try:
            sink.stored = await self._store_final(job, final)
        except Exception:
            log.exception("response %s: could not store its outcome", job.response_id)

    async def _store_final(self, job: _Job, final: dict[str, Any]) -> bool:
        """Write the response's final state: with its steps, in one call, when they were kept
        in memory (:attr:`_Job.writer`); else as a status update. True once it is stored (or
        the update was refused: deleted meanwhile, or already terminal)."""
        if job.writer is None or job.record is None:
            await self._stores()[0].update(job.response_id, final)
            return True
        assert isinstance(job.steps, MemoryStore)
        loop_responses, steps = job.steps.contents()
        encoded = orjson.dumps(final)
        record = job.record.with_response(final)
        within = self.persist_timeout
        finished = FinishedResponse(record, job.unwritten, loop_responses, steps, encoded, within)
        await job.writer.write_finished(finished)
        job.final_json = encoded
        return True

    def _count_steps_now(self, job: _Job) -> bool:
        """Count the loop's steps for the metrics at once when there is no need to wait: no
        metrics, or the steps in a memory store (a foreground response's own). False when
        :meth:`_count_steps` has to read them."""
        metrics = self.gateway.metrics
        if metrics is None:
            return True
        if not isinstance(job.steps, MemoryStore):
            return False
        self._tally(job, job.steps.chain(job.response_id, None))
        return True

    async def _count_steps(self, job: _Job) -> None:
        """Loop steps and tool calls by outcome, for the metrics (one chain read)."""
        try:
            steps = await job.steps.list_chain(job.response_id, None)
        except Exception:
            return
        self._tally(job, steps)

    def _tally(self, job: _Job, steps: Sequence[ChainStep]) -> None:
        metrics = self.gateway.metrics
        if metrics is None:
            return
        alias = job.ctx.model or "unknown"
        for step in steps:
            metrics.loop_step(alias, step.kind.value, step.state.value)
            if step.kind == StepKind.TOOL_CALL:
                metrics.tool_call(alias, step.state.value)

    async def _answer_foreground(self, job: _Job, send: Send) -> int:
        sink = _ResponseSink(job)
        final = await self._execute(job, sink)
        if not sink.stored:
            # The answer would name a response the store does not hold (or holds unfinished).
            exc = errors.internal_error()
            await send_error(send, exc)
            return exc.status
        error = job.transport.first_error
        if final.get("status") == "failed" and not final.get("output") and error is not None:
            # Nothing was produced and the model call was refused (limits, auth, upstream
            # error): answer with that, as a chat completion through the gateway would.
            status, body = error
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return status
        if job.final_json is not None:  # encoded once, for the store and this answer
            await send_response(send, 200, JSON_HEADERS, job.final_json)
        else:
            await send_json(send, 200, final)
        return 200

    async def stream_job(
        self, job: _Job, deliver: Callable[[LoopEvent], Awaitable[None]]
    ) -> dict[str, Any]:
        """Run ``job`` and hand each event to ``deliver`` (a WebSocket turn); the final
        Response. Cancelling the caller cancels the loop (stored ``cancelled``)."""
        out, events = trio.open_memory_channel[LoopEvent](64)
        sink = _ResponseSink(job, channel=out)
        final: dict[str, Any] = {}

        async def run() -> None:
            nonlocal final
            try:
                final = await self._execute(job, sink)
            finally:
                out.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            async with events:
                async for event in events:
                    await deliver(event)
        return final

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a WebSocket on ``/v1/responses`` (:mod:`.socket`)."""
        await serve_socket(self, scope, receive, send)

    async def _stream_foreground(self, job: _Job, receive: Receive, send: Send) -> int:
        out, events = trio.open_memory_channel[LoopEvent](64)
        sink = _ResponseSink(job, channel=out)
        gone = False
        loop_scope = trio.CancelScope()

        async def watch() -> None:
            nonlocal gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    log.info("response %s: client left mid-stream", job.response_id)
                    if self.loop_config.on_disconnect is DisconnectPolicy.CANCEL:
                        loop_scope.cancel()
                    return

        async def run() -> None:
            try:
                with loop_scope:
                    await self._execute(job, sink)
            finally:
                out.close()

        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            nursery.start_soon(run)
            async with events:
                async for event in events:
                    if gone:
                        continue  # keep draining: the loop goes on and is stored
                    try:
                        await send(
                            {"type": "http.response.body", "body": event.sse(), "more_body": True}
                        )
                    except Exception:  # the server refuses sends to a departed client
                        gone = True
            nursery.cancel_scope.cancel()
        if not gone:
            await send({"type": "http.response.body", "body": DONE_LINE, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        return 200

    # -- background ------------------------------------------------------------------------------

    async def _start_background(self, job: _Job, receive: Receive, send: Send) -> int:
        resume = {
            "alias": job.ctx.model,
            "request": job.body,
            "tools": sorted(job.tools.offered),
            "headers": resume_headers(job.tools.headers),
        }
        leased = await self.durability.acquire(job.response_id, resume)
        self._start(job, leased)
        if job.request.stream:
            return await self._follow(job.response_id, -1, receive, send)
        await send_json(send, 200, {**job.base, "status": "queued"})
        return 200

    def _start(self, job: _Job, leased: bool) -> None:
        store, _ = self._stores()
        handover = leased and self.durability.spec.on_shutdown == "handover"
        live = _Live(job.response_id, store, leased=leased, handover=handover)
        self._live[job.response_id] = live
        self.gateway.nursery.start_soon(self._background, job, live)

    async def resume(self, claim: Claim, max_attempts: int) -> None:
        """Run a claimed background response again from its stored steps (its lease is ours),
        or fail it once it was interrupted more than ``max_attempts`` times."""
        store, steps = self._stores()
        durable = self.durable_store
        assert durable is not None
        record = await store.get(claim.response_id)
        if record is None or record.status in TERMINAL_STATUSES or claim.response_id in self._live:
            if claim.response_id not in self._live:
                await durable.drop_lease(claim.response_id)
            return
        info = claim.resume if isinstance(claim.resume, Mapping) else {}
        logged = await store.events_after(claim.response_id, -1)
        first_sequence = logged[-1].sequence + 1 if logged else 0
        if claim.attempts > max_attempts:
            message = (
                f"The response was interrupted {claim.attempts} times (the gateway running it "
                "stopped) and is not resumed again."
            )
            await self._give_up(record, first_sequence, message)
            await durable.drop_lease(claim.response_id)
            return
        alias = str(info.get("alias") or record.response.get("model") or "")
        req = attrs.evolve(parse_request(info.get("request")), model=alias)
        mcp, echo = await McpPlan.for_request(req.tools, self.gateway.config.mcp, self.mcp_cache)
        req = attrs.evolve(req, tools=echo)
        ctx = RequestContext(model=alias)
        names = set(info.get("tools") or ())
        offered = [t for t in await self.executor.tools(ctx) if t.name in names]
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in info.get("headers", [])]
        key = api_key_for(record.owner, config_secrets(self.gateway.config))
        if key is not None:
            headers.append((b"authorization", b"Bearer " + key.encode()))
        base = {**record.response, "status": "in_progress"}
        job = _Job(
            response_id=record.id,
            request=req,
            base=base,
            chat={},
            ctx=ctx,
            tools=_RequestTools(self, offered + mcp.runnable(), headers, steps, mcp),
            transport=ProxyModelTransport(
                self.gateway.proxy, headers, request_id=record.id, route="/v1/responses"
            ),
            steps=steps,
            stored=True,
            mcp=mcp,
            mcp_sessions=bool(mcp) or self.executor.has_mcp(ctx),
            body=info.get("request"),
            first_sequence=first_sequence,
        )
        log.info(
            "response %s: resuming it (attempt %d, events from %d)",
            record.id,
            claim.attempts,
            first_sequence,
        )
        self._start(job, leased=True)

    async def fail_unresumable(self, claim: Claim, reason: str) -> None:
        """A claimed response that cannot be resumed (its stored state is unusable) is failed
        rather than released, so no process tries it again and again."""
        store, _ = self._stores()
        record = await store.get(claim.response_id)
        if record is not None and record.status not in TERMINAL_STATUSES:
            logged = await store.events_after(claim.response_id, -1)
            sequence = logged[-1].sequence + 1 if logged else 0
            await self._give_up(record, sequence, f"The response could not be resumed ({reason}).")
        if self.durable_store is not None:
            await self.durable_store.drop_lease(claim.response_id)

    async def _give_up(self, record: StoredResponse, sequence: int, message: str) -> None:
        """Store a response that keeps losing its process as ``failed`` (with a terminal event
        for its followers), so it cannot crash-loop the fleet."""
        store, steps = self._stores()
        error = {"code": "recovery_failed", "message": message}
        final = {**record.response, "status": "failed", "error": error}
        log.error("response %s: %s", record.id, error["message"])
        if await store.update(record.id, final):
            event = LoopEvent(sequence, LoopEventKind.FAILED, {"response": final})
            await store.append_events(record.id, [_stored_event(event)])
            await steps.finish_response(record.id, ResponseStatus.FAILED, final)

    async def _background(self, job: _Job, live: _Live) -> None:
        tel = current_telemetry()
        if tel is not None:
            # This task outlives the request that started it (and inherited its context):
            # its spans go to a trace of their own, linked to that request.
            tel.detach()
        store, _ = self._stores()
        try:
            with live.scope:
                try:
                    started = await store.update(
                        job.response_id, {**job.base, "status": "in_progress"}
                    )
                except Exception:  # never into the service nursery: that would stop the gateway
                    log.exception("response %s: could not mark it in_progress", job.response_id)
                else:
                    if not started:
                        # Cancelled or deleted while queued, through another replica (a local
                        # cancel has cancelled the scope already): end as a cancelled loop.
                        live.scope.cancel()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(live.flush_while_running)
                    if isinstance(store, SharedResponseStore):
                        nursery.start_soon(_watch_remote_cancel, store, live)
                    await self._execute(job, _ResponseSink(job, live=live))
                    nursery.cancel_scope.cancel()
        except BaseException as exc:
            if _all_cancelled(exc):
                live.handed_over()  # decides: a stop from outside may hand the response over
            raise
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.persist_timeout):
                await self._settle(job, live)
            live.close()
            self._live.pop(job.response_id, None)
            live.finished.set()

    async def _settle(self, job: _Job, live: _Live) -> None:
        """A background loop has ended: store its events and its end, and settle its lease.
        A loop that lost its lease writes nothing (the new owner's stream continues from the
        stored events); one handed over stores its events and frees its lease at once."""
        store, _ = self._stores()
        durable = self.durable_store if live.leased else None
        try:
            if live.release == "lost":
                return
            await live.maybe_flush(force=True)
            if live.release == "handover":
                if durable is not None:
                    await durable.release_lease(job.response_id, self.durability.owner)
                log.info("response %s: handed over for another process", job.response_id)
                return
            # A loop cancelled before it started still gets its final state.
            record = await store.get(job.response_id)
            if record is not None and record.status not in TERMINAL_STATUSES:
                await store.update(job.response_id, {**job.base, "status": "cancelled"})
            if durable is not None:
                await durable.drop_lease(job.response_id)
        except Exception:
            log.exception("response %s: could not store its outcome", job.response_id)

    # -- stored responses ------------------------------------------------------------------------

    async def stored(self, scope: Scope, receive: Receive, send: Send) -> int | None:
        """Serve ``/v1/responses/{id}[/input_items|/cancel]``; ``None`` if the id is not ours
        and the client named a model (``model-override``), so the proxy can pass it on."""
        match = _STORED_ROUTE.fullmatch(scope["path"])
        if match is None:
            return None
        response_id, sub = match.group(1), match.group(2)
        method: str = scope["method"]
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        try:
            record = await self._authorised_record(response_id, headers)
            if record is None:
                if any(k == b"model-override" for k, _ in headers):
                    return None
                raise _not_found(response_id)
            query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if sub == "/cancel":
                if method != "POST":
                    raise _method_not_allowed(b"POST")
                await send_json(send, 200, await self._cancel(record))
                return 200
            if sub == "/input_items":
                if method != "GET":
                    raise _method_not_allowed(b"GET")
                await send_json(send, 200, _input_items_page(record, query))
                return 200
            if method == "DELETE":
                await self._delete(record)
                await send_json(send, 200, {"id": record.id, "object": "response", "deleted": True})
                return 200
            if method not in ("GET", "HEAD"):
                raise _method_not_allowed(b"GET, DELETE")
            if _flag(query.get("stream")):
                after = _starting_after(query, headers)
                if not record.background:
                    raise errors.invalid_request(
                        "Only background responses can be streamed after they were created.",
                        "stream",
                    )
                return await self._follow(record.id, after, receive, send)
            await send_json(send, 200, record.response)
            return 200
        except HTTPError as exc:
            await send_error(send, exc)
            return exc.status

    async def _authorised_record(
        self, response_id: str, headers: list[tuple[bytes, bytes]]
    ) -> StoredResponse | None:
        table = self.gateway.targets.table
        token = bearer_token(headers)
        if table.protected and (token is None or token not in table.all_keys):
            raise errors.unauthenticated(invalid=token is not None)
        store, _ = self._stores()
        record = await store.get(response_id)
        if record is None:
            return None
        if record.owner is not None and record.owner != _owner_of(token, self.gateway):
            return None  # another key's response: indistinguishable from a missing one
        return record

    async def _cancel(self, record: StoredResponse) -> dict[str, Any]:
        if not record.background:
            raise errors.invalid_request(
                "Only responses created with background=true can be cancelled.", "response_id"
            )
        store, _ = self._stores()
        live = self._live.get(record.id)
        if live is not None:
            live.scope.cancel()
            with trio.move_on_after(self.persist_timeout * 2):
                await live.finished.wait()
        elif record.status not in TERMINAL_STATUSES:
            # Not running here (another process, or a process that died): settle it.
            await store.update(record.id, {**record.response, "status": "cancelled"})
        current = await store.get(record.id)
        return current.response if current is not None else record.response

    async def _delete(self, record: StoredResponse) -> None:
        live = self._live.get(record.id)
        if live is not None:
            live.scope.cancel()
            with trio.move_on_after(self.persist_timeout * 2):
                await live.finished.wait()
        store, _ = self._stores()
        await store.delete(record.id)

    async def _follow(self, response_id: str, after: int, receive: Receive, send: Send) -> int:
        """Stream a background response's events after ``after``, then follow it live."""
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        ended = False

        async def deliver(event: StoredEvent) -> None:
            nonlocal ended
            await send({"type": "http.response.body", "body": _sse(event), "more_body": True})
            ended = event.type in _TERMINAL_TYPES

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, receive, nursery.cancel_scope)
            live = self._live.get(response_id)
            if live is not None:
                await _follow_live(live, after, deliver)
            else:
                await self._follow_store(response_id, after, deliver)
            nursery.cancel_scope.cancel()
        with contextlib.suppress(Exception):  # a departed client is owed nothing more
            if ended:
                await send({"type": "http.response.body", "body": DONE_LINE, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        return 200

    async def _follow_store(self, response_id: str, after: int, deliver: _Deliver) -> None:
        store, _ = self._stores()
        idle = 0.0
        while True:
            events = await store.events_after(response_id, after)
            for event in events:
                await deliver(event)
                after = event.sequence
            if events:
                idle = 0.0
                if events[-1].type in _TERMINAL_TYPES:
                    return
            record = await store.get(response_id)
            if record is None or record.status in TERMINAL_STATUSES:
                if record is not None and not events:
                    # Terminal with nothing new: drain once more (events land after status).
                    rest = await store.events_after(response_id, after)
                    for event in rest:
                        await deliver(event)
                return
            live = self._live.get(response_id)
            if live is not None:  # it started here meanwhile
                await _follow_live(live, after, deliver)
                return
            if idle >= _POLL_IDLE_LIMIT:
                return
            await trio.sleep(_POLL_INTERVAL)
            idle += _POLL_INTERVAL

    # -- sub-agents ------------------------------------------------------------------------------

    async def run_agent(
        self,
        agent: AgentSpec,
        args: Any,
        ctx: RequestContext,
        headers: Sequence[tuple[bytes, bytes]],
        steps: MultiStepStore,
    ) -> Any:
        """Run a ``kind: agent`` tool: a loop of its own on ``agent.model`` → its final text.
        Its steps go to ``steps``, the calling response's step store."""
        depth = ctx.extension(_AgentDepth)
        level = depth.depth + 1 if depth is not None else 1
        if level > self.loop_config.max_response_step_depth:
            raise ToolError.execution(
                f"sub-agent {agent.name!r} would exceed max_response_step_depth"
            )
        sub_ctx = RequestContext(model=agent.model).with_extension(_AgentDepth(level))
        sessions = ctx.extension(McpSessions)
        if sessions is not None:  # the sub-agent's MCP calls use the response's sessions
            sub_ctx = sub_ctx.with_extension(sessions)
        offered = list(await self.executor.tools(sub_ctx))
        text = (
            args["input"]
            if isinstance(args, Mapping) and isinstance(args.get("input"), str)
            else orjson.dumps(args).decode()
        )
        messages: list[dict[str, Any]] = []
        if agent.instructions:
            messages.append({"role": "system", "content": agent.instructions})
        messages.append({"role": "user", "content": text})
        chat: dict[str, Any] = {"model": agent.model, "messages": messages}
        if offered:
            chat["tools"] = [tool_schema_to_chat(t) for t in offered]
        sub_id = f"agent_{secrets.token_hex(16)}"
        await steps.begin_response(sub_id, chat)
        transport = ProxyModelTransport(self.gateway.proxy, headers)
        try:
            payload = await run_response_loop(
                steps,
                _RequestTools(self, offered, headers, steps),
                sub_ctx,
                transport,
                request_id=sub_id,
                config=self.loop_config,
                depth=level,  # its span's onwards.depth; its own agent tools go one deeper
            )
        except LoopError as exc:
            raise ToolError.execution(f"sub-agent {agent.name!r} failed: {exc}") from None
        return _final_text(payload)


_TERMINAL_TYPES = frozenset(
    {
        LoopEventKind.COMPLETED.value,
        LoopEventKind.FAILED.value,
        LoopEventKind.INCOMPLETE.value,
    }
)


def _all_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_all_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def _final_text(payload: Any) -> Any:
    """The last assistant text of a completed loop's output (or the payload as is)."""
    if not isinstance(payload, Mapping):
        return payload
    output = payload.get("output")
    if not isinstance(output, list):
        return payload
    for item in reversed(output):
        if isinstance(item, Mapping) and item.get("type") == "message":
            parts = item.get("content") or []
            return "".join(
                p.get("text", "") for p in parts if isinstance(p, Mapping) and "text" in p
            )
    return ""


async def _watch_remote_cancel(store: SharedResponseStore, live: _Live) -> None:
    """Cancel ``live``'s loop once its stored status is ``cancelled`` or the response is gone:
    a cancel or a ``DELETE`` made through another replica of a shared store. The loop then ends
    as on a local cancel (open steps ``canceled`` in its shielded clean-up).

    One status read every ``_REMOTE_CANCEL_INTERVAL``. A read that fails or takes longer than
    ``_REMOTE_CANCEL_READ_TIMEOUT`` is logged (once per run of failures) and tried again at
    the next interval; it never stops the response. Runs in the response's own nursery, so it
    ends with the loop."""
    failing = False
    while True:
        await trio.sleep(_REMOTE_CANCEL_INTERVAL)
        status: str | None = "in_progress"
        problem: str | None = None
        with trio.move_on_after(_REMOTE_CANCEL_READ_TIMEOUT) as read:
            try:
                status = await store.status(live.response_id)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
        if read.cancelled_caught:
            problem = f"no answer within {_REMOTE_CANCEL_READ_TIMEOUT} s"
        if problem is not None:
            if not failing:
                log.warning(
                    "response %s: could not check for a cancel from another replica (%s)",
                    live.response_id,
                    problem,
                )
            failing = True
            continue
        failing = False
        # Only a cancel or a DELETE comes from elsewhere: this process writes the other
        # terminal statuses itself, once its loop has ended.
        if (status is None or status == "cancelled") and not live.scope.cancel_called:
            log.info(
                "response %s: %s through another replica; stopping its loop",
                live.response_id,
                "deleted" if status is None else "cancelled",
            )
            live.scope.cancel()
            return


async def _follow_live(live: _Live, after: int, deliver: _Deliver) -> None:
    index = bisect.bisect_right([e.sequence for e in live.events], after)
    while True:
        while index < len(live.events):
            event = live.events[index]
            index += 1
            if event.sequence > after:  # a cursor ahead of the loop skips events still to come
                await deliver(event)
        if live.done:
            return
        await live.wait_beyond(index)


def _method_not_allowed(allow: bytes) -> HTTPError:
    return HTTPError(
        405,
        error_body("Method not allowed.", "invalid_request_error", "method_not_allowed"),
        [(b"allow", allow)],
    )


def _flag(values: list[str] | None) -> bool:
    return bool(values) and values is not None and values[-1].lower() in ("true", "1")


def _starting_after(query: Mapping[str, list[str]], headers: list[tuple[bytes, bytes]]) -> int:
    raw: str | None = None
    if query.get("starting_after"):
        raw = query["starting_after"][-1]
        param = "starting_after"
    else:
        for k, v in headers:
            if k == b"last-event-id":
                raw = v.decode("latin-1").strip()
        param = "Last-Event-ID"
    if raw is None or raw == "":
        return -1
    try:
        return int(raw)
    except ValueError:
        raise errors.invalid_request(f"'{param}' must be an integer.", param) from None


def _long(items: Any) -> bool:
    return isinstance(items, list) and len(items) > OFF_LOOP_ITEMS


async def _off_loop(off: bool, work: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(work) if off else work()


def _resolve_items(req: ResponsesRequest, history: list[dict[str, Any]]) -> ResponsesRequest:
    """``req`` with its item references resolved against ``history``; its call ids checked."""
    if any(i.get("type") == "item_reference" for i in req.input_items):
        req = attrs.evolve(req, input_items=resolve_references(req.input_items, history))
    check_call_ids(req.input_items, history)
    return req


def _input_items_page(record: StoredResponse, query: Mapping[str, list[str]]) -> dict[str, Any]:
    """``GET …/input_items``: OpenAI's cursor list (``order`` desc by default, ``after``,
    ``limit`` 1 to 100, default 20)."""
    order = (query.get("order") or ["desc"])[-1]
    if order not in ("asc", "desc"):
        raise errors.invalid_request("'order' must be 'asc' or 'desc'.", "order")
    try:
        limit = int((query.get("limit") or ["20"])[-1])
    except ValueError:
        raise errors.invalid_request("'limit' must be an integer.", "limit") from None
    if not 1 <= limit <= 100:
        raise errors.invalid_request("'limit' must be between 1 and 100.", "limit")
    items = list(record.input_items)
    if order == "desc":
        items.reverse()
    after = (query.get("after") or [""])[-1]
    if after:
        ids = [i.get("id") for i in items]
        if after in ids:
            items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0].get("id") if page else None,
        "last_id": page[-1].get("id") if page else None,
        "has_more": len(items) > limit,
    }
