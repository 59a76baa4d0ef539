"""The sans-io SSE codec: framing, field parsing, fragmentation, size cap."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onwards_trio._transport.sse import (
    SSEDecoder,
    SSEEvent,
    SSEEventTooLarge,
    SSEFramer,
    encode_event,
)

STREAM = (
    b"data: a\r\n\r\n: comment\nevent: x\ndata: b\ndata: c\n\nid: 7\ndata: \xc3\xa9\r\r"
    b"retry: 3000\ndata: z\n\n"
)
EVENTS = [
    SSEEvent(data="a"),
    SSEEvent(data="b\nc", event="x"),
    SSEEvent(data="é", id="7"),
    SSEEvent(data="z", id="7", retry=3000),
]


def test_crlf_lf_and_cr_line_endings_and_fields() -> None:
    assert SSEDecoder().feed(STREAM) == EVENTS


@given(st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=40))
def test_any_fragmentation_gives_the_same_events(cuts: list[int]) -> None:
    decoder = SSEDecoder()
    out: list[SSEEvent] = []
    i = 0
    for n in cuts * 10:
        out += decoder.feed(STREAM[i : i + n])
        i += n
    out += decoder.feed(STREAM[i:])
    out += decoder.close()
    assert out == EVENTS  # incl. the UTF-8 character split across chunks


@given(st.binary(max_size=60).filter(lambda v: b"\n" not in v and b"\r" not in v))
def test_a_lone_data_line_parses_as_the_general_walk_does(value: bytes) -> None:
    """The one-data-line shortcut gives what the full field walk gives (a leading comment
    line forces the walk): same data, same decoding of invalid UTF-8, same last id."""
    decoder = SSEDecoder()
    decoder.feed(b"id: 41\ndata: x\n\n")
    assert decoder.parse_block(b"data: " + value + b"\n\n") == decoder.parse_block(
        b":\ndata: " + value + b"\n\n"
    )


def test_framer_returns_raw_blocks_with_their_terminators() -> None:
    assert SSEFramer().feed(b"data: 1\n\ndata: 2\r\n\r\ndata: 3") == [
        b"data: 1\n\n",
        b"data: 2\r\n\r\n",
    ]


def test_unterminated_last_event_is_dispatched_at_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: tail") == []
    assert decoder.close() == [SSEEvent(data="tail")]


def test_an_oversized_event_raises_instead_of_truncating() -> None:
    with pytest.raises(SSEEventTooLarge):
        SSEFramer(max_event_size=16).feed(b"data: " + b"x" * 64)


def test_events_before_an_oversized_one_are_still_delivered() -> None:
    framer = SSEFramer(max_event_size=16)
    assert framer.feed(b"data: ok\n\ndata: " + b"x" * 64) == [b"data: ok\n\n"]
    with pytest.raises(SSEEventTooLarge):
        framer.feed(b"more")


def test_large_events_below_the_cap_pass() -> None:
    big = "y" * 200_000
    assert SSEDecoder().feed(encode_event(big)) == [SSEEvent(data=big)]


def test_encode_event_with_name_id_and_multiline_data() -> None:
    assert encode_event("a\nb", event="e", id=3) == b"event: e\nid: 3\ndata: a\ndata: b\n\n"
