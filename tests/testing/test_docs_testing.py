"""Every example in docs/testing.md runs: each ```python block that starts with a
``# test_<name>.py`` line is a complete test file, written out and run with pytest."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from onwards_trio.testing import Harness, serve_in_thread
from tests.testing.test_plugin import run

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
_BLOCK = re.compile(r"```python\n(# (test_\w+\.py)\n.*?)```", re.DOTALL)


def _examples() -> dict[str, str]:
    found = {name: body for body, name in _BLOCK.findall(DOC.read_text())}
    assert len(found) >= 6, "the docs lost their examples"
    return found


def test_every_example_in_the_testing_guide_passes(pytester: pytest.Pytester) -> None:
    examples = _examples()
    for name, body in examples.items():
        pytester.path.joinpath(name).write_text(body)
    # The record/replay example replays a cassette: record it first, against a stand-in for
    # the real provider (itself a scripted model behind a gateway).
    provider = Harness()
    with serve_in_thread(provider):
        provider.model("gpt-4o", "The sky is blue.")
        upstreams = {"gpt-4o": {"url": provider.base_url, "key": "sk-docs-provider"}}
        pytester.path.joinpath("upstreams.json").write_bytes(orjson.dumps(upstreams))
        recorded = run(
            pytester, "--onwards-record", "--onwards-upstreams=upstreams.json", "test_recorded.py"
        )
        recorded.assert_outcomes(passed=1)
    assert (pytester.path / "cassettes" / "test_recorded" / "test_summary.json").exists()
    result = run(pytester, *examples)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= len(examples), outcomes
    assert not {"failed", "errors", "error"} & set(outcomes), outcomes
