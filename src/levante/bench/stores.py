"""A fresh store for every run, and read-only observers of it.

- ``sqlite``: a file in the run's temporary directory.
- ``memory``: ``memory://`` (the engine process holds everything).
- ``postgresql``: a new database on the server ``LEVANTE_BENCH_PG`` names (default
  ``postgresql://postgres@127.0.0.1:5432/test``), dropped after the run.

The observers read the store from the benchmark process without going through the
engine: how many assignments are deferred (to know when the idle scenario has
settled), and how many transactions SQLite committed during a window.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from levante.bench.processes import BenchError

__all__ = ["STORE_KINDS", "CommitCounter", "StorePlace", "count_deferred", "postgres_problem"]

STORE_KINDS = ("sqlite", "memory", "postgresql")
PG_BASE_URL = os.environ.get("LEVANTE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
_PG_PREFIX = "levante_bench_"


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def postgres_problem() -> str | None:
    """Why the postgresql store cannot be benchmarked here, or None if it can."""
    try:
        from levante.store import store_for

        store_for(PG_BASE_URL)
    except Exception as e:
        return f"levante.store.store_for does not accept postgresql URLs: {e}"
    try:
        import asyncpg

        conn = await asyncpg.connect(PG_BASE_URL, timeout=10)
        await conn.close()
    except Exception as e:
        return f"cannot connect to {PG_BASE_URL}: {type(e).__name__}: {e}"
    return None


@dataclass
class StorePlace:
    kind: str
    url: str
    sqlite_path: Path | None = None
    pg_database: str | None = None

    @classmethod
    async def create(cls, kind: str, run_dir: Path) -> StorePlace:
        if kind == "sqlite":
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / "levante.db"
            return cls(kind, f"sqlite:///{path}", sqlite_path=path)  # absolute: sqlite:////...
        if kind == "memory":
            return cls(kind, "memory://")
        if kind == "postgresql":
            import asyncpg

            name = f"{_PG_PREFIX}{uuid.uuid4().hex[:12]}"
            conn = await asyncpg.connect(PG_BASE_URL, timeout=10)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()
            return cls(kind, _with_database(PG_BASE_URL, name), pg_database=name)
        raise BenchError(f"unknown store kind {kind!r}")

    async def dispose(self) -> None:
        """Drop the run's PostgreSQL database (files go with the run directory)."""
        if self.pg_database is None:
            return
        import asyncpg

        assert self.pg_database.startswith(_PG_PREFIX)
        conn = await asyncpg.connect(PG_BASE_URL, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_database}" WITH (FORCE)')
        finally:
            await conn.close()


def _sqlite_readonly(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)


def _sqlite_count_deferred(path: Path) -> int:
    db = _sqlite_readonly(path)
    try:
        row = db.execute("SELECT count(*) FROM assignments WHERE state = 'DEFERRED'").fetchone()
        return int(row[0])
    finally:
        db.close()


async def count_deferred(place: StorePlace) -> int | None:
    """Assignments in state DEFERRED, read from the store; None for the memory store."""
    if place.sqlite_path is not None:
        return await asyncio.to_thread(_sqlite_count_deferred, place.sqlite_path)
    if place.pg_database is not None:
        import asyncpg

        conn = await asyncpg.connect(place.url, timeout=10)
        try:
            value = await conn.fetchval("SELECT count(*) FROM assignments WHERE state = 'DEFERRED'")
        finally:
            await conn.close()
        return int(value)
    return None


class CommitCounter:
    """Counts commits to a SQLite file by other connections, by polling PRAGMA data_version
    every ``interval`` seconds in a thread (two commits within one interval count once,
    so the count is a lower bound)."""

    def __init__(self, path: Path, interval: float = 0.005) -> None:
        self._db = _sqlite_readonly(path)
        self._interval = interval
        self._stop = threading.Event()
        self.changes = 0
        self._thread = threading.Thread(target=self._poll, name="commit-counter", daemon=True)

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _poll(self) -> None:
        last = self._version()
        while not self._stop.wait(self._interval):
            version = self._version()
            if version != last:
                self.changes += 1
                last = version

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=10)
        self._db.close()
        return self.changes
