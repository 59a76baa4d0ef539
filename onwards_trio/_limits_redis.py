"""Rate and concurrency limits shared by many gateway replicas through Redis (SPEC §3.6).

Each limit is one Lua script, so a check-and-take is atomic across replicas, and every script
reads Redis' own clock (``TIME``), so replicas with skewed clocks still agree. Concurrency slots
are *leases*: members of a sorted set scored by their expiry. A replica renews the leases it
holds; one that dies stops renewing, and its slots are purged by the next acquire once they
expire, so a crash cannot leak capacity for longer than ``lease_secs``.

Failure policy: every Redis call is bounded by ``timeout_ms``. A call that fails or times out
raises :class:`SharedLimitsUnavailable`; :meth:`SharedLimits.rate` and :meth:`SharedLimits.slot`
catch it and apply the in-process limiter instead (fail open to local limits, never hang,
never 500), logging at most once a minute. Redis keys never contain a raw client key, and the
Redis URL (which may hold a password) is never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
from typing import Any

import attrs
import coredis
import coredis.exceptions
import coredis.retry
import trio

from ._config import SharedLimitsSpec
from ._limits import ConcurrencyLimit, Permit, TokenBucket

__all__ = [
    "SharedLimits",
    "SharedLimitsUnavailable",
    "SharedPermit",
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

# A token bucket that starts full, the same semantics as the in-process TokenBucket. The state
# is a hash {t: tokens, ts: seconds}; an absent key is a full bucket, so the key may expire
# once the bucket would have refilled. Returns nil (admitted) or the seconds until one token
# is there, as a string (Lua numbers become integers in a Redis reply).
_RATE_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
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
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
if admitted then
  return false
end
return tostring((1 - tokens) / rate)
"""

# Take one of ``limit`` slots: purge expired leases, then add ours if there is room.
# ARGV: limit, lease id, lease milliseconds. Returns 1 (taken) or 0 (full).
_ACQUIRE_LUA = """
local limit = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease_ms, ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease_ms + 1000)
return 1
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


def pool_scope(alias: str) -> str:
    return f"pool:{alias}"


def key_scope(token: str) -> str:
    """A client key's scope: a hash prefix, so the key itself never reaches Redis."""
    return "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def provider_scope(alias: str, index: int) -> str:
    return f"provider:{alias}:{index}"


@attrs.define(eq=False)
class _Lease:
    redis_key: str
    lease_id: str


class SharedPermit:
    """One shared concurrency slot. :meth:`release` is idempotent, shielded and bounded, so
    every exit path (including a cancelled one) may await it; a release that cannot reach
    Redis leaves the lease to expire."""

    __slots__ = ("_lease", "_owner")

    def __init__(self, owner: SharedLimits, lease: _Lease) -> None:
        self._owner: SharedLimits | None = owner
        self._lease = lease

    @property
    def lease_id(self) -> str:
        return self._lease.lease_id

    async def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            await owner._release(self._lease)


class _BothPermit:
    """A local permit together with its shared slot, released as one (async)."""

    __slots__ = ("local", "shared")

    def __init__(self, local: Permit, shared: SharedPermit | None) -> None:
        self.local = local
        self.shared = shared

    async def release(self) -> None:
        self.local.release()
        if self.shared is not None:
            shared, self.shared = self.shared, None
            await shared.release()


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
        self._orphans, self._orphans_in = trio.open_memory_channel[_Lease](1024)
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
                        "rate": client.register_script(_RATE_LUA),
                        "acquire": client.register_script(_ACQUIRE_LUA),
                        "renew": client.register_script(_RENEW_LUA),
                    }
                    if not started:
                        started = True
                        task_status.started()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._reap_forever)
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
        async for lease in self._orphans_in:
            await self._zrem(lease)

    def _orphan(self, lease: _Lease) -> None:
        with contextlib.suppress(trio.WouldBlock):  # else the lease expires on its own
            self._orphans.send_nowait(lease)

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

    async def acquire_rate(self, scope: str, rate: float, burst: int) -> float | None:
        """Take a token from the shared bucket ``scope``: ``None``, or seconds to wait."""
        reply = await self._call("rate", [self._key("rate", scope)], [repr(rate), burst])
        if reply is None:
            return None
        return float(reply)

    async def acquire_slot(self, scope: str, limit: int) -> SharedPermit | None:
        """Take one of ``limit`` shared slots of ``scope``, or ``None`` when all are taken."""
        lease = _Lease(self._key("conc", scope), f"{self.replica}:{secrets.token_hex(8)}")
        try:
            taken = await self._call(
                "acquire", [lease.redis_key], [limit, lease.lease_id, self.lease_ms]
            )
        except BaseException:  # timed out or cancelled: the script may have run all the same
            self._orphan(lease)
            raise
        if not taken:
            return None
        self._live[lease.lease_id] = lease
        return SharedPermit(self, lease)

    async def _release(self, lease: _Lease) -> None:
        self._live.pop(lease.lease_id, None)
        with trio.CancelScope(shield=True):
            await self._zrem(lease)

    async def _zrem(self, lease: _Lease) -> None:
        client = self._client
        if client is None:
            return  # the lease expires on its own
        with trio.move_on_after(max(self.timeout, 0.25)):
            try:
                await client.zrem(lease.redis_key, [lease.lease_id])
            except _REDIS_ERRORS as exc:
                self._warn(exc)

    # -- with local fallback (what the proxy calls) -----------------------------------------

    async def rate(self, scope: str, bucket: TokenBucket) -> float | None:
        """The shared bucket for ``scope`` (same rate and burst as ``bucket``), or ``bucket``
        itself while Redis is unavailable."""
        try:
            return await self.acquire_rate(scope, bucket.rate, bucket.burst)
        except SharedLimitsUnavailable:
            self.fallbacks += 1
            return bucket.try_acquire()

    async def slot(self, scope: str, limit: ConcurrencyLimit) -> _BothPermit | None:
        """The local permit of ``limit`` plus a shared slot, or ``None`` if either is full.

        The local permit is always taken (it keeps in-flight counts and metrics true, and it
        is the limit while Redis is unavailable); it never refuses what Redis admits, because
        this replica's in-flight count is part of the shared one.
        """
        local = limit.try_acquire()
        if local is None:
            return None
        if limit.limit is None:
            return _BothPermit(local, None)
        try:
            shared = await self.acquire_slot(scope, limit.limit)
        except SharedLimitsUnavailable:
            self.fallbacks += 1
            return _BothPermit(local, None)
        except BaseException:
            local.release()
            raise
        if shared is None:
            local.release()
            return None
        return _BothPermit(local, shared)

    async def provider_slot(self, scope: str, limit: int) -> SharedPermit | bool | None:
        """The shared slot of a provider whose local permit is already held: the permit,
        ``None`` when full, or ``True`` when Redis is unavailable (the local permit rules)."""
        try:
            return await self.acquire_slot(scope, limit)
        except SharedLimitsUnavailable:
            self.fallbacks += 1
            return True
