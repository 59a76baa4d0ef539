"""Sampling decisions: ours for the standard samplers are the SDK sampler's own.

The standard samplers (``OTEL_TRACES_SAMPLER``) are decided without calling the SDK (it cost
more than the rest of an unsampled trace); for any trace id and any remote parent, the decision
and the trace state kept must be exactly what the SDK's sampler says. Through the gateway: a
remote parent's sampled flag is followed by a parent-based sampler, and the ratio sampler
decides by the trace id.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)

from onwards_trio import Gateway, parse_config
from onwards_trio._ops.otlp import KIND_SERVER, Exporter, export_settings
from onwards_trio._ops.tracing import Telemetry
from tests.ops.otlp_receiver import otlp_receiver
from tests.support import FakeUpstream, serve_app

SAMPLERS: list[Sampler] = [
    ALWAYS_ON,
    ALWAYS_OFF,
    DEFAULT_ON,
    DEFAULT_OFF,
    TraceIdRatioBased(0.25),
    ParentBasedTraceIdRatio(0.5),
    ParentBased(TraceIdRatioBased(0.1), remote_parent_sampled=TraceIdRatioBased(0.7)),
]


def _telemetry(sampler: Sampler) -> Telemetry:
    exporter = Exporter(export_settings("http://127.0.0.1:1/v1/traces", 1.0, {}))
    return Telemetry(exporter, sampler=sampler)


_REMOTES = st.one_of(
    st.none(),
    st.tuples(
        st.integers(1, 2**64 - 1),
        st.booleans(),
        st.sampled_from(["", "k=v", "a=1,b=2"]),
    ),
)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.get_description())
@given(trace_id=st.integers(1, 2**128 - 1), remote=_REMOTES)
def test_standard_samplers_decide_as_the_sdk(
    sampler: Sampler, trace_id: int, remote: tuple[int, bool, str] | None
) -> None:
    ours = _telemetry(sampler)
    assert ours.bounds is not None  # decided without the SDK's call
    sdk = _telemetry(sampler)
    sdk.bounds = None  # the SDK's sampler is called, as for a sampler we do not know
    parent = None if remote is None else (trace_id, *remote)
    attributes = {"http.route": "/v1/chat/completions"}
    decided = ours._decide(trace_id, parent, "POST /v1/chat/completions", KIND_SERVER, attributes)
    asked = sdk._decide(trace_id, parent, "POST /v1/chat/completions", KIND_SERVER, attributes)
    assert decided == asked


@pytest.fixture
def _ratio_sampler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    yield


def _traceparent(low: int, flags: str) -> str:
    """A caller's trace whose id's low 64 bits are ``low`` (what the ratio sampler reads)."""
    return f"00-{0xABC:016x}{low:016x}-00f067aa0ba902b7-{flags}"


@pytest.mark.usefixtures("_ratio_sampler")
async def test_a_parent_based_ratio_sampler_follows_the_callers_flag_and_still_propagates(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream()
    high, low = 2**64 - 2, 1  # above and below the 0.5 bound
    async with otlp_receiver() as receiver:
        url = await serve_app(nursery, upstream)
        config = {
            "targets": {"gpt": {"url": url, "propagate_trace_context": True}},
            "telemetry": {"endpoint": receiver.url},
        }
        gateway = Gateway(parse_config(config))
        info = await nursery.start(gateway.serve, "127.0.0.1", 0)
        body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(base_url=info.url, timeout=10) as client:
            # not sampled by the caller: not recorded, whatever the trace id
            for low_bits in (low, high):
                headers = {"traceparent": _traceparent(low_bits, "00")}
                r = await client.post("/v1/chat/completions", json=body, headers=headers)
                assert r.status_code == 200
            headers = {"traceparent": _traceparent(high, "01")}
            r = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200
        with trio.fail_after(10):
            spans = await receiver.wait_for(1, "POST /v1/chat/completions")
    server = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert [s.trace_id[16:] for s in server] == [f"{high:016x}"]
    # An opted-in provider is told the trace even when it is not recorded: the caller's trace
    # id, not sampled, and the attempt's own span id.
    for sent, low_bits in zip(upstream.requests[:2], (low, high), strict=True):
        _, trace_id, parent_id, flags = sent.headers["traceparent"].split("-")
        assert (trace_id[16:], flags) == (f"{low_bits:016x}", "00")
        assert parent_id not in ("00f067aa0ba902b7", "0" * 16)
