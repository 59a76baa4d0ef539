"""Budgets at their edges, over real sockets."""

from __future__ import annotations

import trio

from tests.proxy.test_budgets import gateway, post
from tests.proxy.test_token_limits import usage_reply
from tests.support import FakeUpstream


async def test_a_free_model_is_served_to_a_key_whose_budget_is_zero(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream(usage_reply(100, 100))
    free = {"pricing": {"input": 0, "output": 0}}
    _, url = await gateway(nursery, up, {"amount": 0, "window": "day"}, pool=free)
    answers = [await post(url, max_tokens=100) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[1].headers["x-budget-remaining"] == "0"
