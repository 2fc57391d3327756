"""The lazy engine over each store: the same behaviour on memory and on a SQLite file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from levante.bench import workflows
from levante.core.model import AssignmentState, Outcome
from levante.engine import Engine
from levante.errors import AlreadyCompletedError, InvalidInputError, NotFoundError
from levante.ids import AssignmentId, ExecutionId
from levante.store import MemoryStore, SqliteStore
from levante.store.base import Store


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "l.db")
    await s.open()
    # The tests play the worker: its actions are in the catalogue, as a worker's hello puts them.
    await s.declare_actions(["std.echo", "std.noop"], float("inf"), 0.0)
    try:
        yield s
    finally:
        await s.close()


def chain(n: int) -> str:
    lines = ["version: '2.0'", "chain:", "  tasks:"]
    for i in range(n):
        lines += [f"    t{i}:", "      action: std.echo output=<% $.get(x, 0) %>",
                  "      publish: {x: <% task().result + 1 %>}"]  # fmt: skip
        if i + 1 < n:
            lines.append(f"      on-success: [t{i + 1}]")
    lines.append("  output: {x: <% $.x %>}")
    return "\n".join(lines) + "\n"


async def drive(engine: Engine, store: Store, execution_id: ExecutionId) -> int:
    """Play the worker: claim and echo until the execution ends; returns steps taken."""
    steps = 0
    while True:
        claimed = await store.claim_assignments("w", {"std.echo"}, 10, 1e12)
        if not claimed:
            return steps
        for a in claimed:
            await engine.complete(a.id, Outcome.success(a.input.get("output")))
            steps += 1


async def test_chain_runs_to_the_end(store: Store) -> None:
    engine = Engine(store)
    await engine.register(chain(5))
    execution_id = await engine.run("chain")
    assert await drive(engine, store, execution_id) == 5
    execution, tasks = await engine.get_status(execution_id)
    assert execution.state.value == "SUCCESS"
    assert execution.output == {"x": 5}
    assert [t.name for t in tasks] == [f"t{i}" for i in range(5)]


async def test_request_id_is_idempotent(store: Store) -> None:
    engine = Engine(store)
    await engine.register(chain(2))
    first = await engine.run("chain", request_id="r")
    assert await engine.run("chain", request_id="r") == first
    assert len(await store.claim_assignments("w", {"std.echo"}, 10, 1e12)) == 1


async def test_duplicate_and_conflicting_outcomes(store: Store) -> None:
    engine = Engine(store)
    await engine.register(chain(2))
    execution_id = await engine.run("chain")
    [a] = await store.claim_assignments("w", {"std.echo"}, 10, 1e12)
    await engine.complete(a.id, Outcome.success(0))
    await engine.complete(a.id, Outcome.success(0))  # no second effect
    _, tasks = await engine.get_status(execution_id)
    assert [t.name for t in tasks] == ["t0", "t1"]
    with pytest.raises(AlreadyCompletedError):
        await engine.complete(a.id, Outcome.failure("x"))
    with pytest.raises(NotFoundError):
        await engine.complete(AssignmentId("nope"), Outcome.success(1))
    done = await store.get_assignment(a.id)
    assert done is not None and done.state == AssignmentState.DONE


async def test_invalid_input_and_unknown_workflow_store_nothing(store: Store) -> None:
    engine = Engine(store)
    await engine.register(
        "version: '2.0'\nneeds:\n  input: [a]\n  tasks:\n    t: {action: std.noop}\n"
    )
    with pytest.raises(InvalidInputError):
        await engine.run("needs", {})
    with pytest.raises(NotFoundError):
        await engine.run("ghost", {})
    assert await store.claim_assignments("w", {"std.noop", "std.echo"}, 10, 1e12) == []


class CountingStore:
    """Wraps a store and counts the task rows each transaction reads."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.rows_read: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def transaction(self) -> Any:
        outer = self

        class _Tx:
            async def __aenter__(self) -> Any:
                self._cm = outer.inner.transaction()
                tx = await self._cm.__aenter__()
                outer.rows_read.append(0)
                return _CountingTx(tx, outer)

            async def __aexit__(self, *exc: Any) -> Any:
                return await self._cm.__aexit__(*exc)

        return _Tx()


class _CountingTx:
    def __init__(self, tx: Any, owner: CountingStore) -> None:
        self._tx = tx
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def latest_tasks(self, execution_id: ExecutionId, names: Any) -> Any:
        found = await self._tx.latest_tasks(execution_id, names)
        self._owner.rows_read[-1] += len(found)
        return found

    async def get_task(self, task_id: Any) -> Any:
        self._owner.rows_read[-1] += 1
        return await self._tx.get_task(task_id)


@pytest.mark.parametrize("length", [10, 200])
async def test_a_completion_reads_the_same_rows_however_long_the_workflow(
    store: Store, length: int
) -> None:
    counting = CountingStore(store)
    engine = Engine(counting)  # type: ignore[arg-type]
    await engine.register(chain(length))
    execution_id = await engine.run("chain")
    await drive(engine, store, execution_id)
    execution, _ = await engine.get_status(execution_id)
    assert execution.state.value == "SUCCESS"
    # Run reads nothing; each completion reads its own task twice at most.
    assert max(counting.rows_read) <= 2


async def test_a_large_document_is_parsed_while_the_event_loop_goes_on() -> None:
    """Parsing a 5,000-task document takes seconds; the loop keeps serving meanwhile."""
    engine = Engine(MemoryStore())
    text = workflows.chain("big", 5000)
    gaps: list[float] = []
    registering = True

    async def tick() -> None:
        last = time.monotonic()
        while registering:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    began = time.monotonic()
    assert await engine.register(text) == ["big"]
    took = time.monotonic() - began
    registering = False
    await ticker
    # Inline, the loop would stand still for the whole parse (1-3 s here).
    assert len(gaps) > 10 and max(gaps) < max(0.5, took / 3), (took, max(gaps))
    execution_id = await engine.run("big")  # and the parsed document is used
    assert (await engine.get_status(execution_id))[0].state.value == "RUNNING"
