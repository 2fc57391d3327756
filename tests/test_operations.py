"""Operating a server: health, reflection, graceful shutdown, metrics, logs, settings.

Real `levante serve` and worker processes on 127.0.0.1 for what an operator sees; the
dispatcher's hand-back at shutdown also in-process, where the unsent case can be made
to happen on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import read_log
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families
from support.processes import EngineServer, LevanteProcess, Worker, wait_for

from levante.cli import _parser
from levante.client import Client
from levante.core.model import AssignmentRecord, AssignmentState
from levante.dispatch import Dispatcher, WorkerSession
from levante.engine import Engine
from levante.errors import NotFoundError
from levante.ids import AssignmentId, ExecutionId
from levante.observability import logs
from levante.settings import SettingsError, resolve
from levante.store import MemoryStore, SqliteStore

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

TWO_GATES = """
version: '2.0'
two_gates:
  tasks:
    p:
      action: test.gate name="p" output=1
      on-success: [after_p]
    after_p:
      action: test.record key="after_p"
    q:
      action: test.gate name="q" output=2
"""

RETRIED = """
version: '2.0'
retried:
  tasks:
    first:
      action: test.record key="first"
      on-success: [held]
    held:
      action: test.gate name="held" output=done
"""

PARKED = """
version: '2.0'
parked:
  tasks:
    one:
      action: test.gate name="never"
    two:
      action: test.gate name="never"
"""


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metrics_url(server: EngineServer) -> str:
    assert server.process is not None
    return server.process.wait_for_line("levante metrics on ").split()[-1]


@pytest.fixture
def started() -> Iterator[list[EngineServer | Worker | LevanteProcess]]:
    """Processes a test starts, ended by PID afterwards."""
    processes: list[EngineServer | Worker | LevanteProcess] = []
    try:
        yield processes
    finally:
        for p in reversed(processes):
            if isinstance(p, EngineServer):
                for process in p.history:
                    process.terminate()
            elif isinstance(p, Worker):
                p.stop()
            else:
                p.terminate()


# ---------------------------------------------------------------- health and reflection


async def test_health_and_reflection_of_a_real_server(
    store_url: str, started: list[EngineServer | Worker | LevanteProcess]
) -> None:
    server = EngineServer(store_url).start()
    started.append(server)
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "levante.v1.Engine", "levante.v1.Workers"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    # What `grpcurl -plaintext HOST:PORT list` and `describe` do, with no proto file.
    channel_sync = grpc.insecure_channel(server.address)
    try:
        database = ProtoReflectionDescriptorDatabase(channel_sync)
        assert set(database.get_services()) == {
            "levante.v1.Engine", "levante.v1.Workers", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }  # fmt: skip
        pool = descriptor_pool.DescriptorPool(database)
        engine = pool.FindServiceByName("levante.v1.Engine")
        assert {"Run", "TaskComplete", "GetStatus"} <= {m.name for m in engine.methods}
        run = engine.methods_by_name["Run"]
        assert run.input_type.full_name == "levante.v1.RunRequest"
        assert "workflow" in run.input_type.fields_by_name
    finally:
        channel_sync.close()


# ---------------------------------------------------------------- graceful shutdown


async def _statuses(store_path: Path, execution_id: str) -> dict[str, tuple[str, str, str]]:
    """Task name -> (task state, its assignment's state, the assignment's worker), read
    straight from the store file while no server runs."""
    store = SqliteStore(store_path)
    await store.open()
    try:
        found = {}
        for task in await store.list_tasks(ExecutionId(execution_id)):
            assert task.assignment_id is not None
            assignment = await store.get_assignment(task.assignment_id)
            assert assignment is not None
            found[task.name] = (task.state.value, assignment.state.value,
                                assignment.worker_id or "")  # fmt: skip
        return found
    finally:
        await store.close()


async def test_sigterm_drains_and_a_restarted_server_carries_on(
    tmp_path: Path, worker_env: dict[str, str], action_log: Path, gates: Path,
    started: list[EngineServer | Worker | LevanteProcess],
) -> None:  # fmt: skip
    store_path = tmp_path / "levante.db"
    server = EngineServer(f"sqlite:///{store_path}", extra=["--grace-seconds", "5"]).start()
    started.append(server)
    worker = Worker(server.address, concurrency=4, worker_id="w1", env=worker_env)
    started.append(worker)
    async with Client(server.address) as client:
        await client.register_workflows(TWO_GATES)
        execution_id = await client.run("two_gates")
    wait_for(lambda: {"gate-entered p", "gate-entered q"}
             <= {line.rsplit(" ", 1)[0] for line in read_log(action_log)},
             what="the worker to run both gated tasks")  # fmt: skip

    assert server.process is not None
    first = server.process
    async with grpc.aio.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        os.kill(first.proc.pid, signal.SIGTERM)
        assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
        # Within the grace period the worker's stream is still open: a result is recorded.
        (gates / "p").touch()
        watch.cancel()
    assert await asyncio.to_thread(first.proc.wait, 30) == 0
    assert "stopped" in first.output()

    # What the stopped server left: p's result recorded, after_p queued and not handed
    # to anyone (the draining server claims nothing), q still leased to the worker that
    # is running it (not requeued: that would run it twice).
    left = await _statuses(store_path, execution_id)
    assert left["p"][:2] == ("SUCCESS", "DONE")
    assert left["after_p"] == ("RUNNING", "QUEUED", "")
    assert left["q"] == ("RUNNING", "LEASED", "w1")

    server.start()  # the same port and store: the worker reconnects, holding q
    async with Client(server.address) as client:
        wait_for(lambda: any(line.startswith("after_p ") for line in read_log(action_log)),
                 what="after_p to run")  # fmt: skip
        (gates / "q").touch()
        info = await client.wait(execution_id, timeout=60)
    assert info.state == "SUCCESS", info.state_info
    assert {t.name: (t.state, t.attempt) for t in info.tasks} == {
        "p": ("SUCCESS", 1), "after_p": ("SUCCESS", 1), "q": ("SUCCESS", 1),
    }  # fmt: skip
    ran = [line.rsplit(" ", 1)[0] for line in read_log(action_log)]
    assert ran.count("gate-entered p") == 1
    assert ran.count("gate-entered q") == 1
    assert ran.count("after_p") == 1


async def test_shutdown_hands_back_only_what_was_never_sent() -> None:
    """In-process, so that an assignment can be claimed and left unsent on purpose."""
    store = MemoryStore()
    await store.open()
    engine = Engine(store)
    dispatcher = Dispatcher(store, engine)
    engine.set_dispatch_listener(dispatcher.notify)
    engine.listeners.on_voided = dispatcher.voided
    await dispatcher.start()
    await engine.register("""
version: '2.0'
pair:
  tasks:
    sent: {action: work.x}
    unsent: {action: work.x}
""")
    delivered: asyncio.Queue[AssignmentRecord] = asyncio.Queue()

    async def deliver(assignment: AssignmentRecord) -> None:
        delivered.put_nowait(assignment)

    session = WorkerSession("w1", frozenset({"work.x"}), 2, deliver)
    await dispatcher.attach(session, ())
    execution_id = await engine.run("pair")
    got = {(a := await asyncio.wait_for(delivered.get(), 10)).task_name: a for _ in range(2)}
    assert set(got) == {"sent", "unsent"}

    dispatcher.drain()
    await dispatcher.detach(session, [got["unsent"].id])
    await dispatcher.close()

    sent = await store.get_assignment(got["sent"].id)
    assert sent is not None and sent.state == AssignmentState.LEASED and sent.worker_id == "w1"
    old = await store.get_assignment(got["unsent"].id)
    assert old is not None and old.state == AssignmentState.CANCELLED
    retry = await store.get_assignment(AssignmentId(f"{got['unsent'].id}#2"))
    assert retry is not None and retry.state == AssignmentState.QUEUED and retry.worker_id is None
    _, tasks = await engine.get_status(execution_id)
    assert {t.name: t.attempt for t in tasks} == {"sent": 1, "unsent": 2}

    # Another engine on the same store: the worker says it holds "sent"; it keeps it,
    # and gets the handed-back attempt.
    other = Dispatcher(store, engine)
    engine.set_dispatch_listener(other.notify)
    await other.start()
    again: asyncio.Queue[AssignmentRecord] = asyncio.Queue()

    async def deliver_again(assignment: AssignmentRecord) -> None:
        again.put_nowait(assignment)

    await other.attach(WorkerSession("w1", frozenset({"work.x"}), 2, deliver_again),
                       [got["sent"].id])  # fmt: skip
    assert (await asyncio.wait_for(again.get(), 10)).id == retry.id
    still = await store.get_assignment(got["sent"].id)
    assert still is not None and still.state == AssignmentState.LEASED
    await other.close()
    await store.close()


async def test_a_draining_dispatcher_claims_nothing() -> None:
    store = MemoryStore()
    await store.open()
    engine = Engine(store)
    dispatcher = Dispatcher(store, engine)
    engine.set_dispatch_listener(dispatcher.notify)
    await dispatcher.start()
    await engine.register("""
version: '2.0'
nobody:
  tasks:
    waits: {action: work.y}
""")
    delivered: list[AssignmentRecord] = []

    async def deliver(assignment: AssignmentRecord) -> None:
        delivered.append(assignment)

    session = WorkerSession("w1", frozenset({"work.y"}), 1, deliver)
    await dispatcher.attach(session, ())
    dispatcher.drain()
    await engine.run("nobody")
    dispatcher.notify_all()
    for _ in range(50):  # let the pump run: it must not claim
        await asyncio.sleep(0)
    assert delivered == []
    assert await store.queued_action_names() == {"work.y"}
    await dispatcher.detach(session)
    await dispatcher.close()


# ---------------------------------------------------------------- metrics


async def test_metrics_of_a_real_server_after_a_workflow(
    store_url: str, worker_env: dict[str, str], action_log: Path, gates: Path,
    started: list[EngineServer | Worker | LevanteProcess],
) -> None:  # fmt: skip
    server = EngineServer(store_url, extra=["--metrics-listen", "127.0.0.1:0"]).start()
    started.append(server)
    url = metrics_url(server)
    doomed = Worker(server.address, worker_id="doomed", env=worker_env)
    started.append(doomed)
    async with Client(server.address) as client:
        await client.register_workflows(RETRIED + PARKED.replace("version: '2.0'\n", ""))
        execution_id = await client.run("retried")
        wait_for(lambda: any(line.startswith("gate-entered held")
                             for line in read_log(action_log)), what="held to start")  # fmt: skip
        doomed.kill()  # its stream ends: "held" goes back to the queue (a redelivery)
        survivor = Worker(server.address, concurrency=1, worker_id="survivor", env=worker_env)
        started.append(survivor)
        (gates / "held").touch()
        wait_for(lambda: any(line.startswith("gate-passed held")
                             for line in read_log(action_log)), what="held to pass")  # fmt: skip

        def ended() -> bool:
            return bool(scrape(url).get(("levante_executions_finished_total",
                                         (("state", "SUCCESS"),))))  # fmt: skip

        wait_for(ended, what="the execution to end")
        info = await client.get_status(execution_id)
        assert info.state == "SUCCESS"
        # Two gated tasks for a worker of capacity 1: one runs, one waits in the queue.
        parked_id = await client.run("parked")
        wait_for(lambda: any(line.startswith("gate-entered never")
                             for line in read_log(action_log)), what="one to start")  # fmt: skip
        assert (await client.get_status(parked_id)).state == "RUNNING"

    m = scrape(url)
    assert m[("levante_executions_started_total", ())] == 2
    assert m[("levante_executions_finished_total", (("state", "SUCCESS"),))] == 1
    assert m[("levante_task_completions_total", (("state", "SUCCESS"),))] == 2
    # first, held (claimed by doomed), held again (by survivor), one of the parked two
    assert m[("levante_assignment_latency_seconds_count", ())] == 4
    assert m[("levante_task_duration_seconds_count", ())] == 2
    assert m[("levante_task_duration_seconds_sum", ())] > 0
    assert m[("levante_redeliveries_total", ())] == 1
    assert m[("levante_lease_expiries_total", ())] == 0
    assert m[("levante_connected_workers", ())] == 1
    assert m[("levante_queue_depth", (("action", "test.gate"),))] == 1
    assert ("levante_queue_depth", (("action", "test.record"),)) not in m
    assert m[("levante_store_transaction_seconds_count", ())] >= 5
    rpc = (("code", "OK"), ("method", "Run"), ("service", "levante.v1.Engine"))
    assert m[("levante_rpcs_total", rpc)] == 2
    missing = (("code", "NOT_FOUND"), ("method", "GetStatus"), ("service", "levante.v1.Engine"))
    assert ("levante_rpcs_total", missing) not in m
    async with Client(server.address) as client:
        with pytest.raises(NotFoundError):
            await client.get_status("no-such-execution")
    # An abort sends the status before the handler's exception reaches the counter.
    wait_for(lambda: scrape(url).get(("levante_rpcs_total", missing)) == 1,
             what="the NOT_FOUND call to be counted")  # fmt: skip

    with pytest.raises(urllib.error.HTTPError) as not_there:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=10)
    assert not_there.value.code == 404
    (gates / "never").touch()  # so that the worker stops at once


# ---------------------------------------------------------------- structured logs


def test_logs_filter_derives_the_execution_from_a_task_id() -> None:
    assert logs.execution_of("abc.3") == "abc"
    assert logs.execution_of("abc.3/2#4") == "abc"
    assert logs.execution_of("abc.3/1.2#2") == "abc.3/1"  # a subworkflow's task
    assert logs.execution_of("nodots") is None


async def test_json_logs_of_a_real_server_carry_the_ids(
    store_url: str, worker_env: dict[str, str], action_log: Path, gates: Path,
    started: list[EngineServer | Worker | LevanteProcess],
) -> None:  # fmt: skip
    server = EngineServer(store_url, extra=[
        "--log-format", "json", "--lease-seconds", "1", "--metrics-listen", "127.0.0.1:0",
    ]).start()  # fmt: skip
    started.append(server)
    url = metrics_url(server)
    # A worker that heartbeats too rarely: its lease runs out while it holds the gate.
    silent = LevanteProcess(
        ["worker", "--engine", server.address, "--actions", "levante_test_actions",
         "--worker-id", "quiet-one", "--heartbeat-seconds", "60"],
        env=worker_env,
    )  # fmt: skip
    started.append(silent)
    silent.wait_for_line("levante worker attached")
    async with Client(server.address) as client:
        await client.register_workflows(RETRIED)
        execution_id = await client.run("retried")

        def lease_line() -> dict[str, str] | None:
            assert server.process is not None
            for line in server.process.lines:
                if line.startswith("{") and "ran out" in line:
                    return json.loads(line)  # type: ignore[no-any-return]
            return None

        try:
            entry = wait_for(lease_line, what="the lease to run out")
        except TimeoutError:
            assert server.process is not None
            print("SERVER\n" + server.process.output() + "\nWORKER\n" + silent.output())
            raise
        assert entry is not None
        assert entry["level"] == "WARNING"
        assert entry["logger"] == "levante.dispatch"
        assert entry["execution_id"] == execution_id
        assert entry["task_id"].startswith(f"{execution_id}.")
        assert entry["worker_id"] == "quiet-one"
        # Counted once the expiry is recorded, just after the line is logged.
        wait_for(lambda: scrape(url)[("levante_lease_expiries_total", ())] == 1,
                 what="the expiry to be counted")  # fmt: skip

        # The silent worker was told to drop the expired attempt; another takes the next.
        started.append(Worker(server.address, worker_id="helper", env=worker_env))
        (gates / "held").touch()
        assert (await client.wait(execution_id, timeout=60)).state == "SUCCESS"

    # A line about a worker's stream names the worker (bound to the stream's context).
    assert server.process is not None
    attached = [json.loads(line) for line in server.process.lines
                if line.startswith("{") and "worker helper attached" in line]  # fmt: skip
    assert attached and attached[0]["worker_id"] == "helper"
    # Every line the server wrote is JSON, except the ones it prints for scripts.
    for line in server.process.lines:
        if not line.startswith("levante "):
            json.loads(line)


# ---------------------------------------------------------------- settings


def _serve_args(
    argv: list[str], environ: dict[str, str]
) -> tuple[argparse.Namespace, dict[str, str]]:
    args = _parser().parse_args(["serve", *argv])
    sources = resolve(args, environ)
    return args, sources


def test_settings_precedence_flag_env_file_default(tmp_path: Path) -> None:
    config = tmp_path / "levante.toml"
    config.write_text(
        'store = "sqlite:///from-file.db"\n'
        'listen = "127.0.0.1:7001"\n'
        "lease-seconds = 11\n"
        "grace_seconds = 2.5\n"
        'log-format = "json"\n'
        "max-json-depth = 9\n"
    )
    environ = {"LEVANTE_LISTEN": "127.0.0.1:7002", "LEVANTE_LEASE_SECONDS": "22",
               "LEVANTE_POLL_SECONDS": "0"}  # fmt: skip
    args, sources = _serve_args(["--config", str(config), "--lease-seconds", "33"], environ)
    got = {k: getattr(args, k) for k in ("store", "listen", "lease_seconds", "poll_seconds",
                                          "grace_seconds", "log_format", "metrics_listen",
                                          "max_json_depth")}  # fmt: skip
    assert got == {
        "store": "sqlite:///from-file.db",  # file
        "listen": "127.0.0.1:7002",  # env beats file
        "lease_seconds": 33.0,  # flag beats env and file
        "poll_seconds": 0.0,  # env
        "grace_seconds": 2.5,  # file (snake_case key)
        "log_format": "json",  # file
        "metrics_listen": "",  # default
        "max_json_depth": 9,  # another option of serve: layered the same way
    }
    assert (sources["lease-seconds"], sources["listen"], sources["store"],
            sources["metrics-listen"]) == ("flag", "env", "file", "default")  # fmt: skip

    # The file can be named by the environment too.
    args, _ = _serve_args([], {"LEVANTE_CONFIG": str(config)})
    assert args.lease_seconds == 11.0


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("lease-secnds = 3\n", {}, "unknown setting 'lease-secnds'"),
        ('lease-seconds = "soon"\n', {}, "lease-seconds: invalid value 'soon'"),
        ('log-format = "xml"\n', {}, "'xml' is not one of text, json"),
        ("listen = [1, 2]\n", {}, "expected one value"),
        ("store = \n", {}, "not valid TOML"),
        ("", {"LEVANTE_GRACE_SECONDS": "x"}, "$LEVANTE_GRACE_SECONDS: invalid value 'x'"),
    ],
)
def test_bad_settings_are_refused(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(SettingsError) as refused:
        _serve_args(["--config", str(config)], environ)
    assert message in str(refused.value)


def test_serve_help_documents_each_option_with_its_variable_and_default() -> None:
    text = subprocess.run(
        [sys.executable, "-m", "levante", "serve", "--help"],
        capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "2000"},
    ).stdout  # fmt: skip
    # Each option's block: its line and the indented lines of help under it.
    blocks: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("  --"):
            option = line.split()[0]
            blocks[option] = line
        elif line.startswith("    ") and blocks:
            blocks[option] += " " + line.strip()
    assert {"--store", "--listen", "--lease-seconds", "--poll-seconds", "--grace-seconds",
            "--metrics-listen", "--log-format", "--log-level", "--config"} <= set(blocks)
    for option, block in blocks.items():
        if option != "--config":
            variable = "LEVANTE_" + option[2:].upper().replace("-", "_")
            if option == "--auth-tokens":
                variable = "LEVANTE_AUTH_TOKENS_FILE"
            assert f"[env {variable}; default " in block, block
    assert "[env LEVANTE_LEASE_SECONDS; default 60.0]" in text
    assert "[env LEVANTE_METRICS_LISTEN; default off]" in text


async def test_a_real_server_takes_its_settings_from_file_env_and_flags(
    tmp_path: Path, started: list[EngineServer | Worker | LevanteProcess]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        f'store = "sqlite:///{tmp_path / "from-file.db"}"\n'
        'metrics-listen = "127.0.0.1:0"\n'
        'log-format = "json"\n'
        'listen = "127.0.0.1:1"\n'  # overridden by the flag below
    )
    process = LevanteProcess(["serve", "--config", str(config), "--listen", "127.0.0.1:0"],
                             env={"LEVANTE_LOG_FORMAT": "text"})  # fmt: skip
    started.append(process)
    line = process.wait_for_line("levante listening on ", timeout=60)
    address = line.rsplit(" ", 1)[1]
    assert address != "127.0.0.1:1"
    process.wait_for_line("levante metrics on http://127.0.0.1:")  # from the file
    logged = process.wait_for_line("20")  # a text log line: env beat the file's json
    assert " INFO levante.server: levante serving on " in logged
    assert (tmp_path / "from-file.db").exists()
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == SERVING


async def test_health_follows_the_store(
    started: list[EngineServer | Worker | LevanteProcess],
) -> None:
    """PostgreSQL refuses the engine's connections: health turns NOT_SERVING; once it
    accepts them again, SERVING."""
    import asyncpg
    from stores import PG_BASE_URL, _database_of, create_database, drop_database

    url = await create_database()
    name = _database_of(url)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_BASE_URL)
        try:
            await conn.execute(sql)
            if "ALLOW_CONNECTIONS false" in sql:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()", name,
                )  # fmt: skip
        finally:
            await conn.close()

    try:
        server = EngineServer(url).start()
        started.append(server)
        async with grpc.aio.insecure_channel(server.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            await admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            assert (await asyncio.wait_for(watch.read(), 30)).status == NOT_SERVING
            await admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            assert (await asyncio.wait_for(watch.read(), 30)).status == SERVING
            watch.cancel()
        # The engine works again.
        async with Client(server.address) as client:
            assert await client.list_executions() == ([], "")
    finally:
        await admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        for p in started:
            if isinstance(p, EngineServer):
                for process in p.history:
                    process.terminate()
        await drop_database(url)


async def test_waiting_for_an_execution_follows_its_changes_instead_of_polling(
    store_url: str, started: list[EngineServer | Worker | LevanteProcess]
) -> None:
    # Client.wait follows WatchExecution and reads the status once, at the end: a status
    # lists every task, and polling it would cost a large execution more at every step.
    server = EngineServer(store_url, extra=["--metrics-listen", "127.0.0.1:0"]).start()
    started.append(server)
    url = metrics_url(server)
    slow = "version: '2.0'\nslow:\n  tasks:\n    later:\n      wait-before: 0.5\n"
    async with Client(server.address) as client:
        await client.register_workflows(slow)
        info = await client.wait(await client.run("slow"), timeout=30)
    assert info.state == "SUCCESS" and info.tasks[0].state == "SUCCESS"

    def calls(method: str) -> float:
        rpc = (("code", "OK"), ("method", method), ("service", "levante.v1.Engine"))
        return scrape(url).get(("levante_rpcs_total", rpc), 0)

    wait_for(lambda: calls("WatchExecution") == 1, what="the watch to be counted")
    assert calls("GetStatus") == 1  # the final status, not a poll every 50 ms
