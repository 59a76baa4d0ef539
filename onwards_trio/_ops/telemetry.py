"""Whether tracing is on, and the one place that loads the OpenTelemetry SDK when it is.

Tracing is on when the config's ``telemetry.enabled`` says so, or — left unset — when an OTLP
endpoint is configured (``telemetry.endpoint``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); ``OTEL_SDK_DISABLED=true`` and
``OTEL_TRACES_EXPORTER=none`` turn it off. Off, nothing here imports the SDK and the request
path pays one ``is None`` test per hook: the gateway, proxy and loop hold ``None`` instead of a
:class:`~onwards_trio._ops.tracing.Telemetry`.

The standard variables keep their meaning: ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_EXPORTER_OTLP_(TRACES_)HEADERS``,
``_TIMEOUT``, ``_COMPRESSION``, ``_CERTIFICATE``, ``_CLIENT_CERTIFICATE``, ``_CLIENT_KEY``, and
the batch settings ``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_BSP_MAX_QUEUE_SIZE``,
``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``; the config section's fields override them. The SDK supplies
the sampler and the resource; spans are encoded and sent by ``otlp.py``.

:func:`current_telemetry` is how code below the gateway (the loop, which is also a library
function) finds the tracer of the request it runs for: the gateway sets it per request in a
context variable, which Trio hands to every task the request starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING

from onwards_trio._errors import ConfigError

if TYPE_CHECKING:
    from onwards_trio._config import TelemetrySpec
    from onwards_trio._ops.tracing import Telemetry

__all__ = [
    "activate",
    "create_telemetry",
    "current_telemetry",
    "traces_endpoint",
    "tracing_requested",
]

log = logging.getLogger("onwards_trio.telemetry")

_current: ContextVar[Telemetry | None] = ContextVar("onwards_trio_telemetry", default=None)
_TRACES_PATH = "/v1/traces"


def current_telemetry() -> Telemetry | None:
    """The tracer of the request this task works for (``None``: tracing is off)."""
    return _current.get()


def activate(telemetry: Telemetry | None) -> None:
    """Make ``telemetry`` current for this task and the tasks it starts (a look before the
    set: a connection's requests run in one task, and setting a context variable copies the
    context's mapping)."""
    if _current.get() is not telemetry:
        _current.set(telemetry)


def _flag(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip().lower()


def tracing_requested(spec: TelemetrySpec | None, environ: Mapping[str, str]) -> bool:
    """Whether the config and the environment ask for traces (see the module docstring)."""
    if _flag(environ, "OTEL_SDK_DISABLED") == "true":
        return False
    if spec is not None and spec.enabled is not None:
        return spec.enabled
    if _flag(environ, "OTEL_TRACES_EXPORTER") == "none":
        return False
    return bool(
        (spec is not None and spec.endpoint)
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def traces_endpoint(base: str) -> str:
    """The exporter's URL for a base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` is read (the SDK
    adds ``/v1/traces`` to the variable, but not to an explicit endpoint)."""
    base = base.rstrip("/")
    return base if base.endswith(_TRACES_PATH) else base + _TRACES_PATH


def create_telemetry(
    spec: TelemetrySpec | None, environ: Mapping[str, str] | None = None
) -> Telemetry | None:
    """A :class:`Telemetry` when tracing is requested, else ``None`` (the SDK is not loaded).

    Asked for in the config without the ``otel`` extra installed: a :class:`ConfigError`.
    Asked for only by the environment: a warning, and the gateway runs without traces.
    """
    env = os.environ if environ is None else environ
    if not tracing_requested(spec, env):
        return None
    try:
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        from onwards_trio._ops.otlp import Exporter, export_settings
        from onwards_trio._ops.tracing import Telemetry
    except ImportError as exc:
        message = (
            "tracing is on but the OpenTelemetry SDK is not installed "
            f"(pip install 'onwards-trio[otel]'): {exc}"
        )
        if spec is not None and spec.enabled:
            raise ConfigError([message]) from None
        log.warning("%s; running without traces", message)
        return None
    endpoint = spec.endpoint if spec is not None else None
    timeout = exporter_timeout(spec.export_timeout_secs if spec is not None else None, env)
    settings = export_settings(traces_endpoint(endpoint) if endpoint else None, timeout, env)
    try:
        exporter = Exporter(settings)
    except ValueError as exc:
        raise ConfigError([f"telemetry: the OTLP endpoint is {exc}"]) from None
    ratio = spec.sample_ratio if spec is not None else None
    max_queue = spec.max_queue_size if spec is not None else None
    return Telemetry(
        exporter,
        service_name=spec.service_name if spec is not None else None,
        sampler=ParentBased(TraceIdRatioBased(ratio)) if ratio is not None else None,
        record_content=spec.record_content if spec is not None else False,
        max_queue=max_queue or int(_number(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)),
        batch=int(_number(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)),
        interval=_number(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000.0,
        export_timeout=timeout,
    )


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    """A positive number from the environment (anything else: ``default``)."""
    try:
        value = float(environ[name])
    except (KeyError, ValueError):
        return default
    return value if value > 0 else default


def exporter_timeout(timeout: float | None, environ: Mapping[str, str]) -> float:
    """How long one export may take: the config's, else ``OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT``
    (seconds), else 10 s."""
    if timeout is not None:
        return timeout
    for name in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        try:
            return float(environ[name])
        except (KeyError, ValueError):
            continue
    return 10.0
