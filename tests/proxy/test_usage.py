"""Token usage read from upstream bodies and streams (``_proxy/usage.py``, a pure module)."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from onwards_trio._ops.access import WholeBodies
from onwards_trio._proxy.usage import (
    StreamUsageStripper,
    Usage,
    UsageKeeper,
    UsageScanner,
    find_usage,
    stream_usage_requested,
    usage_from_object,
    with_stream_usage,
)


def _event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


CHAT_BODY = orjson.dumps(
    {
        "id": "c",
        "choices": [{"index": 0, "message": {"content": 'a "usage": {"prompt_tokens": 99}'}}],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 7,
            "total_tokens": 19,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
    }
)
# A chat stream after include_usage: "usage": null on every chunk, then the usage-only chunk.
CHAT_STREAM = (
    _event({"id": "c", "choices": [{"index": 0, "delta": {"content": "usage"}}], "usage": None})
    + _event({"id": "c", "choices": [{"index": 0, "delta": {"content": "!"}}], "usage": None})
    + _event({"id": "c", "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 3}})
    + b"data: [DONE]\n\n"
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def test_chat_completion_usage_maps_cached_and_reasoning_tokens() -> None:
    assert find_usage(CHAT_BODY) == Usage(12, 7, 4, 2)


def test_open_responses_usage_shape() -> None:
    raw = {
        "input_tokens": 20,
        "output_tokens": 5,
        "input_tokens_details": {"cached_tokens": 10},
        "output_tokens_details": {"reasoning_tokens": 1},
    }
    assert usage_from_object(raw) == Usage(20, 5, 10, 1)


def test_anthropic_cache_reads_and_writes_count_as_input() -> None:
    raw = {
        "input_tokens": 3,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 7,
        "output_tokens": 9,
    }
    assert usage_from_object(raw) == Usage(110, 9, 100, 0)


def test_anthropic_stream_merges_start_and_delta() -> None:
    stream = (
        b"event: message_start\n"
        + _event({"type": "message_start", "message": {"usage": {"input_tokens": 25}}})
        + b"event: message_delta\n"
        + _event({"type": "message_delta", "usage": {"output_tokens": 15}})
    )
    assert find_usage(stream) == Usage(25, 15)


def test_body_without_usage_has_none() -> None:
    assert find_usage(b'{"usage": null, "data": [1, 2]}') is None
    assert find_usage(b"not json at all") is None


def test_junk_figures_count_as_zero() -> None:
    assert usage_from_object({"prompt_tokens": "12", "completion_tokens": True}) == Usage()


def test_usage_adds_up() -> None:
    assert Usage(1, 2, 3, 4) + Usage(10, 20, 30, 40) == Usage(11, 22, 33, 44)
    assert Usage(5, 6).total_tokens == 11


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_scanner_finds_the_same_usage_however_the_body_is_cut(cuts: list[int]) -> None:
    for body, expected in ((CHAT_BODY, Usage(12, 7, 4, 2)), (CHAT_STREAM, Usage(8, 3))):
        scanner = UsageScanner()
        passed = b"".join(scanner.feed(chunk) for chunk in _chunks(body, cuts)) + scanner.close()
        assert passed == body
        assert scanner.usage == expected


# Bodies a kept body's usage must be read from exactly as a scanner reads it: the usual flat
# object (compact or spaced), the details shape, two keys, an object with a brace in a string,
# a key with no object, none at all, a number JSON refuses, a key split over a NUL.
_KEPT_BODIES = (
    b'{"id": "c", "usage": {"prompt_tokens": 10, "completion_tokens": 40, "total_tokens": 50}}',
    b'{"id":"c","usage":{"prompt_tokens":3,"completion_tokens":0}}',
    b'{"id": "c",\n  "usage" :\r\n\t{ "prompt_tokens" : 7 , "completion_tokens" : 1 }\n}',
    CHAT_BODY,
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "usage": {"completion_tokens": 5}}',
    b'{"usage": {"prompt_tokens": 4, "completion_tokens": 2, "note": "a{b"}}',
    b'{"usage": null, "type": "usage"}',
    b'{"data": [1, 2, 3]}',
    b'{"usage": {"prompt_tokens": 01, "completion_tokens": 2}}',
    b'{"usage": {"prompt_tokens": -1, "completion_tokens": 2.5}}',
    b'{"usage": {"input_tokens": 6, "output_tokens": 2, "cache_read_input_tokens": 3}}',
    b'{"u": "\x00", "usage": {"prompt_tokens": 8, "completion_tokens": 9}}',
    b"",
    b'{"usage": {"prompt_tokens": 10, "completion_tokens": 40, "total_tokens": 50}}',
    b'{"usage" :\n{ "prompt_tokens" : 0 ,"completion_tokens":\t7 , "total_tokens" : 7 } }',
    b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 07}}',
    b'{"usage"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}',
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, "usage": 1}',
)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(_KEPT_BODIES),
            st.lists(st.integers(min_value=0, max_value=10_000), max_size=4),
        ),
        min_size=1,
        max_size=20,  # alone (a few) and together (many)
    )
)
def test_kept_bodies_read_together_give_what_a_scanner_gives(
    bodies: list[tuple[bytes, list[int]]],
) -> None:
    """The access line's usage, read by its writer for a whole batch at once, is exactly what
    scanning each body as it passed would have found, however the bodies were cut and
    whatever else is in the batch."""
    keepers, expected = [], []
    for body, cuts in bodies:
        keeper, scanner = UsageKeeper(), UsageScanner()
        for chunk in _chunks(body, cuts):
            assert keeper.feed(chunk) is chunk
            scanner.feed(chunk)
        keepers.append(keeper)
        expected.append(scanner.usage)
    UsageKeeper.read_all(keepers)  # type: ignore[arg-type]
    found = [None if k.found is None else Usage(*k.found) for k in keepers]
    assert found == expected
    assert [k.usage for k in keepers] == expected


# Bodies in the usual object's shape, read for a batch at once (``_template_counts``), and
# near misses that a scanner reads otherwise: each must come out as a scanner reads it.
_PLAIN_BODIES = (
    b'{"id": "c", "usage": {"prompt_tokens": 10, "completion_tokens": 40, "total_tokens": 50}}',
    b'{"id":"c","usage":{"prompt_tokens":3,"completion_tokens":0,"total_tokens":3}}',
    b'{"usage": {"prompt_tokens": 123456789012345678, "completion_tokens": 9, "total_tokens": 1}}',
    b'{"usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}, "x": [1, 2]}\n',
    b'{"a": "\x00", "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}',
    b'{"data": "usage-free"}',
    b'{"usage": {"prompt_tokens": 01, "completion_tokens": 2, "total_tokens": 3}}',
    b'{"usage": {"prompt_tokens": -1, "completion_tokens": 2, "total_tokens": 1}}',
    b'{"usage": {"prompt_tokens": 1.0, "completion_tokens": 2, "total_tokens": 3}}',
    b'{"usage": {"prompt_tokens": 1e2, "completion_tokens": 2, "total_tokens": 3}}',
    b'{"usage":{"prompt_tokens":99999999999999999999,"completion_tokens":2,"total_tokens":3}}',
    b'{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":0,"total_tokens":0}}',
    b'{"usage":{"prompt_tokens":18446744073709551616,"completion_tokens":0,"total_tokens":0}}',
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3',
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3 }}',
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, "usage": 1}',
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, "t": "usage"}',
    b'{"usage"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}',
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": true}}',
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2,"total_tokens": 3}}',
    b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3, "x": 1}}',
)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(_PLAIN_BODIES[:5] * 6 + _PLAIN_BODIES[5:]),  # mostly the usual
            st.lists(st.integers(min_value=0, max_value=10_000), max_size=3),
        ),
        min_size=8,  # read together
        max_size=40,
    )
)
def test_usual_bodies_read_as_a_batch_give_what_a_scanner_gives(
    bodies: list[tuple[bytes, list[int]]],
) -> None:
    """A batch's usual usage objects are read for the batch at once; any near miss in it (a
    number JSON refuses or reads otherwise, a second key, white space elsewhere, an object
    not closed) still comes out exactly as a scanner reads it."""
    keepers, expected = [], []
    for body, cuts in bodies:
        keeper, scanner = UsageKeeper(), UsageScanner()
        for chunk in _chunks(body, cuts):
            keeper.feed(chunk)
            scanner.feed(chunk)
        keepers.append(keeper)
        expected.append(scanner.usage)
    UsageKeeper.read_all(keepers)  # type: ignore[arg-type]
    assert [None if k.found is None else Usage(*k.found) for k in keepers] == expected


@given(
    st.lists(
        st.sampled_from(_KEPT_BODIES + _PLAIN_BODIES[:5] * 4 + _PLAIN_BODIES[5:]),
        min_size=1,
        max_size=40,  # alone (a few) and together (many)
    )
)
def test_whole_bodies_read_together_give_what_a_scanner_gives(bodies: list[bytes]) -> None:
    """A body that came whole, handed to the access line as its bytes (no keeper), is read
    with its batch, or alone now, exactly as a scanner fed that one chunk reads it."""
    expected = []
    for body in bodies:
        scanner = UsageScanner()
        scanner.feed(body)
        expected.append(scanner.usage)
    found = WholeBodies.counts(list(bodies))
    assert [None if f is None else Usage(*f) for f in found] == expected
    assert [WholeBodies.usage(body) for body in bodies] == expected


def test_a_large_kept_body_is_scanned_as_it_passes_not_held() -> None:
    tail = b'"usage": {"prompt_tokens": 5, "completion_tokens": 6}}'
    body = b'{"content": "' + b"x" * 100_000 + b'", ' + tail
    keeper = UsageKeeper()
    for chunk in _chunks(body, list(range(0, len(body), 1000))):
        keeper.feed(chunk)
    assert sum(map(len, keeper.chunks)) <= 8192  # bounded, whatever the body's size
    UsageKeeper.read_all([keeper])
    assert keeper.found == Usage(5, 6)


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_stripper_removes_what_include_usage_added(cuts: list[int]) -> None:
    stripper = StreamUsageStripper()
    out = b"".join(stripper.feed(c) for c in _chunks(CHAT_STREAM, cuts)) + stripper.close()
    assert out == (
        _event({"id": "c", "choices": [{"index": 0, "delta": {"content": "usage"}}]})
        + _event({"id": "c", "choices": [{"index": 0, "delta": {"content": "!"}}]})
        + b"data: [DONE]\n\n"
    )
    assert stripper.usage == Usage(8, 3)


def test_stripper_keeps_a_stream_without_usage_byte_for_byte() -> None:
    stream = b'data: {"a": 1}\r\n\r\ndata: [DONE]\r\n\r\n'
    stripper = StreamUsageStripper()
    assert stripper.feed(stream[:7]) + stripper.feed(stream[7:]) + stripper.close() == stream
    assert stripper.usage is None


def test_stream_usage_request_keeps_other_options() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"include_obfuscation": False}}
    assert not stream_usage_requested(body)
    asked = with_stream_usage(body)
    assert asked["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert stream_usage_requested(asked)
