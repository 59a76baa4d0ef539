"""Rate and concurrency limits: non-blocking, so a request over a limit is answered at once.

Both read time from :func:`trio.current_time`, so tests drive them with ``MockClock``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio

__all__ = [
    "OFF_LOOP_BYTES",
    "ConcurrencyLimit",
    "Counter",
    "Permit",
    "PromptCounter",
    "Reservation",
    "TokenBucket",
    "TokenLimit",
    "TokenReservation",
    "key_scope",
    "pool_scope",
    "provider_scope",
    "requested_output",
]


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

    def try_acquire(self, now: float | None = None) -> float | None:
        """``now``: the current trio time, when the caller read it for another bucket too."""
        # _refill, inline: this runs for up to three buckets on every request
        if now is None:
            now = trio.current_time()
        last = self._last
        tokens = self._tokens
        if last is not None and now > last:
            tokens += (now - last) * self.rate
            if tokens > self.burst:  # comparisons, not min()/max()/float() calls
                tokens = float(self.burst)
        self._last = now
        if tokens >= 1.0 - 1e-9:  # tolerate float drift: waiting "Retry-After" must work
            self._tokens = tokens - 1.0 if tokens > 1.0 else 0.0
            return None
        self._tokens = tokens
        return (1.0 - tokens) / self.rate

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


def requested_output(json: object) -> int | None:
    """The most output a parsed request asks for (``max_completion_tokens`` / ``max_tokens`` /
    ``max_output_tokens``); ``None`` when it names none."""
    if type(json) is dict:
        for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            value = json.get(name)
            if type(value) is int and value >= 0:
                return value
    return None


_log = logging.getLogger("onwards_trio.limits")

# From this body size an exact counter runs in a worker thread: a tokenizer takes milliseconds
# per 100 KB of text, which would stall every other request on the event loop meanwhile.
OFF_LOOP_BYTES = 64 * 1024


class PromptCounter:
    """The one place admission sizes a prompt (token limits and budgets, pool, key, provider).

    By default the body's bytes over four: a cheap over-estimate for JSON-wrapped text, and
    close enough, since settlement corrects it. With ``count`` (the config's ``token_counter``)
    the parsed JSON body is given to it; an exception or a result that is not an int >= 0 falls
    back to the byte estimate for that request, with one warning that names the exception's
    type only (its message could quote the prompt).
    """

    __slots__ = ("_count", "name")

    def __init__(self, count: Callable[[Any], object] | None = None, name: str = "") -> None:
        self._count = count
        self.name = name

    async def count(self, body: bytes, json: object) -> int:
        if self._count is None or json is None:
            return len(body) // 4
        if len(body) >= OFF_LOOP_BYTES:
            return await trio.to_thread.run_sync(self._exact, body, json)
        return self._exact(body, json)

    def _exact(self, body: bytes, json: object) -> int:
        assert self._count is not None
        try:
            got = self._count(json)
        except Exception as exc:
            _log.warning(
                "token_counter %s raised %s: the byte estimate is used for this request",
                self.name,
                type(exc).__name__,
            )
            return len(body) // 4
        if type(got) is not int or got < 0:
            _log.warning(
                "token_counter %s returned %s, not an int >= 0: the byte estimate is used "
                "for this request",
                self.name,
                type(got).__name__,
            )
            return len(body) // 4
        return got


class TokenLimit:
    """``limit`` LLM tokens per ``window`` seconds: a bucket of ``limit`` refilled at
    ``limit / window`` a second, drawn on by estimates and corrected by actual usage.

    A continuous refill instead of fixed windows: no double burst at a window's edge, and the
    wait for a given amount is exact, so ``Retry-After`` is truthful. The bucket may go below
    zero when usage exceeds its estimate (the debt is real tokens spent upstream); callers then
    wait until it is paid back.
    """

    __slots__ = ("_last", "_tokens", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        if limit <= 0 or window <= 0:
            raise ValueError("limit and window must be > 0")
        self.limit = int(limit)
        self.window = float(window)
        self._tokens = float(limit)
        self._last: float | None = None

    @property
    def rate(self) -> float:
        return self.limit / self.window

    def _refill(self) -> None:
        now = trio.current_time()
        if self._last is not None and now > self._last:
            self._tokens = min(float(self.limit), self._tokens + (now - self._last) * self.rate)
        self._last = now

    def reserve(self, estimate: int) -> TokenReservation | float:
        """Take ``estimate`` tokens: a reservation, or the seconds until they will be there.

        An estimate above the whole limit is capped at it, so a big request is admitted once
        the bucket is full instead of never.
        """
        self._refill()
        need = float(min(max(estimate, 0), self.limit))
        if self._tokens >= need - 1e-9:
            self._tokens -= need
            return TokenReservation(self, need)
        return (need - self._tokens) / self.rate

    def _give_back(self, amount: float) -> None:
        self._refill()
        self._tokens = min(float(self.limit), self._tokens + amount)

    @property
    def level(self) -> float:
        """Tokens as of the last reservation or settlement (no refill: for the headers of the
        answer whose reservation just refilled it)."""
        return self._tokens

    @property
    def remaining(self) -> int:
        """Tokens available now (never negative: a debt shows as 0)."""
        self._refill()
        return max(0, int(self._tokens))

    @property
    def reset(self) -> float:
        """Seconds until the bucket is full again."""
        self._refill()
        return (self.limit - self._tokens) / self.rate


class Reservation(Protocol):
    """Tokens held under a limit, local (:class:`TokenReservation`) or shared in Redis."""

    def settle(self, used: int) -> None: ...

    def refund(self) -> None: ...


class TokenReservation:
    """Tokens taken from a :class:`TokenLimit` on admission; settled or refunded exactly once."""

    __slots__ = ("_limit", "amount")

    def __init__(self, limit: TokenLimit, amount: float) -> None:
        self._limit: TokenLimit | None = limit
        self.amount = amount

    def settle(self, used: int) -> None:
        """The upstream reported ``used`` tokens: return the over-estimate, or charge the rest."""
        if self._limit is not None:
            self._limit._give_back(self.amount - used)
            self._limit = None

    def refund(self) -> None:
        """Nothing was spent upstream (refused, failed, never answered): give it all back."""
        if self._limit is not None:
            self._limit._give_back(self.amount)
            self._limit = None


# Where a limit is counted across replicas (the Redis key names of shared_limits and budgets).
def pool_scope(alias: str) -> str:
    return f"pool:{alias}"


def key_scope(ident: str) -> str:
    """A client key's scope from its identity (``sha256:<hex>``, see auth.key_id): a hash
    prefix, so the key itself never reaches Redis."""
    return "key:" + ident[7:23]


def provider_scope(alias: str, index: int) -> str:
    return f"provider:{alias}:{index}"
