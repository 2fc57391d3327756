"""The catalogue of declared actions, through a real `levante serve` and real workers.

An action no worker has ever declared fails its task at once ("Failed to find action",
as in Mistral), so an on-error route can handle it; an action some worker declared once
but whose workers are all gone waits, its task's state_info saying so, until a worker
serving it attaches again. The catalogue lives in the store: a restarted engine knows
what was declared before.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from stores import STORE_KINDS, opened_store
from support.processes import EngineServer, Worker, wait_for

from levante.client import Client
from levante.store.base import WAITING_FOR_WORKER, Store

UNKNOWN = """
version: '2.0'
wf:
  tasks:
    first:
      action: std.echo output=1
      on-complete: [second]
    second:
      action: action.doesnt_exist
"""

HANDLED = """
version: '2.0'
handled:
  tasks:
    call:
      action: nobody.serves_this
      on-error: [fallback]
    fallback:
      action: std.echo output="fell back"
      publish:
        said: <% task().result %>
  output:
    said: <% $.said %>
"""

ECHO = """
version: '2.0'
echo:
  tasks:
    say:
      action: test.record key=catalogue output=done
      publish:
        said: <% task().result %>
  output:
    said: <% $.said %>
"""


@pytest.mark.usefixtures("workers")
async def test_an_action_no_worker_declared_fails_its_task(client: Client) -> None:
    await client.register_workflows(UNKNOWN)
    info = await client.wait(await client.run("wf"), timeout=30)
    assert info.state == "ERROR"
    assert "Failed to find action" in info.state_info
    (second,) = info.tasks_named("second")
    assert second.state == "ERROR"
    assert "action.doesnt_exist" in second.state_info


@pytest.mark.usefixtures("workers")
async def test_an_unknown_action_can_be_handled_by_on_error(client: Client) -> None:
    await client.register_workflows(HANDLED)
    info = await client.wait(await client.run("handled"), timeout=30)
    assert info.state == "SUCCESS", info.state_info
    assert info.output == {"said": "fell back"}


async def test_a_known_action_whose_workers_left_waits_until_one_attaches(
    server: EngineServer, client: Client, worker_env: dict[str, str]
) -> None:
    await client.register_workflows(ECHO)
    first = Worker(server.address, env=worker_env)  # declares test.record, then leaves
    first.stop()
    assert server.process is not None
    process = server.process
    wait_for(lambda: any("detached" in line for line in process.lines), 30,
             "the engine to see the worker leave")  # fmt: skip
    execution_id = await client.run("echo")

    (say,) = (await client.get_status(execution_id)).tasks_named("say")
    note = say.state_info
    assert note.startswith(WAITING_FOR_WORKER) and "test.record" in note, note
    assert (await client.get_status(execution_id)).state == "RUNNING"
    second = Worker(server.address, env=worker_env)
    try:
        info = await client.wait(execution_id, timeout=30)
    finally:
        second.stop()
    assert info.state == "SUCCESS"
    assert info.output == {"said": "done"}
    (say,) = info.tasks_named("say")
    assert not say.state_info.startswith(WAITING_FOR_WORKER)


async def test_a_restarted_engine_remembers_the_catalogue(
    server: EngineServer, client: Client, worker_env: dict[str, str]
) -> None:
    await client.register_workflows(ECHO)
    Worker(server.address, env=worker_env).stop()
    server.kill()
    server.start()
    async with Client(server.address) as fresh:
        execution_id = await fresh.run("echo")
        (say,) = (await fresh.get_status(execution_id)).tasks_named("say")
        assert say.state == "RUNNING"  # known, so it waits rather than fails
        worker = Worker(server.address, env=worker_env)
        try:
            assert (await fresh.wait(execution_id, timeout=30)).state == "SUCCESS"
        finally:
            worker.stop()


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_stores_keep_the_catalogue(kind: str, tmp_path: Path) -> None:
    async with opened_store(kind, tmp_path) as store:
        await check_catalogue(store)


async def check_catalogue(store: Store) -> None:
    async with store.transaction() as tx:
        assert await tx.action_catalogue(["a", "b"]) == {}
    await store.declare_actions(["a", "b"], 100.0, 10.0)
    await store.declare_actions(["a"], 50.0, 20.0)  # an earlier expiry never shortens
    async with store.transaction() as tx:
        assert await tx.action_catalogue(["a", "b", "c"]) == {"a": 100.0, "b": 100.0}
    await store.actions_offline(["b"], 30.0)
    async with store.transaction() as tx:
        assert await tx.action_catalogue(["a", "b"]) == {"a": 100.0, "b": 30.0}
    await store.declare_actions(["b"], 200.0, 40.0)  # back online
    async with store.transaction() as tx:
        assert await tx.action_catalogue(["b"]) == {"b": 200.0}


async def test_standard_actions_are_known_before_any_worker(
    server: EngineServer, client: Client, worker_env: dict[str, str]
) -> None:
    await client.register_workflows("""
version: '2.0'
std_first:
  tasks:
    say:
      action: std.echo output=early
      publish:
        said: <% task().result %>
  output:
    said: <% $.said %>
""")
    execution_id = await client.run("std_first")  # no worker has ever attached
    (say,) = (await client.get_status(execution_id)).tasks_named("say")
    assert say.state == "RUNNING" and say.state_info.startswith(WAITING_FOR_WORKER)
    worker = Worker(server.address, env=worker_env)
    try:
        info = await client.wait(execution_id, timeout=30)
    finally:
        worker.stop()
    assert info.state == "SUCCESS" and info.output == {"said": "early"}
