"""Traffic control over real sockets: auth, routing rules, limits, balancing, failover."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpcore
import httpx
import pytest
import trio
import trio.testing

from onwards_trio import parse_config
from onwards_trio._errors import HTTPError
from onwards_trio._proxy.auth import key_id
from onwards_trio._proxy.pipeline import Proxy, ProxyRequest
from onwards_trio._proxy.targets import Provider, Targets
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, sse, start_gateway

CHAT = "/v1/chat/completions"


def body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def gateway(nursery: trio.Nursery, config: dict[str, Any]) -> httpx.AsyncClient:
    _, url = await start_gateway(nursery, config)
    return httpx.AsyncClient(base_url=url, timeout=10)


# -- auth ------------------------------------------------------------------------------------


@pytest.fixture
async def keyed(nursery: trio.Nursery) -> AsyncIterator[tuple[httpx.AsyncClient, FakeUpstream]]:
    up = FakeUpstream()
    url = await serve_app(nursery, up)
    client = await gateway(
        nursery,
        {
            "auth": {
                "global_keys": ["g-key"],
                "key_definitions": {
                    "premium": {"key": "sk-premium", "labels": {"tier": "premium"}},
                    "batch": {"key": "sk-batch", "labels": {"purpose": "batch"}},
                    "play": {"key": "sk-play", "labels": {"purpose": "playground"}},
                },
            },
            "targets": {
                "open": {"url": url},
                "private": {"url": url, "keys": ["premium", "p-key"]},
                "ruled": {
                    "providers": [{"url": url}],
                    "keys": ["sk-batch", "sk-play", "sk-premium"],
                    "routing_rules": [
                        {"match_labels": {"purpose": "playground"}, "action": {"type": "deny"}},
                        {
                            "match_labels": {"purpose": "batch"},
                            "action": {"type": "redirect", "target": "cheap"},
                        },
                    ],
                },
                "cheap": {"url": url, "onwards_model": "cheap-model"},
                "broken-redirect": {
                    "providers": [{"url": url}],
                    "routing_rules": [
                        {"match_labels": {}, "action": {"type": "redirect", "target": "missing"}}
                    ],
                },
            },
        },
    )
    async with client:
        yield client, up


async def test_missing_key_is_401(keyed: tuple[httpx.AsyncClient, FakeUpstream]) -> None:
    client, up = keyed
    r = await client.post(CHAT, json=body("private"))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthenticated"
    assert up.requests == []


async def test_unknown_key_is_401_invalid_api_key(
    keyed: tuple[httpx.AsyncClient, FakeUpstream],
) -> None:
    client, _ = keyed
    r = await client.post(CHAT, json=body("private"), headers=bearer("sk-wrong"))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("key", ["p-key", "g-key", "sk-premium"])
async def test_literal_global_and_named_definition_keys_grant_access(
    keyed: tuple[httpx.AsyncClient, FakeUpstream], key: str
) -> None:
    client, up = keyed
    r = await client.post(CHAT, json=body("private"), headers=bearer(key))
    assert r.status_code == 200
    assert "authorization" not in up.requests[-1].headers  # the client key never goes upstream


async def test_a_key_definition_name_is_not_a_credential(
    keyed: tuple[httpx.AsyncClient, FakeUpstream],
) -> None:
    client, up = keyed
    # "private" lists the definition name "premium": that grants sk-premium, not "premium".
    r = await client.post(CHAT, json=body("private"), headers=bearer("premium"))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    models = await client.get("/v1/models", headers=bearer("premium"))
    assert "private" not in [m["id"] for m in models.json()["data"]]
    assert up.requests == []


async def test_a_valid_key_for_another_pool_is_403(
    keyed: tuple[httpx.AsyncClient, FakeUpstream],
) -> None:
    client, _ = keyed
    r = await client.post(CHAT, json=body("private"), headers=bearer("sk-batch"))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"


async def test_global_keys_protect_every_alias(
    keyed: tuple[httpx.AsyncClient, FakeUpstream],
) -> None:
    client, _ = keyed
    assert (await client.post(CHAT, json=body("open"))).status_code == 401
    assert (await client.post(CHAT, json=body("open"), headers=bearer("g-key"))).status_code == 200


async def test_strangers_cannot_tell_unknown_aliases_from_protected_ones(
    keyed: tuple[httpx.AsyncClient, FakeUpstream],
) -> None:
    client, _ = keyed
    unknown = await client.post(CHAT, json=body("no-such-model"))
    protected = await client.post(CHAT, json=body("private"))
    assert unknown.status_code == protected.status_code == 401
    known = await client.post(CHAT, json=body("no-such-model"), headers=bearer("g-key"))
    assert known.status_code == 404


async def test_models_are_filtered_by_key(keyed: tuple[httpx.AsyncClient, FakeUpstream]) -> None:
    client, _ = keyed

    async def ids(headers: dict[str, str]) -> set[str]:
        r = await client.get("/v1/models", headers=headers)
        assert r.status_code == 200
        return {m["id"] for m in r.json()["data"]}

    assert await ids({}) == set()  # global keys protect everything
    assert await ids(bearer("p-key")) == {"private"}
    assert "private" not in await ids(bearer("sk-batch"))
    assert {"open", "private", "cheap"} <= await ids(bearer("g-key"))


async def test_routing_rule_deny_is_403(keyed: tuple[httpx.AsyncClient, FakeUpstream]) -> None:
    client, up = keyed
    r = await client.post(CHAT, json=body("ruled"), headers=bearer("sk-play"))
    assert r.status_code == 403
    assert up.requests == []


@pytest.mark.parametrize(
    ("key", "upstream_model"),
    [("sk-batch", "cheap-model"), ("sk-premium", "ruled")],  # redirected / no rule matched
)
async def test_routing_rules_redirect_or_pass(
    keyed: tuple[httpx.AsyncClient, FakeUpstream], key: str, upstream_model: str
) -> None:
    client, up = keyed
    r = await client.post(CHAT, json=body("ruled"), headers=bearer(key))
    assert r.status_code == 200
    assert up.requests[-1].json()["model"] == upstream_model


async def test_redirect_to_a_missing_alias_is_502(
    keyed: tuple[httpx.AsyncClient, FakeUpstream],
) -> None:
    client, _ = keyed
    r = await client.post(CHAT, json=body("broken-redirect"), headers=bearer("g-key"))
    assert r.status_code == 502


# -- rate and concurrency limits ---------------------------------------------------------------


async def test_pool_rate_limit_answers_429_with_retry_after(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    client = await gateway(
        nursery,
        {
            "targets": {
                "m": {
                    "providers": [{"url": await serve_app(nursery, up)}],
                    "rate_limit": {"requests_per_second": 0.01, "burst_size": 2},
                }
            }
        },
    )
    async with client:
        statuses = [(await client.post(CHAT, json=body("m"))) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    limited = statuses[2]
    assert limited.json()["error"]["code"] == "rate_limit"
    assert 90 <= int(limited.headers["retry-after"]) <= 100  # one token every 100 s
    assert len(up.requests) == 2


async def test_key_rate_limit_applies_per_key(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    client = await gateway(
        nursery,
        {
            "auth": {
                "key_definitions": {
                    "slow": {"key": "sk-slow", "rate_limit": {"requests_per_second": 0.01}}
                }
            },
            "targets": {"m": {"url": await serve_app(nursery, up)}},
        },
    )
    async with client:
        first = await client.post(CHAT, json=body("m"), headers=bearer("sk-slow"))
        second = await client.post(CHAT, json=body("m"), headers=bearer("sk-slow"))
        anonymous = await client.post(CHAT, json=body("m"))
    assert (first.status_code, second.status_code, anonymous.status_code) == (200, 429, 200)


async def test_provider_rate_limit_blocks_without_fallback(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    client = await gateway(
        nursery,
        {
            "targets": {
                "m": {
                    "url": await serve_app(nursery, up),
                    "rate_limit": {"requests_per_second": 0.01},
                }
            }
        },
    )
    async with client:
        codes = [(await client.post(CHAT, json=body("m"))).status_code for _ in range(2)]
    assert codes == [200, 429]


def slow_stream(delay: float = 0.3) -> Reply:
    return Reply(
        headers=[(b"content-type", b"text/event-stream")],
        chunks=sse({"choices": []}, {"choices": []}),
        chunk_delay=delay,
    )


async def test_streamed_response_holds_the_pool_permit_until_it_ends(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream(slow_stream())
    client = await gateway(
        nursery,
        {
            "targets": {
                "m": {
                    "providers": [{"url": await serve_app(nursery, up)}],
                    "concurrency_limit": {"max_concurrent_requests": 1},
                }
            }
        },
    )
    async with client:
        async with client.stream("POST", CHAT, json=body("m", stream=True)) as first:
            assert first.status_code == 200
            # headers are out but the stream is still running: the permit is still held
            second = await client.post(CHAT, json=body("m"))
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "concurrency_limit_exceeded"
            await first.aread()
        third = await client.post(CHAT, json=body("m", stream=True))
    assert third.status_code == 200


async def test_key_concurrency_limit(nursery: trio.Nursery) -> None:
    up = FakeUpstream(slow_stream())
    client = await gateway(
        nursery,
        {
            "auth": {
                "key_definitions": {
                    "one": {"key": "sk-one", "concurrency_limit": {"max_concurrent_requests": 1}}
                }
            },
            "targets": {"m": {"url": await serve_app(nursery, up)}},
        },
    )
    async with (
        client,
        client.stream("POST", CHAT, json=body("m"), headers=bearer("sk-one")) as held,
    ):
        limited = await client.post(CHAT, json=body("m"), headers=bearer("sk-one"))
        other = await client.post(CHAT, json=body("m"))
        await held.aread()
    assert limited.status_code == 429 and other.status_code == 200


async def test_provider_concurrency_skips_a_full_provider(nursery: trio.Nursery) -> None:
    busy, free = FakeUpstream(slow_stream()), FakeUpstream()
    client = await gateway(
        nursery,
        {
            "targets": {
                "m": {
                    "strategy": "priority",
                    "providers": [
                        {
                            "url": await serve_app(nursery, busy),
                            "concurrency_limit": {"max_concurrent_requests": 1},
                        },
                        {"url": await serve_app(nursery, free)},
                    ],
                }
            }
        },
    )
    async with client, client.stream("POST", CHAT, json=body("m")) as held:
        r = await client.post(CHAT, json=body("m"))
        await held.aread()
    assert r.status_code == 200
    assert len(busy.requests) == 1 and len(free.requests) == 1


async def test_random_disconnects_leak_no_permit(nursery: trio.Nursery) -> None:
    chunks = [b"data: {}\n\n"] * 20
    up = FakeUpstream(
        Reply(headers=[(b"content-type", b"text/event-stream")], chunks=chunks, chunk_delay=0.01)
    )
    gw, url = await start_gateway(
        nursery,
        {
            "auth": {
                "key_definitions": {
                    "k": {"key": "sk-k", "concurrency_limit": {"max_concurrent_requests": 100}}
                }
            },
            "targets": {
                "m": {
                    "providers": [
                        {
                            "url": await serve_app(nursery, up),
                            "concurrency_limit": {"max_concurrent_requests": 100},
                        }
                    ],
                    "concurrency_limit": {"max_concurrent_requests": 100},
                }
            },
        },
    )
    rng = random.Random(42)

    async def one_client(leave_after: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            if leave_after < 0:  # leave before the response head
                with trio.move_on_after(0.005):
                    await client.post(CHAT, json=body("m", stream=True), headers=bearer("sk-k"))
                return
            async with (
                client.stream("POST", CHAT, json=body("m"), headers=bearer("sk-k")) as r,
                aclosing(r.aiter_raw()) as it,  # type: ignore[type-var]
            ):
                seen = 0
                async for _ in it:
                    seen += 1
                    if seen > leave_after:
                        break

    async with trio.open_nursery() as clients:
        for _ in range(40):
            clients.start_soon(one_client, rng.randint(-1, 25))
    table = gw.targets.table
    pool = table.pools["m"]
    with trio.fail_after(5):
        while pool.concurrency is not None and pool.concurrency.active:
            await trio.sleep(0.01)
    assert pool.concurrency is not None and pool.concurrency.active == 0
    assert pool.providers[0].concurrency.active == 0
    assert table.key_concurrency[key_id("sk-k")].active == 0
    with trio.fail_after(5):  # the upstream notices the closed connections a moment later
        while up.active:
            await trio.sleep(0.01)


# -- balancing and failover --------------------------------------------------------------------


async def test_weights_three_to_one_over_http(nursery: trio.Nursery) -> None:
    heavy, light = FakeUpstream(), FakeUpstream()
    gw, url = await start_gateway(
        nursery,
        {
            "targets": {
                "m": {
                    "providers": [
                        {"url": await serve_app(nursery, heavy), "weight": 3},
                        {"url": await serve_app(nursery, light), "weight": 1},
                    ]
                }
            }
        },
    )
    # Seeded, so the draws are the same in every run (400 draws at p=0.75 fall outside the
    # bounds below with probability < 1e-4 for a random seed; this one is well inside).
    gw.proxy.rng = random.Random(19)
    providers = gw.targets.table.pools["m"].providers
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(400):
            assert (await client.post(CHAT, json=body("m"))).status_code == 200
            # The permit is back before the client has its answer: a permit still held when
            # the next request is balanced would steer it to the other provider (least
            # connections), and the ratio would lean towards 1:1.
            assert [p.concurrency.active for p in providers] == [0, 0]
    ratio = len(heavy.requests) / len(light.requests)
    assert 2.0 < ratio < 4.5


async def test_priority_always_picks_the_first_healthy_provider(nursery: trio.Nursery) -> None:
    primary, secondary = FakeUpstream(), FakeUpstream()
    client = await gateway(
        nursery,
        {
            "targets": {
                "m": {
                    "strategy": "priority",
                    "providers": [
                        {"url": await serve_app(nursery, primary)},
                        {"url": await serve_app(nursery, secondary)},
                    ],
                }
            }
        },
    )
    async with client:
        for _ in range(20):
            await client.post(CHAT, json=body("m"))
    assert len(primary.requests) == 20 and secondary.requests == []


async def failover_client(
    nursery: trio.Nursery, first_url: str, backup: FakeUpstream, **provider: Any
) -> httpx.AsyncClient:
    return await gateway(
        nursery,
        {
            "targets": {
                "m": {
                    "strategy": "priority",
                    "fallback": {"enabled": True, "on_status": [5]},
                    "providers": [
                        {"url": first_url, **provider},
                        {"url": await serve_app(nursery, backup)},
                    ],
                }
            }
        },
    )


async def test_failover_on_5xx_reaches_the_backup(nursery: trio.Nursery) -> None:
    failing, backup = FakeUpstream(Reply(status=503, body=b"down")), FakeUpstream()
    client = await failover_client(nursery, await serve_app(nursery, failing), backup)
    async with client:
        r = await client.post(CHAT, json=body("m"))
    assert r.status_code == 200
    assert len(failing.requests) == 1 and len(backup.requests) == 1


async def test_failover_on_timeout_reaches_the_backup(nursery: trio.Nursery) -> None:
    slow, backup = FakeUpstream(Reply(body=chat_completion(), delay=3)), FakeUpstream()
    client = await failover_client(
        nursery, await serve_app(nursery, slow), backup, request_timeout_secs=0.2
    )
    async with client:
        r = await client.post(CHAT, json=body("m"))
    assert r.status_code == 200 and len(backup.requests) == 1


async def test_failover_on_refused_connection_reaches_the_backup(nursery: trio.Nursery) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    backup = FakeUpstream()
    client = await failover_client(nursery, f"http://127.0.0.1:{port}", backup)
    async with client:
        r = await client.post(CHAT, json=body("m"))
    assert r.status_code == 200 and len(backup.requests) == 1


async def test_when_all_fail_the_last_upstream_failure_is_reported(nursery: trio.Nursery) -> None:
    first = FakeUpstream(Reply(status=500, body=b'{"error":"first"}'))
    last = FakeUpstream(Reply(status=503, body=b'{"error":"second"}'))
    client = await failover_client(nursery, await serve_app(nursery, first), last)
    async with client:
        r = await client.post(CHAT, json=body("m"))
    assert r.status_code == 503
    assert r.json() == {"error": "second"}


async def test_retry_when_the_upstream_dies_before_its_first_byte(nursery: trio.Nursery) -> None:
    dying = FakeUpstream(
        Reply(headers=[(b"content-type", b"text/event-stream")], chunks=[b"x"], fail_after=0)
    )
    backup = FakeUpstream()
    client = await failover_client(nursery, await serve_app(nursery, dying), backup)
    async with client:
        r = await client.post(CHAT, json=body("m"))
    assert r.status_code == 200
    assert len(dying.requests) == 1 and len(backup.requests) == 1


async def test_no_retry_after_bytes_reached_the_client(nursery: trio.Nursery) -> None:
    dying = FakeUpstream(
        Reply(
            headers=[(b"content-type", b"text/event-stream")],
            chunks=[b"data: {}\n\n", b"data: {}\n\n"],
            fail_after=1,
        )
    )
    backup = FakeUpstream()
    client = await failover_client(nursery, await serve_app(nursery, dying), backup)
    async with client:
        r = await client.post(CHAT, json=body("m", stream=True))
    assert r.status_code == 200
    assert "upstream_stream_error" in r.text
    assert backup.requests == []


async def test_response_headers_pool_and_provider_provider_wins(nursery: trio.Nursery) -> None:
    up = FakeUpstream(Reply(status=500, body=b"{}"))
    client = await gateway(
        nursery,
        {
            "targets": {
                "m": {
                    "response_headers": {"Input-Price-Per-Token": "1", "X-Pool": "p"},
                    "providers": [
                        {
                            "url": await serve_app(nursery, up),
                            "response_headers": {"Input-Price-Per-Token": "2"},
                        }
                    ],
                }
            }
        },
    )
    async with client:
        r = await client.post(CHAT, json=body("m"))
    assert r.status_code == 500  # kept on upstream errors too
    assert r.headers["input-price-per-token"] == "2"
    assert r.headers["x-pool"] == "p"


def test_trust_is_resolved_provider_over_pool() -> None:
    table = Targets(
        parse_config(
            {
                "targets": {
                    "p": {
                        "trusted": True,
                        "providers": [
                            {"url": "http://a", "trusted": False},
                            {"url": "http://b"},
                        ],
                    },
                    "single": {"url": "http://c", "trusted": True},
                }
            }
        )
    ).table
    assert [p.trusted for p in table.pools["p"].providers] == [False, True]
    assert table.pools["single"].providers[0].trusted is True


# -- backoff, on a virtual clock with a fake transport ----------------------------------------


class ScriptedClient:
    """Stands in for the upstream client: answers 500 ``failures`` times, then 200."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.times: list[float] = []

    async def send(self, provider: Provider, *args: Any) -> httpcore.Response:
        self.times.append(trio.current_time())
        if len(self.times) <= self.failures:
            return httpcore.Response(500, content=b"{}")
        return httpcore.Response(200, content=b"{}")

    async def aclose(self) -> None:
        pass


async def test_backoff_schedule_between_attempts(autojump_clock: trio.testing.MockClock) -> None:
    targets = Targets(
        parse_config(
            {
                "targets": {
                    "m": {
                        "providers": [{"url": "http://upstream.invalid"}],
                        "fallback": {
                            "enabled": True,
                            "on_status": [5],
                            "max_attempts": 4,
                            "backoff": {"initial_ms": 100, "factor": 3, "jitter": "none"},
                        },
                    }
                }
            }
        )
    )
    client = ScriptedClient(failures=3)
    proxy = Proxy(targets, client)  # type: ignore[arg-type]
    request = ProxyRequest(b"POST", b"/v1/chat/completions", b"", [], b"{}", {"model": "m"})
    async with proxy.open_upstream(request) as reply:
        assert reply.status == 200
    gaps = [round(b - a, 6) for a, b in zip(client.times, client.times[1:], strict=False)]
    assert gaps == [0.1, 0.3, 0.9]


async def test_backoff_budget_stops_retrying(autojump_clock: trio.testing.MockClock) -> None:
    targets = Targets(
        parse_config(
            {
                "targets": {
                    "m": {
                        "providers": [{"url": "http://upstream.invalid"}],
                        "fallback": {
                            "enabled": True,
                            "on_status": [5],
                            "max_attempts": 10,
                            "backoff": {"initial_ms": 100, "factor": 2, "jitter": "none"},
                            "max_total_backoff_ms": 350,
                        },
                    }
                }
            }
        )
    )
    client = ScriptedClient(failures=100)
    proxy = Proxy(targets, client)  # type: ignore[arg-type]
    request = ProxyRequest(b"POST", b"/v1/chat/completions", b"", [], b"{}", {"model": "m"})
    async with proxy.open_upstream(request) as reply:
        assert reply.status == 500  # the last upstream answer, honestly
    assert len(client.times) == 3  # 100 + 200 ms fit the 350 ms budget; 400 more would not


async def test_fallback_disabled_returns_the_first_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    targets = Targets(parse_config({"targets": {"m": {"url": "http://upstream.invalid"}}}))
    client = ScriptedClient(failures=1)
    proxy = Proxy(targets, client)  # type: ignore[arg-type]
    request = ProxyRequest(b"POST", b"/x", b"", [], b"{}", {"model": "m"})
    async with proxy.open_upstream(request) as reply:
        assert reply.status == 500
    assert len(client.times) == 1
    with pytest.raises(HTTPError):
        async with proxy.open_upstream(ProxyRequest(b"POST", b"/x", b"", [], b"{}", {})):
            pass


async def test_a_large_last_failure_is_reported_with_a_truthful_length(
    nursery: trio.Nursery,
) -> None:
    big = b"x" * 200_000
    first, last = (
        FakeUpstream(Reply(status=500, body=big)),
        FakeUpstream(Reply(status=503, body=big)),
    )
    client = await failover_client(nursery, await serve_app(nursery, first), last)
    async with client:
        r = await client.post(CHAT, json=body("m"))
    assert r.status_code == 503
    assert int(r.headers["content-length"]) == len(r.content) == 64 * 1024


class HangingClient(ScriptedClient):
    """An upstream that never answers its first ``hangs`` requests."""

    def __init__(self, hangs: int) -> None:
        super().__init__(failures=0)
        self.hangs = hangs

    async def send(self, provider: Provider, *args: Any) -> httpcore.Response:
        self.times.append(trio.current_time())
        if len(self.times) <= self.hangs:
            await trio.sleep_forever()
        return httpcore.Response(200, content=b"{}")


def timeout_targets(fallback: bool) -> Targets:
    pool: dict[str, Any] = {
        "providers": [
            {"url": "http://slow.invalid", "request_timeout_secs": 5},
            {"url": "http://fast.invalid"},
        ],
        "strategy": "priority",
    }
    if fallback:
        pool["fallback"] = {"enabled": True}
    return Targets(parse_config({"targets": {"m": pool}}))


async def test_header_timeout_fires_at_request_timeout_secs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    proxy = Proxy(timeout_targets(fallback=False), HangingClient(hangs=1))  # type: ignore[arg-type]
    start = trio.current_time()
    with pytest.raises(HTTPError) as info:
        async with proxy.open_upstream(
            ProxyRequest(b"POST", b"/x", b"", [], b"{}", {"model": "m"})
        ):
            pass
    assert info.value.status == 504
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_a_timeout_falls_back_to_the_next_provider(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = HangingClient(hangs=1)
    proxy = Proxy(timeout_targets(fallback=True), client)  # type: ignore[arg-type]
    request = ProxyRequest(b"POST", b"/x", b"", [], b"{}", {"model": "m"})
    async with proxy.open_upstream(request) as reply:
        assert reply.status == 200
    assert request.provider_index == 1
    assert client.times == [pytest.approx(0.0), pytest.approx(5.0)]
