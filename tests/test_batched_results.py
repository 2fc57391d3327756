"""Results recorded together: Engine.complete_many and the dispatcher's batches of a
worker's results, on every store (memory, a SQLite file, PostgreSQL)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from stores import STORE_KINDS, opened_store

from levante.bench import workflows
from levante.core.model import AssignmentRecord, AssignmentState, Decision, Outcome, TaskState
from levante.dispatch import TRANSACTIONS_PER_WORKER, Dispatcher, WorkerSession
from levante.engine import Completion, Engine, _Effects, _Written
from levante.errors import (
    AlreadyCompletedError,
    ConflictError,
    LimitExceededError,
    NotFoundError,
)
from levante.ids import AssignmentId, ExecutionId, TaskId
from levante.limits import DEFAULT_LIMITS
from levante.store import SqliteStore
from levante.store.base import Store, StoreTransaction

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with opened_store(request.param, tmp_path) as s:
        await s.declare_actions(["std.noop"], float("inf"), 0.0)
        yield s


async def claim_all(store: Store, n: int) -> list[AssignmentRecord]:
    claimed = await store.claim_assignments("w", {"std.noop"}, n + 1, 1e12)
    assert len(claimed) == n
    return claimed


async def fanned_out(
    store: Store, n: int, engine: Engine | None = None
) -> tuple[Engine, ExecutionId, list[AssignmentRecord]]:
    """An engine running a fan-out of ``n`` whose first task is done: its ``n`` parallel
    assignments, claimed."""
    engine = Engine(store) if engine is None else engine
    await engine.register(workflows.fan_out("fan", n))
    fan = await engine.run("fan")
    [start] = await claim_all(store, 1)
    await engine.complete(start.id, Outcome.success())
    return engine, fan, await claim_all(store, n)


async def state_of(store: Store, execution_id: ExecutionId) -> tuple[str, dict[str, str]]:
    execution = await store.get_execution(execution_id)
    assert execution is not None
    tasks = {t.name: t.state.value for t in await store.list_tasks(execution_id)}
    return execution.state.value, tasks


async def test_the_bulk_reads_see_the_transactions_own_writes(store: Store) -> None:
    engine = Engine(store)
    await engine.register(workflows.fan_out("fan", 3))
    first = await engine.run("fan")
    second = await engine.run("fan")
    [a, b] = await claim_all(store, 2)
    async with store.transaction() as tx:
        found = await tx.get_assignments({a.id, b.id, AssignmentId("nope")})
        assert set(found) == {a.id, b.id}
        locked = await tx.lock_executions({second, first, ExecutionId("nope")})
        assert set(locked) == {first, second}
        by_id, latest = await tx.tasks_and_latest(
            {a.task_id, TaskId("nope")}, {first: {"start", "p0", "missing"}, second: set()}
        )
        assert set(by_id) == {a.task_id}
        assert set(latest) == {first, second}
        assert set(latest[first]) == {"start"} and latest[second] == {}
        # A row written in this transaction (buffered, on PostgreSQL) is read back.
        await tx.save_tasks([dataclasses.replace(by_id[a.task_id], state=TaskState.SUCCESS)])
        by_id, latest = await tx.tasks_and_latest({a.task_id}, {first: {"start"}})
        assert by_id[a.task_id].state == TaskState.SUCCESS
        assert latest[first]["start"].state == TaskState.SUCCESS


async def test_one_call_records_several_results_each_with_its_own_answer(store: Store) -> None:
    engine, fan, p = await fanned_out(store, 4)
    other = await engine.run("fan")
    [other_start] = await claim_all(store, 1)
    refused = await engine.complete_many([
        Completion(p[0].id, Outcome.success(1)),
        Completion(p[1].id, Outcome.success(2)),
        Completion(p[0].id, Outcome.success(1)),  # the same again: accepted once
        Completion(p[1].id, Outcome.success("other")),  # a different outcome: refused
        Completion(AssignmentId("unknown"), Outcome.success()),
        Completion(other_start.id, Outcome.success()),  # another execution
        Completion(p[2].id, Outcome.failure({"boom": True})),
    ])  # fmt: skip
    assert [type(e).__name__ if e else None for e in refused] == [
        None, None, None, "AlreadyCompletedError", "NotFoundError", None, None,
    ]  # fmt: skip
    assert isinstance(refused[3], AlreadyCompletedError)
    assert isinstance(refused[4], NotFoundError)
    for assignment_id, ok in ((p[0].id, True), (p[1].id, True), (p[2].id, False)):
        recorded = await store.get_assignment(assignment_id)
        assert recorded is not None and recorded.state == AssignmentState.DONE
        assert recorded.outcome is not None and recorded.outcome.ok is ok
    state, tasks = await state_of(store, fan)
    assert state == "RUNNING"
    assert (tasks["p0"], tasks["p1"], tasks["p2"], tasks["p3"]) == (
        "SUCCESS", "SUCCESS", "ERROR", "RUNNING",
    )  # fmt: skip
    # p2 failed with nothing to handle it: the join never fires, and once p3 ends the
    # execution fails; the other execution went on to its parallel tasks.
    assert len(await claim_all(store, 4)) == 4  # the other execution's p0..p3
    await engine.complete(p[3].id, Outcome.success())
    assert (await state_of(store, fan))[0] == "ERROR"
    assert (await state_of(store, other))[1]["start"] == "SUCCESS"


async def test_a_join_fired_by_results_recorded_together_fires_once(store: Store) -> None:
    engine, fan, parallel = await fanned_out(store, 6)
    refused = await engine.complete_many([Completion(a.id, Outcome.success()) for a in parallel])
    assert refused == [None] * 6
    [join] = await claim_all(store, 1)  # queued once, not once per arrival
    assert join.task_name == "join"
    await engine.complete(join.id, Outcome.success())
    state, tasks = await state_of(store, fan)
    assert state == "SUCCESS" and set(tasks.values()) == {"SUCCESS"} and len(tasks) == 8


async def test_an_oversized_result_from_a_worker_fails_its_task_and_not_the_others(
    store: Store,
) -> None:
    limits = dataclasses.replace(DEFAULT_LIMITS, result_bytes=100)
    engine, fan, [p0, p1] = await fanned_out(store, 2, Engine(store, limits=limits))
    big = Outcome.success("x" * 1000)
    # From a caller (TaskComplete) the result is refused; from a worker it fails the task.
    refused = await engine.complete_many([Completion(p0.id, big), Completion(p1.id, big)])
    assert all(isinstance(e, LimitExceededError) for e in refused)
    assert (await state_of(store, fan))[1]["p0"] == "RUNNING"
    refused = await engine.complete_many(
        [Completion(p0.id, big), Completion(p1.id, Outcome.success())], worker_id="w"
    )
    assert refused == [None, None]
    tasks = (await state_of(store, fan))[1]
    assert (tasks["p0"], tasks["p1"]) == ("ERROR", "SUCCESS")


class Counting(Engine):
    """An engine that counts the transactions recording results."""

    batches = 0

    async def _record_outcomes(self, *args: Any, **kwargs: Any) -> None:
        self.batches += 1
        await super()._record_outcomes(*args, **kwargs)


class FailingFor(Counting):
    """An engine whose decisions about one execution fail part-way, after writing."""

    def __init__(self, store: Store, failing: ExecutionId) -> None:
        super().__init__(store)
        self.failing = failing

    async def _apply(
        self, tx: StoreTransaction, first: Decision, effects: _Effects,
        written: _Written | None = None,
    ) -> None:  # fmt: skip
        await super()._apply(tx, first, effects, written)
        if first.execution.id == self.failing:
            await tx.lock_execution(first.execution.id)  # the writes have gone out
            raise ConflictError("this execution's decision fails")


async def test_a_decision_failing_part_way_refuses_only_its_own_result(store: Store) -> None:
    setup = Engine(store)
    await setup.register(workflows.chain("chain", 3))
    ids = [await setup.run("chain") for _ in range(3)]
    claimed = await claim_all(store, 3)
    engine = FailingFor(store, ids[1])
    refused = await engine.complete_many(
        [Completion(a.id, Outcome.success()) for a in claimed], worker_id="w"
    )
    by_execution = {a.execution_id: e for a, e in zip(claimed, refused, strict=True)}
    assert by_execution[ids[0]] is None and by_execution[ids[2]] is None
    assert isinstance(by_execution[ids[1]], ConflictError)
    assert engine.batches == 4  # the batch, rolled back; then each result alone
    # Nothing of the failed decision is stored; the others went on, exactly once.
    failed = next(a for a in claimed if a.execution_id == ids[1])
    still = await store.get_assignment(failed.id)
    assert still is not None and still.state == AssignmentState.LEASED
    assert (await state_of(store, ids[1]))[1] == {"t0": "RUNNING"}
    for execution_id in (ids[0], ids[2]):
        assert (await state_of(store, execution_id))[1] == {"t0": "SUCCESS", "t1": "RUNNING"}
        history = await store.history(execution_id)
        assert sum(1 for h in history if h.task_name == "t1") == 1
    assert len(await claim_all(store, 2)) == 2  # t1 of each, queued once


class Inbox:
    def __init__(self) -> None:
        self.items: list[AssignmentRecord] = []
        self.arrived = asyncio.Event()

    async def deliver(self, assignment: AssignmentRecord) -> None:
        self.items.append(assignment)
        self.arrived.set()

    async def at_least(self, n: int) -> list[AssignmentRecord]:
        async with asyncio.timeout(10):
            while len(self.items) < n:
                self.arrived.clear()
                await self.arrived.wait()
        return self.items


async def test_a_workers_results_arriving_together_share_one_transaction(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "b.db")
    await store.open()
    engine = Counting(store)
    dispatcher = Dispatcher(store, engine)
    engine.set_dispatch_listener(dispatcher.notify)
    await dispatcher.start()
    try:
        await engine.register(workflows.fan_out("fan", 40))
        inbox = Inbox()
        session = WorkerSession("w", frozenset({"std.noop"}), 100, inbox.deliver)
        await dispatcher.attach(session, ())
        fan = await engine.run("fan")
        [start] = await inbox.at_least(1)
        await dispatcher.result(session, start.id, Outcome.success())
        parallel = (await inbox.at_least(41))[1:]
        assert len(parallel) == 40
        before = engine.batches
        # A message carrying 20 results (and an unknown one) is recorded in one transaction.
        refused = await dispatcher.results(session, [
            *(Completion(a.id, Outcome.success()) for a in parallel[:20]),
            Completion(AssignmentId("unknown"), Outcome.success()),
        ])  # fmt: skip
        assert refused[:20] == [None] * 20 and isinstance(refused[20], NotFoundError)
        assert engine.batches - before == 1
        # Results reported one by one while every transaction slot of the worker is
        # taken wait, and the next transaction takes them all: here the first two go at
        # once, each alone, and the other 18 together.
        assert TRANSACTIONS_PER_WORKER == 2
        answers = await asyncio.gather(
            *(dispatcher.result(session, a.id, Outcome.success()) for a in parallel[20:])
        )
        assert answers == [None] * 20
        assert engine.batches - before == 1 + 3
        [join] = (await inbox.at_least(42))[41:]
        assert join.task_name == "join"
        await dispatcher.result(session, join.id, Outcome.success())
        assert (await state_of(store, fan))[0] == "SUCCESS"
        assert session.in_flight == set() and session.reserved == 0
    finally:
        await dispatcher.close()
        await store.close()


# Workflows whose results, recorded together, must end exactly as recorded one by one.
TOGETHER_OR_ALONE = {
    "fan_in": workflows.fan_out("fan_in", 6),
    "fail_fast": """
version: '2.0'
fail_fast:
  tasks:
    a:
      action: std.noop
      on-error: [fail]
    b: {action: std.noop}
    c: {action: std.noop}
""",
    "pause": """
version: '2.0'
pause:
  tasks:
    a:
      action: std.noop
      on-success: [pause]
    b:
      action: std.noop
      on-success: [d]
    c:
      action: std.noop
      on-success: [d]
    d:
      join: all
      action: std.noop
""",
    "items": """
version: '2.0'
items:
  tasks:
    each:
      with-items: i in <% range(8) %>
      concurrency: 3
      action: std.noop
      publish: {seen: <% task().result %>}
      on-success: [after]
    after:
      action: std.noop
      publish: {count: <% len(task(each).result) %>}
""",
    "publish": """
version: '2.0'
publish:
  output: {total: <% $.x + $.y + $.z %>}
  tasks:
    x:
      action: std.noop
      publish: {x: <% task().result %>}
      on-success: [sum]
    y:
      action: std.noop
      publish: {y: <% task().result %>}
      on-success: [sum]
    z:
      action: std.noop
      publish: {z: <% task().result %>}
      on-success: [sum]
    sum:
      join: all
      action: std.noop
""",
}


async def finish(store: Store, engine: Engine, name: str, together: bool) -> Any:
    """Run ``name`` to the end, each time completing everything queued (together in
    one call, or one by one); return what can be compared between two runs."""
    execution_id = await engine.run(name)
    values = iter(range(1, 1000))
    while claimed := await store.claim_assignments("w", {"std.noop"}, 100, 1e12):
        completions = [Completion(a.id, Outcome.success(next(values))) for a in claimed]
        if together:
            refused = await engine.complete_many(completions, worker_id="w")
        else:
            refused = [(await engine.complete_many([c], worker_id="w"))[0] for c in completions]
        assert refused == [None] * len(completions)
    execution = await store.get_execution(execution_id)
    assert execution is not None
    tasks = sorted((t.name, t.state.value, t.state_info, repr(t.published))
                   for t in await store.list_tasks(execution_id))  # fmt: skip
    return execution.state.value, execution.output, execution.context, tasks


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("name", sorted(TOGETHER_OR_ALONE))
async def test_results_recorded_together_end_as_recorded_one_by_one(
    tmp_path: Path, name: str, kind: str
) -> None:
    ends = []
    for together in (True, False):
        async with opened_store(kind, tmp_path) as store:
            await store.declare_actions(["std.noop"], float("inf"), 0.0)
            engine = Engine(store)
            await engine.register(TOGETHER_OR_ALONE[name])
            ends.append(await finish(store, engine, name, together))
    assert ends[0] == ends[1]


