"""Bad input gets the right status code, a message naming the field or line, and
changes nothing stored."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import pytest

from levante.v1 import levante_pb2 as pb
from levante.v1 import levante_pb2_grpc as pb_grpc

GOOD = """
version: '2.0'
good:
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


@pytest.fixture
async def stub(server):  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(server.address) as channel:
        await declare(channel, "test.wait_deferred")
        yield pb_grpc.EngineStub(channel)


async def declare(channel: grpc.aio.Channel, *actions: str) -> None:
    """A worker serving ``actions`` attaches and leaves: they are known to the engine (a
    task for them waits; a system that is not a worker completes it here)."""
    hello = pb.WorkerMessage(hello=pb.Hello(worker_id="declarer", actions=actions, capacity=1))
    call = pb_grpc.WorkersStub(channel).Subscribe(iter([hello]))
    async for message in call:
        if message.WhichOneof("kind") == "attached":
            break
    call.cancel()


async def expect(call, code: grpc.StatusCode, *fragments: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    details = caught.value.details() or ""
    for fragment in fragments:
        assert fragment in details, details
    return details


@pytest.mark.parametrize(
    ("definition", "fragments"),
    [
        ("version: '2.0'\nwf:\n  tasks:\n    a: [unclosed\n", ["line 4"]),
        ("version: '2.0'\nwf:\n  tasks:\n    a:\n      acton: std.noop\n", ["line 5", "acton"]),
        (
            "version: '2.0'\nwf:\n  tasks:\n    a:\n      action: std.noop\n"
            "      on-success: [ghost]\n",
            ["line 6", "ghost"],
        ),
        (
            "version: '2.0'\nwf:\n  tasks:\n    a:\n      action: std.noop\n"
            "      workflow: other\n",
            ["line 6", "action", "workflow"],
        ),
    ],
)
async def test_invalid_definitions_name_the_line(stub, store_url: str, definition: str,  # type: ignore[no-untyped-def]
                                                 fragments: list[str]) -> None:  # fmt: skip
    before = counts(store_url)
    await expect(
        stub.RegisterWorkflows(pb.RegisterWorkflowsRequest(definition=definition)),
        grpc.StatusCode.INVALID_ARGUMENT,
        *fragments,
    )
    # Run with an invalid inline definition is refused the same way and starts nothing.
    await expect(
        stub.Run(pb.RunRequest(workflow="wf", definition=definition)),
        grpc.StatusCode.INVALID_ARGUMENT,
        *fragments,
    )
    assert counts(store_url) == before


async def test_run_refuses_bad_requests_and_stores_nothing(stub, store_url: str) -> None:  # type: ignore[no-untyped-def]
    await stub.RegisterWorkflows(pb.RegisterWorkflowsRequest(definition=GOOD))
    before = counts(store_url)
    await expect(stub.Run(pb.RunRequest(workflow="nope")), grpc.StatusCode.NOT_FOUND, "nope")
    await expect(
        stub.Run(pb.RunRequest(workflow="good", input_json="{not json")),
        grpc.StatusCode.INVALID_ARGUMENT, "input_json",
    )  # fmt: skip
    await expect(
        stub.Run(pb.RunRequest(workflow="good", input_json="[1, 2]")),
        grpc.StatusCode.INVALID_ARGUMENT, "input_json", "object",
    )  # fmt: skip
    await expect(
        stub.Run(pb.RunRequest(workflow="good", input_json="{}")),
        grpc.StatusCode.INVALID_ARGUMENT, "name", "missing",
    )  # fmt: skip
    await expect(
        stub.Run(pb.RunRequest(workflow="good", input_json='{"name": 1, "extra": 2}')),
        grpc.StatusCode.INVALID_ARGUMENT, "extra",
    )  # fmt: skip
    await expect(
        stub.Run(pb.RunRequest(workflow="good", input_json='{"name": 1}', params_json="[]")),
        grpc.StatusCode.INVALID_ARGUMENT, "params_json",
    )  # fmt: skip
    await expect(
        stub.Run(pb.RunRequest(workflow="good", input_json='{"name": 1}',
                               params_json='{"env": 3}')),
        grpc.StatusCode.INVALID_ARGUMENT, "env",
    )  # fmt: skip
    await expect(
        stub.GetStatus(pb.GetStatusRequest(execution_id="missing")),
        grpc.StatusCode.NOT_FOUND, "missing",
    )  # fmt: skip
    assert counts(store_url) == before


async def test_task_complete_unknown_duplicate_and_conflicting(stub, store_url: str) -> None:  # type: ignore[no-untyped-def]
    await expect(
        stub.TaskComplete(pb.TaskCompleteRequest(task_id="no-such-task", result_json="1")),
        grpc.StatusCode.NOT_FOUND, "no-such-task",
    )  # fmt: skip
    run = await stub.Run(pb.RunRequest(workflow="good", definition=GOOD,
                                       input_json='{"name": "x"}'))  # fmt: skip
    status = await stub.GetStatus(pb.GetStatusRequest(execution_id=run.execution_id))
    task_id = status.tasks[0].assignment_id
    assert task_id
    await expect(
        stub.TaskComplete(pb.TaskCompleteRequest(task_id=task_id)),
        grpc.StatusCode.INVALID_ARGUMENT, "outcome",
    )  # fmt: skip
    await expect(
        stub.TaskComplete(pb.TaskCompleteRequest(task_id=task_id, result_json="{oops")),
        grpc.StatusCode.INVALID_ARGUMENT, "result_json",
    )  # fmt: skip
    await stub.TaskComplete(pb.TaskCompleteRequest(task_id=task_id, result_json='{"ok": 1}'))
    after_first = counts(store_url)
    done = await stub.GetStatus(pb.GetStatusRequest(execution_id=run.execution_id))
    assert done.state == "SUCCESS"
    # The same outcome again: OK, and no second effect.
    await stub.TaskComplete(pb.TaskCompleteRequest(task_id=task_id, result_json='{"ok":1}'))
    assert counts(store_url) == after_first
    # A different outcome: FAILED_PRECONDITION, nothing changes.
    await expect(
        stub.TaskComplete(pb.TaskCompleteRequest(task_id=task_id, error_json='"late"')),
        grpc.StatusCode.FAILED_PRECONDITION, task_id,
    )  # fmt: skip
    assert counts(store_url) == after_first
    again = await stub.GetStatus(pb.GetStatusRequest(execution_id=run.execution_id))
    assert again == done


def test_store_file_is_real(store_url: str, server) -> None:  # type: ignore[no-untyped-def]
    assert Path(store_url.removeprefix("sqlite:///")).exists()
