"""The SQLite store (``sqlite:///PATH``): one file holds everything, in WAL mode.

Writers go through one connection and take SQLite's write lock with BEGIN IMMEDIATE,
so transactions of this process are serialised by an asyncio lock and those of other
processes sharing the file by SQLite's lock. Statements run inline on the event loop's
thread (stdlib ``sqlite3``): a statement costs microseconds, a hop to a database thread
and back costs more than that, and a transaction never awaits anything but the lock.
Waiting for another process's lock is done here, in short randomised asyncio sleeps
(``busy_timeout`` is 0): SQLite's own busy handler would block the event loop, and it
backs off to 100 ms sleeps, starving behind a busy replica that retakes the lock at once.
Reads outside transactions use other connections, which in WAL mode see the last commit
and never block; those that may return many rows run on aiosqlite's thread.

synchronous=NORMAL in WAL mode survives a killed process (kill -9) without losing a
committed transaction; only a power cut may lose the last few.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

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
from levante.store.base import SCHEMA_VERSION, WAITING_FOR_WORKER, StoredDefinition
from levante.store.point_reads import PointReads

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
    3: """
    CREATE TABLE actions (
        name TEXT PRIMARY KEY,
        declared_at REAL NOT NULL,
        online_until REAL NOT NULL
    );
    CREATE TABLE waiting_notes (
        task_id TEXT PRIMARY KEY,
        action TEXT NOT NULL
    );
    CREATE INDEX waiting_notes_by_action ON waiting_notes(action);
    """,
}
assert max(MIGRATIONS) == SCHEMA_VERSION

T = TypeVar("T")
log = logging.getLogger("levante.store.sqlite")


LOCK_WAIT_SECONDS = 60.0
READER_BUSY_MS = 100  # readers wait only while another process recovers the WAL


def _switch_to_wal(db: sqlite3.Connection) -> None:
    """WAL mode, set once per file: a file already in WAL is only read, never locked."""
    row = db.execute("PRAGMA journal_mode").fetchone()
    if row is None or str(row[0]).lower() != "wal":
        db.execute("PRAGMA journal_mode=WAL")


def _is_lock_error(e: sqlite3.OperationalError) -> bool:
    text = str(e)
    return "locked" in text or "busy" in text


async def _with_lock_retries(step: Callable[[], T]) -> T:
    """Run ``step``, retrying in short random sleeps while another process holds the lock.

    ``busy_timeout`` is 0, so a held lock answers at once and the event loop never blocks
    in SQLite's own busy handler; the waiting is done here, between other work.
    """
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            return step()
        except sqlite3.OperationalError as e:
            if not _is_lock_error(e):
                raise StoreError(f"SQLite: {e}") from e
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
_LATEST_TASK = (
    f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=? AND name=? ORDER BY seq DESC LIMIT 1"
)


class SqliteTransaction(PointReads):
    """One BEGIN IMMEDIATE ... COMMIT on the writer connection.

    Statements run inline on the event loop's thread: each costs microseconds, less than
    a hop to a database thread and back, and nothing in a transaction waits for I/O
    other than the file.
    """

    # Every transaction holds the database's write lock from its first statement: what
    # it read cannot change under it (see StoreTransaction.holds_store_lock).
    holds_store_lock = True

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._db.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._db.execute(sql, params).fetchall()

    async def lock_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        # BEGIN IMMEDIATE already holds the database's write lock.
        row = self._one(f"SELECT {_EXECUTION_COLS} FROM executions WHERE id=?", (execution_id,))
        return None if row is None else rows.execution_from_row(row)

    async def find_execution_by_request_id(self, request_id: str) -> ExecutionId | None:
        row = self._one("SELECT id FROM executions WHERE request_id=?", (request_id,))
        return None if row is None else ExecutionId(row[0])

    async def insert_execution(self, execution: ExecutionRecord) -> None:
        try:
            self._db.execute(
                f"INSERT INTO executions ({_EXECUTION_COLS}) "
                f"VALUES ({_placeholders(len(rows.EXECUTION_COLUMNS))})",
                rows.execution_row(execution),
            )
        except sqlite3.IntegrityError as e:
            if "request_id" in str(e):
                raise RequestIdTakenError(
                    f"request_id '{execution.request_id}' belongs to another execution"
                ) from e
            raise StoreError(f"cannot insert execution {execution.id}: {e}") from e

    async def update_execution(self, execution: ExecutionRecord) -> None:
        self._db.execute(_UPSERT_EXECUTION, rows.execution_row(execution))

    async def get_task(self, task_id: TaskId) -> TaskRecord | None:
        row = self._one(f"SELECT {_TASK_COLS} FROM tasks WHERE id=?", (task_id,))
        return None if row is None else rows.task_from_row(row)

    async def latest_tasks(
        self, execution_id: ExecutionId, names: Collection[str]
    ) -> dict[str, TaskRecord]:
        found: dict[str, TaskRecord] = {}
        for name in names:
            row = self._one(_LATEST_TASK, (execution_id, name))
            if row is not None:
                found[name] = rows.task_from_row(row)
        return found

    async def read_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        return await self.lock_execution(execution_id)  # a read: the write lock is held anyway

    async def execution_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        found = self._all(
            f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=? ORDER BY seq", (execution_id,)
        )
        return [rows.task_from_row(r) for r in found]

    async def waiting_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        found = self._all(
            f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=? AND state='WAITING' ORDER BY seq",
            (execution_id,),
        )
        return [rows.task_from_row(r) for r in found]

    async def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        if tasks:
            self._db.executemany(_UPSERT_TASK, [rows.task_row(t) for t in tasks])

    async def get_assignment(self, assignment_id: AssignmentId) -> AssignmentRecord | None:
        row = self._one(f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE id=?", (assignment_id,))
        return None if row is None else rows.assignment_from_row(row)

    async def save_assignments(self, assignments: Sequence[AssignmentRecord]) -> None:
        if assignments:
            self._db.executemany(_UPSERT_ASSIGNMENT, [rows.assignment_row(a) for a in assignments])

    async def task_assignments(self, task_id: TaskId) -> list[AssignmentRecord]:
        found = self._all(
            f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE task_id=? ORDER BY rowid",
            (task_id,),
        )
        return [rows.assignment_from_row(r) for r in found]

    async def unfinished_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        found = self._all(
            f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=? "
            "AND state NOT IN ('SUCCESS', 'ERROR', 'CANCELLED') ORDER BY seq",
            (execution_id,),
        )
        return [rows.task_from_row(r) for r in found]

    async def pause_assignments(self, execution_id: ExecutionId) -> None:
        self._db.execute(
            "UPDATE assignments SET state='PAUSED' WHERE execution_id=? AND state='QUEUED'",
            (execution_id,),
        )

    async def resume_assignments(self, execution_id: ExecutionId) -> None:
        self._db.execute(
            "UPDATE assignments SET state='QUEUED' WHERE execution_id=? AND state='PAUSED'",
            (execution_id,),
        )

    async def queued_actions(self, execution_id: ExecutionId) -> set[str]:
        found = self._all(
            "SELECT DISTINCT action FROM assignments WHERE execution_id=? AND state='QUEUED'",
            (execution_id,),
        )
        return {r[0] for r in found}

    async def cancel_execution_work(self, execution_id: ExecutionId) -> None:
        self._db.execute(
            "UPDATE assignments SET state='CANCELLED', worker_id=NULL, lease_expires_at=NULL "
            "WHERE execution_id=? AND state NOT IN ('DONE', 'CANCELLED')",
            (execution_id,),
        )
        self._db.execute("DELETE FROM timers WHERE execution_id=?", (execution_id,))

    async def child_execution_ids(self, execution_id: ExecutionId) -> list[ExecutionId]:
        found = self._all(
            "SELECT id FROM assignments WHERE execution_id=? AND state='CHILD' ORDER BY rowid",
            (execution_id,),
        )
        return [ExecutionId(r[0]) for r in found]

    async def fail_task_assignments(self, task_id: TaskId, error: Any) -> None:
        self._db.execute(
            "UPDATE assignments SET state='DONE', worker_id=NULL, lease_expires_at=NULL, "
            "outcome_ok=0, outcome=? WHERE task_id=? AND state NOT IN ('DONE', 'CANCELLED')",
            (rows.dump(error), task_id),
        )

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
        found = self._all(
            f"UPDATE assignments SET state='LEASED', worker_id=?, "
            f"lease_expires_at=MIN(?, COALESCE(deadline, 1e300)) "
            f"WHERE id IN (SELECT id FROM assignments WHERE state='QUEUED' "
            f"AND action IN ({_placeholders(len(action_list))}) "
            f"AND (target IS NULL OR target IN ({_placeholders(len(target_list))})) "
            f"ORDER BY rowid LIMIT ?) "
            f"RETURNING {_ASSIGNMENT_COLS}",
            (worker_id, lease_until, *action_list, *target_list, limit),
        )
        claimed = [rows.assignment_from_row(r) for r in found]
        claimed.sort(key=lambda a: (a.created_at, a.id))
        return claimed

    async def note_waiting(self, task: TaskRecord, action: str) -> None:
        await self.save_tasks([task])
        self._db.execute(
            "INSERT INTO waiting_notes (task_id, action) VALUES (?, ?) "
            "ON CONFLICT(task_id) DO UPDATE SET action=excluded.action",
            (task.id, action),
        )

    async def action_catalogue(self, names: Collection[str]) -> dict[str, float]:
        wanted = list(names)
        found = self._all(
            f"SELECT name, online_until FROM actions WHERE name IN ({_placeholders(len(wanted))})",
            wanted,
        )
        return {r[0]: float(r[1]) for r in found}

    async def announce(self, actions: Collection[str]) -> None:
        return None  # nobody to tell: other processes sharing the store poll

    async def append_history(self, entries: Sequence[HistoryEntry]) -> None:
        if entries:
            self._db.executemany(
                "INSERT INTO history (execution_id, kind, task_id, task_name, state, "
                "state_info, cause, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.execution_id, e.kind, e.task_id, e.task_name, e.state, e.state_info,
                  e.cause, e.at) for e in entries],
            )  # fmt: skip

    async def save_timers(self, timers: Sequence[TimerRecord]) -> None:
        if timers:
            self._db.executemany(
                f"INSERT INTO timers ({_TIMER_COLS}) VALUES ({_placeholders(6)}) "
                "ON CONFLICT(id) DO NOTHING",
                [rows.timer_row(t) for t in timers],
            )

    async def delete_timers(self, timer_ids: Collection[str]) -> None:
        ids = list(timer_ids)
        if ids:
            self._db.execute(f"DELETE FROM timers WHERE id IN ({_placeholders(len(ids))})", ids)

    async def take_timer(self, timer_id: str) -> TimerRecord | None:
        row = self._one(f"DELETE FROM timers WHERE id=? RETURNING {_TIMER_COLS}", (timer_id,))
        return None if row is None else rows.timer_from_row(row)


MAX_GROUP_MEMBERS = 64
# A group commit waits this long for more members when the previous group had at least
# LINGER_AFTER_MEMBERS (transactions arriving together: a busy engine); a lone
# transaction (one chain of tasks) commits at once. One COMMIT writes every page its
# members dirtied, so the fewer commits, the fewer pages written per transaction.
GROUP_LINGER_SECONDS = 0.002
LINGER_AFTER_MEMBERS = 4
# The WAL is checkpointed (see SqliteStore._checkpoint) once this many bytes of frames
# have been written since it last started over; its size is looked at every
# WAL_CHECK_EVERY_COMMITS commits.
WAL_CHECKPOINT_BYTES = 16 * 1024 * 1024
# A group of at least this many transactions commits on a thread (_commit_off_loop).
COMMIT_OFF_LOOP_MEMBERS = 2
WAL_CHECK_EVERY_COMMITS = 16


class _Group:
    """The transactions sharing one COMMIT; ``committed`` resolves when it lands."""

    def __init__(self, committed: asyncio.Future[None]) -> None:
        self.committed = committed
        self.members = 0

    def done(self) -> None:
        if not self.committed.done():
            self.committed.set_result(None)

    def fail(self, error: StoreError) -> None:
        if not self.committed.done():
            self.committed.set_exception(error)
            self.committed.exception()  # members that failed themselves never await it


class SqliteStore:
    """Writes and point reads run inline on stdlib ``sqlite3`` connections; reads that
    may return many rows (status views, listings, history) run on aiosqlite's thread so
    that a large execution never stalls the event loop."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._bulk: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._entrants = 0  # callers waiting for the writer connection
        self._group: _Group | None = None  # the open group commit, if any
        self._flush_scheduled = False
        self._since_checkpoint = 0
        self._checkpointer: asyncio.Task[None] | None = None
        self._committer: asyncio.Task[None] | None = None  # see _commit_off_loop
        self.commits = 0  # group commits so far, and the transactions they carried
        self.committed_members = 0
        self._last_group_members = 0

    async def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=0")
            await _with_lock_retries(lambda: _switch_to_wal(db))
            db.execute("PRAGMA synchronous=NORMAL")
            # Statement and savepoint journals in memory, not in temporary files that
            # each transaction would create and delete.
            db.execute("PRAGMA temp_store=MEMORY")
            db.execute(f"PRAGMA journal_size_limit={WAL_CHECKPOINT_BYTES}")
        except BaseException:
            db.close()
            raise
        return db

    async def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await self._connect()
            self._writer.execute("PRAGMA wal_autocheckpoint=0")  # see _checkpoint
            await self._migrate(self._writer)
            self._reader = await self._connect()
            self._reader.execute(f"PRAGMA busy_timeout={READER_BUSY_MS}")
            self._bulk = await aiosqlite.connect(self.path, isolation_level=None)
            await self._bulk.execute(f"PRAGMA busy_timeout={READER_BUSY_MS}")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._committer is not None:
            with contextlib.suppress(Exception):
                await self._committer
        if self._writer is not None and self._group is not None:
            self._commit_group()  # members are still waiting for it
        if self._checkpointer is not None:
            with contextlib.suppress(Exception):
                await self._checkpointer
        if self.commits:
            log.info(
                "SQLite store closed: %d commits carried %d transactions",
                self.commits, self.committed_members,
            )  # fmt: skip
        if self._bulk is not None:
            await self._bulk.close()
        for db in (self._reader, self._writer):
            if db is not None:
                db.close()
        self._reader = self._writer = self._bulk = None

    @staticmethod
    async def _migrate(db: sqlite3.Connection) -> None:
        """Apply missing migrations, each recorded in the same transaction as its DDL."""
        await _with_lock_retries(lambda: db.execute("BEGIN IMMEDIATE"))
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            row = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"the store's schema version {current} is newer than this Levante's "
                    f"({SCHEMA_VERSION}); upgrade Levante"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @property
    def _w(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StoreError("the store is not open")
        return self._writer

    @property
    def _r(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StoreError("the store is not open")
        return self._reader

    @property
    def _b(self) -> aiosqlite.Connection:
        if self._bulk is None:
            raise StoreError("the store is not open")
        return self._bulk

    def _read_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            return self._r.execute(sql, params).fetchone()
        except sqlite3.OperationalError as e:
            raise StoreError(f"SQLite: {e}") from e

    def _read_all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._r.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            raise StoreError(f"SQLite: {e}") from e

    async def _read_bulk(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        # One call on aiosqlite's thread: overlapping reads with open cursors on one
        # connection would share the oldest one's snapshot and miss later commits.
        return list(await self._b.execute_fetchall(sql, params))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTransaction]:
        """One member of a group commit.

        Callers take turns on the writer connection. Each runs inside a shared BEGIN
        IMMEDIATE ... COMMIT (in a SAVEPOINT, after the first): when others are already
        waiting their turn, the
        group stays open for them and commits once nobody waits (or it is full), so
        completions that arrive together share one commit. A member returns only after
        the commit that holds its writes; a member that raises rolls back to its
        savepoint and leaves the others' writes in place (the first, alone so far, rolls
        back the transaction).
        """
        self._entrants += 1
        try:
            await self._write_lock.acquire()
        finally:
            self._entrants -= 1
            if not self._write_lock.locked():
                self._flush_if_idle()  # cancelled while waiting: nobody may be left to commit
        committed: asyncio.Future[None] | None = None
        try:
            db = self._w
            # The group's first member needs no savepoint: when it fails, it is alone in
            # the transaction, which is rolled back whole (two statements fewer for a
            # lone transaction, a chain's step).
            first = self._group is None
            if first:
                await _with_lock_retries(lambda: db.execute("BEGIN IMMEDIATE"))
                self._group = _Group(asyncio.get_running_loop().create_future())
            group = self._group
            assert group is not None
            group.members += 1
            if not first:
                db.execute("SAVEPOINT member")
            try:
                yield SqliteTransaction(db)
            except BaseException:
                if first:
                    self._undo_group(db, group)
                else:
                    self._undo_member(db, group)
                raise
            if not first:
                db.execute("RELEASE member")
            committed = group.committed
        finally:
            if self._group is not None:
                if self._group.members >= MAX_GROUP_MEMBERS:
                    self._commit_group()
                elif self._entrants == 0 and not self._flush_scheduled:
                    # Commit once the callbacks already runnable (other results read
                    # from the same poll) have had their turn to join the group.
                    self._flush_scheduled = True
                    loop = asyncio.get_running_loop()
                    if self._last_group_members >= LINGER_AFTER_MEMBERS:
                        # Under load: let the results of the next few reads join too.
                        loop.call_later(GROUP_LINGER_SECONDS, self._scheduled_flush)
                    else:
                        loop.call_soon(self._scheduled_flush)
            self._write_lock.release()
        await committed  # raises StoreError when the group's commit failed

    def _undo_group(self, db: sqlite3.Connection, group: _Group) -> None:
        """Roll back a group whose only member failed."""
        self._group = None
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        finally:
            group.fail(StoreError("the transaction was rolled back"))

    def _undo_member(self, db: sqlite3.Connection, group: _Group) -> None:
        try:
            db.execute("ROLLBACK TO member")
            db.execute("RELEASE member")
        except sqlite3.Error as e:
            if not db.in_transaction:  # SQLite gave up the whole transaction
                self._group = None
                group.fail(StoreError(f"the transaction was rolled back: {e}"))

    def _commit_group(self) -> None:
        """COMMIT the open group here, on the event loop's thread."""
        group, self._group = self._group, None
        if group is None:
            return
        db = self._w
        try:
            db.execute("COMMIT")
        except sqlite3.Error as e:
            self._commit_failed(db, group, e)
            return
        self._committed(group)

    async def _commit_off_loop(self) -> None:
        """COMMIT the open group on a thread, in the writer's turn: writing the pages a
        group dirtied into the WAL takes a sixth of a busy engine's event loop, and the
        loop reads, decides and sends meanwhile (sqlite3 lets go of the GIL in SQLite)."""
        try:
            await self._write_lock.acquire()
            try:
                group, self._group = self._group, None
                if group is None:
                    return  # a member's exit committed it meanwhile
                db = self._w
                try:
                    await asyncio.to_thread(db.execute, "COMMIT")
                except sqlite3.Error as e:
                    self._commit_failed(db, group, e)
                    return
                self._committed(group)
            finally:
                self._write_lock.release()
        finally:
            self._committer = None

    @staticmethod
    def _commit_failed(db: sqlite3.Connection, group: _Group, error: sqlite3.Error) -> None:
        if db.in_transaction:
            db.execute("ROLLBACK")
        group.fail(StoreError(f"commit failed: {error}"))

    def _committed(self, group: _Group) -> None:
        self.commits += 1
        self.committed_members += group.members
        self._last_group_members = group.members
        group.done()
        self._since_checkpoint += 1
        if self._since_checkpoint >= WAL_CHECK_EVERY_COMMITS and self._checkpointer is None:
            self._since_checkpoint = 0
            # A WAL that starts over is overwritten from its start and cut back to
            # WAL_CHECKPOINT_BYTES (journal_size_limit): it grows past that size only
            # once more frames than that were written since.
            if self._wal_size() > WAL_CHECKPOINT_BYTES:
                self._checkpointer = asyncio.get_running_loop().create_task(self._checkpoint())

    def _wal_size(self) -> int:
        try:
            return os.stat(f"{self.path}-wal").st_size
        except OSError:
            return 0

    async def _checkpoint(self) -> None:
        """Copy the WAL back into the database file on aiosqlite's thread, and let the
        WAL start over from its beginning.

        The writer's automatic checkpoint is off: it would run inside a COMMIT on the
        event loop's thread and fsync there. A PASSIVE checkpoint copies what has been
        committed while writes go on; but a WAL starts over only after a checkpoint that
        copied every frame, which never happens while commits keep coming, so on a busy
        engine the WAL would grow for as long as the load lasts (241 MB for 5,000 tasks
        in testing, each commit appending to a longer file). So a RESTART checkpoint
        follows, in the writer's turn between group commits: it copies the little
        committed meanwhile, and the next write transaction reuses the WAL from its start.
        """
        try:
            await self._b.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._entrants += 1  # a waiting entrant: the open group stays open for it
            try:
                await self._write_lock.acquire()
            finally:
                self._entrants -= 1
            try:
                self._commit_group()  # the writer's turn: nothing in flight, nothing open
                await self._b.execute("PRAGMA wal_checkpoint(RESTART)")
            finally:
                self._write_lock.release()
                self._flush_if_idle()
        except Exception as e:  # the next one will try again
            log.warning("WAL checkpoint failed: %s", e)
        finally:
            self._checkpointer = None

    def _flush_if_idle(self) -> None:
        if self._group is not None and self._entrants == 0 and not self._write_lock.locked():
            self._commit_group()

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        if self._group is None or self._write_lock.locked() or self._committer is not None:
            return  # committed already, or the member inside will see to it
        if self._entrants == 0:
            if self._group.members >= COMMIT_OFF_LOOP_MEMBERS:
                self._committer = asyncio.get_running_loop().create_task(
                    self._commit_off_loop()
                )
            else:  # a lone transaction (a chain's step): no thread hop on its path
                self._commit_group()
        # else: a waiting member will join and leave; its exit decides again

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[sqlite3.Connection]:
        """A short write transaction for queue operations."""
        async with self.transaction():
            yield self._w

    # -- definitions

    async def save_definition(
        self, text: str, workflow_names: Sequence[str], now: float
    ) -> DefinitionId:
        async with self._write() as db:
            row = db.execute(
                "INSERT INTO definitions (text, created_at) VALUES (?, ?) RETURNING id", (text, now)
            ).fetchone()
            assert row is not None
            definition_id = DefinitionId(int(row[0]))
            db.executemany(
                "INSERT INTO workflows (name, definition_id, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET definition_id=excluded.definition_id, "
                "updated_at=excluded.updated_at",
                [(name, definition_id, now) for name in workflow_names],
            )
        return definition_id

    async def find_workflow(self, name: str) -> StoredDefinition | None:
        row = self._read_one(
            "SELECT d.id, d.text FROM workflows w JOIN definitions d ON d.id = w.definition_id "
            "WHERE w.name=?",
            (name,),
        )
        return None if row is None else StoredDefinition(DefinitionId(int(row[0])), row[1])

    async def get_definition(self, definition_id: DefinitionId) -> StoredDefinition | None:
        row = self._read_one("SELECT id, text FROM definitions WHERE id=?", (definition_id,))
        return None if row is None else StoredDefinition(DefinitionId(int(row[0])), row[1])

    # -- executions

    async def get_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        row = self._read_one(
            f"SELECT {_EXECUTION_COLS} FROM executions WHERE id=?", (execution_id,)
        )
        return None if row is None else rows.execution_from_row(row)

    async def list_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        found = await self._read_bulk(
            f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=? ORDER BY seq", (execution_id,)
        )
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
        found = await self._read_bulk(
            f"SELECT {_EXECUTION_COLS} FROM executions {clause} "
            "ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, limit),
        )
        return [rows.execution_from_row(r) for r in found]

    async def history(
        self, execution_id: ExecutionId, after_seq: int = 0, limit: int = 10_000
    ) -> list[HistoryEntry]:
        found = await self._read_bulk(
            "SELECT seq, execution_id, kind, task_id, task_name, state, state_info, cause, at "
            "FROM history WHERE execution_id=? AND seq>? ORDER BY seq LIMIT ?",
            (execution_id, after_seq, limit),
        )
        return [rows.history_from_row(r) for r in found]

    async def get_assignment(self, assignment_id: AssignmentId) -> AssignmentRecord | None:
        row = self._read_one(
            f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE id=?", (assignment_id,)
        )
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
        async with self.transaction() as tx:
            return await tx.claim_assignments(worker_id, actions, limit, lease_until, targets)

    async def release_assignments(
        self, worker_id: str, keep: Collection[AssignmentId] = ()
    ) -> int:
        keep_list = list(keep)
        async with self._write() as db:
            cur = db.execute(
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
            db.execute(
                f"UPDATE assignments SET lease_expires_at=MIN(?, COALESCE(deadline, 1e300)) "
                f"WHERE worker_id=? AND state='LEASED' "
                f"AND id IN ({_placeholders(len(ids))})",
                (lease_until, worker_id, *ids),
            )

    async def defer_assignment(self, assignment_id: AssignmentId, worker_id: str) -> bool:
        async with self._write() as db:
            cur = db.execute(
                "UPDATE assignments SET state='DEFERRED', lease_expires_at=NULL "
                "WHERE id=? AND state IN ('LEASED', 'QUEUED') "
                "AND (worker_id IS NULL OR worker_id=?)",  # a worker defers only what it holds
                (assignment_id, worker_id),
            )
            return cur.rowcount > 0

    async def subscribe(self, on_work: Callable[[set[str]], None]) -> bool:
        return False

    async def declare_actions(
        self, names: Collection[str], online_until: float, now: float
    ) -> None:
        if names:
            async with self._write() as db:
                db.executemany(
                    "INSERT INTO actions (name, declared_at, online_until) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET "
                    "online_until=MAX(online_until, excluded.online_until)",
                    [(name, now, online_until) for name in sorted(names)],
                )

    async def clear_waiting_notes(self, actions: Collection[str]) -> int:
        wanted = sorted(actions)
        if not wanted:
            return 0
        async with self._write() as db:
            noted = [r[0] for r in db.execute(
                f"DELETE FROM waiting_notes WHERE action IN ({_placeholders(len(wanted))}) "
                "RETURNING task_id", wanted,
            ).fetchall()]  # fmt: skip
            if not noted:
                return 0
            cur = db.execute(
                f"UPDATE tasks SET state_info='' WHERE id IN ({_placeholders(len(noted))}) "
                "AND state='RUNNING' AND state_info LIKE ?",
                (*noted, f"{WAITING_FOR_WORKER}%"),
            )
            return cur.rowcount

    async def actions_offline(self, names: Collection[str], now: float) -> None:
        wanted = sorted(names)
        if wanted:
            async with self._write() as db:
                db.execute(
                    f"UPDATE actions SET online_until=? WHERE online_until > ? "
                    f"AND name IN ({_placeholders(len(wanted))})",
                    (now, now, *wanted),
                )

    async def queued_action_names(self) -> set[str]:
        found = self._read_all("SELECT DISTINCT action FROM assignments WHERE state='QUEUED'")
        return {r[0] for r in found}

    async def expired_leases(self, now: float, limit: int) -> list[AssignmentRecord]:
        found = self._read_all(
            f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE state='LEASED' "
            "AND lease_expires_at <= ? ORDER BY lease_expires_at LIMIT ?",
            (now, limit),
        )
        return [rows.assignment_from_row(r) for r in found]

    async def next_lease_expiry(self) -> float | None:
        row = self._read_one("SELECT MIN(lease_expires_at) FROM assignments WHERE state='LEASED'")
        return None if row is None or row[0] is None else float(row[0])

    # -- timers

    async def due_timers(self, now: float, limit: int) -> list[TimerRecord]:
        found = self._read_all(
            f"SELECT {_TIMER_COLS} FROM timers WHERE due_at <= ? ORDER BY due_at LIMIT ?",
            (now, limit),
        )
        return [rows.timer_from_row(r) for r in found]

    async def next_timer_due(self) -> float | None:
        row = self._read_one("SELECT MIN(due_at) FROM timers")
        return None if row is None or row[0] is None else float(row[0])
