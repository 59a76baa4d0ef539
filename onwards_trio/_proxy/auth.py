"""Who may call what: bearer tokens, constant-time key matching, routing rules.

Client keys are identified by their SHA-256 (``sha256:<64 hex>``), whether the config holds
the key itself or only its hash: a config then need not hold a usable credential, and every
per-key table (limits, labels, names) has one key for a client however it was configured.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence

from onwards_trio._config import HASHED_KEY, RoutingAction, RoutingRule

__all__ = [
    "HASH_PREFIX",
    "KeySet",
    "bearer_token",
    "configured_key_id",
    "evaluate_rules",
    "is_hashed",
    "key_id",
    "token_of",
]

HASH_PREFIX = "sha256:"


def key_id(token: str) -> str:
    """The identity of a key a client presented: always its hash (a client that sends the
    literal text ``sha256:...`` is hashed too, so knowing a hash opens nothing)."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def is_hashed(key: str) -> bool:
    """Whether a configured key is given as its hash, ``sha256:<64 hex digits>``."""
    return HASHED_KEY.fullmatch(key) is not None


def configured_key_id(key: str) -> str:
    """The identity of a key as configured: a ``sha256:`` hash as written, else its hash."""
    if is_hashed(key):
        return HASH_PREFIX + key[len(HASH_PREFIX) :].lower()
    return key_id(key)


def bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (exact ``Bearer `` prefix, as onwards)."""
    for name, value in headers:
        if name == b"authorization":
            return token_of(value)
    return None


def token_of(authorization: bytes | None) -> str | None:
    """:func:`bearer_token` for the first ``Authorization`` value (``None``: there is none)."""
    if authorization is not None and authorization.startswith(b"Bearer "):
        return authorization[7:].decode("latin-1") or None
    return None


class KeySet:
    """A set of key identities (see :func:`key_id`) compared in constant time against *every*
    candidate.

    A hash lookup would leak timing; a loop that stops at the first match would leak the
    position. Each comparison is ``hmac.compare_digest`` and all of them run.
    """

    __slots__ = ("_keys",)

    def __init__(self, ids: Iterable[str]) -> None:
        self._keys = tuple(sorted({k.encode() for k in ids}))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, token: str) -> bool:
        """Whether a key a client presented (plain text) is in the set."""
        return self.has_id(key_id(token))

    def has_id(self, ident: str) -> bool:
        """Whether a key identity (from :func:`key_id`, computed once per request) is in it."""
        candidate = ident.encode()
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(key, candidate)
        return found


def evaluate_rules(rules: Sequence[RoutingRule], labels: Mapping[str, str]) -> RoutingAction | None:
    """First rule whose every ``match_labels`` pair equals the caller's label wins."""
    for rule in rules:
        for k, v in rule.match_labels.items():  # a loop, not all() over a generator per rule
            if labels.get(k) != v:
                break
        else:
            return rule.action
    return None
