"""Who may call what: bearer tokens, constant-time key matching, routing rules."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence

from onwards_trio._config import RoutingAction, RoutingRule

__all__ = ["KeySet", "bearer_token", "evaluate_rules"]


def bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (exact ``Bearer `` prefix, as onwards)."""
    for name, value in headers:
        if name == b"authorization":
            if value.startswith(b"Bearer "):
                token = value[7:].decode("latin-1")
                return token or None
            return None
    return None


class KeySet:
    """A set of keys compared in constant time against *every* candidate.

    A hash lookup would leak timing; a loop that stops at the first match would leak the
    position. Each comparison is ``hmac.compare_digest`` and all of them run.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(sorted({k.encode() for k in keys}))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, token: object) -> bool:
        if not isinstance(token, str):
            return False
        candidate = token.encode()
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(key, candidate)
        return found

    def union(self, other: KeySet) -> KeySet:
        merged = KeySet(())
        merged._keys = tuple(sorted(set(self._keys) | set(other._keys)))
        return merged


def evaluate_rules(rules: Sequence[RoutingRule], labels: Mapping[str, str]) -> RoutingAction | None:
    """First rule whose every ``match_labels`` pair equals the caller's label wins."""
    for rule in rules:
        if all(labels.get(k) == v for k, v in rule.match_labels.items()):
            return rule.action
    return None
