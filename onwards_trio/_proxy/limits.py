"""Rate and concurrency limits: non-blocking, so a request over a limit is answered at once.

Both read time from :func:`trio.current_time`, so tests drive them with ``MockClock``.
"""

from __future__ import annotations

import trio

__all__ = ["ConcurrencyLimit", "Counter", "Permit", "TokenBucket"]


class TokenBucket:
    """A token bucket that starts full: ``burst`` tokens, refilled at ``rate`` per second.

    :meth:`try_acquire` takes one token and returns ``None``, or returns how many seconds remain
    until a token will be there (the truthful ``Retry-After``).
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = float(rate)
        self.burst = int(burst)
        self._tokens = float(burst)
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now

    def try_acquire(self) -> float | None:
        self._refill(trio.current_time())
        if self._tokens >= 1.0 - 1e-9:  # tolerate float drift: waiting "Retry-After" must work
            self._tokens = max(0.0, self._tokens - 1.0)
            return None
        return (1.0 - self._tokens) / self.rate

    @property
    def tokens(self) -> float:
        """Tokens available now (for tests and metrics)."""
        self._refill(trio.current_time())
        return self._tokens


class Counter:
    """An in-flight count shared by every limiter view that adopts it across reloads."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = 0


class Permit:
    """One unit of concurrency; :meth:`release` is idempotent so every exit path may call it."""

    __slots__ = ("_counter",)

    def __init__(self, counter: Counter) -> None:
        self._counter: Counter | None = counter
        counter.active += 1

    def release(self) -> None:
        if self._counter is not None:
            self._counter.active -= 1
            self._counter = None

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ConcurrencyLimit:
    """At most ``limit`` permits at once (``None``: unlimited, but still counted)."""

    __slots__ = ("counter", "limit")

    def __init__(self, limit: int | None = None, counter: Counter | None = None) -> None:
        self.limit = limit
        self.counter = counter if counter is not None else Counter()

    @property
    def active(self) -> int:
        return self.counter.active

    @property
    def at_capacity(self) -> bool:
        return self.limit is not None and self.counter.active >= self.limit

    def try_acquire(self) -> Permit | None:
        if self.at_capacity:
            return None
        return Permit(self.counter)
