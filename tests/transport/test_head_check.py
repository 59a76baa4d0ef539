"""The check on every head the gateway writes (``clean_head``): a head of CRLF-ended lines
passes exactly when no line holds a control character other than HTAB. The request and
response tests (test_client.py, test_server_header_values.py, test_smuggling.py) show it
refusing over sockets; this one holds it to that rule on any bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from onwards_trio._transport.heads import clean_head

_CONTROLS = bytes(b for b in range(256) if (b < 0x20 and b != 0x09) or b == 0x7F)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                lambda a, c, b: a + bytes([c]) + b,
                st.binary(max_size=10),
                st.sampled_from(_CONTROLS),
                st.binary(max_size=10),
            ),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_a_head_passes_exactly_when_no_line_holds_a_control_character(
    lines: list[bytes],
) -> None:
    head = b"".join(line + b"\r\n" for line in lines)
    clean = not any(c in _CONTROLS for line in lines for c in line)
    assert clean_head(head, len(lines)) is clean
