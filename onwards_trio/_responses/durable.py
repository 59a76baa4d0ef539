"""Durable background responses: leases, their renewal, and recovery of responses whose owner
died (docs/responses.md, "Durable background responses").

A background response on a persistent store (SQLite, PostgreSQL) is owned by the process that
runs it: a lease row (owner id, expiry, recovery attempts, what resuming needs) written when
the response is created. One task per gateway, in the service nursery, renews all of this
process's leases in a single write every third of ``lease_secs`` and, every
``recovery_interval_secs``, claims leases that expired (their owner died, or handed them over
on shutdown) and resumes those responses from their stored steps. A process that cannot renew
for most of a lease stops its own loops without writing, before another process may claim
them: two processes never run the same response (as long as a renewal write does not take
longer than the margin, ``lease_secs / 3``).

What resuming needs is stored with the lease: the original request body, the alias, the
server tools offered, the request headers minus credentials, and (tracing on) the
``traceparent`` of the creating request, which the resumed loop's span links to. The
client's API key is not stored: the response's owner digest finds it again in the current
config.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from onwards_trio._ops.telemetry import activate, current_telemetry
from onwards_trio._stores.base import Claim, DurableStore

if TYPE_CHECKING:
    from onwards_trio._config import BackgroundSpec
    from onwards_trio._responses.service import ResponsesService

__all__ = ["Durability", "api_key_for", "resume_headers"]

log = logging.getLogger("onwards_trio.responses")

# Headers that carry credentials: never stored with a lease (the API key is found again from
# the response owner's digest).
_SECRET_HEADERS = frozenset(
    {b"authorization", b"proxy-authorization", b"cookie", b"x-api-key", b"api-key"}
)
_CLAIM_BATCH = 64  # responses claimed per recovery round
_PURGE_EVERY = 60.0  # seconds between deletions of expired idempotency records


def resume_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[list[str]]:
    """The request headers a resumed loop sends on with its model calls, without credentials."""
    return [
        [k.decode("latin-1"), v.decode("latin-1")] for k, v in headers if k not in _SECRET_HEADERS
    ]


def api_key_for(owner: str | None, keys: Iterable[str]) -> str | None:
    """The configured key whose digest is ``owner`` (``None`` if none is, any more)."""
    if owner is None:
        return None
    for key in keys:
        if hashlib.sha256(key.encode()).hexdigest() == owner:
            return key
    return None


class Durability:
    """Leases and recovery for one :class:`ResponsesService`."""

    def __init__(self, service: ResponsesService) -> None:
        self.service = service
        # Unique per process start: a restarted process on the same host is a new owner.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._started = False
        self._last_renewal = 0.0

    @property
    def spec(self) -> BackgroundSpec:
        return self.service.gateway.config.background

    @property
    def enabled(self) -> bool:
        """Leases are kept (and responses recovered): on a persistent store, unless disabled."""
        return self.spec.recover and self.service.gateway.config.store.kind != "memory"

    def store(self) -> DurableStore | None:
        return self.service.durable_store if self.enabled else None

    def ensure_running(self) -> None:
        """Start the renew-and-recover task in the service nursery (once)."""
        if self._started or not self.enabled:
            return
        try:
            nursery = self.service.gateway.nursery
        except RuntimeError:
            return  # not running: an embedding host drives the service itself
        self._started = True
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            await self.run()
        finally:
            self._started = False

    async def run(self) -> None:
        """Renew this process's leases and claim expired ones, until cancelled. A store that
        fails is logged once per run of failures and tried again at the next tick; it never
        stops the gateway."""
        renew_every = self.spec.lease_secs / 3
        next_renewal = next_purge = trio.current_time()
        self._last_renewal = trio.current_time()
        failing = False
        while True:
            spec = self.spec
            store = self.store()
            if store is None:
                return
            now = trio.current_time()
            try:
                with trio.fail_after(max(spec.lease_secs / 3, 1.0)):
                    if now >= next_renewal:
                        await self.renew(store)
                        next_renewal = now + renew_every
                    await self.recover(store)
                    if now >= next_purge:
                        await store.purge_expired()
                        next_purge = now + _PURGE_EVERY
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("background responses: lease store unavailable (%s)", exc)
                failing = True
            self._fence()
            await trio.sleep(min(spec.recovery_interval_secs, renew_every))

    async def renew(self, store: DurableStore) -> None:
        """One write for every lease held; a response whose lease is no longer ours (another
        process claimed it) is stopped without writing."""
        mine = await store.renew_leases(self.owner, self.spec.lease_secs)
        self._last_renewal = trio.current_time()
        for response_id, live in list(self.service.running.items()):
            if live.leased and response_id not in mine and not live.scope.cancel_called:
                log.warning("response %s: its lease was taken over; stopping here", response_id)
                live.release = "lost"
                live.scope.cancel()

    def _fence(self) -> None:
        """Stop every leased loop once the last renewal is older than two thirds of a lease:
        another process may claim them a third of a lease later."""
        if trio.current_time() - self._last_renewal < self.spec.lease_secs * 2 / 3:
            return
        for response_id, live in list(self.service.running.items()):
            if live.leased and not live.scope.cancel_called:
                log.warning("response %s: lease not renewed in time; stopping here", response_id)
                live.release = "lost"
                live.scope.cancel()

    async def recover(self, store: DurableStore) -> None:
        """Claim expired leases and resume their responses (in the service nursery)."""
        while True:
            claims = await store.claim_expired(self.owner, self.spec.lease_secs, _CLAIM_BATCH)
            for claim in claims:
                await self._resume(store, claim)
            if len(claims) < _CLAIM_BATCH:
                return

    async def _resume(self, store: DurableStore, claim: Claim) -> None:
        # The resumed loop's spans: this task may have started outside any request, so the
        # gateway's tracer is made current here; the loop is a new trace, linked to the
        # request that created the response when its trace context was kept with the lease.
        tel = self.service.gateway.telemetry
        activate(tel)
        if tel is not None:
            info = claim.resume if isinstance(claim.resume, dict) else {}
            origin = info.get("traceparent")
            tel.adopt(origin if isinstance(origin, str) else None)
        try:
            await self.service.resume(claim, self.spec.max_recovery_attempts)
        except Exception as exc:
            # Not released for another try: what cannot be resumed now never will be.
            log.exception("response %s: could not be resumed", claim.response_id)
            await self.service.fail_unresumable(claim, f"{type(exc).__name__}: {exc}")

    async def acquire(self, response_id: str, resume: Any) -> bool:
        """Take the lease of a new background response; False when leases are off."""
        store = self.store()
        if store is None:
            return False
        tel = current_telemetry()
        origin = tel.traceparent() if tel is not None else None
        if origin is not None:  # for the spans of whoever resumes it
            resume = {**resume, "traceparent": origin}
        await store.acquire_lease(response_id, self.owner, self.spec.lease_secs, resume)
        self.ensure_running()
        return True
