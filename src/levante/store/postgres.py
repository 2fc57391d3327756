"""The PostgreSQL store (``postgresql://...``): several engine replicas share one database.

The schema is SQLite's, table for table and column for column (JSON stays TEXT, so
``rows`` serves both), plus ``assignments.seq``, the queue's FIFO order. Migrations
run at ``open()`` in one transaction holding an advisory lock, so replicas starting at
once apply each migration exactly once; each is recorded in the transaction of its DDL.

Concurrency, where SQLite serialises every writer on one lock:
- ``lock_execution`` is ``SELECT ... FOR UPDATE``: writers of one execution queue up on
  its row, writers of different executions run in parallel.
- Inside a transaction, ``get_assignment`` locks the row too, so an engine's
  read-modify-write of an assignment never interleaves with a claim, release or defer:
  each happens wholly before or after it, as it would on SQLite.
- ``claim_assignments`` and ``take_timer`` skip rows other transactions hold
  (``FOR UPDATE SKIP LOCKED``): two claimers never get the same assignment, and a
  claimer never waits behind an engine.

Every driver and OS error leaves this module as StoreError (RequestIdTakenError for a
taken request_id); callers never see asyncpg.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from types import TracebackType
from typing import Any, TypeVar

import asyncpg

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

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE definitions (
        id BIGSERIAL PRIMARY KEY,
        text TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE workflows (
        name TEXT PRIMARY KEY,
        definition_id BIGINT NOT NULL REFERENCES definitions(id),
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE executions (
        id TEXT PRIMARY KEY,
        workflow TEXT NOT NULL,
        definition_id BIGINT NOT NULL,
        state TEXT NOT NULL,
        state_info TEXT NOT NULL,
        input TEXT NOT NULL,
        params TEXT NOT NULL,
        context TEXT NOT NULL,
        output TEXT NOT NULL,
        final_context TEXT NOT NULL,
        active_tasks INTEGER NOT NULL,
        waiting_tasks INTEGER NOT NULL,
        next_seq BIGINT NOT NULL,
        errors TEXT NOT NULL,
        request_id TEXT CONSTRAINT executions_request_id UNIQUE,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        parent_task_id TEXT,
        item INTEGER,
        backlog TEXT NOT NULL
    );
    CREATE INDEX executions_created ON executions(created_at);
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        execution_id TEXT NOT NULL,
        name TEXT NOT NULL,
        seq BIGINT NOT NULL,
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
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
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
        lease_expires_at DOUBLE PRECISION,
        outcome_ok INTEGER,
        outcome TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        item INTEGER,
        target TEXT,
        deadline DOUBLE PRECISION,
        seq BIGSERIAL NOT NULL
    );
    CREATE INDEX assignments_queue ON assignments(state, action, seq);
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
        due_at DOUBLE PRECISION NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE INDEX timers_due ON timers(due_at);
    CREATE TABLE history (
        seq BIGSERIAL PRIMARY KEY,
        execution_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        task_id TEXT,
        task_name TEXT,
        state TEXT NOT NULL,
        state_info TEXT NOT NULL,
        cause TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX history_by_execution ON history(execution_id, seq);
    CREATE INDEX executions_listing ON executions(created_at, id);
    CREATE INDEX timers_by_execution ON timers(execution_id);
    """,
    3: """
    CREATE TABLE actions (
        name TEXT PRIMARY KEY,
        declared_at DOUBLE PRECISION NOT NULL,
        online_until DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE waiting_notes (
        task_id TEXT PRIMARY KEY,
        action TEXT NOT NULL
    );
    CREATE INDEX waiting_notes_by_action ON waiting_notes(action);
    """,
}
assert max(MIGRATIONS) == SCHEMA_VERSION

# The key of the advisory lock taken while migrating: "levante" in ASCII. Advisory locks
# are per database, so stores of different databases on one server do not wait for each other.
MIGRATION_LOCK = int.from_bytes(b"levante", "big")

CLOSE_GRACE_SECONDS = 10.0
# The store vacuums the assignments table after this many transactions and claims of its
# own (see PostgresStore._queue_changed).
VACUUM_AFTER_CHANGES = 2000

# Settings of every connection the store opens. asyncpg prepares each statement once
# per connection, and after five runs PostgreSQL keeps a generic plan for it, costed
# on the tables as they are then. In a new database they are nearly empty: the plan
# that is cheapest then reads a whole table (a sequential scan of tasks to find one
# row), and it stays until the next ANALYZE invalidates it, a minute or more later on
# autovacuum's schedule; meanwhile each step of a workflow costs more than the one
# before (a 10,000-step chain ran from 2.1 to 3.8 ms a step through gRPC). Every
# statement here is an index lookup by design, so sequential scans are priced out:
# the planner keeps one only where no index serves the query.
SERVER_SETTINGS = {"application_name": "levante", "enable_seqscan": "off"}

_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,  # the server said no (and DataError: a value it cannot take)
    asyncpg.InterfaceError,  # misuse or a closed connection
    asyncpg.InternalClientError,  # the driver lost track of the protocol
    OSError,  # the network, including timeouts
)


class _Failing:
    """``with _Failing("what"):`` turns driver and OS errors into StoreError("what: ...")."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, _DRIVER_ERRORS):
            raise StoreError(f"{self.what}: {exc}") from exc


def _params(n: int) -> str:
    return ", ".join(f"${i}" for i in range(1, n + 1))


def _upsert_sql(table: str, columns: Sequence[str]) -> str:
    updates = ", ".join(f"{c}=EXCLUDED.{c}" for c in columns if c != "id")
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({_params(len(columns))}) "
        f"ON CONFLICT (id) DO UPDATE SET {updates}"
    )


def _count(status: str) -> int:
    """The row count of a command tag such as ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])


_EXECUTION_COLS = ", ".join(rows.EXECUTION_COLUMNS)
_TASK_COLS = ", ".join(rows.TASK_COLUMNS)
_ASSIGNMENT_COLS = ", ".join(rows.ASSIGNMENT_COLUMNS)
_TIMER_COLS = ", ".join(rows.TIMER_COLUMNS)
# A taken request_id inserts nothing instead of failing, so the transaction stays
# usable (as after SQLite's failed INSERT); a concurrent uncommitted insert of the same
# request_id makes this wait for that transaction's end.
_INSERT_EXECUTION = (
    f"INSERT INTO executions ({_EXECUTION_COLS}) "
    f"VALUES ({_params(len(rows.EXECUTION_COLUMNS))}) "
    "ON CONFLICT (request_id) DO NOTHING"
)
# The rows are picked once, in a MATERIALIZED CTE. Written as ``id IN (SELECT ... LIMIT
# n FOR UPDATE SKIP LOCKED)``, the planner may rerun the subquery for every outer row (a
# semi join), and each run, skipping the rows this statement has just updated, picks n
# more: one claim took every queued row in testing.
_CLAIM = (
    "WITH picked AS MATERIALIZED (SELECT id FROM assignments "
    "WHERE state='QUEUED' AND action = ANY($3::text[]) "
    "AND (target IS NULL OR target = ANY($5::text[])) "
    "ORDER BY seq LIMIT $4 FOR UPDATE SKIP LOCKED), "
    "claimed AS (UPDATE assignments a SET state='LEASED', worker_id=$1, "
    "lease_expires_at=LEAST($2, COALESCE(a.deadline, 'Infinity'::float8)) "
    "FROM picked WHERE a.id = picked.id AND a.state='QUEUED' "
    f"RETURNING {', '.join(f'a.{c}' for c in rows.ASSIGNMENT_COLUMNS)}, a.seq) "
    "SELECT * FROM claimed"
)
# Locks are taken in id order (LockRows runs above the sort), so that transactions
# locking overlapping sets of rows cannot deadlock on them.
_GET_ASSIGNMENTS = (
    f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE id = ANY($1::text[]) "
    "ORDER BY id FOR UPDATE"
)
_LOCK_EXECUTIONS = (
    f"SELECT {_EXECUTION_COLS} FROM executions WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
)
# Tasks by id, and the newest row of each (execution_id, name) pair: one round trip.
_TASKS_AND_LATEST = (
    f"SELECT {_TASK_COLS}, false AS latest FROM tasks WHERE id = ANY($1::text[]) "
    f"UNION ALL (SELECT DISTINCT ON (t.execution_id, t.name) "
    f"{', '.join(f't.{c}' for c in rows.TASK_COLUMNS)}, true FROM tasks t "
    "JOIN unnest($2::text[], $3::text[]) AS w(execution_id, name) "
    "ON t.execution_id = w.execution_id AND t.name = w.name "
    "ORDER BY t.execution_id, t.name, t.seq DESC)"
)
_INSERT_TIMER = (
    f"INSERT INTO timers ({_TIMER_COLS}) VALUES ({_params(len(rows.TIMER_COLUMNS))}) "
    "ON CONFLICT (id) DO NOTHING"
)


_HISTORY_COLUMNS = (
    "execution_id", "kind", "task_id", "task_name", "state", "state_info", "cause", "at",
)  # fmt: skip
# PostgreSQL's type of each column, for the arrays the buffered writes are sent in.
_COLUMN_TYPES = {
    "seq": "int8", "definition_id": "int8", "next_seq": "int8", "attempt": "int4",
    "has_next": "int4", "outcome_ok": "int4", "item": "int4", "active_tasks": "int4",
    "waiting_tasks": "int4", "created_at": "float8", "updated_at": "float8",
    "lease_expires_at": "float8", "deadline": "float8", "at": "float8",
}  # every other column is text


def _columns(found: Iterable[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as one list per column (empty lists when there are none)."""
    listed = list(found)
    return [list(c) for c in zip(*listed, strict=True)] if listed else [[] for _ in range(width)]


def _unnest(table: str, columns: Sequence[str], first: int, upsert: bool) -> str:
    """INSERT the rows sent as one array per column from parameter ``first`` on, in order."""
    arrays = ", ".join(
        f"${first + i}::{_COLUMN_TYPES.get(c, 'text')}[]" for i, c in enumerate(columns)
    )
    listed = ", ".join(columns)
    sql = (
        f"INSERT INTO {table} ({listed}) SELECT {listed} FROM unnest({arrays}) "
        f"WITH ORDINALITY AS u({listed}, ord) ORDER BY ord"
    )
    if upsert:
        sql += " ON CONFLICT (id) DO UPDATE SET " + ", ".join(
            f"{c}=EXCLUDED.{c}" for c in columns if c != "id"
        )
    return sql


def _write_buffered_sql() -> str:
    """One statement for every write a decision makes: tasks, assignments, executions
    (upserts), history rows, deleted timers and the work notification."""
    n = 1
    parts = []
    for name, table, columns, upsert in (
        ("t", "tasks", rows.TASK_COLUMNS, True),
        ("a", "assignments", rows.ASSIGNMENT_COLUMNS, True),
        ("e", "executions", rows.EXECUTION_COLUMNS, True),
        ("h", "history", _HISTORY_COLUMNS, False),
    ):
        parts.append(f"{name} AS ({_unnest(table, columns, n, upsert)})")
        n += len(columns)
    parts.append(f"d AS (DELETE FROM timers WHERE id = ANY(${n}::text[]))")
    parts.append(f"n AS (SELECT pg_notify(${n + 1}, ${n + 2}) WHERE ${n + 2} <> '')")
    return "WITH " + ", ".join(parts) + " SELECT (SELECT count(*) FROM n)"


_WRITE_BUFFERED = _write_buffered_sql()

WORK_CHANNEL = "levante_work"
K = TypeVar("K", bound=str)  # an id
V = TypeVar("V")
log = logging.getLogger("levante.store.postgres")


class PostgresTransaction:
    """One BEGIN ... COMMIT on a connection of the pool (READ COMMITTED)."""

    holds_store_lock = False

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        # Writes wait here, newest row per id, and go to the server as one statement
        # (_WRITE_BUFFERED) before the transaction's next statement or its commit.
        self._tasks: dict[str, tuple[Any, ...]] = {}
        self._assignments: dict[str, tuple[Any, ...]] = {}
        self._executions: dict[str, tuple[Any, ...]] = {}
        self._history: list[tuple[Any, ...]] = []
        self._gone_timers: set[str] = set()
        self._announced: set[str] = set()

    async def send_buffered(self) -> None:
        """Send the buffered writes, so that what runs next sees them (one round trip)."""
        if not (self._tasks or self._assignments or self._executions or self._history
                or self._gone_timers or self._announced):  # fmt: skip
            return
        params = [
            *_columns(self._tasks.values(), len(rows.TASK_COLUMNS)),
            *_columns(self._assignments.values(), len(rows.ASSIGNMENT_COLUMNS)),
            *_columns(self._executions.values(), len(rows.EXECUTION_COLUMNS)),
            *_columns(self._history, len(_HISTORY_COLUMNS)),
            sorted(self._gone_timers),
            WORK_CHANNEL,
            ",".join(sorted(self._announced)),
        ]
        self._tasks, self._assignments, self._executions = {}, {}, {}
        self._history, self._gone_timers, self._announced = [], set(), set()
        with _Failing("cannot save the transaction's writes"):
            await self._conn.execute(_WRITE_BUFFERED, *params)

    async def announce(self, actions: Collection[str]) -> None:
        self._announced.update(actions)

    async def claim_assignments(
        self,
        worker_id: str,
        actions: Collection[str],
        limit: int,
        lease_until: float,
        targets: Collection[str] = (),
    ) -> list[AssignmentRecord]:
        await self.send_buffered()
        if limit <= 0 or not actions:
            return []
        with _Failing(f"cannot claim assignments for worker {worker_id}"):
            found = await self._conn.fetch(
                _CLAIM, worker_id, lease_until, sorted(actions), limit, sorted(targets)
            )
        return [rows.assignment_from_row(r) for r in sorted(found, key=lambda r: r["seq"])]

    async def note_waiting(self, task: TaskRecord, action: str) -> None:
        await self.send_buffered()
        await self.save_tasks([task])
        with _Failing(f"cannot note task {task.id} as waiting"):
            await self._conn.execute(
                "INSERT INTO waiting_notes (task_id, action) VALUES ($1, $2) "
                "ON CONFLICT (task_id) DO UPDATE SET action=excluded.action",
                task.id, action,
            )  # fmt: skip

    async def action_catalogue(self, names: Collection[str]) -> dict[str, float]:
        await self.send_buffered()
        with _Failing("cannot read the action catalogue"):
            found = await self._conn.fetch(
                "SELECT name, online_until FROM actions WHERE name = ANY($1::text[])", list(names)
            )
        return {r["name"]: float(r["online_until"]) for r in found}

    async def lock_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        await self.send_buffered()
        with _Failing(f"cannot lock execution {execution_id}"):
            row = await self._conn.fetchrow(
                f"SELECT {_EXECUTION_COLS} FROM executions WHERE id=$1 FOR UPDATE", execution_id
            )
        return None if row is None else rows.execution_from_row(row)

    async def find_execution_by_request_id(self, request_id: str) -> ExecutionId | None:
        await self.send_buffered()
        with _Failing("cannot look up a request_id"):
            found = await self._conn.fetchval(
                "SELECT id FROM executions WHERE request_id=$1", request_id
            )
        return None if found is None else ExecutionId(found)

    async def insert_execution(self, execution: ExecutionRecord) -> None:
        await self.send_buffered()
        with _Failing(f"cannot insert execution {execution.id}"):
            status = await self._conn.execute(_INSERT_EXECUTION, *rows.execution_row(execution))
        if _count(status) == 0:
            raise RequestIdTakenError(
                f"request_id {execution.request_id!r} is taken by another execution"
            )

    async def update_execution(self, execution: ExecutionRecord) -> None:
        self._executions[execution.id] = rows.execution_row(execution)

    async def read_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        await self.send_buffered()
        with _Failing(f"cannot read execution {execution_id}"):
            row = await self._conn.fetchrow(
                f"SELECT {_EXECUTION_COLS} FROM executions WHERE id=$1", execution_id
            )
        return None if row is None else rows.execution_from_row(row)

    async def execution_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        await self.send_buffered()
        with _Failing(f"cannot read the tasks of execution {execution_id}"):
            found = await self._conn.fetch(
                f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=$1 ORDER BY seq", execution_id
            )
        return [rows.task_from_row(r) for r in found]

    async def get_task(self, task_id: TaskId) -> TaskRecord | None:
        await self.send_buffered()
        with _Failing(f"cannot read task {task_id}"):
            row = await self._conn.fetchrow(f"SELECT {_TASK_COLS} FROM tasks WHERE id=$1", task_id)
        return None if row is None else rows.task_from_row(row)

    async def latest_tasks(
        self, execution_id: ExecutionId, names: Collection[str]
    ) -> dict[str, TaskRecord]:
        await self.send_buffered()
        if not names:
            return {}
        with _Failing(f"cannot read the tasks of execution {execution_id}"):
            found = await self._conn.fetch(
                f"SELECT DISTINCT ON (name) {_TASK_COLS} FROM tasks "
                "WHERE execution_id=$1 AND name = ANY($2::text[]) ORDER BY name, seq DESC",
                execution_id,
                list(names),
            )
        return {r["name"]: rows.task_from_row(r) for r in found}

    async def waiting_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        await self.send_buffered()
        with _Failing(f"cannot read the waiting tasks of execution {execution_id}"):
            found = await self._conn.fetch(
                f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=$1 AND state='WAITING' "
                "ORDER BY seq",
                execution_id,
            )
        return [rows.task_from_row(r) for r in found]

    async def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        for t in tasks:
            self._tasks[t.id] = rows.task_row(t)

    async def get_assignment(self, assignment_id: AssignmentId) -> AssignmentRecord | None:
        await self.send_buffered()
        # Locked until commit: see the module docstring.
        with _Failing(f"cannot read assignment {assignment_id}"):
            row = await self._conn.fetchrow(
                f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE id=$1 FOR UPDATE",
                assignment_id,
            )
        return None if row is None else rows.assignment_from_row(row)

    async def get_assignments(
        self, assignment_ids: Collection[AssignmentId]
    ) -> dict[AssignmentId, AssignmentRecord]:
        return await self._locked_by_id(
            _GET_ASSIGNMENTS, assignment_ids, rows.assignment_from_row, "read assignments"
        )

    async def lock_executions(
        self, execution_ids: Collection[ExecutionId]
    ) -> dict[ExecutionId, ExecutionRecord]:
        return await self._locked_by_id(
            _LOCK_EXECUTIONS, execution_ids, rows.execution_from_row, "lock executions"
        )

    async def _locked_by_id(
        self, sql: str, ids: Collection[K], from_row: Callable[[Any], V], what: str
    ) -> dict[K, V]:
        """The rows with these ids, locked in id order, by id; one statement."""
        await self.send_buffered()
        if not ids:
            return {}
        with _Failing(f"cannot {what}"):
            found = await self._conn.fetch(sql, sorted(ids))
        return {r["id"]: from_row(r) for r in found}

    async def tasks_and_latest(
        self, task_ids: Collection[TaskId], latest: Mapping[ExecutionId, Collection[str]]
    ) -> tuple[dict[TaskId, TaskRecord], dict[ExecutionId, dict[str, TaskRecord]]]:
        await self.send_buffered()
        pairs = [(e, n) for e, names in latest.items() for n in names]
        by_id: dict[TaskId, TaskRecord] = {}
        by_name: dict[ExecutionId, dict[str, TaskRecord]] = {e: {} for e in latest}
        if not task_ids and not pairs:
            return by_id, by_name
        with _Failing("cannot read tasks"):
            found = await self._conn.fetch(
                _TASKS_AND_LATEST, list(task_ids), [e for e, _ in pairs], [n for _, n in pairs]
            )
        for r in found:
            task = rows.task_from_row(r)
            if r["latest"]:
                by_name[task.execution_id][task.name] = task
            else:
                by_id[task.id] = task
        return by_id, by_name

    async def save_assignments(self, assignments: Sequence[AssignmentRecord]) -> None:
        for a in assignments:
            self._assignments[a.id] = rows.assignment_row(a)

    async def task_assignments(self, task_id: TaskId) -> list[AssignmentRecord]:
        await self.send_buffered()
        with _Failing(f"cannot read the assignments of task {task_id}"):
            found = await self._conn.fetch(
                f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE task_id=$1 ORDER BY seq",
                task_id,
            )
        return [rows.assignment_from_row(r) for r in found]

    async def unfinished_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        await self.send_buffered()
        with _Failing(f"cannot read the unfinished tasks of execution {execution_id}"):
            found = await self._conn.fetch(
                f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=$1 "
                "AND state NOT IN ('SUCCESS', 'ERROR', 'CANCELLED') ORDER BY seq",
                execution_id,
            )
        return [rows.task_from_row(r) for r in found]

    async def pause_assignments(self, execution_id: ExecutionId) -> None:
        await self.send_buffered()
        with _Failing(f"cannot pause the assignments of execution {execution_id}"):
            await self._conn.execute(
                "UPDATE assignments SET state='PAUSED' WHERE execution_id=$1 AND state='QUEUED'",
                execution_id,
            )

    async def resume_assignments(self, execution_id: ExecutionId) -> None:
        await self.send_buffered()
        with _Failing(f"cannot resume the assignments of execution {execution_id}"):
            await self._conn.execute(
                "UPDATE assignments SET state='QUEUED' WHERE execution_id=$1 AND state='PAUSED'",
                execution_id,
            )

    async def queued_actions(self, execution_id: ExecutionId) -> set[str]:
        await self.send_buffered()
        with _Failing(f"cannot read the queued actions of execution {execution_id}"):
            found = await self._conn.fetch(
                "SELECT DISTINCT action FROM assignments WHERE execution_id=$1 AND state='QUEUED'",
                execution_id,
            )
        return {r[0] for r in found}

    async def cancel_execution_work(self, execution_id: ExecutionId) -> None:
        await self.send_buffered()
        with _Failing(f"cannot cancel the work of execution {execution_id}"):
            await self._conn.execute(
                "UPDATE assignments SET state='CANCELLED', worker_id=NULL, lease_expires_at=NULL "
                "WHERE execution_id=$1 AND state NOT IN ('DONE', 'CANCELLED')",
                execution_id,
            )
            await self._conn.execute("DELETE FROM timers WHERE execution_id=$1", execution_id)

    async def child_execution_ids(self, execution_id: ExecutionId) -> list[ExecutionId]:
        await self.send_buffered()
        # A subworkflow's assignment (state CHILD) carries its execution's id.
        with _Failing(f"cannot read the subworkflows of execution {execution_id}"):
            found = await self._conn.fetch(
                "SELECT id FROM assignments WHERE execution_id=$1 AND state='CHILD' ORDER BY seq",
                execution_id,
            )
        return [ExecutionId(r[0]) for r in found]

    async def fail_task_assignments(self, task_id: TaskId, error: Any) -> None:
        await self.send_buffered()
        with _Failing(f"cannot fail the assignments of task {task_id}"):
            await self._conn.execute(
                "UPDATE assignments SET state='DONE', worker_id=NULL, lease_expires_at=NULL, "
                "outcome_ok=0, outcome=$1 WHERE task_id=$2 AND state NOT IN ('DONE', 'CANCELLED')",
                rows.dump(error),
                task_id,
            )

    async def append_history(self, entries: Sequence[HistoryEntry]) -> None:
        # seq comes from one sequence for all executions; within one execution it grows in
        # commit order too, because every writer of an execution holds its row lock.
        self._history.extend(
            (e.execution_id, e.kind, e.task_id, e.task_name, e.state, e.state_info, e.cause, e.at)
            for e in entries
        )

    async def save_timers(self, timers: Sequence[TimerRecord]) -> None:
        await self.send_buffered()
        if timers:
            with _Failing("cannot save timers"):
                await self._conn.executemany(_INSERT_TIMER, [rows.timer_row(t) for t in timers])

    async def delete_timers(self, timer_ids: Collection[str]) -> None:
        self._gone_timers.update(timer_ids)

    async def take_timer(self, timer_id: str) -> TimerRecord | None:
        await self.send_buffered()
        with _Failing(f"cannot take timer {timer_id}"):
            row = await self._conn.fetchrow(
                "DELETE FROM timers WHERE id = "
                "(SELECT id FROM timers WHERE id=$1 FOR UPDATE SKIP LOCKED) "
                f"RETURNING {_TIMER_COLS}",
                timer_id,
            )
        return None if row is None else rows.timer_from_row(row)


async def _reset_connection(conn: Any) -> None:
    """What a connection needs before it goes back to the pool: only an open transaction
    ended. The store never changes session state (no LISTEN on pool connections, no
    session advisory locks, no SET), so asyncpg's default reset, a round trip of
    ``RESET ALL`` and friends on every release, has nothing to undo."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class PostgresStore:
    """A pool of connections to one database; ``url`` is a libpq URL asyncpg accepts."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self.url = url
        self._min_size = min_size
        self._max_size = max_size
        self._pool: Any = None
        self._listeners: list[Any] = []
        self._closing = False
        self._relisten: asyncio.Task[None] | None = None
        self._changes = 0  # queue changes since the last vacuum (see _queue_changed)
        self._vacuum: asyncio.Task[None] | None = None

    async def open(self) -> None:
        if self._pool is not None:
            return
        self._closing = False
        try:
            with _Failing("cannot connect to PostgreSQL"):
                pool = await asyncpg.create_pool(
                    self.url,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    server_settings=SERVER_SETTINGS,
                    reset=_reset_connection,
                )
        except ValueError as e:  # asyncpg's URL parser, for a port that is not a number
            raise StoreError(f"cannot connect to PostgreSQL: bad URL {self.url!r}: {e}") from e
        try:
            with _Failing("cannot migrate the schema"):
                async with pool.acquire() as conn:
                    await self._migrate(conn)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def subscribe(self, on_work: Callable[[set[str]], None]) -> bool:
        """LISTEN on a connection of its own; each NOTIFY wakes ``on_work``.

        When that connection is lost (the database restarted, the backend was
        terminated) it is opened again, with backoff, and the work queued meanwhile is
        announced to ``on_work`` at once (its NOTIFYs were missed).
        """
        with _Failing("cannot listen for queued work"):
            await self._listen(on_work)
        return True

    async def _listen(self, on_work: Callable[[set[str]], None]) -> None:
        def heard(connection: Any, pid: int, channel: str, payload: str) -> None:
            on_work({a for a in payload.split(",") if a})

        def lost(connection: Any) -> None:
            if connection in self._listeners:
                self._listeners.remove(connection)
            if not self._closing:
                self._relisten = asyncio.get_running_loop().create_task(self._reopen(on_work))

        listener = await asyncpg.connect(self.url)
        try:
            await listener.add_listener(WORK_CHANNEL, heard)
        except BaseException:
            await listener.close()
            raise
        listener.add_termination_listener(lost)
        self._listeners.append(listener)

    async def _reopen(self, on_work: Callable[[set[str]], None]) -> None:
        delay = 0.05
        while not self._closing:
            try:
                await self._listen(on_work)
                log.info("listening for queued work again")
                on_work(await self.queued_action_names())
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("cannot listen for queued work yet (%s); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        """Close the pool, waiting CLOSE_GRACE_SECONDS at most for transactions to end."""
        self._closing = True
        if self._vacuum is not None:
            with contextlib.suppress(Exception):
                await self._vacuum
        if self._relisten is not None:
            self._relisten.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._relisten
            self._relisten = None
        for listener in list(self._listeners):
            with contextlib.suppress(Exception):
                await listener.close()
        self._listeners.clear()
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_GRACE_SECONDS)
        except TimeoutError:
            # A transaction still holds a connection: cut it rather than hang a shutdown.
            pool.terminate()
        except _DRIVER_ERRORS as e:
            pool.terminate()
            raise StoreError(f"cannot close the connection pool: {e}") from e

    @staticmethod
    async def _migrate(conn: Any) -> None:
        """Apply missing migrations, each recorded in the same transaction as its DDL."""
        async with conn.transaction():
            # Replicas opening at once wait here; the later ones then find nothing to do.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            current = int(
                await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            )
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"the store's schema version {current} is newer than this Levante's "
                    f"({SCHEMA_VERSION}); upgrade Levante"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                await conn.execute(MIGRATIONS[version])  # no arguments: several statements
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    version,
                    time.time(),
                )

    @property
    def _p(self) -> Any:
        if self._pool is None:
            raise StoreError("the store is not open")
        return self._pool

    @asynccontextmanager
    async def _connection_in_transaction(self) -> AsyncIterator[Any]:
        pool = self._p
        with _Failing("cannot begin a transaction"):
            conn = await pool.acquire()
        try:
            tx = conn.transaction()
            with _Failing("cannot begin a transaction"):
                await tx.start()
            try:
                yield conn
            except BaseException:
                # The connection may be gone; the pool discards it on release then.
                with suppress(*_DRIVER_ERRORS):
                    await tx.rollback()
                raise
            with _Failing("commit failed"):
                await tx.commit()
        finally:
            with suppress(*_DRIVER_ERRORS):
                await pool.release(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTransaction]:
        async with self._connection_in_transaction() as conn:
            tx = PostgresTransaction(conn)
            yield tx
            await tx.send_buffered()
        self._queue_changed()

    def _queue_changed(self) -> None:
        """Count a change to the queue; every VACUUM_AFTER_CHANGES, vacuum it.

        Each state an assignment goes through (queued, leased, done) leaves a dead
        version of its row and of its entries in the queue's indexes, and the claim's
        index scan walks over every dead entry ahead of the oldest queued one. Until a
        vacuum removes them a claim costs more with every task run: 1 ms and 190 index
        pages after 5,000 steps of one chain in testing. Autovacuum comes at most once a
        minute (autovacuum_naptime), so the store vacuums the table itself, in the
        background, skipping it when another replica is at it.
        """
        self._changes += 1
        if self._changes >= VACUUM_AFTER_CHANGES and self._vacuum is None and not self._closing:
            self._changes = 0
            self._vacuum = asyncio.get_running_loop().create_task(self._vacuum_queue())

    async def _vacuum_queue(self) -> None:
        try:
            with _Failing("cannot vacuum the queue"):
                async with self._p.acquire() as conn:
                    await conn.execute("VACUUM (SKIP_LOCKED) assignments")
        except Exception as e:  # the next one will try again
            log.warning("%s", e)
        finally:
            self._vacuum = None

    # -- definitions

    async def save_definition(
        self, text: str, workflow_names: Sequence[str], now: float
    ) -> DefinitionId:
        async with self._connection_in_transaction() as conn:
            with _Failing("cannot save a definition"):
                definition_id = DefinitionId(
                    int(
                        await conn.fetchval(
                            "INSERT INTO definitions (text, created_at) VALUES ($1, $2) "
                            "RETURNING id",
                            text,
                            now,
                        )
                    )
                )
                await conn.executemany(
                    "INSERT INTO workflows (name, definition_id, updated_at) VALUES ($1, $2, $3) "
                    "ON CONFLICT (name) DO UPDATE SET definition_id=EXCLUDED.definition_id, "
                    "updated_at=EXCLUDED.updated_at",
                    [(name, definition_id, now) for name in workflow_names],
                )
        return definition_id

    async def find_workflow(self, name: str) -> StoredDefinition | None:
        with _Failing(f"cannot look up workflow {name!r}"):
            row = await self._p.fetchrow(
                "SELECT d.id, d.text FROM workflows w JOIN definitions d ON d.id = w.definition_id "
                "WHERE w.name=$1",
                name,
            )
        return None if row is None else StoredDefinition(DefinitionId(int(row[0])), row[1])

    async def get_definition(self, definition_id: DefinitionId) -> StoredDefinition | None:
        with _Failing(f"cannot read definition {definition_id}"):
            row = await self._p.fetchrow(
                "SELECT id, text FROM definitions WHERE id=$1", definition_id
            )
        return None if row is None else StoredDefinition(DefinitionId(int(row[0])), row[1])

    # -- executions

    async def get_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        with _Failing(f"cannot read execution {execution_id}"):
            row = await self._p.fetchrow(
                f"SELECT {_EXECUTION_COLS} FROM executions WHERE id=$1", execution_id
            )
        return None if row is None else rows.execution_from_row(row)

    async def list_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        with _Failing(f"cannot read the tasks of execution {execution_id}"):
            found = await self._p.fetch(
                f"SELECT {_TASK_COLS} FROM tasks WHERE execution_id=$1 ORDER BY seq", execution_id
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
            params.append(state)
            where.append(f"state=${len(params)}")
        if workflow:
            params.append(workflow)
            where.append(f"workflow=${len(params)}")
        if before is not None:
            params += [before[0], before[1]]
            at, key = len(params) - 1, len(params)
            where.append(f"(created_at < ${at} OR (created_at = ${at} AND id < ${key}))")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params.append(limit)
        with _Failing("cannot list executions"):
            found = await self._p.fetch(
                f"SELECT {_EXECUTION_COLS} FROM executions {clause} "
                f"ORDER BY created_at DESC, id DESC LIMIT ${len(params)}",
                *params,
            )
        return [rows.execution_from_row(r) for r in found]

    async def history(
        self, execution_id: ExecutionId, after_seq: int = 0, limit: int = 10_000
    ) -> list[HistoryEntry]:
        with _Failing(f"cannot read the history of execution {execution_id}"):
            found = await self._p.fetch(
                "SELECT seq, execution_id, kind, task_id, task_name, state, state_info, cause, at "
                "FROM history WHERE execution_id=$1 AND seq>$2 ORDER BY seq LIMIT $3",
                execution_id,
                after_seq,
                limit,
            )
        return [rows.history_from_row(r) for r in found]

    async def get_assignment(self, assignment_id: AssignmentId) -> AssignmentRecord | None:
        with _Failing(f"cannot read assignment {assignment_id}"):
            row = await self._p.fetchrow(
                f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE id=$1", assignment_id
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
        with _Failing(f"cannot claim assignments for worker {worker_id}"):
            found = await self._p.fetch(
                _CLAIM,
                worker_id,
                lease_until,
                sorted(actions),
                limit,
                sorted(targets),
            )
        if found:
            self._queue_changed()
        # RETURNING follows no order; the worker gets the oldest first.
        return [rows.assignment_from_row(r) for r in sorted(found, key=lambda r: r["seq"])]

    async def declare_actions(
        self, names: Collection[str], online_until: float, now: float
    ) -> None:
        if names:
            with _Failing("cannot declare actions"):
                await self._p.execute(
                    "INSERT INTO actions (name, declared_at, online_until) "
                    "SELECT unnest($1::text[]), $2, $3 ON CONFLICT (name) DO UPDATE SET "
                    "online_until=GREATEST(actions.online_until, excluded.online_until)",
                    sorted(names), now, online_until,
                )  # fmt: skip

    async def clear_waiting_notes(self, actions: Collection[str]) -> int:
        if not actions:
            return 0
        with _Failing("cannot clear the waiting notes"):
            status = await self._p.execute(
                "WITH noted AS (DELETE FROM waiting_notes WHERE action = ANY($1::text[]) "
                "RETURNING task_id) "
                "UPDATE tasks SET state_info='' WHERE id = ANY(ARRAY(SELECT task_id FROM noted)) "
                f"AND state='RUNNING' AND state_info LIKE '{WAITING_FOR_WORKER}%'",
                sorted(actions),
            )
        return _count(status)

    async def actions_offline(self, names: Collection[str], now: float) -> None:
        if names:
            with _Failing("cannot mark actions offline"):
                await self._p.execute(
                    "UPDATE actions SET online_until=$1 WHERE online_until > $1 "
                    "AND name = ANY($2::text[])",
                    now, sorted(names),
                )  # fmt: skip

    async def release_assignments(self, worker_id: str, keep: Collection[AssignmentId] = ()) -> int:
        with _Failing(f"cannot release the assignments of worker {worker_id}"):
            status = await self._p.execute(
                "UPDATE assignments SET state='QUEUED', worker_id=NULL, lease_expires_at=NULL "
                "WHERE worker_id=$1 AND state='LEASED' AND NOT (id = ANY($2::text[]))",
                worker_id,
                list(keep),
            )
        return _count(status)

    async def extend_leases(
        self, worker_id: str, assignment_ids: Collection[AssignmentId], lease_until: float
    ) -> None:
        if not assignment_ids:
            return
        with _Failing(f"cannot extend the leases of worker {worker_id}"):
            await self._p.execute(
                "UPDATE assignments SET "
                "lease_expires_at=LEAST($1, COALESCE(deadline, 'Infinity'::float8)) "
                "WHERE worker_id=$2 AND state='LEASED' AND id = ANY($3::text[])",
                lease_until,
                worker_id,
                list(assignment_ids),
            )

    async def defer_assignment(self, assignment_id: AssignmentId, worker_id: str) -> bool:
        with _Failing(f"cannot defer assignment {assignment_id}"):
            status = await self._p.execute(
                "UPDATE assignments SET state='DEFERRED', lease_expires_at=NULL "
                "WHERE id=$1 AND state IN ('LEASED', 'QUEUED') "
                "AND (worker_id IS NULL OR worker_id=$2)",  # a worker defers only what it holds
                assignment_id, worker_id,
            )  # fmt: skip
        return _count(status) > 0

    async def queued_action_names(self) -> set[str]:
        with _Failing("cannot read the queued actions"):
            found = await self._p.fetch(
                "SELECT DISTINCT action FROM assignments WHERE state='QUEUED'"
            )
        return {r[0] for r in found}

    async def expired_leases(self, now: float, limit: int) -> list[AssignmentRecord]:
        with _Failing("cannot read expired leases"):
            found = await self._p.fetch(
                f"SELECT {_ASSIGNMENT_COLS} FROM assignments WHERE state='LEASED' "
                "AND lease_expires_at <= $1 ORDER BY lease_expires_at LIMIT $2",
                now,
                limit,
            )
        return [rows.assignment_from_row(r) for r in found]

    async def next_lease_expiry(self) -> float | None:
        with _Failing("cannot read the next lease expiry"):
            due = await self._p.fetchval(
                "SELECT MIN(lease_expires_at) FROM assignments WHERE state='LEASED'"
            )
        return None if due is None else float(due)

    # -- timers

    async def due_timers(self, now: float, limit: int) -> list[TimerRecord]:
        with _Failing("cannot read due timers"):
            found = await self._p.fetch(
                f"SELECT {_TIMER_COLS} FROM timers WHERE due_at <= $1 ORDER BY due_at LIMIT $2",
                now,
                limit,
            )
        return [rows.timer_from_row(r) for r in found]

    async def next_timer_due(self) -> float | None:
        with _Failing("cannot read the next timer"):
            due = await self._p.fetchval("SELECT MIN(due_at) FROM timers")
        return None if due is None else float(due)
