"""``store.synchronous``: how SQLite flushes a commit (docs/responses.md, "What is stored when
the answer arrives")."""

from __future__ import annotations

from pathlib import Path

import pytest

from onwards_trio import parse_config
from onwards_trio._errors import ConfigError
from onwards_trio._stores import open_backend
from onwards_trio._stores.sqlite import SqliteBackend

FULL, NORMAL = 2, 1  # PRAGMA synchronous values
TARGETS = {"m": {"url": "http://127.0.0.1:9/v1"}}


async def synchronous_of(backend: SqliteBackend) -> int:
    try:
        row = await backend._db.run(lambda db: db.execute("PRAGMA synchronous").fetchone())
        return int(row[0])
    finally:
        await backend.aclose()


@pytest.mark.parametrize(("given", "pragma"), [({}, FULL), ({"synchronous": "normal"}, NORMAL)])
async def test_the_configured_flush_reaches_the_connection(
    tmp_path: Path, given: dict[str, str], pragma: int
) -> None:
    store = {"kind": "sqlite", "path": str(tmp_path / "s.db"), **given}
    config = parse_config({"targets": TARGETS, "store": store})
    backend = open_backend(config.store)
    assert isinstance(backend, SqliteBackend)
    assert await synchronous_of(backend) == pragma


def test_an_unknown_flush_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="synchronous"):
        parse_config({"targets": TARGETS, "store": {"kind": "sqlite", "synchronous": "off"}})
