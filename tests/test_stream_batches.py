"""Batches on the worker stream, through a real `levante serve`, spoken by a raw client.

A worker that says ``accepts_batches`` may get several assignments, acks and cancels as
one EngineBatch; any worker may send several results as one WorkerBatch, and each is
decided and acknowledged as if it came alone. A worker that does not say so never
sees a batch.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from support.processes import EngineServer

from levante.client import Client
from levante.v1 import levante_pb2 as pb
from levante.v1 import levante_pb2_grpc as pb_grpc

WIDTH = 30
FAN_OUT = f"""
version: '2.0'
wide:
  tasks:
    start:
      action: raw.job
      on-success: [{", ".join(f"b{i}" for i in range(WIDTH))}]
{"".join(f'''    b{i}:
      action: raw.job
      publish:
        got_{i}: <% task().result %>
      on-success: end
''' for i in range(WIDTH))}    end:
      join: all
      action: raw.job
"""


class RawWorker:
    """Speaks Workers.Subscribe by hand and records every message as it arrived."""

    def __init__(self, address: str, *, accepts_batches: bool) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._outgoing: asyncio.Queue[pb.WorkerMessage | None] = asyncio.Queue()
        self._outgoing.put_nowait(pb.WorkerMessage(hello=pb.Hello(
            worker_id=f"raw-{accepts_batches}", actions=["raw.job"], capacity=100,
            accepts_batches=accepts_batches,
        )))  # fmt: skip
        self.call = pb_grpc.WorkersStub(self._channel).Subscribe(self._requests())
        self.kinds: list[str] = []  # kinds of the stream's messages, batch or not
        self.assignments: asyncio.Queue[pb.TaskAssignment] = asyncio.Queue()
        self.acks: asyncio.Queue[pb.Ack] = asyncio.Queue()
        self.attached = asyncio.Event()  # raw.job is in the engine's catalogue

    async def _requests(self) -> AsyncIterator[pb.WorkerMessage]:
        while (message := await self._outgoing.get()) is not None:
            yield message

    def send(self, message: pb.WorkerMessage) -> None:
        self._outgoing.put_nowait(message)

    async def read(self) -> None:
        async for message in self.call:
            kind = message.WhichOneof("kind")
            self.kinds.append(kind)
            if kind == "attached":
                self.attached.set()
            inner = message.batch.messages if kind == "batch" else [message]
            for one in inner:
                assert one.WhichOneof("kind") != "batch", "a batch never holds a batch"
                if one.WhichOneof("kind") == "assignment":
                    self.assignments.put_nowait(one.assignment)
                elif one.WhichOneof("kind") == "ack":
                    self.acks.put_nowait(one.ack)

    async def take(self, count: int) -> list[pb.TaskAssignment]:
        return [await asyncio.wait_for(self.assignments.get(), 30) for _ in range(count)]

    async def acked(self, count: int) -> list[pb.Ack]:
        return [await asyncio.wait_for(self.acks.get(), 30) for _ in range(count)]

    async def close(self) -> None:
        self._outgoing.put_nowait(None)
        self.call.cancel()
        await self._channel.close()


def result(assignment: pb.TaskAssignment) -> pb.WorkerMessage:
    value = json.dumps(assignment.task_name)
    return pb.WorkerMessage(result=pb.TaskResult(task_id=assignment.task_id, result_json=value))


@pytest.mark.parametrize("accepts_batches", [True, False])
async def test_a_fan_out_answered_in_one_worker_batch(
    server: EngineServer, client: Client, accepts_batches: bool
) -> None:
    await client.register_workflows(FAN_OUT)
    worker = RawWorker(server.address, accepts_batches=accepts_batches)
    reading = asyncio.create_task(worker.read())
    try:
        await asyncio.wait_for(worker.attached.wait(), 30)
        execution_id = await client.run("wide")
        (start,) = await worker.take(1)
        worker.send(result(start))
        assert [a.code for a in await worker.acked(1)] == ["OK"]
        branches = await worker.take(WIDTH)
        # Every branch's result in one message; then the same results again (a worker
        # resending what it thinks was lost): each is decided once and acked each time.
        batch = pb.WorkerBatch(messages=[result(a) for a in branches])
        worker.send(pb.WorkerMessage(batch=batch))
        acks = await worker.acked(WIDTH)
        assert sorted(a.task_id for a in acks) == sorted(a.task_id for a in branches)
        assert {a.code for a in acks} == {"OK"}
        worker.send(pb.WorkerMessage(batch=batch))
        again = await worker.acked(WIDTH)
        assert {a.code for a in again} == {"OK"}  # the same outcome twice is accepted once
        (end,) = await worker.take(1)
        assert end.task_name == "end"
        worker.send(result(end))
        await worker.acked(1)
        info = await client.wait(execution_id, timeout=30)
        assert info.state == "SUCCESS"
        assert {info.output[f"got_{i}"] for i in range(WIDTH)} == {f"b{i}" for i in range(WIDTH)}
        assert len(info.tasks_named("end")) == 1  # the join ran once
        if accepts_batches:
            assert "batch" in worker.kinds, "30 assignments ready at once came as batches"
        else:
            assert "batch" not in worker.kinds
    finally:
        reading.cancel()
        await worker.close()
