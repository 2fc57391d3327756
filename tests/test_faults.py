"""Faults are features: kill -9 of the engine or a worker loses nothing.

Every wait here is for an event (a line in the action log, a final state) with a
deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from conftest import read_log
from support.processes import EngineServer, Worker, wait_for

from levante.client import Client

GATED_CHAIN = """
version: '2.0'
gated:
  input: [i]
  tasks:
    a:
      action: test.record key="a-<% $.i %>"
      on-success: [b]
    b:
      action: test.gate name="open" output=<% $.i %>
      publish: {passed: <% task().result %>}
      on-success: [c]
    c:
      action: test.record key="c-<% $.i %>" output=<% $.passed %>
"""


async def wait_all(address: str, ids: list[str], timeout: float = 90.0) -> dict[str, object]:
    async with Client(address) as client:
        infos = await asyncio.gather(*(client.wait(i, timeout=timeout) for i in ids))
    return {info.id: info for info in infos}


async def test_engine_killed_with_20_executions_in_flight(
    server: EngineServer, worker_env: dict[str, str], action_log: Path, gates: Path
) -> None:
    workers = [Worker(server.address, concurrency=4, env=worker_env) for _ in range(2)]
    try:
        async with Client(server.address) as client:
            await client.register_workflows(GATED_CHAIN)
            ids = [await client.run("gated", {"i": i}) for i in range(20)]
        # All 8 worker slots hold a gated task; the other executions wait in the queue.
        wait_for(lambda: sum(1 for line in read_log(action_log)
                             if line.startswith("gate-entered")) >= 8,
                 what="8 gated tasks inside workers")  # fmt: skip
        server.kill()
        (gates / "open").touch()  # the gated tasks finish while no engine runs
        wait_for(lambda: sum(1 for line in read_log(action_log)
                             if line.startswith("gate-passed")) >= 8,
                 what="gated tasks to finish with the engine down")  # fmt: skip
        server.start()  # same port, same SQLite file
        infos = await wait_all(server.address, ids)
        for i, execution_id in enumerate(ids):
            info = infos[execution_id]
            assert info.state == "SUCCESS", (i, info.state, info.state_info)  # type: ignore[attr-defined]
            tasks = info.tasks  # type: ignore[attr-defined]
            assert [t.name for t in tasks] == ["a", "b", "c"]
            assert all(t.state == "SUCCESS" for t in tasks)
            assert tasks[2].result == i
        records = Counter(read_log(action_log))
        for i in range(20):
            assert records[f"c-{i}"] >= 1 or any(k.startswith(f"c-{i} ") for k in records)
    finally:
        for w in workers:
            w.stop()


CHAIN = """
version: '2.0'
chain:
  input: [i]
  tasks:
    s1:
      action: test.record key="s1-<% $.i %>"
      on-success: [s2]
    s2:
      action: test.record key="s2-<% $.i %>"
      on-success: [s3]
    s3:
      action: test.record key="s3-<% $.i %>"
      on-success: [s4]
    s4:
      action: test.record key="s4-<% $.i %>" output=<% $.i %>
"""


async def test_engine_killed_at_an_arbitrary_moment(
    server: EngineServer, worker_env: dict[str, str], action_log: Path
) -> None:
    workers = [Worker(server.address, concurrency=8, env=worker_env) for _ in range(2)]
    try:
        async with Client(server.address) as client:
            await client.register_workflows(CHAIN)
            ids = [await client.run("chain", {"i": i}) for i in range(20)]
        wait_for(lambda: len(read_log(action_log)) >= 25, what="work in progress")
        server.kill()
        server.start()
        infos = await wait_all(server.address, ids)
        for i, execution_id in enumerate(ids):
            info = infos[execution_id]
            assert info.state == "SUCCESS", info.state_info  # type: ignore[attr-defined]
            tasks = info.tasks  # type: ignore[attr-defined]
            # each task's outcome recorded exactly once: one row per task, all SUCCESS
            assert [t.name for t in tasks] == ["s1", "s2", "s3", "s4"]
            assert all(t.state == "SUCCESS" for t in tasks)
            assert tasks[-1].result == i
    finally:
        for w in workers:
            w.stop()


GATED_ONE = """
version: '2.0'
held:
  input: [i]
  tasks:
    hold:
      action: test.gate name="release" output=<% $.i %>
"""


async def test_worker_killed_its_assignments_go_to_another(
    server: EngineServer, worker_env: dict[str, str], action_log: Path, gates: Path
) -> None:
    doomed = Worker(server.address, concurrency=4, env=worker_env, worker_id="doomed")
    async with Client(server.address) as client:
        await client.register_workflows(GATED_ONE)
        ids = [await client.run("held", {"i": i}) for i in range(4)]
        wait_for(lambda: sum(1 for line in read_log(action_log)
                             if line.startswith("gate-entered")) == 4,
                 what="the doomed worker to hold all 4")  # fmt: skip
        doomed.kill()
        (gates / "release").touch()
        survivor = Worker(server.address, concurrency=4, env=worker_env, worker_id="survivor")
        try:
            infos = await wait_all(server.address, ids)
        finally:
            survivor.stop()
    for i, execution_id in enumerate(ids):
        info = infos[execution_id]
        assert info.state == "SUCCESS"  # type: ignore[attr-defined]
        [task] = info.tasks  # type: ignore[attr-defined]
        assert task.result == i and task.state == "SUCCESS"
    entered = Counter(line.split()[2] for line in read_log(action_log)
                      if line.startswith("gate-entered"))  # fmt: skip
    # Each assignment ran once in the killed worker and once more in the survivor.
    assert sorted(entered.values()) == [2, 2, 2, 2]


DEFERRED = """
version: '2.0'
approval:
  tasks:
    ask:
      action: test.wait_deferred
      publish:
        answer: <% task().result.answer %>
      on-success: [act]
    act:
      action: std.echo output="approved by <% $.answer %>"
  output:
    said: <% task(act).result %>
"""


async def test_deferred_task_completed_by_another_client_after_restart(
    server: EngineServer, worker_env: dict[str, str], action_log: Path
) -> None:
    worker = Worker(server.address, env=worker_env)
    try:
        async with Client(server.address) as client:
            execution_id = await client.run("approval", definition=DEFERRED)
        line = wait_for(lambda: next((x for x in read_log(action_log)
                                      if x.startswith("deferred ")), None),
                        what="the deferral")  # fmt: skip
        task_id = line.split()[1]
        server.kill()
        server.start()
        async with Client(server.address) as outsider:  # not a worker
            before = await outsider.get_status(execution_id)
            assert before.state == "RUNNING"
            assert before.tasks[0].assignment_id == task_id
            await outsider.task_complete(task_id, result={"answer": "ops"})
            info = await outsider.wait(execution_id)
        assert info.state == "SUCCESS", info.state_info
        assert info.output == {"said": "approved by ops"}
    finally:
        worker.stop()
