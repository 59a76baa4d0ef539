"""Client keys configured as their hash (``sha256:<hex>``), over real sockets."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from typing import Any

import httpx
import openai
import pytest
import trio

from onwards_trio import ConfigError, parse_config
from tests.support import FakeUpstream, serve_app, start_gateway

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def hashed(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


async def gateway_url(nursery: trio.Nursery, auth: dict[str, Any], **pool: Any) -> str:
    """A gateway with one pool ``m`` (``pool``: its policy) on a fake upstream."""
    providers = [{"url": await serve_app(nursery, FakeUpstream())}]
    config = {"auth": auth, "targets": {"m": {"providers": providers, **pool}}}
    _, gateway = await start_gateway(nursery, config)
    return gateway


async def chat(url: str, key: str) -> int:
    """The status the openai SDK saw for one chat completion with ``key``."""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
        try:
            await client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
        except openai.APIStatusError as exc:
            return exc.status_code
    return 200


async def test_a_hashed_global_key_opens_to_its_key_only(nursery: trio.Nursery) -> None:
    url = await gateway_url(nursery, {"global_keys": [hashed("sk-global")]})
    assert await chat(url, "sk-global") == 200
    assert await chat(url, "sk-other") == 401


async def test_the_hash_itself_is_no_key(nursery: trio.Nursery) -> None:
    url = await gateway_url(nursery, {"global_keys": [hashed("sk-global")]})
    assert await chat(url, hashed("sk-global")) == 401


async def test_a_hashed_pool_key_opens_that_pool(nursery: trio.Nursery) -> None:
    url = await gateway_url(
        nursery, {"global_keys": [hashed("sk-global")]}, keys=[hashed("sk-pool")]
    )
    assert [await chat(url, "sk-pool"), await chat(url, "sk-global")] == [200, 200]


async def test_hex_digits_of_a_hash_match_in_either_case(nursery: trio.Nursery) -> None:
    upper = "sha256:" + hashlib.sha256(b"sk-upper").hexdigest().upper()
    url = await gateway_url(nursery, {}, keys=[upper])
    assert await chat(url, "sk-upper") == 200


async def test_a_hashed_key_definition_keeps_its_rate_limit(nursery: trio.Nursery) -> None:
    definition = {"key": hashed("sk-slow"), "rate_limit": {"requests_per_second": 0.01}}
    url = await gateway_url(nursery, {"key_definitions": {"slow": definition}}, keys=["slow"])
    assert [await chat(url, "sk-slow") for _ in range(2)] == [200, 429]


async def test_a_hashed_key_definition_keeps_its_labels_for_routing_rules(
    nursery: trio.Nursery,
) -> None:
    definition = {"key": hashed("sk-play"), "labels": {"purpose": "playground"}}
    rule = {"match_labels": {"purpose": "playground"}, "action": {"type": "deny"}}
    url = await gateway_url(
        nursery, {"key_definitions": {"play": definition}}, keys=["play"], routing_rules=[rule]
    )
    assert await chat(url, "sk-play") == 403


async def test_models_lists_what_a_hashed_key_opens(nursery: trio.Nursery) -> None:
    url = await gateway_url(nursery, {}, keys=[hashed("sk-pool")])
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        mine = await client.get("/v1/models", headers={"authorization": "Bearer sk-pool"})
        stranger = await client.get("/v1/models", headers={"authorization": "Bearer sk-x"})
    assert [m["id"] for m in mine.json()["data"]] == ["m"]
    assert stranger.json()["data"] == []


@pytest.mark.parametrize("bad", ["sha256:abc", "SHA256:" + "0" * 64 + "0", "sha256:" + "g" * 64])
def test_a_malformed_hash_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"auth": {"global_keys": [bad]}, "targets": {"m": {"url": "http://x"}}})
    assert info.value.problems == [
        "a hashed key is 'sha256:' and 64 hex digits (`onwards-trio hash-key` prints one)"
        " @ $.auth.global_keys[0]"
    ]


def test_hash_key_prints_the_hash_of_each_stdin_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "onwards_trio", "hash-key"],
        input="sk-one\nsk-two\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, f"{hashed('sk-one')}\n{hashed('sk-two')}\n")


def test_hash_key_without_input_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "onwards_trio", "hash-key"],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "reads the key(s) from stdin" in done.stderr
