"""Fixtures shared by the tracing tests of this folder."""

from __future__ import annotations

import pytest


@pytest.fixture
def fast_otel_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Export every 50 ms (the standard variable, inherited by gateway processes too), so
    tests wait for spans, not for a tick; no endpoint, switch or sampler from the outside."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
