"""A request the tracer does not record (its caller's trace is not sampled) still has its
token usage counted: tracing decides what is exported, never what is metered."""

from __future__ import annotations

import pytest
import trio

from tests.ops.otlp_receiver import otlp_receiver
from tests.ops.test_metrics_http import body, gateway, sample, scrape, settle
from tests.support import FakeUpstream, Reply, chat_completion, serve_app

USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
NOT_SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
SAMPLED = NOT_SAMPLED[:-2] + "01"


pytestmark = pytest.mark.usefixtures("fast_otel_export")


@pytest.mark.parametrize("traceparent", [NOT_SAMPLED, SAMPLED])
async def test_a_traced_requests_tokens_are_counted_whether_or_not_it_is_sampled(
    nursery: trio.Nursery, traceparent: str
) -> None:
    upstream = FakeUpstream(Reply(body=chat_completion(usage=USAGE)))
    async with otlp_receiver() as receiver:
        targets = {"m": {"url": await serve_app(nursery, upstream)}}
        client, scraper, metrics = await gateway(
            nursery, targets, telemetry={"endpoint": receiver.url}
        )
        async with client, scraper:
            r = await client.post(
                "/v1/chat/completions", json=body("m"), headers={"traceparent": traceparent}
            )
            assert r.status_code == 200
            labels = {"alias": "m", "provider": "0", "key": "none"}
            await settle(metrics, "onwards_output_tokens_total", labels, 5)
            scraped = await scrape(scraper)
    assert sample(scraped, "onwards_input_tokens_total", **labels) == 3
    assert sample(scraped, "onwards_output_tokens_total", **labels) == 5
