"""A support-ticket triage service: the kind of application code onwards_trio.testing tests.

It asks a model to classify a ticket as JSON, asks once more when the answer is not valid JSON,
and sends the ticket to a human when the model cannot be reached. ``triage_all`` does many
tickets at once from a Trio application.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import openai
import trio

MODEL = "triage"
QUEUES = ("billing", "bug", "account", "human")
PROMPT = (
    "Classify the support ticket. Answer only JSON: "
    '{"queue": one of billing|bug|account, "urgent": true|false}'
)


@dataclass(frozen=True)
class Triage:
    queue: str
    urgent: bool


def _parse(text: str | None) -> Triage | None:
    try:
        data = json.loads(text or "")
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("queue") not in QUEUES:
        return None
    return Triage(queue=data["queue"], urgent=bool(data.get("urgent")))


def triage(client: openai.OpenAI, ticket: str) -> Triage:
    """Classify one ticket (two tries at valid JSON; a human when the API fails)."""
    messages = [{"role": "system", "content": PROMPT}, {"role": "user", "content": ticket}]
    for _ in range(2):
        try:
            answer = client.chat.completions.create(model=MODEL, messages=messages)
        except openai.APIError:
            return Triage(queue="human", urgent=True)
        text = answer.choices[0].message.content
        result = _parse(text)
        if result is not None:
            return result
        messages += [
            {"role": "assistant", "content": text or ""},
            {"role": "user", "content": "That was not the JSON asked for. Answer only JSON."},
        ]
    return Triage(queue="human", urgent=False)


async def triage_all(client: openai.AsyncOpenAI, tickets: list[str]) -> list[Triage]:
    """Classify many tickets concurrently (a Trio application; one try each)."""
    results: list[Triage] = [Triage("human", False)] * len(tickets)

    async def one(i: int, ticket: str) -> None:
        messages = [{"role": "system", "content": PROMPT}, {"role": "user", "content": ticket}]
        try:
            answer = await client.chat.completions.create(model=MODEL, messages=messages)
        except openai.APIError:
            return
        results[i] = _parse(answer.choices[0].message.content) or results[i]

    async with trio.open_nursery() as nursery:
        for i, ticket in enumerate(tickets):
            nursery.start_soon(one, i, ticket)
    return results
