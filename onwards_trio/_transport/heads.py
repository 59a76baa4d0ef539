"""The check on every HTTP head we write (requests upstream, responses to clients).

A head must not carry a control character other than HTAB, nor a CR or LF that is not one of
the CRLF line ends we wrote: otherwise a configured, forwarded or relayed value could split
the message (request or response smuggling). One ``bytes.translate`` at C speed keeps just the
control characters; they must be exactly the CRLFs of the head's lines. (A regular expression
doing the same cost about ten times as much: 5 % of a proxied request's CPU, for two heads.)
"""

from __future__ import annotations

__all__ = ["clean_head"]

# Every byte but the control characters; HTAB counts as text.
_TEXT = bytes(b for b in range(256) if b == 0x09 or (0x20 <= b < 0x7F) or b > 0x7F)


def clean_head(head: bytes, lines: int) -> bool:
    """True when the control characters in ``head``, written as ``lines`` lines each ended by
    CRLF, are exactly those line ends."""
    return head.translate(None, _TEXT) == b"\r\n" * lines
