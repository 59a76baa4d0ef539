"""Choosing a provider: weighted least-connections, priority, attempt plans and backoff."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Protocol

from onwards_trio._config import Backoff, Fallback
from onwards_trio._proxy.limits import ConcurrencyLimit, Permit

__all__ = [
    "Candidate",
    "backoff_delays",
    "plan_attempts",
    "select",
    "status_matches",
]

_EPS = 1e-9


class Candidate(Protocol):
    @property
    def weight(self) -> int: ...
    @property
    def concurrency(self) -> ConcurrencyLimit: ...


def select(
    providers: Sequence[Candidate],
    strategy: str,
    exclude: set[int] | frozenset[int] = frozenset(),
    rng: random.Random | None = None,
) -> tuple[int, Permit] | None:
    """Pick a provider index and take its concurrency permit, or ``None`` if none is free.

    ``weighted_random`` is weighted least-connections (lowest ``active / weight``) with a
    weighted random tie-break, so a cold pool behaves as weighted random and a busy one
    spreads load by weight. ``priority`` takes the first free provider in definition order.
    Weight 0 is never chosen by either strategy.
    """
    if len(providers) == 1 and not exclude:  # the usual alias: one provider, both strategies
        only = providers[0]
        if only.weight <= 0:
            return None
        permit = only.concurrency.try_acquire()
        return (0, permit) if permit is not None else None
    if strategy == "priority":
        for i, p in enumerate(providers):
            if i in exclude or p.weight <= 0:
                continue
            permit = p.concurrency.try_acquire()
            if permit is not None:
                return i, permit
        return None
    best: list[int] = []
    best_score = 0.0
    for i, p in enumerate(providers):
        weight = p.weight
        if weight <= 0 or i in exclude:
            continue
        conc = p.concurrency  # at_capacity and active, read without two property calls
        active = conc.counter.active
        limit = conc.limit
        if limit is not None and active >= limit:
            continue
        score = active / weight
        if not best or score < best_score - _EPS:
            best = [i]
            best_score = score
        elif abs(score - best_score) <= _EPS:
            best.append(i)
    if not best:
        return None
    if len(best) == 1:
        idx = best[0]
    else:
        r = rng or random
        total = 0
        for i in best:  # a loop, not sum() over a generator
            total += providers[i].weight
        pick = r.random() * total
        idx = best[-1]
        for i in best:
            pick -= providers[i].weight
            if pick < 0:
                idx = i
                break
    # single-threaded: its capacity was checked just above
    return idx, Permit(providers[idx].concurrency.counter)


def plan_attempts(
    providers: Sequence[Candidate],
    strategy: str,
    fallback: Fallback | None,
    rng: random.Random | None = None,
) -> Iterator[tuple[int, Permit]]:
    """Yield (index, permit) for each attempt the fallback policy allows.

    Without fallback: one attempt. With it: up to ``max_attempts`` (default: one per provider).
    Tried providers are excluded (except ``weighted_random`` + ``with_replacement``); when a
    pass over the providers is used up and budget remains, the cascade restarts, so a
    one-provider pool can retry in place.
    """
    return _Plan(providers, strategy, fallback, rng)


class _Plan:
    """:func:`plan_attempts`' iterator: a class, not a generator, because the pipeline leaves
    it at its first successful attempt, and a generator dropped while suspended is closed by
    throwing ``GeneratorExit`` into it (on every request)."""

    __slots__ = ("_fallback", "_left", "_providers", "_replace", "_rng", "_strategy", "_tried")

    def __init__(
        self,
        providers: Sequence[Candidate],
        strategy: str,
        fallback: Fallback | None,
        rng: random.Random | None,
    ) -> None:
        self._providers = providers
        self._strategy = strategy
        self._rng = rng
        if fallback is None or not fallback.enabled:
            self._fallback: Fallback | None = None
            self._left = 1
            self._replace = False
        else:
            self._fallback = fallback
            self._left = fallback.max_attempts or len(providers)
            self._replace = fallback.with_replacement and strategy != "priority"
        self._tried: set[int] = set()

    def __iter__(self) -> _Plan:
        return self

    def __next__(self) -> tuple[int, Permit]:
        if self._left <= 0:
            raise StopIteration
        self._left -= 1
        fallback = self._fallback
        if fallback is None:
            choice = select(self._providers, self._strategy, rng=self._rng)
        else:
            tried = self._tried
            choice = select(
                self._providers, self._strategy, frozenset() if self._replace else tried, self._rng
            )
            if choice is None and tried and fallback.max_attempts:
                tried.clear()
                choice = select(self._providers, self._strategy, tried, self._rng)
            if choice is not None:
                tried.add(choice[0])
        if choice is None:
            self._left = 0
            raise StopIteration
        return choice


def status_matches(patterns: Sequence[int], status: int) -> bool:
    """onwards' wildcards: ``5`` → 5xx, ``50`` → 500-509, otherwise exact."""
    for p in patterns:
        if p < 10:
            if status // 100 == p:
                return True
        elif p < 100:
            if status // 10 == p:
                return True
        elif status == p:
            return True
    return False


def backoff_delays(spec: Backoff, rng: random.Random | None = None) -> Iterator[float]:
    """Seconds to wait before the 2nd, 3rd, … attempt: exponential, capped, optional jitter."""
    r = rng or random
    n = 0
    while True:
        base = min(spec.max_ms, spec.initial_ms * spec.factor**n) / 1000.0
        n += 1
        yield r.uniform(0.0, base) if spec.jitter == "full" else base
