"""levante.run_workflow: the synchronous in-process runner on the same lazy core."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path
from typing import Any

import pytest

import levante
from levante.bench import workflows
from levante.runner import LocalEngine
from levante.worker import ActionRegistry

DEFINITION = """
version: '2.0'
pipeline:
  input: [numbers]
  output:
    total: <% $.total %>
    report: <% $.report %>
  tasks:
    add:
      action: math.sum values=<% $.numbers %>
      publish: {total: <% task().result %>}
      on-success:
        - describe: <% $.total > 0 %>
        - nothing: <% $.total <= 0 %>
    describe:
      action: text.describe total=<% $.total %>
      publish: {report: <% task().result %>}
    nothing:
      publish: {report: empty}
"""


def add(values: list[int]) -> int:
    return sum(values)


async def describe(total: int) -> str:
    await asyncio.sleep(0)
    return f"total is {total}"


ACTIONS = {"math.sum": add, "text.describe": describe}


def test_run_workflow_with_sync_and_async_actions() -> None:
    result = levante.run_workflow(DEFINITION, input={"numbers": [1, 2, 3]}, actions=ACTIONS)
    assert result.ok, result.state_info
    assert result.output == {"total": 6, "report": "total is 6"}
    assert [t.name for t in result.tasks] == ["add", "describe"]


def test_the_other_branch_and_std_actions() -> None:
    result = levante.run_workflow(DEFINITION, "pipeline", {"numbers": []}, ACTIONS)
    assert result.ok
    assert result.output == {"total": 0, "report": "empty"}


def test_errors_end_the_run_in_error() -> None:
    def broken(values: list[int]) -> int:
        raise RuntimeError("abacus broke")

    result = levante.run_workflow(
        DEFINITION, input={"numbers": [1]}, actions={**ACTIONS, "math.sum": broken}
    )
    assert result.state == "ERROR"
    assert "abacus broke" in result.state_info
    assert result.task("add").state == "ERROR"


def test_runs_on_a_sqlite_store(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'run.db'}"
    result = levante.run_workflow(DEFINITION, input={"numbers": [5]}, actions=ACTIONS, store=store)
    assert result.ok and result.output["total"] == 5
    assert (tmp_path / "run.db").exists()


async def test_works_inside_a_running_event_loop_too() -> None:
    result = await asyncio.to_thread(
        levante.run_workflow, DEFINITION, None, {"numbers": [2]}, ACTIONS
    )
    assert result.ok
    async with LocalEngine(actions=ACTIONS) as local:
        await local.register(DEFINITION)
        results = await asyncio.gather(*(local.run("pipeline", {"numbers": [i]})
                                         for i in range(1, 21)))  # fmt: skip
    assert [r.output["total"] for r in results] == list(range(1, 21))


async def test_results_that_end_together_are_recorded_together() -> None:
    """The in-process worker records the results of one turn of the loop in one engine
    transaction, as a remote worker sends them in one message: a fan-out of 50 branches
    costs a few transactions, not 50; and each branch is still recorded exactly once."""
    async with LocalEngine(concurrency=64) as local:
        recorded: list[int] = []
        complete_many = local.engine.complete_many

        async def counting(completions: Any, **kwargs: Any) -> Any:
            recorded.append(len(completions))
            return await complete_many(completions, **kwargs)

        local.engine.complete_many = counting  # type: ignore[method-assign]
        await local.register(workflows.fan_out("fan", 50))
        result = await local.run("fan")
    assert result.ok
    assert sum(recorded) == 52  # the start, 50 branches, the join: each once
    assert max(recorded) == 50 and len(recorded) == 3
    assert sorted(t.name for t in result.tasks) == sorted(
        ["start", "join", *(f"p{i}" for i in range(50))]
    )


def test_a_run_that_takes_too_long_raises_timeout_error() -> None:
    slow = """
version: '2.0'
slow:
  tasks:
    wait:
      action: test.block
"""
    release = threading.Event()

    def block() -> None:
        release.wait(10)

    try:
        with pytest.raises(TimeoutError):
            levante.run_workflow(slow, actions={"test.block": block}, timeout=0.2)
    finally:
        release.set()


def test_a_finished_run_leaves_nothing_for_the_garbage_collector() -> None:
    """Its engine, store and rows are freed when the run returns (no reference cycle
    keeps them for a later collection to walk: that cost a 100-branch fan-out 20 %)."""
    definition = workflows.fan_out("fan", 20)
    levante.run_workflow(definition)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        assert levante.run_workflow(definition).ok
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = {type(o).__name__ for o in gc.garbage} & {
            "LocalEngine", "Engine", "MemoryStore", "Dispatcher", "TaskRecord", "AssignmentRecord"
        }
        assert left == set()
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


async def test_a_chain_of_immediate_actions_leaves_the_loop_to_others() -> None:
    """std.noop is immediate: the in-process worker runs it where it is delivered, and
    one task records the chain's results one transaction after another. Between two
    transactions the event loop serves everything else (here a ticker), and an
    immediate action that waits fails its task instead of hanging."""
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async def waits() -> None:
        await asyncio.sleep(0)

    registry = ActionRegistry()
    registry.register("t.waits", waits, immediate=True)
    async with LocalEngine(actions=registry) as local:
        await local.register(workflows.chain("chain", 200))
        await local.register(
            "version: '2.0'\nbad:\n  tasks:\n    w:\n      action: t.waits\n"
        )
        running = asyncio.create_task(ticker())
        result = await local.run("chain")
        stop.set()
        await running
        assert result.ok and len(result.tasks) == 200
        assert ticks >= 200  # at least once per step: no step starved the loop
        bad = await local.run("bad")
    assert bad.state == "ERROR"
    assert "ImmediateActionWaited" in bad.task("w").state_info
