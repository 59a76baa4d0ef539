"""``GET /v1/usage``: the usage ledger, summed per group and paged as rows.

Who sees what: a global key (``auth.global_keys``) every row; a key of ``auth.key_definitions``
only the rows of its own key label (naming another label is a 403); any other key, a 403 (it
has no label of its own: its rows are filed under ``other`` with every other such key); no
key, a 401 — except on a gateway with no keys at all, which answers everyone, as its proxy
does. Bad parameters are a 400 in the OpenAI error envelope (docs/governance.md, "Usage
ledger").
"""

from __future__ import annotations

import datetime
import logging
import math
import urllib.parse
from typing import TYPE_CHECKING, Any, Final

from onwards_trio import _errors as errors
from onwards_trio._errors import HTTPError
from onwards_trio._loop.steps import StoreError
from onwards_trio._proxy.auth import KeySet, bearer_token, configured_key_id, key_id
from onwards_trio._proxy.ledger import GROUP_KEYS, MAX_GROUPS, UsageLedger, UsageQuery
from onwards_trio._proxy.pricing import format_micros
from onwards_trio._transport.asgi import Scope, Send, send_error, send_json

if TYPE_CHECKING:
    from onwards_trio._proxy.targets import Table

__all__ = ["USAGE_PATH", "UsageAPI"]

log = logging.getLogger("onwards_trio")

USAGE_PATH: Final = "/v1/usage"
MAX_ROWS: Final = 1000  # rows one page returns at most
_DEFAULT_SPAN: Final = 86400.0  # seconds read when no start is given
_PARAMS: Final = frozenset({"start", "end", "group_by", "alias", "key_label", "limit", "after"})
_MAX_TEXT: Final = 256

_LEDGER_OFF: Final = HTTPError(
    404,
    errors.error_body(
        "The usage ledger is off (set usage.ledger in the config).",
        "invalid_request_error",
        "not_found",
    ),
)
_NOT_ALLOWED: Final = HTTPError(
    405,
    errors.error_body(
        "GET is the only method of /v1/usage.", "invalid_request_error", "method_not_allowed"
    ),
    [(b"allow", b"GET")],
)


def _time(name: str, text: str) -> float:
    """Epoch seconds, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise errors.invalid_request(
                f"'{name}' must be epoch seconds or an ISO 8601 time.", name
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.UTC)
        return parsed.timestamp()
    if not math.isfinite(value):
        raise errors.invalid_request(f"'{name}' must be a finite number.", name)
    return value


def _count(name: str, text: str, maximum: int) -> int:
    if not text.isdigit() or len(text) > 18:
        raise errors.invalid_request(f"'{name}' must be a whole number.", name)
    value = int(text)
    if value > maximum:
        raise errors.invalid_request(f"'{name}' must be at most {maximum}.", name)
    return value


def money(micros: int | None) -> str | None:
    """Micro-units as an exact decimal string of currency units (``None``: no price)."""
    return format_micros(micros) if micros is not None else None


def _sort_key(group: dict[str, Any], keys: tuple[str, ...]) -> tuple[Any, ...]:
    # None (a request no provider answered) sorts first, whatever the column's type
    return tuple((group[k] is not None, group[k] if group[k] is not None else 0) for k in keys)


class UsageAPI:
    """The handler of ``GET /v1/usage`` over a gateway's routing table and ledger."""

    def __init__(self, ledger: UsageLedger | None) -> None:
        self.ledger = ledger
        self._globals: tuple[Table, KeySet] | None = None

    def _global_keys(self, table: Table) -> KeySet:
        cached = self._globals
        if cached is None or cached[0] is not table:  # a reload built a new table
            auth = table.config.auth
            ids = [configured_key_id(k) for k in auth.global_keys] if auth else []
            cached = self._globals = (table, KeySet(ids))
        return cached[1]

    def scope_of(self, table: Table, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The key label a caller is confined to (``None``: every row). Raises 401/403."""
        token = bearer_token(headers)
        if not table.protected and not table.key_names:
            return None  # a gateway with no keys answers everyone
        if token is None:
            raise errors.unauthenticated()
        ident = key_id(token)
        if self._global_keys(table).has_id(ident):
            return None
        name = table.key_names.get(ident)
        if name is not None:
            return name
        if table.all_keys.has_id(ident):
            raise errors.forbidden()
        raise errors.unauthenticated(invalid=True)

    def parse(self, query_string: bytes, own_label: str | None, now: float) -> _Request:
        try:
            pairs = urllib.parse.parse_qsl(
                query_string.decode("latin-1"), keep_blank_values=True, strict_parsing=False
            )
        except ValueError:
            raise errors.invalid_request("The query string is malformed.") from None
        params: dict[str, str] = {}
        for name, value in pairs:
            if name not in _PARAMS:
                raise errors.invalid_request(f"Unknown parameter '{name[:64]}'.", name[:64])
            if name in params:
                raise errors.invalid_request(f"'{name}' is given twice.", name)
            if len(value) > _MAX_TEXT:
                raise errors.invalid_request(f"'{name}' is too long.", name)
            params[name] = value
        end = _time("end", params["end"]) if "end" in params else now
        start = _time("start", params["start"]) if "start" in params else end - _DEFAULT_SPAN
        if start > end:
            raise errors.invalid_request("'start' must not be after 'end'.", "start")
        group_by: list[str] = []
        for key in filter(None, params.get("group_by", "").split(",")):
            key = key.strip()
            if key not in GROUP_KEYS:
                raise errors.invalid_request(
                    f"'group_by' takes {', '.join(GROUP_KEYS)}; not '{key[:64]}'.", "group_by"
                )
            if key in group_by:
                raise errors.invalid_request(f"'group_by' names '{key}' twice.", "group_by")
            group_by.append(key)
        label = params.get("key_label") or None
        if own_label is not None:
            if label is not None and label != own_label:
                raise errors.forbidden()
            label = own_label
        query = UsageQuery(start, end, tuple(group_by), params.get("alias") or None, label)
        limit = _count("limit", params["limit"], MAX_ROWS) if "limit" in params else 0
        after = _count("after", params["after"], 2**62) if "after" in params else 0
        return _Request(query, limit, after)

    async def handle(self, scope: Scope, send: Send, table: Table, now: float) -> int:
        try:
            if scope["method"] != "GET":
                raise _NOT_ALLOWED
            own = self.scope_of(table, scope["headers"])
            ledger = self.ledger
            if ledger is None:
                raise _LEDGER_OFF
            request = self.parse(scope.get("query_string", b""), own, now)
            body = await self._read(ledger, request)
        except HTTPError as exc:
            await send_error(send, exc)
            return exc.status
        except StoreError as exc:
            log.warning("GET /v1/usage: the store failed (%s)", exc)
            await send_error(send, errors.service_unavailable())
            return 503
        await send_json(send, 200, body)
        return 200

    @staticmethod
    async def _read(ledger: UsageLedger, request: _Request) -> dict[str, Any]:
        await ledger.flush()  # what this process has noted so far is read too
        query = request.query
        store = ledger.store
        groups = await store.summarize_usage(query, MAX_GROUPS + 1)
        truncated = len(groups) > MAX_GROUPS
        groups = sorted(groups[:MAX_GROUPS], key=lambda g: _sort_key(g, query.group_by))
        for group in groups:
            group["cost"] = money(group["cost_micros"])
        body: dict[str, Any] = {
            "object": "usage",
            "start": query.start,
            "end": query.end,
            "group_by": list(query.group_by),
            "alias": query.alias,
            "key_label": query.key_label,
            "data": groups,
            "groups_truncated": truncated,
        }
        if request.limit:
            rows = await store.usage_rows(query, request.after, request.limit + 1)
            more = len(rows) > request.limit
            rows = rows[: request.limit]
            for row in rows:
                row["cost"] = money(row["cost_micros"])
            body["rows"] = rows
            body["has_more"] = more
            body["next_after"] = rows[-1]["id"] if more else None
        return body


class _Request:
    __slots__ = ("after", "limit", "query")

    def __init__(self, query: UsageQuery, limit: int, after: int) -> None:
        self.query = query
        self.limit = limit
        self.after = after
