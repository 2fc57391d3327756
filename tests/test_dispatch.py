"""The dispatcher over a real SQLite store: actions, capacity, leases, holding."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from levante.core.model import AssignmentRecord, AssignmentState, Outcome
from levante.dispatch import Dispatcher, WorkerSession
from levante.engine import Engine
from levante.errors import ConflictError
from levante.ids import AssignmentId
from levante.store import SqliteStore

PARALLEL = """
version: '2.0'
parallel:
  tasks:
    a1: {action: work.a}
    a2: {action: work.a}
    a3: {action: work.a}
    a4: {action: work.a}
    a5: {action: work.a}
    b1: {action: work.b}
"""


class Inbox:
    def __init__(self) -> None:
        self.items: asyncio.Queue[AssignmentRecord] = asyncio.Queue()

    async def deliver(self, assignment: AssignmentRecord) -> None:
        self.items.put_nowait(assignment)

    async def take(self, n: int, timeout: float = 10.0) -> list[AssignmentRecord]:
        return [await asyncio.wait_for(self.items.get(), timeout) for _ in range(n)]

    def empty_now(self) -> bool:
        return self.items.empty()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, Engine, Dispatcher]]:
    store = SqliteStore(tmp_path / "d.db")
    await store.open()
    engine = Engine(store)
    dispatcher = Dispatcher(store, engine, lease_seconds=0.3)
    engine.set_dispatch_listener(dispatcher.notify)
    await dispatcher.start()
    await engine.register(PARALLEL)
    try:
        yield store, engine, dispatcher
    finally:
        await dispatcher.close()
        await store.close()


async def settle(dispatcher: Dispatcher) -> None:
    """Let every pump finish what it is doing (no fixed sleep: wait until idle)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def test_only_declared_actions_and_never_over_capacity(parts) -> None:  # type: ignore[no-untyped-def]
    _store, engine, dispatcher = parts
    only_b = Inbox()
    session_b = WorkerSession("wb", frozenset({"work.b"}), 5, only_b.deliver)
    await dispatcher.attach(session_b, ())
    two = Inbox()
    session_a = WorkerSession("wa", frozenset({"work.a"}), 2, two.deliver)
    await dispatcher.attach(session_a, ())
    await engine.run("parallel")
    [b] = await only_b.take(1)
    assert b.action == "work.b"
    first = await two.take(2)
    assert {a.action for a in first} == {"work.a"}
    await settle(dispatcher)
    assert two.empty_now()  # capacity 2: nothing more until a result arrives
    assert len(session_a.in_flight) == 2
    await dispatcher.result(session_a, first[0].id, Outcome.success(1))
    [third] = await two.take(1)
    assert third.id not in {a.id for a in first}
    await settle(dispatcher)
    assert two.empty_now() and only_b.empty_now()


async def test_lease_runs_out_and_the_assignment_goes_elsewhere(parts) -> None:  # type: ignore[no-untyped-def]
    store, engine, dispatcher = parts
    silent = Inbox()
    await dispatcher.attach(WorkerSession("silent", frozenset({"work.b"}), 1, silent.deliver), ())
    await engine.run("parallel")
    [held] = await silent.take(1)
    other = Inbox()
    await dispatcher.attach(WorkerSession("other", frozenset({"work.b"}), 1, other.deliver), ())
    # No heartbeat from 'silent': the 0.3 s lease runs out and 'other' gets a new attempt
    # of the same task; the silent worker's attempt is superseded and its outcome refused.
    [again] = await other.take(1, timeout=10)
    assert again.task_id == held.task_id and again.attempt == 2 and again.id != held.id
    superseded = await store.get_assignment(held.id)
    assert superseded is not None and superseded.state == AssignmentState.CANCELLED
    with pytest.raises(ConflictError):
        await engine.complete(held.id, Outcome.success("late"))
    await engine.complete(again.id, Outcome.success("on time"))
    _, tasks = await engine.get_status(again.execution_id)
    assert [t.result for t in tasks if t.name == "b1"] == ["on time"]


async def test_heartbeats_keep_the_lease(parts) -> None:  # type: ignore[no-untyped-def]
    store, engine, dispatcher = parts
    busy = Inbox()
    session = WorkerSession("busy", frozenset({"work.b"}), 1, busy.deliver)
    await dispatcher.attach(session, ())
    await engine.run("parallel")
    [held] = await busy.take(1)
    loop = asyncio.get_running_loop()
    until = loop.time() + 1.0  # more than three leases
    while loop.time() < until:
        await dispatcher.heartbeat(session, [held.id])
        await asyncio.sleep(0.05)
    record = await store.get_assignment(held.id)
    assert record is not None
    assert record.state == AssignmentState.LEASED and record.worker_id == "busy"


async def test_hello_holding_keeps_held_work_and_requeues_the_rest(parts) -> None:  # type: ignore[no-untyped-def]
    store, engine, dispatcher = parts
    dispatcher.lease_seconds = 60
    first = Inbox()
    session = WorkerSession("w", frozenset({"work.a"}), 5, first.deliver)
    await dispatcher.attach(session, ())
    await engine.run("parallel")
    got = await first.take(5)
    # The engine restarts (simulated: a new session of the same worker on the same store);
    # the worker says it still holds two of the five.
    keep = [got[0].id, got[1].id]
    again = Inbox()
    await dispatcher.attach(WorkerSession("w", frozenset({"work.a"}), 5, again.deliver), keep)
    redelivered = await again.take(3)
    assert {a.id for a in redelivered} == {a.id for a in got[2:]}
    for assignment_id in keep:
        record = await store.get_assignment(AssignmentId(assignment_id))
        assert record is not None and record.state == AssignmentState.LEASED


async def test_detach_requeues_but_not_deferred(parts) -> None:  # type: ignore[no-untyped-def]
    store, engine, dispatcher = parts
    dispatcher.lease_seconds = 60
    inbox = Inbox()
    session = WorkerSession("w", frozenset({"work.a"}), 5, inbox.deliver)
    await dispatcher.attach(session, ())
    await engine.run("parallel")
    got = await inbox.take(5)
    await dispatcher.defer(session, got[0].id)
    await dispatcher.detach(session)
    states = [(await store.get_assignment(a.id)).state for a in got]  # type: ignore[union-attr]
    assert states[0] == AssignmentState.DEFERRED
    assert states[1:] == [AssignmentState.QUEUED] * 4


async def test_a_task_timeout_bounds_its_lease(parts) -> None:  # type: ignore[no-untyped-def]
    store, engine, dispatcher = parts
    dispatcher.lease_seconds = 60
    await engine.register("""
version: '2.0'
bounded:
  tasks:
    t:
      action: work.a
      timeout: 5
""")
    inbox = Inbox()
    session = WorkerSession("w", frozenset({"work.a"}), 1, inbox.deliver)
    await dispatcher.attach(session, ())
    await engine.run("bounded")
    [held] = await inbox.take(1)
    assert held.deadline is not None and held.lease_expires_at is not None
    assert held.lease_expires_at == held.deadline <= held.created_at + 5.001
    await dispatcher.heartbeat(session, [held.id])
    again = await store.get_assignment(held.id)
    assert again is not None and again.lease_expires_at == held.deadline
