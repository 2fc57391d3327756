"""Stores for tests: one of each kind, each on a place of its own, so one suite runs on all.

``memory`` is a MemoryStore, ``sqlite`` a file under the test's tmp_path, ``postgres`` a
database created for the test on the server LEVANTE_TEST_PG names (by default the local
one, database ``test``) and dropped afterwards, after its connections are terminated.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from levante.store import MemoryStore, PostgresStore, SqliteStore
from levante.store.base import Store

STORE_KINDS = ("memory", "sqlite", "postgres")
SQL_KINDS = ("sqlite", "postgres")

PG_BASE_URL = os.environ.get("LEVANTE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
_PREFIX = "levante_t_"


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _database_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def create_database() -> str:
    """A new, empty database; returns its URL."""
    name = f"{_PREFIX}{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(PG_BASE_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _with_database(PG_BASE_URL, name)


async def drop_database(url: str) -> None:
    name = _database_of(url)
    assert name.startswith(_PREFIX), f"refusing to drop {name!r}: not a test database"
    conn = await asyncpg.connect(PG_BASE_URL)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def new_store(kind: str, tmp_path: Path, **options: Any) -> Store:
    """A store of ``kind`` on a fresh place, not opened yet."""
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SqliteStore(tmp_path / f"levante-{uuid.uuid4().hex[:8]}.db")
    if kind == "postgres":
        return PostgresStore(await create_database(), **options)
    raise ValueError(f"unknown store kind {kind!r}")


async def open_store(kind: str, tmp_path: Path, **options: Any) -> Store:
    """A store of ``kind`` on a fresh place, opened; give it to ``dispose`` when done."""
    store = await new_store(kind, tmp_path, **options)
    try:
        await store.open()
    except BaseException:
        await dispose(store)
        raise
    return store


def same_place(store: Store, **options: Any) -> Store:
    """Another store on the place of ``store``, not opened (a MemoryStore is its own place)."""
    if isinstance(store, SqliteStore):
        return SqliteStore(store.path)
    if isinstance(store, PostgresStore):
        return PostgresStore(store.url, **options)
    return store


async def dispose(store: Store) -> None:
    """Close the store and drop its database if it has one of its own."""
    try:
        await store.close()
    finally:
        if isinstance(store, PostgresStore):
            await drop_database(store.url)


@asynccontextmanager
async def opened_store(kind: str, tmp_path: Path, **options: Any) -> AsyncIterator[Store]:
    store = await open_store(kind, tmp_path, **options)
    try:
        yield store
    finally:
        await dispose(store)


async def schema_of(store: Store) -> tuple[list[int], dict[str, set[str]], set[str]] | None:
    """Applied migration versions, columns by table, and index names; None for memory."""
    if isinstance(store, SqliteStore):
        import aiosqlite

        async with aiosqlite.connect(store.path) as db:
            async with db.execute("SELECT version FROM schema_migrations ORDER BY version") as c:
                versions = [int(r[0]) for r in await c.fetchall()]
            async with db.execute("SELECT type, name FROM sqlite_master") as c:
                objects = [(r[0], r[1]) for r in await c.fetchall()]
            tables: dict[str, set[str]] = {}
            for kind, name in objects:
                if kind == "table" and not name.startswith("sqlite_"):
                    async with db.execute(f"PRAGMA table_info({name})") as c:
                        tables[name] = {r[1] for r in await c.fetchall()}
            indexes = {n for k, n in objects if k == "index" and not n.startswith("sqlite_")}
        return versions, tables, indexes
    if isinstance(store, PostgresStore):
        conn = await asyncpg.connect(store.url)
        try:
            versions = [
                int(r[0])
                for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
            ]
            tables = {}
            for r in await conn.fetch(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = 'public'"
            ):
                tables.setdefault(r[0], set()).add(r[1])
            named = await conn.fetch(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND NOT i.indisprimary AND NOT i.indisunique"
            )
        finally:
            await conn.close()
        return versions, tables, {r[0] for r in named}
    return None


async def run_sql(store: Store, sql: str, *args: Any) -> None:
    """Run one statement on a SQL store's database behind its back."""
    if isinstance(store, SqliteStore):
        import aiosqlite

        async with aiosqlite.connect(store.path) as db:
            await db.execute(sql.replace("$1", "?").replace("$2", "?"), args)
            await db.commit()
    elif isinstance(store, PostgresStore):
        conn = await asyncpg.connect(store.url)
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()
    else:
        raise TypeError(f"{type(store).__name__} has no SQL")


async def wait_for_lock_waiters(store: PostgresStore, count: int, timeout: float = 10.0) -> None:
    """Return once ``count`` sessions of the store's database wait for a lock (or fail)."""
    conn = await asyncpg.connect(store.url)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            waiting = int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            if waiting >= count:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{waiting} sessions wait for a lock, expected {count}")
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
