"""Group commit for the SQL stores: calls that queue behind running transactions share one.

A store call is a function of a database connection run in a worker thread. The thread hop
and the commit (an ``fsync`` on PostgreSQL, a WAL write on SQLite) cost far more than a small
statement, so when more calls arrive than there are connections to run them, the ones waiting
run together: one thread hop, one transaction, each call in a savepoint of its own (a call
that fails rolls back only its own writes). A call that finds a free slot runs alone, at once,
as it would without batching. The backend says how a batch runs (:attr:`GroupCommit.run_batch`);
this module only decides which calls form one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

__all__ = ["Call", "GroupCommit"]

C = TypeVar("C")
T = TypeVar("T")


class Call(Generic[C]):
    """One caller's function waiting for (or running in) a batch; the batch runner sets
    :attr:`outcome`."""

    __slots__ = ("fn", "lead", "outcome", "taken", "wake")

    def __init__(self, fn: Callable[[C], Any]) -> None:
        self.fn = fn
        self.wake = trio.Event()  # set when the result is in, or when this caller must lead
        self.taken = False  # part of a batch that has started: it will run, whatever happens
        self.lead = False  # handed the lead: this caller runs the next batch
        self.outcome: outcome.Outcome[Any] | None = None


class GroupCommit(Generic[C]):
    """Runs calls through ``run_batch`` (in a worker thread, under ``limiter``), at most
    ``slots`` batches at a time, at most ``max_batch`` calls per batch.

    Durability is the runner's: a call returns only once its batch is done, so after the
    commit that holds its writes. A call taken into a batch is not abandoned when its caller
    is cancelled — it runs to the end and the caller gets its result, as with an
    uncancellable thread call, and the cancellation lands at its next checkpoint; a queued
    call cancelled before its batch starts never runs.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Call[C]]], None],
        limiter: trio.CapacityLimiter,
        *,
        slots: int = 1,
        max_batch: int = 128,
    ) -> None:
        self.run_batch = run_batch
        self.limiter = limiter
        self.slots = slots
        self.max_batch = max_batch
        self.queue: list[Call[C]] = []
        self.running = 0  # batches in a thread (or whose leader has been chosen)

    async def _lead(self) -> None:
        """Run the queued calls as one batch, then hand the lead to the next caller waiting."""
        try:
            batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
            for call in batch:
                call.taken = True
            with trio.CancelScope(shield=True):  # taken calls must run: their callers wait
                await trio.to_thread.run_sync(self.run_batch, batch, limiter=self.limiter)
            for call in batch:
                call.wake.set()
        finally:
            self.running -= 1
            if self.queue:
                nxt = self.queue[0]
                nxt.lead = True
                self.running += 1
                nxt.wake.set()

    async def run(self, fn: Callable[[C], T]) -> T:
        """``fn(connection)`` in a worker thread, batched with the calls that queue meanwhile."""
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller starts nothing
        call: Call[C] = Call(fn)
        self.queue.append(call)
        if self.running >= self.slots:
            try:
                await call.wake.wait()
            except trio.Cancelled:
                if not (call.taken or call.lead):  # never started: it may simply go
                    self.queue.remove(call)
                    raise
                with trio.CancelScope(shield=True):
                    await self._see_through(call)
            else:
                await self._see_through(call)
        else:
            self.running += 1
            await self._lead()
        assert call.outcome is not None
        result: T = call.outcome.unwrap()
        return result

    async def _see_through(self, call: Call[C]) -> None:
        if call.outcome is None:
            if call.lead:
                await self._lead()
            else:
                await call.wake.wait()
