"""A 402 says whose budget refused the request: the key's own, or one its labels share with
other keys (a caller can act on one and must ask about the other)."""

from __future__ import annotations

import trio

from tests.proxy.test_budgets import gateway, post
from tests.proxy.test_token_limits import usage_reply
from tests.support import FakeUpstream


async def test_a_refusal_by_the_keys_own_budget_names_it(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(10, 10))
    _, url = await gateway(nursery, up, {"amount": 0.001, "window": "day"})
    refused = await post(url, max_tokens=100)
    assert refused.status_code == 402
    assert refused.json()["error"]["message"].startswith(
        "Budget exceeded: this key's daily (UTC day) budget cannot cover"
    )


async def test_a_refusal_by_a_label_budget_names_a_shared_one(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(10, 10))
    _, url = await gateway(
        nursery,
        up,
        labels={"team": "red"},
        label_budgets=[{"amount": 0.001, "window": "month", "match_labels": {"team": "red"}}],
    )
    refused = await post(url, max_tokens=100)
    assert refused.status_code == 402
    assert refused.json()["error"]["message"].startswith(
        "Budget exceeded: a shared monthly (UTC month) budget cannot cover"
    )
