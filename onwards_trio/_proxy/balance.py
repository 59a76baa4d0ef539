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
        if i in exclude or p.weight <= 0 or p.concurrency.at_capacity:
            continue
        score = p.concurrency.active / p.weight
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
        total = sum(providers[i].weight for i in best)
        pick = r.random() * total
        idx = best[-1]
        for i in best:
            pick -= providers[i].weight
            if pick < 0:
                idx = i
                break
    permit = providers[idx].concurrency.try_acquire()
    if permit is None:  # pragma: no cover - single-threaded: capacity was checked just above
        return None
    return idx, permit


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
    enabled = fallback is not None and fallback.enabled
    if not enabled:
        first = select(providers, strategy, rng=rng)
        if first is not None:
            yield first
        return
    assert fallback is not None
    budget = fallback.max_attempts or len(providers)
    replace = fallback.with_replacement and strategy != "priority"
    tried: set[int] = set()
    for _ in range(budget):
        choice = select(providers, strategy, frozenset() if replace else tried, rng)
        if choice is None and tried and fallback.max_attempts:
            tried.clear()
            choice = select(providers, strategy, tried, rng)
        if choice is None:
            return
        tried.add(choice[0])
        yield choice


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
