"""What a response cost: the price table of the config applied to a :class:`Usage`.

Pure (no I/O, no gateway state): budgets, the usage ledger and metrics all call it.

**Unit.** Every cost is an ``int`` of *micro-units* of the operator's currency (1 000 000 =
one dollar, say). Budgets add and compare costs across many requests and in Redis (whose Lua
numbers are doubles, exact for integers below 2**53, i.e. 9 000 000 000 currency units): with
integers there is no float drift, and a config price is exact as long as it has at most 6
decimal places per million tokens (the config refuses finer ones). A price is kept in
micro-units *per million tokens*, so ``tokens * price`` is an exact integer of
micro-micro-units; it is divided by a million once per response, rounding **up** — a cost is
never under-counted, and over-counted by less than one micro-unit per response.

**Which price.** A provider's ``pricing`` wins over its pool's (a pool whose providers
differ in price), and a response served by a provider with neither has no price (``None``:
no cost is known, and a budget does not count it). :func:`price_for` is that precedence.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable
from typing import Final

import attrs

from onwards_trio._config import PoolSpec, PriceSpec, ProviderSpec
from onwards_trio._proxy.usage import Usage

__all__ = [
    "MICROS",
    "Price",
    "cost_micros",
    "estimate_cost_micros",
    "format_micros",
    "highest_price",
    "price_for",
]

MICROS: Final = 1_000_000  # micro-units per currency unit
_PER: Final = 1_000_000  # prices are per million tokens


def _micros(value: float) -> int:
    """A config price (currency units, at most 6 decimal places) as exact micro-units."""
    return int(decimal.Decimal(repr(value)).scaleb(6))


@attrs.frozen
class Price:
    """Micro-units per million tokens of each kind (``cached_input``: a prompt cache hit)."""

    input: int
    output: int
    cached_input: int

    @classmethod
    def from_spec(cls, spec: PriceSpec) -> Price:
        inp = _micros(spec.input)
        cached = inp if spec.cached_input is None else _micros(spec.cached_input)
        return cls(inp, _micros(spec.output), cached)


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def cost_micros(usage: Usage, price: Price) -> int:
    """The cost of ``usage`` at ``price``, in micro-units (rounded up, once).

    ``usage.input_tokens`` is all input (cached included, as :mod:`usage` counts it), so the
    uncached part is what the cache did not serve; reasoning tokens are output and priced so.
    """
    cached = min(usage.cached_tokens, usage.input_tokens)
    exact = (
        (usage.input_tokens - cached) * price.input
        + cached * price.cached_input
        + usage.output_tokens * price.output
    )
    return _ceil_div(exact, _PER) if exact > 0 else 0


def estimate_cost_micros(input_tokens: int, output_tokens: int, price: Price) -> int:
    """What admission reserves: the estimated prompt at the uncached price (a cache hit can
    only make it cheaper) plus the most output the request may ask for."""
    exact = max(input_tokens, 0) * price.input + max(output_tokens, 0) * price.output
    return _ceil_div(exact, _PER) if exact > 0 else 0


def price_for(pool: PoolSpec, provider: ProviderSpec) -> Price | None:
    """The price of a response ``provider`` (of ``pool``) served: the provider's ``pricing``,
    else the pool's, else ``None`` (no price known)."""
    spec = provider.pricing if provider.pricing is not None else pool.pricing
    return Price.from_spec(spec) if spec is not None else None


def highest_price(prices: Iterable[Price | None]) -> Price | None:
    """The dearest of each kind among ``prices`` (``None``s skipped; all ``None``: ``None``).

    Admission happens before a provider is chosen, so a budget reserves at the dearest price
    any provider of the pool could charge; settlement then uses the one that answered."""
    known = [p for p in prices if p is not None]
    if not known:
        return None
    return Price(
        max(p.input for p in known),
        max(p.output for p in known),
        max(p.cached_input for p in known),
    )


def format_micros(micros: int) -> str:
    """Micro-units as a decimal string in currency units (``1500`` → ``"0.0015"``), exact."""
    whole, frac = divmod(micros, MICROS)  # integer arithmetic: this runs per answer header
    if not frac:
        return str(whole)
    return f"{whole}.{frac:06d}".rstrip("0")
