"""Spend budgets: at most an amount of money per key (or per group of keys) per window.

A :class:`Budget` counts micro-units (:mod:`pricing`) spent in its current window: settled
costs plus the estimates of requests in flight. Admission takes an estimate (refused when it
does not fit: a request must not start what the budget cannot pay); settlement replaces it
with the cost of the usage the upstream reported; a request that never got a 2xx answer gives
it all back. Like a token limit, but a budget never refills: it starts again when its
calendar window does.

**Windows are UTC calendar windows** (``day``: from 00:00 UTC, ``month``: from the 1st,
``total``: forever), not rolling ones: "100 a month" is what an operator is billed for, a
reset time is a fact a client can be told, and across replicas a window is a Redis key name
(``…:2026-11``) rather than a ledger of timestamps. A reservation belongs to the window it was
admitted in: one settled after the window rolled over is charged to the old window (which no
one reads any more), so requests in flight at midnight cost the new window nothing.

The clock is the wall clock (``time.time``), injectable so tests can drive it from
``MockClock``.
"""

from __future__ import annotations

import calendar
import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Final, Literal

import orjson

__all__ = [
    "Budget",
    "BudgetReservation",
    "Window",
    "label_scope",
    "window_of",
]

Window = Literal["day", "month", "total"]
_DAY: Final = 86400.0


def window_of(window: Window, now: float) -> tuple[str, float | None]:
    """The window containing ``now`` (epoch seconds): its id and when it ends (``None``:
    never). Ids are what the Redis keys are named by: ``2026-11-30``, ``2026-11``, ``total``."""
    if window == "total":
        return "total", None
    t = time.gmtime(now)
    if window == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", start + _DAY
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}", float(calendar.timegm((year, month, 1, 0, 0, 0)))


def label_scope(match_labels: Mapping[str, str]) -> str:
    """A label budget's stable name (its Redis scope, what a reload recognises it by): a hash
    of its labels, so reordering the config keeps it and label values stay out of Redis."""
    raw = orjson.dumps(dict(sorted(match_labels.items())))
    return "label:" + hashlib.sha256(raw).hexdigest()[:16]


class Budget:
    """``amount`` micro-units per ``window``; :attr:`used` is this window's settled costs plus
    the estimates in flight."""

    __slots__ = ("_ends", "amount", "clock", "used", "window", "window_id")

    def __init__(self, amount: int, window: Window, clock: Callable[[], float] = time.time) -> None:
        if amount < 0:
            raise ValueError("amount must be >= 0")
        self.amount = int(amount)
        self.window: Window = window
        self.clock = clock
        self.window_id, self._ends = window_of(window, clock())
        self.used = 0

    def _roll(self) -> float:
        """Start the next window if this one is over; the time now."""
        now = self.clock()
        ends = self._ends
        if ends is not None and now >= ends:
            self.window_id, self._ends = window_of(self.window, now)
            self.used = 0
        return now

    def reserve(self, estimate: int) -> BudgetReservation | None:
        """Take ``estimate`` micro-units, or ``None`` when they do not fit what is left."""
        self._roll()
        estimate = max(estimate, 0)
        if self.used + estimate > self.amount:
            return None
        self.used += estimate
        return BudgetReservation(self, self.window_id, estimate)

    def adjust(self, window_id: str, amount: int) -> None:
        """Add ``amount`` (negative: give back) to the window ``window_id``, if still current."""
        self._roll()
        if window_id == self.window_id:
            self.used = max(0, self.used + amount)

    def current(self) -> tuple[str, float | None]:
        """The current window's id and the seconds until it ends (``None``: never)."""
        self._roll()
        return self.window_id, self.reset

    @property
    def remaining(self) -> int:
        """Micro-units left in this window (never negative: an overshoot shows as 0)."""
        self._roll()
        return max(0, self.amount - self.used)

    @property
    def reset(self) -> float | None:
        """Seconds until this window ends (``None``: a ``total`` budget never resets)."""
        now = self._roll()
        return None if self._ends is None else max(0.0, self._ends - now)


class BudgetReservation:
    """An estimate taken from a :class:`Budget`; settled or refunded exactly once."""

    __slots__ = ("_budget", "amount", "window_id")

    def __init__(self, budget: Budget, window_id: str, amount: int) -> None:
        self._budget: Budget | None = budget
        self.window_id = window_id
        self.amount = amount

    def settle(self, cost: int) -> None:
        """The response cost ``cost``: give back the over-estimate, or charge the rest."""
        if self._budget is not None:
            self._budget.adjust(self.window_id, cost - self.amount)
            self._budget = None

    def refund(self) -> None:
        """Nothing was spent upstream: give the whole estimate back."""
        if self._budget is not None:
            self._budget.adjust(self.window_id, -self.amount)
            self._budget = None
