"""The Workers service: one bidirectional stream per worker, adapted to the Dispatcher.

The stream's reader handles what the worker says (results, deferrals, heartbeats) and
acknowledges each result and deferral once the engine has decided about it; the
writer sends assignments and acks from one outbox. Everything is cleaned up in
``finally`` when the stream ends, whichever side ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence

import grpc

from levante.core.model import AssignmentRecord, Outcome
from levante.dispatch import Dispatcher, WorkerSession
from levante.engine import Completion
from levante.errors import InvalidArgumentError, LevanteError, StoreError
from levante.ids import AssignmentId
from levante.observability import logs
from levante.rpc import messages
from levante.rpc.batching import take_ready
from levante.rpc.status import status_for
from levante.v1 import levante_pb2 as pb
from levante.v1 import levante_pb2_grpc as pb_grpc

log = logging.getLogger("levante.rpc.workers")



class WorkersService(pb_grpc.WorkersServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def Subscribe(
        self,
        request_iterator: AsyncIterator[pb.WorkerMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.EngineMessage]:
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message on a stream must be hello"
            )
        hello = first.hello
        logs.bind(worker_id=hello.worker_id)  # every line about this stream names its worker
        outbox: asyncio.Queue[pb.EngineMessage | None] = asyncio.Queue()

        async def deliver(assignment: AssignmentRecord) -> None:
            outbox.put_nowait(pb.EngineMessage(assignment=messages.task_assignment(assignment)))

        session = WorkerSession(
            worker_id=hello.worker_id,
            actions=frozenset(hello.actions),
            capacity=hello.capacity,
            deliver=deliver,
            targets=frozenset(hello.targets),
            revoke=lambda task_id, reason: outbox.put_nowait(pb.EngineMessage(
                cancel=pb.AssignmentCancelled(task_id=task_id, reason=reason))),
        )
        try:
            await self._dispatcher.attach(session, [AssignmentId(i) for i in hello.holding])
        except LevanteError as e:
            code, text = status_for(e)
            await context.abort(code, text)
        outbox.put_nowait(pb.EngineMessage(attached=pb.Attached(
            worker_id=session.worker_id, lease_seconds=self._dispatcher.lease_seconds
        )))  # fmt: skip
        reader = asyncio.create_task(self._read(request_iterator, session, outbox))
        reader.add_done_callback(lambda _: outbox.put_nowait(None))
        try:
            while (message := await outbox.get()) is not None:
                if not hello.accepts_batches or outbox.empty():
                    yield message
                    continue
                batch, ended = take_ready(message, outbox)  # what is ready goes as one
                if len(batch) == 1:
                    yield message
                else:
                    yield pb.EngineMessage(batch=pb.EngineBatch(messages=batch))
                if ended:
                    break
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            # Shielded: when the stream ends by cancellation, the release must still finish,
            # or the worker's assignments would wait for their leases to run out.
            await asyncio.shield(self._dispatcher.detach(session, _unsent(outbox)))

    async def _read(
        self,
        request_iterator: AsyncIterator[pb.WorkerMessage],
        session: WorkerSession,
        outbox: asyncio.Queue[pb.EngineMessage | None],
    ) -> None:
        """Handle what the worker says. The results of one message are recorded together
        (Dispatcher.results), deferrals each on their own; each is acknowledged when its
        own decision is stored. A failure to store one ends the stream (the worker
        resends what was not acknowledged on its next stream)."""
        handling: set[asyncio.Task[None]] = set()

        def failed(task: asyncio.Task[None]) -> None:
            handling.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("worker %s: a result could not be stored: %s",
                          session.worker_id, task.exception())  # fmt: skip
                outbox.put_nowait(None)

        def start(work: Awaitable[None]) -> None:
            task = asyncio.ensure_future(work)
            handling.add(task)
            task.add_done_callback(failed)

        def handle(message: pb.WorkerMessage) -> None:
            kind = message.WhichOneof("kind")
            if kind == "result":
                start(self._acknowledge(session, outbox, [message.result]))
            elif kind == "defer":
                start(self._deferred(session, outbox, AssignmentId(message.defer.task_id)))
            elif kind == "heartbeat":
                start(self._dispatcher.heartbeat(
                    session, [AssignmentId(i) for i in message.heartbeat.task_ids]
                ))  # fmt: skip
            elif kind == "batch":
                results = []
                for inner in message.batch.messages:
                    inner_kind = inner.WhichOneof("kind")
                    if inner_kind == "result":
                        results.append(inner.result)  # recorded together, below
                    elif inner_kind in ("defer", "heartbeat"):
                        handle(inner)
                if results:
                    start(self._acknowledge(session, outbox, results))
            else:
                log.warning("worker %s sent a %s mid-stream; ignored", session.worker_id, kind)

        try:
            async for message in request_iterator:
                handle(message)
        except grpc.aio.AioRpcError as e:
            log.info("worker %s stream ended: %s", session.worker_id, e.code())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker %s stream failed", session.worker_id)
        # Results already read are still decided and acknowledged.
        if handling:
            await asyncio.wait(list(handling))

    async def _deferred(
        self,
        session: WorkerSession,
        outbox: asyncio.Queue[pb.EngineMessage | None],
        task_id: AssignmentId,
    ) -> None:
        outbox.put_nowait(await self._ack(task_id, self._dispatcher.defer(session, task_id)))

    async def _acknowledge(
        self,
        session: WorkerSession,
        outbox: asyncio.Queue[pb.EngineMessage | None],
        results: Sequence[pb.TaskResult],
    ) -> None:
        """Record results that came together, then acknowledge each. A StoreError is not
        acknowledged: it ends the stream, and the worker resends on its next one."""
        completions = []
        for result in results:
            try:
                outcome = messages.outcome_of(result)
            except InvalidArgumentError as e:
                # A worker that cannot say what happened has failed the task: record
                # that, rather than leave the assignment hanging.
                outcome = Outcome.failure({"type": "InvalidResult", "message": str(e)})
            completions.append(Completion(AssignmentId(result.task_id), outcome))
        refused = await self._dispatcher.results(session, completions)
        for completion, error in zip(completions, refused, strict=True):
            outbox.put_nowait(_ack_for(completion.assignment_id, error))

    @staticmethod
    async def _ack(task_id: AssignmentId, decided: Awaitable[None]) -> pb.EngineMessage:
        """Wait for the engine's decision and turn it into an Ack (see _ack_for)."""
        try:
            await decided
        except LevanteError as e:
            return _ack_for(task_id, e)
        return _ack_for(task_id, None)


def _ack_for(task_id: AssignmentId, error: LevanteError | None) -> pb.EngineMessage:
    """The Ack of a decision. A StoreError (or any unexpected error) is not acknowledged:
    it is raised, the stream ends, and the worker resends the result on its next stream."""
    if error is None:
        return pb.EngineMessage(ack=pb.Ack(task_id=task_id, code="OK"))
    if isinstance(error, StoreError):
        raise error
    code, text = status_for(error)
    log.info("task_id %s: %s %s", task_id, code.name, text, extra={"task_id": task_id})
    return pb.EngineMessage(ack=pb.Ack(task_id=task_id, code=code.name, message=text))


def _unsent(outbox: asyncio.Queue[pb.EngineMessage | None]) -> list[AssignmentId]:
    """The assignments left in an ended stream's outbox: the worker never saw them."""
    unsent = []
    while not outbox.empty():
        message = outbox.get_nowait()
        if message is not None and message.WhichOneof("kind") == "assignment":
            unsent.append(AssignmentId(message.assignment.task_id))
    return unsent
