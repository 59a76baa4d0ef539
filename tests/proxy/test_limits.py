"""Pure traffic-control parts: token bucket, concurrency permits, selection, backoff."""

from __future__ import annotations

import random

import attrs
import pytest
import trio
import trio.testing

from onwards_trio._config import Backoff, Fallback
from onwards_trio._proxy.balance import backoff_delays, plan_attempts, select, status_matches
from onwards_trio._proxy.limits import ConcurrencyLimit, TokenBucket


async def test_bucket_starts_full_and_allows_a_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate=2, burst=5)
    assert [bucket.try_acquire() for _ in range(5)] == [None] * 5
    assert bucket.try_acquire() == pytest.approx(0.5)


async def test_bucket_refills_at_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate=10, burst=1)
    assert bucket.try_acquire() is None
    assert bucket.try_acquire() == pytest.approx(0.1)
    await trio.sleep(0.05)
    assert bucket.try_acquire() == pytest.approx(0.05)
    await trio.sleep(0.05)
    assert bucket.try_acquire() is None


async def test_bucket_never_exceeds_its_burst(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate=100, burst=3)
    await trio.sleep(60)
    assert bucket.tokens == 3


async def test_retry_after_is_truthful(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate=0.5, burst=1)
    assert bucket.try_acquire() is None
    wait = bucket.try_acquire()
    assert wait is not None and wait == pytest.approx(2.0)
    await trio.sleep(wait - 0.01)
    assert bucket.try_acquire() is not None
    await trio.sleep(0.02)
    assert bucket.try_acquire() is None


async def test_sixty_acquisitions_at_ten_per_second_burst_five(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate=10, burst=5)
    start = trio.current_time()
    for _ in range(60):
        while (wait := bucket.try_acquire()) is not None:
            await trio.sleep(wait)
    assert trio.current_time() - start == pytest.approx(5.5)


def test_concurrency_limit_blocks_at_capacity_and_releases() -> None:
    limit = ConcurrencyLimit(2)
    a, b = limit.try_acquire(), limit.try_acquire()
    assert a is not None and b is not None
    assert limit.try_acquire() is None
    a.release()
    a.release()  # idempotent: a second release must not free a second slot
    assert limit.active == 1
    c = limit.try_acquire()
    assert c is not None and limit.try_acquire() is None


def test_zero_limit_refuses_everything() -> None:
    assert ConcurrencyLimit(0).try_acquire() is None


@attrs.define
class P:
    weight: int
    concurrency: ConcurrencyLimit = attrs.field(factory=ConcurrencyLimit)


def test_weighted_selection_follows_weights() -> None:
    providers = [P(3), P(1)]
    rng = random.Random(7)
    counts = [0, 0]
    for _ in range(4000):
        choice = select(providers, "weighted_random", rng=rng)
        assert choice is not None
        counts[choice[0]] += 1
        choice[1].release()
    assert 2.7 < counts[0] / counts[1] < 3.3


def test_least_connections_prefers_the_less_loaded() -> None:
    providers = [P(1), P(1)]
    first = select(providers, "weighted_random")
    assert first is not None
    second = select(providers, "weighted_random")
    assert second is not None and second[0] != first[0]
    second[1].release()
    third = select(providers, "weighted_random")
    assert third is not None and third[0] == second[0]


def test_busy_pool_spreads_by_weight() -> None:
    providers = [P(3), P(1)]
    held = [select(providers, "weighted_random") for _ in range(40)]
    assert all(h is not None for h in held)
    assert providers[0].concurrency.active == 30 and providers[1].concurrency.active == 10


def test_weight_zero_is_never_chosen() -> None:
    providers = [P(0), P(1)]
    for strategy in ("weighted_random", "priority"):
        for _ in range(50):
            choice = select(providers, strategy)
            assert choice is not None and choice[0] == 1
            choice[1].release()
    assert select([P(0)], "weighted_random") is None


def test_priority_takes_the_first_free_provider() -> None:
    providers = [P(1, ConcurrencyLimit(1)), P(1), P(1)]
    first = select(providers, "priority")
    assert first is not None and first[0] == 0
    second = select(providers, "priority")
    assert second is not None and second[0] == 1  # provider 0 is full


def test_full_providers_are_skipped_and_all_full_is_none() -> None:
    providers = [P(1, ConcurrencyLimit(1)), P(1, ConcurrencyLimit(1))]
    assert select(providers, "weighted_random") is not None
    assert select(providers, "weighted_random") is not None
    assert select(providers, "weighted_random") is None


def indices(providers: list[P], strategy: str, fallback: Fallback | None) -> list[int]:
    out = []
    for index, permit in plan_attempts(providers, strategy, fallback, random.Random(1)):
        out.append(index)
        permit.release()
    return out


def test_without_fallback_there_is_one_attempt() -> None:
    assert len(indices([P(1), P(1)], "priority", None)) == 1
    assert len(indices([P(1), P(1)], "priority", Fallback(enabled=False))) == 1


def test_priority_plan_walks_providers_in_order() -> None:
    assert indices([P(1), P(1), P(1)], "priority", Fallback(enabled=True)) == [0, 1, 2]


def test_max_attempts_bounds_the_plan() -> None:
    plan = indices([P(1), P(1), P(1)], "weighted_random", Fallback(enabled=True, max_attempts=2))
    assert len(plan) == 2 and len(set(plan)) == 2


def test_retry_budget_retries_in_place_on_a_single_provider() -> None:
    assert indices([P(1)], "priority", Fallback(enabled=True, max_attempts=3)) == [0, 0, 0]


def test_with_replacement_allows_repeats() -> None:
    plan = indices(
        [P(9), P(1)],
        "weighted_random",
        Fallback(enabled=True, max_attempts=5, with_replacement=True),
    )
    assert len(plan) == 5 and len(set(plan)) < 5


@pytest.mark.parametrize(
    ("patterns", "matching", "not_matching"),
    [
        ([5, 429], [500, 502, 503, 599, 429], [400, 404, 200]),
        ([50, 52], [500, 504, 509, 520, 522], [510, 530, 200]),
        ([503], [503], [500, 502]),
    ],
)
def test_status_wildcards(
    patterns: list[int], matching: list[int], not_matching: list[int]
) -> None:
    assert all(status_matches(patterns, s) for s in matching)
    assert not any(status_matches(patterns, s) for s in not_matching)


def test_backoff_without_jitter_is_exponential_and_capped() -> None:
    delays = backoff_delays(Backoff(initial_ms=100, max_ms=500, factor=2, jitter="none"))
    assert [round(next(delays), 3) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_full_jitter_stays_within_the_exponential_envelope() -> None:
    delays = backoff_delays(Backoff(initial_ms=100, max_ms=1000, factor=2), random.Random(3))
    values = [next(delays) for _ in range(6)]
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(0 <= v <= c for v, c in zip(values, caps, strict=True))
    assert len(set(values)) == len(values)  # jittered, not constant
