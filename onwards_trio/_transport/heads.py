"""The check on every HTTP head we write (requests upstream, responses to clients).

A head must not carry a control character other than HTAB, nor a CR or LF that is not one of
the CRLF line ends we wrote: otherwise a configured, forwarded or relayed value could split
the message (request or response smuggling). Two passes at C speed: ``bytes.translate``
with a table (its fast path: no deletions) turns every control character but HTAB into CR, and
``count`` counts them; the head holds the CRLFs of its lines, so anything more is a control
character of a value. (A ``translate`` deleting the text, which must leave exactly the CRLFs,
set up its 256-entry table for each head: a third more. A regular expression cost about ten
times as much: 5 % of a proxied request's CPU, for two heads.)
"""

from __future__ import annotations

__all__ = ["clean_head"]

# Each byte as itself, but a control character (HTAB counts as text) as CR.
_AS_CR = bytes(b if b == 0x09 or 0x20 <= b < 0x7F or b > 0x7F else 0x0D for b in range(256))


def clean_head(head: bytes, lines: int) -> bool:
    """True when the control characters in ``head``, written as ``lines`` lines each ended by
    CRLF, are exactly those line ends (that is, there are no more than their ``2 * lines``)."""
    return head.translate(_AS_CR).count(b"\r") == 2 * lines
