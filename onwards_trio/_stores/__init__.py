"""Stores: where loop steps and stored Responses persist, one module per backend.

``memory`` (tests, single process), ``sqlite`` (the embedded default: one file, no server) and
``postgres`` (shared by replicas). Each backend implements the loop's step store
(:class:`~onwards_trio._loop.steps.MultiStepStore`) and the Responses store
(:class:`~onwards_trio._stores.base.ResponseStore`) over one connection or pool, bundled as a
:class:`~onwards_trio._stores.base.StoreBackend` and opened from one ``store`` config entry by
:func:`open_backend`.

Layer: above ``_loop`` (it implements the loop's protocols); imported by ``_responses`` and
``_app``. It never imports those.
"""

from __future__ import annotations

from onwards_trio._config import StoreSpec
from onwards_trio._stores.base import StoreBackend, UsageStore

__all__ = ["open_backend", "open_usage_store"]


def open_backend(spec: StoreSpec) -> StoreBackend:
    """The backend a ``store`` config entry names (connections open lazily, on first use)."""
    if spec.kind == "memory":
        from onwards_trio._stores.memory import MemoryBackend

        return MemoryBackend()
    if spec.kind == "postgres":
        # Imported here: psycopg is an optional extra, needed only for this kind.
        from onwards_trio._stores.postgres import PostgresBackend

        assert spec.dsn is not None  # StoreSpec refuses postgres without a dsn
        return PostgresBackend(spec.dsn, pool_size=spec.pool_size)
    from onwards_trio._stores.sqlite import SqliteBackend

    return SqliteBackend(spec.path, synchronous=spec.synchronous)


def open_usage_store(spec: StoreSpec) -> UsageStore:
    """The usage ledger's store in the backend a ``store`` config entry names, over a
    connection of its own (PostgreSQL: a pool of at most two)."""
    if spec.kind == "memory":
        from onwards_trio._stores.memory import MemoryUsageStore

        return MemoryUsageStore()
    if spec.kind == "postgres":
        from onwards_trio._stores.postgres import PostgresDatabase, PostgresUsageStore

        assert spec.dsn is not None
        return PostgresUsageStore(PostgresDatabase(spec.dsn, pool_size=min(2, spec.pool_size)))
    from onwards_trio._stores.sqlite import SqliteUsageStore

    return SqliteUsageStore(spec.path)
