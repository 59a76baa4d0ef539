"""The price table: config shape and precedence, and exact integer costs of a Usage."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onwards_trio import ConfigError, parse_config
from onwards_trio._proxy.pricing import (
    MICROS,
    Price,
    cost_micros,
    estimate_cost_micros,
    format_micros,
    highest_price,
    price_for,
)
from onwards_trio._proxy.usage import Usage


def _config(pool: dict[str, Any]) -> Any:
    return parse_config({"targets": {"m": pool}})


def test_price_is_micro_units_per_million_tokens() -> None:
    config = _config(
        {
            "url": "http://up/v1",
            "pricing": {"input": 2.5, "output": 10, "cached_input": 1.25},
        }
    )
    pool = config.targets["m"]
    assert price_for(pool, pool.providers[0]) == Price(2_500_000, 10_000_000, 1_250_000)


def test_cached_input_defaults_to_input() -> None:
    pool = _config({"url": "http://up/v1", "pricing": {"input": 0.15, "output": 0.6}}).targets["m"]
    assert price_for(pool, pool.providers[0]) == Price(150_000, 600_000, 150_000)


def test_provider_pricing_wins_over_pool_pricing() -> None:
    pool = _config(
        {
            "providers": [
                {"url": "http://a/v1", "pricing": {"input": 1, "output": 2}},
                {"url": "http://b/v1"},
            ],
            "pricing": {"input": 3, "output": 4},
        }
    ).targets["m"]
    assert price_for(pool, pool.providers[0]) == Price(1_000_000, 2_000_000, 1_000_000)
    assert price_for(pool, pool.providers[1]) == Price(3_000_000, 4_000_000, 3_000_000)


def test_no_pricing_means_no_price() -> None:
    pool = _config({"url": "http://up/v1"}).targets["m"]
    assert price_for(pool, pool.providers[0]) is None


@pytest.mark.parametrize("bad", [-1, 0.0000001, "1"])
def test_a_bad_price_is_a_config_error_naming_its_path(bad: Any) -> None:
    with pytest.raises(ConfigError) as info:
        _config({"url": "http://up/v1", "pricing": {"input": bad, "output": 1}})
    assert any("input" in p and "$.targets.m.pricing" in p for p in info.value.problems)


def test_cost_counts_uncached_cached_and_output_at_their_prices() -> None:
    price = Price(input=2_500_000, output=10_000_000, cached_input=1_250_000)
    usage = Usage(input_tokens=1000, output_tokens=200, cached_tokens=400)
    # 600 uncached * 2.5 + 400 cached * 1.25 + 200 * 10, per million, in micro-units
    assert cost_micros(usage, price) == 1500 + 500 + 2000


def test_cost_rounds_up_once_per_response() -> None:
    price = Price(input=150_000, output=600_000, cached_input=75_000)  # $0.15 / $0.60 per M
    # 7 * 0.15 + 3 * 0.6 = 2.85 micro-units: 3, never 2
    assert cost_micros(Usage(input_tokens=7, output_tokens=3), price) == 3


def test_reasoning_tokens_are_output_and_not_charged_twice() -> None:
    price = Price(input=0, output=MICROS, cached_input=0)
    assert cost_micros(Usage(output_tokens=10, reasoning_tokens=8), price) == 10


def test_cached_above_input_is_capped() -> None:
    price = Price(input=MICROS, output=0, cached_input=0)
    assert cost_micros(Usage(input_tokens=5, cached_tokens=9), price) == 0


def test_estimate_is_prompt_at_uncached_price_plus_output() -> None:
    price = Price(input=2_000_000, output=8_000_000, cached_input=1)
    assert estimate_cost_micros(1000, 500, price) == 2000 + 4000


def test_highest_price_takes_the_dearest_of_each_kind() -> None:
    got = highest_price([Price(1, 9, 1), None, Price(5, 2, 3)])
    assert got == Price(5, 9, 3)
    assert highest_price([None, None]) is None


@pytest.mark.parametrize(
    ("micros", "text"),
    [(0, "0"), (1, "0.000001"), (1500, "0.0015"), (MICROS, "1"), (10 * MICROS, "10")],
)
def test_format_micros_is_exact(micros: int, text: str) -> None:
    assert format_micros(micros) == text


_prices = st.decimals(min_value=0, max_value=1000, places=6).map(float)
_tokens = st.integers(min_value=0, max_value=10**9)


@given(_prices, _prices, _tokens, _tokens)
def test_config_prices_become_exact_micro_units(inp: float, out: float, a: int, b: int) -> None:
    pool = _config({"url": "http://up/v1", "pricing": {"input": inp, "output": out}}).targets["m"]
    price = price_for(pool, pool.providers[0])
    assert price is not None
    assert price.input == Decimal(repr(inp)) * MICROS
    exact = (Decimal(repr(inp)) * a + Decimal(repr(out)) * b) * MICROS / 10**6
    cost = cost_micros(Usage(input_tokens=a, output_tokens=b), price)
    # never under-counted, over-counted by less than one micro-unit
    assert exact <= cost < exact + 1


@given(_tokens, _tokens, _tokens, _tokens, _tokens, _tokens)
def test_cost_of_a_sum_is_within_one_micro_unit_per_part(
    a: int, b: int, c: int, d: int, e: int, f: int
) -> None:
    price = Price(input=150_000, output=600_000, cached_input=75_000)
    u1 = Usage(input_tokens=a + c, output_tokens=b, cached_tokens=c)
    u2 = Usage(input_tokens=d + f, output_tokens=e, cached_tokens=f)
    parts = cost_micros(u1, price) + cost_micros(u2, price)
    assert parts - 2 < cost_micros(u1 + u2, price) <= parts


@given(_tokens, _tokens, _tokens)
def test_estimate_never_below_the_cost_of_what_it_covers(a: int, b: int, cached: int) -> None:
    price = Price(input=2_500_000, output=10_000_000, cached_input=1_250_000)
    usage = Usage(input_tokens=a, output_tokens=b, cached_tokens=min(cached, a))
    assert estimate_cost_micros(a, b, price) >= cost_micros(usage, price)


def test_the_routing_table_carries_each_providers_price_and_the_pools_dearest() -> None:
    from onwards_trio import Targets

    table = Targets(
        _config(
            {
                "providers": [
                    {"url": "http://a/v1", "pricing": {"input": 1, "output": 8}},
                    {"url": "http://b/v1"},
                ],
                "pricing": {"input": 3, "output": 4},
            }
        )
    ).table
    pool = table.pools["m"]
    assert [p.price for p in pool.providers] == [
        Price(1_000_000, 8_000_000, 1_000_000),
        Price(3_000_000, 4_000_000, 3_000_000),
    ]
    assert pool.price == Price(3_000_000, 8_000_000, 3_000_000)
