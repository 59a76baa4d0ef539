"""Rate and concurrency limits shared by many gateway replicas through Redis (SPEC §3.6).

A request's admission is one Lua script (pool and key rate limits, then pool and key slots),
so check-and-take is atomic across replicas and costs one round trip; the script reads
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
from onwards_trio._proxy.limits import (
    ConcurrencyLimit,
    Permit,
    TokenBucket,
    TokenLimit,
    TokenReservation,
)

__all__ = [
    "Admission",
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

# One admission, atomically: rate buckets in order, then concurrency slots in order.
#
# KEYS: the rate buckets, then the slot sets. ARGV: number of buckets, lease ms, then
# (rate, burst) per bucket, then (limit, lease id) per slot.
#
# A bucket starts full (the in-process TokenBucket's rule): a hash {t: tokens, ts: seconds};
# a missing key is a full bucket, so the key may expire once it would have refilled. A slot
# set holds lease ids scored by expiry (ms); expired ones are purged before counting, which is
# what frees the slots of a replica that died.
#
# Returns {0} when admitted; {1, i, wait} when bucket i refused (wait in seconds, a string:
# Lua numbers become integers in a reply); {2, j} when slot j was full. As in-process, tokens
# of buckets before a refusal stay taken; slots taken before a full one are given back.
_ADMIT_LUA = """
local nrate = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local a = 3
for i = 1, nrate do
  local rate = tonumber(ARGV[a])
  local burst = tonumber(ARGV[a + 1])
  a = a + 2
  local state = redis.call('HMGET', KEYS[i], 't', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  end
  if now > ts then
    tokens = math.min(burst, tokens + (now - ts) * rate)
    ts = now
  end
  local admitted = tokens >= 1 - 1e-9
  if admitted then
    tokens = math.max(0, tokens - 1)
  end
  redis.call('HSET', KEYS[i], 't', tostring(tokens), 'ts', tostring(ts))
  redis.call('PEXPIRE', KEYS[i], math.ceil((burst - tokens) / rate * 1000) + 1000)
  if not admitted then
    return {1, i, tostring((1 - tokens) / rate)}
  end
end
local first = a
for j = nrate + 1, #KEYS do
  local limit = tonumber(ARGV[a])
  local lease = ARGV[a + 1]
  a = a + 2
  redis.call('ZREMRANGEBYSCORE', KEYS[j], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[j]) >= limit then
    for k = nrate + 1, j - 1 do
      redis.call('ZREM', KEYS[k], ARGV[first + (k - nrate - 1) * 2 + 1])
    end
    return {2, j - nrate}
  end
  redis.call('ZADD', KEYS[j], now_ms + lease_ms, lease)
  redis.call('PEXPIRE', KEYS[j], lease_ms + 1000)
end
return {0}
"""

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

# Token limits (TokenLimit's rule, in Redis): a hash {t: tokens, ts: seconds} per bucket,
# refilled at ARGV rate up to its limit; a missing key is a full bucket. ARGV[1] is the mode,
# then (limit, rate, amount) per bucket.
#   reserve: take ``amount`` (capped at the limit) from every bucket, or from none: {1, i, wait}
#            when bucket i has too little; else {0, remaining...} (strings: Lua numbers
#            become integers in a reply).
#   adjust:  add ``amount`` (negative: charge) to every bucket, at most up to its limit.
_TOKENS_LUA = """
local reserve = ARGV[1] == 'reserve'
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[i * 3 - 1])
  local rate = tonumber(ARGV[i * 3])
  local amount = tonumber(ARGV[i * 3 + 1])
  local got = redis.call('HMGET', KEYS[i], 't', 'ts')
  local tokens = tonumber(got[1])
  local ts = tonumber(got[2])
  if tokens == nil or ts == nil then
    tokens = limit
    ts = now
  end
  if now > ts then
    tokens = math.min(limit, tokens + (now - ts) * rate)
  end
  if reserve then
    amount = math.min(amount, limit)
    if tokens < amount - 1e-9 then
      return {1, i, tostring((amount - tokens) / rate)}
    end
    tokens = tokens - amount
  else
    tokens = math.min(limit, tokens + amount)
  end
  state[i] = {limit, rate, tokens}
end
local out = {0}
for i = 1, #KEYS do
  local limit, rate, tokens = state[i][1], state[i][2], state[i][3]
  redis.call('HSET', KEYS[i], 't', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((limit - tokens) / rate * 1000) + 1000)
  out[i + 1] = tostring(tokens)
end
return out
"""

_REDIS_ERRORS = (coredis.exceptions.RedisError, OSError)


class SharedLimitsUnavailable(Exception):
    """Redis did not answer in time (or at all); the caller applies its local limit."""


def pool_scope(alias: str) -> str:
    return f"pool:{alias}"


def key_scope(ident: str) -> str:
    """A client key's scope from its identity (``sha256:<hex>``, see auth.key_id): a hash
    prefix, so the key itself never reaches Redis."""
    return "key:" + ident[7:23]


def provider_scope(alias: str, index: int) -> str:
    return f"provider:{alias}:{index}"


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
            owner._adjust(self, self.amount - used)

    def refund(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._adjust(self, self.amount)


@attrs.frozen
class Admission:
    """The outcome of :meth:`SharedLimits.admit`: admitted with ``permit`` (``None`` when no
    slot was asked for), or ``refused`` by the rate limit or concurrency slot at ``index``."""

    refused: Literal["rate", "concurrency"] | None = None
    index: int = 0
    retry_after: float | None = None
    permit: SharedPermit | None = None


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
        self._orphans, self._orphans_in = trio.open_memory_channel[list[_Lease]](1024)
        # Token settlements waiting to be sent (key, limit, rate, amount), batched by a task.
        self._adjustments, self._adjustments_in = trio.open_memory_channel[
            tuple[str, int, float, float]
        ](65536)
        self.unsent_adjustments = 0  # queued, not yet answered by Redis (tests wait for 0)
        self._last_warning: float | None = None
        self._paused_until = 0.0
        self.fallbacks = 0  # requests that fell back to local limits (for tests and metrics)

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
                        "admit": client.register_script(_ADMIT_LUA),
                        "release": client.register_script(_RELEASE_LUA),
                        "renew": client.register_script(_RENEW_LUA),
                        "tokens": client.register_script(_TOKENS_LUA),
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
        async for leases in self._orphans_in:
            await self._give_back(leases)

    def _adjust(self, reservation: SharedTokenReservation, amount: float) -> None:
        if not amount:
            return
        item = (reservation.key, reservation.limit, reservation.rate, amount)
        try:
            self._adjustments.send_nowait(item)
            self.unsent_adjustments += 1
        except trio.WouldBlock:  # Redis far behind: the estimate stands (conservative)
            pass

    async def _adjust_forever(self) -> None:
        """Send queued token settlements, all that are waiting in one call (off the hot path:
        a settlement never delays the answer it settles)."""
        async for first in self._adjustments_in:
            batch = [first]
            while len(batch) < 512:
                try:
                    batch.append(self._adjustments_in.receive_nowait())
                except trio.WouldBlock:
                    break
            args: list[Any] = ["adjust"]
            for _, limit, rate, amount in batch:
                args += (limit, repr(rate), repr(amount))
            # A failed send loses these corrections (logged); the buckets refill regardless.
            with contextlib.suppress(SharedLimitsUnavailable):
                await self._call(
                    "tokens", [key for key, *_ in batch], args, budget=max(self.timeout, 1.0)
                )
            self.unsent_adjustments -= len(batch)

    async def reserve_tokens(
        self, buckets: Sequence[tuple[str, TokenLimit, int]]
    ) -> tuple[list[TokenReservation | SharedTokenReservation], list[float]] | tuple[int, float]:
        """Reserve ``(scope, limit, estimate)`` in every bucket or none, in one Redis call:
        (reservations, remaining per bucket), or (index refused, seconds to wait). While
        Redis is unavailable, the in-process twins decide."""
        keys = [self._key("tokens", scope) for scope, _, _ in buckets]
        args: list[Any] = ["reserve"]
        for _, limit, estimate in buckets:
            args += (limit.limit, repr(limit.rate), max(estimate, 0))
        try:
            reply = await self._call("tokens", keys, args)
        except SharedLimitsUnavailable:
            self.fallbacks += 1
            taken: list[TokenReservation | SharedTokenReservation] = []
            for i, (_, limit, estimate) in enumerate(buckets):
                got = limit.reserve(estimate)
                if not isinstance(got, TokenReservation):
                    for r in taken:
                        r.refund()
                    return i, got
                taken.append(got)
            return taken, [float(limit.remaining) for _, limit, _ in buckets]
        if int(reply[0]) == 1:
            return int(reply[1]) - 1, float(reply[2])
        reservations: list[TokenReservation | SharedTokenReservation] = [
            SharedTokenReservation(self, key, limit, float(min(max(estimate, 0), limit.limit)))
            for key, (_, limit, estimate) in zip(keys, buckets, strict=True)
        ]
        return reservations, [float(x) for x in reply[1:]]

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

    async def _admit(
        self, rates: Sequence[tuple[str, float, int]], slots: Sequence[tuple[str, int]]
    ) -> tuple[Literal["rate", "concurrency"] | None, int, float | None, list[_Lease]]:
        """One atomic admission in Redis: (refused, index, retry after, leases taken)."""
        leases = [
            _Lease(self._key("conc", scope), f"{self.replica}:{secrets.token_hex(8)}")
            for scope, _ in slots
        ]
        keys = [self._key("rate", scope) for scope, _, _ in rates]
        keys.extend(lease.redis_key for lease in leases)
        args: list[Any] = [len(rates), self.lease_ms]
        for _, rate, burst in rates:
            args += (repr(rate), burst)
        for (_, limit), lease in zip(slots, leases, strict=True):
            args += (limit, lease.lease_id)
        try:
            reply = await self._call("admit", keys, args)
        except BaseException:  # timed out or cancelled: the script may have run all the same
            if leases:
                self._orphan(leases)
            raise
        code = int(reply[0])
        if code == 1:
            return "rate", int(reply[1]) - 1, float(reply[2]), []
        if code == 2:
            return "concurrency", int(reply[1]) - 1, None, []
        for lease in leases:
            self._live[lease.lease_id] = lease
        return None, 0, None, leases

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
    ) -> Admission:
        """Rate limits in order, then concurrency slots in order, in one Redis call.

        Each limit is shared under its scope with the rate, burst and limit of its in-process
        twin, and the twin decides while Redis is unavailable. The local concurrency permits
        are always taken too (they keep in-flight counts, balancing and metrics true); they
        never refuse what Redis admits, because this replica's in-flight requests are part of
        the shared count. A refused admission holds nothing.
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
        try:
            if rates or shared_slots:
                refused, index, wait, leases = await self._admit(
                    [(scope, bucket.rate, bucket.burst) for scope, bucket in rates], shared_slots
                )
            else:
                refused, index, wait, leases = None, 0, None, []
        except SharedLimitsUnavailable:
            self.fallbacks += 1
            refused, index, wait, leases = None, 0, None, []
            for i, (_, bucket) in enumerate(rates):
                wait = bucket.try_acquire()
                if wait is not None:
                    refused, index = "rate", i
                    break
        except BaseException:
            for permit in local:
                permit.release()
            raise
        if refused is None and full is not None:
            refused, index = "concurrency", full
        if refused is not None:
            for permit in local:
                permit.release()
            if refused == "concurrency" and full is None:
                # Redis numbered only the limited slots: map back to the caller's index.
                limited = [i for i, (_, lim) in enumerate(slots) if lim.limit is not None]
                index = limited[index]
            return Admission(refused, index, wait)
        if not local and not leases:
            return Admission()
        return Admission(permit=SharedPermit(self, leases, local))

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
