"""One store suite, run against every backend: memory, SQLite and PostgreSQL.

What each backend must keep is the Store protocol (store/base.py). The tests that need
real concurrency between connections (row locks, SKIP LOCKED, the migration lock) run
on PostgreSQL only; they prove waiting with events and pg_stat_activity, never sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import pytest
from stores import (
    SQL_KINDS,
    STORE_KINDS,
    create_database,
    dispose,
    drop_database,
    new_store,
    opened_store,
    run_sql,
    same_place,
    schema_of,
    wait_for_lock_waiters,
)

from levante.core.model import (
    AssignmentRecord,
    AssignmentState,
    ExecutionRecord,
    ExecutionState,
    HistoryEntry,
    Outcome,
    TaskRecord,
    TaskState,
    TimerRecord,
)
from levante.engine import Engine
from levante.errors import RequestIdTakenError, StoreError
from levante.ids import AssignmentId, DefinitionId, ExecutionId, TaskId
from levante.store import PostgresStore, SqliteStore, store_for
from levante.store import postgres as postgres_store
from levante.store import sqlite as sqlite_store
from levante.store.base import SCHEMA_VERSION, Store, StoredDefinition

TABLES = {"definitions", "workflows", "executions", "tasks", "assignments", "timers", "history"}
DEADLINE = 10.0  # seconds a step that must happen may take before the test fails


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    # Ten connections at most: enough for the eight concurrent claimers below.
    options = {"max_size": 10} if kind == "postgres" else {}
    async with opened_store(kind, tmp_path, **options) as s:
        yield s


@pytest.fixture(params=SQL_KINDS)
async def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with opened_store(request.param, tmp_path) as s:
        yield s


@pytest.fixture
async def pg(tmp_path: Path) -> AsyncIterator[PostgresStore]:
    async with opened_store("postgres", tmp_path, max_size=10) as s:
        assert isinstance(s, PostgresStore)
        yield s


@asynccontextmanager
async def running(*coros: Coroutine[Any, Any, Any]) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """Run coroutines as tasks; whatever the test's outcome, none outlives it (so a
    transaction left waiting for an event cannot hang the store's close)."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield tasks
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), DEADLINE)


# ---------------------------------------------------------------- records


def execution(n: int | str, **changes: Any) -> ExecutionRecord:
    record = ExecutionRecord(
        id=ExecutionId(f"e{n}"),
        workflow="wf",
        definition_id=DefinitionId(1),
        state=ExecutionState.RUNNING,
        input={"text": 'héllo ✓ \x00 "quoted"', "n": [1, 2.5, None, True]},
        params={"env": {"k": "v"}},
        context={"text": "héllo", "nested": {"a": {"b": [{}]}}},
        created_at=1_700_000_000.123456,
        updated_at=1_700_000_001.654321,
    )
    return replace(record, **changes)


def full_execution(n: int | str) -> ExecutionRecord:
    """Every optional field set to something other than its default."""
    return execution(
        n,
        state=ExecutionState.ERROR,
        state_info="t1 failed: 💥",
        output={"x": 0.1 + 0.2},
        final_context={"x": 3},
        active_tasks=2,
        waiting_tasks=1,
        next_seq=2**40,
        errors=("first", "second"),
        request_id=f"req-{n}",
        parent_task_id=TaskId("parent.3"),
        item=7,
        backlog=({"task": "t2", "context": {"x": 1}}, {"task": "t3", "context": {}}),
    )


def task(
    execution_id: ExecutionId, name: str, seq: int, state: TaskState = TaskState.RUNNING
) -> TaskRecord:
    return TaskRecord(
        id=TaskId(f"{execution_id}.{seq}"),
        execution_id=execution_id,
        name=name,
        seq=seq,
        state=state,
        in_context={"x": seq},
        created_at=100.0 + seq,
        updated_at=100.5 + seq,
    )


def full_task(execution_id: ExecutionId, seq: int) -> TaskRecord:
    return replace(
        task(execution_id, "full", seq, TaskState.SUCCESS),
        state_info="done",
        action="std.echo",
        result={"r": ["ü", None]},
        published={"p": 1},
        attempt=3,
        assignment_id=AssignmentId("a-full"),
        arrivals=("t1", "t2"),
        has_next=True,
        runtime={"retries": 2, "items": {"done": 4}},
    )


def assignment(
    n: int | str,
    action: str = "act",
    *,
    execution_id: str = "e1",
    state: AssignmentState = AssignmentState.QUEUED,
    created_at: float | None = None,
    **changes: Any,
) -> AssignmentRecord:
    record = AssignmentRecord(
        id=AssignmentId(f"a{n}"),
        task_id=TaskId(f"{execution_id}.1"),
        execution_id=ExecutionId(execution_id),
        task_name="t1",
        action=action,
        input={"output": n},
        attempt=1,
        state=state,
        created_at=1000.0 if created_at is None else created_at,
    )
    return replace(record, **changes)


def timer(n: int | str, due_at: float, **changes: Any) -> TimerRecord:
    record = TimerRecord(
        id=f"timer-{n}",
        execution_id=ExecutionId("e1"),
        kind="wait-before",
        due_at=due_at,
        task_id=TaskId("e1.1"),
        payload={"attempt": 1, "note": "ß"},
    )
    return replace(record, **changes)


def assert_every_field_set(record: Any) -> None:
    """A field added to a record later must get a value in the round trips below, or its
    column would go untested."""
    for f in fields(record):
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            continue
        assert getattr(record, f.name) != default, f"{type(record).__name__}.{f.name}"


async def commit(store: Store, **writes: Any) -> None:
    """Write records in one transaction: executions=, tasks=, assignments=, timers=."""
    async with store.transaction() as tx:
        for e in writes.get("executions", ()):
            await tx.insert_execution(e)
        await tx.save_tasks(writes.get("tasks", ()))
        await tx.save_assignments(writes.get("assignments", ()))
        await tx.save_timers(writes.get("timers", ()))


async def queue(store: Store, count: int, action: str = "act", start: int = 0) -> list[str]:
    """Queue ``count`` assignments, oldest first; returns their ids in that order."""
    made = [assignment(start + i, action, created_at=1000.0 + start + i) for i in range(count)]
    await commit(store, assignments=made)
    return [a.id for a in made]


# ---------------------------------------------------------------- schema


async def test_open_creates_the_schema_and_reopening_changes_nothing(store: Store) -> None:
    definition_id = await store.save_definition("text", ["wf"], 1.0)
    await commit(store, executions=[execution(1)])
    before = await schema_of(store)
    if before is not None:
        versions, tables, _ = before
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        assert TABLES | {"schema_migrations"} <= set(tables)
    applied = await _applied_at(store)

    await store.close()
    again = same_place(store)
    await again.open()
    try:
        assert await schema_of(again) == before
        assert await _applied_at(again) == applied  # no migration ran a second time
        assert await again.get_definition(definition_id) == StoredDefinition(definition_id, "text")
        assert await again.get_execution(ExecutionId("e1")) == execution(1)
    finally:
        await again.close()
    await store.open()  # for the fixture, which closes it


async def _applied_at(store: Store) -> list[float]:
    if isinstance(store, PostgresStore):
        conn = await asyncpg.connect(store.url)
        try:
            return [r[0] for r in await conn.fetch("SELECT applied_at FROM schema_migrations")]
        finally:
            await conn.close()
    if isinstance(store, SqliteStore):
        async with (
            aiosqlite.connect(store.path) as db,
            db.execute("SELECT applied_at FROM schema_migrations") as cur,
        ):
            return [r[0] for r in await cur.fetchall()]
    return []


async def test_postgres_has_the_tables_columns_and_indexes_of_sqlite(
    pg: PostgresStore, tmp_path: Path
) -> None:
    lite = SqliteStore(tmp_path / "schema.db")
    await lite.open()
    try:
        expected = await schema_of(lite)
    finally:
        await lite.close()
    found = await schema_of(pg)
    assert expected is not None and found is not None
    assert found[0] == expected[0]
    # The queue's FIFO order is SQLite's rowid; PostgreSQL keeps it in a column.
    expected[1]["assignments"].add("seq")
    assert found[1] == expected[1]
    assert found[2] == expected[2]


async def test_a_schema_newer_than_the_code_is_refused(sql_store: Store) -> None:
    await sql_store.close()
    await run_sql(
        sql_store, "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)", 99, 0.0
    )
    newer = same_place(sql_store)
    with pytest.raises(StoreError, match="newer"):
        await newer.open()
    await newer.close()  # SqliteStore.open leaves its writer connection open when it fails


async def test_postgres_stores_opening_one_fresh_database_at_once_migrate_it_once(
    tmp_path: Path,
) -> None:
    # Not run on SQLite: there, opening a fresh file from several stores at once can fail
    # ("database is locked" on PRAGMA journal_mode=WAL) and leak the connection's thread,
    # which keeps the test process from exiting.
    first = await new_store("postgres", tmp_path)
    replicas = [first, *(same_place(first) for _ in range(3))]
    try:
        # Every open runs to its end before anything is closed, even when one fails.
        opened = await asyncio.gather(*(s.open() for s in replicas), return_exceptions=True)
        for outcome in opened:
            if isinstance(outcome, BaseException):
                raise outcome
        found = await schema_of(first)
        assert found is not None
        assert found[0] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        for s in replicas[1:]:
            await s.close()
        await dispose(first)


# ---------------------------------------------------------------- records round-trip


async def test_definitions_keep_every_version(store: Store) -> None:
    first = await store.save_definition("v1", ["a", "b"], 1.0)
    second = await store.save_definition("v2", ["b", "c"], 2.0)
    assert first != second
    found_a, found_b = await store.find_workflow("a"), await store.find_workflow("b")
    assert found_a is not None and (found_a.id, found_a.text) == (first, "v1")
    assert found_b is not None and (found_b.id, found_b.text) == (second, "v2")
    old = await store.get_definition(first)
    assert old is not None and old.text == "v1"
    assert await store.find_workflow("nope") is None
    assert await store.get_definition(DefinitionId(10_000)) is None


async def test_executions_round_trip(store: Store) -> None:
    plain, full = execution(1), full_execution(2)
    assert_every_field_set(full)
    await commit(store, executions=[plain, full])
    assert await store.get_execution(plain.id) == plain
    assert await store.get_execution(full.id) == full
    changed = replace(full, state=ExecutionState.SUCCESS, output=None, errors=(), item=None)
    async with store.transaction() as tx:
        assert await tx.lock_execution(full.id) == full
        await tx.update_execution(changed)
        assert await tx.find_execution_by_request_id("req-2") == full.id
        assert await tx.find_execution_by_request_id("req-x") is None
        assert await tx.lock_execution(ExecutionId("ghost")) is None
    assert await store.get_execution(full.id) == changed
    assert await store.get_execution(ExecutionId("ghost")) is None


async def test_tasks_round_trip(store: Store) -> None:
    e = ExecutionId("e1")
    tasks = [full_task(e, 2), task(e, "t1", 1), task(ExecutionId("e2"), "t1", 1)]
    assert_every_field_set(tasks[0])
    await commit(store, tasks=tasks)
    assert await store.list_tasks(e) == [tasks[1], tasks[0]]  # by seq
    updated = replace(tasks[0], state=TaskState.ERROR, runtime={}, has_next=False)
    async with store.transaction() as tx:
        assert await tx.get_task(tasks[0].id) == tasks[0]
        await tx.save_tasks([updated])
        assert await tx.get_task(TaskId("ghost")) is None
    assert await store.list_tasks(e) == [tasks[1], updated]


async def test_assignments_round_trip(store: Store) -> None:
    done = assignment(
        "done",
        state=AssignmentState.DONE,
        worker_id="w1",
        lease_expires_at=12.5,
        outcome=Outcome.failure({"type": "Boom", "message": "ünïcode"}),
        item=3,
        target="gpu",
        deadline=99.5,
        created_at=1.0,
    )
    ok = assignment("ok", state=AssignmentState.DONE, outcome=Outcome.success(None), created_at=2.0)
    queued = assignment("queued", created_at=3.0)
    assert_every_field_set(done)
    await commit(store, assignments=[done, ok, queued])
    for a in (done, ok, queued):
        assert await store.get_assignment(a.id) == a
    async with store.transaction() as tx:
        assert await tx.get_assignment(done.id) == done
        assert await tx.task_assignments(TaskId("e1.1")) == [done, ok, queued]
        assert await tx.task_assignments(TaskId("ghost")) == []
        await tx.save_assignments([replace(queued, state=AssignmentState.CANCELLED)])
    assert await store.get_assignment(AssignmentId("ghost")) is None
    cancelled = await store.get_assignment(queued.id)
    assert cancelled == replace(queued, state=AssignmentState.CANCELLED)


async def test_timers_round_trip(store: Store) -> None:
    plain = timer(1, 5.25, task_id=None, payload={})
    full = timer(2, 6.5)
    assert_every_field_set(full)
    await commit(store, timers=[full, plain])
    assert await store.due_timers(10.0, 10) == [plain, full]


# ---------------------------------------------------------------- reads inside transactions


async def test_latest_tasks_returns_the_highest_seq_of_each_name(store: Store) -> None:
    e, other = ExecutionId("e1"), ExecutionId("e2")
    await commit(
        store,
        tasks=[
            *(task(e, name, seq) for seq, name in enumerate("abac", start=1)),
            *(task(other, name, seq) for seq, name in enumerate("ab", start=9)),
        ],
    )
    async with store.transaction() as tx:
        latest = await tx.latest_tasks(e, {"a", "b", "missing"})
        assert {name: t.seq for name, t in latest.items()} == {"a": 3, "b": 2}
        assert latest["a"] == task(e, "a", 3)
        assert await tx.latest_tasks(e, []) == {}
        # In-transaction writes count: a newer row of "b".
        await tx.save_tasks([task(e, "b", 5)])
        assert (await tx.latest_tasks(e, ["b"]))["b"].seq == 5


async def test_waiting_tasks_are_the_execution_s_joins_in_seq_order(store: Store) -> None:
    e, other = ExecutionId("e1"), ExecutionId("e2")
    await commit(
        store,
        tasks=[
            task(e, "j2", 4, TaskState.WAITING),
            task(e, "t", 1, TaskState.SUCCESS),
            task(e, "j1", 2, TaskState.WAITING),
            task(e, "r", 3, TaskState.RUNNING),
            task(other, "j", 1, TaskState.WAITING),
        ],
    )
    async with store.transaction() as tx:
        assert [t.name for t in await tx.waiting_tasks(e)] == ["j1", "j2"]
        assert await tx.waiting_tasks(ExecutionId("ghost")) == []


async def test_reads_in_a_transaction_see_its_own_writes_and_others_do_not(
    store: Store,
) -> None:
    e = full_execution(1)
    t = task(e.id, "t1", 1, TaskState.WAITING)
    a = assignment(1, execution_id=str(e.id))
    tm = timer(1, 3.0)
    async with store.transaction() as tx:
        await tx.insert_execution(e)
        await tx.save_tasks([t])
        await tx.save_assignments([a])
        await tx.save_timers([tm])
        assert await tx.lock_execution(e.id) == e
        assert await tx.find_execution_by_request_id("req-1") == e.id
        assert await tx.get_task(t.id) == t
        assert await tx.latest_tasks(e.id, ["t1"]) == {"t1": t}
        assert await tx.waiting_tasks(e.id) == [t]
        assert await tx.get_assignment(a.id) == a
        assert await tx.task_assignments(t.id) == [a]
        changed = replace(e, next_seq=99)
        await tx.update_execution(changed)
        assert await tx.lock_execution(e.id) == changed
        # Nothing is visible outside before the commit.
        assert await store.get_execution(e.id) is None
        assert await store.list_tasks(e.id) == []
        assert await store.get_assignment(a.id) is None
        assert await store.due_timers(10.0, 10) == []
        assert await tx.take_timer(tm.id) == tm
        assert await tx.take_timer(tm.id) is None
    assert await store.get_execution(e.id) == changed
    assert await store.due_timers(10.0, 10) == []


async def test_a_failed_transaction_leaves_nothing(store: Store) -> None:
    before = execution(1)
    await commit(store, executions=[before], timers=[timer("kept", 1.0)])
    with pytest.raises(RuntimeError, match="abort"):
        async with store.transaction() as tx:
            await tx.insert_execution(execution(2, request_id="r2"))
            await tx.update_execution(replace(before, state=ExecutionState.SUCCESS))
            await tx.save_tasks([task(before.id, "t", 1)])
            await tx.save_assignments([assignment(1)])
            await tx.save_timers([timer("new", 1.0)])
            await tx.delete_timers(["timer-kept"])
            raise RuntimeError("abort")
    assert await store.get_execution(ExecutionId("e2")) is None
    assert await store.get_execution(before.id) == before
    assert await store.list_tasks(before.id) == []
    assert await store.get_assignment(AssignmentId("a1")) is None
    assert await store.claim_assignments("w", {"act"}, 10, 1e12) == []
    assert [t.id for t in await store.due_timers(10.0, 10)] == ["timer-kept"]
    async with store.transaction() as tx:  # and the request_id is free
        assert await tx.find_execution_by_request_id("r2") is None


async def test_writers_of_one_execution_lose_no_update(store: Store) -> None:
    """Read-modify-write under lock_execution from many tasks at once: every one counts."""
    await commit(store, executions=[execution(1, next_seq=0)])

    async def increment() -> None:
        async with store.transaction() as tx:
            e = await tx.lock_execution(ExecutionId("e1"))
            assert e is not None
            await asyncio.sleep(0)  # let the others run between the read and the write
            await tx.update_execution(replace(e, next_seq=e.next_seq + 1))

    await asyncio.gather(*(increment() for _ in range(25)))
    found = await store.get_execution(ExecutionId("e1"))
    assert found is not None and found.next_seq == 25


# ---------------------------------------------------------------- request ids


async def test_a_taken_request_id_raises_request_id_taken(store: Store) -> None:
    await commit(store, executions=[execution(1, request_id="r")])
    async with store.transaction() as tx:
        with pytest.raises(RequestIdTakenError):
            await tx.insert_execution(execution(2, request_id="r"))
        # The transaction is still usable, as after SQLite's failed INSERT.
        assert await tx.find_execution_by_request_id("r") == ExecutionId("e1")
        await tx.insert_execution(execution(3, request_id="r3"))
        with pytest.raises(RequestIdTakenError):
            await tx.insert_execution(execution(4, request_id="r3"))
    assert await store.get_execution(ExecutionId("e2")) is None
    assert await store.get_execution(ExecutionId("e3")) is not None


async def test_executions_without_request_id_never_collide(store: Store) -> None:
    await commit(store, executions=[execution(1), execution(2)])
    await commit(store, executions=[execution(3)])
    assert all([await store.get_execution(ExecutionId(f"e{n}")) for n in (1, 2, 3)])


async def test_postgres_request_id_race_the_second_waits_then_loses(pg: PostgresStore) -> None:
    inserted, finish = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with pg.transaction() as tx:
            await tx.insert_execution(execution(1, request_id="r"))
            inserted.set()
            await finish.wait()

    async def second() -> None:
        await inserted.wait()
        async with pg.transaction() as tx:
            await tx.insert_execution(execution(2, request_id="r"))

    async with running(first(), second()) as (one, two):
        await wait_for_lock_waiters(pg, 1)  # the second insert waits for the first transaction
        assert not two.done()
        finish.set()
        await one
        with pytest.raises(RequestIdTakenError):
            await asyncio.wait_for(two, DEADLINE)


async def test_postgres_request_id_race_the_second_wins_if_the_first_rolls_back(
    pg: PostgresStore,
) -> None:
    inserted, finish = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        with pytest.raises(RuntimeError):
            async with pg.transaction() as tx:
                await tx.insert_execution(execution(1, request_id="r"))
                inserted.set()
                await finish.wait()
                raise RuntimeError("roll back")

    async def second() -> None:
        await inserted.wait()
        async with pg.transaction() as tx:
            await tx.insert_execution(execution(2, request_id="r"))

    async with running(first(), second()) as (one, two):
        await wait_for_lock_waiters(pg, 1)
        finish.set()
        await one
        await asyncio.wait_for(two, DEADLINE)
    async with pg.transaction() as tx:
        assert await tx.find_execution_by_request_id("r") == ExecutionId("e2")


# ---------------------------------------------------------------- row locks (PostgreSQL)


async def test_postgres_lock_execution_makes_a_second_writer_wait_for_the_commit(
    pg: PostgresStore,
) -> None:
    await commit(pg, executions=[execution(1)])
    locked, finish = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with pg.transaction() as tx:
            e = await tx.lock_execution(ExecutionId("e1"))
            assert e is not None
            locked.set()
            await finish.wait()
            await tx.update_execution(replace(e, state_info="written by the first"))

    async def second() -> ExecutionRecord | None:
        await locked.wait()
        async with pg.transaction() as tx:
            return await tx.lock_execution(ExecutionId("e1"))

    async with running(first(), second()) as (one, two):
        await wait_for_lock_waiters(pg, 1)
        assert not two.done()
        finish.set()
        seen = await asyncio.wait_for(two, DEADLINE)
        await one
    # It waited for the commit, then read the committed row.
    assert seen is not None and seen.state_info == "written by the first"


async def test_postgres_writers_of_different_executions_do_not_wait(pg: PostgresStore) -> None:
    await commit(pg, executions=[execution(1), execution(2)])
    locked, finish = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with pg.transaction() as tx:
            assert await tx.lock_execution(ExecutionId("e1")) is not None
            locked.set()
            await finish.wait()

    async def second() -> None:
        async with pg.transaction() as tx:
            e = await tx.lock_execution(ExecutionId("e2"))
            assert e is not None
            await tx.update_execution(replace(e, state_info="second"))

    async with running(first()) as (one,):
        await until(locked)
        await asyncio.wait_for(second(), DEADLINE)  # done while the first still holds e1
        assert not one.done()
        finish.set()
        await one
    found = await pg.get_execution(ExecutionId("e2"))
    assert found is not None and found.state_info == "second"


async def test_postgres_an_engine_holding_an_assignment_does_not_block_claims(
    pg: PostgresStore,
) -> None:
    """A transaction that read an assignment holds it; claimers take the others meanwhile."""
    ids = await queue(pg, 3)
    held, finish = asyncio.Event(), asyncio.Event()

    async def engine() -> None:
        async with pg.transaction() as tx:
            assert await tx.get_assignment(AssignmentId(ids[0])) is not None
            held.set()
            await finish.wait()

    async with running(engine()) as (one,):
        await until(held)
        claimed = await asyncio.wait_for(pg.claim_assignments("w", {"act"}, 10, 1e12), DEADLINE)
        assert [a.id for a in claimed] == ids[1:]
        finish.set()
        await one
    assert [a.id for a in await pg.claim_assignments("w", {"act"}, 10, 1e12)] == ids[:1]


# ---------------------------------------------------------------- the queue


async def test_claim_respects_actions_limit_and_fifo_order(store: Store) -> None:
    await commit(
        store,
        assignments=[
            assignment(i, "a" if i % 3 else "b", created_at=1000.0 + i) for i in range(1, 10)
        ]
        + [
            assignment("held", "a", state=AssignmentState.HELD, created_at=1.0),
            assignment("deferred", "a", state=AssignmentState.DEFERRED, created_at=1.0),
            assignment("done", "a", state=AssignmentState.DONE, created_at=1.0),
        ],
    )
    first = await store.claim_assignments("w1", {"a"}, 3, 500.0)
    assert [a.id for a in first] == ["a1", "a2", "a4"]
    assert all(
        a.state == AssignmentState.LEASED and a.worker_id == "w1" and a.lease_expires_at == 500.0
        for a in first
    )
    assert [await store.get_assignment(a.id) for a in first] == first
    assert await store.claim_assignments("w2", {"a", "b"}, 0, 500.0) == []
    assert await store.claim_assignments("w2", set(), 10, 500.0) == []
    assert await store.claim_assignments("w2", {"nope"}, 10, 500.0) == []
    rest = await store.claim_assignments("w2", {"a", "b"}, 100, 600.0)
    assert [a.id for a in rest] == ["a3", "a5", "a6", "a7", "a8", "a9"]
    assert await store.claim_assignments("w2", {"a", "b"}, 100, 600.0) == []


async def test_a_released_assignment_keeps_its_place_in_the_queue(store: Store) -> None:
    ids = await queue(store, 3)
    [oldest] = await store.claim_assignments("w1", {"act"}, 1, 500.0)
    assert oldest.id == ids[0]
    assert await store.release_assignments("w1") == 1
    [first] = await store.claim_assignments("w2", {"act"}, 1, 500.0)
    assert first.id == ids[0]  # ahead of the ones queued after it
    again = await store.claim_assignments("w2", {"act"}, 3, 500.0)
    assert [a.id for a in again] == ids[1:]


async def test_claim_honours_targets(store: Store) -> None:
    await commit(
        store,
        assignments=[
            assignment(1, target="gpu", created_at=1.0),
            assignment(2, created_at=2.0),
            assignment(3, target="arm", created_at=3.0),
        ],
    )
    assert [a.id for a in await store.claim_assignments("plain", {"act"}, 10, 9.0)] == ["a2"]
    gpu = await store.claim_assignments("gpu", {"act"}, 10, 9.0, targets={"gpu", "tpu"})
    assert [a.id for a in gpu] == ["a1"]
    assert [a.id for a in await store.claim_assignments("x", {"act"}, 10, 9.0, ["arm"])] == ["a3"]


async def test_concurrent_claimers_share_nothing_and_miss_nothing(store: Store) -> None:
    ids = await queue(store, 200)
    if isinstance(store, PostgresStore):
        await _connect_ahead(store, 8)
    start = asyncio.Event()

    async def claimer(n: int) -> list[str]:
        got: list[str] = []
        await start.wait()
        while claimed := await store.claim_assignments(f"w{n}", {"act"}, 7, 1e12):
            got += [a.id for a in claimed]
        return got

    tasks = [asyncio.create_task(claimer(n)) for n in range(8)]
    start.set()
    results = await asyncio.gather(*tasks)
    everything = [i for got in results for i in got]
    assert len(everything) == len(set(everything)) == 200
    assert set(everything) == set(ids)
    if isinstance(store, PostgresStore):
        # Eight connections were ready: every first claim went out before any came back.
        assert all(results)
    for n, got in enumerate(results):
        for assignment_id in got:
            found = await store.get_assignment(AssignmentId(assignment_id))
            assert found is not None and found.worker_id == f"w{n}"


async def _connect_ahead(store: PostgresStore, count: int) -> None:
    """Make the pool open ``count`` connections now (it opens them lazily)."""
    all_in = asyncio.Barrier(count)

    async def hold() -> None:
        async with store.transaction():
            await asyncio.wait_for(all_in.wait(), DEADLINE)

    await asyncio.gather(*(hold() for _ in range(count)))


async def test_release_extend_expire_and_defer(store: Store) -> None:
    ids = [AssignmentId(i) for i in await queue(store, 4)]
    assert await store.next_lease_expiry() is None
    await store.claim_assignments("w1", {"act"}, 3, 100.0)
    await store.claim_assignments("w2", {"act"}, 1, 300.0)

    # release: the worker's leases go back to the queue, except those it keeps
    assert await store.release_assignments("w1", keep=[ids[0]]) == 2
    states = [await store.get_assignment(i) for i in ids]
    assert [(a.state, a.worker_id, a.lease_expires_at) for a in states if a] == [
        (AssignmentState.LEASED, "w1", 100.0),
        (AssignmentState.QUEUED, None, None),
        (AssignmentState.QUEUED, None, None),
        (AssignmentState.LEASED, "w2", 300.0),
    ]
    assert await store.release_assignments("nobody") == 0

    # extend: only the worker's own live leases
    await store.extend_leases("w1", [ids[0], ids[1], ids[3]], 200.0)
    await store.extend_leases("w1", [], 999.0)
    lease = [(await store.get_assignment(i)) for i in ids]
    assert [a.lease_expires_at for a in lease if a] == [200.0, None, None, 300.0]
    assert await store.next_lease_expiry() == 200.0

    # expired: leases that ran out at ``now`` or before, earliest first; reading changes nothing
    assert await store.expired_leases(199.9, 10) == []
    assert [a.id for a in await store.expired_leases(200.0, 10)] == [ids[0]]
    assert [a.id for a in await store.expired_leases(300.0, 10)] == [ids[0], ids[3]]
    assert [a.id for a in await store.expired_leases(300.0, 1)] == [ids[0]]
    assert [await store.get_assignment(i) for i in ids] == lease

    # defer: a LEASED (or QUEUED) assignment becomes DEFERRED, once, by the worker holding it
    holder = (await store.get_assignment(ids[3])).worker_id  # type: ignore[union-attr]
    assert holder is not None
    assert await store.defer_assignment(ids[3], f"not-{holder}") is False
    assert await store.defer_assignment(ids[3], holder) is True
    deferred = await store.get_assignment(ids[3])
    assert deferred is not None and deferred.state == AssignmentState.DEFERRED
    assert deferred.lease_expires_at is None
    assert await store.defer_assignment(ids[3], "w2") is False
    assert await store.defer_assignment(AssignmentId("ghost"), "w2") is False
    assert await store.next_lease_expiry() == 200.0
    assert [a.id for a in await store.expired_leases(1e12, 10)] == [ids[0]]


async def test_unfinished_tasks_are_those_not_final_in_seq_order(store: Store) -> None:
    e = ExecutionId("e1")
    states = list(TaskState)
    await commit(
        store,
        tasks=[task(e, f"t{seq}", seq, state) for seq, state in enumerate(reversed(states))]
        + [task(ExecutionId("e2"), "other", 1)],
    )
    async with store.transaction() as tx:
        unfinished = await tx.unfinished_tasks(e)
    assert [t.state for t in unfinished] == [s for s in reversed(states) if not s.is_final]


async def test_pause_and_resume_hold_back_only_queued_assignments(store: Store) -> None:
    await commit(
        store,
        assignments=[
            assignment(1, "x", created_at=1.0),
            assignment(2, "y", created_at=2.0),
            assignment(3, "z", state=AssignmentState.LEASED, worker_id="w", created_at=3.0),
            assignment(4, "x", execution_id="e2", created_at=4.0),
        ],
    )
    assert await store.queued_action_names() == {"x", "y"}
    async with store.transaction() as tx:
        assert await tx.queued_actions(ExecutionId("e1")) == {"x", "y"}
        await tx.pause_assignments(ExecutionId("e1"))
        assert await tx.queued_actions(ExecutionId("e1")) == set()
    assert await store.queued_action_names() == {"x"}  # e2's
    assert [a.id for a in await store.claim_assignments("w", {"x", "y"}, 10, 9.0)] == ["a4"]
    states = [await store.get_assignment(AssignmentId(f"a{n}")) for n in (1, 2, 3)]
    assert [a.state for a in states if a] == [
        AssignmentState.PAUSED,
        AssignmentState.PAUSED,
        AssignmentState.LEASED,
    ]
    async with store.transaction() as tx:
        await tx.resume_assignments(ExecutionId("e1"))
        assert await tx.queued_actions(ExecutionId("e1")) == {"x", "y"}
    assert [a.id for a in await store.claim_assignments("w", {"x", "y"}, 10, 9.0)] == ["a1", "a2"]


async def test_cancelling_an_execution_s_work(store: Store, kind: str) -> None:
    await commit(
        store,
        assignments=[
            assignment(1, created_at=1.0),
            assignment(
                2, state=AssignmentState.LEASED, worker_id="w", lease_expires_at=5.0, created_at=2.0
            ),
            assignment(3, state=AssignmentState.DONE, outcome=Outcome.success(1), created_at=3.0),
            assignment(4, state=AssignmentState.CHILD, created_at=4.0),
            assignment(5, execution_id="e2", created_at=5.0),
        ],
        timers=[timer(1, 1.0), timer(2, 2.0, execution_id=ExecutionId("e2"))],
    )
    async with store.transaction() as tx:
        assert await tx.child_execution_ids(ExecutionId("e1")) == [ExecutionId("a4")]
        await tx.cancel_execution_work(ExecutionId("e1"))
        assert await tx.child_execution_ids(ExecutionId("e1")) == []
    found = [await store.get_assignment(AssignmentId(f"a{n}")) for n in range(1, 6)]
    assert [(a.state, a.worker_id) for a in found if a] == [
        (AssignmentState.CANCELLED, None),
        (AssignmentState.CANCELLED, None),
        (AssignmentState.DONE, None),
        (AssignmentState.CANCELLED, None),
        (AssignmentState.QUEUED, None),
    ]
    if kind != "memory":  # the memory store keeps a cancelled lease's expiry (harmless)
        assert [a.lease_expires_at for a in found if a] == [None] * 5
    assert [t.id for t in await store.due_timers(10.0, 10)] == ["timer-2"]


async def test_failing_a_task_s_open_assignments(store: Store) -> None:
    await commit(
        store,
        assignments=[
            assignment(1, state=AssignmentState.LEASED, worker_id="w", created_at=1.0),
            assignment(2, state=AssignmentState.DONE, outcome=Outcome.success(1), created_at=2.0),
            assignment(3, state=AssignmentState.HELD, created_at=3.0),
            assignment(4, created_at=4.0, task_id=TaskId("e1.2")),
        ],
    )
    error = {"type": "Timeout", "message": "took longer than 5 s"}
    async with store.transaction() as tx:
        await tx.fail_task_assignments(TaskId("e1.1"), error)
        found = await tx.task_assignments(TaskId("e1.1"))
    assert [(a.state, a.worker_id, a.lease_expires_at, a.outcome) for a in found] == [
        (AssignmentState.DONE, None, None, Outcome.failure(error)),
        (AssignmentState.DONE, None, None, Outcome.success(1)),
        (AssignmentState.DONE, None, None, Outcome.failure(error)),
    ]
    untouched = await store.get_assignment(AssignmentId("a4"))
    assert untouched is not None and untouched.state == AssignmentState.QUEUED


async def test_announced_work_reaches_other_replicas_only_when_committed(store: Store) -> None:
    heard: asyncio.Queue[set[str]] = asyncio.Queue()
    listening = await store.subscribe(heard.put_nowait)
    if not isinstance(store, PostgresStore):
        assert listening is False  # nobody to tell: processes sharing the store poll
        async with store.transaction() as tx:
            await tx.announce({"a"})
        return
    assert listening is True
    other = same_place(store)  # another replica of the engine
    await other.open()
    try:
        with pytest.raises(RuntimeError):
            async with other.transaction() as tx:
                await tx.announce({"rolled-back"})
                raise RuntimeError("roll back")
        async with other.transaction() as tx:
            await tx.announce({"b", "a"})
        # Notifications arrive in commit order: the rolled-back one would have come first.
        assert await asyncio.wait_for(heard.get(), DEADLINE) == {"a", "b"}
        assert heard.empty()
    finally:
        await other.close()


async def test_postgres_listens_again_after_losing_its_connection(pg: PostgresStore) -> None:
    """The LISTEN connection is terminated (as when the database restarts): the store
    opens a new one, announces the work queued meanwhile, and hears NOTIFYs again."""
    heard: asyncio.Queue[set[str]] = asyncio.Queue()
    assert await pg.subscribe(heard.put_nowait) is True
    other = same_place(pg)  # another replica
    await other.open()
    try:
        await queue(other, 1, action="missed")  # queued without a NOTIFY
        first = pg._listeners[0]
        await run_sql(other, "SELECT pg_terminate_backend($1)", first.get_server_pid())
        # The reconnect announces what is queued, without waiting for a NOTIFY.
        assert "missed" in await asyncio.wait_for(heard.get(), DEADLINE)
        assert pg._listeners and pg._listeners[0] is not first
        async with other.transaction() as tx:
            await tx.announce({"later"})
        while (got := await asyncio.wait_for(heard.get(), DEADLINE)) != {"later"}:
            assert "missed" in got  # a repeat of the reconnect's announcement, at most
    finally:
        await other.close()


# ---------------------------------------------------------------- history and listings


def entry(execution_id: str, state: str, at: float, task: str | None = None) -> HistoryEntry:
    return HistoryEntry(
        execution_id=ExecutionId(execution_id),
        kind="execution" if task is None else "task",
        state=state,
        state_info=f"{state.lower()} ✓",
        cause="AssignmentCompleted",
        at=at,
        task_id=None if task is None else TaskId(f"{execution_id}.1"),
        task_name=task,
    )


async def test_history_is_appended_in_order_and_read_after_a_seq(store: Store) -> None:
    first = [entry("e1", "RUNNING", 1.0), entry("e1", "RUNNING", 1.5, task="t1")]
    async with store.transaction() as tx:
        await tx.append_history(first)
        await tx.append_history([entry("e2", "RUNNING", 1.7)])
        await tx.append_history([])
    async with store.transaction() as tx:
        await tx.append_history([entry("e1", "SUCCESS", 2.0, task="t1")])
    found = await store.history(ExecutionId("e1"))
    seqs = [h.seq for h in found]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and seqs[0] > 0
    assert [replace(h, seq=0) for h in found] == [*first, entry("e1", "SUCCESS", 2.0, task="t1")]
    assert await store.history(ExecutionId("e1"), after_seq=seqs[0]) == found[1:]
    assert await store.history(ExecutionId("e1"), after_seq=seqs[0], limit=1) == found[1:2]
    assert await store.history(ExecutionId("e1"), after_seq=seqs[-1]) == []
    assert [h.state for h in await store.history(ExecutionId("e2"))] == ["RUNNING"]
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.append_history([entry("e2", "ERROR", 3.0)])
            raise RuntimeError("roll back")
    assert len(await store.history(ExecutionId("e2"))) == 1


async def test_list_executions_newest_first_filtered_and_paged(store: Store) -> None:
    made = [
        execution("a", created_at=10.0),
        execution("b", created_at=20.0, state=ExecutionState.SUCCESS),
        execution("c", created_at=20.0),
        execution("d", created_at=30.0, workflow="other"),
    ]
    await commit(store, executions=made)

    async def listed(**query: Any) -> list[str]:
        return [e.id for e in await store.list_executions(**query)]

    assert await listed() == ["ed", "ec", "eb", "ea"]
    assert await store.list_executions(limit=1) == [made[3]]
    assert await listed(state="RUNNING") == ["ed", "ec", "ea"]
    assert await listed(workflow="wf") == ["ec", "eb", "ea"]
    assert await listed(workflow="wf", state="SUCCESS") == ["eb"]
    assert await listed(before=(20.0, "ec")) == ["eb", "ea"]
    assert await listed(before=(20.0, "ec"), limit=1) == ["eb"]
    assert await listed(before=(10.0, "ea")) == []
    assert await listed(state="PAUSED") == []


# ---------------------------------------------------------------- timers


async def test_saving_a_timer_twice_keeps_the_first(store: Store) -> None:
    first = timer(1, 5.0)
    await commit(store, timers=[first])
    await commit(store, timers=[replace(first, due_at=1.0, payload={"second": True})])
    async with store.transaction() as tx:
        await tx.save_timers([timer(2, 7.0), timer(2, 1.0, kind="retry")])
    assert await store.due_timers(100.0, 10) == [first, timer(2, 7.0)]


async def test_due_timers_are_the_earliest_first_up_to_the_limit(store: Store) -> None:
    await commit(store, timers=[timer(n, due) for n, due in enumerate([30.0, 10.0, 20.0, 40.0])])
    assert await store.next_timer_due() == 10.0
    assert [t.due_at for t in await store.due_timers(30.0, 10)] == [10.0, 20.0, 30.0]
    assert [t.due_at for t in await store.due_timers(30.0, 2)] == [10.0, 20.0]
    assert await store.due_timers(9.9, 10) == []
    assert len(await store.due_timers(100.0, 10)) == 4  # reading takes nothing


async def test_take_and_delete_timers(store: Store) -> None:
    await commit(store, timers=[timer(n, float(n)) for n in range(1, 5)])
    async with store.transaction() as tx:
        assert await tx.take_timer("timer-2") == timer(2, 2.0)
        assert await tx.take_timer("timer-2") is None
        assert await tx.take_timer("ghost") is None
        await tx.delete_timers(["timer-1", "timer-3", "ghost"])
        await tx.delete_timers([])
    assert [t.id for t in await store.due_timers(100.0, 10)] == ["timer-4"]
    async with store.transaction() as tx:
        assert await tx.take_timer("timer-2") is None
        assert await tx.take_timer("timer-4") == timer(4, 4.0)
    assert await store.next_timer_due() is None
    assert await store.due_timers(100.0, 10) == []


async def test_two_engines_taking_one_timer_exactly_one_wins(store: Store) -> None:
    await commit(store, timers=[timer(1, 1.0)])

    async def take() -> TimerRecord | None:
        async with store.transaction() as tx:
            return await tx.take_timer("timer-1")

    results = await asyncio.gather(take(), take())
    assert sorted(r is not None for r in results) == [False, True]
    assert await store.next_timer_due() is None


async def test_postgres_take_timer_skips_a_timer_another_transaction_holds(
    pg: PostgresStore,
) -> None:
    await commit(pg, timers=[timer(1, 1.0), timer(2, 2.0)])
    taken, finish = asyncio.Event(), asyncio.Event()

    async def holder(timer_id: str, abort: bool) -> None:
        async with pg.transaction() as tx:
            assert await tx.take_timer(timer_id) is not None
            taken.set()
            await finish.wait()
            if abort:
                raise RuntimeError("roll back")

    async def other(timer_id: str) -> TimerRecord | None:
        async with pg.transaction() as tx:
            return await tx.take_timer(timer_id)

    # Committed: the other engine got nothing at once, and the timer is gone.
    async with running(holder("timer-1", abort=False)) as (one,):
        await until(taken)
        assert await asyncio.wait_for(other("timer-1"), DEADLINE) is None
        finish.set()
        await one
    # Rolled back: the other engine still got nothing, and the timer stays for later.
    taken.clear()
    finish.clear()
    async with running(holder("timer-2", abort=True)) as (two,):
        await until(taken)
        assert await asyncio.wait_for(other("timer-2"), DEADLINE) is None
        finish.set()
        with pytest.raises(RuntimeError):
            await two
    assert [t.id for t in await pg.due_timers(100.0, 10)] == ["timer-2"]


# ---------------------------------------------------------------- PostgreSQL errors and URLs


def test_store_for_picks_postgres_for_its_urls() -> None:
    for url in ("postgresql://u@127.0.0.1:5432/db", "postgres://u@127.0.0.1/db"):
        found = store_for(url)
        assert isinstance(found, PostgresStore) and found.url == url


async def test_postgres_driver_errors_become_store_errors(pg: PostgresStore) -> None:
    await commit(pg, executions=[execution(1)])
    with pytest.raises(StoreError, match="cannot insert execution e1") as caught:
        async with pg.transaction() as tx:
            await tx.save_timers([timer(1, 1.0)])
            await tx.insert_execution(execution(1))
    assert "duplicate key" in str(caught.value)
    assert await pg.due_timers(10.0, 10) == []  # rolled back
    assert await pg.get_execution(ExecutionId("e1")) == execution(1)  # and the pool still works

    for url in (
        "postgresql://postgres@127.0.0.1:1/test",  # nobody listens
        "postgresql://postgres@127.0.0.1:5432/levante_no_such_database",
        "postgresql://postgres@127.0.0.1:port/test",
    ):
        with pytest.raises(StoreError, match="cannot connect"):
            await PostgresStore(url).open()
    closed = PostgresStore(pg.url)
    with pytest.raises(StoreError, match="not open"):
        await closed.get_execution(ExecutionId("e1"))
    with pytest.raises(StoreError, match="not open"):
        async with closed.transaction():
            pass


async def test_postgres_a_lost_connection_is_a_store_error(pg: PostgresStore) -> None:
    with pytest.raises(StoreError):
        async with pg.transaction() as tx:
            await run_sql(
                pg,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'levante'",
            )
            await tx.lock_execution(ExecutionId("e1"))
    # The pool replaces the dead connections.
    assert await pg.get_execution(ExecutionId("e1")) is None


async def test_postgres_databases_of_the_suite_are_dropped() -> None:
    url = await create_database()
    store = PostgresStore(url)
    await store.open()
    await dispose(store)
    with pytest.raises(StoreError):
        await PostgresStore(url).open()
    await drop_database(url)  # dropping twice is harmless


# ---------------------------------------------------------------- the engine on each store


def chain(n: int) -> str:
    lines = ["version: '2.0'", "chain:", "  tasks:"]
    for i in range(n):
        lines += [f"    t{i}:", "      action: std.echo output=<% $.get(x, 0) %>",
                  "      publish: {x: <% task().result + 1 %>}"]  # fmt: skip
        if i + 1 < n:
            lines.append(f"      on-success: [t{i + 1}]")
    lines.append("  output: {x: <% $.x %>}")
    return "\n".join(lines) + "\n"


async def drive(engine: Engine, store: Store, worker: str = "w") -> int:
    """Play a worker: claim and echo until nothing is queued; returns the steps taken."""
    steps = 0
    while claimed := await store.claim_assignments(worker, {"std.echo"}, 10, 1e12):
        for a in claimed:
            await engine.complete(a.id, Outcome.success(a.input.get("output")))
            steps += 1
    return steps


async def test_the_engine_runs_a_chain_to_success(store: Store) -> None:
    await store.declare_actions(["std.echo", "std.noop"], float("inf"), 0.0)  # as a worker would
    engine = Engine(store)
    await engine.register(chain(3))
    execution_id = await engine.run("chain", request_id="once")
    assert await engine.run("chain", request_id="once") == execution_id
    assert await drive(engine, store) == 3
    found, tasks = await engine.get_status(execution_id)
    assert found.state == ExecutionState.SUCCESS
    assert found.output == {"x": 3}
    assert [(t.name, t.state) for t in tasks] == [(f"t{i}", TaskState.SUCCESS) for i in range(3)]


async def test_the_engine_runs_many_executions_with_concurrent_workers(store: Store) -> None:
    await store.declare_actions(["std.echo", "std.noop"], float("inf"), 0.0)  # as a worker would
    engine = Engine(store)
    await engine.register(chain(3))
    ids = [await engine.run("chain") for _ in range(12)]

    async def worker(n: int) -> int:
        steps = 0
        # A worker stops when the queue is empty; completions by others may refill it.
        while not all(await _ended(engine, ids)):
            steps += await drive(engine, store, f"w{n}")
            await asyncio.sleep(0)
        return steps

    steps = await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(4))), 60)
    assert sum(steps) == 12 * 3
    for execution_id in ids:
        found, _ = await engine.get_status(execution_id)
        assert found.state == ExecutionState.SUCCESS and found.output == {"x": 3}


async def _ended(engine: Engine, ids: list[ExecutionId]) -> list[bool]:
    return [(await engine.get_status(i))[0].state.is_final for i in ids]


class _PausingStore:
    """A store whose transactions stop right after inserting an execution, until told."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.inserted = asyncio.Event()
        self.go_on = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        async with self.inner.transaction() as tx:
            yield _PausingTransaction(tx, self)


class _PausingTransaction:
    def __init__(self, tx: Any, owner: _PausingStore) -> None:
        self._tx = tx
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def insert_execution(self, execution: ExecutionRecord) -> None:
        await self._tx.insert_execution(execution)
        self._owner.inserted.set()
        await self._owner.go_on.wait()


async def test_postgres_two_replicas_running_one_request_id_start_one_execution(
    pg: PostgresStore,
) -> None:
    """The replica that loses the insert race gets RequestIdTakenError and answers with
    the winner's execution."""
    other = same_place(pg)
    await other.open()
    try:
        await pg.declare_actions(["std.echo"], float("inf"), 0.0)  # as a worker would
        paused = _PausingStore(pg)
        first, second = Engine(paused), Engine(other)
        await first.register(chain(3))
        async with running(first.run("chain", request_id="once")) as (winner,):
            await until(paused.inserted)
            loser = asyncio.create_task(second.run("chain", request_id="once"))
            await wait_for_lock_waiters(pg, 1)  # its insert waits on the unique index
            paused.go_on.set()
            assert await asyncio.wait_for(loser, DEADLINE) == await winner
        assert [e.id for e in await pg.list_executions()] == [await winner]
        assert len(await pg.claim_assignments("w", {"std.echo"}, 10, 1e12)) == 1
    finally:
        await other.close()


# -- SQLite group commit: transactions that arrive together share one COMMIT


async def test_sqlite_transactions_arriving_together_share_commits_and_all_land(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "group.db")
    await store.open()
    try:
        watcher = await aiosqlite.connect(store.path)
        async with watcher.execute("PRAGMA data_version") as cur:
            before = (await cur.fetchone())[0]  # type: ignore[index]

        async def write(n: int) -> None:
            async with store.transaction() as tx:
                await tx.insert_execution(execution(n))

        await asyncio.gather(*(write(n) for n in range(200)))
        # Every member returned after its commit: all 200 rows are visible to a reader.
        for n in range(200):
            assert await store.get_execution(execution(n).id) is not None
        async with watcher.execute("PRAGMA data_version") as cur:
            after = (await cur.fetchone())[0]  # type: ignore[index]
        await watcher.close()
        # data_version changes once per commit seen from another connection; 200
        # transactions shared far fewer commits than 200.
        assert 0 < after - before < 100
    finally:
        await store.close()


async def test_sqlite_a_failing_member_of_a_group_leaves_the_others_writes(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "group.db")
    await store.open()
    try:
        async def write(n: int) -> None:
            async with store.transaction() as tx:
                await tx.insert_execution(execution(n))
                if n % 3 == 0:
                    raise RuntimeError(f"member {n} fails after writing")

        results = await asyncio.gather(*(write(n) for n in range(30)), return_exceptions=True)
        for n, outcome in enumerate(results):
            stored = await store.get_execution(execution(n).id)
            if n % 3 == 0:
                assert isinstance(outcome, RuntimeError)
                assert stored is None, f"member {n}'s writes should be rolled back"
            else:
                assert outcome is None
                assert stored is not None
    finally:
        await store.close()


async def test_sqlite_a_member_cancelled_while_waiting_does_not_strand_the_group(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "group.db")
    await store.open()
    try:
        inside = asyncio.Event()
        release = asyncio.Event()

        async def first() -> None:
            async with store.transaction() as tx:
                await tx.insert_execution(execution(1))
                inside.set()
                await release.wait()

        async def waiting(n: int) -> None:
            async with store.transaction() as tx:
                await tx.insert_execution(execution(n))

        holder = asyncio.create_task(first())
        await until(inside)
        doomed = asyncio.create_task(waiting(2))
        await asyncio.sleep(0)  # it starts waiting for the writer connection
        release.set()
        # The holder leaves while the other still waits, so it keeps the group open for
        # it and waits for the commit; then the waiting one is cancelled.
        for _ in range(1000):
            if not holder.done() and not store._write_lock.locked():
                break
            await asyncio.sleep(0)
        assert store._group is not None and not holder.done()
        doomed.cancel()
        await asyncio.wait_for(holder, 10)  # returns only once the group committed
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert await store.get_execution(execution(1).id) is not None
        assert await store.get_execution(execution(2).id) is None
        await asyncio.wait_for(waiting(3), 10)  # the writer is free again
        assert await store.get_execution(execution(3).id) is not None
    finally:
        await store.close()


async def test_waiting_notes_are_cleared_when_a_worker_of_their_action_attaches(
    store: Store,
) -> None:
    from levante.store.base import WAITING_FOR_WORKER

    e = execution(1)
    note = f"{WAITING_FOR_WORKER} 'slow.thing': none is connected"
    waiting = replace(task(e.id, "a", 1), state_info=note)
    other = replace(task(e.id, "b", 2), state_info=f"{WAITING_FOR_WORKER} 'other': none")
    finished = replace(task(e.id, "c", 3, TaskState.SUCCESS), state_info=note)
    async with store.transaction() as tx:
        await tx.insert_execution(e)
        await tx.note_waiting(waiting, "slow.thing")
        await tx.note_waiting(other, "other")
        await tx.note_waiting(finished, "slow.thing")
    assert await store.clear_waiting_notes(["nobody.waits"]) == 0
    assert await store.clear_waiting_notes(["slow.thing"]) == 1  # the finished one keeps its
    by_name = {t.name: t for t in await store.list_tasks(e.id)}
    assert by_name["a"].state_info == ""
    assert by_name["b"].state_info.startswith(WAITING_FOR_WORKER)
    assert by_name["c"].state_info == note
    assert await store.clear_waiting_notes(["slow.thing"]) == 0  # each note is cleared once


async def test_sqlite_the_wal_starts_over_while_writes_never_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small limits, so that a few megabytes of writes cross them many times.
    limit = 256 * 1024
    monkeypatch.setattr(sqlite_store, "WAL_CHECKPOINT_BYTES", limit)
    monkeypatch.setattr(sqlite_store, "WAL_CHECK_EVERY_COMMITS", 4)
    store = SqliteStore(tmp_path / "wal.db")
    await store.open()
    wal = Path(f"{store.path}-wal")
    try:
        largest = 0
        padding = "x" * 2000
        for batch in range(800):  # one commit after another, never an idle moment
            async with store.transaction() as tx:
                await tx.save_timers([
                    TimerRecord(f"t{batch}-{i}", ExecutionId("e"), "retry", 0.0,
                                payload={"padding": padding})
                    for i in range(20)
                ])  # fmt: skip
            largest = max(largest, wal.stat().st_size)
        # About 32 MB of frames were written: without starting over, the WAL holds them
        # all; each checkpoint lets it start from its beginning again (it overshoots the
        # limit by what is written while a checkpoint runs).
        assert store.commits >= 800
        assert largest < 16 * limit, f"the WAL grew to {largest} bytes"
        assert len(await store.due_timers(1.0, 20_000)) == 16_000
    finally:
        await store.close()


async def test_postgres_vacuums_the_queue_as_it_goes(
    pg: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every state an assignment goes through leaves dead index entries that each claim
    # walks over until a vacuum removes them; the store does not wait for autovacuum.
    monkeypatch.setattr(postgres_store, "VACUUM_AFTER_CHANGES", 20)
    await pg.declare_actions(["std.echo"], float("inf"), 0.0)
    engine = Engine(pg)
    await engine.register(
        "version: '2.0'\nloop:\n  tasks:\n"
        + "".join(f"    t{i}:\n      action: std.echo\n      on-success: [t{i + 1}]\n"
                  for i in range(39))
        + "    t39:\n      action: std.echo\n"
    )  # fmt: skip
    await engine.run("loop")
    while claimed := await pg.claim_assignments("w", {"std.echo"}, 1, 1e12):
        await engine.complete(claimed[0].id, Outcome.success())
    conn = await asyncpg.connect(pg.url)
    try:
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while True:
            vacuums = await conn.fetchval(
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'assignments'"
            )
            if vacuums or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert vacuums >= 1  # 80 claims and transactions: at least one vacuum ran
    finally:
        await conn.close()


async def test_sqlite_a_group_commits_on_a_thread_and_a_lone_transaction_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(tmp_path / "thread.db")
    await store.open()
    off_loop: list[tuple[Any, ...]] = []
    to_thread = asyncio.to_thread

    async def recording(func: Any, /, *args: Any) -> Any:
        off_loop.append(args)
        return await to_thread(func, *args)

    monkeypatch.setattr(sqlite_store.asyncio, "to_thread", recording)
    try:
        async def write(n: int) -> None:
            async with store.transaction() as tx:
                await tx.insert_execution(execution(n))

        await write(0)  # alone: committed on the event loop's thread
        assert off_loop == []
        before = store.commits
        await asyncio.gather(*(write(n) for n in range(1, 41)))
        # The 40 arrived together: their groups committed on a thread, and every member
        # returned only after its group's commit.
        assert ("COMMIT",) in off_loop
        assert store.commits - before <= len(off_loop) + 1
        for n in range(41):
            assert await store.get_execution(execution(n).id) is not None
    finally:
        await store.close()


async def test_postgres_plans_read_through_indexes_even_on_empty_tables(
    pg: PostgresStore,
) -> None:
    # PostgreSQL keeps a generic plan for a prepared statement after five runs, costed
    # on the tables as they are then. One made on a new database's nearly empty tables
    # scans them whole, and stays until an ANALYZE: each step would cost more than the
    # one before (postgres.SERVER_SETTINGS). The hot statements' generic plans, made on
    # empty tables, must use the indexes.
    probes = {
        "tasks_and_latest": (postgres_store._TASKS_AND_LATEST, "'{}', '{}', '{}'"),
        "get_assignments": (postgres_store._GET_ASSIGNMENTS, "'{}'"),
        "lock_executions": (postgres_store._LOCK_EXECUTIONS, "'{}'"),
        "claim": (postgres_store._CLAIM, "'w', 0, '{}', 1, '{}'"),
    }
    async with pg._p.acquire() as conn:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        try:
            for name, (sql, args) in probes.items():
                await conn.execute(f"PREPARE probe_{name} AS {sql}")
                found = await conn.fetch(f"EXPLAIN EXECUTE probe_{name}({args})")
                await conn.execute(f"DEALLOCATE probe_{name}")
                plan = "\n".join(r[0] for r in found)
                assert "Seq Scan" not in plan, f"{name}:\n{plan}"
        finally:
            await conn.execute("RESET plan_cache_mode")
