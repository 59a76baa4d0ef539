"""The triage service's tests: scripted models stand in for the provider, offline."""

from __future__ import annotations

import json

import openai
import pytest
from triage import PROMPT, Triage, triage, triage_all

from onwards_trio.testing import ModelCall, error, rate_limited


def verdict(queue: str, urgent: bool = False) -> str:
    return json.dumps({"queue": queue, "urgent": urgent})


@pytest.fixture
def client(onwards):
    with openai.OpenAI(base_url=onwards.base_url, api_key="test", max_retries=1) as client:
        yield client


def test_a_ticket_goes_to_the_queue_the_model_names(onwards, client):
    onwards.model("triage", verdict("billing", urgent=True))
    assert triage(client, "I was charged twice!") == Triage("billing", True)
    onwards.assert_called(
        "triage",
        times=1,
        messages=[
            {"role": "system", "content": PROMPT},
            {"role": "user", "content": "I was charged twice!"},
        ],
    )


def test_malformed_json_is_asked_for_again(onwards, client):
    onwards.model("triage", ["Sure! It is a bug.", verdict("bug")])
    assert triage(client, "The app crashes on start") == Triage("bug", False)
    retry = onwards.calls("triage")[1]
    assert retry.messages[-2] == {"role": "assistant", "content": "Sure! It is a bug."}
    assert "not the JSON" in retry.last_user_text


def test_a_rate_limit_is_waited_out_by_the_sdk(onwards, client):
    onwards.model("triage", [rate_limited(retry_after=0.1), verdict("account")])
    assert triage(client, "Cannot log in") == Triage("account", False)
    assert len(onwards.calls("triage")) == 2


def test_an_outage_sends_the_ticket_to_a_human(onwards, client):
    onwards.model("triage", error(500, "upstream exploded"))
    assert triage(client, "Help") == Triage("human", True)
    assert len(onwards.calls("triage")) == 2  # the SDK's one retry, then our fallback


@pytest.mark.trio
async def test_many_tickets_at_once_from_trio(onwards_trio):
    def by_ticket(call: ModelCall) -> str:
        return verdict("billing") if "refund" in (call.last_user_text or "") else verdict("bug")

    onwards_trio.model("triage", by_ticket)
    async with openai.AsyncOpenAI(base_url=onwards_trio.base_url, api_key="test") as client:
        results = await triage_all(client, ["refund please", "button broken", "refund now"])
    assert [r.queue for r in results] == ["billing", "bug", "billing"]
