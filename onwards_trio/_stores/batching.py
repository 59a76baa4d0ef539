"""Group commit for the SQL stores: one writer per database runs the queued calls in batches.

A store call is a function of a database connection run in a worker thread. The thread hop
and the commit (an ``fsync`` on PostgreSQL, a WAL write on SQLite) cost far more than a small
statement, so calls are queued and a writer — a worker thread that drains the queue — runs
whatever has queued as one batch: one transaction, each call in a savepoint of its own (a call
that fails rolls back only its own writes). The backend says how a batch runs
(:attr:`GroupCommit.run_batch`); this module decides which calls form one and hands the
results back.

**Why a draining writer, not a thread call per batch.** A writer is started (with
``trio.to_thread.run_sync``, from a system task) only when a call finds no writer running; it
then takes batch after batch until the queue is empty, so under load the Trio thread neither
wakes a leader task nor starts a thread per batch. Each finished batch is handed back with
one ``TrioToken.run_sync_soon``, which reschedules its callers directly: per call, one list
append on the way in and one ``reschedule`` on the way out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

__all__ = ["Call", "GroupCommit"]

C = TypeVar("C")
T = TypeVar("T")


class Call(Generic[C]):
    """One caller's function waiting for (or running in) a batch; the batch runner sets
    :attr:`outcome`. ``alone``: it runs in a batch of its own (closing the connection).
    ``merge``: rows the batch runner may insert together with other calls' rows instead of
    running ``fn`` (:meth:`SqliteFile.insert`); the call's value is then ``value``.
    ``expires``: the monotonic time after which it is not started (None: a call its caller's
    cancellation may take out of the queue)."""

    __slots__ = ("alone", "expires", "fn", "merge", "outcome", "taken", "task", "value")

    def __init__(
        self,
        fn: Callable[[C], Any],
        *,
        alone: bool = False,
        merge: Any = None,
        value: Any = None,
        expires: float | None = None,
    ) -> None:
        self.fn = fn
        self.alone = alone
        self.merge = merge
        self.value = value
        self.expires = expires
        self.task = trio.lowlevel.current_task()
        self.taken = False  # part of a batch that has started: it will run, whatever happens
        self.outcome: outcome.Outcome[Any] | None = None


class GroupCommit(Generic[C]):
    """Runs calls through ``run_batch`` in writer threads, at most ``slots`` writers at a
    time, at most ``max_batch`` calls per batch.

    Durability is the runner's: a call returns only once its batch is done, so after the
    commit that holds its writes. A call taken into a batch is not abandoned when its caller
    is cancelled — it runs to the end and the caller gets its result, as with an
    uncancellable thread call, and the cancellation lands at its next checkpoint; a queued
    call cancelled before its batch starts never runs.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Call[C]]], None],
        *,
        slots: int = 1,
        max_batch: int = 128,
    ) -> None:
        self.run_batch = run_batch
        self.slots = slots
        self.max_batch = max_batch
        self.queue: list[Call[C]] = []
        self.running = 0  # writers started and not yet finished
        self._lock = threading.Lock()  # the queue and ``running``: shared with the writers

    async def run(
        self,
        fn: Callable[[C], T],
        *,
        alone: bool = False,
        merge: Any = None,
        value: Any = None,
        start_within: float | None = None,
    ) -> T:
        """``fn(connection)`` in a writer thread, batched with the calls queued meanwhile
        (or, for a call with ``merge`` rows, those rows inserted with other calls' rows).
        ``start_within``: shielded from the caller's cancellation, and failed with
        :class:`trio.TooSlowError` if not started within that many seconds."""
        expires = None
        if start_within is None:
            await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller starts nothing
        else:
            expires = time.monotonic() + start_within
        call: Call[C] = Call(fn, alone=alone, merge=merge, value=value, expires=expires)
        with self._lock:
            self.queue.append(call)
            first = None
            if self.running < self.slots:  # a writer starts with what is queued now
                self.running += 1
                first = self._take()
        if first is not None:
            trio.lowlevel.spawn_system_task(self._writer, first, name="onwards-trio store writer")

        def abort(_: object) -> trio.lowlevel.Abort:
            with self._lock:
                if call.taken or call.expires is not None:  # it runs (or expires): the caller
                    return trio.lowlevel.Abort.FAILED  # waits for the result
                self.queue.remove(call)
            return trio.lowlevel.Abort.SUCCEEDED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    async def _writer(self, first: list[Call[C]]) -> None:
        token = trio.lowlevel.current_trio_token()
        # Shielded: its callers wait for ``first`` (already taken), so the thread must start
        # even when the run is shutting down; once started, to_thread never abandons it.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._drain, token, first)

    def _drain(self, token: trio.lowlevel.TrioToken, batch: list[Call[C]]) -> None:
        """In the writer thread: ``batch``, then batch after batch until the queue is empty."""
        while True:
            try:
                live = _unexpired(batch)
                if live:
                    self.run_batch(live)
            except Exception as e:  # the runner sets every outcome; this is a last resort
                for call in batch:
                    if call.outcome is None:
                        call.outcome = outcome.Error(e)
            token.run_sync_soon(_deliver, batch)
            with self._lock:
                if not self.queue:
                    self.running -= 1
                    return
                batch = self._take()

    def _take(self) -> list[Call[C]]:
        """The next batch (under the lock): a call that runs alone is a batch of its own."""
        queue = self.queue
        if queue[0].alone:
            batch = [queue.pop(0)]
        else:
            n = 1
            while n < len(queue) and n < self.max_batch and not queue[n].alone:
                n += 1
            batch, self.queue = queue[:n], queue[n:]
        for call in batch:
            call.taken = True
        return batch


def _unexpired(batch: list[Call[C]]) -> list[Call[C]]:
    """The calls of ``batch`` to run; the others, queued past their ``expires``, fail."""
    now = time.monotonic()
    if all(call.expires is None or call.expires >= now for call in batch):
        return batch
    live = []
    for call in batch:
        if call.expires is None or call.expires >= now:
            live.append(call)
        else:
            call.outcome = outcome.Error(trio.TooSlowError("the store took too long to start it"))
    return live


def _deliver(batch: list[Call[Any]]) -> None:
    """On the Trio thread: each caller of a finished batch resumes with its outcome."""
    for call in batch:
        assert call.outcome is not None
        trio.lowlevel.reschedule(call.task, call.outcome)
