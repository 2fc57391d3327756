"""Read-only figures about a store for monitoring: how much work waits in the queue.

Kept apart from the ``Store`` protocol because the engine never needs them; each
backend answers with one cheap query (on SQLite and PostgreSQL an index on
``assignments(state, action)`` covers it). It reaches into the backends' read
connections, so it lives in ``store/`` with the rest of the SQL.
"""

from __future__ import annotations

from collections import Counter

from levante.core.model import AssignmentState
from levante.store.base import Store
from levante.store.memory import MemoryStore
from levante.store.postgres import PostgresStore
from levante.store.sqlite import SqliteStore

__all__ = ["queue_depth"]

_QUEUE_DEPTH_SQL = "SELECT action, COUNT(*) FROM assignments WHERE state='QUEUED' GROUP BY action"


async def queue_depth(store: Store) -> dict[str, int]:
    """QUEUED assignments (ready, waiting for a worker) by action."""
    if isinstance(store, SqliteStore):
        return {str(action): int(n) for action, n in store._read_all(_QUEUE_DEPTH_SQL)}
    if isinstance(store, PostgresStore):
        rows = await store._p.fetch(_QUEUE_DEPTH_SQL)
        return {str(r[0]): int(r[1]) for r in rows}
    if isinstance(store, MemoryStore):
        tables = store._t
        return dict(Counter(tables.assignments[i].action for i in tables.queued
                            if tables.assignments[i].state == AssignmentState.QUEUED))
    raise TypeError(f"no queue depth for {type(store).__name__}")
