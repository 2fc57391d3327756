"""Tests of the bundled Python worker against a fake engine over real gRPC (127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from levante.v1 import levante_pb2 as pb
from levante.v1 import levante_pb2_grpc as pb_grpc
from levante.worker import (
    DEFERRED,
    ActionContext,
    ActionRegistry,
    action,
    default_registry,
    load_action_modules,
    serve_worker,
)
from levante.worker.invoke import Invocation, invoke_now
from levante.worker.registry import ActionException, ActionSpec
from levante.worker.runtime import default_worker_id
from levante.worker.std import FAIL_MESSAGE, std_actions

DEADLINE = 10.0  # seconds any single wait may take before the test fails


async def within(awaitable: Any, timeout: float = DEADLINE) -> Any:
    return await asyncio.wait_for(awaitable, timeout)


# ---------------------------------------------------------------- fake engine


class FakeEngine(pb_grpc.WorkersServicer):
    """Records what workers send; lets a test push assignments and acks."""

    def __init__(self, *, auto_ack: bool = True) -> None:
        self.auto_ack = auto_ack
        self.hellos: asyncio.Queue[pb.Hello] = asyncio.Queue()
        self.results: asyncio.Queue[pb.TaskResult] = asyncio.Queue()
        self.deferrals: asyncio.Queue[pb.TaskDeferred] = asyncio.Queue()
        self.heartbeats: asyncio.Queue[pb.Heartbeat] = asyncio.Queue()
        self.closed: asyncio.Queue[int] = asyncio.Queue()  # streams the worker closed
        self.sent_order: list[str] = []  # task ids of results/deferrals, as received
        self.streams = 0
        self.batches = 0  # WorkerBatch messages received
        self._out: asyncio.Queue[pb.EngineMessage | None] | None = None

    async def Subscribe(
        self, request_iterator: AsyncIterator[pb.WorkerMessage], context: Any
    ) -> AsyncIterator[pb.EngineMessage]:
        self.streams += 1
        number = self.streams
        out: asyncio.Queue[pb.EngineMessage | None] = asyncio.Queue()
        self._out = out

        async def pump() -> None:
            try:
                async for message in request_iterator:
                    self._record(message, out)
                self.closed.put_nowait(number)
            finally:
                out.put_nowait(None)

        pumping = asyncio.create_task(pump())
        try:
            while (message := await out.get()) is not None:
                yield message
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await pumping

    def _record(self, message: pb.WorkerMessage, out: asyncio.Queue[Any]) -> None:
        kind = message.WhichOneof("kind")
        if kind == "batch":
            self.batches += 1
            for inner in message.batch.messages:
                self._record(inner, out)
        elif kind == "hello":
            self.hellos.put_nowait(message.hello)
        elif kind == "result":
            self.sent_order.append(message.result.task_id)
            self.results.put_nowait(message.result)
            if self.auto_ack:
                out.put_nowait(pb.EngineMessage(ack=pb.Ack(task_id=message.result.task_id,
                                                           code="OK")))
        elif kind == "defer":
            self.sent_order.append(message.defer.task_id)
            self.deferrals.put_nowait(message.defer)
            if self.auto_ack:
                out.put_nowait(pb.EngineMessage(ack=pb.Ack(task_id=message.defer.task_id,
                                                           code="OK")))
        elif kind == "heartbeat":
            self.heartbeats.put_nowait(message.heartbeat)

    def send(self, message: pb.EngineMessage) -> None:
        assert self._out is not None, "no worker connected"
        self._out.put_nowait(message)

    def assign(self, task_id: str, action_name: str, input: Any = None, **fields: Any) -> None:
        assignment = pb.TaskAssignment(
            task_id=task_id,
            execution_id=fields.pop("execution_id", "ex-1"),
            task_name=fields.pop("task_name", "task1"),
            action=action_name,
            input_json=json.dumps(input if input is not None else {}),
            attempt=fields.pop("attempt", 1),
            **fields,
        )
        self.send(pb.EngineMessage(assignment=assignment))

    def ack(self, task_id: str, code: str = "OK", message: str = "") -> None:
        self.send(pb.EngineMessage(ack=pb.Ack(task_id=task_id, code=code, message=message)))

    async def result(self, task_id: str | None = None) -> pb.TaskResult:
        got: pb.TaskResult = await within(self.results.get())
        if task_id is not None:
            assert got.task_id == task_id
        return got

    async def error(self, task_id: str) -> Any:
        got = await self.result(task_id)
        assert got.WhichOneof("outcome") == "error_json", got
        return json.loads(got.error_json)


class Engine:
    """A grpc.aio server on 127.0.0.1 serving a FakeEngine."""

    def __init__(self, fake: FakeEngine, server: grpc.aio.Server, port: int) -> None:
        self.fake = fake
        self.server = server
        self.port = port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, port: int = 0, *, auto_ack: bool = True) -> Engine:
        fake = FakeEngine(auto_ack=auto_ack)
        server = grpc.aio.server()
        pb_grpc.add_WorkersServicer_to_server(fake, server)  # type: ignore[no-untyped-call]
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        assert bound, f"could not bind 127.0.0.1:{port}"
        await server.start()
        return cls(fake, server, bound)

    async def stop(self) -> None:
        await self.server.stop(grace=None)


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    started = await Engine.start()
    try:
        yield started
    finally:
        await started.stop()


class Worker:
    def __init__(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        self.task = task
        self.stop = stop

    async def stopped(self) -> None:
        self.stop.set()
        await within(asyncio.shield(self.task))


@contextlib.asynccontextmanager
async def running_worker(
    address: str, registry: ActionRegistry, **options: Any
) -> AsyncIterator[Worker]:
    options.setdefault("worker_id", "w-test")
    options.setdefault("grace_seconds", 2.0)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_worker(address, registry, stop=stop, **options))
    worker = Worker(task, stop)
    try:
        yield worker
    finally:
        await worker.stopped()
        leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("levante-worker")]
        assert leftovers == []


def make_registry() -> ActionRegistry:
    """A fresh registry with the standard actions and a few test actions."""
    registry = std_actions()

    @registry.action("t.boom")
    def boom(message: str = "boom") -> None:
        raise ValueError(message)

    @registry.action("t.set")
    def make_set() -> set[int]:
        return {1, 2}

    return registry


# ---------------------------------------------------------------- the stream


async def test_hello_carries_actions_and_capacity(engine: Engine) -> None:
    registry = make_registry()
    async with running_worker(engine.address, registry, capacity=3, worker_id="w-hello"):
        hello = await within(engine.fake.hellos.get())
    assert hello.worker_id == "w-hello"
    assert list(hello.actions) == sorted(registry.names())
    assert {"std.noop", "std.echo", "std.fail", "std.sleep", "std.async_noop"} <= set(
        hello.actions
    )
    assert hello.capacity == 3
    assert list(hello.holding) == []


def test_default_worker_id_is_stable() -> None:
    worker_id = default_worker_id()
    assert worker_id == default_worker_id()
    assert worker_id.startswith(f"{socket.gethostname()}-")
    assert worker_id.split("-")[-2].isdigit()


async def test_echo_yields_result(engine: Engine) -> None:
    async with running_worker(engine.address, std_actions()):
        await within(engine.fake.hellos.get())
        engine.fake.assign("t1", "std.echo", {"output": {"a": [1, "b", None]}})
        result = await engine.fake.result("t1")
        engine.fake.assign("t2", "std.noop")
        noop = await engine.fake.result("t2")
    assert result.WhichOneof("outcome") == "result_json"
    assert json.loads(result.result_json) == {"a": [1, "b", None]}
    assert json.loads(noop.result_json) is None


async def test_exception_yields_error_type_and_message(engine: Engine) -> None:
    async with running_worker(engine.address, make_registry()):
        await within(engine.fake.hellos.get())
        engine.fake.assign("t1", "t.boom", {"message": "it broke"})
        assert await engine.fake.error("t1") == {"type": "ValueError", "message": "it broke"}


async def test_std_fail_mirrors_mistral(engine: Engine) -> None:
    async with running_worker(engine.address, std_actions()):
        await within(engine.fake.hellos.get())
        engine.fake.assign("plain", "std.fail")
        assert await engine.fake.error("plain") == {
            "type": "ActionException",
            "message": FAIL_MESSAGE,
        }
        engine.fake.assign("data", "std.fail", {"error_data": {"code": 42, "why": "no"}})
        assert await engine.fake.error("data") == {"code": 42, "why": "no"}
        # Mistral tests error_data for truth: an empty value fails the plain way.
        engine.fake.assign("empty", "std.fail", {"error_data": ""})
        assert (await engine.fake.error("empty"))["type"] == "ActionException"


async def test_bad_calls_become_errors(engine: Engine) -> None:
    async with running_worker(engine.address, make_registry()):
        await within(engine.fake.hellos.get())
        engine.fake.assign("unknown", "no.such.action")
        error = await engine.fake.error("unknown")
        assert error["type"] == "ActionNotFound"
        assert "no.such.action" in error["message"]

        engine.fake.assign("missing", "std.echo", {})
        error = await engine.fake.error("missing")
        assert error["type"] == "TypeError"
        assert "output" in error["message"]

        engine.fake.assign("extra", "std.noop", {"surprise": 1})
        assert (await engine.fake.error("extra"))["type"] == "TypeError"

        engine.fake.assign("notjson", "t.set")
        assert (await engine.fake.error("notjson"))["type"] == "ResultNotSerializable"

        engine.fake.assign("control", "std.echo", {"output": 1})  # still serving
        assert json.loads((await engine.fake.result("control")).result_json) == 1

        engine.fake.send(pb.EngineMessage(assignment=pb.TaskAssignment(
            task_id="list", action="std.noop", input_json="[1, 2]")))
        assert (await engine.fake.error("list"))["type"] == "InvalidInput"


async def test_sync_and_async_user_actions(engine: Engine) -> None:
    registry = ActionRegistry()
    main_thread = threading.get_ident()

    @registry.action("u.sync")
    def add(a: int, b: int) -> dict[str, Any]:
        return {"sum": a + b, "in_thread": threading.get_ident() != main_thread}

    @registry.action("u.async")
    async def mul(a: int, b: int) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"product": a * b, "in_thread": threading.get_ident() != main_thread}

    @registry.action
    async def failing_async() -> None:
        raise KeyError("k")

    async with running_worker(engine.address, registry):
        hello = await within(engine.fake.hellos.get())
        assert list(hello.actions) == ["failing_async", "u.async", "u.sync"]
        engine.fake.assign("s", "u.sync", {"a": 2, "b": 3})
        assert json.loads((await engine.fake.result("s")).result_json) == {
            "sum": 5, "in_thread": True}
        engine.fake.assign("a", "u.async", {"a": 2, "b": 3})
        assert json.loads((await engine.fake.result("a")).result_json) == {
            "product": 6, "in_thread": False}
        engine.fake.assign("f", "failing_async")
        assert await engine.fake.error("f") == {"type": "KeyError", "message": "'k'"}


async def test_context_parameter(engine: Engine) -> None:
    registry = ActionRegistry()

    @registry.action("u.ctx")
    def with_context(greeting: str, context: ActionContext) -> dict[str, Any]:
        return {"greeting": greeting, "task_id": context.task_id,
                "execution_id": context.execution_id, "task_name": context.task_name,
                "attempt": context.attempt}

    @registry.action("u.ctx_async")
    async def with_context_async(*, context: ActionContext) -> str:
        return context.task_id

    async with running_worker(engine.address, registry):
        await within(engine.fake.hellos.get())
        engine.fake.assign("t-ctx", "u.ctx", {"greeting": "hi"}, execution_id="ex-9",
                           task_name="charge", attempt=3)
        assert json.loads((await engine.fake.result("t-ctx")).result_json) == {
            "greeting": "hi", "task_id": "t-ctx", "execution_id": "ex-9",
            "task_name": "charge", "attempt": 3}
        engine.fake.assign("t-async", "u.ctx_async")
        assert json.loads((await engine.fake.result("t-async")).result_json) == "t-async"
        # The input may not smuggle its own "context" in.
        engine.fake.assign("t-clash", "u.ctx_async", {"context": 1})
        assert (await engine.fake.error("t-clash"))["type"] == "InvalidInput"


async def test_capacity_is_never_exceeded(engine: Engine) -> None:
    registry = ActionRegistry()
    capacity, total = 2, 6
    running = 0
    most = 0
    started: asyncio.Queue[str] = asyncio.Queue()
    release = {f"t{i}": asyncio.Event() for i in range(total)}

    @registry.action("u.slow")
    async def slow(name: str) -> str:
        nonlocal running, most
        running += 1
        most = max(most, running)
        started.put_nowait(name)
        try:
            await release[name].wait()
        finally:
            running -= 1
        return name

    async with running_worker(engine.address, registry, capacity=capacity,
                              heartbeat_seconds=0.05):
        await within(engine.fake.hellos.get())
        for name in release:
            engine.fake.assign(name, "u.slow", {"name": name})
        first = {await within(started.get()) for _ in range(capacity)}
        # A heartbeat naming every assignment proves the worker holds all of them...
        while True:
            beat = await within(engine.fake.heartbeats.get())
            if set(beat.task_ids) == set(release):
                break
        # ...yet only `capacity` of them have started.
        assert running == capacity and started.empty()
        for name in first:  # each finished action lets exactly one more start
            release[name].set()
        for _ in range(total - capacity):
            name = await within(started.get())
            assert running <= capacity
            release[name].set()
        done = [(await engine.fake.result()).task_id for _ in range(total)]
    assert sorted(done) == sorted(release)
    assert most == capacity


async def test_sync_actions_run_concurrently_up_to_capacity(engine: Engine) -> None:
    registry = ActionRegistry()
    capacity = 3
    barrier = threading.Barrier(capacity, timeout=DEADLINE)

    @registry.action("u.meet")
    def meet() -> int:
        return barrier.wait()  # only returns once `capacity` threads run at once

    async with running_worker(engine.address, registry, capacity=capacity):
        await within(engine.fake.hellos.get())
        for i in range(capacity):
            engine.fake.assign(f"m{i}", "u.meet")
        results = [await engine.fake.result() for _ in range(capacity)]
    assert sorted(json.loads(r.result_json) for r in results) == list(range(capacity))


async def test_duplicate_assignment_runs_once(engine: Engine) -> None:
    registry = ActionRegistry()
    runs: list[str] = []
    gate = asyncio.Event()

    @registry.action("u.once")
    async def once(tag: str) -> str:
        runs.append(tag)
        await gate.wait()
        return tag

    engine.fake.auto_ack = False
    async with running_worker(engine.address, registry):
        await within(engine.fake.hellos.get())
        engine.fake.assign("dup", "u.once", {"tag": "a"})
        engine.fake.assign("dup", "u.once", {"tag": "b"})  # while running
        gate.set()
        assert json.loads((await engine.fake.result("dup")).result_json) == "a"
        engine.fake.assign("dup", "u.once", {"tag": "c"})  # finished, not yet acked
        engine.fake.assign("probe", "u.once", {"tag": "probe"})
        await engine.fake.result("probe")
        engine.fake.ack("dup")
        engine.fake.ack("probe")
    assert runs == ["a", "probe"]
    assert engine.fake.sent_order == ["dup", "probe"]


async def test_deferred_actions_send_task_deferred(engine: Engine) -> None:
    registry = std_actions()
    handed_over: list[str] = []

    @registry.action("u.declared", deferred=True)
    def declared(context: ActionContext) -> None:
        handed_over.append(context.task_id)

    @registry.action("u.returned")
    async def returned(context: ActionContext) -> object:
        handed_over.append(context.task_id)
        return DEFERRED

    @registry.action("u.declared_fails", deferred=True)
    def declared_fails() -> None:
        raise RuntimeError("could not hand over")

    async with running_worker(engine.address, registry):
        await within(engine.fake.hellos.get())
        for task_id, name in [("d1", "u.declared"), ("d2", "u.returned"),
                              ("d3", "std.async_noop")]:
            engine.fake.assign(task_id, name)
            deferral = await within(engine.fake.deferrals.get())
            assert deferral.task_id == task_id
        engine.fake.assign("d4", "u.declared_fails")
        assert await engine.fake.error("d4") == {"type": "RuntimeError",
                                                 "message": "could not hand over"}
    assert handed_over == ["d1", "d2"]
    assert engine.fake.results.empty()


async def test_heartbeats_carry_running_ids(engine: Engine) -> None:
    registry = ActionRegistry()
    gate = asyncio.Event()

    @registry.action("u.wait")
    async def wait() -> None:
        await gate.wait()

    async with running_worker(engine.address, registry, heartbeat_seconds=0.05):
        await within(engine.fake.hellos.get())
        engine.fake.assign("hb1", "u.wait")
        engine.fake.assign("hb2", "u.wait")
        while True:
            beat = await within(engine.fake.heartbeats.get())
            if set(beat.task_ids) == {"hb1", "hb2"}:
                break
        gate.set()
        await engine.fake.result()
        await engine.fake.result()


# ---------------------------------------------------------------- never lose a result


async def test_unacked_results_are_resent_to_a_restarted_engine() -> None:
    registry = std_actions()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    gate = threading.Event()

    @registry.action("u.blocked")
    def blocked() -> str:  # runs in a thread, across the engine's restart
        loop.call_soon_threadsafe(started.set)
        assert gate.wait(DEADLINE)
        return "late"

    first = await Engine.start(auto_ack=False)
    port = first.port
    engines = [first]
    try:
        async with running_worker(first.address, registry) as worker:
            assert list((await within(first.fake.hellos.get())).holding) == []
            first.fake.assign("done", "std.echo", {"output": "early"})
            await first.fake.result("done")  # never acknowledged by this engine
            first.fake.assign("running", "u.blocked")
            await within(started.wait())
            await first.stop()
            gate.set()  # finishes while no engine is there

            second = await Engine.start(port, auto_ack=False)
            engines.append(second)
            hello = await within(second.fake.hellos.get())
            assert set(hello.holding) == {"done", "running"}
            resent = {}
            for _ in range(2):
                result = await second.fake.result()
                resent[result.task_id] = json.loads(result.result_json)
            assert resent == {"done": "early", "running": "late"}
            assert second.fake.sent_order[0] == "done"  # resent in completion order
            second.fake.ack("done")
            second.fake.ack("running", code="NOT_FOUND", message="lease expired")
            # Messages travel in order: the probe's result shows the acks were read.
            second.fake.assign("probe", "std.echo", {"output": 1})
            await second.fake.result("probe")  # left unacknowledged
            await second.stop()

            third = await Engine.start(port)
            engines.append(third)
            hello = await within(third.fake.hellos.get())
            assert list(hello.holding) == ["probe"]  # acked outcomes are forgotten
            await third.fake.result("probe")
            third.fake.assign("probe2", "std.echo", {"output": 2})
            await third.fake.result("probe2")
            assert third.fake.sent_order == ["probe", "probe2"]
            await worker.stopped()
    finally:
        for each in engines:
            await each.stop()


async def test_engine_unreachable_at_start_then_up() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with running_worker(f"127.0.0.1:{port}", std_actions()) as worker:
        assert not worker.task.done()
        engine = await Engine.start(port)
        try:
            await within(engine.fake.hellos.get())
            engine.fake.assign("t", "std.echo", {"output": "up"})
            assert json.loads((await engine.fake.result("t")).result_json) == "up"
            await worker.stopped()
        finally:
            await engine.stop()


# ---------------------------------------------------------------- stopping


async def test_stop_when_idle_returns_and_closes_stream(engine: Engine) -> None:
    async with running_worker(engine.address, std_actions()) as worker:
        await within(engine.fake.hellos.get())
        await worker.stopped()
        assert await within(engine.fake.closed.get()) == 1
        assert worker.task.result() is None


async def test_stop_before_connecting_returns() -> None:
    stop = asyncio.Event()
    stop.set()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await within(serve_worker(f"127.0.0.1:{port}", std_actions(), stop=stop), 5)


async def test_stop_delivers_running_results_then_closes(engine: Engine) -> None:
    registry = std_actions()
    gate = asyncio.Event()
    started = asyncio.Event()

    @registry.action("u.wait")
    async def wait() -> str:
        started.set()
        await gate.wait()
        return "finished"

    engine.fake.auto_ack = False
    async with running_worker(engine.address, registry, grace_seconds=DEADLINE) as worker:
        await within(engine.fake.hellos.get())
        engine.fake.assign("r1", "u.wait")
        await within(started.wait())
        worker.stop.set()
        engine.fake.assign("late", "std.echo", {"output": "x"})  # refused: stopping
        gate.set()
        result = await engine.fake.result("r1")
        assert json.loads(result.result_json) == "finished"
        # Unacknowledged: the worker keeps the stream open.
        assert not worker.task.done() and engine.fake.closed.empty()
        engine.fake.ack("r1")
        await within(asyncio.shield(worker.task))
        assert await within(engine.fake.closed.get()) == 1
    assert engine.fake.sent_order == ["r1"]


async def test_stop_abandons_stuck_actions_after_grace(engine: Engine) -> None:
    registry = ActionRegistry()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @registry.action("u.stuck")
    async def stuck() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with running_worker(engine.address, registry, grace_seconds=0.2) as worker:
        await within(engine.fake.hellos.get())
        engine.fake.assign("s1", "u.stuck")
        await within(started.wait())
        await worker.stopped()
        assert cancelled.is_set()
        assert await within(engine.fake.closed.get()) == 1
    assert engine.fake.results.empty()


# ---------------------------------------------------------------- registry and loading


def test_registry_decorators() -> None:
    registry = ActionRegistry()

    @registry.action
    def plain() -> int:
        return 1

    @registry.action("named", deferred=True)
    async def other() -> None:
        return None

    assert plain() == 1  # the decorator returns the function unchanged
    assert registry.names() == ["named", "plain"]
    assert "plain" in registry and len(registry) == 2
    spec = registry.get("named")
    assert spec is not None and spec.is_async and spec.deferred
    plain_spec = registry.get("plain")
    assert plain_spec is not None and not plain_spec.is_async and not plain_spec.wants_context

    with pytest.raises(ValueError, match="already registered"):
        registry.register("plain", lambda: 2)
    registry.register("plain", plain)  # the same function again is fine
    with pytest.raises(ValueError):
        registry.register("", plain)

    merged = ActionRegistry().include(registry).include(std_actions())
    assert "named" in merged and "std.echo" in merged
    registry.unregister("named")
    assert "named" not in registry and "named" in merged

    assert repr(DEFERRED) == "DEFERRED"
    context = ActionContext("t", "e", "n", 1)
    with pytest.raises(AttributeError):
        context.task_id = "x"  # type: ignore[misc]


async def test_std_parsing_follows_mistral() -> None:
    registry = std_actions()
    echo = registry.get("std.echo")
    sleep = registry.get("std.sleep")
    assert echo is not None and sleep is not None
    assert await echo.fn(output="x", delay="not a number") == "x"
    assert await echo.fn(output=[1], delay=-3) == [1]
    assert await sleep.fn(seconds=-1) is None
    assert await sleep.fn(seconds="soon") is None
    assert await sleep.fn(seconds=0.01) is None


def test_load_action_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module_name = "levante_test_user_actions"
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent("""
        from levante.worker import action

        @action("tmp.hello")
        def hello(name: str) -> str:
            return "hello " + name

        @action
        async def tmp_bare() -> None:
            return None
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        modules = load_action_modules([module_name])
        assert [m.__name__ for m in modules] == [module_name]
        assert str(tmp_path) in sys.path
        assert "tmp.hello" in default_registry and "tmp_bare" in default_registry
        spec = default_registry.get("tmp.hello")
        assert spec is not None and spec.fn(name="x") == "hello x"
        with pytest.raises(ModuleNotFoundError):
            load_action_modules(["levante_test_no_such_module"])
    finally:
        for name in ("tmp.hello", "tmp_bare"):
            if name in default_registry:
                default_registry.unregister(name)
        sys.modules.pop(module_name, None)


def test_module_level_action_decorator() -> None:
    @action("tmp.module_level")
    def f() -> int:
        return 3

    try:
        spec = default_registry.get("tmp.module_level")
        assert spec is not None and spec.fn is f
    finally:
        default_registry.unregister("tmp.module_level")


async def test_results_ready_together_go_as_one_batch(engine: Engine) -> None:
    registry = ActionRegistry()
    gate = asyncio.Event()
    total = 20

    @registry.action("u.gated")
    async def gated(name: str) -> str:
        await gate.wait()
        return name

    async with running_worker(engine.address, registry, capacity=total,
                              heartbeat_seconds=0.05):
        hello = await within(engine.fake.hellos.get())
        assert hello.accepts_batches
        for i in range(total):
            engine.fake.assign(f"g{i}", "u.gated", {"name": f"g{i}"})
        while True:  # a heartbeat naming every assignment: all of them are running
            beat = await within(engine.fake.heartbeats.get())
            if set(beat.task_ids) == {f"g{i}" for i in range(total)}:
                break
        gate.set()  # every action finishes in the same turn of the event loop
        done = [(await within(engine.fake.result())).task_id for _ in range(total)]
    assert sorted(done) == sorted(f"g{i}" for i in range(total))
    assert engine.fake.batches >= 1


async def test_a_result_too_big_for_a_message_fails_the_task(engine: Engine) -> None:
    registry = ActionRegistry()

    @registry.action("u.huge")
    async def huge() -> str:
        return "x" * (17 * 1024 * 1024)  # over the engine's 16 MiB message size

    async with running_worker(engine.address, registry):
        await within(engine.fake.hellos.get())
        engine.fake.assign("t-huge", "u.huge", {})
        error = await engine.fake.error("t-huge")
    assert error["type"] == "ResultTooLarge"
    assert "u.huge" in error["message"]


def test_an_actions_argument_check_agrees_with_signature_bind() -> None:
    """The quick check before a call (ActionSpec.takes) never accepts arguments that
    Signature.bind would refuse, and refuses only what bind refuses (so the TypeError a
    worker reports names what is wrong)."""

    def plain(a: int, b: int = 1, *, c: int, d: int = 2) -> None: ...
    def positional_first(a: int, /, b: int = 1, **rest: int) -> None: ...
    def anything(*args: int, **rest: int) -> None: ...
    def optional_positional(a: int = 1, /, b: int = 2) -> None: ...
    def nothing() -> None: ...
    def star_between(a: int, *rest: int, b: int) -> None: ...

    names = ["a", "b", "c", "d", "e"]
    for fn in (plain, positional_first, anything, optional_positional, nothing, star_between):
        spec = ActionSpec.build("t.x", fn, deferred=False)
        for k in range(len(names) + 1):
            for chosen in itertools.combinations(names, k):
                kwargs = dict.fromkeys(chosen, 1)
                try:
                    spec.signature.bind(**kwargs)
                    binds = True
                except TypeError:
                    binds = False
                assert spec.takes(kwargs) == binds, (fn.__name__, chosen)


def test_an_immediate_action_runs_here_and_now() -> None:
    """invoke_now calls an action declared immediate on the spot (a plain function, or a
    coroutine run to its end in one step), with the same errors as invoke_action; it
    leaves every other action to invoke_action; one that waits after all fails."""
    registry = ActionRegistry()
    closed: list[str] = []

    @registry.action("t.double", immediate=True)
    async def double(x: int) -> int:
        return 2 * x

    @registry.action("t.plain", immediate=True)
    def plain(x: int) -> int:
        return x + 1

    @registry.action("t.refuse", immediate=True)
    def refuse() -> None:
        raise ActionException("no", error_data={"why": "no"})

    @registry.action("t.waits", immediate=True)
    async def waits() -> None:
        try:
            await asyncio.sleep(0)
        finally:
            closed.append("waits")

    @registry.action("t.ordinary")
    async def ordinary() -> None:
        return None

    context = ActionContext(task_id="t", execution_id="e", task_name="n", attempt=1)
    assert invoke_now(registry, "t.double", {"x": 4}, context) == Invocation(True, 8)
    assert invoke_now(registry, "t.plain", {"x": 4}, context) == Invocation(True, 5)
    assert invoke_now(registry, "t.refuse", {}, context) == Invocation(False, {"why": "no"})
    bad = invoke_now(registry, "t.double", {"y": 1}, context)
    assert bad is not None and bad.value["type"] == "TypeError"
    waited = invoke_now(registry, "t.waits", {}, context)
    assert waited is not None and waited.value["type"] == "ImmediateActionWaited"
    assert closed == ["waits"]  # the coroutine was closed, not left suspended
    assert invoke_now(registry, "t.ordinary", {}, context) is None
    assert invoke_now(registry, "no.such", {}, context) is None
    with pytest.raises(ValueError, match="deferred action cannot be immediate"):
        registry.register("t.both", plain, deferred=True, immediate=True)
    std = std_actions()
    assert all(std.get(n).immediate for n in ("std.noop", "std.fail"))  # type: ignore[union-attr]
    assert not std.get("std.echo").immediate  # type: ignore[union-attr]  # it may sleep
