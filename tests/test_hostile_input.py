"""Hostile input through a real `levante serve`: each attempt gets a clear error, the
server stays up, and nothing stored changes.

Extends tests/test_bad_input.py (malformed but honest requests) with what an attacker
or a broken client would send: oversized and deeply nested JSON, YAML bombs, expressions
reaching for Python internals or files, invalid UTF-8, unknown YAML keys, and a worker
completing assignments it does not hold.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from support.processes import EngineServer

from levante.errors import DefinitionError
from levante.lang.parser import parse_document
from levante.v1 import levante_pb2 as pb
from levante.v1 import levante_pb2_grpc as pb_grpc

MIB = 1024 * 1024

# An execution whose history and rows must stay as they are. (No worker serves its
# action here, so it has already ended in ERROR; only its rows matter.)
REFERENCE = """
version: '2.0'
reference:
  input: [name]
  tasks:
    hello:
      action: test.wait_deferred
"""


def counts(store_url: str) -> dict[str, int]:
    path = store_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return {
            table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("definitions", "workflows", "executions", "tasks", "assignments")
        }


class Witness:
    """What must not change: the store's rows, the executions listed, one history."""

    def __init__(self, stub: pb_grpc.EngineStub, store_url: str, execution_id: str) -> None:
        self.stub = stub
        self.store_url = store_url
        self.execution_id = execution_id
        self.before: Any = None

    async def look(self) -> Any:
        listed = await self.stub.ListExecutions(pb.ListExecutionsRequest(page_size=1000))
        history = await self.stub.GetHistory(pb.GetHistoryRequest(execution_id=self.execution_id))
        status = await self.stub.GetStatus(pb.GetStatusRequest(execution_id=self.execution_id))
        return counts(self.store_url), list(listed.executions), list(history.events), status

    async def __aenter__(self) -> Witness:
        self.before = await self.look()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert await self.look() == self.before  # the server answers, nothing changed


@pytest.fixture
async def stub(server: EngineServer) -> AsyncIterator[pb_grpc.EngineStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield pb_grpc.EngineStub(channel)


@pytest.fixture
async def witness(stub: pb_grpc.EngineStub, store_url: str) -> Witness:
    run = await stub.Run(pb.RunRequest(workflow="reference", definition=REFERENCE,
                                       input_json='{"name": "x"}'))  # fmt: skip
    return Witness(stub, store_url, run.execution_id)


async def refused(call: Any, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = caught.value.details() or ""
    assert caught.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    return details


# ---------------------------------------------------------------- oversized, nested JSON


async def test_oversized_json_is_refused(stub: pb_grpc.EngineStub, witness: Witness) -> None:
    big = '{"name": "' + "x" * (5 * MIB) + '"}'
    async with witness:
        await refused(stub.Run(pb.RunRequest(workflow="reference", input_json=big)),
                      grpc.StatusCode.RESOURCE_EXHAUSTED, "input_json", "max-input-bytes")
        await refused(stub.Run(pb.RunRequest(workflow="reference", params_json=big)),
                      grpc.StatusCode.RESOURCE_EXHAUSTED, "params_json", "max-input-bytes")
        status = await stub.GetStatus(pb.GetStatusRequest(execution_id=witness.execution_id))
        task_id = status.tasks[0].assignment_id
        await refused(stub.TaskComplete(pb.TaskCompleteRequest(task_id=task_id, result_json=big)),
                      grpc.StatusCode.RESOURCE_EXHAUSTED, "result_json", "max-result-bytes")
        await refused(stub.RegisterWorkflows(pb.RegisterWorkflowsRequest(
            definition=REFERENCE + "#" + "y" * (2 * MIB) + "\n")),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "definition", "max-definition-bytes")
        # Beyond the largest message the server reads at all (16 MiB): gRPC refuses it.
        huge = "z" * (17 * MIB)
        await refused(stub.Run(pb.RunRequest(workflow="reference", input_json=huge)),
                      grpc.StatusCode.RESOURCE_EXHAUSTED)  # fmt: skip


async def test_deeply_nested_json_is_refused(stub: pb_grpc.EngineStub, witness: Witness) -> None:
    status = await stub.GetStatus(pb.GetStatusRequest(execution_id=witness.execution_id))
    task_id = status.tasks[0].assignment_id
    deep_array = "[" * 200_000 + "]" * 200_000
    deep_object = '{"a":' * 65 + "1" + "}" * 65
    unbalanced = '{"name": ' + "[" * 100_000
    async with witness:
        for text in (deep_object, '{"name": ' + deep_array + "}", unbalanced):
            await refused(stub.Run(pb.RunRequest(workflow="reference", input_json=text)),
                          grpc.StatusCode.RESOURCE_EXHAUSTED, "input_json", "max-json-depth")
        await refused(
            stub.TaskComplete(pb.TaskCompleteRequest(task_id=task_id, error_json=deep_array)),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "error_json", "max-json-depth",
        )  # fmt: skip
        # Nested 64 deep is within the default limit: refused only for what it is.
        within = '{"name": ' + "[" * 63 + "]" * 63 + ', "extra": 1}'
        await refused(stub.Run(pb.RunRequest(workflow="reference", input_json=within)),
                      grpc.StatusCode.INVALID_ARGUMENT, "extra")  # fmt: skip


# ---------------------------------------------------------------- YAML bombs


LAUGHS = "version: '2.0'\nlaughs:\n  vars:\n    a: &a [lol, lol, lol, lol]\n" + "".join(
    f"    {c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefghi", "bcdefghij", strict=True)
) + "  output:\n    j: <% $.j %>\n  tasks:\n    t:\n      action: std.noop\n"

BOMBS = {
    "nested flow sequences": "version: '2.0'\nwf:\n  vars:\n    a: " + "[" * 100_000
    + "]" * 100_000 + "\n  tasks:\n    t:\n      action: std.noop\n",
    "nested flow mappings": "version: '2.0'\nwf:\n  vars:\n    a: " + "{a: " * 50_000
    + "}" * 50_000 + "\n",
    "nested blocks": "version: '2.0'\nwf:\n  vars:\n"
    + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(300)) + "  tasks: {}\n",
    "too many nodes": "version: '2.0'\nwf:\n  vars:\n    a: [" + ",".join(["1"] * 150_000)
    + "]\n",
    "python object tag": "version: '2.0'\nwf: !!python/object/apply:os.system ['touch /tmp/x']\n",
    "merge of an alias": "version: '2.0'\nbase: &b {tasks: {t: {action: std.noop}}}\n"
    "wf:\n  <<: *b\n",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_yaml_bombs_are_refused_quickly_in_bounded_memory(name: str) -> None:
    # Tracing every allocation makes parsing 100,000 nodes several times slower; that
    # bomb's memory is bounded by the node cap, so only its time is measured.
    traced = name != "too many nodes"
    if traced:
        tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(DefinitionError) as caught:
            parse_document(BOMBS[name])
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1] if traced else 0
    finally:
        tracemalloc.stop()
    assert caught.value.line is not None, str(caught.value)
    assert peak < 16 * MIB, f"{name}: {peak / MIB:.0f} MiB"
    assert elapsed < 30, f"{name}: {elapsed:.1f}s"  # generous: the machine may be loaded


def test_anchors_and_aliases_are_plain_text() -> None:
    """As in Mistral's loader, `&a` and `*a` are text: an alias bomb expands to nothing."""
    document = parse_document(LAUGHS)
    values = dict(document.workflows["laughs"].vars)
    assert values["j"] == "&j [*i, *i, *i, *i, *i, *i, *i, *i, *i]"


async def test_yaml_bombs_through_the_server(stub: pb_grpc.EngineStub, witness: Witness) -> None:
    async with witness:
        for name, text in BOMBS.items():
            details = await refused(
                stub.RegisterWorkflows(pb.RegisterWorkflowsRequest(definition=text)),
                grpc.StatusCode.INVALID_ARGUMENT, "line ",
            )  # fmt: skip
            assert "Traceback" not in details, name
    # The alias bomb is taken as the harmless text it is to Mistral.
    laughs = await stub.RegisterWorkflows(pb.RegisterWorkflowsRequest(definition=LAUGHS))
    assert list(laughs.workflows) == ["laughs"]


# ---------------------------------------------------------------- expressions


def _workflow(expression: str) -> str:
    return (
        "version: '2.0'\nescape:\n  input: [x]\n  tasks:\n    t:\n      action: std.echo\n"
        f"      input:\n        output: \"{expression}\"\n"
    )


REFUSED_AT_REGISTRATION = [
    "<% $.__class__ %>",
    "<% $.x.__class__.__mro__ %>",
    "<% ''.__class__ %>",
]
FAILING_AT_RUN_TIME = {
    "<% getattr($, '__class__') %>": "Unknown function",
    "<% open('/etc/passwd') %>": "Unknown function",
    "<% call('open', '/etc/passwd') %>": "call",
    "<% $.x.format('{0.__class__}') %>": "format",
    "{{ ''.__class__.__mro__ }}": "unsafe",
    "{{ cycler.__init__.__globals__ }}": "unsafe",
    "{{ lipsum.__globals__ }}": "unsafe",
    "{{ namespace.__init__.__globals__.os }}": "unsafe",
    "{{ self._TemplateReference__context }}": "unsafe",
    "{{ '{0.__class__}'.format('') }}": "unsafe",
    "{{ open('/etc/passwd').read() }}": "undefined",
}


async def test_expressions_cannot_reach_python_internals_or_files(
    stub: pb_grpc.EngineStub, witness: Witness
) -> None:
    async with witness:
        for expression in REFUSED_AT_REGISTRATION:
            await refused(
                stub.RegisterWorkflows(pb.RegisterWorkflowsRequest(definition=_workflow(expression))),
                grpc.StatusCode.INVALID_ARGUMENT, "line 5", "YAQL",
            )  # fmt: skip
    for expression, reason in FAILING_AT_RUN_TIME.items():
        run = await stub.Run(pb.RunRequest(workflow="escape", definition=_workflow(expression),
                                           input_json='{"x": "s"}'))  # fmt: skip
        status = await stub.GetStatus(pb.GetStatusRequest(execution_id=run.execution_id))
        assert status.state == "ERROR", expression  # decided when the task started
        assert reason in status.state_info, (expression, status.state_info)
        task = status.tasks[0]
        assert task.state == "ERROR"
        for leaked in ("<class", "root:", "<function", "<module", "__builtins__"):
            assert leaked not in task.result_json + status.output_json, (expression, leaked)


# ---------------------------------------------------------------- invalid UTF-8


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (the lengths used here fit in one byte)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


BAD = b"ok\xff\xfe\xc3("  # not UTF-8


@pytest.mark.parametrize(
    ("method", "raw", "field"),
    [
        ("Run", _field(1, BAD), "workflow"),
        ("Run", _field(1, b"reference") + _field(3, b'{"name": "' + BAD + b'"}'), "input_json"),
        ("RegisterWorkflows", _field(1, b"version: '2.0'\n" + BAD), "definition"),
        ("TaskComplete", _field(1, BAD) + _field(2, b"1"), "task_id"),
        ("TaskComplete", _field(1, b"t") + _field(3, b'"' + BAD + b'"'), "error_json"),
        ("GetStatus", _field(1, BAD), "execution_id"),
        ("CancelExecution", _field(1, b"x") + _field(2, BAD), "reason"),
    ],
)
async def test_invalid_utf8_in_string_fields(
    server: EngineServer, witness: Witness, method: str, raw: bytes, field: str
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel, witness:
        call = channel.unary_unary(f"/levante.v1.Engine/{method}")  # raw bytes, no serializer
        await refused(call(raw), grpc.StatusCode.INVALID_ARGUMENT, f"{field}: not valid UTF-8")


async def test_invalid_utf8_on_a_worker_stream(server: EngineServer, witness: Witness) -> None:
    hello = _field(1, _field(1, b"w-" + BAD) + _field(2, b"x.y"))  # WorkerMessage.hello
    async with grpc.aio.insecure_channel(server.address) as channel, witness:
        call = channel.stream_stream("/levante.v1.Workers/Subscribe")
        stream = call(iter([hello]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream:
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hello.worker_id: not valid UTF-8" in (caught.value.details() or "")


# ---------------------------------------------------------------- unknown YAML keys


UNKNOWN_KEYS = [
    ("version: '2.0'\nwf:\n  taks:\n    a:\n      action: std.noop\n", 3, "taks"),
    ("version: '2.0'\nwf:\n  tasks:\n    a:\n      action: std.noop\n      bogus: 1\n", 6,
     "bogus"),
    ("version: '2.0'\nwf:\n  tasks:\n    a:\n      action: std.noop\n      retry:\n"
     "        count: 2\n        delay: 1\n        forever: true\n", 9, "forever"),
    ("version: '2.0'\nwf:\n  tasks:\n    a:\n      action: std.noop\n      on-success:\n"
     "        publish: {x: 1}\n        nxt: b\n    b:\n      action: std.noop\n", 8, "nxt"),
    ("version: '2.0'\nname: book\nworkflows:\n  wf:\n    tasks:\n      a:\n"
     "        action: std.noop\nextras: 1\n", 8, "extras"),
    ("version: '2.0'\nwf:\n  task-defaults:\n    retyr: {count: 1}\n  tasks:\n    a:\n"
     "      action: std.noop\n", 4, "retyr"),
]


async def test_unknown_yaml_keys_name_the_line(stub: pb_grpc.EngineStub, witness: Witness
                                               ) -> None:  # fmt: skip
    async with witness:
        for definition, line, key in UNKNOWN_KEYS:
            await refused(
                stub.RegisterWorkflows(pb.RegisterWorkflowsRequest(definition=definition)),
                grpc.StatusCode.INVALID_ARGUMENT, f"line {line}", key,
            )  # fmt: skip


# ---------------------------------------------------------------- workers


class RawWorker:
    """A worker speaking the stream protocol by hand, to send what a real one would not."""

    def __init__(self, channel: grpc.aio.Channel, worker_id: str, actions: list[str]) -> None:
        self.outbox: asyncio.Queue[pb.WorkerMessage | None] = asyncio.Queue()
        self.outbox.put_nowait(pb.WorkerMessage(
            hello=pb.Hello(worker_id=worker_id, actions=actions, capacity=4)))  # fmt: skip
        self.call = pb_grpc.WorkersStub(channel).Subscribe(self._requests())

    async def _requests(self) -> AsyncIterator[pb.WorkerMessage]:
        while (message := await self.outbox.get()) is not None:
            yield message

    def send(self, **kind: Any) -> None:
        self.outbox.put_nowait(pb.WorkerMessage(**kind))

    async def receive(self, kind: str) -> Any:
        async def next_of_kind() -> Any:
            while True:
                message = await self.call.read()
                assert message is not grpc.aio.EOF, "the engine ended the stream"
                if message.WhichOneof("kind") == kind:
                    return getattr(message, kind)

        return await asyncio.wait_for(next_of_kind(), 30)

    async def attached(self) -> None:
        """Once the engine answers on this stream, it has taken the hello: its actions
        are known (work for an action no worker ever declared fails at once)."""
        self.send(defer=pb.TaskDeferred(task_id="probe"))
        assert (await self.receive("ack")).code == "NOT_FOUND"

    def close(self) -> None:
        self.outbox.put_nowait(None)
        self.call.cancel()


HELD = """
version: '2.0'
held:
  tasks:
    t:
      action: hostile.owned
"""


async def test_worker_cannot_complete_an_assignment_it_does_not_hold(
    server: EngineServer, stub: pb_grpc.EngineStub, witness: Witness
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        owner = RawWorker(channel, "owner", ["hostile.owned"])
        intruder = RawWorker(channel, "intruder", ["hostile.other"])
        try:
            await owner.attached()
            await intruder.attached()
            run = await stub.Run(pb.RunRequest(workflow="held", definition=HELD))
            assignment = await owner.receive("assignment")
            task_id = assignment.task_id
            witness.execution_id = run.execution_id
            async with witness:
                intruder.send(result=pb.TaskResult(task_id=task_id, result_json='"stolen"'))
                ack = await intruder.receive("ack")
                assert (ack.task_id, ack.code) == (task_id, "FAILED_PRECONDITION")
                assert "held by another worker" in ack.message
                intruder.send(defer=pb.TaskDeferred(task_id=task_id))
                ack = await intruder.receive("ack")
                assert ack.code == "FAILED_PRECONDITION", ack
                intruder.send(result=pb.TaskResult(task_id="0" * 32 + "/1", error_json='"x"'))
                ack = await intruder.receive("ack")
                assert ack.code == "NOT_FOUND", ack
                intruder.send(heartbeat=pb.Heartbeat(task_ids=[task_id]))
            # The holder's own result is taken.
            owner.send(result=pb.TaskResult(task_id=task_id, result_json='"mine"'))
            ack = await owner.receive("ack")
            assert ack.code == "OK", ack
            status = await stub.GetStatus(pb.GetStatusRequest(execution_id=run.execution_id))
            assert status.state == "SUCCESS" and status.tasks[0].result_json == '"mine"'
        finally:
            owner.close()
            intruder.close()


async def test_worker_result_over_the_limit_fails_the_task(
    server: EngineServer, stub: pb_grpc.EngineStub
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        worker = RawWorker(channel, "greedy", ["hostile.owned"])
        try:
            await worker.attached()
            run = await stub.Run(pb.RunRequest(workflow="held", definition=HELD))
            assignment = await worker.receive("assignment")
            deep = "[" * 100 + "]" * 100
            worker.send(result=pb.TaskResult(task_id=assignment.task_id, result_json=deep))
            ack = await worker.receive("ack")
            assert ack.code == "OK", ack  # recorded, as a failure
            status = await stub.GetStatus(pb.GetStatusRequest(execution_id=run.execution_id))
            assert status.state == "ERROR"
            assert "LimitExceeded" in status.tasks[0].result_json
            assert "max-json-depth" in status.tasks[0].result_json
        finally:
            worker.close()
