"""levante.run_workflow: the synchronous in-process runner on the same lazy core."""

from __future__ import annotations

import asyncio
from pathlib import Path

import levante
from levante.runner import LocalEngine

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
