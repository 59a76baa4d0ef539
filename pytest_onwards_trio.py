"""The pytest plugin of ``onwards_trio.testing`` (entry point ``pytest11``).

Deliberately tiny and outside the ``onwards_trio`` package: pytest imports every ``pytest11``
module at start-up, and importing ``onwards_trio`` loads the whole gateway (about 0.35 s). Here
only the options, one hook and the fixtures are defined; the gateway is imported when a test
first asks for a fixture, so a session that uses none pays nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from onwards_trio.testing import Harness

_HARNESS = pytest.StashKey["Harness"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("onwards_trio", "onwards_trio.testing (scripted and recorded models)")
    group.addoption(
        "--onwards-record",
        action="store_true",
        default=False,
        help="proxy recorded aliases to the real providers and (re)write their cassettes",
    )
    group.addoption(
        "--onwards-upstreams",
        default=None,
        metavar="FILE",
        help="JSON file naming the real provider of each recorded alias "
        "(default: $ONWARDS_UPSTREAMS)",
    )
    parser.addini(
        "onwards_cassette_dir",
        "cassette directory, relative to each test file (default: cassettes)",
        default="cassettes",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "onwards_cassette(path): this test's cassette file, relative to the test file"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A test that passed although the harness could not answer a request as the test meant
    (script exhausted or broken, no recorded match) fails here, with the reason; a recording
    test that passed writes its cassette."""
    yield
    harness = item.stash.get(_HARNESS, None)
    if harness is not None:
        from onwards_trio.testing._pytest import check

        check(harness)
        harness.save_cassette()


def _start(request: pytest.FixtureRequest) -> Harness:
    from onwards_trio.testing._pytest import make_harness

    harness = make_harness(request)
    request.node.stash[_HARNESS] = harness
    return harness


@pytest.fixture
def onwards(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """A gateway on a real loopback port in front of scripted or recorded models, served from a
    background thread: for sync tests and asyncio/anyio tests (any client)."""
    from onwards_trio.testing._harness import serve_in_thread

    harness = _start(request)
    with serve_in_thread(harness):
        yield harness


@pytest.fixture
async def onwards_trio(request: pytest.FixtureRequest, nursery: Any) -> AsyncIterator[Harness]:
    """The same, served from the test's own nursery (pytest-trio tests)."""
    harness = _start(request)
    await nursery.start(harness.run)
    yield harness
