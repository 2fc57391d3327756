"""Stores: where every execution's state lives. ``open_store(url)`` picks the backend."""

from __future__ import annotations

from levante.errors import InvalidArgumentError
from levante.store.base import Store, StoredDefinition, StoreTransaction
from levante.store.memory import MemoryStore
from levante.store.postgres import PostgresStore
from levante.store.sqlite import SqliteStore

__all__ = [
    "MemoryStore", "PostgresStore", "SqliteStore", "Store", "StoreTransaction", "StoredDefinition",
    "store_for",
]  # fmt: skip


def store_for(url: str) -> Store:
    """``sqlite:///PATH`` (relative) or ``sqlite:////abs/path``, a bare path, ``memory://``,
    or ``postgresql://user@host:port/database`` (``postgres://`` too)."""
    if url in ("memory://", "memory:"):
        return MemoryStore()
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path:
            raise InvalidArgumentError("store: sqlite:///PATH needs a path")
        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    if "://" not in url:
        return SqliteStore(url)
    raise InvalidArgumentError(
        f"store: unknown store URL {url!r} (use sqlite:///PATH, postgresql://... or memory://)"
    )
