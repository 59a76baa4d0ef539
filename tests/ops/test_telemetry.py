"""When tracing is on, and what happens without the SDK (``_ops/telemetry.py``)."""

from __future__ import annotations

import sys

import pytest

from onwards_trio._config import TelemetrySpec
from onwards_trio._errors import ConfigError
from onwards_trio._ops.telemetry import create_telemetry, traces_endpoint, tracing_requested

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}


def test_off_without_an_endpoint() -> None:
    assert not tracing_requested(TelemetrySpec(), {})
    assert create_telemetry(TelemetrySpec(), {}) is None


@pytest.mark.parametrize(
    "env",
    [ENDPOINT, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}],
)
def test_on_with_an_endpoint_variable(env: dict[str, str]) -> None:
    assert tracing_requested(TelemetrySpec(), env)


def test_on_with_a_config_endpoint() -> None:
    assert tracing_requested(TelemetrySpec(endpoint="http://collector:4318"), {})


@pytest.mark.parametrize(
    ("spec", "env"),
    [
        (TelemetrySpec(enabled=False), ENDPOINT),
        (TelemetrySpec(enabled=True), {**ENDPOINT, "OTEL_SDK_DISABLED": "true"}),
        (TelemetrySpec(), {**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}),
    ],
)
def test_switched_off_explicitly(spec: TelemetrySpec, env: dict[str, str]) -> None:
    assert not tracing_requested(spec, env)


@pytest.mark.parametrize("base", ["http://c:4318", "http://c:4318/", "http://c:4318/v1/traces"])
def test_endpoint_is_a_base_url_as_the_variable_is(base: str) -> None:
    assert traces_endpoint(base) == "http://c:4318/v1/traces"


def test_config_asking_for_traces_without_the_sdk_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace.sampling", None)
    with pytest.raises(ConfigError, match=r"onwards-trio\[otel\]"):
        create_telemetry(TelemetrySpec(enabled=True, endpoint="http://c:4318"), {})


def test_environment_asking_for_traces_without_the_sdk_runs_without(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace.sampling", None)
    assert create_telemetry(TelemetrySpec(), ENDPOINT) is None
    assert "running without traces" in caplog.text


def test_an_endpoint_that_is_not_http_is_a_config_error_without_echoing_it() -> None:
    spec = TelemetrySpec(endpoint="ftp://user:s3cret@collector:4318")
    with pytest.raises(ConfigError, match="not an http") as raised:
        create_telemetry(spec, {})
    assert "s3cret" not in str(raised.value)
