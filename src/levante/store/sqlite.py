"""The SQLite store (``sqlite:///PATH``): one file holds everything, in WAL mode.

Writers go through one connection and take SQLite's write lock with BEGIN IMMEDIATE,
so transactions of this process are serialised by an asyncio lock and those of other
processes sharing the file by SQLite's lock. Waiting for that lock is done here, in
short randomised steps: SQLite's own busy handler backs off to 100 ms sleeps, and a
process that waits that way starves behind a busy replica that retakes the lock at once.
Reads outside transactions use a second connection, which in WAL mode sees the last
commit and never blocks.

synchronous=NORMAL in WAL mode survives a killed process (kill -9) without losing a
committed transaction; only a power cut may lose the last few.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from levante.core.model import (
    AssignmentRecord,
    ExecutionRecord,
    HistoryEntry,
    TaskRecord,
    TimerRecord,
)
from levante.errors import RequestIdTakenError, StoreError
from levante.ids import AssignmentId, DefinitionId, ExecutionId, TaskId
from levante.store import rows
from levante.store.base import SCHEMA_VERSION, StoredDefinition

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE definitions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        text TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE workflows (
        name TEXT PRIMARY KEY,
        definition_id INTEGER NOT NULL REFERENCES definitions(id),
        updated_at REAL NOT NULL
    );
    CREATE TABLE executions (
        id TEXT PRIMARY KEY,
        workflow TEXT NOT NULL,
        definition_id INTEGER NOT NULL,
        state TEXT NOT NULL,
        state_info TEXT NOT NULL,
        input TEXT NOT NULL,
        params TEXT NOT NULL,
        context TEXT NOT NULL,
        output TEXT NOT NULL,
        final_context TEXT NOT NULL,
        active_tasks INTEGER NOT NULL,
        waiting_tasks INTEGER NOT NULL,
        next_seq INTEGER NOT NULL,
        errors TEXT NOT NULL,
        request_id TEXT UNIQUE,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        parent_task_id TEXT,
        item INTEGER,
        backlog TEXT NOT NULL
    );
    CREATE INDEX executions_created ON executions(created_at);
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        execution_id TEXT NOT NULL,
        name TEXT NOT NULL,
        seq INTEGER NOT NULL,
        state TEXT NOT NULL,
        state_info TEXT NOT NULL,
        action TEXT,
        in_context TEXT NOT NULL,
        result TEXT NOT NULL,
        published TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        assignment_id TEXT,
        arrivals TEXT NOT NULL,
        has_next INTEGER NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        runtime TEXT NOT NULL
    );
    CREATE INDEX tasks_by_name ON tasks(execution_id, name, seq);
    CREATE INDEX tasks_by_state ON tasks(execution_id, state);
    CREATE TABLE assignments (
        id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        execution_id TEXT NOT NULL,
        task_name TEXT NOT NULL,
        action TEXT NOT NULL,
        input TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        state TEXT NOT NULL,
        worker_id TEXT,
        lease_expires_at REAL,
        outcome_ok INTEGER,
        outcome TEXT,
        created_at REAL NOT NULL,
        item INTEGER,
        target TEXT,
        deadline REAL
    );
    CREATE INDEX assignments_queue ON assignments(state, action);
    CREATE INDEX assignments_leases ON assignments(state, lease_expires_at);
    CREATE INDEX assignments_by_worker ON assignments(worker_id, state);
    CREATE INDEX assignments_by_execution ON assignments(execution_id, state);
    CREATE INDEX assignments_by_task ON assignments(task_id, item);
    """,
    2: """
    CREATE TABLE timers (
        id TEXT PRIMARY KEY,
        execution_id TEXT NOT NULL,
        task_id TEXT,
        kind TEXT NOT NULL,
        due_at REAL NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE INDEX timers_due ON timers(due_at);
    CREATE TABLE history (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        execution_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        task_id TEXT,
        task_name TEXT,
        state TEXT NOT NULL,
        state_info TEXT NOT NULL,
        cause TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX history_by_execution ON history(execution_id, seq);
    CREATE INDEX executions_listing ON executions(created_at, id);
    CREATE INDEX timers_by_execution ON timers(execution_id);
    """,
}
assert max(MIGRATIONS) == SCHEMA_VERSION


SQLITE_BUSY_MS = 2  # SQLite's own wait for the write lock, before ours takes over
LOCK_WAIT_SECONDS = 60.0


async def _switch_to_wal(db: aiosqlite.Connection) -> None:
    """WAL mode, set once per file: a file already in WAL is only read, never locked."""
    async with db.execute("PRAGMA journal_mode") as cur:
        row = await cur.fetchone()
    if row is None or str(row[0]).lower() != "wal":
        await db.execute("PRAGMA journal_mode=WAL")


async def _begin(db: aiosqlite.Connection) -> None:
    await db.execute("BEGIN IMMEDIATE")


async def _begin_immediate(db: aiosqlite.Connection) -> None:
    """BEGIN IMMEDIATE, waiting for other processes' write lock in short random steps."""
    await _with_lock_retries(db, _begin)


async def _with_lock_retries(
    db: aiosqlite.Connection, step: Callable[[aiosqlite.Connection], Awaitable[None]]
) -> None:
    """Run ``step``, retrying in short random sleeps while another process holds the lock."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            await step(db)
            return
        except aiosqlite.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise StoreError(f"cannot begin a transaction: {e}") from e
            if time.monotonic() > deadline:
                raise StoreError(
                    f"the store stayed locked by another process for {LOCK_WAIT_SECONDS} s"
                ) from e
        await asyncio.sleep(random.uniform(0.0002, 0.002))


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


def _upsert_sql(table: str, columns: Sequence[str]) -> str:
    updates = ", ".join(f"{c}=excluded.{c}" for c in columns if c != "id")
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({_placeholders(len(columns))}) "
        f"ON CONFLICT(id) DO UPDATE SET {updates}"
    )


_EXECUTION_COLS = ", ".join(rows.EXECUTION_COLUMNS)
_TASK_COLS = ", ".join(rows.TASK_COLUMNS)
_ASSIGNMENT_COLS = ", ".join(rows.ASSIGNMENT_COLUMNS)
_UPSERT_TASK = _upsert_sql("tasks", rows.TASK_COLUMNS)
_UPSERT_ASSIGNMENT = _upsert_sql("assignments", rows.ASSIGNMENT_COLUMNS)
_UPSERT_EXECUTION = _upsert_sql("executions", rows.EXECUTION_COLUMNS)
_TIMER_COLS = ", ".join(rows.TIMER_COLUMNS)


class SqliteTransaction:
    """One BEGIN IMMEDIATE ... COMMIT on the writer connection."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async with self._db.execute(sql, params) as cur:
            return await cur.fetchone()

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def lock_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        # BEGIN IMMEDIATE already holds the database's write lock.
        row = await self._one(
            f"SELECT {_EXECUTION_COLS} FROM executions WHERE id=?", (execution_id,)
        )
        return None if row is None else rows.execution_from_row(row)

    async def find_execution_by_request_id(self, request_id: str) -> ExecutionId | None:
        row = await self._one("SELECT id FROM executions WHERE request_id=?", (request_id,))
        return None if row is None else ExecutionId(row[0])

    async def insert_execution(self, execution: ExecutionRecord) -> None:
        try:
            await self._db.execute(
                f"INSERT INTO executions ({_EXECUTION_COLS}) "
                f"VALUES ({_placeholders(len(rows.EXECUTION_COLUMNS))})",
                rows.execution_row(execution),
            )
        except aiosqlite.IntegrityError as e:
            if "request_id" in str(e):
                raise RequestIdTakenError(
                    f"request_id '{execution.request_id}' belongs to another execution"
                ) from e
            raise StoreError(f"cannot insert execution {execution.id}: {e}") from e

    async def update_execution(self, execution: ExecutionRecord) -> None:
        await self._db.execute(_UPSERT_EXECUTION, rows.execution_row(execution))

    async def get_task(self, task_id: TaskId) -> TaskRecord | None:
        row = await self._one(f"SELECT {_TASK_COLS} FROM tasks WHERE id=?", (task_id,))
        return None if row is None else rows.task_from_row(row)

    async def latest_tasks(
        self, execution_id: ExecutionId, names: Collection[str]
    ) -> dict[str, TaskRecord]:
        found: dict[str, TaskRecord] = {}
        for name in names:
            row = await self._one(
                f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=? AND name=? "
                "ORDER BY seq DESC LIMIT 1",
                (execution_id, name),
            )
            if row is not None:
                found[name] = rows.task_from_row(row)
        return found

    async def waiting_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        found = await self._all(
            f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=? AND state='WAITING' ORDER BY seq",
            (execution_id,),
        )
        return [rows.task_from_row(r) for r in found]

    async def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        if tasks:
            await self._db.executemany(_UPSERT_TASK, [rows.task_row(t) for t in tasks])

    async def get_assignment(self, assignment_id: AssignmentId) -> AssignmentRecord | None:
        row = await self._one(
            f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE id=?", (assignment_id,)
        )
        return None if row is None else rows.assignment_from_row(row)

    async def save_assignments(self, assignments: Sequence[AssignmentRecord]) -> None:
        if assignments:
            await self._db.executemany(
                _UPSERT_ASSIGNMENT, [rows.assignment_row(a) for a in assignments]
            )

    async def task_assignments(self, task_id: TaskId) -> list[AssignmentRecord]:
        found = await self._all(
            f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE task_id=? ORDER BY rowid",
            (task_id,),
        )
        return [rows.assignment_from_row(r) for r in found]

    async def unfinished_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        found = await self._all(
            f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=? "
            "AND state NOT IN ('SUCCESS', 'ERROR', 'CANCELLED') ORDER BY seq",
            (execution_id,),
        )
        return [rows.task_from_row(r) for r in found]

    async def pause_assignments(self, execution_id: ExecutionId) -> None:
        await self._db.execute(
            "UPDATE assignments SET state='PAUSED' WHERE execution_id=? AND state='QUEUED'",
            (execution_id,),
        )

    async def resume_assignments(self, execution_id: ExecutionId) -> None:
        await self._db.execute(
            "UPDATE assignments SET state='QUEUED' WHERE execution_id=? AND state='PAUSED'",
            (execution_id,),
        )

    async def queued_actions(self, execution_id: ExecutionId) -> set[str]:
        found = await self._all(
            "SELECT DISTINCT action FROM assignments WHERE execution_id=? AND state='QUEUED'",
            (execution_id,),
        )
        return {r[0] for r in found}

    async def cancel_execution_work(self, execution_id: ExecutionId) -> None:
        await self._db.execute(
            "UPDATE assignments SET state='CANCELLED', worker_id=NULL, lease_expires_at=NULL "
            "WHERE execution_id=? AND state NOT IN ('DONE', 'CANCELLED')",
            (execution_id,),
        )
        await self._db.execute("DELETE FROM timers WHERE execution_id=?", (execution_id,))

    async def child_execution_ids(self, execution_id: ExecutionId) -> list[ExecutionId]:
        found = await self._all(
            "SELECT id FROM assignments WHERE execution_id=? AND state='CHILD' ORDER BY rowid",
            (execution_id,),
        )
        return [ExecutionId(r[0]) for r in found]

    async def fail_task_assignments(self, task_id: TaskId, error: Any) -> None:
        await self._db.execute(
            "UPDATE assignments SET state='DONE', worker_id=NULL, lease_expires_at=NULL, "
            "outcome_ok=0, outcome=? WHERE task_id=? AND state NOT IN ('DONE', 'CANCELLED')",
            (rows.dump(error), task_id),
        )

    async def announce(self, actions: Collection[str]) -> None:
        return None  # nobody to tell: other processes sharing the store poll

    async def append_history(self, entries: Sequence[HistoryEntry]) -> None:
        if entries:
            await self._db.executemany(
                "INSERT INTO history (execution_id, kind, task_id, task_name, state, "
                "state_info, cause, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.execution_id, e.kind, e.task_id, e.task_name, e.state, e.state_info,
                  e.cause, e.at) for e in entries],
            )  # fmt: skip

    async def save_timers(self, timers: Sequence[TimerRecord]) -> None:
        if timers:
            await self._db.executemany(
                f"INSERT INTO timers ({_TIMER_COLS}) VALUES ({_placeholders(6)}) "
                "ON CONFLICT(id) DO NOTHING",
                [rows.timer_row(t) for t in timers],
            )

    async def delete_timers(self, timer_ids: Collection[str]) -> None:
        ids = list(timer_ids)
        if ids:
            await self._db.execute(
                f"DELETE FROM timers WHERE id IN ({_placeholders(len(ids))})", ids
            )

    async def take_timer(self, timer_id: str) -> TimerRecord | None:
        row = await self._one(
            f"DELETE FROM timers WHERE id=? RETURNING {_TIMER_COLS}", (timer_id,)
        )
        return None if row is None else rows.timer_from_row(row)


class SqliteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
            await _with_lock_retries(db, _switch_to_wal)
            await db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            await db.close()  # its thread would otherwise keep the process alive
            raise
        return db

    async def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        try:
            await self._migrate(self._writer)
            self._reader = await self._connect()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for db in (self._reader, self._writer):
            if db is not None:
                await db.close()
        self._reader = self._writer = None

    @staticmethod
    async def _migrate(db: aiosqlite.Connection) -> None:
        """Apply missing migrations, each recorded in the same transaction as its DDL."""
        await _begin_immediate(db)
        try:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            async with db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") as c:
                row = await c.fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"the store's schema version {current} is newer than this Levante's "
                    f"({SCHEMA_VERSION}); upgrade Levante"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

    @property
    def _w(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StoreError("the store is not open")
        return self._writer

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("the store is not open")
        return self._reader

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTransaction]:
        async with self._write_lock:
            db = self._w
            await _begin_immediate(db)
            try:
                yield SqliteTransaction(db)
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            try:
                await db.execute("COMMIT")
            except aiosqlite.Error as e:
                await db.execute("ROLLBACK")
                raise StoreError(f"commit failed: {e}") from e

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """A short write transaction for queue operations."""
        async with self.transaction():
            yield self._w

    # -- definitions

    async def save_definition(
        self, text: str, workflow_names: Sequence[str], now: float
    ) -> DefinitionId:
        async with self._write() as db:
            async with db.execute(
                "INSERT INTO definitions (text, created_at) VALUES (?, ?) RETURNING id", (text, now)
            ) as cur:
                row = await cur.fetchone()
            assert row is not None
            definition_id = DefinitionId(int(row[0]))
            await db.executemany(
                "INSERT INTO workflows (name, definition_id, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET definition_id=excluded.definition_id, "
                "updated_at=excluded.updated_at",
                [(name, definition_id, now) for name in workflow_names],
            )
        return definition_id

    async def find_workflow(self, name: str) -> StoredDefinition | None:
        async with self._r.execute(
            "SELECT d.id, d.text FROM workflows w JOIN definitions d ON d.id = w.definition_id "
            "WHERE w.name=?",
            (name,),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else StoredDefinition(DefinitionId(int(row[0])), row[1])

    async def get_definition(self, definition_id: DefinitionId) -> StoredDefinition | None:
        async with self._r.execute(
            "SELECT id, text FROM definitions WHERE id=?", (definition_id,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else StoredDefinition(DefinitionId(int(row[0])), row[1])

    # -- executions

    async def get_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        async with self._r.execute(
            f"SELECT {_EXECUTION_COLS} FROM executions WHERE id=?", (execution_id,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else rows.execution_from_row(row)

    async def list_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        async with self._r.execute(
            f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=? ORDER BY seq", (execution_id,)
        ) as cur:
            found = await cur.fetchall()
        return [rows.task_from_row(r) for r in found]

    async def list_executions(
        self,
        *,
        state: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[ExecutionRecord]:
        where: list[str] = []
        params: list[Any] = []
        if state:
            where.append("state=?")
            params.append(state)
        if workflow:
            where.append("workflow=?")
            params.append(workflow)
        if before is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [before[0], before[0], before[1]]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        async with self._r.execute(
            f"SELECT {_EXECUTION_COLS} FROM executions {clause} "
            "ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, limit),
        ) as cur:
            found = await cur.fetchall()
        return [rows.execution_from_row(r) for r in found]

    async def history(
        self, execution_id: ExecutionId, after_seq: int = 0, limit: int = 10_000
    ) -> list[HistoryEntry]:
        async with self._r.execute(
            "SELECT seq, execution_id, kind, task_id, task_name, state, state_info, cause, at "
            "FROM history WHERE execution_id=? AND seq>? ORDER BY seq LIMIT ?",
            (execution_id, after_seq, limit),
        ) as cur:
            found = await cur.fetchall()
        return [rows.history_from_row(r) for r in found]

    async def get_assignment(self, assignment_id: AssignmentId) -> AssignmentRecord | None:
        async with self._r.execute(
            f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE id=?", (assignment_id,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else rows.assignment_from_row(row)

    # -- the queue

    async def claim_assignments(
        self,
        worker_id: str,
        actions: Collection[str],
        limit: int,
        lease_until: float,
        targets: Collection[str] = (),
    ) -> list[AssignmentRecord]:
        if limit <= 0 or not actions:
            return []
        action_list = sorted(actions)
        target_list = sorted(targets)
        async with self._write() as db, db.execute(
            f"UPDATE assignments SET state='LEASED', worker_id=?, "
            f"lease_expires_at=MIN(?, COALESCE(deadline, 1e300)) "
            f"WHERE id IN (SELECT id FROM assignments WHERE state='QUEUED' "
            f"AND action IN ({_placeholders(len(action_list))}) "
            f"AND (target IS NULL OR target IN ({_placeholders(len(target_list))})) "
            f"ORDER BY rowid LIMIT ?) "
            f"RETURNING {_ASSIGNMENT_COLS}",
            (worker_id, lease_until, *action_list, *target_list, limit),
        ) as cur:
            found = await cur.fetchall()
        claimed = [rows.assignment_from_row(r) for r in found]
        claimed.sort(key=lambda a: (a.created_at, a.id))
        return claimed

    async def release_assignments(
        self, worker_id: str, keep: Collection[AssignmentId] = ()
    ) -> int:
        keep_list = list(keep)
        async with self._write() as db:
            cur = await db.execute(
                "UPDATE assignments SET state='QUEUED', worker_id=NULL, lease_expires_at=NULL "
                f"WHERE worker_id=? AND state='LEASED' "
                f"AND id NOT IN ({_placeholders(len(keep_list))})",
                (worker_id, *keep_list),
            )
            return cur.rowcount

    async def extend_leases(
        self, worker_id: str, assignment_ids: Collection[AssignmentId], lease_until: float
    ) -> None:
        ids = list(assignment_ids)
        if not ids:
            return
        async with self._write() as db:
            await db.execute(
                f"UPDATE assignments SET lease_expires_at=MIN(?, COALESCE(deadline, 1e300)) "
                f"WHERE worker_id=? AND state='LEASED' "
                f"AND id IN ({_placeholders(len(ids))})",
                (lease_until, worker_id, *ids),
            )

    async def defer_assignment(self, assignment_id: AssignmentId, worker_id: str) -> bool:
        async with self._write() as db:
            cur = await db.execute(
                "UPDATE assignments SET state='DEFERRED', lease_expires_at=NULL "
                "WHERE id=? AND state IN ('LEASED', 'QUEUED')",
                (assignment_id,),
            )
            return cur.rowcount > 0

    async def subscribe(self, on_work: Callable[[set[str]], None]) -> bool:
        return False

    async def queued_action_names(self) -> set[str]:
        async with self._r.execute(
            "SELECT DISTINCT action FROM assignments WHERE state='QUEUED'"
        ) as cur:
            return {r[0] for r in await cur.fetchall()}

    async def expired_leases(self, now: float, limit: int) -> list[AssignmentRecord]:
        async with self._r.execute(
            f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE state='LEASED' "
            "AND lease_expires_at <= ? ORDER BY lease_expires_at LIMIT ?",
            (now, limit),
        ) as cur:
            found = await cur.fetchall()
        return [rows.assignment_from_row(r) for r in found]

    async def next_lease_expiry(self) -> float | None:
        async with self._r.execute(
            "SELECT MIN(lease_expires_at) FROM assignments WHERE state='LEASED'"
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # -- timers

    async def due_timers(self, now: float, limit: int) -> list[TimerRecord]:
        async with self._r.execute(
            f"SELECT {_TIMER_COLS} FROM timers WHERE due_at <= ? ORDER BY due_at LIMIT ?",
            (now, limit),
        ) as cur:
            found = await cur.fetchall()
        return [rows.timer_from_row(r) for r in found]

    async def next_timer_due(self) -> float | None:
        async with self._r.execute("SELECT MIN(due_at) FROM timers") as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])
