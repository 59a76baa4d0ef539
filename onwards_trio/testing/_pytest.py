"""The pytest side of the harness: where a test's cassette lives, where the real providers are,
and what fails the test at teardown. Imported by the plugin only when a fixture is used."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from onwards_trio.testing._harness import Harness
from onwards_trio.testing._upstream import RealUpstream

__all__ = ["cassette_path", "check", "load_upstreams", "make_harness"]

UPSTREAMS_ENV = "ONWARDS_UPSTREAMS"


def _real(spec: Any, where: str) -> RealUpstream:
    """One real provider from either file shape (ours, or an onwards config target)."""
    if isinstance(spec, list):  # an onwards legacy target list: its first provider
        spec = spec[0]
    if "providers" in spec:
        spec = spec["providers"][0]
    url = spec.get("url")
    if not isinstance(url, str):
        raise pytest.UsageError(f"{where}: needs a 'url'")
    key = spec.get("onwards_key") or spec.get("key")
    key_env = spec.get("key_env")
    if key is None and isinstance(key_env, str):
        key = os.environ.get(key_env)
        if key is None:
            raise pytest.UsageError(f"{where}: environment variable {key_env} is not set")
    header = spec.get("upstream_auth_header_name") or "authorization"
    default_prefix = "Bearer " if header.lower() == "authorization" else ""
    prefix = spec.get("upstream_auth_header_prefix")
    return RealUpstream(
        url=url,
        key=key,
        header=header,
        prefix=default_prefix if prefix is None else prefix,
    )


def load_upstreams(path: str | None) -> dict[str, RealUpstream]:
    """``{alias: provider}`` from the upstreams file: ``{"alias": {"url", "key_env"}}`` or an
    onwards ``config.json`` (its ``targets``, first provider each)."""
    if not path:
        return {}
    try:
        data = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise pytest.UsageError(f"--onwards-upstreams {path}: {exc}") from None
    targets = data.get("targets", data) if isinstance(data, dict) else None
    if not isinstance(targets, dict):
        raise pytest.UsageError(f"--onwards-upstreams {path}: expected a JSON object of aliases")
    return {alias: _real(spec, f"{path}: {alias}") for alias, spec in targets.items()}


def cassette_path(request: pytest.FixtureRequest) -> Path:
    """``<test dir>/<onwards_cassette_dir>/<module>/<test name>.json`` unless the test's
    ``onwards_cassette`` marker names a file (relative to the test file's directory)."""
    base = request.path.parent
    marker = request.node.get_closest_marker("onwards_cassette")
    if marker is not None and marker.args:
        return base / str(marker.args[0])
    folder = str(request.config.getini("onwards_cassette_dir"))
    name = re.sub(r"[^\w.-]+", "_", request.node.name).strip("_")
    return base / folder / request.path.stem / f"{name}.json"


def make_harness(request: pytest.FixtureRequest) -> Harness:
    config = request.config
    recording = bool(config.getoption("--onwards-record"))
    upstreams = (
        load_upstreams(config.getoption("--onwards-upstreams") or os.environ.get(UPSTREAMS_ENV))
        if recording
        else {}
    )
    return Harness(cassette=cassette_path(request), recording=recording, upstreams=upstreams)


def check(harness: Harness) -> None:
    """Fail the test when the harness could not answer some request as the test meant."""
    problems = harness.problems
    if problems:
        pytest.fail("onwards_trio.testing:\n\n" + "\n\n".join(problems), pytrace=False)
