"""Several engine replicas on one store, with kill -9 of a replica and of a worker.

Each execution has a fan-out, a `join: all`, a numeric join and an on-error branch.
Afterwards every execution is in its expected final state, each join task ran exactly
once, every action ran at least once, and each task's outcome was recorded once (one
row per task, in a final state).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

from conftest import read_log
from support.processes import EngineServer, Worker, wait_for

from levante.client import Client, ExecutionInfo

CHAOS = """
version: '2.0'
chaos:
  input: [i]
  tasks:
    start:
      action: test.record key="start-<% $.i %>"
      on-success: [a, b, c, d]
    a:
      action: test.record key="a-<% $.i %>"
      publish: {a: 1}
      on-success: [all_join, two_join]
    b:
      action: test.record key="b-<% $.i %>"
      publish: {b: 1}
      on-success: [all_join, two_join]
    c:
      action: test.maybe_fail key="c-<% $.i %>" fail=<% $.i mod 5 = 0 %>
      publish: {c: 1}
      on-success: [all_join]
      on-error: [recover]
    d:
      action: test.record key="d-<% $.i %>"
      on-success: [two_join]
    recover:
      action: test.record key="recover-<% $.i %>"
      publish: {recovered: true}
    all_join:
      join: all
      action: test.record key="all-<% $.i %>"
      publish: {total: <% $.a + $.b + $.c %>}
    two_join:
      join: 2
      action: test.record key="two-<% $.i %>"
"""


def check(i: int, info: ExecutionInfo) -> None:
    names = Counter(t.name for t in info.tasks)
    assert all(count == 1 for count in names.values()), (i, names)
    assert all(t.state in ("SUCCESS", "ERROR") for t in info.tasks), (i, info.tasks)
    assert names["two_join"] == 1
    if i % 5 == 0:
        # c failed and was recovered; all_join can never fire and fails (unhandled).
        assert info.state == "ERROR", (i, info.state, info.state_info)
        assert info.tasks_named("all_join")[0].state == "ERROR"
        assert info.tasks_named("recover")[0].state == "SUCCESS"
    else:
        assert info.state == "SUCCESS", (i, info.state, info.state_info)
        assert info.output["total"] == 3
        assert "recover" not in names


async def run_chaos(servers: list[EngineServer], worker_env: dict[str, str], action_log: Path,
                    executions: int, kill_replica: bool = True) -> None:  # fmt: skip
    # One worker per replica, and one more: 4 workers for 3 replicas, 3 for 2.
    workers = [Worker(s.address, concurrency=8, env=worker_env) for s in servers]
    workers.append(Worker(servers[0].address, concurrency=8, env=worker_env))
    try:
        ids: list[str] = []
        async with Client(servers[0].address) as first:
            await first.register_workflows(CHAOS)
        for i in range(executions):
            async with Client(servers[i % len(servers)].address) as client:
                ids.append(await client.run("chaos", {"i": i}, request_id=f"chaos-{i}"))
        wait_for(lambda: len(read_log(action_log)) >= executions * 2, timeout=120,
                 what="work in progress")  # fmt: skip
        victim = random.Random(7).randrange(len(servers))
        if kill_replica:
            servers[victim].kill()
        workers[0].kill()
        workers[0] = Worker(servers[(victim + 1) % len(servers)].address, concurrency=8,
                            env=worker_env)  # fmt: skip
        if kill_replica:
            servers[victim].start()
        async with Client(servers[-1].address) as client:
            infos = await asyncio.gather(*(client.wait(x, timeout=180) for x in ids))
        for i, info in enumerate(infos):
            check(i, info)
        log = read_log(action_log)
        for i in range(executions):
            for key in ("start", "a", "b", "d", "two", "c"):
                assert any(line.startswith(f"{key}-{i} ") for line in log), (key, i)
    finally:
        for w in workers:
            w.stop()


async def test_two_replicas_on_one_sqlite_file(
    tmp_path: Path, worker_env: dict[str, str], action_log: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    servers = [EngineServer(store, extra=["--poll-seconds", "0.2"]).start() for _ in range(2)]
    try:
        await run_chaos(servers, worker_env, action_log, executions=200)
    finally:
        for s in servers:
            for process in s.history:
                process.terminate()


async def test_three_replicas_on_postgresql(worker_env: dict[str, str], action_log: Path) -> None:
    from stores import create_database, drop_database

    url = await create_database()
    servers: list[EngineServer] = []
    try:
        servers = [EngineServer(url, extra=["--poll-seconds", "0.2"]).start() for _ in range(3)]
        await run_chaos(servers, worker_env, action_log, executions=200)
    finally:
        for s in servers:
            for process in s.history:
                process.terminate()
        await drop_database(url)


async def test_postgresql_notify_wakes_workers_of_another_replica(
    worker_env: dict[str, str]
) -> None:
    """With polling off, work queued on replica A reaches a worker of replica B at once."""
    from stores import create_database, drop_database

    url = await create_database()
    servers: list[EngineServer] = []
    worker = None
    try:
        servers = [EngineServer(url, extra=["--poll-seconds", "0"]).start() for _ in range(2)]
        worker = Worker(servers[1].address, env=worker_env)
        definition = "version: '2.0'\nping:\n  tasks:\n    t: {action: std.echo output=pong}\n"
        async with Client(servers[0].address) as client:
            await client.register_workflows(definition)
            started = asyncio.get_running_loop().time()
            ids = [await client.run("ping") for _ in range(5)]
            infos = await asyncio.gather(*(client.wait(i, timeout=30) for i in ids))
            elapsed = asyncio.get_running_loop().time() - started
        assert all(info.state == "SUCCESS" for info in infos)
        assert elapsed < 10
    finally:
        if worker is not None:
            worker.stop()
        for s in servers:
            for process in s.history:
                process.terminate()
        await drop_database(url)
