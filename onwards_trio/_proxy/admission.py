"""Admission: every limit a request must pass before it may reach an upstream.

In order: pool and key rate limits, pool and key concurrency permits, pool and key token
limits, key and label budgets. Refused: nothing is held (but the rate tokens taken, as
before). Admitted: the permits are on the request's exit stack and the token and budget
reservations in its :class:`Hold`, settled with the usage the upstream reports or refunded.

In-process, each check is a few arithmetic operations; with ``shared_limits`` all of them are
one atomic Redis script call (:meth:`SharedLimits.admit`), whatever is configured.

Provider-level limits (rate, token limit) are checked by the pipeline when a provider has been
chosen (:func:`reserve_provider`): before, nobody knows which provider's limit applies.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from onwards_trio import _errors as errors
from onwards_trio._config import BudgetSpec, TokenLimitSpec
from onwards_trio._proxy.budgets import Budget, BudgetReservation
from onwards_trio._proxy.limits import (
    ConcurrencyLimit,
    Reservation,
    TokenBucket,
    TokenLimit,
    TokenReservation,
    key_scope,
    pool_scope,
    provider_scope,
    requested_output,
)
from onwards_trio._proxy.pricing import estimate_cost_micros, format_micros
from onwards_trio._proxy.releases import Releases
from onwards_trio._proxy.usage import Usage

if TYPE_CHECKING:
    from onwards_trio._proxy.pipeline import ProxyRequest
    from onwards_trio._proxy.shared_limits import (
        Admission,
        ProviderCheck,
        SharedBudgetReservation,
    )
    from onwards_trio._proxy.targets import Pool, Provider, Table

__all__ = [
    "Hold",
    "PendingGate",
    "admit",
    "admit_at_once",
    "flush",
    "reserve_provider",
    "token_headers",
]


class Hold:
    """A request's reservations under its token limits and budgets.

    Settled with the reported usage when the body ends (budgets at the price of the provider
    that answered); refunded when no 2xx answer was relayed (nothing was spent). A 2xx whose
    usage never shows (a cut stream, an upstream that does not report it) keeps its estimates:
    the conservative reading.
    """

    __slots__ = ("answered", "budget_windows", "budgets", "reservations", "windows")

    def __init__(self) -> None:
        self.reservations: list[Reservation] = []
        # (limit, refill per second, tokens left after the reservation) of each token limit
        self.windows: list[tuple[int, float, float]] = []
        self.budgets: list[BudgetReservation | SharedBudgetReservation] = []
        # (amount, used after the reservation, seconds to the window's end) of each budget
        self.budget_windows: list[tuple[int, int, float | None]] = []
        self.answered = False

    def settle(self, usage: Usage, cost: int | None) -> None:
        """``cost``: of ``usage`` at the answering provider's price (``None``: no price, so
        nothing known is spent and the budget estimates are given back)."""
        used = usage.total_tokens
        for r in self.reservations:
            r.settle(used)
        for b in self.budgets:
            b.settle(cost or 0)

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # pushed on the request's exit stack as it is (no callback wrapper)
        self.close()

    def close(self) -> None:
        if not self.answered:
            for r in self.reservations:
                r.refund()
            for b in self.budgets:
                b.refund()

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``x-ratelimit-*-tokens`` of the tightest token limit (OpenAI's names; reset in
        seconds) and ``x-budget-*`` of the tightest budget."""
        out = token_headers(*min(self.windows, key=lambda w: w[2])) if self.windows else []
        if self.budget_windows:
            out += _budget_headers(*min(self.budget_windows, key=lambda w: w[0] - w[1]))
        return out


def token_headers(limit: int, rate: float, remaining: float) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-ratelimit-limit-tokens", str(limit).encode()),
        (b"x-ratelimit-remaining-tokens", str(max(0, int(remaining))).encode()),
        (b"x-ratelimit-reset-tokens", f"{max(0.0, limit - remaining) / rate:.3f}s".encode()),
    ]


def _budget_headers(amount: int, used: int, reset: float | None) -> list[tuple[bytes, bytes]]:
    """Amounts in currency units (exact decimals); reset in seconds, absent for ``total``."""
    out = [
        (b"x-budget-limit", format_micros(amount).encode()),
        (b"x-budget-remaining", format_micros(max(0, amount - used)).encode()),
    ]
    if reset is not None:
        out.append((b"x-budget-reset", f"{reset:.0f}s".encode()))
    return out


def _admit_local(
    metrics: Any, table: Table, pool: Pool, ident: str | None, stack: Releases
) -> None:
    """Pool then key rate limits, then pool then key concurrency permits, in-process."""
    m = metrics
    now: float | None = None  # read once for both buckets
    if pool.rate is not None:
        now = trio.current_time()
        wait = pool.rate.try_acquire(now)
        if wait is not None:
            if m is not None:
                m.rejected(pool.alias, "rate", "pool")
            raise errors.rate_limited(wait)
    key_rate = table.key_rate.get(ident) if ident is not None else None
    if key_rate is not None:
        wait = key_rate.try_acquire(now)
        if wait is not None:
            if m is not None:
                m.rejected(pool.alias, "rate", "key")
            raise errors.rate_limited(wait)
    if pool.concurrency is not None:
        permit = pool.concurrency.try_acquire()
        if permit is None:
            if m is not None:
                m.rejected(pool.alias, "concurrency", "pool")
            raise errors.concurrency_limited()
        stack.callback(permit.release)
    key_conc = table.key_concurrency.get(ident) if ident is not None else None
    if key_conc is not None:
        permit = key_conc.try_acquire()
        if permit is None:
            if m is not None:
                m.rejected(pool.alias, "concurrency", "key")
            raise errors.concurrency_limited()
        stack.callback(permit.release)


async def prompt_tokens(table: Table, request: ProxyRequest) -> int:
    """The request's prompt as every limit and budget counts it (``table.prompt_counter``),
    counted once per body: an exact counter is not run again for the provider's limit."""
    seen = request.prompt_count
    if seen is not None and seen[0] is request.body:
        return seen[1]
    prompt = await table.prompt_counter.count(request.body, request.json)
    request.prompt_count = (request.body, prompt)
    return prompt


async def _wants(
    table: Table, pool: Pool, request: ProxyRequest
) -> tuple[list[tuple[str, TokenLimit, int, str]], list[tuple[str, Budget, int, BudgetSpec]]]:
    """The token limits (scope, limit, estimate, which) and budgets (scope, budget, estimated
    cost, spec) a request reserves under."""
    ident = request.key_id
    specs: list[tuple[str, TokenLimit, TokenLimitSpec, str]] = []
    if pool.tokens is not None and pool.spec.token_limit is not None:
        specs.append((pool_scope(pool.alias), pool.tokens, pool.spec.token_limit, "pool"))
    if ident is not None:
        key = table.key_tokens.get(ident)
        if key is not None:
            specs.append((key_scope(ident), key[0], key[1], "key"))
    budgets = table.key_budgets.get(ident) if ident is not None else None
    price = pool.price
    if not specs and (budgets is None or price is None):
        return [], []
    asked = requested_output(request.json)
    prompt = await prompt_tokens(table, request)
    tokens = [
        (scope, limit, prompt + (spec.default_output_tokens if asked is None else asked), which)
        for scope, limit, spec, which in specs
    ]
    spends: list[tuple[str, Budget, int, BudgetSpec]] = []
    if budgets is not None and price is not None:
        for scope, budget, bspec in budgets:
            output = bspec.default_output_tokens if asked is None else asked
            spends.append((scope, budget, estimate_cost_micros(prompt, output, price), bspec))
    return tokens, spends


def admit_at_once(
    metrics: Any, table: Table, pool: Pool, request: ProxyRequest, stack: Releases
) -> bool:
    """:func:`admit` for the usual request, which reserves nothing (no token limit, no budget
    applies) under in-process limits, without its coroutines; False (nothing done): call
    :func:`admit`."""
    if table.shared is not None or pool.tokens is not None:
        return False
    ident = request.key_id
    if ident is not None and (ident in table.key_tokens or ident in table.key_budgets):
        return False
    _admit_local(metrics, table, pool, ident, stack)
    return True


async def admit(
    metrics: Any, table: Table, pool: Pool, request: ProxyRequest, stack: Releases
) -> Hold | None:
    """Every request-level limit, or an :class:`HTTPError` (429, 402); the request's
    :class:`Hold` when it reserved tokens or budget (also set as ``request.hold``)."""
    tokens, spends = await _wants(table, pool, request)
    if table.shared is not None:
        return await _admit_shared(metrics, table, pool, request, stack, tokens, spends)
    _admit_local(metrics, table, pool, request.key_id, stack)
    if not tokens and not spends:
        return None
    hold = request.hold = Hold()
    for _, limit, estimate, which in tokens:
        got = limit.reserve(estimate)
        if not isinstance(got, TokenReservation):
            for r in hold.reservations:
                r.refund()
            _refuse_tokens(metrics, pool, which, limit, got, float(limit.remaining))
        hold.reservations.append(got)
        hold.windows.append((limit.limit, limit.rate, limit.level))
    for scope, budget, estimate, spec in spends:
        held = budget.reserve(estimate)
        if held is None:
            hold.close()
            _refuse_budget(metrics, pool, scope, spec, budget.amount, budget.used, budget.reset)
        hold.budgets.append(held)
        hold.budget_windows.append((budget.amount, budget.used, budget.reset))
    stack.push(hold)
    return hold


def _refuse_tokens(
    metrics: Any, pool: Pool, which: str, limit: TokenLimit, wait: float, remaining: float
) -> NoReturn:
    if metrics is not None:
        metrics.rejected(pool.alias, "tokens", which)
    raise errors.rate_limited(wait, token_headers(limit.limit, limit.rate, remaining))


def _refuse_budget(
    metrics: Any,
    pool: Pool,
    scope: str,
    spec: BudgetSpec,
    amount: int,
    used: int,
    reset: float | None,
) -> NoReturn:
    which = "key" if scope.startswith("key:") else "label"
    if metrics is not None:
        metrics.rejected(pool.alias, "budget", which)
    raise errors.budget_exceeded(spec.window, which, _budget_headers(amount, used, reset))


class PendingGate:
    """A request's shared admission, waiting for its first provider to be chosen, so that the
    provider's rate and token limit ride in the same Redis call (one round trip per request
    for every check). Sent by :func:`reserve_provider` — or by :func:`flush` when no provider
    could be tried at all, so the request's own refusal (402, 429) still wins."""

    __slots__ = ("rates", "scopes", "slots", "spends", "stack", "tokens")

    def __init__(
        self,
        rates: list[tuple[str, TokenBucket]],
        slots: list[tuple[str, ConcurrencyLimit]],
        scopes: list[str],
        tokens: list[tuple[str, TokenLimit, int, str]],
        spends: list[tuple[str, Budget, int, BudgetSpec]],
        stack: Releases,
    ) -> None:
        self.rates = rates
        self.slots = slots
        self.scopes = scopes  # which limit refused, for the metrics: rates', then slots'
        self.tokens = tokens
        self.spends = spends
        self.stack = stack


async def _admit_shared(
    metrics: Any,
    table: Table,
    pool: Pool,
    request: ProxyRequest,
    stack: Releases,
    tokens: list[tuple[str, TokenLimit, int, str]],
    spends: list[tuple[str, Budget, int, BudgetSpec]],
) -> Hold | None:
    """:func:`admit` with every limit shared across replicas: one Redis call (each limit
    falls back to its in-process twin while Redis is unavailable). When a provider of the
    pool has a rate or token limit, the call waits for the provider to be chosen."""
    ident = request.key_id
    key = None if ident is None else key_scope(ident)
    pool_key = (pool_scope(pool.alias), "pool")
    candidates = [
        (pool.rate, pool.concurrency, pool_key),
        (
            table.key_rate.get(ident) if ident is not None else None,
            table.key_concurrency.get(ident) if ident is not None else None,
            (key or "", "key"),
        ),
    ]
    rates = [(scope, rate) for rate, _, (scope, _) in candidates if rate is not None]
    slots = [(scope, conc) for _, conc, (scope, _) in candidates if conc is not None]
    scopes = [which for rate, _, (_, which) in candidates if rate is not None]
    scopes += [which for _, conc, (_, which) in candidates if conc is not None]
    if not scopes and not tokens and not spends:
        return None
    hold = None
    if tokens or spends:
        hold = request.hold = Hold()
        stack.push(hold)
    gate = PendingGate(rates, slots, scopes, tokens, spends, stack)
    if pool.provider_checks:
        request.gate = gate
        return hold
    await _send(metrics, table, pool, request, gate, None)
    return hold


async def flush(metrics: Any, table: Table, pool: Pool, request: ProxyRequest) -> None:
    """Send the request's pending admission without a provider (none could be tried)."""
    gate = request.gate
    if gate is not None:
        request.gate = None
        await _send(metrics, table, pool, request, gate, None)


async def _send(
    metrics: Any,
    table: Table,
    pool: Pool,
    request: ProxyRequest,
    gate: PendingGate,
    provider: ProviderCheck | None,
) -> Admission:
    """The one Redis call: raise the request's refusal, or hold what it took (the provider's
    outcome is the caller's to judge)."""
    shared = table.shared
    assert shared is not None
    tokens, spends = gate.tokens, gate.spends
    got = await shared.admit(
        gate.rates,
        gate.slots,
        [(scope, limit, estimate) for scope, limit, estimate, _ in tokens],
        [(scope, budget, estimate) for scope, budget, estimate, _ in spends],
        provider,
    )
    m = metrics
    if got.refused == "rate":
        if m is not None:
            m.rejected(pool.alias, "rate", gate.scopes[got.index])
        raise errors.rate_limited(got.retry_after)
    if got.refused == "concurrency":
        if m is not None:
            m.rejected(pool.alias, "concurrency", gate.scopes[len(gate.rates) + got.index])
        raise errors.concurrency_limited()
    if got.refused == "tokens":
        _, limit, _, which = tokens[got.index]
        _refuse_tokens(m, pool, which, limit, got.retry_after or 0.0, 0.0)
    if got.refused == "budget":
        scope, budget, _, spec = spends[got.index]
        _refuse_budget(
            m, pool, scope, spec, budget.amount, got.budgets_used[0], budget.current()[1]
        )
    if got.permit is not None:
        gate.stack.callback(got.permit.release_soon)
    hold = request.hold
    if hold is not None:
        hold.reservations.extend(got.tokens)
        for (_, limit, _, _), left in zip(tokens, got.tokens_left, strict=True):
            hold.windows.append((limit.limit, limit.rate, left))
        hold.budgets.extend(got.budgets)
        for (_, budget, _, _), used in zip(spends, got.budgets_used, strict=True):
            hold.budget_windows.append((budget.amount, used, budget.current()[1]))
    return got


async def reserve_provider(
    metrics: Any, table: Table, pool: Pool, provider: Provider, request: ProxyRequest
) -> Reservation | errors.HTTPError | None:
    """The chosen provider's rate limit and token limit (with ``shared_limits`` one Redis
    call, together with the request's own pending admission): the token reservation
    (``None``: no token limit), or the 429 that refuses this provider (the caller decides
    whether another provider may be tried). The request's own refusal is raised."""
    limit = provider.tokens
    spec = provider.spec.token_limit
    estimate = 0
    if limit is not None and spec is not None:
        asked = requested_output(request.json)
        prompt = await prompt_tokens(table, request)
        estimate = prompt + (spec.default_output_tokens if asked is None else asked)
    shared = table.shared
    if shared is None:
        if provider.rate is not None:
            wait = provider.rate.try_acquire()
            if wait is not None:
                if metrics is not None:
                    metrics.rejected(pool.alias, "rate", "provider")
                return errors.rate_limited(wait)
        if limit is None:
            return None
        got = limit.reserve(estimate)
        if not isinstance(got, TokenReservation):
            if metrics is not None:
                metrics.rejected(pool.alias, "tokens", "provider")
            headers = token_headers(limit.limit, limit.rate, float(limit.remaining))
            return errors.rate_limited(got, headers)
        return got
    check: ProviderCheck | None = None
    if provider.rate is not None or limit is not None:
        check = (provider_scope(pool.alias, provider.index), provider.rate, limit, estimate)
    gate, request.gate = request.gate, None
    if gate is not None:
        admission = await _send(metrics, table, pool, request, gate, check)
    elif check is not None:
        admission = await shared.admit((), (), (), (), check)
    else:
        return None
    if admission.provider_refused == "rate":
        if metrics is not None:
            metrics.rejected(pool.alias, "rate", "provider")
        return errors.rate_limited(admission.provider_wait)
    if admission.provider_refused == "tokens" and limit is not None:
        if metrics is not None:
            metrics.rejected(pool.alias, "tokens", "provider")
        headers = token_headers(limit.limit, limit.rate, 0.0)
        return errors.rate_limited(admission.provider_wait, headers)
    return admission.provider_tokens
