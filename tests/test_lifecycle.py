"""The execution lifecycle through real `levante serve` and `levante worker` processes:
pause, resume, cancel, rerun, list, watch, history, durable timers, leases."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import read_log
from support.processes import EngineServer, Worker, wait_for

from levante.client import Client
from levante.errors import ConflictError, InvalidArgumentError, NotFoundError

GATED = """
version: '2.0'
gated:
  tasks:
    first:
      action: test.gate name="open"
      on-success: [second]
    second:
      action: std.echo output=done
      publish: {said: <% task().result %>}
"""


async def state_of(client: Client, execution_id: str, *states: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        info = await client.get_status(execution_id)
        if info.state in states:
            return info.state
        assert time.monotonic() < deadline, f"still {info.state}, wanted {states}"
        await asyncio.sleep(0.02)


@pytest.mark.usefixtures("workers")
async def test_pause_resume_and_refused_transitions(client: Client, action_log: Path,
                                                    gates: Path) -> None:  # fmt: skip
    execution_id = await client.run("gated", definition=GATED)
    wait_for(lambda: any(x.startswith("gate-entered") for x in read_log(action_log)),
             what="the first task to run")  # fmt: skip
    paused = await client.pause(execution_id)
    assert paused.state == "PAUSED"
    with pytest.raises(ConflictError, match="PAUSED"):
        await client.pause(execution_id)
    (gates / "open").touch()  # 'first' finishes while paused; 'second' must not start
    deadline = time.monotonic() + 30
    while (await client.get_status(execution_id)).tasks[0].state != "SUCCESS":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    info = await client.get_status(execution_id)
    assert info.state == "PAUSED" and [t.name for t in info.tasks] == ["first"]
    resumed = await client.resume(execution_id)
    assert resumed.state == "RUNNING"
    done = await client.wait(execution_id)
    assert done.state == "SUCCESS" and done.output == {"said": "done"}
    with pytest.raises(ConflictError, match="SUCCESS"):
        await client.resume(execution_id)
    with pytest.raises(ConflictError, match="SUCCESS"):
        await client.cancel(execution_id)
    with pytest.raises(NotFoundError):
        await client.pause("no-such-execution")


ASYNC_GATED = """
version: '2.0'
held:
  tasks:
    hold:
      action: test.async_gate name="never"
      on-complete: [after]
    other:
      action: test.async_gate name="never"
    after:
      action: std.noop
"""


@pytest.mark.usefixtures("workers")
async def test_cancel_stops_work_in_the_worker_and_refuses_late_outcomes(
    client: Client, action_log: Path
) -> None:
    execution_id = await client.run("held", definition=ASYNC_GATED)
    wait_for(lambda: sum(x.startswith("async-entered") for x in read_log(action_log)) == 2,
             what="both actions to run")  # fmt: skip
    cancelled = await client.cancel(execution_id, reason="operator said so")
    assert cancelled.state == "CANCELLED" and cancelled.state_info == "operator said so"
    assert {t.state for t in cancelled.tasks} == {"CANCELLED"}
    # The worker was told: its async actions were cancelled inside the worker process.
    wait_for(lambda: sum(x.startswith("async-cancelled") for x in read_log(action_log)) == 2,
             what="the worker to cancel both actions")  # fmt: skip
    task_id = cancelled.tasks[0].assignment_id
    with pytest.raises(ConflictError, match="cancelled"):
        await client.task_complete(task_id, result="too late")
    assert (await client.get_status(execution_id)).tasks == cancelled.tasks


FLAKY = """
version: '2.0'
flaky:
  input: [marker]
  tasks:
    check:
      action: test.gate name=<% $.marker %>
      timeout: 0.5
      on-success: [after]
    after:
      action: std.echo output=recovered
      publish: {said: <% task().result %>}
"""


@pytest.mark.usefixtures("workers")
async def test_rerun_a_failed_task(client: Client, gates: Path) -> None:
    execution_id = await client.run("flaky", {"marker": "fixed"}, definition=FLAKY)
    failed = await client.wait(execution_id)
    assert failed.state == "ERROR" and "timed out" in failed.tasks[0].state_info
    with pytest.raises(NotFoundError):
        await client.rerun(execution_id, "ghost")
    with pytest.raises(ConflictError, match="never ran"):
        await client.rerun(execution_id, "after")
    (gates / "fixed").touch()
    rerun = await client.rerun(execution_id, "check")
    assert rerun.state == "RUNNING"
    done = await client.wait(execution_id)
    assert done.state == "SUCCESS", done.state_info
    assert done.output == {"said": "recovered"}
    assert done.tasks_named("check")[0].attempt == 2


async def test_list_executions_newest_first_with_paging(client: Client) -> None:
    definition = "version: '2.0'\nquick:\n  tasks:\n    t: {publish: {x: 1}}\n"
    await client.register_workflows(definition)
    ids = [await client.run("quick") for _ in range(5)]
    for execution_id in ids:
        await client.wait(execution_id)
    page, token = await client.list_executions(page_size=2, workflow="quick")
    assert [e.id for e in page] == ids[::-1][:2] and token
    rest: list[str] = []
    while token:
        more, token = await client.list_executions(page_size=2, workflow="quick",
                                                   page_token=token)  # fmt: skip
        rest += [e.id for e in more]
    assert rest == ids[::-1][2:]
    successes, _ = await client.list_executions(state="SUCCESS")
    assert set(ids) <= {e.id for e in successes}
    running, _ = await client.list_executions(state="RUNNING")
    assert not set(ids) & {e.id for e in running}
    with pytest.raises(InvalidArgumentError, match="page_token"):
        await client.list_executions(page_token="garbage!")


@pytest.mark.usefixtures("workers")
async def test_watch_streams_the_current_state_then_every_change(client: Client,
                                                                 gates: Path) -> None:  # fmt: skip
    execution_id = await client.run("gated", definition=GATED)
    seen = []
    watching = client.watch(execution_id)
    first = await anext(watching)
    assert first.kind == "execution" and first.cause == "current"
    (gates / "open").touch()
    async for event in watching:
        seen.append((event.task_name or "(execution)", event.state))
    assert seen[-1] == ("(execution)", "SUCCESS")
    assert ("second", "RUNNING") in seen and ("second", "SUCCESS") in seen
    assert seen.index(("second", "RUNNING")) < seen.index(("second", "SUCCESS"))
    history = await client.history(execution_id)
    assert [e.seq for e in history] == sorted(e.seq for e in history)
    assert history[0].kind == "execution" and history[0].state == "RUNNING"
    assert history[0].cause == "ExecutionStarted"
    assert {e.cause for e in history} >= {"ExecutionStarted", "AssignmentCompleted"}
    assert (history[-1].kind, history[-1].state) == ("execution", "SUCCESS")


WAITS = """
version: '2.0'
waits:
  tasks:
    later:
      action: test.record key="ran"
      wait-before: 2
"""


async def test_a_wait_survives_an_engine_restart_and_fires_once(
    server: EngineServer, worker_env: dict[str, str], action_log: Path
) -> None:
    worker = Worker(server.address, env=worker_env)
    try:
        async with Client(server.address) as client:
            execution_id = await client.run("waits", definition=WAITS)
            info = await client.get_status(execution_id)
            assert info.tasks[0].state == "RUNNING_DELAYED"
        server.kill()  # in the middle of the wait
        server.start()
        async with Client(server.address) as client:
            done = await client.wait(execution_id, timeout=30)
            history = await client.history(execution_id)
        assert done.state == "SUCCESS"
        assert read_log(action_log).count("ran") == 1 or sum(
            x.startswith("ran") for x in read_log(action_log)) == 1
        delayed = [e for e in history if e.task_name == "later" and e.state == "RUNNING_DELAYED"]
        assert len(delayed) == 1
        fired = [e for e in history if e.cause == "TimerFired"]
        assert len(fired) == 1
    finally:
        worker.stop()


LONG = """
version: '2.0'
long:
  tasks:
    slow:
      action: test.gate name="late"
      publish: {r: <% task().result %>}
"""


async def test_a_silent_worker_loses_its_lease_to_a_new_attempt(
    store_url: str, worker_env: dict[str, str], action_log: Path, gates: Path
) -> None:
    engine = EngineServer(store_url, extra=["--lease-seconds", "1"]).start()
    silent = Worker(engine.address, env={**worker_env}, worker_id="silent")
    try:
        async with Client(engine.address) as client:
            execution_id = await client.run("long", definition=LONG)
            wait_for(lambda: any(x.startswith("gate-entered") for x in read_log(action_log)),
                     what="the silent worker to take the task")  # fmt: skip
            os.kill(silent.process.proc.pid, signal.SIGSTOP)  # alive but silent: no heartbeat
            awake = Worker(engine.address, env=worker_env, worker_id="awake")
            try:
                (gates / "late").touch()
                done = await client.wait(execution_id, timeout=30)
            finally:
                awake.stop()
            assert done.state == "SUCCESS"
            assert done.tasks[0].attempt == 2
            assert done.tasks[0].assignment_id.endswith("#2")
    finally:
        if silent.process.alive:
            os.kill(silent.process.proc.pid, signal.SIGCONT)
        silent.stop()
        engine.stop()


FAN_OUT = """
version: '2.0'
fan:
  tasks:
    start:
      action: std.noop
      on-success: [spread]
    spread:
      with-items: i in <% range(12) %>
      concurrency: 4
      action: test.async_gate name="fan-never"
      on-complete: [never]
    never:
      action: std.noop
"""


async def test_cancel_in_the_middle_of_a_fan_out(server: EngineServer,
                                                 worker_env: dict[str, str],
                                                 action_log: Path) -> None:  # fmt: skip
    worker = Worker(server.address, concurrency=8, env=worker_env)
    try:
        async with Client(server.address) as client:
            execution_id = await client.run("fan", definition=FAN_OUT)
            wait_for(lambda: sum(x.startswith("async-entered") for x in read_log(action_log))
                     == 4, what="4 items running (concurrency 4)")  # fmt: skip
            cancelled = await client.cancel(execution_id)
            assert cancelled.state == "CANCELLED"
            assert {t.name: t.state for t in cancelled.tasks} == {
                "start": "SUCCESS", "spread": "CANCELLED"}  # fmt: skip
            wait_for(lambda: sum(x.startswith("async-cancelled") for x in read_log(action_log))
                     == 4, what="the worker to stop the 4 running items")  # fmt: skip
            # Nothing more starts: the 8 held items never run, 'never' is never created.
            history = await client.history(execution_id)
            assert history[-1].kind == "execution" and history[-1].state == "CANCELLED"
            again = await client.get_status(execution_id)
            assert [t.name for t in again.tasks] == ["start", "spread"]
        entered = sum(x.startswith("async-entered") for x in read_log(action_log))
        assert entered == 4
    finally:
        worker.stop()


async def test_timers_fire_within_100_ms_on_an_idle_server(client: Client) -> None:
    definition = """
version: '2.0'
timed:
  tasks:
    t:
      wait-before: 0.5
      publish: {x: 1}
"""
    execution_id = await client.run("timed", definition=definition)
    done = await client.wait(execution_id)
    assert done.state == "SUCCESS"
    history = await client.history(execution_id)
    delayed = next(e for e in history if e.task_name == "t" and e.state == "RUNNING_DELAYED")
    fired = next(e for e in history if e.task_name == "t" and e.cause == "TimerFired")
    late = fired.at - delayed.at - 0.5
    assert 0 <= late < 0.1, f"the timer fired {late * 1000:.0f} ms late"
