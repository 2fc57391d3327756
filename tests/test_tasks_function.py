"""tasks(): another execution's tasks, and the tasks inside subworkflow executions.

In process (the same core) for the details, then through the real service (SQLite and
PostgreSQL) for the engine reading other executions inside its transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from stores import create_database, drop_database

from levante.client import Client
from levante.core.model import MAX_TASK_READS
from levante.runner import ExecutionResult, LocalEngine

NESTED = """
version: '2.0'
parent:
  tasks:
    call:
      workflow: child
      on-complete: [report]
    local:
      action: std.echo output=here
      on-complete: [report]
    report:
      join: all
      publish:
        mine: <% tasks().select($.name) %>
        everything: <% tasks(execution().id, true).select($.name) %>
        by_name: <% tasks(recursive => true).select($.name) %>
        jinja: "{{ tasks(execution().id, true) | map(attribute='name') | list }}"
        failed: <% tasks(execution().id, true, ERROR).select($.name) %>
        flat: <% tasks(execution().id, true, null, true).select($.name) %>
        flat_here: <% tasks(flat => true).select($.name) %>
        owners: <% tasks(recursive => true).toDict($.name, $.workflow_execution_id) %>
child:
  tasks:
    inner:
      action: std.echo output=1
      on-success: [deeper]
    deeper:
      workflow: grandchild
    wobbly:
      action: std.fail
      on-error: [noop]
grandchild:
  tasks:
    leaf:
      action: std.echo output=leaf
"""

READER = """
version: '2.0'
reader:
  input: [other]
  tasks:
    look:
      publish:
        names: <% tasks($.other).select($.name) %>
        results: "{{ tasks(_.other) | map(attribute='result') | list }}"
        echoed: <% tasks($.other).where($.name = first).select($.result) %>
        nothing: <% tasks('no-such-execution') %>
        deep: <% tasks($.other, true).select($.name) %>
"""

OTHER = """
version: '2.0'
other:
  tasks:
    first:
      action: std.echo output=42
      on-success: [second]
    second:
      action: std.noop
"""


async def run_in_process(definitions: list[str], workflow: str, **kwargs: Any) -> ExecutionResult:
    async with LocalEngine() as local:
        for text in definitions:
            await local.register(text)
        return await asyncio.wait_for(local.run(workflow, **kwargs), timeout=60)


def check_nested(published: dict[str, Any], execution_id: str) -> None:
    assert sorted(published["mine"]) == ["call", "local", "report"]
    # Mistral's order: the execution's own tasks, then each subworkflow's, depth first.
    everything = published["everything"]
    assert sorted(everything[:3]) == ["call", "local", "report"]
    assert sorted(everything[3:]) == ["deeper", "inner", "leaf", "wobbly"]
    assert everything.index("deeper") < everything.index("leaf")
    assert published["by_name"] == everything == published["jinja"]
    assert published["failed"] == ["wobbly"]
    # flat: the workflow tasks whose state is that of their subworkflow go
    assert sorted(published["flat"]) == ["inner", "leaf", "local", "report", "wobbly"]
    assert sorted(published["flat_here"]) == ["local", "report"]
    owners = published["owners"]
    assert owners["report"] == owners["call"] == execution_id
    assert owners["inner"] == owners["deeper"] != execution_id
    assert owners["leaf"] not in (execution_id, owners["inner"])


async def test_recursive_lists_the_tasks_of_subworkflows_at_every_depth() -> None:
    result = await run_in_process([NESTED], "parent")
    assert result.state == "SUCCESS", result.state_info
    check_nested(result.task("report").published, result.execution_id)


async def test_tasks_of_another_execution_by_its_id() -> None:
    async with LocalEngine() as local:
        await local.register(OTHER)
        await local.register(READER)
        await local.register(NESTED)
        other = await asyncio.wait_for(local.run("other"), timeout=60)
        assert other.ok, other.state_info
        nested = await asyncio.wait_for(local.run("parent"), timeout=60)
        result = await asyncio.wait_for(local.run("reader", {"other": other.execution_id}), 60)
        assert result.ok, result.state_info
        published = result.task("look").published
        assert published["names"] == ["first", "second"] == published["deep"]
        assert published["results"] == [42, None]
        assert published["echoed"] == [42]
        assert published["nothing"] == []  # as Mistral: an unknown execution has no tasks
        deep = await asyncio.wait_for(local.run("reader", {"other": nested.execution_id}), 60)
        assert deep.ok, deep.state_info
        names = deep.task("look").published["deep"]
        assert sorted(names) == ["call", "deeper", "inner", "leaf", "local", "report", "wobbly"]


async def test_reading_too_many_other_executions_fails_the_task() -> None:
    result = await run_in_process([f"""
version: '2.0'
greedy:
  tasks:
    look:
      publish:
        many: <% range({MAX_TASK_READS + 1}).select(tasks(str($))) %>
"""], "greedy")
    assert result.state == "ERROR"
    info = result.task("look").state_info
    assert f"reads the tasks of at most {MAX_TASK_READS} other executions" in info


async def test_a_child_reads_its_parent_while_the_parent_is_running() -> None:
    result = await run_in_process(["""
version: '2.0'
parent:
  tasks:
    start:
      action: std.echo output=go
      on-success: [call]
    call:
      workflow: child parent=<% execution().id %>
      publish:
        seen: <% task().result.seen %>
child:
  input: [parent]
  output:
    seen: <% $.seen %>
  tasks:
    peek:
      publish:
        seen: <% tasks($.parent).select([$.name, $.state]) %>
"""], "parent")
    assert result.ok, result.state_info
    assert result.task("call").published["seen"] == [["start", "SUCCESS"], ["call", "RUNNING"]]


# -- through the real service -------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The service's store: a SQLite file, or a PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'levante.db'}"
        return
    url = await create_database()
    try:
        yield url
    finally:
        await drop_database(url)


@pytest.mark.usefixtures("workers")
async def test_tasks_across_executions_through_the_service(client: Client) -> None:
    other = await client.wait(await client.run("other", definition=OTHER))
    assert other.state == "SUCCESS", other.state_info
    nested = await client.wait(await client.run("parent", definition=NESTED))
    assert nested.state == "SUCCESS", nested.state_info
    check_nested(nested.tasks_named("report")[0].published, nested.id)
    reader = await client.wait(
        await client.run("reader", {"other": other.id}, definition=READER)
    )
    assert reader.state == "SUCCESS", reader.state_info
    published = reader.tasks_named("look")[0].published
    assert published["names"] == ["first", "second"]
    assert published["echoed"] == [42] and published["nothing"] == []
