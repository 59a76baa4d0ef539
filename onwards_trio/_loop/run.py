"""The multi-step response loop: drive one response to a terminal state through a store.

Shape (reference §2.2, with the §5.1 gaps fixed):

* per iteration the store's transition function says what to do next (``next_action_for``);
  ``AppendSteps`` records its steps one after the other (``prev_step_id`` chaining) and runs
  them concurrently in a nursery: a failing sibling is persisted with ``fail_step`` and does not
  cancel the others; a *store* failure ends the loop with ``LoopError(STORE)``;
* model steps go through a :class:`~onwards_trio._loop.model.ModelTransport`, streamed or not; a
  streamed chat completion is reassembled into one payload for the step;
* tool steps go to the :class:`~onwards_trio._loop.tools.ToolExecutor`; ``AGENT`` tools run a
  sub-loop scoped under their step (``scope_parent``), capped by ``max_response_step_depth``.

Events: only the top-level loop with a sink emits; sub-loops are invisible to the consumer
(their result shows up as the agent step's ``function_call_output``), so a client never sees
items of a conversation it is not part of. The top level emits ``response.created`` and
``response.in_progress``, every model output item (added, deltas, done), a
``function_call_output`` item per tool step (added when it starts, done when it ends), and
exactly one terminal event.

Cancellation: every step the loop records is tracked until it is terminal in the store. When
the loop ends by cancellation (or any other escape) the steps still open are moved to
``canceled`` and the response's final state is written inside ``CancelScope(shield=True)``
bounded by ``move_on_after(config.persist_timeout)``, so clean-up finishes but cannot hang.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio

from onwards_trio._errors import OnwardsError
from onwards_trio._loop.events import ChannelSink, EventSink, LoopEvent, LoopEventKind
from onwards_trio._loop.items import (
    ChatChunkAssembler,
    ChatStreamTranslator,
    Event,
    OutputIndexer,
    completion_items,
    function_call_output_item,
)
from onwards_trio._loop.model import ModelResponse, ModelTransport
from onwards_trio._loop.steps import (
    AppendSteps,
    ChainStep,
    Complete,
    Fail,
    MultiStepStore,
    RecordedStep,
    ResponseStatus,
    StepDescriptor,
    StepKind,
    StepState,
    StoreError,
)
from onwards_trio._loop.tools import RequestContext, ToolError, ToolExecutor, ToolKind, ToolSchema
from onwards_trio._loop.transition import capped_result
from onwards_trio._ops.telemetry import current_telemetry
from onwards_trio._proxy.usage import Usage, usage_from_object
from onwards_trio._transport.sse import SSEDecoder, SSEEventTooLarge

__all__ = [
    "DisconnectPolicy",
    "LoopConfig",
    "LoopError",
    "LoopErrorKind",
    "open_response_stream",
    "run_response_loop",
]

log = logging.getLogger("onwards_trio.loop")


class DisconnectPolicy(enum.StrEnum):
    """What happens to a loop whose consumer went away."""

    CONTINUE = "continue"  # onwards' behaviour: the work finishes and is persisted
    CANCEL = "cancel"  # cancel upstream work; open steps end ``canceled``


@attrs.frozen
class LoopConfig:
    max_response_step_depth: int = 8
    max_response_iterations: int = 10
    persist_timeout: float = 5.0
    on_disconnect: DisconnectPolicy = DisconnectPolicy.CONTINUE
    model_call_timeout: float | None = None
    tool_timeout: float | None = None
    max_model_body: int = 64 * 1024 * 1024


class LoopErrorKind(enum.StrEnum):
    FAILED = "failed"
    MAX_ITERATIONS_EXCEEDED = "max_iterations_exceeded"
    MAX_DEPTH_EXCEEDED = "max_depth_exceeded"
    EMPTY_ACTION = "empty_action"
    STORE = "store_error"
    EXECUTOR = "executor_error"


_MESSAGES = {
    LoopErrorKind.MAX_ITERATIONS_EXCEEDED: ("response loop exceeded max_response_iterations cap"),
    LoopErrorKind.MAX_DEPTH_EXCEEDED: (
        "response loop sub-agent recursion exceeded max_response_step_depth cap"
    ),
    LoopErrorKind.EMPTY_ACTION: "transition function returned AppendSteps with no descriptors",
}


class LoopError(OnwardsError):
    """Why a loop did not complete. ``payload`` is the transition's ``Fail`` payload
    (``FAILED``); ``detail`` the underlying message (store and executor errors)."""

    def __init__(self, kind: LoopErrorKind, detail: str = "", payload: Any = None) -> None:
        self.kind = kind
        self.detail = detail
        self.payload = payload
        if kind is LoopErrorKind.FAILED:
            text = "response loop failed: " + orjson.dumps(payload).decode()
        elif kind is LoopErrorKind.STORE:
            text = f"response loop storage error: {detail}"
        elif kind is LoopErrorKind.EXECUTOR:
            text = f"response loop executor error: {detail}"
        else:
            text = _MESSAGES[kind]
        super().__init__(text)

    def error_payload(self) -> Any:
        """What ``fail_step`` stores when this error ends a sub-loop step."""
        if self.kind is LoopErrorKind.FAILED:
            return self.payload
        return {"type": self.kind.value, "message": str(self)}

    def error_object(self) -> dict[str, Any]:
        """The Open Responses ``error`` object (``code``, ``message``). A code outside the set
        the official SDKs declare becomes ``server_error``, the specific one leading the
        message (clients switch on ``code``; a code they do not know breaks them)."""
        p = self.payload
        if self.kind is LoopErrorKind.FAILED and isinstance(p, Mapping):
            code = str(p.get("code") or p.get("type") or "failed")
            message = p.get("message")
            text = message if isinstance(message, str) else orjson.dumps(p).decode()
        else:
            code, text = self.kind.value, str(self)
        if code in RESPONSE_ERROR_CODES:
            return {"code": code, "message": text}
        return {"code": "server_error", "message": f"{code}: {text}"}


# The ``error.code`` values of a Response the official SDKs declare and the loop can produce.
RESPONSE_ERROR_CODES = frozenset({"server_error", "rate_limit_exceeded", "invalid_prompt"})


_TERMINAL_EVENT = {
    "completed": LoopEventKind.COMPLETED,
    "incomplete": LoopEventKind.INCOMPLETE,
    "failed": LoopEventKind.FAILED,
}


class _StepFailed(Exception):
    """A step failed; ``payload`` goes to ``fail_step`` and the loop goes on."""

    def __init__(self, payload: dict[str, Any], tool_output: str) -> None:
        super().__init__(payload.get("message", ""))
        self.payload = payload
        self.tool_output = tool_output


def _executor_failure(message: str, tool_output: str | None = None) -> _StepFailed:
    return _StepFailed(
        {"type": "executor_error", "message": f"executor error: {message}"},
        tool_output if tool_output is not None else message,
    )


def _tool_failure(err: ToolError) -> _StepFailed:
    if err.kind.value == "not_found":
        message = f"executor target not found: {err.message}"
    else:
        message = f"executor error: {err}"
    return _StepFailed(
        {"type": "executor_error", "code": err.kind.value, "message": message, "detail": str(err)},
        str(err),
    )


async def _aclose(body: object) -> None:
    """Finalise an async-generator body we stopped reading early (at ``[DONE]``), so it does
    not linger until garbage collection."""
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


def _all_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_all_cancelled(e) for e in exc.exceptions)
    return False


class _Emitter:
    """Numbers events (strictly +1 per event, per response) and delivers them in that order,
    even when fan-out siblings emit concurrently."""

    def __init__(self, sink: EventSink, first_sequence: int) -> None:
        self.sink = sink
        self.sequence = first_sequence
        self.lock = trio.Lock()
        self.indexer = OutputIndexer()
        self.terminal_sent = False
        # A quiet sink (``quiet = True``: a non-streamed answer nobody follows) is only given
        # the finished output items and the terminal event; the others are numbered but not
        # built, and a whole completion's items are made directly rather than replayed as the
        # deltas a stream would have carried.
        self.quiet = getattr(sink, "quiet", False) is True

    async def _acquire(self) -> None:
        # Uncontended (the common case) costs no extra schedule point: the sink's send is one.
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            await self.lock.acquire()

    async def _send(self, kind: LoopEventKind, data: Mapping[str, Any]) -> None:
        if self.terminal_sent:
            return
        if self.quiet and not (kind is LoopEventKind.OUTPUT_ITEM_DONE or kind.is_terminal):
            self.sequence += 1
            return
        # A send cancelled part-way delivered nothing, so its number is not used up: the
        # sequence only moves once the sink has taken the event (no gaps, no repeats).
        await self.sink.emit(LoopEvent(self.sequence, kind, data))
        self.sequence += 1
        if kind.is_terminal:
            self.terminal_sent = True

    async def emit(self, kind: LoopEventKind, data: Mapping[str, Any]) -> None:
        if self.quiet and not (kind is LoopEventKind.OUTPUT_ITEM_DONE or kind.is_terminal):
            if not self.terminal_sent:
                self.sequence += 1  # numbered, not built (nothing awaited: no lock needed)
            return
        await self._acquire()
        try:
            await self._send(kind, data)
        finally:
            self.lock.release()

    async def emit_all(self, events: list[Event]) -> None:
        """Emit a batch back to back (one chunk's events stay together)."""
        if not events:
            return
        await self._acquire()
        try:
            for name, data in events:
                await self._send(LoopEventKind(name), data)
        finally:
            self.lock.release()


async def run_response_loop(
    store: MultiStepStore,
    executor: ToolExecutor,
    ctx: RequestContext,
    model: ModelTransport,
    *,
    request_id: str,
    sink: EventSink | None = None,
    scope_parent: str | None = None,
    config: LoopConfig | None = None,
    depth: int = 0,
    response: Mapping[str, Any] | None = None,
    first_sequence: int = 0,
    handed_over: Callable[[], bool] | None = None,
    queued: bool = False,
) -> Any:
    """Drive ``request_id`` (in scope ``scope_parent``) to a terminal state; return the
    transition's ``Complete`` payload or raise :class:`LoopError`.

    ``response`` holds extra fields for the response snapshots in ``response.created`` /
    ``response.completed`` (model, instructions, tools echo, ...); ``first_sequence`` lets a
    resumed loop continue an event sequence (a resumed stream gets no second
    ``response.created``); ``queued`` (a background response) starts the events with
    ``response.created``/``response.queued`` in status ``queued``. Top-level loops (no
    ``scope_parent``) write the response's final state with ``store.finish_response``; when the
    iteration cap stops a top-level loop, the response ends ``incomplete`` with its output so
    far. ``depth`` is how deeply the loop is nested in agents (capped by
    ``max_response_step_depth``, its span's ``onwards.depth``): a config agent's loop is
    top-level in its own response, at its caller's depth plus one.

    Resuming (the chain already has steps): steps left open by a run that ended without closing
    them are settled first — see :meth:`_Run._resume`. ``handed_over``: when the loop is
    cancelled and it returns True, the loop writes nothing more (open steps stay open, the
    response unfinished), so another process can resume it.
    """
    cfg = config if config is not None else LoopConfig()
    if depth > cfg.max_response_step_depth:
        raise LoopError(LoopErrorKind.MAX_DEPTH_EXCEEDED)
    top = scope_parent is None
    emitter = _Emitter(sink, first_sequence) if top and sink is not None else None
    run = _Run(store, executor, ctx, model, request_id, scope_parent, cfg, depth, emitter)
    run.handed_over = handed_over
    return await run.run(response, queued)


class _Run:
    def __init__(
        self,
        store: MultiStepStore,
        executor: ToolExecutor,
        ctx: RequestContext,
        model: ModelTransport,
        request_id: str,
        scope_parent: str | None,
        config: LoopConfig,
        depth: int,
        emitter: _Emitter | None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.ctx = ctx
        self.model = model
        self.request_id = request_id
        self.scope_parent = scope_parent
        self.config = config
        self.depth = depth
        self.emitter = emitter
        self.top = scope_parent is None
        self.telemetry = current_telemetry()  # None: no spans, nothing to pay
        self.usage: Usage | None = None  # this run's model calls (spans only)
        self.tools: dict[str, ToolSchema] = {}
        self.open_steps: dict[str, None] = {}  # recorded, not yet terminal in the store
        self.tool_slots: dict[str, tuple[int, str]] = {}  # step id -> (output_index, call_id)
        self.created_at = 0
        self.handed_over: Callable[[], bool] | None = None
        self.processing: set[str] = set()  # found processing on resume, to be re-run

    # -- plumbing -------------------------------------------------------------------------------

    async def _s(self, call: Any) -> Any:
        """Await a store call; any failure of the store is a ``LoopError(STORE)``."""
        try:
            return await call
        except StoreError as e:
            raise LoopError(LoopErrorKind.STORE, str(e)) from e
        except Exception as e:
            raise LoopError(LoopErrorKind.STORE, f"{type(e).__name__}: {e}") from e

    async def _emit(self, kind: LoopEventKind, data: Mapping[str, Any]) -> None:
        if self.emitter is not None:
            await self.emitter.emit(kind, data)

    def _snapshot(self, base: Mapping[str, Any], status: str) -> dict[str, Any]:
        rid = self.request_id
        snap: dict[str, Any] = {
            "id": rid if rid.startswith("resp_") else f"resp_{rid}",
            "object": "response",
            "created_at": self.created_at,
            # The fields a Response object must have (the openai SDK refuses it otherwise);
            # the HTTP layer passes the real echo in ``response``.
            "model": self.ctx.model or "",
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "output": [],
            "usage": None,
            "error": None,
            "incomplete_details": None,
        }
        snap.update(base)
        snap["status"] = status
        return snap

    # -- the loop -------------------------------------------------------------------------------

    async def run(self, response: Mapping[str, Any] | None, queued: bool = False) -> Any:
        """:meth:`_run`, in a span of its own when tracing is on."""
        tel = self.telemetry
        if tel is None:
            return await self._run(response, queued)
        span = tel.start_response(self.request_id, self.ctx.model, self.depth)
        status, error = "failed", None
        try:
            payload = await self._run(response, queued)
            given = payload.get("status") if isinstance(payload, Mapping) else None
            status = given if isinstance(given, str) else "completed"
            return payload
        except LoopError as e:
            error = e.kind.value
            raise
        except BaseException as e:
            status = "cancelled" if _all_cancelled(e) else "failed"
            error = status if status == "cancelled" else type(e).__name__
            raise
        finally:
            tel.end_response(span, status, self.usage, error)

    async def _run(self, response: Mapping[str, Any] | None, queued: bool) -> Any:
        base = dict(response or {})
        self.created_at = int(time.time())
        try:
            try:
                schemas = await self.executor.tools(self.ctx)
            except Exception as e:
                raise LoopError(LoopErrorKind.EXECUTOR, f"tools() failed: {e}") from e
            self.tools = {t.name: t for t in schemas}
            chain = await self._s(self.store.list_chain(self.request_id, self.scope_parent))
            prev = chain[-1].id if chain else None
            if self.emitter is not None and self.emitter.sequence == 0:
                quiet = self.emitter.quiet  # these two are not built for a quiet sink
                start: dict[str, Any] = (
                    {} if quiet else {"response": self._snapshot(base, "in_progress")}
                )
                if queued:
                    waiting: dict[str, Any] = (
                        {} if quiet else {"response": self._snapshot(base, "queued")}
                    )
                    await self._emit(LoopEventKind.CREATED, waiting)
                    await self._emit(LoopEventKind.QUEUED, waiting)
                else:
                    await self._emit(LoopEventKind.CREATED, start)
                await self._emit(LoopEventKind.IN_PROGRESS, start)
            rerun = await self._resume(chain)
            if rerun:
                await self._run_steps(rerun)
            payload = await self._iterate(prev)
            if self.top:
                snap = self._snapshot(base, "completed")
                if isinstance(payload, Mapping):
                    snap.update(payload)
                status = str(snap.get("status"))
                if status not in _TERMINAL_EVENT:
                    status = snap["status"] = "completed"
                await self._s(
                    self.store.finish_response(self.request_id, ResponseStatus(status), snap)
                )
        except LoopError as e:
            snap = self._snapshot(base, "failed")
            snap["error"] = e.error_object()
            await self._clean_up(False, (ResponseStatus.FAILED, snap))
            if self.top:
                await self._emit(LoopEventKind.FAILED, {"response": snap})
            raise
        except BaseException as e:
            if _all_cancelled(e) and self.handed_over is not None and self.handed_over():
                raise  # another process resumes it from the store as it is
            if _all_cancelled(e):
                await self._clean_up(True, (ResponseStatus.CANCELLED, None))
            else:
                snap = self._snapshot(base, "failed")
                snap["error"] = {"code": "server_error", "message": "the response loop crashed"}
                await self._clean_up(False, (ResponseStatus.FAILED, snap))
            raise
        if self.top:
            await self._emit(_TERMINAL_EVENT[status], {"response": snap})
        return payload

    async def _clean_up(self, cancelled: bool, final: tuple[ResponseStatus, Any]) -> None:
        """Shielded, bounded: every open step ends ``canceled``, and a top-level response gets
        its ``final`` (status, snapshot) written, even when a cancellation is pending. Store
        failures here are logged, not raised: the loop is already ending with its own error."""
        if not self.open_steps and not self.top:
            return
        reason = {"type": "canceled" if cancelled else "aborted"}
        with trio.CancelScope(shield=True), trio.move_on_after(self.config.persist_timeout):
            for step_id in list(self.open_steps):
                try:
                    await self.store.cancel_step(step_id, reason)
                except Exception:
                    log.warning("could not cancel step %s", step_id, exc_info=True)
                self.open_steps.pop(step_id, None)
            if self.top:
                try:
                    await self.store.finish_response(self.request_id, *final)
                except Exception:
                    log.warning("could not finish response %s", self.request_id, exc_info=True)

    async def _resume(
        self, chain: Sequence[ChainStep]
    ) -> list[tuple[RecordedStep, StepDescriptor]]:
        """Settle the steps a previous run left open (it died, or handed the response over);
        return those to run again, in chain order.

        Completed steps never run again. A ``pending`` step never started, so it runs now. A
        ``processing`` step may or may not have had its effect: a model call is asked again
        (it only costs tokens), as is a tool whose schema is ``idempotent``; any other tool
        call is recorded failed with an ``interrupted`` error, which the transition hands to
        the model as the tool's output. On a resumed stream, output indexes continue where
        the stored chain's output items end.
        """
        if self.emitter is not None and chain:
            index = 0
            for step in chain:
                if step.kind is StepKind.TOOL_CALL:
                    rec = RecordedStep(step.id, step.sequence)
                    self.tool_slots[step.id] = (index, self._call_id(rec, step.request_payload))
                    index += 1
                elif step.state is StepState.COMPLETED:
                    index += len(completion_items(step.response_payload, step.id))
            self.emitter.indexer.next_index = index
        rerun: list[tuple[RecordedStep, StepDescriptor]] = []
        for step in chain:
            if step.state.is_terminal:
                self.tool_slots.pop(step.id, None)
                continue
            desc = StepDescriptor(step.kind, step.request_payload)
            rec = RecordedStep(step.id, step.sequence)
            payload = step.request_payload
            name = payload.get("name") if isinstance(payload, Mapping) else None
            schema = self.tools.get(name) if isinstance(name, str) else None
            if (
                step.state is StepState.PENDING
                or step.kind is StepKind.MODEL_CALL
                or (schema is not None and schema.idempotent)
            ):
                self.open_steps[step.id] = None
                if step.state is StepState.PROCESSING:
                    self.processing.add(step.id)
                rerun.append((rec, desc))
                continue
            message = (
                f"The call of tool {name!r} was interrupted (the process running it stopped) "
                "and was not retried because the tool is not declared idempotent; it may or "
                "may not have taken effect."
            )
            error = {"type": "interrupted", "code": "interrupted", "message": message}
            await self._s(self.store.fail_step(step.id, error))
            await self._tool_done(rec, f"Error: {message}", "incomplete")
        return rerun

    async def _iterate(self, prev: str | None) -> Any:
        iterations = 0
        while True:
            if iterations >= self.config.max_response_iterations:
                if self.top:
                    # Keep what was produced: the response ends incomplete, not failed.
                    chain = await self._s(self.store.list_chain(self.request_id, None))
                    return capped_result(chain)
                raise LoopError(LoopErrorKind.MAX_ITERATIONS_EXCEEDED)
            iterations += 1
            action = await self._s(
                self.store.next_action_for(self.request_id, self.scope_parent, self.tools)
            )
            if isinstance(action, Complete):
                return action.payload
            if isinstance(action, Fail):
                raise LoopError(LoopErrorKind.FAILED, payload=action.payload)
            if not isinstance(action, AppendSteps):
                raise LoopError(LoopErrorKind.STORE, f"unknown action {action!r}")
            if not action.steps:
                raise LoopError(LoopErrorKind.EMPTY_ACTION)
            prev = await self._append(action.steps, prev)

    async def _append(self, steps: tuple[StepDescriptor, ...], prev: str | None) -> str | None:
        records: list[tuple[RecordedStep, StepDescriptor]] = []
        for desc in steps:
            rec = await self._s(
                self.store.record_step(self.request_id, self.scope_parent, prev, desc)
            )
            self.open_steps[rec.id] = None
            records.append((rec, desc))
            prev = rec.id
        if self.emitter is not None:
            # Tool outputs are announced in sibling order, so output_index follows the chain.
            for rec, desc in records:
                if desc.kind is StepKind.TOOL_CALL:
                    await self._announce_tool(rec, desc)
        await self._run_steps(records)
        return prev

    async def _run_steps(self, records: list[tuple[RecordedStep, StepDescriptor]]) -> None:
        """Run recorded steps: one serially, several as a fan-out."""
        if len(records) == 1:
            await self._step(*records[0])
            return
        failure: list[LoopError] = []
        async with trio.open_nursery() as nursery:
            for rec, desc in records:
                nursery.start_soon(self._sibling, rec, desc, nursery.cancel_scope, failure)
        if failure:
            raise failure[0]

    async def _sibling(
        self,
        rec: RecordedStep,
        desc: StepDescriptor,
        scope: trio.CancelScope,
        failure: list[LoopError],
    ) -> None:
        try:
            await self._step(rec, desc)
        except LoopError as e:  # a store failure: end the fan-out, the loop reports it
            failure.append(e)
            scope.cancel()

    async def _step(self, rec: RecordedStep, desc: StepDescriptor) -> None:
        """:meth:`_run_step`, in a span of its own when tracing is on."""
        tel = self.telemetry
        if tel is None:
            await self._run_step(rec, desc)
            return
        span = tel.start_step(rec.id, desc.kind.value, desc.request_payload)
        outcome, result = "canceled", None
        try:
            outcome, result = await self._run_step(rec, desc)
        except LoopError:
            outcome = "failed"
            raise
        finally:
            usage = None
            if desc.kind is StepKind.MODEL_CALL and isinstance(result, Mapping):
                usage = usage_from_object(result.get("usage"))
                if usage is not None:
                    self.usage = usage if self.usage is None else self.usage + usage
            tel.end_step(span, desc.kind.value, outcome, result, usage)

    async def _run_step(self, rec: RecordedStep, desc: StepDescriptor) -> tuple[str, Any]:
        """Run one step to its terminal state; return that state and the step's result."""
        if rec.id in self.processing:
            self.processing.discard(rec.id)  # re-run after a resume: it is processing already
        else:
            await self._s(self.store.mark_step_processing(rec.id))
        try:
            if desc.kind is StepKind.MODEL_CALL:
                result = await self._model_step(rec, desc.request_payload)
            else:
                result = await self._tool_step(rec, desc.request_payload)
        except _StepFailed as f:
            await self._s(self.store.fail_step(rec.id, f.payload))
            self.open_steps.pop(rec.id, None)
            if desc.kind is StepKind.TOOL_CALL:
                await self._tool_done(rec, f.tool_output, "incomplete")
            return "failed", None
        await self._s(self.store.complete_step(rec.id, result))
        self.open_steps.pop(rec.id, None)
        if desc.kind is StepKind.TOOL_CALL:
            out = result if isinstance(result, str) else orjson.dumps(result).decode()
            await self._tool_done(rec, out, "completed")
        return "completed", result

    # -- tool steps -----------------------------------------------------------------------------

    def _call_id(self, rec: RecordedStep, payload: Any) -> str:
        given = payload.get("call_id") if isinstance(payload, Mapping) else None
        return given if isinstance(given, str) and given else f"call_{rec.id}"

    async def _announce_tool(self, rec: RecordedStep, desc: StepDescriptor) -> None:
        assert self.emitter is not None
        call_id = self._call_id(rec, desc.request_payload)
        index = self.emitter.indexer.next()
        self.tool_slots[rec.id] = (index, call_id)
        item = function_call_output_item(rec.id, call_id, "", "in_progress")
        await self._emit(LoopEventKind.OUTPUT_ITEM_ADDED, {"output_index": index, "item": item})

    async def _tool_done(self, rec: RecordedStep, output: str, status: str) -> None:
        slot = self.tool_slots.pop(rec.id, None)
        if slot is None:
            return
        index, call_id = slot
        item = function_call_output_item(rec.id, call_id, output, status)
        await self._emit(LoopEventKind.OUTPUT_ITEM_DONE, {"output_index": index, "item": item})

    async def _tool_step(self, rec: RecordedStep, payload: Any) -> Any:
        name = payload.get("name") if isinstance(payload, Mapping) else None
        if not isinstance(name, str) or not name:
            raise _executor_failure("tool_call request_payload missing 'name'")
        assert isinstance(payload, Mapping)
        if "args" in payload:
            args = payload["args"] if payload["args"] is not None else {}
        elif isinstance(payload.get("arguments"), str):
            try:
                args = orjson.loads(payload["arguments"] or "{}")
            except orjson.JSONDecodeError as e:
                raise _tool_failure(ToolError.invalid_arguments(str(e))) from None
        else:
            args = {}
        schema = self.tools.get(name)
        if schema is not None and schema.kind is ToolKind.AGENT:
            return await self._agent_step(rec)
        call_id = self._call_id(rec, payload)
        try:
            if self.config.tool_timeout is None:
                return await self.executor.execute(name, call_id, args, self.ctx)
            with trio.fail_after(self.config.tool_timeout):
                return await self.executor.execute(name, call_id, args, self.ctx)
        except ToolError as e:
            raise _tool_failure(e) from None
        except trio.TooSlowError:
            raise _tool_failure(
                ToolError.timeout(f"{name} took longer than {self.config.tool_timeout}s")
            ) from None
        except Exception as e:
            raise _tool_failure(ToolError.execution(f"{type(e).__name__}: {e}")) from None

    async def _agent_step(self, rec: RecordedStep) -> Any:
        if self.depth + 1 > self.config.max_response_step_depth:
            err = LoopError(LoopErrorKind.MAX_DEPTH_EXCEEDED)
            raise _StepFailed(err.error_payload(), str(err))
        sub = _Run(
            self.store,
            self.executor,
            self.ctx,
            self.model,
            self.request_id,
            rec.id,
            self.config,
            self.depth + 1,
            None,
        )
        sub.handed_over = self.handed_over
        try:
            return await sub.run(None)
        except LoopError as e:
            if e.kind is LoopErrorKind.STORE:
                raise
            text = str(e)
            if e.kind is LoopErrorKind.FAILED:
                text = e.error_object()["message"]
            raise _StepFailed(e.error_payload(), text) from None

    # -- model steps ----------------------------------------------------------------------------

    async def _model_step(self, rec: RecordedStep, request: Any) -> Any:
        stream = isinstance(request, Mapping) and request.get("stream") is True
        try:
            body = orjson.dumps(request)
        except TypeError as e:
            raise _executor_failure(f"model call payload not serialisable: {e}") from None
        try:
            if self.config.model_call_timeout is None:
                return await self._call_model(rec, body, stream)
            with trio.fail_after(self.config.model_call_timeout):
                return await self._call_model(rec, body, stream)
        except _StepFailed:
            raise
        except trio.TooSlowError:
            raise _executor_failure(
                f"model call timed out after {self.config.model_call_timeout}s"
            ) from None
        except Exception as e:
            raise _executor_failure(f"model call HTTP error: {type(e).__name__}: {e}") from None

    async def _call_model(self, rec: RecordedStep, body: bytes, stream: bool) -> Any:
        async with self.model.open(body, stream=stream) as resp:
            if not 200 <= resp.status < 300:
                text = (await self._read(resp, 4096, truncate=True)).decode("utf-8", "replace")
                raise _executor_failure(f"model call returned HTTP {resp.status}: {text}")
            ctype = next((v for k, v in resp.headers if k == b"content-type"), b"")
            if stream and ctype.split(b";")[0].strip() == b"text/event-stream":
                return await self._stream(rec, resp)
            raw = await self._read(resp, self.config.max_model_body)
            try:
                payload = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise _executor_failure(f"model call body parse: {e}") from None
        emitter = self.emitter
        if emitter is not None and emitter.quiet:
            done = LoopEventKind.OUTPUT_ITEM_DONE.value
            items = completion_items(payload, rec.id)
            await emitter.emit_all(
                [(done, {"output_index": emitter.indexer.next(), "item": i}) for i in items]
            )
        elif emitter is not None:
            tr = ChatStreamTranslator(emitter.indexer)
            tr.begin_call(rec.id)
            await emitter.emit_all(tr.message(payload))
        return payload

    async def _read(self, resp: ModelResponse, limit: int, truncate: bool = False) -> bytes:
        buf = bytearray()
        try:
            async for chunk in resp.body:
                buf += chunk
                if len(buf) > limit:
                    if truncate:
                        return bytes(buf[:limit])
                    raise _executor_failure(f"model call body larger than {limit} bytes")
        finally:
            await _aclose(resp.body)
        return bytes(buf)

    async def _stream(self, rec: RecordedStep, resp: ModelResponse) -> Any:
        decoder = SSEDecoder()
        asm = ChatChunkAssembler()
        tr: ChatStreamTranslator | None = None
        emitter = self.emitter
        if emitter is not None:
            tr = ChatStreamTranslator(emitter.indexer)
            tr.begin_call(rec.id)
        done = False

        async def handle(data: str) -> bool:
            if data == "[DONE]":
                return True
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError as e:
                raise _executor_failure(f"model stream parse: {e}") from None
            if not isinstance(obj, dict):
                return False
            if "error" in obj and "choices" not in obj:
                raise _executor_failure(
                    "model stream error: " + orjson.dumps(obj["error"]).decode()
                )
            asm.feed(obj)
            if tr is not None and emitter is not None:
                await emitter.emit_all(tr.feed(obj))
            return False

        try:
            async for chunk in resp.body:
                for ev in decoder.feed(chunk):
                    if await handle(ev.data):
                        done = True
                        break
                if done:
                    break
            if not done:
                for ev in decoder.close():
                    if await handle(ev.data):
                        break
        except SSEEventTooLarge as e:
            raise _executor_failure(f"model stream: {e}") from None
        finally:
            await _aclose(resp.body)
        if asm.chunks == 0:
            raise _executor_failure("model stream ended without a chunk")
        if tr is not None and emitter is not None:
            await emitter.emit_all(tr.end_call())
        return asm.result(rec.id)


@asynccontextmanager
async def open_response_stream(
    store: MultiStepStore,
    executor: ToolExecutor,
    ctx: RequestContext,
    model: ModelTransport,
    *,
    request_id: str,
    config: LoopConfig | None = None,
    buffer_size: int = 64,
    nursery: trio.Nursery | None = None,
    response: Mapping[str, Any] | None = None,
    first_sequence: int = 0,
) -> AsyncIterator[trio.MemoryReceiveChannel[LoopEvent]]:
    """Run one response loop and hand the caller the receive end of its event channel.

    The loop runs in ``nursery`` if one is given (a service nursery that outlives the consumer:
    the loop then survives the consumer's cancellation), else in a nursery opened here (leaving
    the block waits for the loop, and cancelling the caller's scope cancels it, with its steps
    persisted as ``canceled``). When the consumer leaves the block, delivery stops at once;
    ``config.on_disconnect`` decides whether the loop goes on (``CONTINUE``) or its upstream
    work is cancelled (``CANCEL``). The channel ends after the terminal event. A
    :class:`~onwards_trio.LoopError` is not raised here: it was already sent as
    ``response.failed`` and written to the store.
    """
    cfg = config if config is not None else LoopConfig()
    send, recv = trio.open_memory_channel[LoopEvent](buffer_size)
    sink = ChannelSink(send)
    loop_scope = trio.CancelScope()

    async def runner() -> None:
        with loop_scope:
            try:
                await run_response_loop(
                    store,
                    executor,
                    ctx,
                    model,
                    request_id=request_id,
                    sink=sink,
                    config=cfg,
                    response=response,
                    first_sequence=first_sequence,
                )
            except LoopError:
                pass  # reported as response.failed and persisted by the loop
            finally:
                sink.close()

    async with trio.open_nursery() as own:
        (nursery or own).start_soon(runner)
        try:
            async with recv:
                yield recv
        finally:
            sink.closed = True
            if cfg.on_disconnect is DisconnectPolicy.CANCEL:
                loop_scope.cancel()
