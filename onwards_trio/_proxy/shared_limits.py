"""Rate and concurrency limits shared by many gateway replicas through Redis (SPEC §3.6).

A request's admission is one Lua script (pool and key rate limits, pool and key slots, token
limits and budgets), so check-and-take is atomic across replicas and costs one round trip
whatever is configured; settlements and refunds are queued and sent in batches by a background
task, never on a request's path. The scripts read
Redis' own clock (``TIME``), so replicas with skewed clocks still agree. Concurrency slots are
*leases*: members of a sorted set scored by their expiry. A replica renews the leases it
holds; one that dies stops renewing, and its slots are purged by the next admission once they
expire, so a crash cannot take capacity for longer than ``lease_secs``.

Failure policy: every Redis call is bounded by ``timeout_ms``. A call that fails or times out
raises :class:`SharedLimitsUnavailable`; :meth:`SharedLimits.admit`, :meth:`SharedLimits.rate`
and :meth:`SharedLimits.provider_slot` catch it and apply the in-process limiters instead
(fail open to local limits, never hang, never 500), skip Redis for a second, and log at most
once a minute. Redis keys never contain a raw client key, and the Redis URL (which may hold a
password) is never logged.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import coredis
import coredis.exceptions
import coredis.retry
import trio

from onwards_trio._config import SharedLimitsSpec
from onwards_trio._proxy.budgets import Budget, BudgetReservation
from onwards_trio._proxy.limits import (
    ConcurrencyLimit,
    Permit,
    TokenBucket,
    TokenLimit,
    TokenReservation,
    key_scope,
    pool_scope,
    provider_scope,
)

__all__ = [
    "Admission",
    "ProviderCheck",
    "SharedBudgetReservation",
    "SharedLimits",
    "SharedLimitsUnavailable",
    "SharedPermit",
    "SharedTokenReservation",
    "key_scope",
    "pool_scope",
    "provider_scope",
]

log = logging.getLogger("onwards_trio.shared_limits")

_LOG_EVERY = 60.0  # seconds between two "Redis unavailable" warnings
_REOPEN_DELAY = 1.0  # seconds before a crashed Redis client is replaced
# After a failed call, requests skip Redis for this long: during an outage they pay no
# timeout at all, and only one probe per pause finds out whether Redis is back.
_PAUSE_AFTER_FAILURE = 1.0

# A token bucket's level now (TokenLimit's rule): a hash {t: tokens, ts: seconds}, refilled at
# ``rate`` up to ``limit``; a missing key is a full bucket. Prepended to the scripts using it.
_LEVEL_LUA = """
local function level(key, limit, rate, now)
  local got = redis.call('HMGET', key, 't', 'ts')
  local tokens = tonumber(got[1])
  local ts = tonumber(got[2])
  if tokens == nil or ts == nil then
    return limit
  end
  if now > ts then
    return math.min(limit, tokens + (now - ts) * rate)
  end
  return tokens
end
"""

# One admission, atomically, in one round trip: every check of a request (SPEC §3.6).
#
# KEYS: rate buckets, slot sets, token buckets, budget counters, then the chosen provider's
# rate bucket and token bucket (each optional), in that order. ARGV: the counts (rates, slots,
# token buckets, budgets), lease ms, whether the provider's rate and token bucket are there (1
# or 0), then (rate, burst) per rate bucket, (limit, lease id) per slot, (limit, rate, amount)
# per token bucket, (amount, estimate, ttl ms) per budget, the provider's (rate, burst) and
# (limit, rate, amount).
#
# A rate bucket starts full (the in-process TokenBucket's rule): a hash {t: tokens, ts:
# seconds}; a missing key is a full bucket, so the key may expire once it would have refilled.
# A slot set holds lease ids scored by expiry (ms); expired ones are purged before counting,
# which is what frees the slots of a replica that died. A token bucket is TokenLimit's rule: a
# hash like a rate bucket, refilled at its rate up to its limit, and may go below zero (debt).
# A budget is an integer counter of micro-units (settled costs plus estimates in flight), one
# key per calendar window, expiring a day after its window.
#
# Returns {0, tokens left per bucket..., budget used per budget..., provider status, provider
# wait, provider tokens left} when admitted (numbers as strings: Lua numbers become integers in
# a reply; the provider's status is 0, or 1 / 3 when its rate / token limit refused it alone);
# {1, i, wait} when rate bucket i refused; {2, j} when slot j was full; {3, k, wait} when token
# bucket k had too little; {4, b, used} when budget b could not take its estimate. As
# in-process, tokens of rate buckets before a refusal stay taken; slots, token buckets and
# budgets are taken all or none.
_GATE_LUA = (
    _LEVEL_LUA
    + """
local function take_one(key, rate, burst, now)
  local tokens = level(key, burst, rate, now)
  local admitted = tokens >= 1 - 1e-9
  if admitted then
    tokens = math.max(0, tokens - 1)
  end
  redis.call('HSET', key, 't', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1000)
  return admitted, tokens
end
local nrate = tonumber(ARGV[1])
local nslot = tonumber(ARGV[2])
local ntok = tonumber(ARGV[3])
local nbud = tonumber(ARGV[4])
local lease_ms = tonumber(ARGV[5])
local prate = tonumber(ARGV[6])
local ptok = tonumber(ARGV[7])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local a = 8
for i = 1, nrate do
  local rate = tonumber(ARGV[a])
  local burst = tonumber(ARGV[a + 1])
  a = a + 2
  local admitted, tokens = take_one(KEYS[i], rate, burst, now)
  if not admitted then
    return {1, i, tostring((1 - tokens) / rate)}
  end
end
local first = a
local taken = 0
local function give_back()
  for k = 1, taken do
    redis.call('ZREM', KEYS[nrate + k], ARGV[first + (k - 1) * 2 + 1])
  end
end
for j = 1, nslot do
  local key = KEYS[nrate + j]
  local limit = tonumber(ARGV[a])
  local lease = ARGV[a + 1]
  a = a + 2
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
  if redis.call('ZCARD', key) >= limit then
    give_back()
    return {2, j}
  end
  redis.call('ZADD', key, now_ms + lease_ms, lease)
  redis.call('PEXPIRE', key, lease_ms + 1000)
  taken = j
end
local base = nrate + nslot
local state = {}
for k = 1, ntok do
  local limit = tonumber(ARGV[a])
  local rate = tonumber(ARGV[a + 1])
  local amount = math.min(tonumber(ARGV[a + 2]), limit)
  a = a + 3
  local tokens = level(KEYS[base + k], limit, rate, now)
  if tokens < amount - 1e-9 then
    give_back()
    return {3, k, tostring((amount - tokens) / rate)}
  end
  state[k] = {limit, rate, tokens - amount}
end
base = base + ntok
local used = {}
for b = 1, nbud do
  local amount = tonumber(ARGV[a])
  local estimate = tonumber(ARGV[a + 1])
  local spent = tonumber(redis.call('GET', KEYS[base + b]) or '0')
  if spent + estimate > amount then
    give_back()
    return {4, b, tostring(spent)}
  end
  used[b] = spent
  a = a + 3
end
local out = {0}
for k = 1, ntok do
  local key = KEYS[nrate + nslot + k]
  local limit, rate, tokens = state[k][1], state[k][2], state[k][3]
  redis.call('HSET', key, 't', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((limit - tokens) / rate * 1000) + 1000)
  out[k + 1] = tostring(tokens)
end
a = a - 3 * nbud
for b = 1, nbud do
  local key = KEYS[base + b]
  local spent = redis.call('INCRBY', key, ARGV[a + 1])
  local ttl = tonumber(ARGV[a + 2])
  if ttl > 0 then
    redis.call('PEXPIRE', key, ttl)
  end
  a = a + 3
  out[ntok + b + 1] = tostring(spent)
end
-- The chosen provider's rate and token limit: refusing only this provider (the request-level
-- reservations above stand), reported as {status (0, 1 rate, 3 tokens), wait, tokens left}.
local pk = base + nbud
local pstatus, pwait, pleft = 0, '0', '0'
if prate == 1 then
  pk = pk + 1
  local rate = tonumber(ARGV[a])
  local burst = tonumber(ARGV[a + 1])
  a = a + 2
  local admitted, tokens = take_one(KEYS[pk], rate, burst, now)
  if not admitted then
    pstatus, pwait = 1, tostring((1 - tokens) / rate)
  end
end
if pstatus == 0 and ptok == 1 then
  pk = pk + 1
  local limit = tonumber(ARGV[a])
  local rate = tonumber(ARGV[a + 1])
  local amount = math.min(tonumber(ARGV[a + 2]), limit)
  local tokens = level(KEYS[pk], limit, rate, now)
  if tokens < amount - 1e-9 then
    pstatus, pwait = 3, tostring((amount - tokens) / rate)
  else
    tokens = tokens - amount
    redis.call('HSET', KEYS[pk], 't', tostring(tokens), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[pk], math.ceil((limit - tokens) / rate * 1000) + 1000)
    pleft = tostring(tokens)
  end
end
out[#out + 1] = pstatus
out[#out + 1] = pwait
out[#out + 1] = pleft
return out
"""
)

# Settlements and refunds, batched (never on a request's path). KEYS: token buckets, then
# budget counters; ARGV[1]: the number of token buckets, then (limit, rate, amount) per bucket
# (amount added, at most up to the limit; negative: charge), then (amount, ttl ms) per budget
# (added to the counter of the reservation's window).
_SETTLE_LUA = (
    _LEVEL_LUA
    + """
local ntok = tonumber(ARGV[1])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local a = 2
for i = 1, ntok do
  local limit = tonumber(ARGV[a])
  local rate = tonumber(ARGV[a + 1])
  local amount = tonumber(ARGV[a + 2])
  a = a + 3
  local tokens = math.min(limit, level(KEYS[i], limit, rate, now) + amount)
  redis.call('HSET', KEYS[i], 't', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((limit - tokens) / rate * 1000) + 1000)
end
for i = ntok + 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[a])
  local ttl = tonumber(ARGV[a + 1])
  if ttl > 0 and redis.call('PTTL', KEYS[i]) < 0 then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  a = a + 2
end
return #KEYS
"""
)

# Give leases back: KEYS[i] holds lease ARGV[i].
_RELEASE_LUA = """
for i, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[i])
end
return #KEYS
"""

# Push the expiry of live leases forward. KEYS[i] holds lease ARGV[i + 1]; ARGV[1]: lease ms.
# XX: a lease already purged (Redis was away for longer than a lease) is not resurrected.
_RENEW_LUA = """
local lease_ms = tonumber(ARGV[1])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease_ms, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease_ms + 1000)
end
return #KEYS
"""

_REDIS_ERRORS = (coredis.exceptions.RedisError, OSError)


class SharedLimitsUnavailable(Exception):
    """Redis did not answer in time (or at all); the caller applies its local limit."""


@attrs.define(eq=False)
class _Lease:
    redis_key: str
    lease_id: str


class SharedPermit:
    """Shared concurrency slots (one or more leases) and the local permits taken with them.

    :meth:`release` gives them all back in one Redis call; it is idempotent, shielded and
    bounded, so every exit path (including a cancelled one) may await it. A release that
    cannot reach Redis leaves the leases to expire.
    """

    __slots__ = ("_leases", "_local", "_owner")

    def __init__(
        self, owner: SharedLimits, leases: list[_Lease], local: Sequence[Permit] = ()
    ) -> None:
        self._owner: SharedLimits | None = owner
        self._leases = leases
        self._local = local

    async def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            for permit in self._local:
                permit.release()
            await owner._release(self._leases)

    def release_soon(self) -> None:
        """Like :meth:`release`, but the leases are given back by a background task, batched
        with others (the request's exit does not wait for Redis; the slots stay taken a
        moment longer, which can only refuse, never over-admit)."""
        owner, self._owner = self._owner, None
        if owner is not None:
            for permit in self._local:
                permit.release()
            for lease in self._leases:
                owner._live.pop(lease.lease_id, None)
            if self._leases:
                owner._orphan(self._leases)


class SharedTokenReservation:
    """Tokens reserved in a shared bucket; settled or refunded exactly once, in the background
    (the adjustment is queued, and a task sends the queued ones in one Redis call)."""

    __slots__ = ("_owner", "amount", "key", "limit", "rate")

    def __init__(self, owner: SharedLimits, key: str, limit: TokenLimit, amount: float) -> None:
        self._owner: SharedLimits | None = owner
        self.key = key
        self.limit = limit.limit
        self.rate = limit.rate
        self.amount = amount

    def settle(self, used: int) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._adjust((self.key, self.limit, self.rate, self.amount - used))

    def refund(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._adjust((self.key, self.limit, self.rate, self.amount))


class SharedBudgetReservation:
    """An estimate added to a shared budget counter (the key of the window it was admitted
    in); settled or refunded exactly once, in the background like token settlements."""

    __slots__ = ("_owner", "amount", "key", "ttl_ms")

    def __init__(self, owner: SharedLimits, key: str, amount: int, ttl_ms: int) -> None:
        self._owner: SharedLimits | None = owner
        self.key = key
        self.amount = amount
        self.ttl_ms = ttl_ms

    def settle(self, cost: int) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._adjust((self.key, None, self.ttl_ms, cost - self.amount))

    def refund(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._adjust((self.key, None, self.ttl_ms, -self.amount))


# (Redis key, limit, rate, amount) of a token bucket; (Redis key, None, ttl ms, amount) of a
# budget counter.
_Adjustment = tuple[str, int | None, float, float]
Refusal = Literal["rate", "concurrency", "tokens", "budget"]
# A chosen provider's checks: (scope, rate limit, token limit, token estimate).
ProviderCheck = tuple[str, TokenBucket | None, TokenLimit | None, int]


@attrs.frozen
class Admission:
    """The outcome of :meth:`SharedLimits.admit`: admitted with ``permit`` (``None`` when no
    slot was asked for), the token and budget reservations and what each limit has left; or
    ``refused`` by the limit at ``index`` of its kind (``retry_after`` for a rate or token
    limit; ``used`` for a budget: its window's spend, estimates in flight included)."""

    refused: Refusal | None = None
    index: int = 0
    retry_after: float | None = None
    permit: SharedPermit | None = None
    tokens: list[TokenReservation | SharedTokenReservation] = attrs.field(factory=list)
    tokens_left: list[float] = attrs.field(factory=list)
    budgets: list[BudgetReservation | SharedBudgetReservation] = attrs.field(factory=list)
    budgets_used: list[int] = attrs.field(factory=list)
    # The chosen provider's rate and token limit (refuse that provider, not the request).
    provider_refused: Literal["rate", "tokens"] | None = None
    provider_wait: float | None = None
    provider_tokens: TokenReservation | SharedTokenReservation | None = None


class SharedLimits:
    """Redis-backed limits for one gateway. :meth:`run` owns the Redis client (start it in the
    gateway's service nursery with ``nursery.start``); the other methods may be called from
    any task, and fail over to local limits while the client is not open."""

    def __init__(self, spec: SharedLimitsSpec, *, replica: str | None = None) -> None:
        self.spec = spec
        self.prefix = spec.key_prefix
        self.timeout = spec.timeout_ms / 1000.0
        self.lease_ms = max(1, int(spec.lease_secs * 1000))
        self.replica = replica or secrets.token_hex(6)
        self._client: Any = None  # coredis.Redis[bytes] while open
        self._scripts: dict[str, Any] = {}
        self._live: dict[str, _Lease] = {}  # lease id → lease, renewed while held
        # Leases whose acquire was cut short (timeout, cancellation): Redis may have taken
        # them anyway, so they are removed in the background instead of waiting to expire.
        self._orphans, self._orphans_in = trio.open_memory_channel[list[_Lease]](65536)
        # Token and budget settlements waiting to be sent, batched by a task.
        self._adjustments, self._adjustments_in = trio.open_memory_channel[_Adjustment](65536)
        self.unsent_adjustments = 0  # queued, not yet answered by Redis (tests wait for 0)
        self._last_warning: float | None = None
        self._paused_until = 0.0
        self.fallbacks = 0  # requests that fell back to local limits (for tests and metrics)
        self.calls: dict[str, int] = {}  # Redis script calls made, by script (tests, bench)

    # -- lifecycle --------------------------------------------------------------------------

    def _new_client(self) -> Any:
        # No retries inside coredis: our own deadline (timeout_ms) is the whole budget.
        return coredis.Redis.from_url(
            self.spec.redis_url,
            decode_responses=False,
            connect_timeout=self.timeout,
            stream_timeout=self.timeout,
            retry_policy=coredis.retry.NoRetryPolicy(),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the client and keep held leases alive until cancelled.

        The client lives in this task, so a failure inside it can only end this task's use of
        Redis (it is replaced after a pause), never the gateway around it.
        """
        started = False
        while True:
            try:
                client = self._new_client()
                async with client:
                    self._client = client
                    self._scripts = {
                        "gate": client.register_script(_GATE_LUA),
                        "release": client.register_script(_RELEASE_LUA),
                        "renew": client.register_script(_RENEW_LUA),
                        "settle": client.register_script(_SETTLE_LUA),
                    }
                    if not started:
                        started = True
                        task_status.started()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._reap_forever)
                        nursery.start_soon(self._adjust_forever)
                        await self._renew_forever()
            except Exception as exc:  # the gateway must outlive Redis
                self._warn(exc)
            finally:
                self._client = None
            if not started:
                started = True
                task_status.started()
            await trio.sleep(_REOPEN_DELAY)

    async def _renew_forever(self) -> None:
        interval = self.lease_ms / 3000.0
        while True:
            await trio.sleep(interval)
            leases = list(self._live.values())
            if not leases:
                continue
            # On failure (already logged) the leases may lapse, which only frees capacity.
            with contextlib.suppress(SharedLimitsUnavailable):
                await self._call(
                    "renew",
                    [lease.redis_key for lease in leases],
                    [self.lease_ms, *(lease.lease_id for lease in leases)],
                    budget=max(self.timeout, 1.0),
                )

    async def _reap_forever(self) -> None:
        """Give back released and orphaned leases, all that are waiting in one call."""
        async for leases in self._orphans_in:
            batch = list(leases)
            while len(batch) < 512:
                try:
                    batch += self._orphans_in.receive_nowait()
                except trio.WouldBlock:
                    break
            await self._give_back(batch)

    def _adjust(self, item: _Adjustment) -> None:
        if not item[3]:
            return
        try:
            self._adjustments.send_nowait(item)
            self.unsent_adjustments += 1
        except trio.WouldBlock:  # Redis far behind: the estimate stands (conservative)
            pass

    async def _adjust_forever(self) -> None:
        """Send queued settlements, all that are waiting in one call (off the hot path: a
        settlement never delays the answer it settles)."""
        async for first in self._adjustments_in:
            batch = [first]
            while len(batch) < 512:
                try:
                    batch.append(self._adjustments_in.receive_nowait())
                except trio.WouldBlock:
                    break
            tokens = [item for item in batch if item[1] is not None]
            budgets = [item for item in batch if item[1] is None]
            args: list[Any] = [len(tokens)]
            for _, limit, rate, amount in tokens:
                args += (limit, repr(rate), repr(amount))
            for _, _, ttl_ms, amount in budgets:
                args += (int(amount), int(ttl_ms))
            keys = [item[0] for item in tokens] + [item[0] for item in budgets]
            # A failed send loses these corrections (logged); the buckets refill regardless.
            with contextlib.suppress(SharedLimitsUnavailable):
                await self._call("settle", keys, args, budget=max(self.timeout, 1.0))
            self.unsent_adjustments -= len(batch)

    async def reserve_tokens(
        self, buckets: Sequence[tuple[str, TokenLimit, int]]
    ) -> tuple[list[TokenReservation | SharedTokenReservation], list[float]] | tuple[int, float]:
        """Reserve ``(scope, limit, estimate)`` in every bucket or none, in one Redis call:
        (reservations, remaining per bucket), or (index refused, seconds to wait). While
        Redis is unavailable, the in-process twins decide."""
        got = await self.admit((), (), buckets)
        if got.refused is not None:
            return got.index, got.retry_after or 0.0
        return got.tokens, got.tokens_left

    def _orphan(self, leases: list[_Lease]) -> None:
        with contextlib.suppress(trio.WouldBlock):  # else the leases expire on their own
            self._orphans.send_nowait(leases)

    # -- Redis calls --------------------------------------------------------------------------

    def _key(self, kind: str, scope: str) -> str:
        return f"{self.prefix}:{kind}:{scope}"

    def _warn(self, exc: BaseException | None) -> None:
        now = trio.current_time()
        if self._last_warning is None or now - self._last_warning >= _LOG_EVERY:
            self._last_warning = now
            why = type(exc).__name__ if exc is not None else "timeout"
            log.warning(
                "shared limits: Redis unavailable (%s); using in-process limits meanwhile", why
            )

    async def _call(
        self, script: str, keys: list[str], args: list[Any], budget: float | None = None
    ) -> Any:
        client = self._client
        if client is None:
            self._warn(None)
            raise SharedLimitsUnavailable("not connected")
        if self._paused_until and trio.current_time() < self._paused_until:
            raise SharedLimitsUnavailable("paused after a failure")
        self.calls[script] = self.calls.get(script, 0) + 1
        with trio.move_on_after(self.timeout if budget is None else budget):
            try:
                reply = await self._scripts[script](keys=keys, args=args, client=client)
            except _REDIS_ERRORS as exc:
                self._failed(exc)
                raise SharedLimitsUnavailable(type(exc).__name__) from None
            self._paused_until = 0.0
            return reply
        self._failed(None)
        raise SharedLimitsUnavailable("timeout")

    def _failed(self, exc: BaseException | None) -> None:
        self._paused_until = trio.current_time() + _PAUSE_AFTER_FAILURE
        self._warn(exc)

    def _budget_key(self, scope: str, budget: Budget) -> tuple[str, int]:
        """The Redis counter of ``budget``'s current window, and how long it must live: a day
        past the window's end (late settlements still find it); a ``total`` one forever."""
        window_id, reset = budget.current()
        ttl_ms = 0 if reset is None else int(reset * 1000) + 86_400_000
        return self._key("budget", f"{scope}:{window_id}"), ttl_ms

    async def _gate(
        self,
        rates: Sequence[tuple[str, float, int]],
        slots: Sequence[tuple[str, int]],
        tokens: Sequence[tuple[str, TokenLimit, int]],
        budgets: Sequence[tuple[str, Budget, int]],
        provider: ProviderCheck | None = None,
    ) -> Admission:
        """One atomic admission in Redis (the script above); local permits are not its
        business."""
        leases = [
            _Lease(self._key("conc", scope), f"{self.replica}:{secrets.token_hex(8)}")
            for scope, _ in slots
        ]
        token_keys = [self._key("tokens", scope) for scope, _, _ in tokens]
        budget_keys = [self._budget_key(scope, budget) for scope, budget, _ in budgets]
        keys = [self._key("rate", scope) for scope, _, _ in rates]
        keys += [lease.redis_key for lease in leases]
        keys += token_keys
        keys += [key for key, _ in budget_keys]
        p_scope, p_rate, p_tokens, p_estimate = provider or ("", None, None, 0)
        if p_rate is not None:
            keys.append(self._key("rate", p_scope))
        if p_tokens is not None:
            keys.append(self._key("tokens", p_scope))
        args: list[Any] = [len(rates), len(slots), len(tokens), len(budgets), self.lease_ms]
        args += (int(p_rate is not None), int(p_tokens is not None))
        for _, rate, burst in rates:
            args += (repr(rate), burst)
        for (_, most), lease in zip(slots, leases, strict=True):
            args += (most, lease.lease_id)
        for _, limit, estimate in tokens:
            args += (limit.limit, repr(limit.rate), max(estimate, 0))
        for (_, budget, estimate), (_, ttl_ms) in zip(budgets, budget_keys, strict=True):
            args += (budget.amount, max(estimate, 0), ttl_ms)
        if p_rate is not None:
            args += (repr(p_rate.rate), p_rate.burst)
        if p_tokens is not None:
            args += (p_tokens.limit, repr(p_tokens.rate), max(p_estimate, 0))
        try:
            reply = await self._call("gate", keys, args)
        except BaseException:  # timed out or cancelled: the script may have run all the same
            if leases:
                self._orphan(leases)
            raise
        code = int(reply[0])
        if code == 1:
            return Admission("rate", int(reply[1]) - 1, float(reply[2]))
        if code == 2:
            return Admission("concurrency", int(reply[1]) - 1)
        if code == 3:
            return Admission("tokens", int(reply[1]) - 1, float(reply[2]))
        if code == 4:
            return Admission("budget", int(reply[1]) - 1, budgets_used=[int(float(reply[2]))])
        for lease in leases:
            self._live[lease.lease_id] = lease
        n, nb = len(tokens), len(budgets)
        p_status = int(reply[n + nb + 1])
        p_held: SharedTokenReservation | None = None
        if p_tokens is not None and p_status == 0:
            amount = float(min(max(p_estimate, 0), p_tokens.limit))
            p_held = SharedTokenReservation(self, keys[-1], p_tokens, amount)
        return Admission(
            provider_refused="rate" if p_status == 1 else "tokens" if p_status == 3 else None,
            provider_wait=float(reply[n + nb + 2]) if p_status else None,
            provider_tokens=p_held,
            permit=SharedPermit(self, leases) if leases else None,
            tokens=[
                SharedTokenReservation(self, key, limit, float(min(max(estimate, 0), limit.limit)))
                for key, (_, limit, estimate) in zip(token_keys, tokens, strict=True)
            ],
            tokens_left=[float(x) for x in reply[1 : n + 1]],
            budgets=[
                SharedBudgetReservation(self, key, max(estimate, 0), ttl_ms)
                for (key, ttl_ms), (_, _, estimate) in zip(budget_keys, budgets, strict=True)
            ],
            budgets_used=[int(x) for x in reply[n + 1 : n + nb + 1]],
        )

    async def _admit(
        self, rates: Sequence[tuple[str, float, int]], slots: Sequence[tuple[str, int]]
    ) -> tuple[Literal["rate", "concurrency"] | None, int, float | None, list[_Lease]]:
        """Rate limits and slots only: (refused, index, retry after, leases taken)."""
        got = await self._gate(rates, slots, (), ())
        if got.refused == "rate" or got.refused == "concurrency":
            return got.refused, got.index, got.retry_after, []
        return None, 0, None, got.permit._leases if got.permit is not None else []

    async def acquire_rate(self, scope: str, rate: float, burst: int) -> float | None:
        """Take a token from the shared bucket ``scope``: ``None``, or seconds to wait."""
        _, _, wait, _ = await self._admit([(scope, rate, burst)], ())
        return wait

    async def acquire_slot(self, scope: str, limit: int) -> SharedPermit | None:
        """Take one of ``limit`` shared slots of ``scope``, or ``None`` when all are taken."""
        refused, _, _, leases = await self._admit((), [(scope, limit)])
        return None if refused else SharedPermit(self, leases)

    async def _release(self, leases: list[_Lease]) -> None:
        for lease in leases:
            self._live.pop(lease.lease_id, None)
        with trio.CancelScope(shield=True):
            await self._give_back(leases)

    async def _give_back(self, leases: list[_Lease]) -> None:
        client = self._client
        if client is None or not leases:
            return  # the leases expire on their own
        self.calls["release"] = self.calls.get("release", 0) + 1
        with trio.move_on_after(max(self.timeout, 0.25)):
            try:
                await self._scripts["release"](
                    keys=[lease.redis_key for lease in leases],
                    args=[lease.lease_id for lease in leases],
                    client=client,
                )
            except _REDIS_ERRORS as exc:
                self._warn(exc)

    # -- with local fallback (what the proxy calls) -----------------------------------------

    async def admit(
        self,
        rates: Sequence[tuple[str, TokenBucket]],
        slots: Sequence[tuple[str, ConcurrencyLimit]],
        tokens: Sequence[tuple[str, TokenLimit, int]] = (),
        budgets: Sequence[tuple[str, Budget, int]] = (),
        provider: ProviderCheck | None = None,
    ) -> Admission:
        """Every check of a request in one Redis call: rate limits in order, concurrency slots
        in order, then ``(scope, limit, estimate)`` token reservations and ``(scope, budget,
        estimate)`` budget reservations, all or none; then, if the request passed, the chosen
        ``provider``'s rate and token limit, which can refuse only that provider.

        Each limit is shared under its scope with the parameters of its in-process twin, and
        the twins decide while Redis is unavailable. The local concurrency permits are always
        taken too (they keep in-flight counts, balancing and metrics true); they never refuse
        what Redis admits, because this replica's in-flight requests are part of the shared
        count. A refused admission holds nothing (but the rate tokens taken before it).
        """
        local: list[Permit] = []
        full: int | None = None
        for i, (_, limit) in enumerate(slots):
            permit = limit.try_acquire()
            if permit is None:
                full = i
                break
            local.append(permit)
        # A locally full slot still lets the rate limits go first, as in-process.
        shared_slots = [
            (scope, lim.limit) for scope, lim in slots if lim.limit is not None and full is None
        ]
        if full is not None:
            tokens, budgets, provider = (), (), None
        try:
            if rates or shared_slots or tokens or budgets or provider:
                got = await self._gate(
                    [(scope, bucket.rate, bucket.burst) for scope, bucket in rates],
                    shared_slots,
                    tokens,
                    budgets,
                    provider,
                )
            else:
                got = Admission()
        except SharedLimitsUnavailable:
            self.fallbacks += 1
            got = _locally(rates, tokens, budgets, provider)
        except BaseException:
            for permit in local:
                permit.release()
            raise
        if got.refused is None and full is not None:
            got = Admission("concurrency", full)
        elif got.refused == "concurrency" and full is None:
            # Redis numbered only the limited slots: map back to the caller's index.
            limited = [i for i, (_, lim) in enumerate(slots) if lim.limit is not None]
            got = Admission("concurrency", limited[got.index])
        if got.refused is not None:
            for permit in local:
                permit.release()
            return got
        if local:
            leases = got.permit._leases if got.permit is not None else []
            got = attrs.evolve(got, permit=SharedPermit(self, leases, local))
        return got

    async def rate(self, scope: str, bucket: TokenBucket) -> float | None:
        """One shared rate limit (``bucket`` while Redis is unavailable): ``None`` or the
        seconds to wait."""
        admission = await self.admit([(scope, bucket)], ())
        return admission.retry_after if admission.refused else None

    async def provider_slot(self, scope: str, limit: int) -> SharedPermit | bool | None:
        """The shared slot of a provider whose local permit is already held: the permit,
        ``None`` when full, or ``True`` when Redis is unavailable (the local permit rules)."""
        try:
            return await self.acquire_slot(scope, limit)
        except SharedLimitsUnavailable:
            self.fallbacks += 1
            return True


def _locally(
    rates: Sequence[tuple[str, TokenBucket]],
    tokens: Sequence[tuple[str, TokenLimit, int]],
    budgets: Sequence[tuple[str, Budget, int]],
    provider: ProviderCheck | None = None,
) -> Admission:
    """:meth:`SharedLimits.admit` by the in-process twins (Redis unavailable)."""
    for i, (_, bucket) in enumerate(rates):
        wait = bucket.try_acquire()
        if wait is not None:
            return Admission("rate", i, wait)
    taken: list[TokenReservation | SharedTokenReservation] = []
    for i, (_, limit, estimate) in enumerate(tokens):
        got = limit.reserve(estimate)
        if not isinstance(got, TokenReservation):
            for r in taken:
                r.refund()
            return Admission("tokens", i, got)
        taken.append(got)
    spent: list[BudgetReservation | SharedBudgetReservation] = []
    for i, (_, budget, estimate) in enumerate(budgets):
        held = budget.reserve(estimate)
        if held is None:
            for r in taken:
                r.refund()
            for b in spent:
                b.refund()
            return Admission("budget", i, budgets_used=[budget.amount - budget.remaining])
        spent.append(held)
    admitted = Admission(
        tokens=taken,
        tokens_left=[float(limit.remaining) for _, limit, _ in tokens],
        budgets=spent,
        budgets_used=[budget.amount - budget.remaining for _, budget, _ in budgets],
    )
    if provider is None:
        return admitted
    _, p_rate, p_tokens, estimate = provider
    wait = p_rate.try_acquire() if p_rate is not None else None
    if wait is not None:
        return attrs.evolve(admitted, provider_refused="rate", provider_wait=wait)
    if p_tokens is None:
        return admitted
    got = p_tokens.reserve(estimate)
    if not isinstance(got, TokenReservation):
        return attrs.evolve(admitted, provider_refused="tokens", provider_wait=got)
    return attrs.evolve(admitted, provider_tokens=got)
